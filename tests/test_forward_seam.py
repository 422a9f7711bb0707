"""The partial forward (``Model.forward``): the same values as whole passes, on every backend and
shape policy; branches off a recorded pass; edits, captures and gradients over a pass's columns."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tracekit import TracekitError
from tracekit.adapters import Site
from tracekit.adapters.partial import Branch, ForwardStats, bucket, bucket_grid
from tracing_models import BLOCK_OPTIONAL_PACKAGES, deep, one_thread, sharp  # noqa: F401

ARCHS = ("gpt2", "gptj", "llama")
BACKENDS = ("hf", "transformer_lens", "nnsight")
TOL = 1e-5


def ids(rows=3, length=11, seed=0):
    return torch.randint(1, 500, (rows, length), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=TOL):
    return (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_from_ids_equals_a_whole_forward(arch, backend):
    model = deep(arch, backend)
    x = ids()
    whole = model.run(x, capture=[Site("mlp", 3), Site("resid", 7)])
    part = model.forward(x, logits="all", capture=[Site("mlp", 3), Site("resid", 7)])
    assert part.path == model.forward_path == ("blocks" if backend == "hf" else "whole passes")
    assert close(part.logits, whole.logits)
    for site in (Site("mlp", 3), Site("resid", 7)):
        assert close(part.captured[site], whole.captured[site])
    last = model.forward(x, logits=torch.tensor([10, 4, 7]))
    assert close(last.logits, whole.logits[torch.arange(3), torch.tensor([10, 4, 7])])
    top = model.forward(x, stop_layer=8)
    assert close(top.hidden, whole.captured[Site("resid", 7)])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", ("exact", "bucketed"))
def test_branches_without_edits_reproduce_the_recorded_pass(arch, backend, shapes):
    """Rows re-running from their own layer and position (sorted by layer, joining the pass as it
    goes) give the recorded pass's logits at their columns."""
    model = deep(arch, backend)
    x = ids()
    whole = model.run(x).logits
    recorded = model.forward(x, record=True, shapes=shapes)
    assert len(recorded.recording.inputs) == model.n_layers
    start, layer, source = [4, 9, 2, 5], [0, 3, 3, 11], [0, 1, 2, 2]
    branch = Branch.make(recorded.recording, start, layer, source, width=11 - 4)
    stats = ForwardStats()
    out = model.forward(branch=branch, logits="all", shapes=shapes, stats=stats)
    for i, (s, r) in enumerate(zip(start, source)):
        real = min(11 - s, 7)
        assert close(out.logits[i, :real], whole[r, s:s + real])
    last = model.forward(branch=branch, logits=torch.tensor([6, 1, 6, 5]), shapes=shapes)
    assert close(last.logits, whole[torch.tensor(source), torch.tensor([10, 10, 8, 10])])
    if backend == "hf":  # rows join by layer: 1 row at layers 0..2, 3 at 3..10, 4 at 11
        keys = 9  # the largest start (on the grid: 1..16 are all grid values)
        assert stats.attention == {(1, 7, keys + 7): 3, (3, 7, keys + 7): 8, (4, 7, keys + 7): 1}
        assert stats.tokens == stats.computed == (1 * 3 + 3 * 8 + 4 * 1) * 7


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_and_captures_in_a_branch_match_a_whole_pass(arch, backend):
    """v*'s use: rows enter above layer l at their last subject token with a delta added to the
    recorded state; equals a whole pass adding the delta to block l's output there."""
    model = deep(arch, backend)
    x = ids(rows=2, length=9)
    starts, l = torch.tensor([3, 5]), 4
    delta = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))

    def add(h):
        out = h.clone()
        out[torch.arange(2), starts] += delta
        return out

    whole = model.run(x, edits={Site("resid", l): add}, capture=[Site("mlp", 6)])
    recorded = model.forward(x, record=True).recording
    branch = Branch.make(recorded, starts, l + 1, width=4)
    state = torch.stack([recorded.inputs[l + 1][i, s:s + 4] for i, s in enumerate(starts.tolist())])
    state[:, 0] += delta
    out = model.forward(branch=branch, hidden=state, logits="all", capture=[Site("mlp", 6)])
    for i, s in enumerate(starts.tolist()):
        n = min(4, 9 - s)
        assert close(out.logits[i, :n], whole.logits[i, s:s + n])
        assert close(out.captured[Site("mlp", 6)][i, :n], whole.captured[Site("mlp", 6)][i, s:s + n])
    # an edit inside the branch (zero the MLP output at column 1 of layer 6) == the same on the whole pass
    def zero_col1(h):
        return h.index_fill(1, torch.tensor([1], device=h.device), 0.0)

    def zero_at(h):
        out = h.clone()
        out[torch.arange(2), starts + 1] = 0
        return out

    whole = model.run(x, edits={Site("resid", l): add, Site("mlp", 6): zero_at})
    out = model.forward(branch=branch, hidden=state, logits="all", edits={Site("mlp", 6): zero_col1})
    for i, s in enumerate(starts.tolist()):
        n = min(4, 9 - s)
        assert close(out.logits[i, :n], whole.logits[i, s:s + n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_through_a_partial_pass(backend):
    """FT's use: the frozen bottom once, then the top with gradients, as a whole pass gives them."""
    x = ids(rows=1, length=8)

    def grad_of_logprob(model, partial: bool) -> torch.Tensor:
        weight = model.adapter.down_proj_weight(model.hf, 7)
        weight.requires_grad_(True)
        try:
            if partial:
                bottom = model.forward(x, stop_layer=5).hidden
                logits = model.forward(hidden=bottom, start_layer=5, logits=torch.tensor([7]), grad=True).logits
            else:
                logits = model.run(x, positions=torch.tensor([7]), grad=True).logits
            torch.log_softmax(logits, -1)[0, 3].backward()
            return weight.grad.clone()
        finally:
            weight.grad = None
            weight.requires_grad_(False)

    assert close(grad_of_logprob(deep("llama", backend), True), grad_of_logprob(deep("llama"), False), 1e-4)


def test_bucketed_shapes_pad_rows_columns_and_keys_to_the_grid():
    model = deep("gptj")
    recorded = model.forward(ids(rows=3, length=24), record=True).recording
    branch = Branch.make(recorded, [17, 18, 19], [2, 2, 6], width=4)
    exact, bucketed = ForwardStats(), ForwardStats()
    a = model.forward(branch=branch, logits="all", shapes="exact", stats=exact)
    b = model.forward(branch=branch, logits="all", shapes="bucketed", stats=bucketed)
    assert close(a.logits, b.logits, 1e-6)
    assert set(exact.attention) == {(2, 4, 19 + 4), (3, 4, 19 + 4)}
    assert set(bucketed.attention) == {(2, 4, 20 + 4), (3, 4, 20 + 4)}  # 19 prefix keys -> 20
    assert bucketed.tokens == exact.tokens == exact.computed


def test_the_grid():
    assert [bucket(n) for n in (1, 7, 8, 9, 10, 11, 16, 17, 33, 100, 1000)] == [1, 7, 8, 10, 10, 12, 16, 20, 40, 112, 1024]
    assert [bucket(n, 8) for n in (16, 17, 19, 33, 100, 1000)] == [16, 18, 20, 36, 104, 1024]
    for n in range(1, 5000):
        assert n <= bucket(n) <= 1.25 * n and bucket(bucket(n)) == bucket(n)
        assert n <= bucket(n, 8) <= 1.125 * n and bucket(bucket(n, 8), 8) == bucket(n, 8)
    assert bucket_grid(64) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "either ids, or hidden"),
    (dict(ids=torch.zeros(1, 3, dtype=torch.long), start_layer=2), "starts at layer 0"),
    (dict(ids=torch.zeros(1, 3, dtype=torch.long), stop_layer=20), "stop_layer <= 12"),
    (dict(ids=torch.zeros(1, 3, dtype=torch.long), stop_layer=5, logits="all"), "to the last layer"),
    (dict(ids=torch.zeros(1, 3, dtype=torch.long), stop_layer=5, capture=[Site("mlp", 6)]), "outside the layers"),
    (dict(hidden=torch.zeros(1, 3, 32), start_layer=2, edits={Site("embed"): lambda h: h}), "pass from ids"),
    (dict(ids=torch.zeros(1, 3, dtype=torch.long), shapes="ragged"), "unknown shapes"),
])
def test_bad_requests_give_one_line_errors(kwargs, message):
    model = deep("gpt2")
    ids_ = kwargs.pop("ids", None)
    with pytest.raises(TracekitError, match=message) as err:
        model.forward(ids_, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_branches_give_one_line_errors():
    recorded = deep("gpt2").forward(ids(rows=2, length=5), record=True).recording
    with pytest.raises(TracekitError, match="sorted by layer"):
        Branch.make(recorded, [1, 2], [3, 1])
    with pytest.raises(TracekitError, match="source rows"):
        Branch.make(recorded, [1, 2], [1, 1], source=[0, 2])
    with pytest.raises(TracekitError, match="starts must lie"):
        Branch.make(recorded, [1, 5], [1, 1])


def test_one_place_decides_the_path():
    assert sharp("random:gpt2-tiny").forward_path == "blocks"
    assert sharp("random:gpt2-tiny", "nnsight").forward_path == "whole passes"
    model = deep("llama")
    driver = model.backend.driver
    before = driver.implementation
    try:
        driver.implementation = "flash_attention_2"
        path, reason = model.backend.forward_path()
        assert path == "whole passes" and "flash_attention_2" in reason
    finally:
        driver.implementation = before


def test_the_hf_path_needs_no_transformer_lens_nnsight_or_gguf(tmp_path):
    """The GPU machine has torch and transformers but none of these: tracing (and the partial
    forward) on the hf backend must not import them."""
    script = BLOCK_OPTIONAL_PACKAGES + """
import torch, tracekit
from tracekit.tracing import trace, trace_many
model = tracekit.load_model('random:gptj-tiny', device='cpu')
result = trace(model, 'The Eiffel Tower is located in the city of', 'The Eiffel Tower', window=2, samples=2,
               shapes='bucketed')
assert result.config['forward'] == 'blocks'
for name in ('transformer_lens', 'nnsight', 'gguf'):
    assert name not in sys.modules, name
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
