"""``FactRecord``: the one normalised fact every loader returns, and record-level checks.

Every dataset (CounterFact, known_1000, zsRE, EasyEdit's CounterFact) becomes a list of
``FactRecord``. Targets carry their leading space (" English"), exactly as the model sees
the object after the prompt, so ``model.target_probs(record.text, record.target_true)``
is the paper's p(o_true | s, r).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tracekit.errors import TracekitError


@dataclass(frozen=True)
class FactRecord:
    case_id: int
    prompt: str  # template with "{}" where the subject goes: "The mother tongue of {} is"
    subject: str
    target_true: str  # " French" (o_true)
    target_new: str | None  # " English" (o_false); None where the dataset has none (known_1000)
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    relation_id: str = ""
    source: str = ""  # dataset name: "counterfact", "known_1000", "zsre", "counterfact-easyedit"
    # What neighbourhood prompts should complete with. None: target_true (CounterFact's
    # neighbours share the true object); zsRE and EasyEdit give their own answer.
    neighborhood_target: str | None = None

    @property
    def text(self) -> str:
        """The filled-in prompt: (s, r)."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def neighborhood_answer(self) -> str:
        return self.neighborhood_target if self.neighborhood_target is not None else self.target_true


def with_space(text: str) -> str:
    """Objects are scored as a continuation of the prompt: " Paris", not "Paris"."""
    return text if text.startswith(" ") else " " + text


class RecordReader:
    """Pulls typed fields out of one raw JSON record; any problem names the index and field."""

    def __init__(self, source: str, path, index: int, raw: Any):
        self.source, self.path, self.index, self.raw = source, path, index, raw
        if not isinstance(raw, dict):
            self.fail("", f"is a {type(raw).__name__}, not a JSON object")

    def fail(self, field: str, problem: str):
        where = f"field '{field}' " if field else ""
        raise TracekitError(f"{self.source} record {self.index} in {self.path}: {where}{problem}; "
                            f"fix or remove that record")

    def get(self, field: str, kind: type | tuple = str, *, required: bool = True, nonempty: bool = True):
        """A (dotted) field such as "requested_rewrite.target_new.str", checked for type."""
        value: Any = self.raw
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                if required:
                    self.fail(field, "is missing")
                return None
            value = value[part]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(field, f"must be {names}, got {type(value).__name__}")
        if nonempty and isinstance(value, str) and value.strip() == "":
            self.fail(field, "is empty")
        return value

    def strings(self, field: str, *, required: bool = True, min_items: int = 1) -> tuple[str, ...]:
        """A list of non-empty strings (a lone string counts as a list of one)."""
        value = self.get(field, (list, str), required=required)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if len(items) < min_items:
            self.fail(field, f"needs at least {min_items} item(s), has {len(items)}")
        for j, item in enumerate(items):
            if not isinstance(item, str) or item.strip() == "":
                self.fail(f"{field}[{j}]", "must be a non-empty string")
        return tuple(items)

    def template(self, field: str, subject: str, text: str | None = None) -> str:
        """A "{}" template: given directly, or made from ``text`` by replacing the subject's first occurrence."""
        if text is None:
            text = self.get(field)
            if "{}" in text:
                return text
        at = text.find(subject)
        if at < 0:  # zsRE questions sometimes capitalise differently
            at = text.lower().find(subject.lower())
        if at < 0:
            self.fail(field, f"does not contain the subject {subject!r}")
        return text[:at] + "{}" + text[at + len(subject):]
