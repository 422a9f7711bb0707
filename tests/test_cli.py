"""The command line: building it imports nothing heavy, every option explains itself, the
parsers' lists agree with the library's, and ``python -m tracekit`` works."""

import argparse
import subprocess
import sys

import pytest

from tracekit.cli import build_parser, main


def test_the_cli_and_the_package_import_without_torch():
    """`tracekit --help` took 10-11 s of CPU when importing the CLI pulled in every transformers
    model class; the time itself is measured in benchmarks/import_time.py."""
    code = ("import sys, tracekit, tracekit.cli; tracekit.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'nnsight', 'transformer_lens') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _parsers(parser, path=("tracekit",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_command_and_option_has_help():
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                missing += [" ".join(path + (name,)) for name in action.choices if name not in helped]
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_the_parsers_lists_agree_with_the_library():
    from tracekit.adapters import BACKENDS
    from tracekit.cli import common, demo, editing, tracing
    from tracekit.editing.api import METHODS
    from tracekit.editing.problems import problem_names
    from tracekit.editing.subject_noise import CONVENTIONS
    from tracekit.tracing.plan import KINDS

    assert common.BACKENDS == BACKENDS and tracing.KINDS == KINDS
    assert editing.METHODS == demo.METHODS == METHODS and editing.PROBLEMS == tuple(problem_names())
    assert editing.CONVENTIONS == CONVENTIONS


def test_python_dash_m_tracekit():
    out = subprocess.run([sys.executable, "-m", "tracekit", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "trace" in out.stdout


def test_models_marks_what_runs_here(capsys):
    import torch

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "runs here" in out
    if not torch.cuda.is_available():
        gptj = next(line for line in out.splitlines() if "random:gpt-j-6b" in line)
        assert gptj.rstrip(" │").endswith("no")


@pytest.mark.parametrize("argv", [["predict", "--help"], ["trace", "--help"], ["edit", "--help"]])
def test_prompt_options_read_the_same(capsys, argv):
    with pytest.raises(SystemExit):
        main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "--prompt PROMPT the prompt, e.g." in text


QUIET = """
import tracekit
from tracekit.editing.api import edit
from tracekit.editing.metrics import MetricsConfig
for backend in ("hf", "nnsight"):
    model = tracekit.load_model("random:gpt2-tiny", backend=backend, device="cpu")
    model.top_tokens("The Eiffel Tower is")
model = tracekit.load_model("random:llama-tiny", device="cpu")
record = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
          "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
          "locality_prompt": "Michel Rocard speaks", "locality_ground_truth": "French"}
edit(model, record, method="ft-1", layer=1,  # scoring runs padded batches
     metrics=MetricsConfig(essence_samples=2, essence_new_tokens=4))
"""


def test_stderr_stays_quiet(tmp_path):
    """No transformers bos/eos or attention-mask warnings, no nnsight deprecation warning."""
    env = {**__import__("os").environ, "TRACEKIT_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-W", "default", "-c", QUIET], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stderr == "", run.stderr
