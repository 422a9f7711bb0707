"""Run the reference code on the golden cases (called by make_golden.py; not a test).

Runs in the reference code's own environment (transformers 4.x: its hooks expect the tuple
outputs of GPT-2 blocks), from its own checkout, which is put on ``sys.path``:

    python reference_runner.py --repo rome|memit|paper --checkout DIR --inputs inputs.json --out out.json

Shims, all at run time and none touching the math:
- imports the code never uses for these cases are stubbed: ``datasets``, ``matplotlib``,
  ``util.globals`` (it reads globals.yml from the working directory), and for the paper's
  ``experiments/evaluate.py`` its other editors (KE, KN, MEND), ``dsets``, ``google.cloud``,
  ``sklearn`` and ``nltk`` (used only by generation tests that do not run here);
- ``layer_stats`` returns the C that tracekit's side uses (the corpus statistics are not part
  of the comparison), and the context templates cache is set to the fixture's templates;
- "cuda" devices are mapped to the CPU (a TorchFunctionMode): the code hard-codes .to("cuda");
- the tokenizer is read from tokenizer.json (the folder's tokenizer_config.json is
  transformers 5's); the essence texts are the fixture's (``generate_fast`` samples them
  with the global RNG otherwise); Tracing Reversal's ``generate_fast`` runs as is, after
  ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import argparse
import collections
import importlib.machinery
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ESSENCE_TEXTS, FACTS  # noqa: E402


# ---- shims ----------------------------------------------------------------------------------------
def _cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


def _module(name: str, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


class _Anything:
    """A stand-in class for names the stubbed modules must export."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Anything


def install_stubs(repo: str, work: Path) -> None:
    _module("datasets", load_dataset=None)
    mpl = _module("matplotlib")
    mpl.pyplot = _module("matplotlib.pyplot")
    mpl.style = _module("matplotlib.style", context=None)
    paths = {k: work / k.lower() for k in ("RESULTS_DIR", "DATA_DIR", "STATS_DIR", "HPARAMS_DIR")}
    _module("util.globals", **paths, REMOTE_ROOT_URL="", __all__=[*paths, "REMOTE_ROOT_URL"])
    if repo == "paper":
        google = _module("google")
        google.cloud = _module("google.cloud")
        google.cloud.storage = _module("google.cloud.storage")
        for name, exports in {"baselines.efk": ("EFKHyperParams", "EfkRewriteExecutor"),
                              "baselines.kn": ("KNHyperParams", "apply_kn_to_model"),
                              "baselines.mend": ("MENDHyperParams", "MendRewriteExecutor")}.items():
            _module(name, **{e: _Anything for e in exports})

        class Snippets:
            def __init__(self, *args, **kwargs):
                self.names_to_samples = {}

            def __getitem__(self, key):  # no consistency snippets: that generation test is skipped
                return collections.defaultdict(list)

        _module("dsets", AttributeSnippets=Snippets, CounterFactDataset=_Anything, MENDQADataset=_Anything,
                KnownsDataset=_Anything, get_tfidf_vectorizer=lambda *a, **k: None)
        sk = _module("sklearn")
        sk.feature_extraction = _module("sklearn.feature_extraction")
        sk.feature_extraction.text = _module("sklearn.feature_extraction.text", TfidfVectorizer=_Anything)
        _module("nltk")
    else:
        _module("dsets", KnownsDataset=_Anything)


class _Moment:
    def __init__(self, matrix):
        self.matrix = matrix

    def moment(self):
        return self.matrix


def stats_stub(C: dict[int, torch.Tensor]):
    def layer_stats(model, tok, layer_name, *args, **kwargs):
        layer = int(layer_name.split(".")[2])
        return SimpleNamespace(mom2=_Moment(C[layer].clone()))

    return layer_stats


# ---- inputs ----------------------------------------------------------------------------------------
def load_model(folder: str):
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").float().eval()
    model.config._name_or_path = folder
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_input_names = ["input_ids", "attention_mask"]  # as GPT-2's tokenizer: no token_type_ids
    return model, tok


def gpt2_templates(n_layer: int) -> dict:
    return dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                ln_f_module="transformer.ln_f", lm_head_module="transformer.wte")


def request_of(fact: dict, target: str) -> dict:
    return {"case_id": fact["case_id"], "prompt": fact["prompt"], "subject": fact["subject"],
            "target_new": {"str": target, "id": "new"}, "target_true": {"str": fact["target_true"], "id": "true"}}


@torch.no_grad()
def probabilities(model, tok, prompt: str, target: str) -> dict:
    """p(first target token | prompt) and p(whole target), teacher forced."""
    p_ids, t_ids = tok(prompt)["input_ids"], tok(target)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    picked = logp[torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids)), torch.tensor(t_ids)]
    return {"p_first": float(picked[0].exp()), "p_sequence": float(picked.sum().exp())}


def apply_deltas(model, deltas: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in deltas}
    with torch.no_grad():
        for k, d in deltas.items():
            params[k][...] += d.to(params[k].dtype)
    return saved


def restore(model, saved):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in saved.items():
            params[k][...] = v


# ---- kmeng01/rome and kmeng01/memit ------------------------------------------------------------------
def run_rome(case, model, tok, C, tensors) -> dict:
    import rome.compute_u as cu
    import rome.rome_main as rm
    from rome.rome_hparams import ROMEHyperParams

    cu.layer_stats = stats_stub({k: v.to(getattr(torch, case["c_dtype"])) for k, v in C.items()})
    cu.inv_mom2_cache.clear()
    rm.CONTEXT_TEMPLATES_CACHE = list(case["templates"])
    hp = ROMEHyperParams(**case["hparams"], **gpt2_templates(model.config.n_layer))
    fact = FACTS[case["fact"]]
    deltas = rm.execute_rome(model, tok, request_of(fact, case["target"]), hp)
    (name, (u, right)), = deltas.items()
    tensors[f"{case['id']}/u"], tensors[f"{case['id']}/right"] = u.float(), right.float()
    w = dict(model.named_parameters())[name]
    update = rm.upd_matrix_match_shape(u[:, None] @ right[None], w.shape)
    saved = apply_deltas(model, {name: update})
    after = probabilities(model, tok, fact["prompt"].format(fact["subject"]), " " + case["target"].strip())
    restore(model, saved)
    return {"parameter": name, "after": after}


def run_memit(case, model, tok, C, tensors) -> dict:
    import memit.memit_main as mm
    from memit.memit_hparams import MEMITHyperParams

    mm.layer_stats = stats_stub(C)
    mm.COV_CACHE.clear()
    mm.CONTEXT_TEMPLATES_CACHE = [list(g) for g in case["templates"]]
    hp = MEMITHyperParams(**case["hparams"], **gpt2_templates(model.config.n_layer))
    fact = FACTS[case["fact"]]
    deltas = mm.execute_memit(model, tok, [request_of(fact, case["target"])], hp)
    params = dict(model.named_parameters())
    updates = {}
    for name, (adj_k, resid) in deltas.items():
        layer = name.split(".")[2]
        tensors[f"{case['id']}/adj_k/{layer}"] = adj_k[:, 0].float()
        tensors[f"{case['id']}/resid/{layer}"] = resid[:, 0].float()
        updates[name] = mm.upd_matrix_match_shape(adj_k @ resid.T, params[name].shape).float()
    saved = apply_deltas(model, updates)
    after = probabilities(model, tok, fact["prompt"].format(fact["subject"]), " " + case["target"].strip())
    restore(model, saved)
    return {"parameters": sorted(deltas), "after": after}


def run_trace(case, model, tok, tensors) -> dict:
    from experiments import causal_trace as ct

    fact = FACTS[case["fact"]]
    mt = SimpleNamespace(model=model, tokenizer=tok, num_layers=model.config.n_layer)
    result = ct.calculate_hidden_flow(mt, fact["prompt"].format(fact["subject"]), fact["subject"],
                                      samples=case["samples"], noise=case["noise"], window=case["window"],
                                      kind=case["kind_arg"])
    tensors[f"{case['id']}/scores"] = result["scores"].float()
    return {"low_score": float(result["low_score"]), "high_score": float(result["high_score"]),
            "answer": result["answer"], "subject_range": list(result["subject_range"])}


def run_s3(case, model, tok, subjects) -> dict:
    from experiments import causal_trace as ct

    mt = SimpleNamespace(model=model, tokenizer=tok)
    return {"std": ct.collect_embedding_std(mt, subjects)}


# ---- google/belief-localization (the paper's code) -------------------------------------------------
PAPER_FLAGS = {"error-injection": None, "tracing-reversal": "tracing_reversal", "fact-erasure": "fact_erasure",
               "fact-amplification": "fact_amplification", "fact-forcing": "fact_forcing"}


def run_paper(case, model, tok, C, tensors, work: Path) -> dict:
    """One point through experiments/evaluate.py's ``main``: the problem's target and baseline,
    the edit (under the subject noise for Fact Forcing), and the pre/post evaluation."""
    import experiments.evaluate as ev
    import rome.compute_u as cu
    import rome.rome_main as rm
    import memit.memit_main as mm

    alg, problem = case["alg"], case["problem"]
    flags = {f: False for f in ("tracing_reversal", "fact_erasure", "fact_amplification", "fact_forcing",
                                "weight_based_tracing")}
    if PAPER_FLAGS[problem]:
        flags[PAPER_FLAGS[problem]] = True
    args = SimpleNamespace(alg_name=alg, kl_factor=-1, v_lr=-1, norm_constraint=-1, fact_token="subject_last", **flags)
    ev.args = args  # make_editing_results_df reads the module's global ``args``
    root = Path(tempfile.mkdtemp(dir=work))
    ev.CODE_DIR, ev.BASE_DIR = str(root / "code"), str(root / "base")
    hp_dir = root / "code" / "hparams" / alg
    hp_dir.mkdir(parents=True)
    hp = {**case["hparams"], **gpt2_templates(model.config.n_layer)}
    (hp_dir / ("tiny_constr.json" if alg == "FT" else "tiny.json")).write_text(json.dumps(hp))
    cu.layer_stats = stats_stub({k: v.to(getattr(torch, case.get("c_dtype", "float32"))) for k, v in C.items()})
    cu.inv_mom2_cache.clear()
    mm.layer_stats = stats_stub(C)
    mm.COV_CACHE.clear()
    if alg == "ROME":
        rm.CONTEXT_TEMPLATES_CACHE = list(case["templates"])
    if alg == "MEMIT":
        mm.CONTEXT_TEMPLATES_CACHE = [list(g) for g in case["templates"]]

    fact = FACTS[case["fact"]]
    record = {"case_id": fact["case_id"],
              "requested_rewrite": {"prompt": fact["prompt"], "subject": fact["subject"], "relation_id": "P0",
                                    "target_new": {"str": fact["target_new"].strip(), "id": "new"},
                                    "target_true": {"str": fact["target_true"].strip(), "id": "true"}},
              "paraphrase_prompts": fact["paraphrase_prompts"], "neighborhood_prompts": fact["neighborhood_prompts"],
              "attribute_prompts": [], "generation_prompts": []}

    class OnePoint:
        def __init__(self, *a, **k):
            pass

        def __iter__(self):
            return iter([json.loads(json.dumps(record))])

    ev.DS_DICT["cf"] = (OnePoint, ev.DS_DICT["cf"][1])
    real_generate = ev.generate_fast

    def generate(model_, tok_, prompts, n_gen_per_prompt=1, top_k=5, max_out_len=200):
        if n_gen_per_prompt == 5 and prompts == ["{} is a".format(fact["subject"])]:
            return list(ESSENCE_TEXTS[fact["subject"]])  # the fixture's essence texts
        torch.manual_seed(case.get("seed", 0))
        return real_generate(model_, tok_, prompts, n_gen_per_prompt=n_gen_per_prompt, top_k=top_k,
                             max_out_len=max_out_len)

    ev.generate_fast = generate
    captured = {}
    params_class, apply_algo = ev.ALG_DICT[alg]

    def apply_and_capture(*a, **k):
        edited, weights_copy = apply_algo(*a, **k)
        params = dict(edited.named_parameters())
        captured.update({name: (params[name].detach() - old.to(params[name].device)).clone()
                         for name, old in weights_copy.items()})
        return edited, weights_copy

    ev.ALG_DICT[alg] = (params_class, apply_and_capture)
    try:
        mt = SimpleNamespace(model=model, tokenizer=tok, num_layers=model.config.n_layer)
        tok.pad_token = tok.eos_token
        ev.main(args, alg_name=alg, model_name="tiny", ds_name="cf", dataset_size_limit=1,
                do_essence_tests=case.get("essence", True), skip_generation_tests=not case.get("essence", True),
                conserve_memory=False, mt=mt, verbose=False, override_hparams=None, overwrite=True,
                correctness_check=False, target_prob_check=0)
    finally:
        ev.ALG_DICT[alg] = (params_class, apply_algo)
        ev.generate_fast = real_generate
    results_dir = root / "base" / "results"
    (case_file,) = results_dir.rglob(f"case_{fact['case_id']}.json")
    point = json.loads(case_file.read_text())
    frame = ev.make_editing_results_df(str(case_file.parent.relative_to(results_dir)), n=fact["case_id"] + 1)
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[0].to_dict().items()
           if isinstance(v, (int, float, np.floating, np.integer, str))}
    for name, delta in captured.items():
        tensors[f"{case['id']}/delta/{name}"] = delta.float()
    return {"request": point["requested_rewrite"], "pre": _strip(point["pre"]), "post": _strip(point["post"]),
            "scores": row, "parameters": sorted(captured)}


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "essence_text"}


# ---- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, choices=("rome", "memit", "paper"))
    parser.add_argument("--checkout", required=True, help="the repository's checkout (the paper's: its third_party/)")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    inputs = json.loads(Path(args.inputs).read_text())
    work = Path(tempfile.mkdtemp(prefix="golden-ref-"))
    sys.path.insert(0, str(Path(args.checkout).resolve()))
    os.chdir(work)
    import transformers  # noqa: F401  (before the stubs: it probes which packages exist)

    install_stubs(args.repo, work)
    from safetensors.torch import load_file, save_file

    stats = load_file(inputs["stats"])
    models = {name: load_model(folder) for name, folder in inputs["models"].items()}
    results, tensors = {}, {}
    torch.manual_seed(0)
    with CudaToCpu():
        for case in inputs["cases"]:
            if case["repo"] != args.repo:
                continue
            model, tok = models[case["model"]]
            C = {int(k.split("/")[-1]): v for k, v in stats.items() if k.startswith(case["model"] + "/")}
            print(f"[{args.repo}] {case['id']}", file=sys.stderr, flush=True)
            if case["kind"] == "rome":
                results[case["id"]] = run_rome(case, model, tok, C, tensors)
            elif case["kind"] == "memit":
                results[case["id"]] = run_memit(case, model, tok, C, tensors)
            elif case["kind"] == "trace":
                results[case["id"]] = run_trace(case, model, tok, tensors)
            elif case["kind"] == "s3":
                results[case["id"]] = run_s3(case, model, tok, inputs["subjects"][case["subjects"]])
            elif case["kind"] == "paper":
                results[case["id"]] = run_paper(case, model, tok, C, tensors, work)
            else:
                raise SystemExit(f"unknown case kind {case['kind']!r}")
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(args.out).with_suffix(".safetensors")))


if __name__ == "__main__":
    main()
