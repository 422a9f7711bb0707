"""Bad input is a one-line error, never a traceback; an ambiguous subject warns and can be chosen."""

import warnings

import pytest
import torch

from conftest import tiny
from tracekit import TracekitError, load_model
from tracekit.cli import main
from tracekit.editing.api import edit
from tracekit.editing.request import EditRequest
from tracekit.errors import SubjectWarning
from tracekit.tracing import trace

SPEC = "random:gpt2-tiny"


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith("error:") and "Traceback" not in out, out
    return " ".join(out.split())


# ---- loading ----------------------------------------------------------------------------
def test_an_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(TracekitError, match="holds no Hugging Face model") as err:
        load_model(str(tmp_path))  # today: "install sentencepiece"
    one_line(err)


@pytest.mark.parametrize("content, message", [(b"not a gguf file at all" * 50, "is not a GGUF file"),
                                              (b"GGUF" + bytes(range(256)) * 8, "could not read the GGUF model")])
def test_a_corrupt_gguf_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(TracekitError, match=message) as err:
        load_model(str(path))
    one_line(err)


@pytest.mark.parametrize("device, message", [("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"),
                                             ("meta", "not supported")])
def test_unknown_devices(device, message):
    with pytest.raises(TracekitError, match=message) as err:
        load_model(SPEC, device=device)
    one_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    assert "no CUDA GPU is available here" in cli_error(
        capsys, ["predict", "--model", SPEC, "--device", "cuda", "--prompt", "The Eiffel Tower is"])


# ---- prompts, targets, k ----------------------------------------------------------------
def test_predict_k_larger_than_the_vocabulary(capsys):
    assert "k must be an integer from 1 to the vocabulary size 512" in cli_error(
        capsys, ["predict", "--model", SPEC, "-k", "100000", "--prompt", "The Eiffel Tower is"])


def test_top_tokens_given_a_list():
    with pytest.raises(TracekitError, match="takes one prompt") as err:
        tiny(SPEC).top_tokens(["The Eiffel Tower is", "Paris is"])
    one_line(err)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=None), "target must be a string"),
    (dict(subject=3), "subject must be a string"),
    (dict(prompt="{} and {} are"), "exactly one '{}'"),
    (dict(prompt="The {0} of {} is"), "braces other than"),
    (dict(prompt=None), "must be a string"),
    (dict(minimize="yes"), "minimize must be True or False"),
])
def test_edit_request_checks(kwargs, message):
    fields = {**dict(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target=" English"), **kwargs}
    with pytest.raises(TracekitError, match=message) as err:
        EditRequest(**fields)
    one_line(err)


def test_cli_edit_prompt_with_two_braces(capsys):
    assert "exactly one '{}'" in cli_error(capsys, [
        "edit", "--model", SPEC, "--prompt", "{} speaks {}", "--subject", "Danielle Darrieux", "--target", " English"])


def test_a_flat_easyedit_record_is_read_as_easyedit_not_counterfact():
    record = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
              "target_new": "English", "ground_truth": "French",
              "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
              "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    result = edit(tiny(SPEC), record, method="ft-1", layer=1, evaluate=False)
    assert (result.request.prompt, result.request.target, result.setup.o_true) == (
        "The mother tongue of {} is", " English", " French")
    assert result.setup.paraphrases == (record["rephrase_prompt"],)


def test_a_dict_in_no_known_format():
    with pytest.raises(TracekitError, match="in no known format") as err:
        edit(tiny(SPEC), {"question": "?"}, method="ft-1", layer=1, evaluate=False)
    one_line(err)


# ---- the subject's place ------------------------------------------------------------------
def test_a_subject_inside_a_longer_word_warns():
    with pytest.warns(SubjectWarning, match="inside the longer word 'Parisian'"):
        trace(tiny(SPEC), "The Parisian cafe is in the city of", "Paris", window=2, samples=2)


def test_a_subject_that_occurs_twice_warns_and_can_be_chosen():
    model, prompt = tiny(SPEC), "Paris is a city. The capital of France is Paris, in the city of"
    with pytest.warns(SubjectWarning, match="occurs 2 times"):
        first = trace(model, prompt, "Paris", window=2, samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = trace(model, prompt, "Paris", window=2, samples=2, occurrence=1)
        last = model.subject_span(prompt, "Paris", occurrence=-1)
    assert first.subject_span[0] == 0 and second.subject_span == last and last[0] > first.subject_span[1]
    with pytest.raises(TracekitError, match="occurrence 2 does not exist"):
        model.subject_span(prompt, "Paris", occurrence=2)


def test_a_whole_word_subject_is_preferred_over_a_longer_word():
    model = tiny(SPEC)
    with pytest.warns(SubjectWarning):
        start, end = model.subject_span("The Parisian cafe is in Paris", "Paris")
    assert model.tokenizer.decode(model.encode("The Parisian cafe is in Paris").input_ids[0, start:end]).strip() == "Paris"
    assert start > 2


def test_cli_trace_and_edit_take_the_prompt_the_same_way(capsys, tmp_path):
    common = ["--model", SPEC, "--subject", "The Eiffel Tower"]
    for prompt in ("The Eiffel Tower is located in the city of", "{} is located in the city of"):
        assert main(["trace", "--prompt", prompt, "--window", "2", "--samples", "2", *common]) == 0
        assert main(["predict", "--prompt", prompt, *common]) == 0
        assert main(["edit", "--prompt", prompt, "--target", " Rome", "--method", "ft-1", "--layer", "1",
                     "--no-essence", *common]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("'The Eiffel Tower is located in the city of' -> ' Rome'") == 2, out
