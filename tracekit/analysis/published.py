"""What the paper reports for GPT-J on CounterFact (Hase et al. 2023, from its text), keyed like
``Summary.headline``, so that every summary prints the paper's figure beside ours.

Only numbers the text states are here; the per-cell values of Fig. 6 / Tables 3-6 exist in the
paper's figures and appendix tables, which ``../shared/reference/paper.txt`` does not hold.
"""

from __future__ import annotations

PAPER = {
    "table 1 (rome, error-injection)": "layer 0.947, layer x tracing 0.948 (Sec. 4)",
    "max R² added by tracing (rewrite)": "0.032, Fact Forcing with FT (p < 1e-4); layer alone explains 0.585 "
                                         "on average over the 20 cells (Sec. 5)",
    "max R² added by tracing (paraphrase)": "about 0.03 (App. B, Table 4)",
    "max R² added by tracing (neighborhood)": "0.02 (App. B, Table 5)",
    "max R² added by tracing (overall)": "0.02, Fact Forcing with FT (App. B, Table 6)",
    "concentrated points": "74 of 652; ROME Error Injection added R² 0.002, the maximum still 0.032 (App. B, Table 2)",
}


# What the text says of each (problem, method) cell's rewrite R² (Sec. 4-5): the added R² of
# tracing over layer, and the maximum it reports for the rest.
PAPER_MAX_ADDED = 0.032  # Fact Forcing with constrained fine-tuning (Sec. 5, App. B Table 2)
PAPER_CELLS = {
    ("error-injection", "rome"): "layer 0.947, added 0.001 (Table 1)",
    ("fact-forcing", "ft-1"): "added about 0.03 (p < 1e-4), the largest (Sec. 5)",
    ("fact-forcing", "ft-5"): "added about 0.03 (p < 1e-4), the largest (Sec. 5)",
}
OTHER_CELL = "added <= 0.032 (Sec. 5; Fig. 6 values not in the text)"


def paper_cell(problem: str, method: str) -> str:
    """The paper's figure for one (problem, method) cell of Fig. 6 / Table 3, as far as its text gives it."""
    return PAPER_CELLS.get((problem, method), OTHER_CELL)


def with_paper(key: str, ours) -> str:
    """``ours``, followed by the paper's figure for the same headline where it reports one."""
    return f"{ours} (paper, GPT-J: {PAPER[key]})" if key in PAPER else str(ours)
