"""``patch``: activation patching between a clean and a corrupted run, swept over sites x layers x
positions (x heads), batched on the partial forward."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from tracekit import prompts as P
from tracekit.adapters import HEAD_SITES, Site
from tracekit.errors import check
from tracekit.patching.corruption import Corrupted, Noise, corrupt_run
from tracekit.patching.engine import Patch, run_patches
from tracekit.patching.metrics import default_foil, make_metric, target_tokens
from tracekit.patching.result import PatchResult
from tracekit.tracing.plan import window_layers

DIRECTIONS = ("denoise", "noise")


def patch(model, clean: str, corrupt, *, sites: str | Sequence[str] = "resid_pre", layers: Iterable[int] | None = None,
          positions="all", heads=None, window: int = 1, metric="logprob", target: str | None = None,
          foil: str | None = None, direction: str = "denoise", batch_tokens: int | None = None,
          shapes: str | None = None) -> PatchResult:
    """Activation patching: run ``clean`` and its corruption, then, for every configuration of the
    sweep, the base run with one site's values taken from the other run.

    ``corrupt``: a prompt with as many tokens as ``clean``, ``Replace(old, new)`` (a token
    replacement in ``clean``) or ``Noise(subject, ...)`` (Gaussian noise on the subject's embeddings,
    causal tracing's corruption; several samples are averaged). ``direction``: "denoise" (patch clean
    values into the corrupted run: which states suffice to restore the answer) or "noise" (corrupted
    values into the clean run: which states are necessary).

    The sweep is sites x layers x positions (x heads): ``sites`` one or several site names
    (TransformerLens's: resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp_in, q, k, v, z,
    pattern, or the aliases resid/mlp/attn; a pattern patch replaces a query position's row);
    ``layers`` window centres (default: every layer), each patching ``window_layers(l, window)``;
    ``positions`` "all" (each prompt position on its own), "last", "corrupted" (each corrupted
    token), or a list whose items are positions or tuples of positions patched together; ``heads``
    (head sites only) None (all heads together), "each", or a list.

    ``metric``: "logprob" / "prob" of ``target`` (every token, teacher-forced; default target: the
    clean run's top token), "logit_diff" (target minus ``foil``; default foil: the corrupted run's
    top token other than the target), "kl" (KL(clean || patched) at the last position) or a
    function of the last position's logits [rows, vocab] -> [rows].

    Returns a ``PatchResult`` (``.values``, ``.to_frame()``, ``.plot()``, a rich table).
    """
    check(direction in DIRECTIONS, f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    check(isinstance(window, int) and not isinstance(window, bool) and 1 <= window <= model.n_layers,
          f"window must be an integer from 1 to {model.n_layers}, got {window!r}")
    kinds = _kinds(model, sites)
    clean_ids = P.token_ids(model.tokenizer, clean)
    check(len(clean_ids) <= model.n_ctx,
          f"the prompt is {len(clean_ids)} tokens, over the model's context {model.n_ctx}")
    T = len(clean_ids)
    probe = model.forward(torch.tensor([clean_ids]), logits=torch.tensor([T - 1]), shapes=shapes).logits[0]
    answer_id = int(probe.argmax())
    target_ids = target_tokens(model.tokenizer, clean, target) if target is not None else [answer_id]
    multi = metric in ("prob", "logprob") and len(target_ids) > 1
    extra = target_ids[:-1] if multi else []
    corrupted = corrupt_run(model, clean, clean_ids, corrupt, extra)
    clean_run_ids = torch.tensor([clean_ids + extra])

    all_layers = list(range(model.n_layers))
    layer_list = all_layers if layers is None else [model.adapter.check_layer(model.hf, int(l)) for l in layers]
    check(len(layer_list) > 0, "layers: give at least one layer")
    windows = [window_layers(l, window, model.n_layers) for l in layer_list]
    needed = sorted({l for w in windows for l in w})
    capture = [Site(kind, l) for kind in kinds for l in needed]
    columns = list(range(T - 1, T - 1 + len(extra) + 1))
    denoise = direction == "denoise"
    clean_pass = model.forward(clean_run_ids, capture=capture, logits=torch.tensor([columns]), record=not denoise,
                               shapes=shapes)
    corrupt_pass = model.forward(corrupted.ids, edits=corrupted.edits, capture=capture, record=denoise,
                                 logits=torch.tensor([columns]).expand(corrupted.ids.shape[0], -1), shapes=shapes)
    foil_id = None
    if metric == "logit_diff":
        foil_id = target_tokens(model.tokenizer, clean, foil)[0] if foil is not None else \
            default_foil(corrupt_pass.logits[:, 0], target_ids[0])
    scorer = make_metric(metric, model, T, target_ids, foil_id, clean_pass.logits[:, :1])
    m_clean = float(scorer(clean_pass.logits).mean())
    m_corrupt = float(scorer(corrupt_pass.logits).mean())

    position_sets = _positions(positions, T, corrupted)
    head_lists = {kind: _heads(model, kind, heads) for kind in kinds}
    patches = [Patch(kind, l, w.start, w.stop, pos, head) for kind in kinds for l, w in zip(layer_list, windows)
               for pos in position_sets for head in head_lists[kind]]
    base, src = (corrupt_pass, clean_pass) if denoise else (clean_pass, corrupt_pass)
    # a pattern's key axis is the pass's keys: absolute positions only with exact shapes
    values = run_patches(model, patches, base.recording, src.captured, base.hidden.shape[0], src.hidden.shape[0],
                         columns, scorer, batch_tokens, "exact" if "pattern" in kinds else shapes)
    return PatchResult(
        model=model.spec, clean=clean, corrupt=corrupted.description, tokens=model.tokens(clean), direction=direction,
        metric=scorer.name, target=model.tokenizer.decode(target_ids), foil=None if foil_id is None else
        model.tokenizer.decode([foil_id]), m_clean=m_clean, m_corrupt=m_corrupt, window=window,
        patches=patches, per_sample=values,
        corrupted_span=corrupted.span, config={"backend": model.backend.name, "forward": model.forward_path,
                                              "samples": int(values.shape[1]), "n_layers": model.n_layers},
    )


def _kinds(model, sites) -> list[str]:
    names = [sites] if isinstance(sites, str) else list(sites)
    check(len(names) > 0, "sites: give at least one site name")
    kinds = []
    for name in names:
        kind = Site(name, None if name == "embed" else 0).kind
        check(kind != "embed", "patch the embeddings as resid_pre at layer 0 (the embed site has no layer)")
        model.adapter.hook(Site(kind, 0))  # a one-line error if this architecture lacks the site
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _positions(positions, T: int, corrupted: Corrupted) -> list[tuple[int, ...]]:
    if isinstance(positions, str):
        check(positions in ("all", "last", "corrupted"), f"unknown positions {positions!r}; use 'all', 'last', "
                                                          "'corrupted' or a list of positions")
        if positions == "all":
            return [(t,) for t in range(T)]
        if positions == "last":
            return [(T - 1,)]
        check(corrupted.span is not None, "positions='corrupted': the corrupted run differs from the clean one nowhere")
        return [(t,) for t in range(*corrupted.span)]
    out = []
    for item in positions:
        items = item if isinstance(item, (tuple, list)) else [item]
        group = tuple(int(t) + T if int(t) < 0 else int(t) for t in items)
        check(len(group) > 0 and all(0 <= t < T for t in group),
              f"position {item} is outside the prompt's {T} tokens")
        out.append(group)
    check(len(out) > 0, "positions: give at least one position")
    return out


def _heads(model, kind: str, heads) -> list[int | None]:
    if heads is None or kind not in HEAD_SITES:
        return [None]
    n = model.adapter.n_heads(model.hf) if kind in ("q", "z") else model.adapter.n_kv_heads(model.hf)
    if isinstance(heads, str):
        check(heads == "each", f"heads: None, 'each' or a list of head indices, got {heads!r}")
        return list(range(n))
    out = [int(h) for h in heads]
    check(len(out) > 0 and all(0 <= h < n for h in out), f"heads must lie in 0..{n - 1} for site {kind!r}")
    return out


__all__ = ["patch", "Noise", "DIRECTIONS"]
