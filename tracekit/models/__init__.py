"""Model specs and loading: ``tracekit.load_model``; your own model: ``from_hf`` and friends."""

from tracekit.models.loading import load_model, list_specs
from tracekit.models.model import Model
from tracekit.models.wrap import from_hf, from_nnsight, from_transformer_lens

__all__ = ["load_model", "list_specs", "Model", "from_hf", "from_nnsight", "from_transformer_lens"]
