"""The key/value core shared by ROME and MEMIT.

- Rows: the edit prompt behind every context template, followed by the target's tokens
  but the last (teacher forcing), plus the KL prompt "{subject} is a".
- Keys: the down-projection input at the last subject token (``Site("mlp_in", l)``),
  averaged over the templates: k*.
- The target value: a delta added at the last subject token to the output of block l
  (which is where the MLP's output enters the residual stream: adding to the MLP output or
  to the block output is the same thing, as the MLP is the last term of every block),
  optimised by Adam on NLL(target) over all templates + kl_factor x KL(new || original) of
  the next-token distribution at the KL prompt's last subject token (where the public ROME
  code takes it; the delta is added there too) + weight decay, its norm clamped to
  clamp_norm_factor x |reference|.
- The update: dW = R (lambda I + K^T C^-1 K)^-1 (C^-1 K)^T, in (out, in) orientation. With
  lambda = 0 and one key this is ROME's rank-one update; with lambda = mom2_update_weight it
  is MEMIT's (lambda C + K K^T)^-1 K solve, rewritten so that lambda = 0 stays well defined.

Cost (``engine="blocks"``, any model whose blocks ``BlockDriver`` can drive): one pass
without gradients runs every row through blocks 0..l and keeps block l's output. The
positions before each row's last subject token s_i cannot see the delta (causal
attention), so their keys/values in blocks l+1.. are computed once, also without
gradients. Each optimisation step then runs one batch holding, for every row, only
positions s_i up to its last scored position (a ragged batch: per-row positions and masks
over the shared prefix) through blocks l+1.., with logits only at the positions that score
the target and the KL prompt.
``engine="hooks"`` is the plain reference: whole forward passes through
``Model.run`` with a ``Site("mlp", l)`` hook adding the delta (used where blocks cannot be
driven, e.g. the TransformerLens bridge, and by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.adapters.blocks import BlockDriver, Positions
from tracekit.editing.request import EditRequest
from tracekit.errors import check


# ---- rows ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EditRows:
    input_ids: torch.Tensor  # [R, T] right-padded; rows 0..n_templates-1 are templates, then the KL row
    lengths: torch.Tensor  # [R]
    subject_last: torch.Tensor  # [R] position of each row's last subject token
    target_ids: torch.Tensor  # [m]
    target_pos: torch.Tensor  # [n_templates, m] positions whose logits score the target tokens
    n_templates: int
    noise: torch.Tensor | None  # [R, T, d] added to the token embeddings (Fact Forcing), or None
    subject_tokens: tuple[tuple[int, ...], ...] = ()  # each template row's subject token ids

    @property
    def has_kl(self) -> bool:
        return self.input_ids.shape[0] > self.n_templates


def _subject_span(tokenizer, text: str, subject: str, after: int) -> tuple[int, int]:
    """The subject's span in ``text``, taking its first occurrence at or after character ``after``."""
    occurrence = text[:after].count(subject)
    return P.subject_span(tokenizer, text, subject, occurrence)


def build_rows(model, request: EditRequest, templates: list[str], kl_prompt: str | None) -> EditRows:
    tok = model.tokenizer
    target = model.target_ids(request.target)
    rows, last, starts, ends, target_pos, subject_tokens = [], [], [], [], [], []
    for template in templates:
        check("{}" in template, f"context template {template!r} has no '{{}}'")
        at = template.index("{}")
        text = template[:at] + request.text + template[at + 2:]
        start, end = _subject_span(tok, text, request.subject, at + request.prompt.index("{}"))
        prompt_ids = P.token_ids(tok, text)
        rows.append(prompt_ids + target[:-1])
        starts.append(start), ends.append(end), last.append(end - 1)
        subject_tokens.append(tuple(prompt_ids[start:end]))
        target_pos.append([len(prompt_ids) - 1 + j for j in range(len(target))])
    n_templates = len(rows)
    if kl_prompt is not None:
        text = kl_prompt.format(request.subject)
        start, end = _subject_span(tok, text, request.subject, kl_prompt.index("{}"))
        rows.append(P.token_ids(tok, text))
        starts.append(start), ends.append(end), last.append(end - 1)
    batch = P.pad(rows, tok.pad_token_id)
    noise = None
    if request.noise is not None:
        check(request.noise.dim() == 2 and request.noise.shape[1] == model.d_model,
              f"subject noise must be [n_subject_tokens, {model.d_model}], got {tuple(request.noise.shape)}")
        noise = torch.zeros(*batch.input_ids.shape, model.d_model)
        n = request.noise.shape[0]
        for row, (start, end) in enumerate(zip(starts, ends)):
            # A subject that tokenises into a different number of pieces here (e.g. at the very
            # start of the KL prompt, without its leading space): align the noise to its end.
            k = min(n, end - start)
            noise[row, end - k:end] = request.noise[n - k:].float()
    return EditRows(batch.input_ids, batch.lengths, torch.tensor(last), torch.tensor(target),
                    torch.tensor(target_pos), n_templates, noise, tuple(subject_tokens))


def tokenisation_groups(rows: EditRows) -> list[list[int]]:
    """Template rows grouped by the subject's token ids, in order of first appearance.

    The subject after a space and at a prompt's start can be different tokens (" Kyoto" vs
    "K|y|oto"), with different keys; the bare "{}" template's group comes first."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, tokens in enumerate(rows.subject_tokens):
        groups.setdefault(tokens, []).append(row)
    return list(groups.values())


def keys_by_tokenisation(rows: EditRows, keys: torch.Tensor, mlp_out: torch.Tensor):
    """Mean key [g, d_in] and MLP output [g, d_model] of each ``tokenisation_groups`` group."""
    index = tokenisation_groups(rows)
    return (torch.stack([keys[i].mean(0) for i in index]), torch.stack([mlp_out[i].mean(0) for i in index]))


def weights_by_tokenisation(rows: EditRows) -> torch.Tensor:
    """Template weights [n_templates] giving each tokenisation group an equal share of the NLL."""
    groups = tokenisation_groups(rows)
    weights = torch.zeros(rows.n_templates)
    for group in groups:
        weights[group] = 1.0 / (len(groups) * len(group))
    return weights


def _noise_edits(rows: EditRows, dtype, n_rows: int | None = None) -> dict:
    """The subject noise of the first ``n_rows`` rows (all by default) as an embedding hook."""
    if rows.noise is None:
        return {}
    noise = rows.noise[:n_rows]
    return {Site("embed"): lambda h: h + noise.to(h.device, dtype)}


# ---- states at the last subject token ---------------------------------------------------------
@torch.no_grad()
def subject_states(model, rows: EditRows, sites: list[Site]) -> dict[Site, torch.Tensor]:
    """Each site's value at every template row's last subject token: {site: [n_templates, d]}."""
    ids = rows.input_ids[: rows.n_templates]
    captured = _run_prefix(model, ids, rows, sites, max(s.layer for s in sites))[1]
    index = torch.arange(rows.n_templates)
    return {site: value[index, rows.subject_last[: rows.n_templates]].float() for site, value in captured.items()}


def _run_prefix(model, ids, rows, sites, last_layer):
    """Blocks 0..last_layer without gradients; captures ``sites`` (whole tensors)."""
    driver = BlockDriver(model.hf, model.adapter)
    dtype = next(model.hf.parameters()).dtype
    edits = _noise_edits(rows, dtype, ids.shape[0])
    if driver.unsupported_reason() is not None:
        out = model.run(ids, edits=edits, capture=sites, positions=torch.zeros(ids.shape[0], dtype=torch.long))
        return None, out.captured
    captured: dict[Site, torch.Tensor] = {}
    handles = []
    for site in sites:
        module = model.adapter.module(model.hf, site)
        if site.kind == "mlp_in":
            handles.append(module.register_forward_pre_hook(lambda m, a, s=site: captured.__setitem__(s, a[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, s=site: captured.__setitem__(s, o[0] if isinstance(o, tuple) else o)))
    try:
        hidden = driver.block0_input(ids, edits)
        pos = driver.positions(0, ids.shape[1], hidden)
        for layer in range(last_layer + 1):
            hidden, _ = driver.block(layer, hidden, pos)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, captured


# ---- the value objective ------------------------------------------------------------------------
def ragged_positions(driver: BlockDriver, starts: torch.Tensor, width: int, prefix: int, like: torch.Tensor) -> Positions:
    """Row i holds positions starts[i] .. starts[i] + width - 1 and sees keys 0..starts[i] - 1 of a
    shared prefix of ``prefix`` columns, then its own columns causally."""
    cols = torch.arange(width, device=like.device)
    ids = starts.to(like.device)[:, None] + cols  # [B, P]
    keys = torch.arange(prefix, device=like.device)
    seen_prefix = (keys[None, None, :] < starts.to(like.device)[:, None, None]).expand(-1, width, -1)
    causal = (cols[None, :] <= cols[:, None])[None].expand(len(starts), -1, -1)
    allowed = torch.cat([seen_prefix, causal], dim=-1)[:, None]  # [B, 1, P, prefix + P]
    return driver.make_positions(ids, allowed, like)


class ValueObjective:
    """NLL of the target and KL on the KL prompt as functions of the delta at block ``layer``."""

    def __init__(self, model, rows: EditRows, layer: int, engine: str = "auto",
                 template_weights: torch.Tensor | None = None):
        """``template_weights`` [n_templates], summing to 1: weigh the templates' NLL (default: equally)."""
        self.model, self.rows, self.layer = model, rows, layer
        self.template_weights = template_weights
        self.driver = BlockDriver(model.hf, model.adapter)
        if engine == "auto":
            engine = "blocks" if self.driver.unsupported_reason() is None else "hooks"
        check(engine in ("blocks", "hooks"), f"unknown engine {engine!r}; choose blocks or hooks")
        check(engine == "hooks" or self.driver.unsupported_reason() is None,
              f"the blocks engine cannot drive this model: {self.driver.unsupported_reason()}")
        self.engine = engine
        n = rows.n_templates
        sites = [Site("mlp_in", layer), Site("mlp", layer), Site("resid", layer)]
        with torch.no_grad():
            hidden, captured = _run_prefix(model, rows.input_ids, rows, sites, layer)
        index = torch.arange(n)
        at = rows.subject_last[:n]
        self.keys = captured[sites[0]][index, at].float()  # [n, d_in]
        self.mlp_out = captured[sites[1]][index, at].float()  # [n, d_model]
        self.resid = captured[sites[2]][index, at].float()
        self.dtype = captured[sites[2]].dtype
        if engine == "blocks":
            self._prepare_suffix(hidden)
        with torch.no_grad():
            self.kl_init = self._logits(torch.zeros(model.d_model, device=self.resid.device))[1]
            if self.kl_init is not None:
                self.kl_init = torch.log_softmax(self.kl_init.float(), -1)

    # -- blocks engine -------------------------------------------------------------------
    @torch.no_grad()
    def _prepare_suffix(self, hidden: torch.Tensor) -> None:
        """Keys/values of every row's positions before its last subject token (blocks above
        ``layer``), and each row's block-``layer`` output from that token on, in one batch."""
        rows = self.rows
        starts = rows.subject_last
        # columns a row needs: up to its last target-scoring position; the KL row only its first
        needed = torch.zeros_like(starts)
        needed[: rows.n_templates] = rows.target_pos[:, -1] - starts[: rows.n_templates]
        self.width = int(needed.max()) + 1
        prefix = int(starts.max())
        padded = torch.nn.functional.pad(hidden, (0, 0, 0, self.width))  # room for a row's suffix past T
        take = (starts[:, None] + torch.arange(self.width)).to(hidden.device)
        self.suffix = padded[torch.arange(len(starts), device=hidden.device)[:, None], take]  # [B, P, d]
        self.pos = ragged_positions(self.driver, starts, self.width, prefix, hidden)
        self.prefix_kv = []
        h = hidden[:, :prefix]
        pos = self.driver.positions(0, prefix, h) if prefix > 0 else None
        for layer in range(self.layer + 1, len(self.driver.blocks)):
            if prefix == 0:
                self.prefix_kv.append(None)
                continue
            h, cache = self.driver.block(layer, h, pos)
            self.prefix_kv.append(tuple(t.detach() for t in cache.seen))

    def _blocks_logits(self, delta: torch.Tensor):
        """Logits at the target positions [n_templates, m, V] and at the KL row's subject token [V]."""
        rows, n = self.rows, self.rows.n_templates
        x = self.suffix.clone()
        x[:, 0] = x[:, 0] + delta.to(x.device, x.dtype)
        for i, layer in enumerate(range(self.layer + 1, len(self.driver.blocks))):
            x, _ = self.driver.block(layer, x, self.pos, self.prefix_kv[i])
        cols = rows.target_pos - rows.subject_last[:n, None]  # [n, m]
        scored = x[torch.arange(n, device=x.device)[:, None], cols.to(x.device)]  # [n, m, d]
        logits = self.driver.unembed(self.driver.norm(scored))
        kl = self.driver.unembed(self.driver.norm(x[n, 0])) if rows.has_kl else None
        return logits, kl

    # -- hooks engine (reference) ---------------------------------------------------------------
    def _hooks_logits(self, delta: torch.Tensor):
        rows, n = self.rows, self.rows.n_templates
        index = torch.arange(rows.input_ids.shape[0])

        def add_delta(h):
            bump = torch.zeros_like(h)
            bump[index.to(h.device), rows.subject_last.to(h.device)] = delta.to(h.device, h.dtype)
            return h + bump

        edits = {**_noise_edits(rows, self.dtype), Site("mlp", self.layer): add_delta}
        out = self.model.run(rows.input_ids, edits=edits, grad=torch.is_grad_enabled())
        logits = out.logits[torch.arange(n)[:, None], rows.target_pos]
        kl = out.logits[n, rows.subject_last[n]] if rows.has_kl else None
        return logits, kl

    def _logits(self, delta):
        return self._blocks_logits(delta) if self.engine == "blocks" else self._hooks_logits(delta)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL of the target tokens per template, averaged over templates (or weighted by
        ``template_weights``); KL(new || original))."""
        logits, kl_logits = self._logits(delta)
        logp = torch.log_softmax(logits.float(), -1)
        target = self.rows.target_ids.to(logp.device)
        token_logp = logp.gather(-1, target.expand(logp.shape[0], -1)[..., None])[..., 0]
        per_template = -token_logp.mean(-1)
        if self.template_weights is None:
            nll = per_template.mean()
        else:
            nll = (per_template * self.template_weights.to(per_template.device)).sum()
        kl = torch.zeros((), device=logp.device)
        if kl_logits is not None:
            new = torch.log_softmax(kl_logits.float(), -1)
            kl = (new.exp() * (new - self.kl_init)).sum()
        return nll, kl


# ---- optimisation and the update ---------------------------------------------------------------
@dataclass
class ValueResult:
    delta: torch.Tensor
    reference_norm: float
    trace: list[dict[str, float]]  # per step: loss, nll, kl, weight decay, |delta|
    final_nll: float


def optimize_value(objective: ValueObjective, reference: torch.Tensor, hp, minimize: bool = False) -> ValueResult:
    """Adam on the delta (see module doc). ``hp``: a KeyValueHyperParams."""
    ref_norm = float(reference.norm())
    max_norm = hp.clamp_norm_factor * ref_norm
    delta = torch.zeros(reference.shape[-1], device=reference.device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    trace = []
    for step in range(hp.v_num_grad_steps):
        nll, kl = objective(delta)
        # The public ROME/MEMIT objective's weight decay: |delta| / |reference|^2 (not squared).
        decay = hp.v_weight_decay * delta.norm() / max(ref_norm, 1e-12) ** 2
        loss = (-nll if minimize else nll) + hp.kl_factor * kl + decay
        trace.append({"step": step, "loss": float(loss.detach()), "nll": float(nll.detach()), "kl": float(kl.detach()),
                      "decay": float(decay.detach()), "delta_norm": float(delta.detach().norm())})
        if not minimize and hp.v_stop_nll is not None and float(nll.detach()) < hp.v_stop_nll:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    with torch.no_grad():
        final_nll = float(objective(delta)[0])
    return ValueResult(delta.detach().clone(), ref_norm, trace, final_nll)


def solve_update(C: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, lam: float = 0.0,
                 ridge: float = 0.0) -> torch.Tensor:
    """dW [d_out, d_in] = R (lam I + K^T A^-1 K)^-1 (A^-1 K)^T, A = C + ridge x mean eigenvalue x I.

    ``keys`` [d_in, n], ``residuals`` [d_out, n]. lam = 0, n = 1: ROME's
    (v* - W k*)(C^-1 k*)^T / ((C^-1 k*)^T k*). lam > 0: MEMIT's R ((lam C + K K^T)^-1 K)^T.
    Solved in float64.
    """
    A = C.double()
    if ridge:
        A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    K = keys.double().to(A.device)
    AK = torch.linalg.solve(A, K)
    M = lam * torch.eye(K.shape[1], dtype=A.dtype, device=A.device) + K.T @ AK
    return (residuals.double().to(A.device) @ torch.linalg.solve(M, AK.T)).float()


def param_name(model, param: torch.nn.Parameter) -> str:
    """A parameter's name in ``model.hf`` (found by identity: wrappers rename module trees)."""
    return next(name for name, p in model.hf.named_parameters() if p is param)
