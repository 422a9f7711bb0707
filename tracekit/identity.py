"""What a model *is*, for every cache entry and every stored result: one fingerprint of its weights.

A spec name is not enough: two models loaded from one spec but edited differently, two random
models with different seeds, or one tokenizer with and without a document-start token give
different results. The fingerprint hashes the config (without the fields that only say where or
with which library version it was loaded, so shards from different machines agree), how the
tokenizer encodes a probe text, and each parameter's name, shape, dtype and a strided sample of
its values.

- ``model_identity(model)``: ``"spec#fingerprint"``, the model column of the result store and
  the key of the known-fact cache;
- ``cache_identity(model, layer)``: what an editor's cache entry records (layer given: only the
  weights that determine that layer's MLP keys, ``key_fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # for annotations only: no import cycle, no early torch
    from tracekit.models import Model

# Elements sampled from each parameter. A sample is enough: every edit tracekit makes
# (rank-one, MEMIT, FT) changes nearly every entry of the matrices it touches, and a full
# hash of a 6B-parameter model would take minutes.
FINGERPRINT_SAMPLES = 4096
# Config fields that say where or how a model was loaded, not what it computes.
_NOT_IDENTITY = ("_name_or_path", "_model_name_or_path", "transformers_version", "_commit_hash")


def _config_bytes(config) -> bytes:
    data = json.loads(config.to_json_string(use_diff=False))
    for field in _NOT_IDENTITY:
        data.pop(field, None)
    return json.dumps(data, sort_keys=True, default=str).encode()


def _param_sample(param) -> bytes:
    import torch

    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    return flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.float32).numpy().tobytes()


def weight_fingerprint(model: Model, keep: Callable[[str], bool] | None = None) -> str:
    """A short hash of the config, the tokenization probe and (a strided sample of) every kept
    parameter; ``keep(name)`` selects parameters (see ``key_fingerprint``)."""
    from tracekit.prompts import tokenization_probe

    digest = hashlib.sha256(_config_bytes(model.hf.config))
    digest.update(tokenization_probe(model.tokenizer))
    for name, param in model.hf.named_parameters():
        if keep is not None and not keep(name):
            continue
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(_param_sample(param))
    return digest.hexdigest()[:16]


def key_fingerprint(model: Model, layer: int) -> str:
    """Fingerprint of the weights that determine layer ``layer``'s MLP keys.

    Blocks above ``layer``, the final norm, the unembedding and layer ``layer``'s own
    down-projection do not change its keys, so editing them (e.g. a ROME edit at this very
    layer) keeps statistics cached for that layer valid.
    """
    down_proj = model.adapter.down_proj_weight(model.hf, layer)
    down_name = next(n for n, p in model.hf.named_parameters() if p is down_proj)
    final = (model.adapter.final_norm.split(".")[-1], model.adapter.unembed.split(".")[-1])

    def keep(name: str) -> bool:
        at = model.adapter.layer_of(name)
        if at is None:
            return not any(part in final for part in name.split("."))
        return at < layer or (at == layer and name != down_name)

    return weight_fingerprint(model, keep)


def model_identity(model: Model) -> str:
    """``spec#fingerprint`` (12 hex digits); an object without weights is known by its spec."""
    known = getattr(model, "model_identity", None)
    if isinstance(known, str):  # a model held by other processes says who it is (tracekit.studies RemoteModel)
        return known
    spec = getattr(model, "spec", None) or type(model).__name__
    if not hasattr(getattr(model, "hf", None), "named_parameters"):
        return str(spec)
    return f"{spec}#{weight_fingerprint(model)[:12]}"


def cache_identity(model: Model, layer: int | None = None) -> dict[str, str]:
    """What a cache entry records about the model it was computed on."""
    fingerprint = weight_fingerprint(model) if layer is None else key_fingerprint(model, layer)
    return {"spec": str(model.spec), "arch": model.adapter.name, "fingerprint": fingerprint}
