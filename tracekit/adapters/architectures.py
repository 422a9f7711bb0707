"""Per-architecture knowledge: module paths, weight orientation, TransformerLens hook names.

This module is the only place in tracekit that knows names such as ``transformer.h``.
Adding an architecture means adding one small ``ArchAdapter`` instance to ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tracekit.errors import TracekitError, check

# Canonical sites. "resid" is a block's output (the residual stream after layer l),
# "resid_pre" its input (the stream entering layer l: "resid" of l - 1, or for l = 0 the
# embeddings with any position embeddings added), "mlp"/"attn" are the sublayer outputs
# added into the stream, "mlp_in" is the input of the MLP down-projection (ROME's key),
# "embed" the token-embedding output. "resid_pre" and "mlp_in" are module inputs.
SITE_KINDS = ("embed", "resid_pre", "resid", "mlp", "attn", "mlp_in")
INPUT_SITES = ("resid_pre", "mlp_in")


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int | None = None

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise TracekitError(f"unknown site kind {self.kind!r}; choose one of {', '.join(SITE_KINDS)}")
        if (self.kind == "embed") != (self.layer is None):
            raise TracekitError(f"site {self.kind!r} {'takes no' if self.kind == 'embed' else 'needs a'} layer")

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}@{self.layer}"


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


@dataclass(frozen=True)
class ArchAdapter:
    """Where every state of interest lives in a HF causal LM of one architecture.

    Paths are relative to the ``*ForCausalLM`` module; ``{}`` stands for the layer index.
    ``down_proj_transposed`` is True where the down-projection stores its weight as
    (d_in, d_out) (GPT-2's Conv1D) rather than torch Linear's (d_out, d_in).
    """

    name: str
    model_types: tuple[str, ...]
    base: str  # the transformer body whose output is the final-normed hidden state
    layers: str
    embed: str
    attn: str
    mlp: str
    down_proj: str
    final_norm: str
    unembed: str
    down_proj_transposed: bool
    n_layers_attr: str
    d_model_attr: str
    n_ctx_attrs: tuple[str, ...]

    # ---- sizes -----------------------------------------------------------------
    def n_layers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.n_layers_attr))

    def d_model(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.d_model_attr))

    def n_ctx(self, model: nn.Module) -> int:
        for attr in self.n_ctx_attrs:
            value = getattr(model.config, attr, None)
            if value:
                return int(value)
        return 2048

    def check_layer(self, model: nn.Module, layer: int) -> int:
        n = self.n_layers(model)
        check(isinstance(layer, int) and 0 <= layer < n, f"layer {layer} is out of range: this model has layers 0..{n - 1}")
        return layer

    # ---- module paths ---------------------------------------------------------------
    def path(self, site: Site) -> str:
        """The module whose forward output (or, for ``INPUT_SITES``, input) is the site."""
        template = {
            "embed": self.embed,
            "resid_pre": self.layers + ".{}",
            "resid": self.layers + ".{}",
            "mlp": self.mlp,
            "attn": self.attn,
            "mlp_in": self.down_proj,
        }[site.kind]
        return template.format(site.layer)

    def module(self, model: nn.Module, site: Site) -> nn.Module:
        if site.layer is not None:
            self.check_layer(model, site.layer)
        return _get(model, self.path(site))

    def base_model(self, model: nn.Module) -> nn.Module:
        return _get(model, self.base)

    def unembed_module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.unembed)

    def down_proj_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.module(model, Site("mlp_in", layer))

    def down_proj_weight(self, model: nn.Module, layer: int) -> torch.nn.Parameter:
        """The matrix ROME edits, as stored (see ``down_proj_transposed``)."""
        return self.down_proj_module(model, layer).weight

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """View a stored down-projection weight as (d_model, d_mlp), i.e. out x in."""
        return weight.T if self.down_proj_transposed else weight

    def from_out_in(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of ``as_out_in``: turn an (out, in) matrix into the stored orientation."""
        return matrix.T if self.down_proj_transposed else matrix

    # ---- TransformerLens 4 bridge hook names ---------------------------------------
    @staticmethod
    def tl_hook(site: Site) -> str:
        return {
            "embed": "embed.hook_out",
            "resid_pre": "blocks.{}.hook_in",
            "resid": "blocks.{}.hook_out",
            "mlp": "blocks.{}.hook_mlp_out",
            "attn": "blocks.{}.hook_attn_out",
            "mlp_in": "blocks.{}.mlp.out.hook_in",
        }[site.kind].format(site.layer)


GPT2 = ArchAdapter(
    name="gpt2", model_types=("gpt2",), base="transformer", layers="transformer.h",
    embed="transformer.wte", attn="transformer.h.{}.attn", mlp="transformer.h.{}.mlp",
    down_proj="transformer.h.{}.mlp.c_proj", final_norm="transformer.ln_f", unembed="lm_head",
    down_proj_transposed=True, n_layers_attr="n_layer", d_model_attr="n_embd", n_ctx_attrs=("n_positions",),
)
GPTJ = ArchAdapter(
    name="gptj", model_types=("gptj",), base="transformer", layers="transformer.h",
    embed="transformer.wte", attn="transformer.h.{}.attn", mlp="transformer.h.{}.mlp",
    down_proj="transformer.h.{}.mlp.fc_out", final_norm="transformer.ln_f", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="n_layer", d_model_attr="n_embd", n_ctx_attrs=("n_positions",),
)
LLAMA = ArchAdapter(
    name="llama", model_types=("llama", "mistral", "qwen2"), base="model", layers="model.layers",
    embed="model.embed_tokens", attn="model.layers.{}.self_attn", mlp="model.layers.{}.mlp",
    down_proj="model.layers.{}.mlp.down_proj", final_norm="model.norm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
)
# GPT-NeoX / Pythia: attention and MLP in parallel on the same input (use_parallel_residual, the
# default) or in sequence; either way "attn" and "mlp" are the two sublayer outputs. The LM head is
# ``lm_head`` in transformers 5 (``embed_out`` before).
GPT_NEOX = ArchAdapter(
    name="gpt_neox", model_types=("gpt_neox",), base="gpt_neox", layers="gpt_neox.layers",
    embed="gpt_neox.embed_in", attn="gpt_neox.layers.{}.attention", mlp="gpt_neox.layers.{}.mlp",
    down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
)
# Gemma: Llama's module names; the body scales the embeddings by sqrt(d_model) after "embed" (so
# subject noise, drawn at the embedding output, is scaled with them), and RMSNorm multiplies by
# (1 + weight).
GEMMA = ArchAdapter(
    name="gemma", model_types=("gemma",), base="model", layers="model.layers",
    embed="model.embed_tokens", attn="model.layers.{}.self_attn", mlp="model.layers.{}.mlp",
    down_proj="model.layers.{}.mlp.down_proj", final_norm="model.norm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
)
# Phi-1/1.5/2: one LayerNorm feeds attention and MLP in parallel (like GPT-J); MLP fc1 -> fc2.
PHI = ArchAdapter(
    name="phi", model_types=("phi",), base="model", layers="model.layers",
    embed="model.embed_tokens", attn="model.layers.{}.self_attn", mlp="model.layers.{}.mlp",
    down_proj="model.layers.{}.mlp.fc2", final_norm="model.final_layernorm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
)

ARCHITECTURES = (GPT2, GPTJ, LLAMA, GPT_NEOX, GEMMA, PHI)


def adapter_for(model: nn.Module) -> ArchAdapter:
    model_type = getattr(model.config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise TracekitError(f"no tracekit adapter for model_type {model_type!r}; supported: {known}")
