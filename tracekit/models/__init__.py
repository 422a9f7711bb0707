"""Model specs and loading: ``tracekit.load_model``."""

from tracekit.models.loading import load_model, list_specs
from tracekit.models.model import Model

__all__ = ["load_model", "list_specs", "Model"]
