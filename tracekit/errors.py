"""User-facing errors: one line that says what is wrong and how to fix it."""


class TracekitError(ValueError):
    """Bad input or environment. The CLI prints the message alone, without a traceback."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise TracekitError(message)
