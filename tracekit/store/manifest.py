"""What a result store records about how its results were made: config hash, seed, versions,
and the identity of the model (spec plus a fingerprint of its weights)."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata

from tracekit.prompts import tokenization_probe


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


def model_identity(model) -> str:
    """``spec#fingerprint``: the fingerprint hashes how the tokenizer encodes a probe text and
    every parameter's name, shape and first values, so two different weight sets (a re-saved
    local folder, an applied edit) or prompt conventions under one spec never share cached
    verdicts, while hashing stays cheap even for GPT-J."""
    known = getattr(model, "model_identity", None)
    if isinstance(known, str):  # a model loaded by other processes says who it is (tracekit.studies.RemoteModel)
        return known
    spec = getattr(model, "spec", None) or type(model).__name__
    module = getattr(model, "hf", None)
    if module is None or not hasattr(module, "named_parameters"):
        return str(spec)
    digest = hashlib.sha256()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        digest.update(tokenization_probe(tokenizer))
    for name, param in module.named_parameters():
        head = param.detach().reshape(-1)[:64].float().cpu().numpy().tobytes()
        digest.update(name.encode() + str(tuple(param.shape)).encode() + head)
    return f"{spec}#{digest.hexdigest()[:12]}"
