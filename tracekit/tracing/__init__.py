"""Causal tracing and representation zeroing (method-notes "Causal tracing").

- ``trace`` / ``trace_many``: noise the subject, restore clean states, p_restore[token, layer].
- ``zero_trace``: zero the subject's MLP (or attn/resid) outputs in a window on the clean run.
- ``naive_trace``: the one-pass-per-(token, layer) reference loop, for tests and benchmarks.
- ``noised_prediction``: o_noise, the corrupted run's top token (Tracing Reversal).
- ``scaled_noise`` + ``subject_noise_hook``: the tracer's subject noise as a reusable
  ``Site("embed")`` hook (Fact Forcing applies it while editing and evaluating).
Which work each backend's engine skips is documented in ``tracekit.tracing.engine``.
"""

from tracekit.tracing.naive import naive_trace
from tracekit.tracing.noise import NoiseRule, draw_noise, embedding_std, noise_scale, scaled_noise, subject_noise_hook
from tracekit.tracing.plan import window_layers
from tracekit.tracing.result import TraceResult, ZeroResult, result_from_json
from tracekit.tracing.trace import NoisedPrediction, noised_prediction, trace, trace_many, zero_trace

__all__ = [
    "NoiseRule", "NoisedPrediction", "TraceResult", "ZeroResult", "draw_noise", "embedding_std", "naive_trace",
    "noise_scale", "noised_prediction", "result_from_json", "scaled_noise", "subject_noise_hook", "trace",
    "trace_many", "window_layers", "zero_trace",
]
