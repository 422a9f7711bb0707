"""``EditRequest``: what one edit asks of the model, independent of the method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit.errors import check


@dataclass(frozen=True)
class EditRequest:
    """Make the model complete ``prompt.format(subject)`` with ``target`` (or stop it, if ``minimize``).

    ``noise`` (Fact Forcing): a scaled noise tensor [n_subject_tokens, d_model] added to the
    subject's token embeddings whenever an editor or a metric runs a prompt containing the
    subject, so the edit is made, and scored, on the noised subject.
    """

    prompt: str  # a template with "{}" where the subject goes
    subject: str
    target: str  # with its leading space: " English"
    minimize: bool = False  # Fact Erasure: lower p(target) instead of raising it
    noise: torch.Tensor | None = None

    def __post_init__(self):
        check("{}" in self.prompt, f"prompt template {self.prompt!r} needs a '{{}}' where the subject goes")
        check(self.subject.strip() != "", "empty subject")
        check(self.target.strip() != "", "empty target")

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)
