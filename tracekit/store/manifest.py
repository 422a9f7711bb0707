"""What a result store records about how its results were made: config hash, seed, versions,
the code's git commit, and the identity of the model (``tracekit.identity.model_identity``)."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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


@functools.cache  # the code a process runs is the code it imported: ask git once
def code_version() -> str | None:
    """The git commit of the tracekit source that runs (``+dirty`` with uncommitted changes), or
    None outside a git checkout (an installed wheel: ``versions()`` has its version)."""
    here = Path(__file__).resolve().parent
    try:
        # tracked, not merely inside some repository (a virtual environment within a project)
        tracked = subprocess.run(["git", "-C", str(here), "ls-files", "--", "__init__.py"], capture_output=True,
                                 text=True, timeout=10)
        if tracked.returncode != 0 or not tracked.stdout.strip():
            return None
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                str(here.parent)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
