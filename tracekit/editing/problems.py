"""The paper's five editing problems, as values: each turns a fact into an edit and its scoring.

| problem            | edit target | objective       | noise on the subject       |
| error-injection    | o_false     | raise p(target) | no                         |
| tracing-reversal   | o_noise     | raise p(target) | no (o_noise is found with it) |
| fact-erasure       | o_true      | lower p(o_true) | no; needs p(o_true) >= 0.02 |
| fact-amplification | o_true      | raise p(o_true) | no                         |
| fact-forcing       | o_true      | raise p(o_true) | yes, in the edit AND the evaluation |

``convention="paper-code"`` (default) follows google/belief-localization's ``evaluate.py``:
o_noise is the continuation sampled (top-k 5, to 12 tokens in all) from one noised run of the
prompt, Fact Erasure keeps points whose whole o_true has probability > 0.02, Fact Forcing's
noise is the paper code's (``subject_noise``), and each problem names the paper's
``request_baseline`` (the object the unscaled metrics compare with). ``"tracekit"``: o_noise is
the noised runs' top next token (10 draws averaged), Fact Erasure tests p(first token of
o_true) >= 0.02, and the noise is one seeded draw (docs/fidelity.md has the measured effects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

import torch

from tracekit.data.loaders import parse_counterfact
from tracekit.data.records import FactRecord, RecordReader
from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.editing.request import EditRequest
from tracekit.editing.subject_noise import PAPER_SEED, SubjectNoise, check_convention, make_subject_noise
from tracekit.errors import TracekitError, check
from tracekit.tracing import noised_prediction
from tracekit.tracing.noise import NumpyStream, noise_scale_info, spans_noise_hook

ERASURE_MIN_P = 0.02  # the paper edits only points the model already half-knows
NOISED_SAMPLES = 10  # noise draws averaged to find o_noise (as ROME's tracing)
REVERSAL_MAX_TOKENS = 12  # the paper's code samples o_noise to 12 tokens, prompt included
REVERSAL_TOP_K = 5


class PointSkipped(TracekitError):
    """This fact does not qualify for this problem (a sweep records it and moves on)."""


class Problem(str, Enum):
    ERROR_INJECTION = "error-injection"
    TRACING_REVERSAL = "tracing-reversal"
    FACT_ERASURE = "fact-erasure"
    FACT_AMPLIFICATION = "fact-amplification"
    FACT_FORCING = "fact-forcing"

    @classmethod
    def parse(cls, value: "str | Problem") -> "Problem":
        if isinstance(value, Problem):
            return value
        key = str(value).strip().lower().replace("_", "-").replace(" ", "-")
        for problem in cls:
            if key == problem.value:
                return problem
        raise TracekitError(f"unknown editing problem {value!r}; choose one of {', '.join(p.value for p in cls)}")

    @property
    def minimize(self) -> bool:
        return self is Problem.FACT_ERASURE

    @property
    def noised(self) -> bool:
        return self is Problem.FACT_FORCING

    @property
    def toward_true(self) -> bool:
        """Does the edit push the model toward o_true (rather than away from it)?"""
        return self in (Problem.FACT_AMPLIFICATION, Problem.FACT_FORCING)


def as_fact_record(value) -> FactRecord:
    """A ``tracekit.data.FactRecord``, or a raw record in ROME's CounterFact format."""
    if isinstance(value, FactRecord):
        return value
    if isinstance(value, Mapping):
        return parse_counterfact(RecordReader("counterfact", "the given record", 0, dict(value)))
    raise TracekitError(f"expected a FactRecord, a CounterFact record or an EditRequest, got {type(value).__name__}")


@dataclass(frozen=True)
class EditSetup:
    """What to edit and how to score it, for one fact under one problem."""

    problem: Problem | None  # None: a bare EditRequest was given
    request: EditRequest
    o_true: str | None  # the fact's true object
    counter: str | None  # the object competing with o_true in Meng et al.'s unscaled metrics
    neighbour_true: str | None = None  # what the neighbourhood prompts should keep (default o_true)
    baseline: str | None = None  # the paper code's request_baseline: compared with the target when scoring
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    convention: str | None = None  # "paper-code" or "tracekit": how o_noise, the 0.02 test and the noise were chosen
    noise: dict = field(default_factory=dict)  # the noise behind o_noise (Tracing Reversal) or on the subject (Fact Forcing)

    @property
    def target(self) -> str:
        return self.request.target

    @property
    def toward_true(self) -> bool:
        return self.problem is not None and self.problem.toward_true


def prepare(model, record, problem: "str | Problem", seed: int = 0, noise="s3", convention: str = "paper-code",
            noised_rows: int = 1) -> EditSetup:
    """Turn a fact record into the edit request and evaluation targets of ``problem``.

    Raises ``PointSkipped`` where the fact does not qualify (Fact Erasure with p(o_true) below
    0.02; under the tracekit convention, Tracing Reversal whose noised prediction is o_true).
    ``noised_rows``: noised copies of the prompt behind Fact Forcing's o_noise (the paper's code:
    10 for FT, 1 for ROME and MEMIT).
    """
    problem = Problem.parse(problem)
    check_convention(convention)
    fact = as_fact_record(record)
    o_true, o_false = fact.target_true, fact.target_new
    check(bool(o_true and o_true.strip()), f"{problem.value} needs the true object of {fact.text!r}")
    template, subject = fact.prompt, fact.subject
    common = dict(o_true=o_true, neighbour_true=fact.neighborhood_answer,
                  paraphrases=fact.paraphrase_prompts, neighbours=fact.neighborhood_prompts, convention=convention)
    # The paper code's request_baseline, as its scorer reads it: it scores " " + the string, so a
    # string that already starts with a space (Fact Forcing's decoded token) gets two.
    eos = " " + model.tokenizer.eos_token
    if problem is Problem.ERROR_INJECTION:
        check(bool(o_false and o_false.strip()), f"error-injection needs a false target (o_false) for {fact.text!r}")
        _check_differs(model, o_false, o_true)
        return EditSetup(problem, EditRequest(template, subject, o_false), counter=o_false, baseline=o_true, **common)
    if problem is Problem.TRACING_REVERSAL:
        if convention == "paper-code":
            stream = make_subject_noise(model, fact.text, subject, noise, seed, "paper-code")
            target = noised_continuation(model, fact.text, subject, stream, seed=seed)
            note = (f"o_noise = {target!r}: sampled (top-k {REVERSAL_TOP_K}, to {REVERSAL_MAX_TOKENS} tokens) from one "
                    f"noised run ({stream.scale.rule}, scale {stream.scale.scale:.4g}), seed {seed}")
            used = stream.as_dict()
        else:
            found = noised_prediction(model, fact.text, subject, noise=noise, samples=NOISED_SAMPLES, seed=seed)
            if found.token_id == model.target_ids(o_true)[0]:
                raise PointSkipped(f"tracing-reversal: the noised run still predicts o_true {o_true!r}; nothing to reverse")
            if model.target_ids(found.token)[0] != found.token_id:  # a byte fragment that text cannot carry
                raise PointSkipped(f"tracing-reversal: o_noise token {found.token_id} does not survive decoding ({found.token!r})")
            target = found.token
            note = (f"o_noise = {found.token!r} (p = {found.p:.3f} averaged over {NOISED_SAMPLES} noised runs, "
                    f"noise {noise}, seed {seed})")
            used = {"noise_convention": "tracekit", **noise_scale_info(model, noise).as_dict(), "noise_seed": seed}
        return EditSetup(problem, EditRequest(template, subject, target), counter=target, baseline=o_true,
                         notes=(note,), noise=used, **common)
    if problem is Problem.FACT_ERASURE:
        if convention == "paper-code":  # the paper's code: the whole object's probability, strictly above
            p_true = float(model.sequence_logprobs([fact.text], [o_true])[0].exp())
            qualifies = p_true > ERASURE_MIN_P
        else:
            p_true = float(model.target_probs([fact.text], o_true)[0])
            qualifies = p_true >= ERASURE_MIN_P
        if not qualifies:
            raise PointSkipped(f"fact-erasure needs p(o_true) >= {ERASURE_MIN_P}; p({o_true!r}) = {p_true:.4f}")
        return EditSetup(problem, EditRequest(template, subject, o_true, minimize=True), counter=o_false,
                         baseline=eos, **common)
    if problem is Problem.FACT_AMPLIFICATION:
        return EditSetup(problem, EditRequest(template, subject, o_true), counter=o_false, baseline=eos, **common)
    paraphrases = [p for p in fact.paraphrase_prompts if subject in p]
    noise_info = subject_noise(model, fact.text, subject, seed=seed, noise=noise, also=paraphrases, convention=convention)
    o_noise = noised_token(model, fact.text, subject, noise_info, noised_rows) if convention == "paper-code" else None
    baseline = None if o_noise is None else " " + o_noise  # the code decodes the token (with its space)
    note = (f"subject noised ({noise_info.convention} convention, {noise_info.scale.rule} = {noise_info.scale.scale:.4g}) "
            "in the edit and in every scored prompt that contains it")
    return EditSetup(problem, EditRequest(template, subject, o_true, noise=noise_info),
                     counter=o_noise if o_noise is not None else o_false, baseline=baseline, notes=(note,),
                     noise=noise_info.as_dict(), **common)


def setup_from_request(request: EditRequest) -> EditSetup:
    """Score a bare request on its own prompt only (no problem, so no comparison objects)."""
    return EditSetup(None, request, None, None)


def _check_differs(model, target: str, o_true: str) -> None:
    check(target.strip() != "", "empty target")
    same = target.strip() == o_true.strip() or model.target_ids(target)[0] == model.target_ids(o_true)[0]
    check(not same, f"target {target!r} is the true object {o_true!r} (same first token): nothing to inject")


def subject_noise(model, prompt: str, subject: str, seed: int = 0, noise="s3", also: Sequence[str] = (),
                  convention: str = "paper-code") -> SubjectNoise:
    """Fact Forcing's subject noise for ``prompt`` (``editing.subject_noise`` describes the conventions;
    ``also``: other prompts scored under it, whose subject tokenisation the tracekit draw must cover)."""
    return make_subject_noise(model, prompt, subject, noise, seed, convention, also)


def noised_token(model, prompt: str, subject: str, noise: SubjectNoise, rows: int = 1) -> str:
    """The paper code's o_noise for Fact Forcing (``corrupted_forward_pass``): the top next token
    of ``rows`` noised copies of the prompt, probabilities averaged, one draw from a new stream."""
    start, end = model.subject_span(prompt, subject)
    draws = NumpyStream(1.0, model.d_model, PAPER_SEED + noise.seed).draw(rows, end - start)
    found = noised_prediction(model, prompt, subject, noise=noise.scale.scale, noise_draws=draws.float())
    return found.token


@torch.no_grad()
def noised_continuation(model, prompt: str, subject: str, noise: SubjectNoise, max_tokens: int = REVERSAL_MAX_TOKENS,
                        top_k: int = REVERSAL_TOP_K, seed: int = 0) -> str:
    """The paper code's o_noise for Tracing Reversal (``generate_fast`` under the subject noise): a
    continuation of ``prompt`` sampled top-k to ``max_tokens`` tokens in all (at least one new
    token), the prompt noised by one draw of a new stream. Returns the continuation's text; the
    paper's code passes the prompt's text too, which would make the whole prompt part of the target."""
    ids = P.token_ids(model.tokenizer, prompt)
    span = model.subject_span(prompt, subject)
    spans, draws, align = noise.edit_plan(noise.source(model.d_model), [span])
    edits = {Site("embed"): spans_noise_hook(spans, draws, align)}
    generator = torch.Generator().manual_seed(int(seed))
    new: list[int] = []
    while not new or len(ids) + len(new) < max_tokens:
        row = torch.tensor([ids + new])
        logits = model.run(row, edits=edits, positions=torch.tensor([row.shape[1] - 1])).logits[0]
        probs = torch.softmax(logits.float().cpu(), dim=-1)
        top = torch.topk(probs, top_k).indices
        picked = probs[top] / probs[top].sum()
        new.append(int(top[torch.multinomial(picked, 1, generator=generator)]))
    return model.tokenizer.decode(new)


def problem_names() -> Sequence[str]:
    return [p.value for p in Problem]
