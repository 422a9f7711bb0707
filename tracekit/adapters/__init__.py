"""Architecture adapters (where states live in a HF model) and backends (how hooks attach)."""

from tracekit.adapters.architectures import ArchAdapter, Site, adapter_for, SITE_KINDS
from tracekit.adapters.backends import Backend, BACKENDS, make_backend

__all__ = ["ArchAdapter", "Site", "SITE_KINDS", "adapter_for", "Backend", "BACKENDS", "make_backend"]
