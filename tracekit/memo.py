"""Per-model memo tables that live beside a ``Model``, never inside its ``__dict__``.

A table is keyed by the model object's identity and dropped when the model is garbage
collected, so two models never share an entry and a model keeps none of tracekit's state
on itself. Used for values that are expensive and fixed for given weights (the s3
embedding std, essence texts sampled from the unedited model) and for the scoped
"before" cache of a sweep.
"""

from __future__ import annotations

import weakref
from typing import Any

_TABLES: dict[int, tuple[weakref.ref, dict[str, dict]]] = {}


def model_memo(model: Any, name: str) -> dict:
    """The memo table ``name`` of ``model`` (created empty on first use)."""
    key = id(model)
    entry = _TABLES.get(key)
    if entry is None or entry[0]() is not model:
        entry = (weakref.ref(model, lambda _ref, k=key: _TABLES.pop(k, None)), {})
        _TABLES[key] = entry
    return entry[1].setdefault(name, {})


def drop_memo(model: Any, name: str) -> None:
    """Forget the memo table ``name`` of ``model``."""
    entry = _TABLES.get(id(model))
    if entry is not None and entry[0]() is model:
        entry[1].pop(name, None)


def peek_memo(model: Any, name: str) -> dict | None:
    """The memo table ``name`` of ``model`` if it exists, else None (nothing is created)."""
    entry = _TABLES.get(id(model))
    if entry is None or entry[0]() is not model:
        return None
    return entry[1].get(name)
