"""Your own model: ``from_hf``, ``from_transformer_lens``, ``from_nnsight``.

Each takes a model you already hold and returns the same ``Model`` that ``load_model`` does,
over the very modules you passed (nothing is copied): tracing reads them, and an edit changes
them until it is undone. The model is put in eval mode and its parameters stop requiring grad
(the editors ask for gradients where they need them). The architecture must be one tracekit
has an adapter for (``tracekit.adapters.ARCHITECTURES``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tracekit.adapters import adapter_for, make_backend
from tracekit.adapters.backends import NNsightBackend, TransformerLensBackend
from tracekit.errors import TracekitError
from tracekit.models.model import Model


def from_hf(model: nn.Module, tokenizer, *, backend: str = "hf", name: str | None = None) -> Model:
    """A ``Model`` over a transformers causal LM (``*ForCausalLM``, with its LM head) and its tokenizer.

    ``backend``: hook it with plain torch hooks (hf, the fastest), or wrap the same modules in a
    TransformerLens bridge or an nnsight model. ``name``: what results and caches call it (default:
    the config's ``_name_or_path``, else ``hf:<model_type>``).
    """
    from tracekit.models.loading import _config_dir, _quiet_padding_advice, _reload_tokenizer

    hf = _check_hf(model, "from_hf")
    tokenizer = _check_tokenizer(tokenizer, "from_hf(model, tokenizer)")
    adapter = adapter_for(hf)
    config_dir = None
    if backend.lower() in ("transformer_lens", "tl", "transformerlens"):
        config_dir = _config_dir(hf, tokenizer)
        tokenizer = _check_tokenizer(_reload_tokenizer(config_dir), "from_hf(model, tokenizer)")
    _quiet_padding_advice()
    wrapped = make_backend(backend, hf, adapter, tokenizer, config_dir)
    return Model(spec=name or _name(hf), backend=wrapped, tokenizer=tokenizer, adapter=adapter)


def from_transformer_lens(bridge, tokenizer=None, *, name: str | None = None) -> Model:
    """A ``Model`` over a TransformerLens 4 ``TransformerBridge`` (hooks by the bridge's hook names).

    Prompts are encoded with the bridge's own tokenizer, so tracekit traces what ``bridge(prompt)``
    computes: TransformerLens makes it put a BOS token first (GPT-2's ``<|endoftext|>``), where the
    plain HF tokenizer does not. Pass ``tokenizer`` (e.g. the HF one) to encode otherwise.
    """
    if type(bridge).__name__ == "HookedTransformer":
        raise TracekitError("from_transformer_lens takes a TransformerLens 4 TransformerBridge; a HookedTransformer "
                            "holds rewritten weights (boot one with TransformerBridge.boot_transformers(...))")
    hf = getattr(bridge, "__dict__", {}).get("original_model") if hasattr(bridge, "adapter") else None
    if hf is None:
        raise TracekitError(f"from_transformer_lens takes a TransformerLens 4 TransformerBridge, got a "
                            f"{type(bridge).__name__}")
    if getattr(bridge, "compatibility_mode", False) or getattr(bridge, "_weights_processed", False):
        raise TracekitError("this TransformerBridge's weights are processed (enable_compatibility_mode folds "
                            "LayerNorm into them); tracing noise and editors need the unprocessed model: "
                            "boot a fresh bridge")
    hf = _check_hf(hf, "from_transformer_lens")
    tokenizer = _check_tokenizer(bridge.tokenizer if tokenizer is None else tokenizer, "the bridge's tokenizer")
    adapter = adapter_for(hf)
    wrapped = TransformerLensBackend(hf, adapter, tokenizer, bridge=bridge)
    return Model(spec=name or _name(hf), backend=wrapped, tokenizer=tokenizer, adapter=adapter)


def from_nnsight(lm, *, name: str | None = None) -> Model:
    """A ``Model`` over an nnsight ``LanguageModel`` / ``TransformersModel`` (loaded lazily: dispatched here)."""
    if not hasattr(lm, "_module") or not hasattr(lm, "trace"):
        raise TracekitError(f"from_nnsight takes an nnsight LanguageModel or TransformersModel, got a "
                            f"{type(lm).__name__}")
    if getattr(lm, "dispatched", True) is False and hasattr(lm, "dispatch"):
        lm.dispatch()  # a lazily loaded model holds meta tensors until its weights are loaded
    hf = _check_hf(lm._module, "from_nnsight")
    tokenizer = _check_tokenizer(getattr(lm, "tokenizer", None), "the nnsight model's tokenizer")
    adapter = adapter_for(hf)
    wrapped = NNsightBackend(hf, adapter, tokenizer, wrapper=lm)
    return Model(spec=name or _name(hf), backend=wrapped, tokenizer=tokenizer, adapter=adapter)


def _check_hf(model, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TracekitError(f"{caller} takes a transformers model (a torch module with a .config), "
                            f"got a {type(model).__name__}")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TracekitError(f"{caller} needs the causal LM with its head (e.g. {type(model).__name__.replace('Model', '')}"
                            "ForCausalLM / AutoModelForCausalLM), not the bare transformer body")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise TracekitError(f"{caller}: the model's weights are not loaded (meta tensors)")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _check_tokenizer(tokenizer, what: str):
    """A tokenizer tracekit can pad with; a copy when its pad token has to be set (yours is untouched)."""
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise TracekitError(f"{what}: a Hugging Face tokenizer is needed, got {type(tokenizer).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise TracekitError(f"{what}: tracekit finds subjects by character offsets and needs a fast tokenizer "
                            "(AutoTokenizer.from_pretrained(..., use_fast=True))")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise TracekitError(f"{what} has neither a pad nor an end-of-sequence token; set tokenizer.pad_token")
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _name(hf: nn.Module) -> str:
    path = getattr(hf.config, "_name_or_path", "") or ""
    return path or f"hf:{getattr(hf.config, 'model_type', type(hf).__name__)}"


def describe_object(obj) -> str | None:
    """Which ``from_*`` call takes ``obj`` (for ``load_model``'s error), or None."""
    kind = type(obj).__name__
    if kind in ("TransformerBridge", "HookedTransformer"):
        return "tracekit.from_transformer_lens(bridge)"
    if type(obj).__module__.startswith("nnsight"):
        return "tracekit.from_nnsight(lm)"
    if isinstance(obj, torch.nn.Module):
        return "tracekit.from_hf(model, tokenizer)"
    return None


__all__ = ["from_hf", "from_nnsight", "from_transformer_lens"]
