"""ROME and MEMIT hyperparameters: typed dataclasses (the presets are in ``editing.presets``).

Defaults follow the public code (kmeng01/rome, kmeng01/memit), which produced the published
numbers; each convention where the paper's equations or earlier tracekit differ is a named
field (docs/fidelity.md gives each one's measured effect). ``LEGACY`` holds the values that
reproduce tracekit 0.1's editors. Layers are 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracekit.errors import check

V_STOP_ON = ("loss", "nll", None)


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
    # conventions of the public code (kmeng01/rome, kmeng01/memit); the alternatives are documented
    value_reference: str = "first-row"  # clamp radius, weight decay and v*'s base: the bare prompt's value
    #                                     ("first-row", public code) or the mean over templates ("mean")
    v_stop_on: str | None = "loss"  # stop once this < v_stop_below: the total "loss" (public code), the "nll"
    #                                 (tracekit 0.1), or None (never: the paper's code, whose patience counter resets)
    v_stop_below: float = 0.05
    v_final_step: bool = False  # False: v_num_grad_steps passes, an Adam step after each but the last (public code)
    erasure_objective: str = "probability"  # Fact Erasure minimises exp(-NLL) (the paper's code) or -NLL ("log-probability")
    # Fact Erasure in the paper's code never stops early; its ROME steps after every pass, its MEMIT
    # not after the last one (an extra unconditional break)
    erasure_final_step: bool = True
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
        check(self.value_reference in ("first-row", "mean"), f"value_reference must be 'first-row' or 'mean', got {self.value_reference!r}")
        check(self.v_stop_on in V_STOP_ON, f"v_stop_on must be 'loss', 'nll' or None, got {self.v_stop_on!r}")
        check(self.erasure_objective in ("probability", "log-probability"),
              f"erasure_objective must be 'probability' or 'log-probability', got {self.erasure_objective!r}")


@dataclass(frozen=True)
class ROMEHyperParams(KeyValueHyperParams):
    """ROME: one rank-one update of one down-projection."""

    stats_file: str | None = None  # use this statistics file for C (must match the model and layer)
    # The update maps the bare prompt's own key k_p onto v*: (v* - W k_p - b)(C^-1 k*)^T / ((C^-1 k*)^T k_p)
    # ("prompt", public code: the edited prompt receives exactly the new value), or the paper's equation
    # (v* - W k* - b)(C^-1 k*)^T / ((C^-1 k*)^T k*) ("mean": W' k* = v*).
    update_key: str = "prompt"
    # How C^-1 k* is found: "float64" (a float64 solve, tracekit's) or "inverse" (the public code's
    # arithmetic: torch.inverse of C in its own dtype (mom2_dtype), cast to float32, times k*). They
    # differ by C's condition number x float32 rounding (1e-3 relative on the golden models).
    mom2_solve: str = "float64"
    # tracekit's extension, off in every preset: map the key of each distinct subject tokenisation
    # among the templates to v* (a rank-g update), instead of their average (ROME), and weigh the
    # tokenisations equally in v*'s objective. It helps prompts that open with the subject, which
    # tokenises differently there (docs/replication/README.md).
    key_per_tokenisation: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(self.update_key in ("prompt", "mean"), f"update_key must be 'prompt' or 'mean', got {self.update_key!r}")
        check(self.mom2_solve in ("float64", "inverse"), f"mom2_solve must be 'float64' or 'inverse', got {self.mom2_solve!r}")
        check(not (self.mom2_solve == "inverse" and self.key_per_tokenisation),
              "key_per_tokenisation solves in float64; use mom2_solve='float64'")


@dataclass(frozen=True)
class MEMITHyperParams(KeyValueHyperParams):
    """MEMIT for one fact: v* at the last layer of a window, the residual spread over the window."""

    window: int = 5  # layers centred on the edit layer: layer - window//2 .. (the paper: 5)
    clip_window: bool = False  # True: cut the window at the model's edges instead of an error
    mom2_update_weight: float = 15000.0  # lambda in (lambda C + K K^T)
    clamp_to: str = "resid"  # the delta is clamped relative to the block output ("resid") or MLP output ("mlp")
    # public MEMIT: k* = mean over context types of each type's mean key ("per-context-type": the bare
    # prompt weighs 1/2 with one length of templates), and the current value at the top layer is the
    # bare prompt's ("prompt"); tracekit 0.1 averaged both uniformly over templates ("uniform", "mean").
    key_average: str = "per-context-type"
    z_current: str = "prompt"
    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    erasure_final_step: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.window, int) and self.window >= 1, f"MEMIT window must be >= 1, got {self.window}")
        check(self.mom2_update_weight >= 0, f"mom2_update_weight must be >= 0, got {self.mom2_update_weight}")
        check(self.clamp_to in ("resid", "mlp"), f"clamp_to must be 'resid' or 'mlp', got {self.clamp_to!r}")
        check(self.key_average in ("per-context-type", "uniform"),
              f"key_average must be 'per-context-type' or 'uniform', got {self.key_average!r}")
        check(self.z_current in ("prompt", "mean"), f"z_current must be 'prompt' or 'mean', got {self.z_current!r}")


# tracekit 0.1's conventions (before issue 12), for comparisons: dataclasses.replace(hp, **LEGACY[...]).
LEGACY = {
    "rome": dict(value_reference="mean", update_key="mean", v_stop_on="nll", v_final_step=True,
                 erasure_objective="log-probability"),
    "memit": dict(value_reference="mean", key_average="uniform", z_current="mean", v_stop_on="nll", v_final_step=True,
                  erasure_objective="log-probability", erasure_final_step=True),
}


