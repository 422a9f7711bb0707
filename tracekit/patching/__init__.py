"""Activation patching: ``patch`` (clean/corrupted runs, sweeps over sites x layers x positions x
heads, batched on the partial forward), ``attribution_patch`` (its first-order approximation from
one forward and one backward pass) and ``logit_lens``."""

from tracekit.patching.attribution import attribution_patch
from tracekit.patching.corruption import Noise, Replace
from tracekit.patching.lens import LensResult, logit_lens
from tracekit.patching.metrics import METRICS, Metric, target_tokens
from tracekit.patching.patch import DIRECTIONS, patch
from tracekit.patching.result import PatchResult

__all__ = ["DIRECTIONS", "LensResult", "METRICS", "Metric", "Noise", "PatchResult", "Replace", "attribution_patch",
           "logit_lens", "patch", "target_tokens"]
