"""Named hyperparameter presets for ROME, MEMIT and FT, keyed by model family.

A model's family comes from its spec (``model_family``), never from its shape: the
hub names and local folders named after them ("EleutherAI/gpt-j-6B", ".../gpt2-xl"), the
bundled "smollm2-135m"; anything else ("random:gpt2-xl" included) is "generic".
Values: the public ROME/MEMIT configurations (Meng et al. 2022a/b) for GPT-J and GPT2-XL,
the per-problem values of Hase et al. 2023 (appendix and google/belief-localization's
``get_override_hparams``), and tracekit's presets for the bundled SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePath

from tracekit.editing.finetune import FTHyperParams
from tracekit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from tracekit.errors import TracekitError

FAMILIES = ("gpt-j-6b", "gpt2-xl", "smollm2-135m", "generic")
_SPEC_FAMILY = {"eleutherai/gpt-j-6b": "gpt-j-6b", "gpt-j-6b": "gpt-j-6b", "gpt2-xl": "gpt2-xl",
                "smollm2-135m": "smollm2-135m"}


def model_family(model_or_spec) -> str:
    """The preset family of a model (or spec): gpt-j-6b, gpt2-xl, smollm2-135m or generic."""
    spec = model_or_spec if isinstance(model_or_spec, str) else getattr(model_or_spec, "spec", "")
    spec = spec.strip().rstrip("/").lower()
    if spec.startswith("random:"):
        return "generic"
    for key in (spec, PurePath(spec).name, PurePath(spec).stem):
        if key in _SPEC_FAMILY:
            return _SPEC_FAMILY[key]
    return "generic"


# ---- ROME and MEMIT ------------------------------------------------------------------
_PUBLIC = "public ROME/MEMIT configuration"
_SMOLLM2_LAYER = 3  # see SMOLLM2_NOTE
_SMOLLM2_STATS = dict(mom2_n_samples=256, mom2_sample_tokens=128, mom2_ridge=1e-3)

ROME_PRESETS: dict[str, ROMEHyperParams] = {
    "gpt-j-6b": ROMEHyperParams(layer=5, source=f"{_PUBLIC}, GPT-J"),
    "gpt2-xl": ROMEHyperParams(layer=17, source=f"{_PUBLIC}, GPT2-XL"),
    # Hase et al. 2023, appendix: ROME's KL weight tuned to 1 for Error Injection on GPT-J; Fact Forcing:
    # 25 v* steps (appendix) at v_lr 5e-2 (the paper's code, get_override_hparams).
    "gpt-j-6b/error-injection": ROMEHyperParams(layer=5, kl_factor=1.0, source="paper appendix, GPT-J Error Injection"),
    "gpt-j-6b/fact-forcing": ROMEHyperParams(layer=5, v_num_grad_steps=25, v_lr=5e-2,
                                             source="paper appendix and code, GPT-J Fact Forcing"),
    "gpt2-xl/fact-forcing": ROMEHyperParams(layer=17, v_num_grad_steps=25, v_lr=5e-2,
                                            source="paper code, GPT2-XL Fact Forcing"),
    "smollm2-135m": ROMEHyperParams(layer=_SMOLLM2_LAYER, **_SMOLLM2_STATS, source="tracekit, SmolLM2-135M (see SMOLLM2_NOTE)"),
    # the paper's reasons for 25 v* steps at v_lr 5e-2 under the subject noise hold for any model
    "smollm2-135m/fact-forcing": ROMEHyperParams(layer=_SMOLLM2_LAYER, v_num_grad_steps=25, v_lr=5e-2, **_SMOLLM2_STATS,
                                                 source="tracekit, SmolLM2-135M, Fact Forcing (25 steps, v_lr 5e-2 as the paper)"),
    "generic": ROMEHyperParams(mom2_n_samples=1000, mom2_sample_tokens=128, mom2_ridge=1e-3,
                               source=f"{_PUBLIC} with CPU-sized statistics (unknown model)"),
}
MEMIT_PRESETS: dict[str, MEMITHyperParams] = {
    # public MEMIT: GPT-J layers 3-8, GPT2-XL 13-17; the paper edits 5 layers centred on the edit layer
    "gpt-j-6b": MEMITHyperParams(layer=5, mom2_update_weight=15000.0, source=f"{_PUBLIC}, GPT-J (5-layer window)"),
    "gpt2-xl": MEMITHyperParams(layer=15, v_num_grad_steps=20, mom2_update_weight=20000.0, source=f"{_PUBLIC}, GPT2-XL"),
    "gpt-j-6b/error-injection": MEMITHyperParams(layer=5, kl_factor=0.9, source="paper appendix, GPT-J Error Injection"),
    "smollm2-135m": MEMITHyperParams(layer=_SMOLLM2_LAYER, mom2_update_weight=1500.0, **_SMOLLM2_STATS,
                                     source="tracekit, SmolLM2-135M (see SMOLLM2_NOTE)"),
    "generic": MEMITHyperParams(mom2_n_samples=1000, mom2_sample_tokens=128, mom2_ridge=1e-3,
                                source=f"{_PUBLIC} with CPU-sized statistics (unknown model)"),
}
# GPT-J Fact Forcing for MEMIT: "default parameters (already set to 25 steps)".

SMOLLM2_NOTE = """How the SmolLM2-135M presets were chosen (bundled model, float32, CPU).

Layer 3 (0-based), as ROME chose GPT-J's: the MLP tracing effect at the last subject token,
averaged over facts the model knows, is largest there. ``benchmarks/rome_layer.py``: 40
hand-written facts (known_1000-style prompts), 19 kept where the model's top-1 next token
is the object's first token; ``tracekit.trace(kind="mlp", window=10, samples=10,
noise="s3", seed=0, tokens="subject_last")``; effect = fraction restored, clipped at 0.
Mean effect by layer 0..9: 0.704 0.730 0.728 0.761 0.757 0.744 0.345 0.344 0.343 0.320,
then falling to 0.003 at layer 29 (benchmarks/results/rome_layer_smollm2-135m.json).
Layer 4 is within 0.004 of layer 3, and the unnormalised indirect effect
(p_restore - p_noise) peaks at 4 (0.368 vs 0.364): the curve is a plateau over layers 0-5
(every window of 10 centred there contains layer 0's MLP) that drops at layer 6. ROME
(tracekit 0.1's conventions) on "The mother tongue of Danielle Darrieux is" -> " English"
gave rewrite / paraphrase / neighbourhood scores 0.981 / 0.796 / 0.998 at layer 3 and
0.984 / 0.688 / 0.993 at 4.

Key statistics: no text corpus is shipped, so C comes from 256 samples of 128 tokens
(32,768 keys, about 21 x d_mlp = 1536) sampled from the model itself (top-k 40, seed 0);
C's smallest eigenvalue at layer 3 is 0.18 x its mean, so the small ridge (1e-3 x the mean
eigenvalue) only guards against a corpus that leaves directions unseen. With 64 samples
the Darrieux scores move by < 0.01.

MEMIT: lambda (mom2_update_weight) = 1500, GPT-J's 15000 scaled by d_mlp (1536 / 16384)
because k^T C^-1 k grows with d_mlp; on the Darrieux edit (window centred on layer 4)
lambda = 15000 / 1500 / 500 give rewrite 0.746 / 0.939 / 0.936. Other values: public."""


def _problem_key(problem) -> str | None:
    return None if problem is None else str(getattr(problem, "value", problem))


def _family_of(model_or_family, kind: str) -> str:
    """A family name as given, or the family of a model or spec (a bare unknown name is an error)."""
    if not isinstance(model_or_family, str):
        return model_family(model_or_family)
    if model_or_family in FAMILIES:
        return model_or_family
    family = model_family(model_or_family)
    if family == "generic" and not any(c in model_or_family for c in "/:."):
        raise TracekitError(f"no {kind} preset {model_or_family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def _preset(table: dict, kind: str, model_or_family, problem):
    family = _family_of(model_or_family, kind)
    problem = _problem_key(problem)
    if problem is not None and f"{family}/{problem}" in table:
        return table[f"{family}/{problem}"]
    return table[family]


def rome_preset(model_or_family, problem=None) -> ROMEHyperParams:
    """ROME hyperparameters for a model (or family name) and an editing problem."""
    return _preset(ROME_PRESETS, "ROME", model_or_family, problem)


def memit_preset(model_or_family, problem=None) -> MEMITHyperParams:
    """MEMIT hyperparameters for a model (or family name) and an editing problem."""
    return _preset(MEMIT_PRESETS, "MEMIT", model_or_family, problem)


# ---- FT ------------------------------------------------------------------------------
# Paper appendix (Hase et al. 2023): norm_constraint per problem as (FT-1, FT-5); 25 steps
# (50 for Fact Forcing), Adam lr 5e-4 as in the public constrained-FT config.
_PAPER_NORMS = {
    "gpt-j-6b": {"error-injection": (1e-4, 2e-5), "tracing-reversal": (1e-5, 2e-5), "fact-erasure": (1e-5, 1e-5),
                 "fact-amplification": (1e-5, 1e-5), "fact-forcing": (1e-4, 1e-4)},
    # The appendix gives GPT2-XL values for these two problems only.
    "gpt2-xl": {"error-injection": (1e-3, 1e-4), "fact-forcing": (5e-4, 5e-5)},
}
# The paper's default edit layer (0-based): GPT-J "layer 6", GPT2-XL "layer 18".
_DEFAULT_LAYER = {"gpt-j-6b": 5, "gpt2-xl": 17}

FT_PRESETS: dict[str, FTHyperParams] = {
    "gpt-j-6b/constrained": FTHyperParams(steps=25, lr=5e-4, norm_constraint=5e-5, layer=21,
                                          source="public ROME repo, FT gpt-j-6B constrained (layer 21)"),
}
for _fam, _table in _PAPER_NORMS.items():
    for _problem, _norms in _table.items():
        for _n, _norm in zip((1, 5), _norms):
            FT_PRESETS[f"{_fam}/{_problem}/ft-{_n}"] = FTHyperParams(
                n_layers=_n, steps=50 if _problem == "fact-forcing" else 25, lr=5e-4, norm_constraint=_norm,
                layer=_DEFAULT_LAYER[_fam], source=f"paper appendix, {_fam} {_problem} FT-{_n}")

# SmolLM2-135M (bundled): tuned by tracekit, see SMOLLM2_FT_NOTE.
SMOLLM2_FT_NOTE = """How the SmolLM2-135M FT presets were chosen (Error Injection; tracekit 0.1's FT loss).

The default layer is ROME's preset layer for this model (``SMOLLM2_NOTE``, now 3).
The GPT-J values barely move this model: its down-projections have 1536 inputs (GPT-J:
16384), so an L-inf ball of 5e-5..1e-4 allows a far smaller change of the MLP output
(FT-1, layer 4, norm 5e-5 / 1e-4: Darrieux rewrite 0.005 / 0.010). With Adam's first step
already reaching the ball (lr >= norm), the radius is what matters, and lr = norm.
Facts: "The mother tongue of Danielle Darrieux is" -> " English" (p before 0.033) and 7
built-in world facts (tracekit.data.world_facts indices 0, 20, 60, 80, 100, 120, 140);
rewrite scores, Darrieux first:
  FT-1 layer 4, norm 2e-3: 0.933, mean 0.42 (min 0.008)
  FT-1 layer 4, norm 5e-3: 0.991, mean 0.977 (min 0.932)
  FT-1 layer 3, norm 5e-3: 0.990, mean 0.980 (min 0.959)   <- FT-1 preset
  FT-5 layer 4, norm 1e-3: 0.992, mean 0.984 (min 0.962)
  FT-5 layer 4, norm 2e-3: 0.993, mean 0.991
  FT-5 layer 3, norm 1e-3: 0.991, mean 0.987 (min 0.974)   <- FT-5 preset (1/5 of FT-1,
                                                             the paper's GPT-J ratio)
Darrieux, FT-1 norm 5e-3 at other layers: 8: 0.990, 12: 0.948, 16: 0.706, 20: 0.869.
Early stopping at target NLL < 0.01 (the public FT code's rule) keeps rewrite <= ~0.99, the
paper's tuning criterion. The other problems use the same radii (not tuned separately);
Fact Forcing takes 50 steps as in the paper (Darrieux, layer 3: FT-1 0.985, FT-5 0.990)."""
_SMOLLM2_NORM = {1: 5e-3, 5: 1e-3}


def ft_preset(model_or_family, problem="error-injection", n_layers: int = 1) -> FTHyperParams:
    """The FT hyperparameters for this model (or family), problem and window (FT-1 or FT-5)."""
    family = _family_of(model_or_family, "FT")
    problem = _problem_key(problem) or "error-injection"
    key = f"{family}/{problem}/ft-{n_layers}"
    if key in FT_PRESETS:
        return FT_PRESETS[key]
    steps = 50 if problem == "fact-forcing" else 25
    if family == "smollm2-135m":
        norm = _SMOLLM2_NORM.get(n_layers, _SMOLLM2_NORM[5])
        return FTHyperParams(n_layers=n_layers, steps=steps, lr=norm, norm_constraint=norm,
                             layer=rome_preset(family).layer, source="tracekit, SmolLM2-135M (see SMOLLM2_FT_NOTE)")
    if family in _PAPER_NORMS:  # GPT2-XL problems the appendix does not tune: its Error Injection values
        base = FT_PRESETS[f"{family}/error-injection/ft-{n_layers}"]
        return replace(base, steps=steps, source=base.source + f" (no {problem} value published)")
    return FTHyperParams(n_layers=n_layers, steps=steps, source="public GPT-J constrained FT (generic model)")
