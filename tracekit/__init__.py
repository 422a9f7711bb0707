"""tracekit: where is a fact in a language model, and does editing there work?"""

from tracekit.errors import TracekitError
from tracekit.models import Model, list_specs, load_model

__version__ = "0.1.0"

# Heavier areas load on first use, so `import tracekit` stays quick.
_LAZY = {
    "trace": "tracekit.tracing",
    "trace_many": "tracekit.tracing",
    "zero_trace": "tracekit.tracing",
    "TraceResult": "tracekit.tracing",
    "edit": "tracekit.editing.api",
    "EditRequest": "tracekit.editing.request",
    "Edit": "tracekit.editing.delta",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tracekit' has no attribute {name!r}")


__all__ = ["Model", "TracekitError", "list_specs", "load_model", "__version__", *_LAZY]
