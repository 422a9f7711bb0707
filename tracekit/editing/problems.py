"""The paper's five editing problems, as values: each turns a fact into an edit and its scoring.

| problem            | edit target | objective       | noise on the subject       |
| error-injection    | o_false     | raise p(target) | no                         |
| tracing-reversal   | o_noise     | raise p(target) | no (o_noise is found with it) |
| fact-erasure       | o_true      | lower p(o_true) | no; needs p(o_true) >= 0.02 |
| fact-amplification | o_true      | raise p(o_true) | no                         |
| fact-forcing       | o_true      | raise p(o_true) | yes, in the edit AND the evaluation |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

import torch

from tracekit.data.loaders import parse_counterfact
from tracekit.data.records import FactRecord, RecordReader
from tracekit.editing.request import EditRequest
from tracekit.errors import TracekitError, check
from tracekit.tracing import noised_prediction, scaled_noise

ERASURE_MIN_P = 0.02  # the paper edits only points the model already half-knows
NOISED_SAMPLES = 10  # noise draws averaged to find o_noise (as ROME's tracing)


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
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def target(self) -> str:
        return self.request.target

    @property
    def toward_true(self) -> bool:
        return self.problem is not None and self.problem.toward_true


def prepare(model, record, problem: str | Problem, seed: int = 0, noise="s3") -> EditSetup:
    """Turn a fact record into the edit request and evaluation targets of ``problem``.

    Raises ``PointSkipped`` where the fact does not qualify (Fact Erasure with
    p(o_true) < 0.02; Tracing Reversal whose noised prediction is o_true itself).
    """
    problem = Problem.parse(problem)
    fact = as_fact_record(record)
    o_true, o_false = fact.target_true, fact.target_new
    check(bool(o_true and o_true.strip()), f"{problem.value} needs the true object of {fact.text!r}")
    template, subject = fact.prompt, fact.subject
    common = dict(o_true=o_true, neighbour_true=fact.neighborhood_answer,
                  paraphrases=fact.paraphrase_prompts, neighbours=fact.neighborhood_prompts)
    if problem is Problem.ERROR_INJECTION:
        check(bool(o_false and o_false.strip()), f"error-injection needs a false target (o_false) for {fact.text!r}")
        _check_differs(model, o_false, o_true)
        return EditSetup(problem, EditRequest(template, subject, o_false), counter=o_false, **common)
    if problem is Problem.TRACING_REVERSAL:
        found = noised_prediction(model, fact.text, subject, noise=noise, samples=NOISED_SAMPLES, seed=seed)
        if found.token_id == model.target_ids(o_true)[0]:
            raise PointSkipped(f"tracing-reversal: the noised run still predicts o_true {o_true!r}; nothing to reverse")
        if model.target_ids(found.token)[0] != found.token_id:  # a byte fragment that text cannot carry
            raise PointSkipped(f"tracing-reversal: o_noise token {found.token_id} does not survive decoding ({found.token!r})")
        note = (f"o_noise = {found.token!r} (p = {found.p:.3f} averaged over {NOISED_SAMPLES} noised runs, "
                f"noise {noise}, seed {seed})")
        return EditSetup(problem, EditRequest(template, subject, found.token), counter=found.token,
                         notes=(note,), **common)
    if problem is Problem.FACT_ERASURE:
        p_true = float(model.target_probs([fact.text], o_true)[0])
        if p_true < ERASURE_MIN_P:
            raise PointSkipped(f"fact-erasure needs p(o_true) >= {ERASURE_MIN_P}; p({o_true!r}) = {p_true:.4f}")
        return EditSetup(problem, EditRequest(template, subject, o_true, minimize=True), counter=o_false, **common)
    if problem is Problem.FACT_AMPLIFICATION:
        return EditSetup(problem, EditRequest(template, subject, o_true), counter=o_false, **common)
    paraphrases = [p for p in fact.paraphrase_prompts if subject in p]
    noise_tensor = subject_noise(model, fact.text, subject, seed=seed, noise=noise, also=paraphrases)
    note = f"subject noised (rule {noise}, seed {seed}) in the edit and in every scored prompt that contains it"
    return EditSetup(problem, EditRequest(template, subject, o_true, noise=noise_tensor), counter=o_false,
                     notes=(note,), **common)


def setup_from_request(request: EditRequest) -> EditSetup:
    """Score a bare request on its own prompt only (no problem, so no comparison objects)."""
    return EditSetup(None, request, None, None)


def _check_differs(model, target: str, o_true: str) -> None:
    check(target.strip() != "", "empty target")
    same = target.strip() == o_true.strip() or model.target_ids(target)[0] == model.target_ids(o_true)[0]
    check(not same, f"target {target!r} is the true object {o_true!r} (same first token): nothing to inject")


def subject_noise(model, prompt: str, subject: str, seed: int = 0, noise="s3", also: Sequence[str] = ()) -> torch.Tensor:
    """One scaled draw of the tracer's subject noise for ``prompt``: [n_subject_tokens, d_model].

    The subject can tokenise into more pieces elsewhere (a paraphrase, " " + subject inside a
    context template): the draw then covers the longest of these, and every user aligns its rows
    to the END of the subject, so each prompt's whole subject is noised with the same last rows.
    """
    start, end = model.subject_span(prompt, subject)
    longest = max([end - start, len(model.target_ids(" " + subject.strip())), len(model.target_ids(subject))]
                  + [b - a for a, b in (model.subject_span(p, subject) for p in also)])
    return scaled_noise(model, 1, longest, noise, seed)[0]


def problem_names() -> Sequence[str]:
    return [p.value for p in Problem]
