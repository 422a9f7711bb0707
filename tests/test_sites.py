"""Sites in TransformerLens's vocabulary: every site on every architecture holds the value the
TransformerLens bridge reports at the same hook, on all three backends; aliases; edits on head views."""

import pytest
import torch

from conftest import TINY_SPECS, tiny
from tracekit import TracekitError
from tracekit.adapters import SITE_KINDS, Site

TOL = 1e-5
# TransformerLens's own hook for each tracekit site (tracekit's "mlp_in" is TL's mlp.hook_post)
TL_NAMES = {
    "embed": "hook_embed", "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out", "mlp_in": "blocks.{}.mlp.hook_post", "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k", "v": "blocks.{}.attn.hook_v", "z": "blocks.{}.attn.hook_z",
    "pattern": "blocks.{}.attn.hook_pattern",  # TL: [batch, heads, query, key]; tracekit: positions first
}
IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 11], [5, 6, 7, 8, 9, 10, 12]])


def sites_of(model):
    return [Site(kind, None if kind == "embed" else layer) for kind in SITE_KINDS if model.adapter.has(kind)
            for layer in ((None,) if kind == "embed" else (0, model.n_layers - 1))]


def close(a, b):
    return a.shape == b.shape and float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def assert_sites_equal_the_bridge(load, sites):
    """Each site, captured on every backend (``load(backend)`` gives the model), holds the value
    the TransformerLens bridge reports at its hook."""
    names = {site: TL_NAMES[site.kind].format(site.layer) for site in sites}
    with torch.no_grad():
        _, cache = load("transformer_lens").wrapper.run_with_cache(IDS, names_filter=lambda name: name in names.values())
    for backend in ("hf", "transformer_lens", "nnsight"):
        captured = load(backend).run(IDS, capture=sites).captured
        for site in sites:
            want = cache[names[site]].transpose(1, 2) if site.kind == "pattern" else cache[names[site]]
            assert close(captured[site], want), (backend, str(site))


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_every_site_equals_the_bridge_hook_on_every_backend(spec):
    assert_sites_equal_the_bridge(lambda backend: tiny(spec, backend), sites_of(tiny(spec)))


def test_sites_per_architecture():
    assert tiny("random:gptj-tiny").adapter.has("resid_mid") is False  # a parallel block
    with pytest.raises(TracekitError, match="not mapped for gptj.*parallel"):
        tiny("random:gptj-tiny").run(IDS, capture=[Site("resid_mid", 0)])
    for spec in ("random:gpt2-tiny", "random:llama-tiny"):
        assert all(tiny(spec).adapter.has(kind) for kind in SITE_KINDS)
    k = tiny("random:llama-tiny").run(IDS, capture=[Site("k", 1), Site("q", 1)]).captured
    assert k[Site("k", 1)].shape == (2, 7, 2, 16) and k[Site("q", 1)].shape == (2, 7, 4, 16)  # grouped keys


def test_aliases_resolve_to_one_site():
    assert Site("mlp", 2) == Site("mlp_out", 2) == Site("hook_mlp_out", 2)
    assert Site("resid", 1) == Site("resid_post", 1) and Site("attn", 0).kind == "attn_out"
    assert Site("mlp_post", 3) == Site("mlp_in", 3) and str(Site("resid", 1)) == "resid_post@1"
    assert {Site("mlp", 2): 1}[Site("mlp_out", 2)] == 1
    with pytest.raises(TracekitError, match="unknown site kind 'hook_attn_scores'"):
        Site("hook_attn_scores", 0)


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_an_edit_on_one_head_changes_only_that_head(spec):
    """Zeroing head 1 of z (the output projection's input) on every backend: the same logits, and
    the captured z differs from the clean one at head 1 only."""
    site = Site("z", 1)
    zero_head = lambda z: torch.cat([z[:, :, :1], torch.zeros_like(z[:, :, 1:2]), z[:, :, 2:]], dim=2)  # noqa: E731
    clean = tiny(spec).run(IDS, capture=[site]).captured[site]
    runs = [tiny(spec, backend).run(IDS, edits={site: zero_head}, capture=[site])
            for backend in ("hf", "transformer_lens", "nnsight")]
    for run in runs:
        assert close(run.logits, runs[0].logits)
        z = run.captured[site]
        assert float(z[:, :, 1].abs().max()) == 0
        assert close(z[:, :, [0, 2, 3]], clean[:, :, [0, 2, 3]])
    assert not close(runs[0].logits, tiny(spec).run(IDS).logits)


def test_views_of_fused_projections_round_trip():
    """q/k/v as slices of a fused projection: [q | k | v] (GPT-2) or per head [h: q k v] (GPT-NeoX)."""
    from types import SimpleNamespace

    from tracekit.adapters import Hook

    adapter = tiny("random:gpt2-tiny").adapter
    model = SimpleNamespace(config=SimpleNamespace(n_layer=4, num_attention_heads=2))
    x = torch.arange(2 * 3 * 12, dtype=torch.float32).reshape(2, 3, 12)  # 2 heads, d_head 2
    stacked, per_head = Hook("x", part=(1, 3), heads="q"), Hook("x", part=(1, 3), heads="q", part_per_head=True)
    assert stacked.view(x, adapter, model)[0, 0].tolist() == [[4, 5], [6, 7]]
    assert per_head.view(x, adapter, model)[0, 0].tolist() == [[2, 3], [8, 9]]
    for hook in (stacked, per_head):
        value = hook.view(x, adapter, model)
        assert torch.equal(hook.put(x, value), x)
        changed = hook.put(x, torch.zeros_like(value))
        assert float(changed.sum()) == float(x.sum() - value.sum())
        assert float(hook.view(changed, adapter, model).abs().sum()) == 0
