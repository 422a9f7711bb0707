"""``EditRequest``: what one edit asks of the model, independent of the method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit.errors import TracekitError, check


def check_template(prompt, what: str = "prompt template") -> None:
    """A template with exactly one "{}" where the subject goes, and no other braces (which
    ``str.format`` would read as fields)."""
    check(isinstance(prompt, str), f"{what} must be a string, got a {type(prompt).__name__}")
    check(prompt.count("{}") == 1, f"{what} {prompt!r} needs exactly one '{{}}' where the subject goes, "
                                   f"found {prompt.count('{}')}")
    check(prompt.replace("{}", "").count("{") + prompt.replace("{}", "").count("}") == 0,
          f"{what} {prompt!r} has braces other than its one '{{}}'")


@dataclass(frozen=True)
class EditRequest:
    """Make the model complete ``prompt.format(subject)`` with ``target`` (or stop it, if ``minimize``).

    ``noise`` (Fact Forcing): a ``tracekit.editing.subject_noise.SubjectNoise`` (or a scaled noise
    tensor [n_subject_tokens, d_model], drawn once) added to the subject's token embeddings
    whenever an editor or a metric runs a prompt containing the subject, so the edit is made,
    and scored, on the noised subject.
    """

    prompt: str  # a template with "{}" where the subject goes
    subject: str
    target: str  # with its leading space: " English"
    minimize: bool = False  # Fact Erasure: lower p(target) instead of raising it
    noise: "torch.Tensor | SubjectNoise | None" = None  # noqa: F821

    def __post_init__(self):
        check_template(self.prompt)
        for name in ("subject", "target"):
            value = getattr(self, name)
            check(isinstance(value, str), f"the edit's {name} must be a string, got {value!r}")
            check(value.strip() != "", f"empty {name}")
        check(isinstance(self.minimize, bool), f"minimize must be True or False, got {self.minimize!r}")
        check(self.noise is None or isinstance(self.noise, torch.Tensor) or hasattr(self.noise, "fresh_per_pass"),
              f"noise must be a SubjectNoise, a tensor or None, got a {type(self.noise).__name__}")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    @classmethod
    def from_record(cls, record, target: str | None = None, minimize: bool = False, noise=None) -> "EditRequest":
        """A request for a ``FactRecord`` (default target: o_false, the Error Injection target)."""
        target = target if target is not None else record.target_new
        if target is None:
            raise TracekitError(f"{record.source} record {record.case_id} has no new target; pass target=")
        return cls(record.prompt, record.subject, target, minimize=minimize, noise=noise)
