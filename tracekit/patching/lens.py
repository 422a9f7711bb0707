"""The logit lens: read the residual stream after every layer through the model's own final norm
and unembedding (the architecture's modules, so its norm's conventions come with them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.table import Table

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.errors import check
from tracekit.patching.metrics import target_tokens
from tracekit.patching.result import new_figure
from tracekit.plotting import Plottable


@dataclass
class LensResult(Plottable):
    """Per layer (``layers``: "embed" then 0..L-1, the stream entering layer 0 and leaving each
    layer) and position: the top-``k`` next tokens and the target's probability."""

    model: str
    prompt: str
    tokens: list[str]
    positions: list[int]
    layers: list[str]
    target: str
    target_id: int
    p_target: torch.Tensor  # [layers, positions]
    top_ids: torch.Tensor  # [layers, positions, k]
    top_probs: torch.Tensor  # [layers, positions, k]
    top_tokens: list = field(default_factory=list)  # [layers][positions][k] decoded

    def to_frame(self):
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for j, t in enumerate(self.positions):
                for r in range(self.top_ids.shape[-1]):
                    rows.append({"layer": layer, "position": t, "token": self.tokens[t], "rank": r,
                                 "next": self.top_tokens[i][j][r], "p": float(self.top_probs[i, j, r]),
                                 "target": self.target, "p_target": float(self.p_target[i, j])})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """p(target) by layer, one line per position, each point labelled with the top token."""
        fig = new_figure(2 + 0.3 * len(self.layers), 3.2) if ax is None else ax.figure
        ax = fig.subplots() if ax is None else ax
        x = list(range(len(self.layers)))
        for j, t in enumerate(self.positions):
            ax.plot(x, self.p_target[:, j].numpy(), marker="o", label=f"{t} {self.tokens[t]!r}")
            for i in x:
                ax.annotate(repr(self.top_tokens[i][j][0]), (i, float(self.p_target[i, j])), fontsize=6, rotation=45,
                            xytext=(2, 4), textcoords="offset points")
        ax.set_xticks(x, self.layers, fontsize=7)
        ax.set_xlabel("residual stream after layer")
        ax.set_ylabel(f"p({self.target!r})")
        ax.set_title(f"logit lens: {self.prompt!r}", fontsize=8)
        ax.legend(fontsize=7, title="position", title_fontsize=7)
        return fig

    def caption(self) -> str:
        return f"logit lens: {self.prompt!r}"

    def __rich__(self) -> Table:
        j = len(self.positions) - 1
        t = self.positions[j]
        table = Table(title=f"logit lens at position {t} ({self.tokens[t]!r}) of {self.prompt!r}")
        table.add_column("layer", justify="right")
        table.add_column(f"p({self.target!r})", justify="right")
        table.add_column("top next tokens")
        for i, layer in enumerate(self.layers):
            top = ", ".join(f"{tok!r} {float(p):.3f}" for tok, p in zip(self.top_tokens[i][j], self.top_probs[i, j]))
            table.add_row(layer, f"{float(self.p_target[i, j]):.4f}", top)
        return table


def logit_lens(model, prompt: str, *, target: str | None = None, k: int = 5, positions="last") -> LensResult:
    """The logit lens over the residual stream of ``prompt``: the embeddings' stream entering layer 0
    and every block's output, each through the final norm and the unembedding. ``target``: the token
    whose probability is followed (default: the model's own next-token prediction); ``positions``:
    "last", "all" or a list of positions."""
    ids = P.token_ids(model.tokenizer, prompt)
    T = len(ids)
    vocab = model.adapter.unembed_module(model.hf).weight.shape[0]
    check(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= vocab, f"k must be 1..{vocab}, got {k!r}")
    if isinstance(positions, str):
        check(positions in ("last", "all"), f"positions: 'last', 'all' or a list, got {positions!r}")
        positions = [T - 1] if positions == "last" else list(range(T))
    positions = [int(t) + T if int(t) < 0 else int(t) for t in positions]
    check(len(positions) > 0 and all(0 <= t < T for t in positions), f"positions must lie in 0..{T - 1}")
    sites = [Site("resid_pre", 0)] + [Site("resid_post", layer) for layer in range(model.n_layers)]
    with torch.no_grad():
        out = model.run(torch.tensor([ids]), capture=sites)
        stream = torch.stack([out.captured[s][0, positions] for s in sites])  # [layers, positions, d]
        norm, unembed = model.adapter.final_norm_module(model.hf), model.adapter.unembed_module(model.hf)
        probs = torch.softmax(unembed(norm(stream)).float(), -1).cpu()
    target_id = target_tokens(model.tokenizer, prompt, target)[0] if target is not None else \
        int(out.logits[0, -1].argmax())
    top_probs, top_ids = probs.topk(k, dim=-1)
    decode = model.tokenizer.decode
    top_tokens = [[[decode([int(i)]) for i in row] for row in layer] for layer in top_ids]
    return LensResult(model.spec, prompt, model.tokens(prompt), positions,
                      ["embed", *[str(layer) for layer in range(model.n_layers)]], decode([target_id]), target_id,
                      probs[..., target_id], top_ids, top_probs, top_tokens)
