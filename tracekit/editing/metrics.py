"""Edit metrics for one edited point (method-notes, "Edit metrics").

The score formulas are pure functions over probabilities (``editing.scores``, re-exported
here; tests feed hand-computed numbers). ``evaluate_edit`` gathers the probabilities: every
prompt of the point (edit prompt, paraphrases, neighbourhood prompts) x every object, in ONE
batched pass before the edit and ONE after (starting at the edit's lowest layer), plus the
essence texts.

Two scorings (``MetricsConfig.scoring``):
- ``"paper-text"`` (default): the paper's definitions as its text states them: p(o | prompt) is
  the probability of the object's FIRST token, the paraphrase and neighbourhood scores average
  over every paraphrase and neighbourhood prompt, the neighbourhood score follows p(o_true).
- ``"paper-code"``: what google/belief-localization's ``make_editing_results_df`` computes:
  p is the probability of the whole object (" " + object, teacher forced), only the FIRST
  paraphrase and neighbourhood prompt count, the neighbourhood score follows p(target) on it,
  and the rewrite and paraphrase scores are floored at 2e-8 (raising) or 0 (erasure).
The essence score is the paper code's in both: five texts sampled (top-k 5) from the unedited
model given "{s} is a", 100 tokens each with the prompt, and the mean over texts of each text's
perplexity exp(-sum log p / n_tokens) (the code divides by every token, the first included);
essence = 1 - clip(ppl_after - ppl_before, 0, 5) / 5. Fact Forcing scores under the subject
noise (``editing.subject_noise``; with the paper-code noise the essence texts are noised too).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tracekit import prompts as P
from tracekit.editing.delta import Edit
from tracekit.editing.logprobs import Query, text_query, token_logprobs, token_logprobs_kept
from tracekit.editing.problems import EditSetup
from tracekit.editing.scores import (  # noqa: F401 (the formulas, re-exported)
    ESSENCE_CAP, RECOVERED_FLOOR, KindProbs, compute_scores, essence_score, magnitude, neighborhood_score, overall_score,
    paper_code_point_scores, paper_code_scores, paraphrase_score, perplexity, rewrite_score, success_rate, text_perplexity)
from tracekit.errors import check
from tracekit.memo import model_memo, peek_memo

SCORING_RULE = ("p(o|prompt) = probability of the object's first token after the prompt (paper); "
                "full-object mean log-prob, teacher forced, reported alongside")
SCORING_RULES = {
    "paper-text": SCORING_RULE,
    "paper-code": ("p(o|prompt) = probability of the whole object (paper code); first paraphrase and first "
                   "neighbourhood prompt only; neighbourhood on p(target); rewrite/paraphrase floored at 2e-8 (0 erasing)"),
}
ESSENCE_PROMPT = "{} is a"


# ---- gathering the probabilities ---------------------------------------------------------------
@dataclass(frozen=True)
class MetricsConfig:
    scoring: str = "paper-text"  # "paper-text" or "paper-code" (module doc)
    essence: bool = True
    essence_samples: int = 5
    essence_top_k: int = 5
    essence_max_tokens: int = 100  # tokens per essence text, the prompt included (the paper code's max_out_len)
    essence_new_tokens: int | None = None  # instead: exactly this many sampled tokens (tracekit 0.1: 30)
    essence_perplexity: str = "per-text"  # mean of per-text perplexities (paper code), or "pooled" (tracekit 0.1)
    seed: int = 0

    def __post_init__(self):
        check(self.scoring in SCORING_RULES, f"scoring must be one of {', '.join(SCORING_RULES)}, got {self.scoring!r}")
        check(self.essence_samples >= 1 and self.essence_top_k >= 1 and self.essence_max_tokens >= 2,
              "essence_samples and essence_top_k must be >= 1, essence_max_tokens >= 2")
        check(self.essence_new_tokens is None or self.essence_new_tokens >= 1, "essence_new_tokens must be >= 1")
        check(self.essence_perplexity in ("per-text", "pooled"),
              f"essence_perplexity must be 'per-text' or 'pooled', got {self.essence_perplexity!r}")


@dataclass(frozen=True)
class PromptRow:
    kind: str  # rewrite / paraphrase / neighborhood
    prompt: str
    role: str  # target / true / counter
    obj: str
    noised: bool
    p_before: float
    p_after: float
    logprob_before: float  # mean per-token log-prob of the whole object
    logprob_after: float


@dataclass
class EditScores:
    scores: dict[str, float]
    rows: list[PromptRow]
    essence_texts: list[str] = field(default_factory=list)
    ppl_before: float = math.nan
    ppl_after: float = math.nan
    scoring: str = SCORING_RULE
    notes: tuple[str, ...] = ()


def sample_essence_texts(model, subject: str, config: MetricsConfig = MetricsConfig()) -> list[str]:
    """Texts sampled from the model given "{subject} is a" (top-k, seeded), prompt included."""
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in sample_essence_tokens(model, subject, config)]


def sample_essence_tokens(model, subject: str, config: MetricsConfig = MetricsConfig()) -> list[tuple[int, ...]]:
    """Token rows of the essence texts (scored as sampled: no decode/re-encode round trip).

    Sampled from the underlying transformers model with its key/value cache, one pass per new
    token (as the paper's ``generate_fast`` does); every backend runs these very modules, so every
    backend gives the same texts. Memoised per model and (subject, settings): sample them before
    applying an edit (``evaluate_edit`` does)."""
    prompt_ids = P.token_ids(model.tokenizer, ESSENCE_PROMPT.format(subject))
    new_tokens = config.essence_new_tokens
    if new_tokens is None:
        new_tokens = max(0, config.essence_max_tokens - len(prompt_ids))
    key = (subject, config.essence_samples, config.essence_top_k, new_tokens, config.seed)
    memo = model_memo(model, "essence_texts")
    if key not in memo:
        gen = torch.Generator().manual_seed(config.seed)
        rows = sample_top_k(model, prompt_ids, config.essence_samples, new_tokens, config.essence_top_k, gen)
        memo[key] = tuple(tuple(r) for r in rows)
    return list(memo[key])


@torch.no_grad()
def sample_top_k(model, prompt_ids: Sequence[int], samples: int, new_tokens: int, top_k: int,
                 generator: torch.Generator) -> list[list[int]]:
    """``samples`` continuations of one prompt, ``new_tokens`` each, drawn from the top ``top_k``
    next tokens. The key/value cache makes a pass per token cost one position, not the whole row
    (5 texts of 100 tokens on SmolLM2-135M: 69.5 s of one CPU thread without it, 9.4 s with it).
    All rows share one length, so no padding or attention mask is needed."""
    rows = [list(prompt_ids) for _ in range(samples)]
    ids, cache = torch.tensor(rows, device=model.device), None
    cache_arg = "cache" if "cache" in inspect.signature(model.hf.forward).parameters else "past_key_values"
    for _ in range(new_tokens):
        out = model.hf(input_ids=ids, use_cache=True, **{cache_arg: cache})
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")  # transformers 5.2x / older
        top_logits, top_ids = out.logits[:, -1].float().cpu().topk(top_k, dim=-1)
        picks = torch.multinomial(torch.softmax(top_logits, dim=-1), 1, generator=generator)
        tokens = top_ids.gather(1, picks)[:, 0]
        for row, token in zip(rows, tokens.tolist()):
            row.append(token)
        ids = tokens[:, None].to(model.device)
    return rows


def _queries(model, setup: EditSetup, noise):
    """paper-text: (kind, prompt, role, object, noised) labels and their queries, for one batched pass."""
    req = setup.request
    prompts = [("rewrite", req.text)] + [("paraphrase", p) for p in setup.paraphrases]
    prompts += [("neighborhood", p) for p in setup.neighbours]
    own = {"target": setup.target, "true": setup.o_true, "counter": setup.counter}
    neighbour = {"true": setup.neighbour_true or setup.o_true, "counter": setup.counter}
    labels, queries = [], []
    for kind, prompt in prompts:
        for role, obj in (neighbour if kind == "neighborhood" else own).items():
            if obj is None:
                continue
            noised = noise is not None and req.subject in prompt
            queries.append(text_query(model, prompt, obj, req.subject if noised else None))
            labels.append((kind, prompt, role, obj, noised))
    return labels, queries


def _paper_code_queries(model, setup: EditSetup, noise):
    """paper-code: each prompt (rewrite, paraphrases, neighbours, in this order) scored for the
    target then the request baseline, as ``test_batch_prediction`` lays out its batch.

    Its subject noise, reproduced by ``paper_code_row_spans``: row i is noised at the subject
    span of PROMPT i, while the batch holds two rows per prompt, so that of the noised rows only
    the edit prompt's target row has the noise on its subject."""
    req = setup.request
    baseline = setup.baseline if setup.baseline is not None else model.tokenizer.eos_token
    prompts = [("rewrite", req.text)] + [("paraphrase", p) for p in setup.paraphrases]
    prompts += [("neighborhood", p) for p in setup.neighbours]
    labels, queries = [], []
    for kind, prompt in prompts:
        noised = noise is not None and req.subject in prompt
        for role, obj in (("target", setup.target), ("baseline", baseline)):
            queries.append(text_query(model, prompt, obj, req.subject if noised else None))
            labels.append((kind, prompt, role, obj, noised))
    return labels, queries


def paper_code_row_spans(labels, queries) -> list:
    """The span each row of the paper-code batch is noised at (see ``_paper_code_queries``)."""
    prompt_spans, seen = [], set()
    for (kind, prompt, *_), query in zip(labels, queries):
        if (kind, prompt) not in seen:
            seen.add((kind, prompt))
            prompt_spans.append(query.span)
    return [prompt_spans[i] if i < len(prompt_spans) else None for i in range(len(queries))]


def _essence_queries(model, setup: EditSetup, essence_rows, noised: bool) -> list[Query]:
    """Every token of each text after its first; noised at the subject when ``noised``."""
    span = model.subject_span(ESSENCE_PROMPT.format(setup.request.subject), setup.request.subject) if noised else None
    return [Query(ids[:1], ids[1:], span) for ids in essence_rows if len(ids) > 1]


def _essence_pass(model, queries: list[Query], noise, start=None) -> list[torch.Tensor]:
    if noise is not None and noise.fresh_per_pass:  # the paper's code: one pass, and one new stream, per text
        return [token_logprobs(model, [q], noise=noise)[0] for q in queries]
    return token_logprobs(model, queries, start=start) if queries else []


@dataclass
class _Scoring:
    """One point's scoring plan: its queries and essence texts, under its noise."""

    setup: EditSetup
    noise: object
    paper_code: bool
    labels: list
    queries: list
    essence_rows: list
    essence: list
    essence_noised: bool
    row_spans: list | None


def _plan(model, setup: EditSetup, config: MetricsConfig, essence_texts: Sequence[str] | None) -> _Scoring:
    from tracekit.editing.subject_noise import as_subject_noise

    noise = as_subject_noise(model, setup.request)
    paper_code = config.scoring == "paper-code"
    labels, queries = (_paper_code_queries if paper_code else _queries)(model, setup, noise)
    if essence_texts is not None:
        essence_rows = [tuple(P.token_ids(model.tokenizer, t)[: config.essence_max_tokens]) for t in essence_texts]
    else:
        essence_rows = sample_essence_tokens(model, setup.request.subject, config) if config.essence else []
    essence_noised = noise is not None and noise.fresh_per_pass
    essence = _essence_queries(model, setup, essence_rows, essence_noised)
    row_spans = paper_code_row_spans(labels, queries) if paper_code and noise is not None and noise.fresh_per_pass \
        else None
    return _Scoring(setup, noise, paper_code, labels, queries, essence_rows, essence, essence_noised, row_spans)


def _before(model, plan: _Scoring, points: int = 1):
    """The "before" scores of the point's queries and essence texts, and the block inputs kept from
    those passes (for after-passes that start at an edit's lowest layer; none under subject noise).
    ``points``: how many points' kept inputs must stay at hand together (a batch's)."""
    passes = max(_KEPT_ENTRIES, 2 * points)
    before, kept_q = _cached_pass(model, plan.queries, plan.noise, row_spans=plan.row_spans, kept_passes=passes)
    essence_before, kept_e = _cached_pass(model, plan.essence, plan.noise if plan.essence_noised else None,
                                          essence=True, kept_passes=passes)
    return before, essence_before, [k for k in (kept_q, kept_e) if k is not None]


def lowest_changed_layer(model, edit: Edit) -> int | None:
    """The lowest block whose parameters ``edit`` changes, or None if it changes anything outside
    the blocks (embeddings, final norm): a pass after the edit computes the blocks below it as before."""
    layers = [model.adapter.layer_of(name) for name in edit.parameter_names]
    return None if not layers or None in layers else min(layers)


def _start(model, plan: _Scoring, edit: Edit, kept: list) -> tuple | None:
    layer = lowest_changed_layer(model, edit)
    return (layer, kept) if layer and kept and plan.noise is None else None


def evaluate_edit(model, setup: EditSetup, edit: Edit, config: MetricsConfig = MetricsConfig(),
                  essence_texts: Sequence[str] | None = None, *, keep_points: int = 1) -> EditScores:
    """Score ``edit`` (not applied on entry; left as found) on the point described by ``setup``.

    ``essence_texts``: score these texts (tokenised as the paper's code does, to
    ``essence_max_tokens``) instead of sampling them from the model. ``keep_points``: inside
    ``baseline_cached``, how many points' "before" block inputs to keep at hand (a batch's, when
    its points are scored one by one)."""
    check(not edit.applied, "evaluate_edit needs the edit un-applied: the 'before' pass runs the original model")
    plan = _plan(model, setup, config, essence_texts)
    before, essence_before, kept = _before(model, plan, points=keep_points)
    start = _start(model, plan, edit, kept)
    with edit:
        after = token_logprobs(model, plan.queries, noise=plan.noise, row_spans=plan.row_spans, start=start)
        essence_after = _essence_pass(model, plan.essence, plan.noise if plan.essence_noised else None, start=start)
    return _scores(model, plan, config, before, after, essence_before, essence_after)


def evaluate_edits(model, setups: Sequence[EditSetup], edits: Sequence[Edit],
                   config: MetricsConfig = MetricsConfig(), *, keep_points: int = 1) -> list[EditScores]:
    """``evaluate_edit`` of several (point, edit) pairs, their "after" passes in ONE pass: each
    point's rows see its own edit, applied as a per-row correction x W_delta^T at the edited
    down-projections (``delta.down_proj_deltas``), so several points' edits of the same or
    different layers share a pass. Points under subject noise, and edits of other parameters
    (FT with biases), are scored one by one. Scores equal one-by-one scoring up to the rounding
    of W x + dW x against (W + dW) x. ``keep_points``: as for ``evaluate_edit`` (at least the
    points given)."""
    from tracekit.editing.delta import down_proj_deltas, row_delta_edits

    check(len(setups) == len(edits), f"{len(setups)} points for {len(edits)} edits")
    out: list[EditScores | None] = [None] * len(edits)
    plans, deltas, together = {}, {}, []
    for i, (setup, edit) in enumerate(zip(setups, edits)):
        check(not edit.applied, "evaluate_edits needs the edits un-applied")
        plan = _plan(model, setup, config, None)
        found = down_proj_deltas(model, edit) if plan.noise is None else None
        if found is None:
            out[i] = evaluate_edit(model, setup, edit, config, keep_points=max(keep_points, len(edits)))
            continue
        plans[i], deltas[i] = plan, found
        together.append(i)
    if together:
        kept, befores = [], {}
        for i in together:
            before, essence_before, point_kept = _before(model, plans[i], points=max(keep_points, len(together)))
            befores[i] = (before, essence_before)
            kept += point_kept
        lowest = min(min(deltas[i]) for i in together)
        start = (lowest, kept) if lowest and kept else None

        def after_pass(part: str) -> list[list[torch.Tensor]]:
            """Every point's prompts, or every point's essence texts, in one pass (two passes, not
            one: a prompt row padded to an essence text's 100 tokens would cost 8x its own length)."""
            queries, groups = [], []
            for g, i in enumerate(together):
                queries += getattr(plans[i], part)
                groups += [g] * len(getattr(plans[i], part))
            if not queries:
                return [[] for _ in together]
            scores = token_logprobs(model, queries, groups=groups, start=start,
                                    row_edits=lambda row_groups: row_delta_edits(model, [deltas[i] for i in together],
                                                                                 row_groups))
            out, at = [], 0
            for i in together:
                n = len(getattr(plans[i], part))
                out.append(scores[at: at + n])
                at += n
            return out

        for i, after, essence_after in zip(together, after_pass("queries"), after_pass("essence")):
            before, essence_before = befores[i]
            out[i] = _scores(model, plans[i], config, before, after, essence_before, essence_after)
    return out


def _scores(model, plan: _Scoring, config: MetricsConfig, before, after, essence_before, essence_after) -> EditScores:
    setup, noise, paper_code, essence = plan.setup, plan.noise, plan.paper_code, plan.essence

    def prob(logp: torch.Tensor) -> float:
        return float((logp.sum() if paper_code else logp[0]).exp())

    rows = [PromptRow(*label, p_before=prob(b), p_after=prob(a), logprob_before=float(b.mean()),
                      logprob_after=float(a.mean())) for label, b, a in zip(plan.labels, before, after)]
    ppl = text_perplexity if config.essence_perplexity == "per-text" else None
    ppl_b = ppl_a = None
    if essence:
        if ppl is not None:
            ppl_b = float(np.mean([ppl(x.tolist()) for x in essence_before]))
            ppl_a = float(np.mean([ppl(x.tolist()) for x in essence_after]))
        else:
            ppl_b, ppl_a = perplexity(torch.cat(essence_before).tolist()), perplexity(torch.cat(essence_after).tolist())
    if paper_code:
        scores = paper_code_point_scores(rows, minimize=setup.request.minimize, ppl_before=ppl_b, ppl_after=ppl_a)
    else:
        scores = compute_scores(_by_kind(rows, "p_before"), _by_kind(rows, "p_after"), minimize=setup.request.minimize,
                                toward_true=setup.toward_true, ppl_before=ppl_b, ppl_after=ppl_a)
    texts = [model.tokenizer.decode(r, skip_special_tokens=True) for r in plan.essence_rows]
    notes = setup.notes
    if noise is not None:
        notes += ((f"scored under the subject noise ({noise.convention}); neighbourhood prompts (other subjects) "
                   f"clean; essence texts {'noised' if plan.essence_noised else 'clean'}"),)
    return EditScores(scores, rows, texts, ppl_b if ppl_b is not None else math.nan,
                      ppl_a if ppl_a is not None else math.nan, scoring=SCORING_RULES[config.scoring], notes=notes)


_BASELINE = "baseline_logprobs"  # the memo table of a model inside ``baseline_cached``
_BASELINE_ENTRIES = 64


@contextlib.contextmanager
def baseline_cached(model):
    """Reuse each point's "before" pass inside this block (a sweep edits one point at up to
    dozens of layers and methods, all scored against the same unedited model).

    The caller promises that the weights are the original ones whenever an edit is evaluated
    in the block, as a sweep that undoes each edit guarantees.
    """
    from tracekit.memo import drop_memo

    outer = peek_memo(model, _BASELINE) is not None
    model_memo(model, _BASELINE)
    try:
        yield
    finally:
        if not outer:
            drop_memo(model, _BASELINE)
            drop_memo(model, _KEPT)


def _noise_key(noise) -> tuple | None:
    if noise is None:
        return None
    return (noise.convention, noise.scale.scale, noise.seed, noise.prompt_span, _tensor_digest(noise.draw))


_KEPT = "baseline_block_inputs"  # block inputs of the latest "before" passes inside ``baseline_cached``
_KEPT_ENTRIES = 4  # passes kept at least (~60 MB each on SmolLM2: a point's prompts or essence texts x 30 layers)


def _cached_pass(model, queries: Sequence[Query], noise, essence: bool = False, row_spans=None,
                 kept_passes: int = _KEPT_ENTRIES):
    """(before scores, kept block inputs or None): the "before" pass, run once per point inside
    ``baseline_cached``, which holds the block inputs of the latest ``kept_passes`` passes. Block
    inputs are kept only for noise-free passes."""
    if not queries:
        return [], None
    clean = noise is None and row_spans is None

    def run():
        if clean:
            return token_logprobs_kept(model, queries)
        scores = _essence_pass(model, list(queries), noise) if essence else \
            token_logprobs(model, queries, noise=noise, row_spans=row_spans)
        return scores, None

    cache = peek_memo(model, _BASELINE)
    if cache is None:
        return run()
    key = (essence, tuple((q.prefix, q.continuation, q.span) for q in queries), _noise_key(noise),
           None if row_spans is None else tuple(row_spans))
    kept = model_memo(model, _KEPT)
    if key not in cache:
        cache[key], kept[key] = run()
        for table, limit in ((cache, _BASELINE_ENTRIES), (kept, kept_passes)):
            while len(table) > limit:
                table.pop(next(iter(table)))  # oldest first: a sweep moves on point by point
    return cache[key], kept.get(key)


def _tensor_digest(value: torch.Tensor | None) -> str | None:
    if value is None:
        return None
    return hashlib.sha1(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _by_kind(rows: Sequence[PromptRow], field_name: str) -> dict[str, KindProbs]:
    out = {}
    for kind in ("rewrite", "paraphrase", "neighborhood"):
        values = {role: tuple(getattr(r, field_name) for r in rows if r.kind == kind and r.role == role)
                  for role in ("target", "true", "counter")}
        out[kind] = KindProbs(values["target"], values["true"] or None, values["counter"] or None)
    return out
