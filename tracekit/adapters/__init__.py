"""Architecture adapters (where states live in a HF model) and backends (how hooks attach)."""

from tracekit.adapters.architectures import (
    HEAD_SITES, SITE_ALIASES, SITE_KINDS, ArchAdapter, Hook, Site, adapter_for,
)
from tracekit.adapters.backends import Backend, BACKENDS, make_backend

__all__ = ["ArchAdapter", "Hook", "Site", "SITE_KINDS", "SITE_ALIASES", "HEAD_SITES", "adapter_for", "Backend",
           "BACKENDS", "make_backend"]
