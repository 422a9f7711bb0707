"""tracekit: where is a fact in a language model, and does editing there work?"""

from tracekit.errors import TracekitError

__version__ = "0.1.0"

# Everything else loads on first use, so `import tracekit` (and `tracekit --help`) stays quick:
# torch and transformers alone take seconds to import.
_LAZY = {
    "Model": "tracekit.models",
    "list_specs": "tracekit.models",
    "load_model": "tracekit.models",
    "from_hf": "tracekit.models",
    "from_transformer_lens": "tracekit.models",
    "from_nnsight": "tracekit.models",
    "trace": "tracekit.tracing",
    "trace_many": "tracekit.tracing",
    "zero_trace": "tracekit.tracing",
    "TraceResult": "tracekit.tracing",
    "Site": "tracekit.adapters",
    "patch": "tracekit.patching",
    "attribution_patch": "tracekit.patching",
    "logit_lens": "tracekit.patching",
    "Noise": "tracekit.patching",
    "Replace": "tracekit.patching",
    "PatchResult": "tracekit.patching",
    "edit": "tracekit.editing.api",
    "edit_many": "tracekit.editing.api",
    "edit_sequentially": "tracekit.editing.api",
    "apply_memit_mass": "tracekit.editing.memit",
    "EditRequest": "tracekit.editing.request",
    "Edit": "tracekit.editing.delta",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tracekit' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["TracekitError", "__version__", *_LAZY]
