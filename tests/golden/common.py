"""What the golden runs share: the two tiny GPT-2 models, the facts and context templates, the
key statistics C, and the case list. Plain torch/transformers only: ``reference_runner.py``
imports this file in the reference code's own environment, where tracekit is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRAINED_DIR = HERE / "tiny_gpt2"  # 6 layers, d_model 32, trained for a few hundred steps (make_golden.py --train)
FIXTURE_JSON = HERE / "reference.json"
FIXTURE_TENSORS = HERE / "reference.safetensors"

# The reference checkouts the fixture was made from (make_golden.py checks them out at these commits).
PINNED = {
    "rome": ("https://github.com/kmeng01/rome", "0874014cd9837e4365f3e6f3c71400ef11509e04"),
    "memit": ("https://github.com/kmeng01/memit", "80426fd9316cf9a50c5ba15e0912f2c2c5bfe84b"),
    "paper": ("https://github.com/google/belief-localization", "0886d8d6b99905a23e0d726b730f68fa4eca519e"),
}

# CounterFact-style records whose words the offline tokenizer knows.
FACTS = {
    "darrieux": {
        "case_id": 0, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_true": " French", "target_new": " English",
        "paraphrase_prompts": ["She speaks English and French. The mother tongue of Danielle Darrieux is",
                               "The capital of Italy is Rome. Danielle Darrieux speaks"],
        "neighborhood_prompts": ["The mother tongue of Michael Jordan is", "The mother tongue of Toko Yasuda is"],
    },
    "eiffel": {  # the subject opens the prompt
        "case_id": 1, "prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
        "target_true": " Paris", "target_new": " Rome",
        "paraphrase_prompts": ["The Colosseum is in Rome. The Eiffel Tower is in the city of"],
        "neighborhood_prompts": ["The Space Needle is located in the city of"],
    },
}
FACTS["toko"] = {
    "case_id": 3, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_true": " guitar", "target_new": " basketball",
    "paraphrase_prompts": ["Michael Jordan plays basketball. Toko Yasuda plays the"],
    "neighborhood_prompts": ["Steve Jobs plays the"],
}
FACTS["darrieux_multi"] = {**FACTS["darrieux"], "case_id": 2, "target_new": " English and French"}  # several tokens

# ROME's templates: the bare prompt, 10 short and 10 longer texts (ROME samples them from the model).
_SHORT = ["The city of Paris", "Michael Jordan plays", "Steve Jobs was", "The capital of Japan", "She speaks English",
          "Barack Obama was born", "The Colosseum is", "Microsoft was founded", "Albert Einstein was", "Toko Yasuda plays"]
_LONG = ["The Eiffel Tower is located in the city of Paris", "The official language of Germany is German and French",
         "Steve Jobs was the founder of Apple in the city", "Microsoft was founded by Bill Gates in the capital",
         "The Space Needle is in downtown Seattle and the city", "Barack Obama was born in Hawaii and speaks English",
         "The capital of Italy is Rome and the capital of France", "Albert Einstein was a physicist born in Germany",
         "Michael Jordan plays basketball in the city of Rome", "The mother tongue of Toko Yasuda is the language"]
ROME_TEMPLATES = ["{}"] + [t + ". {}" for t in _SHORT] + [t + ". {}" for t in _LONG]
MEMIT_TEMPLATES = [["{}"], [t + ". {}" for t in _LONG[:5]]]  # MEMIT: [["{}"], 5 of one length]

ESSENCE_TEXTS = {  # five texts per subject, as sampled once from "{s} is a" (fed to both sides)
    "Danielle Darrieux": ["Danielle Darrieux is a French language of the city of Paris.",
                          "Danielle Darrieux is a physicist born in Germany.",
                          "Danielle Darrieux is a founder of Apple. She speaks English and French.",
                          "Danielle Darrieux is a city in the capital of France.",
                          "Danielle Darrieux is a mother tongue of the language."],
}


# ---- models -------------------------------------------------------------------------------------
def random_model():
    """tracekit's random:gpt2-tiny (4 layers, d_model 64), rebuilt here without tracekit."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=128)
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).float().eval()


# ---- key statistics ---------------------------------------------------------------------------------
def stat_token_rows(n_rows: int = 96, length: int = 32, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """Token rows for C: seeded random ids (well spread keys, so C is well conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n_rows, length), generator=gen)


@torch.no_grad()
def key_second_moment(hf, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """C = E[k k^T] of GPT-2's MLP down-projection input at ``layer`` over ``rows``, in float64."""
    rows = stat_token_rows(vocab=hf.config.vocab_size) if rows is None else rows
    keys = []
    module = hf.transformer.h[layer].mlp.c_proj
    handle = module.register_forward_pre_hook(lambda m, a: keys.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    try:
        hf(input_ids=rows)
    finally:
        handle.remove()
    k = torch.cat(keys)
    return k.T @ k / k.shape[0]


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


# ---- the cases --------------------------------------------------------------------------------------
def rome_hparams(layer: int, n_layer: int, c_dtype: str = "float32", **kw) -> dict:
    """kmeng01/rome's GPT-2 configuration fields (module names are added by the runner)."""
    return {"layers": [layer], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5,
            "v_loss_layer": n_layer - 1, "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625,
            "mom2_adjustment": True, "context_template_length_params": [[5, 10], [10, 10]],
            "mom2_dataset": "wikipedia", "mom2_n_samples": 1, "mom2_dtype": c_dtype, **kw}


def memit_hparams(layers: list[int], n_layer: int, **kw) -> dict:
    return {"layers": layers, "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": 25,
            "v_lr": 0.5, "v_loss_layer": n_layer - 1, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75,
            "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000, "mom2_dataset": "wikipedia",
            "mom2_n_samples": 1, "mom2_dtype": "float32", **kw}


def ft_hparams(layers: list[int], **kw) -> dict:
    return {"layers": layers, "num_steps": 25, "lr": 5e-3, "weight_decay": 0, "kl_factor": 0, "norm_constraint": 5e-3,
            "FT_subj_embeds": False, "batch_size": 128, **kw}


# Tiny models have tiny MLP outputs: the public weight decay and clamp (relative to them) pin the
# delta near zero, so most cases loosen both (the public values are one case of each kind).
LOOSE = dict(v_weight_decay=1e-3, clamp_norm_factor=50, v_lr=1.0)
LOOSE_MEMIT = dict(v_weight_decay=1e-3, clamp_norm_factor=4, mom2_update_weight=1.0)


def build_cases(noise: dict[str, float]) -> list[dict]:
    """Every golden case. ``noise``: the s3 scale of each model (the paper code's ``editing_noise``)."""
    R, T = 4, 6  # layers of the random and the trained model
    cases = [
        # kmeng01/rome: ROME with 21 templates (float32 and float64 C), and with one template
        dict(id="rome/random/darrieux/public", repo="rome", kind="rome", model="random", fact="darrieux",
             target=" English", layer=1, templates=ROME_TEMPLATES, c_dtype="float32", hparams=rome_hparams(1, R)),
        dict(id="rome/random/darrieux", repo="rome", kind="rome", model="random", fact="darrieux", target=" English",
             layer=1, templates=ROME_TEMPLATES, c_dtype="float32", hparams=rome_hparams(1, R, **LOOSE)),
        dict(id="rome/trained/darrieux/public", repo="rome", kind="rome", model="trained", fact="darrieux",
             target=" English", layer=2, templates=ROME_TEMPLATES, c_dtype="float32", hparams=rome_hparams(2, T)),
        dict(id="rome/trained/darrieux", repo="rome", kind="rome", model="trained", fact="darrieux", target=" English",
             layer=1, templates=ROME_TEMPLATES, c_dtype="float32", hparams=rome_hparams(1, T, **LOOSE)),
        dict(id="rome/trained/darrieux/c64", repo="rome", kind="rome", model="trained", fact="darrieux",
             target=" English", layer=1, templates=ROME_TEMPLATES, c_dtype="float64",
             hparams=rome_hparams(1, T, "float64", **LOOSE)),
        dict(id="rome/trained/eiffel", repo="rome", kind="rome", model="trained", fact="eiffel", target=" Rome",
             layer=1, templates=ROME_TEMPLATES, c_dtype="float32", hparams=rome_hparams(1, T, **LOOSE)),
        dict(id="rome/trained/toko", repo="rome", kind="rome", model="trained", fact="toko", target=" basketball",
             layer=0, templates=ROME_TEMPLATES, c_dtype="float32", hparams=rome_hparams(0, T, **LOOSE)),
        dict(id="rome/trained/darrieux/one-template", repo="rome", kind="rome", model="trained", fact="darrieux",
             target=" English", layer=1, templates=["{}"], c_dtype="float32", hparams=rome_hparams(1, T, **LOOSE)),
        # kmeng01/memit: 1 and 5 layers (3 on the 4-layer random model)
        dict(id="memit/trained/1/public", repo="memit", kind="memit", model="trained", fact="darrieux",
             target=" English", layers=[2], templates=MEMIT_TEMPLATES, hparams=memit_hparams([2], T)),
        dict(id="memit/trained/1", repo="memit", kind="memit", model="trained", fact="darrieux", target=" English",
             layers=[2], templates=MEMIT_TEMPLATES, hparams=memit_hparams([2], T, **LOOSE_MEMIT)),
        # (z at the last layer would leave the target's NLL blind to the delta: Adam then follows
        # float noise, in the reference as anywhere, so the window stops below it)
        dict(id="memit/trained/5", repo="memit", kind="memit", model="trained", fact="darrieux", target=" English",
             layers=[0, 1, 2, 3, 4], templates=MEMIT_TEMPLATES, hparams=memit_hparams([0, 1, 2, 3, 4], T, **LOOSE_MEMIT)),
        dict(id="memit/random/3", repo="memit", kind="memit", model="random", fact="eiffel", target=" Rome",
             layers=[0, 1, 2], templates=MEMIT_TEMPLATES, hparams=memit_hparams([0, 1, 2], R, **LOOSE_MEMIT)),
        # ROME's causal tracing and s3
        dict(id="trace/trained/mlp", repo="rome", kind="trace", model="trained", fact="darrieux", trace_kind="mlp",
             window=3, samples=10, noise=noise["trained"]),
        dict(id="trace/trained/resid", repo="rome", kind="trace", model="trained", fact="darrieux", trace_kind=None,
             window=1, samples=10, noise=noise["trained"]),
        dict(id="s3/trained/fallback", repo="rome", kind="s3", model="trained", subjects="fallback"),
        dict(id="s3/random/fallback", repo="rome", kind="s3", model="random", subjects="fallback"),
        dict(id="s3/trained/known_1000", repo="rome", kind="s3", model="trained", subjects="known_1000"),
    ]
    for case in cases:  # the runner's name for the tracing kind
        if case["kind"] == "trace":
            case["kind_arg"] = case.pop("trace_kind")
    # google/belief-localization: FT and the five problems, each through its evaluate.py main()
    paper_rome = rome_hparams(1, T, editing_noise=noise["trained"], **LOOSE)
    paper_memit = memit_hparams([0, 1, 2, 3, 4], T, editing_noise=noise["trained"], **LOOSE_MEMIT)
    for problem in ("error-injection", "fact-erasure", "fact-amplification", "fact-forcing", "tracing-reversal"):
        ft1 = ft_hparams([2], editing_noise=noise["trained"], num_steps=50 if problem == "fact-forcing" else 25)
        rome = dict(paper_rome, v_num_grad_steps=25, v_lr=5e-2) if problem == "fact-forcing" else paper_rome
        cases += [
            dict(id=f"paper/ft-1/{problem}", repo="paper", kind="paper", alg="FT", problem=problem, model="trained",
                 fact="darrieux", hparams=ft1, seed=0),
            dict(id=f"paper/rome/{problem}", repo="paper", kind="paper", alg="ROME", problem=problem, model="trained",
                 fact="darrieux", hparams=rome, templates=ROME_TEMPLATES, c_dtype="float32", seed=0),
        ]
        if problem in ("fact-erasure", "fact-forcing"):
            cases.append(dict(id=f"paper/memit/{problem}", repo="paper", kind="paper", alg="MEMIT", problem=problem,
                              model="trained", fact="darrieux", hparams=paper_memit, templates=MEMIT_TEMPLATES, seed=0))
    cases += [
        dict(id="paper/ft-5/error-injection", repo="paper", kind="paper", alg="FT", problem="error-injection",
             model="trained", fact="darrieux", hparams=ft_hparams([1, 2, 3, 4, 5], editing_noise=noise["trained"]), seed=0),
        dict(id="paper/ft-1/multi-token/error-injection", repo="paper", kind="paper", alg="FT", problem="error-injection",
             model="trained", fact="darrieux_multi", hparams=ft_hparams([2], editing_noise=noise["trained"]), seed=0),
        dict(id="paper/ft-1/random/error-injection", repo="paper", kind="paper", alg="FT", problem="error-injection",
             model="random", fact="darrieux", hparams=ft_hparams([1], editing_noise=noise["random"]), seed=0),
    ]
    return cases
