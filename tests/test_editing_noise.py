"""Subject noise: the one primitive (alignment rule), ROME's s3 scale, and noise-rule parsing."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from tracekit import TracekitError
from tracekit.cli import main
from tracekit.memo import peek_memo
from tracekit.tracing import noise as N


# ---- the primitive -----------------------------------------------------------------------------------
def test_noise_is_aligned_to_the_end_of_each_rows_subject():
    """A draw covers the longest tokenisation; a subject in fewer pieces gets the draw's LAST rows."""
    draws = torch.arange(3 * 2, dtype=torch.float32).reshape(1, 3, 2)  # rows 0, 1, 2 of a 3-token draw
    bump = N.subject_noise_bump((3, 6, 2), [(1, 4), (2, 4), None], draws)
    assert torch.equal(bump[0, 1:4], draws[0])  # all three pieces
    assert torch.equal(bump[1, 2:4], draws[0, 1:])  # two pieces: the last two rows
    assert float(bump[2].abs().sum()) == 0  # no subject: no noise
    assert float(bump[0].abs().sum() + bump[1].abs().sum()) == float(draws.sum() + draws[0, 1:].sum())  # nowhere else


def test_start_alignment_and_one_draw_per_row():
    draws = torch.randn(2, 3, 4)
    bump = N.subject_noise_bump((2, 5, 4), [(0, 2), (1, 4)], draws, align="start")
    assert torch.equal(bump[0, :2], draws[0, :2]) and torch.equal(bump[1, 1:4], draws[1])


def test_a_subject_longer_than_the_draw_is_an_error():
    with pytest.raises(TracekitError, match="noise covers only 2"):
        N.subject_noise_bump((1, 6, 4), [(0, 3)], torch.randn(1, 2, 4))
    with pytest.raises(TracekitError, match="outside a row of 6 tokens"):
        N.subject_noise_bump((1, 6, 4), [(4, 7)], torch.randn(1, 3, 4))


def test_the_tracer_hook_is_the_primitive():
    noise, hidden = torch.randn(2, 3, 4), torch.randn(2, 7, 4)
    out = N.subject_noise_hook(noise, torch.tensor([1, 3]))(hidden)
    expected = hidden.clone()
    expected[0, 1:4] += noise[0]
    expected[1, 3:6] += noise[1]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(N.subject_noise_hook(noise[:1], 2)(hidden)[:, 2:5], hidden[:, 2:5] + noise[:1])


# ---- s3 ----------------------------------------------------------------------------------------------
def test_s3_is_romes_collect_embedding_std_on_the_given_subjects():
    """Every token of every subject, each encoded on its own (no leading space), repeats counted."""
    model = tiny("random:gpt2-tiny")
    subjects = ["Paris", "Paris", "The Eiffel Tower"]
    ids = [i for s in subjects for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]]
    rows = model.hf.get_input_embeddings().weight[torch.tensor(ids)].double()
    assert N.embedding_std(model, subjects) == pytest.approx(float(rows.std()), rel=1e-9)


def test_s3_reads_known_1000_from_the_data_folder(tmp_path, monkeypatch):
    records = [{"known_id": i, "subject": s, "attribute": "x", "template": "{} is", "prediction": "",
                "prompt": f"{s} is", "relation_id": "P1"} for i, s in enumerate(["Kyoto", "Paris", "Kyoto"])]
    (tmp_path / "known_1000.json").write_text(json.dumps(records))
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path))
    model = tiny("random:llama-tiny")
    info = N.noise_scale_info(model, "s3")
    assert info.subjects.startswith("known_1000") and "3 subjects" in info.subjects
    assert info.scale == pytest.approx(3 * N.embedding_std(model, ["Kyoto", "Paris", "Kyoto"]), rel=1e-12)
    assert peek_memo(model, "embedding_std") is not None and not any(k.startswith("_") for k in vars(model))


def test_s3_falls_back_to_built_in_subjects_with_a_warning(tmp_path, monkeypatch):
    from tracekit.data import locate
    from tracekit.memo import drop_memo

    monkeypatch.setattr(locate, "search_folders", lambda path=None: [tmp_path])  # no known_1000 anywhere
    model = tiny("random:gptj-tiny")
    drop_memo(model, "embedding_std")
    with pytest.warns(UserWarning, match="fallback"):
        info = N.noise_scale_info(model, "s2")
    assert info.subjects.startswith("fallback") and info.scale == pytest.approx(
        2 * N.embedding_std(model, N.FALLBACK_SUBJECTS))


# ---- rules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["inf", "nan", "-1", "0", "s-3", "sinf", "snan", "u0", "uinf", float("inf"), -2.0])
def test_bad_noise_rules_are_one_line_errors(rule):
    with pytest.raises(TracekitError, match="finite, positive|unknown noise rule"):
        N.NoiseRule.parse(rule)


@pytest.mark.parametrize("command", ["edit", "trace"])
def test_noise_inf_on_the_command_line_is_a_one_line_error(command, capsys):
    argv = {"edit": ["edit", "--model", "random:gpt2-tiny", "--prompt", "{} is in", "--subject", "Paris",
                     "--target", " Rome", "--noise", "inf"],
            "trace": ["trace", "--model", "random:gpt2-tiny", "--prompt", "Paris is in", "--subject", "Paris",
                      "--window", "1", "--noise", "inf"]}[command]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage error
        code = stop.code
    assert code not in (0, None)
    captured = capsys.readouterr()
    message = [line for line in (captured.err + captured.out).splitlines() if "finite, positive" in line]
    assert len(message) == 1 and "nan" not in captured.out


def test_paper_code_stream_restarts_for_every_use():
    stream = N.NumpyStream(0.5, 4, seed=1)
    first, second = stream.draw(2, 3), stream.draw(2, 3)
    rng = np.random.RandomState(1)
    torch.testing.assert_close(first, torch.from_numpy(rng.randn(2, 3, 4)) * 0.5)
    torch.testing.assert_close(second, torch.from_numpy(rng.randn(2, 3, 4)) * 0.5)
