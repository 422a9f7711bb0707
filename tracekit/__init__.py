"""tracekit: where is a fact in a language model, and does editing there work?"""

from tracekit.errors import TracekitError
from tracekit.models import Model, list_specs, load_model

__version__ = "0.1.0"
__all__ = ["Model", "TracekitError", "list_specs", "load_model", "__version__"]
