"""TraceResult / ZeroResult methods, trace_many, and the `tracekit trace` command."""

import json

import pytest
import torch
from rich.console import Console

from tracekit import TracekitError
from tracekit.cli import main
from tracekit.tracing import TraceResult, ZeroResult, result_from_json, trace, trace_many, zero_trace
from tracing_models import PROMPT, SUBJECT, one_thread, sharp  # noqa: F401


@pytest.fixture(scope="module")
def result():
    return trace(sharp("random:llama-tiny"), PROMPT, SUBJECT, " Paris", window=3, samples=2)


def test_effect_is_the_clipped_fraction_restored(result):
    expected = ((result.p_restore - result.p_noise) / abs(result.p_clean - result.p_noise)).clamp(min=0)
    assert torch.allclose(result.effect, expected)
    assert (result.effect >= 0).all()
    assert torch.equal(result.effect_by_layer("max"), result.effect.max(0).values)
    last = result.subject_span[1] - 1
    assert torch.equal(result.effect_by_layer("last_subject"), result.effect[last])
    with pytest.raises(TracekitError, match="unknown reduce"):
        result.effect_by_layer("mean")


def test_target_is_traced_and_recorded(result):
    model = sharp("random:llama-tiny")
    assert result.answer == " Paris" and result.target == " Paris"
    assert result.answer_id == model.target_ids(" Paris")[0]
    expected = float(model.target_probs([PROMPT], " Paris")[0])
    assert result.p_clean == pytest.approx(expected, abs=1e-6)


def test_last_subject_reduce_needs_the_token():
    only_first = trace(sharp("random:llama-tiny"), PROMPT, SUBJECT, window=3, samples=2, tokens=[0])
    with pytest.raises(TracekitError, match="last subject token was not traced"):
        only_first.effect_by_layer("last_subject")


def test_frame_has_one_tidy_row_per_token_and_layer(result):
    frame = result.to_frame()
    assert len(frame) == len(result.tokens) * 4
    row = frame[(frame.token_index == 1) & (frame.layer == 2)].iloc[0]
    assert row.p_restore == pytest.approx(float(result.p_restore[1, 2]))
    assert row.effect == pytest.approx(float(result.effect[1, 2]))
    assert bool(row.is_subject) and not bool(frame[frame.token_index == 5].is_subject.any())


def test_json_round_trip(result, tmp_path):
    path = tmp_path / "r.json"
    result.to_json(path)
    back = result_from_json(path)
    assert isinstance(back, TraceResult)
    assert torch.equal(back.p_restore, result.p_restore)
    assert (back.p_clean, back.p_noise, back.subject_span, back.tokens) == (
        result.p_clean, result.p_noise, result.subject_span, result.tokens)
    assert back.config == json.loads(json.dumps(result.config))
    with pytest.raises(TracekitError, match="holds a TraceResult"):
        ZeroResult.from_json(path)


def test_plot_and_table(result, tmp_path):
    png = result.save(tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=200)
    console.print(result)
    text = console.export_text()
    assert "p_clean" in text and "'The'*" in text
    assert text.count("\u2588") >= 1  # the largest value is a full bar, readable without colour


def test_zero_result_methods(tmp_path):
    zeroed = zero_trace(sharp("random:gpt2-tiny"), PROMPT, SUBJECT, window=2)
    assert zeroed.p_zero.shape == (4,) and zeroed.positions == [0, 1, 2]
    back = result_from_json(zeroed.to_json())
    assert isinstance(back, ZeroResult) and torch.equal(back.p_zero, zeroed.p_zero)
    assert len(zeroed.to_frame()) == 4
    assert zeroed.save(tmp_path / "z.png").exists()
    Console(record=True).print(zeroed)


def test_trace_many_accepts_several_record_shapes():
    model = sharp("random:gpt2-tiny")
    records = [
        {"prompt": PROMPT, "subject": SUBJECT, "target": " Paris"},
        (PROMPT, SUBJECT),
        {"known_id": 0, "prompt": PROMPT, "subject": SUBJECT, "attribute": "Paris"},
        {"requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                               "target_true": {"str": "Paris"}, "target_new": {"str": "Rome"}}},
    ]
    out = list(trace_many(model, records, window=2, samples=2, progress=False))
    assert [r for r, _ in out] == records
    single = trace(model, PROMPT, SUBJECT, " Paris", window=2, samples=2)
    for i in (0, 2):
        assert torch.equal(out[i][1].p_restore, single.p_restore)
    assert out[3][1].answer == " Paris" and out[3][1].prompt == "The Eiffel Tower is located in the city of"
    assert out[1][1].target is None


def test_trace_many_can_yield_errors_and_zero():
    model = sharp("random:gpt2-tiny")
    records = [(PROMPT, "Big Ben"), (PROMPT, SUBJECT)]
    with pytest.raises(TracekitError):
        list(trace_many(model, records, window=2, samples=2, progress=False))
    out = list(trace_many(model, records, window=2, samples=2, progress=False, errors="yield"))
    assert isinstance(out[0][1], TracekitError) and isinstance(out[1][1], TraceResult)
    zeroed = list(trace_many(model, records[1:], zeroing=True, window=2, samples=2, progress=False))
    assert isinstance(zeroed[0][1], ZeroResult)


def test_cli_writes_png_and_json(tmp_path, capsys):
    code = main(["trace", "--model", "random:gpt2-tiny", "--prompt", PROMPT, "--subject", SUBJECT,
                 "--window", "2", "--samples", "2", "--out", str(tmp_path)])
    assert code == 0
    result = result_from_json(tmp_path / "trace-mlp-w2.json")
    assert result.config["window"] == 2 and (tmp_path / "trace-mlp-w2.png").exists()
    assert "p_clean" in capsys.readouterr().out
    assert main(["trace", "--model", "random:gpt2-tiny", "--prompt", PROMPT, "--subject", SUBJECT,
                 "--zero", "--window", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "zero-mlp-w2.png").exists()


def test_cli_bad_subject_is_one_line(capsys):
    code = main(["trace", "--model", "random:gpt2-tiny", "--prompt", PROMPT, "--subject", "Big Ben", "--window", "2"])
    assert code == 2
    err = capsys.readouterr().out.strip()
    assert "is not in the prompt" in err and "Traceback" not in err


def test_trace_many_in_batches_yields_in_order_and_stops_at_a_bad_record():
    model = sharp("random:gpt2-tiny")
    good = (PROMPT, SUBJECT)
    records = [good, ("The Colosseum is in the city of", "The Colosseum"), (PROMPT, "Big Ben"), good]
    out = []
    with pytest.raises(TracekitError, match="is not in the prompt"):
        for item in trace_many(model, records, batch=4, window=2, samples=2, progress=False, shapes="bucketed"):
            out.append(item)
    assert [r for r, _ in out] == records[:2]
    yielded = list(trace_many(model, records, batch=3, window=2, samples=2, progress=False, errors="yield"))
    assert [r for r, _ in yielded] == records and isinstance(yielded[2][1], TracekitError)
    single = trace(model, *good, window=2, samples=2)
    for result in (yielded[0][1], yielded[3][1], out[0][1]):
        assert (result.p_restore - single.p_restore).abs().max() <= 1e-6
