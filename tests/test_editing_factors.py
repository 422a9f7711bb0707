"""The key statistics' factorisation, made once per layer and reused (tracekit.editing.factors)."""

import pytest
import torch

from conftest import tiny
from tracekit.data import FactRecord
from tracekit.editing import factors
from tracekit.editing.factors import LayerStats
from tracekit.editing.hparams import MEMITHyperParams, ROMEHyperParams
from tracekit.editing.kv_core import solve_update
from tracekit.editing.rome import rank_one

SMALL = dict(mom2_n_samples=40, mom2_sample_tokens=32, mom2_ridge=1e-2, context_lengths=((3, 2),),
             v_num_grad_steps=4, v_weight_decay=0.0, clamp_norm_factor=1e3)
CORPUS = "The Eiffel Tower is located in the city of Paris. The Colosseum is in Rome.\n\n" * 80


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return str(path)


def _spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return (a @ a.T / (3 * d)).float()  # a covariance-like float32 C, as the statistics are stored


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_cached_factor_update_equals_the_direct_solve():
    model = tiny("random:gpt2-tiny")
    d = 48
    C, K, R = _spd(d), torch.randn(d, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    stats = LayerStats(model, 0, C, factors.matrix_identity(C))
    A = C.double()
    # ROME (lambda = 0, one key) and MEMIT (lambda C + K K^T), against torch.linalg.solve on the full matrix
    u = torch.linalg.solve(A, K[:, 0])
    assert relative(solve_update(stats, K[:, :1], R[:, :1]), torch.outer(R[:, 0], u) / (u @ K[:, 0])) <= 1e-6
    direct = R @ torch.linalg.solve(15.0 * A + K @ K.T, K).T
    assert relative(solve_update(stats, K, R, lam=15.0), direct) <= 1e-6
    ridge = 0.3 * A.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    assert relative(solve_update(stats, K, R, lam=2.0, ridge=0.3), R @ torch.linalg.solve(2.0 * (A + ridge) + K @ K.T, K).T) <= 1e-6
    # the reference's arithmetic (torch.inverse of C in its dtype) is memoised too and unchanged
    hp = ROMEHyperParams(mom2_solve="inverse")
    k, r = K[:, 0].float(), R[:, 0].float()
    torch.testing.assert_close(rank_one(stats, k, r, k, hp), rank_one(C, k, r, k, hp), rtol=0, atol=0)


def test_factor_is_made_once_per_layer_and_statistics_and_reused():
    model = tiny("random:gpt2-tiny")
    C = _spd(model.adapter.as_out_in(model.adapter.down_proj_weight(model.hf, 1)).shape[1], seed=3)
    before = factors.FACTORISATIONS[1]
    stats = LayerStats(model, 1, C, factors.matrix_identity(C))
    first = stats.solver(0.0)
    assert stats.solver(0.0) is first and factors.FACTORISATIONS[1] == before + 1
    stats.solver(0.5)  # another ridge is another matrix
    assert factors.FACTORISATIONS[1] == before + 2
    C.mul_(2.0)  # a given matrix changed in place is a new matrix
    LayerStats(model, 1, C, factors.matrix_identity(C)).solver(0.0)
    assert factors.FACTORISATIONS[1] == before + 3


def test_a_sweep_factorises_each_layer_once(corpus, tmp_path):
    """ROME and MEMIT over several points and layers: one factorisation per (layer, statistics)."""
    from tracekit.store import ResultStore
    from tracekit.studies import EditTask, LocalExecutor

    import tracekit

    model = tracekit.load_model("random:gpt2-tiny", device="cpu")  # its own memo table: no factor from other tests
    records = [FactRecord(case_id=i, prompt="{} is located in", subject=s, target_true=" Paris", target_new=" Rome",
                          paraphrase_prompts=("Where is it? {} is in",), neighborhood_prompts=("The Louvre is in",))
               for i, s in enumerate(["The Eiffel Tower", "Notre Dame"])]
    hparams = {"rome": ROMEHyperParams(corpus=corpus, **SMALL),
               "memit": MEMITHyperParams(corpus=corpus, window=3, clip_window=True, mom2_update_weight=1.0, **SMALL)}
    task = EditTask(methods=("rome", "memit"), layers=(1, 2), hparams=hparams,
                    metrics=_no_essence())
    before = dict(factors.FACTORISATIONS)
    store = ResultStore(tmp_path / "s.sqlite")
    report = LocalExecutor(model).run(task, store, task.items("tiny", records), progress=False)
    assert report.computed == 2 * 2 * 2 and not report.failed
    made = {layer: factors.FACTORISATIONS[layer] - before.get(layer, 0) for layer in range(4)}
    assert made == {0: 1, 1: 1, 2: 1, 3: 1}  # ROME at 1, 2; MEMIT windows 0..2 and 1..3 (same statistics)


def _no_essence():
    from tracekit.editing.metrics import MetricsConfig

    return MetricsConfig(essence=False)


def test_factor_memo_stays_within_its_byte_budget_and_remakes_what_it_dropped(monkeypatch):
    """GPT-J's float64 factors are 2 GiB a layer and MEMIT's windows touch every layer: the memo is
    bounded in bytes (least recently used out first), and a dropped factor is made again, the same."""
    model = tiny("random:gpt2-tiny")
    d = 48
    one_factor = d * d * 8  # float64
    monkeypatch.setenv(factors.BUDGET_VARIABLE, str(2.5 * one_factor / 2**30))  # room for two
    stats = [LayerStats(model, layer, _spd(d, seed=layer), f"budget-test-{layer}") for layer in range(4)]
    first = stats[0].solver().factor.clone()
    made = factors.FACTORISATIONS[0]
    stats[1].solver()
    stats[0].solver()  # used again: now the most recent, so layer 1 goes first
    stats[2].solver()
    held = [v for k, v in factors._table(model).items() if str(k[2]).startswith("budget-test")]
    assert len(held) == 2 and sum(map(factors.entry_bytes, held)) <= 2.5 * one_factor
    assert factors.FACTORISATIONS[0] == made  # layer 0 was kept (recently used)
    stats[3].solver()
    stats[1].solver()  # dropped earlier: made again
    again = stats[0].solver()  # dropped by now too: made again, equal to the first
    assert factors.FACTORISATIONS[0] == made + 1
    torch.testing.assert_close(again.factor, first, rtol=0, atol=0)


def test_factor_memo_budget_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(factors.BUDGET_VARIABLE, "1.5")
    assert factors.memo_budget("cpu") == int(1.5 * 2**30)
    monkeypatch.setenv(factors.BUDGET_VARIABLE, "lots")
    with pytest.raises(Exception, match="TRACEKIT_FACTOR_MEMO_GB must be a number"):
        factors.memo_budget("cpu")
    monkeypatch.delenv(factors.BUDGET_VARIABLE)
    assert factors.memo_budget("cpu") == 8 * 2**30
