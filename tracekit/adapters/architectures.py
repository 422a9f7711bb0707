"""Per-architecture knowledge: module paths, weight orientation, TransformerLens hook names.

This module is the only place in tracekit that knows names such as ``transformer.h``.
Adding an architecture means adding one small ``ArchAdapter`` instance to ``ARCHITECTURES``:
the module paths (layers, embed, attn, mlp, down_proj, final_norm, unembed; ``{}`` = layer),
the down-projection's orientation and config attribute names give the six basic sites;
``resid_mid`` (the MLP norm's path, sequential blocks only), ``q``/``k``/``v``/``z`` (``Hook``s:
path, input or output, slice of a fused projection, query or key/value heads) and
``n_heads_attr``/``n_kv_heads_attr`` give the rest. ``tests/test_sites.py`` checks every site
against TransformerLens's bridge.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from tracekit.errors import TracekitError, check

# Sites, in TransformerLens's vocabulary (``blocks.{l}.hook_<kind>``, ``blocks.{l}.attn.hook_<kind>``):
# - "embed": the token-embedding output (TL ``hook_embed``; GPT-2 adds position embeddings after it);
# - "resid_pre": block l's input; "resid_mid": after attention, before the MLP's norm (sequential
#   blocks only: GPT-J's parallel block has none); "resid_post": block l's output;
# - "attn_out" / "mlp_out": the sublayer outputs added into the stream;
# - "mlp_in": the MLP down-projection's input, ROME's key (TL's ``mlp.hook_post``; "mlp_post" is an
#   alias). NB TL's own ``hook_mlp_in`` is the MLP's (un-normed) input, i.e. resid_mid; tracekit keeps
#   its older meaning because editing keys on it;
# - per head, [batch, pos, heads, d_head] as TL shows them: "q", "k", "v" (projections, before any
#   rotary embedding; k and v have the model's key/value heads) and "z" (the attention-weighted values,
#   the output projection's input); "pattern", the attention probabilities [batch, query pos, heads,
#   key pos] (positions first like every site; TL's hook_pattern is [batch, heads, query, key]),
#   materialised by an eager attention function while a pattern hook is attached (``pattern.py``).
# Older names stay accepted: "resid" = resid_post, "mlp" = mlp_out, "attn" = attn_out.
SITE_KINDS = ("embed", "resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_in", "mlp_out",
              "resid_post")
HEAD_SITES = ("q", "k", "v", "pattern", "z")  # dimension 2 is the head
SITE_ALIASES = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out", "mlp_post": "mlp_in",
                "hook_embed": "embed", "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid",
                "hook_resid_post": "resid_post", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out",
                "hook_q": "q", "hook_k": "k", "hook_v": "v", "hook_z": "z", "hook_pattern": "pattern"}


def site_kind(name: str) -> str:
    """The canonical kind for a site name or alias (one-line error for an unknown one)."""
    kind = SITE_ALIASES.get(name, name) if isinstance(name, str) else name
    if kind not in SITE_KINDS:
        names = ", ".join([*SITE_KINDS, *[a for a in SITE_ALIASES if not a.startswith("hook_")]])
        raise TracekitError(f"unknown site kind {name!r}; choose one of {names}")
    return kind


@dataclass(frozen=True)
class Site:
    """A hook point: a kind (TransformerLens's name, or an alias) and a layer (none for "embed").

    ``Site("mlp", 3) == Site("mlp_out", 3)``: aliases are resolved on construction."""

    kind: str
    layer: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", site_kind(self.kind))
        if (self.kind == "embed") != (self.layer is None):
            raise TracekitError(f"site {self.kind!r} {'takes no' if self.kind == 'embed' else 'needs a'} layer")

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}@{self.layer}"

    @property
    def per_head(self) -> bool:
        return self.kind in HEAD_SITES


@dataclass(frozen=True)
class Hook:
    """Where a site lives in the HF module tree, relative to the ``*ForCausalLM`` module.

    ``path`` ({} = the layer); ``input``: the module's first input rather than its output;
    ``part`` = (i, n): the i-th of n equal slices of the last dimension (GPT-2's fused c_attn
    gives q, k, v as slices 0, 1, 2 of 3), or with ``part_per_head`` of each head's block
    (GPT-NeoX's query_key_value is [heads, (q, k, v), d_head]); ``heads``: "q" or "kv", the tensor
    is viewed as [batch, pos, heads, d_head] with the model's query or key/value head count;
    ``pattern``: the path is the attention module and the site its attention pattern
    (``tracekit.adapters.pattern``)."""

    path: str
    input: bool = False
    part: tuple[int, int] | None = None
    heads: str | None = None
    pattern: bool = False
    part_per_head: bool = False

    def view(self, x: torch.Tensor, adapter: "ArchAdapter", model: nn.Module) -> torch.Tensor:
        """The site's tensor from the module's tensor."""
        if self.part is not None and self.part_per_head:
            i, n = self.part
            return x.unflatten(-1, (adapter.n_heads(model), n, -1))[..., i, :]
        if self.part is not None:
            i, n = self.part
            size = x.shape[-1] // n
            x = x[..., i * size:(i + 1) * size]
        if self.heads is not None:
            heads = adapter.n_heads(model) if self.heads == "q" else adapter.n_kv_heads(model)
            x = x.unflatten(-1, (heads, x.shape[-1] // heads))
        return x

    def put(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The module's tensor with the site's part replaced by ``value`` (the inverse of ``view``)."""
        if self.part is not None and self.part_per_head:
            i, n = self.part
            blocks = x.unflatten(-1, (value.shape[-2], n, -1))
            blocks = torch.cat([blocks[..., :i, :], value.to(x.dtype).unsqueeze(-2), blocks[..., i + 1:, :]], dim=-2)
            return blocks.flatten(-3)
        if self.heads is not None:
            value = value.flatten(-2)
        if self.part is None:
            return value
        i, n = self.part
        size = x.shape[-1] // n
        return torch.cat([x[..., :i * size], value.to(x.dtype), x[..., (i + 1) * size:]], dim=-1)

    def apply(self, x: torch.Tensor, fn, adapter: "ArchAdapter", model: nn.Module) -> torch.Tensor:
        """``fn`` applied to the site's view of the module's tensor ``x``."""
        if self.part is None and self.heads is None:
            return fn(x)
        return self.put(x, fn(self.view(x, adapter, model)))


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
    # Sites beyond the six every adapter derives from the paths above (None: the model has no
    # such state, or it is not mapped yet; asking for it is a one-line error).
    resid_mid: str | None = None  # the module whose input is resid_mid (the MLP's norm)
    q: Hook | None = None
    k: Hook | None = None
    v: Hook | None = None
    z: Hook | None = None
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = None  # None: as many key/value heads as query heads

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

    def n_heads(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.n_heads_attr))

    def n_kv_heads(self, model: nn.Module) -> int:
        value = getattr(model.config, self.n_kv_heads_attr, None) if self.n_kv_heads_attr else None
        return int(value) if value else self.n_heads(model)

    def check_layer(self, model: nn.Module, layer: int) -> int:
        n = self.n_layers(model)
        check(isinstance(layer, int) and 0 <= layer < n, f"layer {layer} is out of range: this model has layers 0..{n - 1}")
        return layer

    # ---- module paths ---------------------------------------------------------------
    def hook(self, site: Site) -> Hook:
        """Where ``site`` lives: the module (path for this layer), input or output, and its view."""
        derived = {
            "embed": Hook(self.embed),
            "resid_pre": Hook(self.layers + ".{}", input=True),
            "resid_post": Hook(self.layers + ".{}"),
            "attn_out": Hook(self.attn),
            "mlp_out": Hook(self.mlp),
            "mlp_in": Hook(self.down_proj, input=True),
            "resid_mid": Hook(self.resid_mid, input=True) if self.resid_mid else None,
            "pattern": Hook(self.attn, pattern=True),
        }
        hook = derived[site.kind] if site.kind in derived else getattr(self, site.kind)
        if hook is None:
            why = " (its blocks are parallel: attention and MLP read the same input)" \
                if site.kind == "resid_mid" and self.name == "gptj" else ""
            raise TracekitError(f"site {site.kind!r} is not mapped for {self.name} models{why}")
        return dataclasses.replace(hook, path=hook.path.format(site.layer))

    def path(self, site: Site) -> str:
        """The module whose forward output (or input: ``hook(site).input``) holds the site."""
        return self.hook(site).path

    def module(self, model: nn.Module, site: Site) -> nn.Module:
        if site.layer is not None:
            self.check_layer(model, site.layer)
        return _get(model, self.path(site))

    def has(self, kind: str) -> bool:
        """Whether this architecture maps site ``kind``."""
        try:
            self.hook(Site(kind, None if site_kind(kind) == "embed" else 0))
            return True
        except TracekitError:
            return False

    def attach(self, model: nn.Module, site: Site, fn=None, keep: dict | None = None):
        """A torch hook on ``site``'s module applying ``fn`` (site tensor -> site tensor) and storing
        the site's (edited) tensor in ``keep[site]``; returns the handle. The only place that turns
        module tensors into site tensors for forward hooks."""
        hook = self.hook(site)
        module = self.module(model, site)

        def edit(x: torch.Tensor) -> torch.Tensor:
            if fn is not None:
                x = hook.apply(x, fn, self, model)
            if keep is not None:
                keep[site] = hook.view(x, self, model)
            return x

        if hook.pattern:
            from tracekit.adapters.pattern import PatternHandle

            return PatternHandle(model, module, edit)
        if hook.input:
            return module.register_forward_pre_hook(lambda m, args: (edit(args[0]), *args[1:]))
        return module.register_forward_hook(
            lambda m, args, out: (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out))

    def base_model(self, model: nn.Module) -> nn.Module:
        return _get(model, self.base)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.final_norm)

    def layer_of(self, parameter_name: str) -> int | None:
        """The block a parameter belongs to, from its name (None outside the blocks: embeddings,
        final norm, head); works for trees renamed above the blocks too."""
        prefix = self.layers.split(".")[-1]
        match = re.search(rf"(?:^|\.){re.escape(prefix)}\.(\d+)\.", parameter_name)
        return int(match.group(1)) if match else None

    def unembed_module(self, model: nn.Module) -> nn.Module:
        try:
            return _get(model, self.unembed)
        except AttributeError:  # another transformers version's name (GPT-NeoX: embed_out before 5.0)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if head is None:
                raise
            return head

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
            "resid_mid": "blocks.{}.hook_resid_mid",
            "resid_post": "blocks.{}.hook_out",
            "mlp_out": "blocks.{}.hook_mlp_out",
            "attn_out": "blocks.{}.hook_attn_out",
            "mlp_in": "blocks.{}.mlp.out.hook_in",
            "q": "blocks.{}.attn.hook_q",
            "k": "blocks.{}.attn.hook_k",
            "v": "blocks.{}.attn.hook_v",
            "z": "blocks.{}.attn.hook_z",
            "pattern": "blocks.{}.attn.hook_pattern",  # [batch, heads, query, key]: see ``tl_layout``
        }[site.kind].format(site.layer)

    @staticmethod
    def tl_layout(site: Site, fn=None):
        """``fn`` over tracekit's layout of the site as a function of TransformerLens's tensor (and,
        without ``fn``, the converter from TL's layout to tracekit's)."""
        if site.kind != "pattern":
            return fn if fn is not None else (lambda x: x)
        if fn is None:
            return lambda x: x.transpose(1, 2)
        return lambda x: fn(x.transpose(1, 2)).transpose(1, 2)


GPT2 = ArchAdapter(
    name="gpt2", model_types=("gpt2",), base="transformer", layers="transformer.h",
    embed="transformer.wte", attn="transformer.h.{}.attn", mlp="transformer.h.{}.mlp",
    down_proj="transformer.h.{}.mlp.c_proj", final_norm="transformer.ln_f", unembed="lm_head",
    down_proj_transposed=True, n_layers_attr="n_layer", d_model_attr="n_embd", n_ctx_attrs=("n_positions",),
    resid_mid="transformer.h.{}.ln_2", q=Hook("transformer.h.{}.attn.c_attn", part=(0, 3), heads="q"),
    k=Hook("transformer.h.{}.attn.c_attn", part=(1, 3), heads="kv"),
    v=Hook("transformer.h.{}.attn.c_attn", part=(2, 3), heads="kv"),
    z=Hook("transformer.h.{}.attn.c_proj", input=True, heads="q"),
)
GPTJ = ArchAdapter(
    name="gptj", model_types=("gptj",), base="transformer", layers="transformer.h",
    embed="transformer.wte", attn="transformer.h.{}.attn", mlp="transformer.h.{}.mlp",
    down_proj="transformer.h.{}.mlp.fc_out", final_norm="transformer.ln_f", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="n_layer", d_model_attr="n_embd", n_ctx_attrs=("n_positions",),
    q=Hook("transformer.h.{}.attn.q_proj", heads="q"), k=Hook("transformer.h.{}.attn.k_proj", heads="kv"),
    v=Hook("transformer.h.{}.attn.v_proj", heads="kv"), z=Hook("transformer.h.{}.attn.out_proj", input=True, heads="q"),
)
LLAMA = ArchAdapter(
    name="llama", model_types=("llama", "mistral", "qwen2"), base="model", layers="model.layers",
    embed="model.embed_tokens", attn="model.layers.{}.self_attn", mlp="model.layers.{}.mlp",
    down_proj="model.layers.{}.mlp.down_proj", final_norm="model.norm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
    resid_mid="model.layers.{}.post_attention_layernorm", q=Hook("model.layers.{}.self_attn.q_proj", heads="q"),
    k=Hook("model.layers.{}.self_attn.k_proj", heads="kv"), v=Hook("model.layers.{}.self_attn.v_proj", heads="kv"),
    z=Hook("model.layers.{}.self_attn.o_proj", input=True, heads="q"), n_kv_heads_attr="num_key_value_heads",
)
# GPT-NeoX / Pythia: attention and MLP in parallel on the same input (use_parallel_residual, the
# default) or in sequence; either way "attn" and "mlp" are the two sublayer outputs. The LM head is
# ``lm_head`` in transformers 5 (``embed_out`` before: ``unembed_module`` then asks the model).
GPT_NEOX = ArchAdapter(
    name="gpt_neox", model_types=("gpt_neox",), base="gpt_neox", layers="gpt_neox.layers",
    embed="gpt_neox.embed_in", attn="gpt_neox.layers.{}.attention", mlp="gpt_neox.layers.{}.mlp",
    down_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h", final_norm="gpt_neox.final_layer_norm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
    # query_key_value is fused per head: [heads, (q, k, v), d_head]. No resid_mid: Pythia's block is
    # parallel (a sequential GPT-NeoX, use_parallel_residual=False, would have it at post_attention_layernorm)
    q=Hook("gpt_neox.layers.{}.attention.query_key_value", part=(0, 3), heads="q", part_per_head=True),
    k=Hook("gpt_neox.layers.{}.attention.query_key_value", part=(1, 3), heads="kv", part_per_head=True),
    v=Hook("gpt_neox.layers.{}.attention.query_key_value", part=(2, 3), heads="kv", part_per_head=True),
    z=Hook("gpt_neox.layers.{}.attention.dense", input=True, heads="q"),
)
# Gemma: Llama's module names; the body scales the embeddings by sqrt(d_model) after "embed" (so
# subject noise, drawn at the embedding output, is scaled with them), and RMSNorm multiplies by
# (1 + weight).
GEMMA = dataclasses.replace(LLAMA, name="gemma", model_types=("gemma",))
# Phi-1/1.5/2: one LayerNorm feeds attention and MLP in parallel (like GPT-J); MLP fc1 -> fc2.
PHI = ArchAdapter(
    name="phi", model_types=("phi",), base="model", layers="model.layers",
    embed="model.embed_tokens", attn="model.layers.{}.self_attn", mlp="model.layers.{}.mlp",
    down_proj="model.layers.{}.mlp.fc2", final_norm="model.final_layernorm", unembed="lm_head",
    down_proj_transposed=False, n_layers_attr="num_hidden_layers", d_model_attr="hidden_size",
    n_ctx_attrs=("max_position_embeddings",),
    q=Hook("model.layers.{}.self_attn.q_proj", heads="q"), k=Hook("model.layers.{}.self_attn.k_proj", heads="kv"),
    v=Hook("model.layers.{}.self_attn.v_proj", heads="kv"),
    z=Hook("model.layers.{}.self_attn.dense", input=True, heads="q"), n_kv_heads_attr="num_key_value_heads",
)

ARCHITECTURES = (GPT2, GPTJ, LLAMA, GPT_NEOX, GEMMA, PHI)


def adapter_for(model: nn.Module) -> ArchAdapter:
    model_type = getattr(model.config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise TracekitError(f"no tracekit adapter for model_type {model_type!r}; supported: {known}")
