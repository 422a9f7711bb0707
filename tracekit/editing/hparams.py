"""ROME and MEMIT hyperparameters: typed dataclasses and named presets.

Values: the public ROME/MEMIT configurations (Meng et al. 2022a/b) for GPT-J and GPT2-XL,
the per-problem values of Hase et al. 2023's appendix (tuned on GPT-J so the rewrite score
stays <= 99%), and a preset for the bundled SmolLM2-135M. Layers are 0-based.
FT's hyperparameters live in ``tracekit.editing.finetune``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tracekit.errors import TracekitError, check


@dataclass(frozen=True)
class KeyValueHyperParams:
    """What ROME and MEMIT share: the key, the target value v*, the key statistics C."""

    layer: int | None = None  # the preset's default edit layer (MEMIT: the window's centre)
    # v*: Adam on a delta added at the last subject token (see kv_core.optimize_value)
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5  # times |delta| / |reference|^2, the public objective's form
    clamp_norm_factor: float = 4.0  # |delta| <= factor x |reference value|
    kl_factor: float = 0.0625  # KL on kl_prompt's next-token distribution at the subject's last token
    kl_prompt: str = "{} is a"
    v_stop_nll: float | None = 0.05  # stop early once the target NLL is below this (maximising only)
    # context templates: (tokens, count) pairs sampled from the model, plus the bare prompt
    context_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_seed: int = 0
    # C = E[k k^T]: samples of mom2_sample_tokens tokens each from the corpus
    mom2_n_samples: int = 100_000
    mom2_sample_tokens: int = 1024
    mom2_dtype: str = "float32"
    mom2_ridge: float = 0.0  # C + ridge x (trace(C) / d) x I before solving; 0 = as published
    corpus: str | None = None  # text file for C; None: $TRACEKIT_DATA or ../shared/data, else the shipped text; "model": self-sampled
    source: str = ""  # where these values come from

    def __post_init__(self):
        check(self.layer is None or (isinstance(self.layer, int) and self.layer >= 0), f"layer must be >= 0, got {self.layer}")
        check(isinstance(self.v_num_grad_steps, int) and self.v_num_grad_steps >= 1,
              f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        check(self.v_lr > 0, f"v_lr must be positive, got {self.v_lr}")
        check(self.v_weight_decay >= 0 and self.kl_factor >= 0, "v_weight_decay and kl_factor must be >= 0")
        check(self.clamp_norm_factor > 0, f"clamp_norm_factor must be positive, got {self.clamp_norm_factor}")
        check("{}" in self.kl_prompt, f"kl_prompt {self.kl_prompt!r} needs a '{{}}' for the subject")
        check(self.mom2_n_samples >= 1 and self.mom2_sample_tokens >= 1, "mom2_n_samples and mom2_sample_tokens must be >= 1")
        check(self.mom2_ridge >= 0, f"mom2_ridge must be >= 0, got {self.mom2_ridge}")


@dataclass(frozen=True)
class ROMEHyperParams(KeyValueHyperParams):
    """ROME: one rank-one update of one down-projection."""

    stats_file: str | None = None  # use this statistics file for C (must match the model and layer)
    # tracekit's extension, off in every preset: map the key of each distinct subject tokenisation
    # among the templates to v* (a rank-g update), instead of their average (ROME), and weigh the
    # tokenisations equally in v*'s objective. It helps prompts that open with the subject, which
    # tokenises differently there (docs/replication/README.md).
    key_per_tokenisation: bool = False


@dataclass(frozen=True)
class MEMITHyperParams(KeyValueHyperParams):
    """MEMIT for one fact: v* at the last layer of a window, the residual spread over the window."""

    window: int = 5  # layers centred on the edit layer: layer - window//2 .. (the paper: 5)
    clip_window: bool = False  # True: cut the window at the model's edges instead of an error
    mom2_update_weight: float = 15000.0  # lambda in (lambda C + K K^T)
    clamp_to: str = "resid"  # the delta is clamped relative to the block output ("resid") or MLP output ("mlp")
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.window, int) and self.window >= 1, f"MEMIT window must be >= 1, got {self.window}")
        check(self.mom2_update_weight >= 0, f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")
        check(self.clamp_to in ("resid", "mlp"), f"clamp_to must be 'resid' or 'mlp', got {self.clamp_to!r}")


# ---- presets ------------------------------------------------------------------------
_PUBLIC = "public ROME/MEMIT configuration"
_SMOLLM2_LAYER = 3  # see SMOLLM2_NOTE
_SMOLLM2_STATS = dict(mom2_n_samples=256, mom2_sample_tokens=128, mom2_ridge=1e-3)

ROME_PRESETS: dict[str, ROMEHyperParams] = {
    "gpt-j-6b": ROMEHyperParams(layer=5, source=f"{_PUBLIC}, GPT-J"),
    "gpt2-xl": ROMEHyperParams(layer=17, source=f"{_PUBLIC}, GPT2-XL"),
    # Hase et al. 2023, appendix: ROME's KL weight tuned to 1 for Error Injection on GPT-J,
    # 25 v* steps for Fact Forcing (both problems at the paper's default layer 6, 0-based 5).
    "gpt-j-6b/error-injection": ROMEHyperParams(layer=5, kl_factor=1.0, source="paper appendix, GPT-J Error Injection"),
    "gpt-j-6b/fact-forcing": ROMEHyperParams(layer=5, v_num_grad_steps=25, source="paper appendix, GPT-J Fact Forcing"),
    "smollm2-135m": ROMEHyperParams(layer=_SMOLLM2_LAYER, **_SMOLLM2_STATS, source="tracekit, SmolLM2-135M (see SMOLLM2_NOTE)"),
    # the paper's reason for 25 v* steps under the subject noise holds for any model
    "smollm2-135m/fact-forcing": ROMEHyperParams(layer=_SMOLLM2_LAYER, v_num_grad_steps=25, **_SMOLLM2_STATS,
                                                 source="tracekit, SmolLM2-135M, Fact Forcing (25 steps as the paper)"),
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
(every window of 10 centred there contains layer 0's MLP) that drops at layer 6. ROME on
"The mother tongue of Danielle Darrieux is" -> " English" gives rewrite / paraphrase /
neighbourhood scores 0.981 / 0.796 / 0.998 at layer 3 and 0.984 / 0.688 / 0.993 at 4.

Key statistics: no text corpus is shipped, so C comes from 256 samples of 128 tokens
(32,768 keys, about 21 x d_mlp = 1536) sampled from the model itself (top-k 40, seed 0);
C's smallest eigenvalue at layer 3 is 0.18 x its mean, so the small ridge (1e-3 x the mean
eigenvalue) only guards against a corpus that leaves directions unseen. With 64 samples
the Darrieux scores move by < 0.01.

MEMIT: lambda (mom2_update_weight) = 1500, GPT-J's 15000 scaled by d_mlp (1536 / 16384)
because k^T C^-1 k grows with d_mlp; on the Darrieux edit (window centred on layer 4)
lambda = 15000 / 1500 / 500 give rewrite 0.746 / 0.939 / 0.936. Other values: public."""


def _family(model) -> str:
    shape = (model.adapter.name, model.n_layers, model.d_model)
    return {("gptj", 28, 4096): "gpt-j-6b", ("gpt2", 48, 1600): "gpt2-xl", ("llama", 30, 576): "smollm2-135m"}.get(shape, "generic")


def _preset(table: dict, kind: str, model_or_family, problem: str | None):
    family = model_or_family if isinstance(model_or_family, str) else _family(model_or_family)
    problem = None if problem is None else str(getattr(problem, "value", problem))
    if problem is not None and f"{family}/{problem}" in table:
        return table[f"{family}/{problem}"]
    if family in table:
        return table[family]
    raise TracekitError(f"no {kind} preset {family!r}; choose one of {', '.join(k for k in table if '/' not in k)}")


def rome_preset(model_or_family, problem: str | None = None) -> ROMEHyperParams:
    """ROME hyperparameters for a model (or family name) and an editing problem."""
    return _preset(ROME_PRESETS, "ROME", model_or_family, problem)


def memit_preset(model_or_family, problem: str | None = None) -> MEMITHyperParams:
    """MEMIT hyperparameters for a model (or family name) and an editing problem."""
    return _preset(MEMIT_PRESETS, "MEMIT", model_or_family, problem)


def with_overrides(hparams, **changes):
    """A copy with some fields changed (validated again)."""
    return replace(hparams, **changes)
