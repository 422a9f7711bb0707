"""From stored results to the tables the analyses fit: tracing effect per (point, layer),
joined to the edit made at that layer; the concentrated-effects subset; the facts' relations
and their probabilities of o_true (controls for the tracing effect).

Layers are 0-based everywhere (GPT-J's "layer 6" in the paper is layer 5 here). The
tracing effect "at layer l" is the effect of restoring the window centred on l.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracekit.errors import TracekitError

POINT = ["model", "dataset", "case_id"]
REDUCE_COLUMNS = {"max": "effect", "last_subject": "effect_last"}


def tracing_effects(traces: pd.DataFrame, *, kind: str = "mlp", window: int = 5, reduce: str = "max") -> pd.DataFrame:
    """One row per (point, layer): ``tracing_effect`` for traces of ``kind`` and ``window``.

    ``traces`` is ``ResultStore.traces_frame(long=True)``. ``reduce``: "max" over tokens (the
    paper's default) or "last_subject" (the effect at the last subject token). Kind "zero" is
    representation zeroing.
    """
    if reduce not in REDUCE_COLUMNS:
        raise TracekitError(f"unknown reduce {reduce!r}; choose max or last_subject")
    chosen = traces[(traces["kind"] == kind) & (traces["window"] == window)]
    if chosen.empty:
        have = sorted({(k, int(w)) for k, w in zip(traces["kind"], traces["window"])})
        raise TracekitError(f"no traces of kind {kind!r} with window {window} in the store "
                            f"(it has {', '.join(f'{k}/w{w}' for k, w in have) or 'no traces'}); "
                            f"run recipes/trace_dataset.py --kinds {kind} --windows {window}")
    column = REDUCE_COLUMNS[reduce]
    out = chosen[POINT + ["layer", column]].rename(columns={column: "tracing_effect"})
    if out["tracing_effect"].isna().all():
        raise TracekitError(f"the {kind}/w{window} traces have no {reduce} effects stored")
    return out.reset_index(drop=True)


def join_edits(edits: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """Each edit result beside the tracing effect of its point at its edit layer."""
    if edits.empty:
        raise TracekitError("the store has no successful edit results; run recipes/edit_sweep.py first")
    joined = edits.merge(effects, on=POINT + ["layer"], how="inner")
    if joined.empty:
        raise TracekitError("no edit result has a trace of the same point (model, dataset, case) and layer; "
                            "trace the edited points with the same model and dataset")
    return joined


def select(df: pd.DataFrame, **equals) -> pd.DataFrame:
    """Rows matching every column=value given (None: no constraint); an empty result is an error."""
    out = df
    for column, value in equals.items():
        if value is not None:
            out = out[out[column] == value]
    if out.empty:
        wanted = ", ".join(f"{k}={v}" for k, v in equals.items() if v is not None)
        raise TracekitError(f"no results with {wanted} in the store")
    return out


def concentrated_cases(effects: pd.DataFrame, *, fraction: float = 0.5, max_others: int = 3) -> pd.DataFrame:
    """Points whose effect is concentrated (paper, Table 2): at most ``max_others`` layers besides
    the one with the max effect reach ``fraction`` of that max. Returns the POINT columns of
    those points plus ``others`` (how many layers reached it)."""
    rows = []
    for point, group in effects.groupby(POINT, sort=True):
        values = group.sort_values("layer")["tracing_effect"].to_numpy()
        peak = values.max()
        others = int((values >= fraction * peak).sum()) - 1  # the peak layer itself always qualifies
        rows.append((*point, others, others <= max_others and peak > 0))
    table = pd.DataFrame(rows, columns=POINT + ["others", "concentrated"])
    return table[table["concentrated"]].drop(columns="concentrated").reset_index(drop=True)


def relations_frame(records_by_dataset) -> pd.DataFrame:
    """(dataset, case_id, relation) for ``{dataset name: [FactRecord, ...]}``, to split analyses by relation."""
    rows = [(dataset, record.case_id, record.relation_id or "(none)")
            for dataset, records in records_by_dataset.items() for record in records]
    if not rows:
        raise TracekitError("no records to take relations from")
    return pd.DataFrame(rows, columns=["dataset", "case_id", "relation"])


def with_relation(df: pd.DataFrame, relations: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each point's ``relation``; a point missing from ``relations`` is an error, not dropped."""
    out = df.merge(relations, on=["dataset", "case_id"], how="left")
    missing = out[out["relation"].isna()]
    if not missing.empty:
        first = missing.iloc[0]
        raise TracekitError(f"{missing['case_id'].nunique()} stored points have no record to take a relation from "
                            f"(first: dataset {first['dataset']!r}, case {first['case_id']}); "
                            f"load the dataset the store was made from")
    return out


PROBABILITIES = ("log_p_clean", "log_p_noise")


def with_probabilities(df: pd.DataFrame, traces: pd.DataFrame, *, kind: str = "mlp", window: int = 5) -> pd.DataFrame:
    """``df`` with each point's log-probability of o_true on the clean prompt (``log_p_clean``) and
    with the subject noised (``log_p_noise``), from its ``kind``/``window`` trace. Both bear on the
    tracing effect (the share of p_clean - p_noise a restored state brings back) and on how hard the
    fact is to edit, so a tracing effect that only stands in for them can be told apart."""
    chosen = traces[(traces["kind"] == kind) & (traces["window"] == window)]
    points = chosen.groupby(POINT, sort=False)[["p_clean", "p_noise"]].first()
    if points.empty or points.isna().all().any():
        raise TracekitError(f"no {kind}/w{window} traces with p_clean and p_noise stored")
    # the floor keeps a probability that underflowed to 0 finite on the log scale
    logs = np.log(points.clip(lower=1e-30)).rename(columns={"p_clean": PROBABILITIES[0], "p_noise": PROBABILITIES[1]})
    return df.merge(logs.reset_index(), on=POINT, how="left")


def only_points(df: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    return df.merge(points[POINT], on=POINT, how="inner")
