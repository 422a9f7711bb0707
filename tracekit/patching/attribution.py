"""Attribution patching: the first-order approximation of every patch at once.

Patching site s at position t moves the metric by about (a_source - a_base)[t] . dm/da[t], the
gradient taken on the base run (the corrupted run when denoising). One forward pass with a zero
probe added at every site (so one backward pass gives dm/da at all of them) and the source run's
values give every (site, layer, position[, head]) estimate. Exact where the metric is linear in the
site (tests/test_attribution.py); elsewhere it is an estimate whose agreement with exact patching
``benchmarks/attribution_agreement.py`` measures.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tracekit import prompts as P
from tracekit.adapters import HEAD_SITES, SITE_KINDS, Site
from tracekit.errors import check
from tracekit.patching.corruption import corrupt_run
from tracekit.patching.engine import Patch
from tracekit.patching.metrics import default_foil, make_metric, target_tokens
from tracekit.patching.patch import DIRECTIONS, _kinds
from tracekit.patching.result import PatchResult


def attribution_patch(model, clean: str, corrupt, *, sites: str | Sequence[str] | None = None, heads: bool = True,
                      metric="logprob", target: str | None = None, foil: str | None = None,
                      direction: str = "denoise") -> PatchResult:
    """Estimates of ``patch`` for every layer and position (and head, with ``heads``) of ``sites``
    (default: every site this architecture maps) from one forward and one backward pass (per noise
    sample batch). Arguments as ``patch``; the result's ``per_sample`` holds base metric + estimate,
    so ``values``/``normalised`` read as ``patch``'s, and ``config["method"]`` is "attribution"."""
    check(direction in DIRECTIONS, f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    kinds = _kinds(model, [k for k in SITE_KINDS if k != "embed" and model.adapter.has(k)] if sites is None else sites)
    clean_ids = P.token_ids(model.tokenizer, clean)
    T = len(clean_ids)
    with torch.no_grad():
        probe_logits = model.run(torch.tensor([clean_ids]), positions=torch.tensor([T - 1])).logits[0]
    target_ids = target_tokens(model.tokenizer, clean, target) if target is not None else [int(probe_logits.argmax())]
    extra = target_ids[:-1] if metric in ("prob", "logprob") else []
    corrupted = corrupt_run(model, clean, clean_ids, corrupt, extra)
    clean_run = torch.tensor([clean_ids + extra])
    columns = list(range(T - 1, T + len(extra)))
    capture = [Site(kind, layer) for kind in kinds for layer in range(model.n_layers)]
    with torch.no_grad():
        clean_out = model.run(clean_run, capture=capture)
        corrupt_out = model.run(corrupted.ids, edits=corrupted.edits, capture=capture)
    cols = torch.tensor(columns)
    clean_logits, corrupt_logits = clean_out.logits[:, cols], corrupt_out.logits[:, cols]
    foil_id = None
    if metric == "logit_diff":
        foil_id = target_tokens(model.tokenizer, clean, foil)[0] if foil is not None else \
            default_foil(corrupt_logits[:, 0], target_ids[0])
    scorer = make_metric(metric, model, T, target_ids, foil_id, clean_logits[:, :1])
    denoise = direction == "denoise"
    base_ids, base_edits = (corrupted.ids, corrupted.edits) if denoise else (clean_run, {})
    base_vals, src_vals = (corrupt_out.captured, clean_out.captured) if denoise else \
        (clean_out.captured, corrupt_out.captured)

    probes = {site: torch.zeros_like(base_vals[site]).requires_grad_(True) for site in capture}
    edits = dict(base_edits)
    for site, probe in probes.items():
        edits[site] = lambda h, probe=probe: h + probe.to(h.device, h.dtype)
    logits = model.run(base_ids, edits=edits, grad=True).logits[:, cols.to(model.device)]
    base_metric = scorer.fn(logits.float())  # [S]
    grads = torch.autograd.grad(base_metric.sum(), list(probes.values()), allow_unused=True)
    base_metric = base_metric.detach().cpu()

    patches, estimates = [], []
    for kind in kinds:
        for layer in range(model.n_layers):
            site = Site(kind, layer)
            grad = grads[list(probes).index(site)]
            delta = (src_vals[site] - base_vals[site]).float()
            effect = torch.zeros(delta.shape[:-1]) if grad is None else (delta * grad.float()).sum(-1).detach().cpu()
            per_head = kind in HEAD_SITES and heads
            if kind in HEAD_SITES and not heads:
                effect = effect.sum(-1)
            for t in range(T):
                for h in (range(effect.shape[-1]) if per_head else [None]):
                    patches.append(Patch(kind, layer, layer, layer + 1, (t,), h))
                    estimates.append(effect[:, t] if h is None else effect[:, t, h])
    per_sample = base_metric[None] + torch.stack(estimates).reshape(len(patches), -1)
    m_clean, m_corrupt = float(scorer(clean_logits).mean()), float(scorer(corrupt_logits).mean())
    return PatchResult(
        model=model.spec, clean=clean, corrupt=corrupted.description, tokens=model.tokens(clean), direction=direction,
        metric=scorer.name, target=model.tokenizer.decode(target_ids),
        foil=None if foil_id is None else model.tokenizer.decode([foil_id]), m_clean=m_clean, m_corrupt=m_corrupt,
        window=1, patches=patches, per_sample=per_sample, corrupted_span=corrupted.span,
        config={"method": "attribution", "backend": model.backend.name, "samples": int(per_sample.shape[1]),
                "n_layers": model.n_layers},
    )
