"""User-facing errors: one line that says what is wrong and how to fix it."""


class TracekitError(ValueError):
    """Bad input or environment. The CLI prints the message alone, without a traceback."""


class SubjectWarning(UserWarning):
    """The subject's place in a prompt is ambiguous (it occurs twice, or inside a longer word)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise TracekitError(message)
