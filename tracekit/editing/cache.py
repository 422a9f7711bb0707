"""On-disk caches of the editors (context templates, self-sampled corpora, key statistics).

Everything cached depends on a model's *weights*, not its name: two models loaded from
the same spec but edited differently, or two random models with different seeds, must
not share a cache entry. Entries are therefore keyed by a weight fingerprint.

Where: ``$TRACEKIT_CACHE`` if set, else ``~/.cache/tracekit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

from tracekit import prompts as P

# Elements sampled from each parameter for the fingerprint. A sample is enough: every
# edit tracekit makes (rank-one, MEMIT, FT) changes nearly every entry of the matrices
# it touches, and a full hash of a 6B-parameter model would take minutes.
_FINGERPRINT_SAMPLES = 4096


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    root = override or os.environ.get("TRACEKIT_CACHE") or Path.home() / ".cache" / "tracekit"
    return Path(root).expanduser()


def slug(text: str) -> str:
    """A file-name-safe version of a spec or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "model"


def _param_sample(param: torch.Tensor) -> bytes:
    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
    return flat[::step][:_FINGERPRINT_SAMPLES].to("cpu", torch.float32).numpy().tobytes()


def weight_fingerprint(model, keep: Callable[[str], bool] | None = None) -> str:
    """A short hash of the config and (a strided sample of) every kept parameter.

    ``keep(name)`` selects parameters, so statistics of layer l can depend only on the
    weights that feed layer l's keys (see ``key_fingerprint``).
    """
    digest = hashlib.sha256(model.hf.config.to_json_string(use_diff=False).encode())
    digest.update(P.tokenization_probe(model.tokenizer))
    for name, param in model.hf.named_parameters():
        if keep is not None and not keep(name):
            continue
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(_param_sample(param))
    return digest.hexdigest()[:16]


def _layer_of(model, name: str) -> int | None:
    """The block index a parameter name belongs to (works for renamed trees too)."""
    prefix = model.adapter.layers.split(".")[-1]
    match = re.search(rf"(?:^|\.){re.escape(prefix)}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def key_fingerprint(model, layer: int) -> str:
    """Fingerprint of the weights that determine layer ``layer``'s MLP keys.

    Blocks above ``layer``, the final norm, the unembedding and layer ``layer``'s own
    down-projection do not change its keys, so editing them (e.g. a ROME edit at this very
    layer) keeps the cached statistics valid.
    """
    down_proj = model.adapter.down_proj_weight(model.hf, layer)
    down_name = next(n for n, p in model.hf.named_parameters() if p is down_proj)
    final = (model.adapter.final_norm.split(".")[-1], model.adapter.unembed.split(".")[-1])

    def keep(name: str) -> bool:
        at = _layer_of(model, name)
        if at is None:
            return not any(part in final for part in name.split("."))
        return at < layer or (at == layer and name != down_name)

    return weight_fingerprint(model, keep)


def model_identity(model, layer: int | None = None) -> dict[str, str]:
    """What a cache entry records about the model it was computed on."""
    fingerprint = weight_fingerprint(model) if layer is None else key_fingerprint(model, layer)
    return {"spec": str(model.spec), "arch": model.adapter.name, "fingerprint": fingerprint}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
