"""What a result store records about how its results were made: config hash, seed, versions,
and the identity of the model (``tracekit.identity.model_identity``)."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata

from tracekit.identity import model_identity  # noqa: F401 - the store's model column


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("tracekit", "torch", "transformers", "transformer-lens", "nnsight", "numpy", "pandas",
                    "statsmodels"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def command_line() -> str:
    return " ".join(sys.argv)
