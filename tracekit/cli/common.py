"""What every command shares: the console, model options, prompt options, one-line errors.

Imports here stay light (no torch, no transformers): ``tracekit --help`` builds every parser.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from tracekit.errors import TracekitError, check

console = Console()

BACKENDS = ("hf", "transformer_lens", "nnsight")  # == tracekit.adapters.BACKENDS (tested)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model / --backend / --device / --dtype / --bare-prompts, shared by every model-loading command."""
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see `tracekit models`); default: %(default)s")
    parser.add_argument("--backend", default="hf", choices=BACKENDS, help="hook backend; default: %(default)s")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16; default: %(default)s")
    parser.add_argument("--bare-prompts", action="store_true",
                        help="do not put the spec's document-start token before prompts (smollm2-135m puts "
                             "<|endoftext|> there by default: its first position is an attention sink)")


def load_from_args(args):
    from tracekit.models import load_model

    with console.status(f"loading {args.model} ({args.backend})"):
        return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                          prepend_bos=False if getattr(args, "bare_prompts", False) else None)


# ---- prompts: predict, trace and edit take them the same way ---------------------------------
PROMPT_HELP = ("the prompt, e.g. 'The Eiffel Tower is located in the city of'; with --subject it may hold {} "
               "where the subject goes: '{} is located in the city of'")


def add_prompt_args(parser: argparse.ArgumentParser, *, subject: str | None) -> None:
    """--prompt, and --subject / --occurrence where the command needs a subject (``subject`` is its help)."""
    parser.add_argument("--prompt", required=True, help=PROMPT_HELP)
    if subject is not None:
        parser.add_argument("--subject", required=True, help=subject)
        parser.add_argument("--occurrence", type=int, default=None,
                            help="which appearance of a subject that occurs more than once (0 = first, -1 = last); "
                                 "default: the first whole-word one, with a warning")


def prompt_template(prompt: str, subject: str, occurrence: int | None = None) -> str:
    """The prompt as a template with one {} where the subject goes (given as such, or made by
    putting {} at the chosen appearance of the subject in a full prompt)."""
    from tracekit.editing.request import check_template
    from tracekit.prompts import subject_occurrences

    if "{}" in prompt:
        check_template(prompt, "--prompt")
        return prompt
    starts = subject_occurrences(prompt, subject)
    check(bool(starts), f"subject {subject!r} is not in the prompt {prompt!r}; write it there, or put {{}} where it goes")
    if occurrence is None:
        from tracekit.prompts import inside_word

        whole = [at for at in starts if inside_word(prompt, subject, at) is None]
        at = (whole or starts)[0]
    else:
        try:
            at = starts[occurrence]
        except IndexError:
            raise TracekitError(f"--subject {subject!r} occurs {len(starts)} time(s) in --prompt; "
                                f"--occurrence {occurrence} does not exist") from None
    return prompt[:at] + "{}" + prompt[at + len(subject):]


def fill(template: str, subject: str) -> tuple[str, int]:
    """The full prompt, and which appearance of the subject in it is the one at {}."""
    from tracekit.prompts import subject_occurrences

    at = template.index("{}")
    text = template[:at] + subject + template[at + 2:]
    return text, subject_occurrences(text, subject).index(at)


def run_reporting_errors(fn, interrupted: str = "") -> int:
    """Run ``fn()``; bad input prints one line (no traceback) and gives exit status 2."""
    try:
        fn()
    except TracekitError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]{interrupted}")
        return 130
    return 0
