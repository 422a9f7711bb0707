"""The key/value core shared by ROME and MEMIT.

- Rows: the edit prompt behind every context template, followed by the target's tokens
  but the last (teacher forcing), plus the KL prompt "{subject} is a". Row 0 is the bare
  prompt (template "{}").
- Keys: the down-projection input at the last subject token (``Site("mlp_in", l)``).
- The target value: a delta added at the last subject token to the output of block l
  (where the MLP's output enters the residual stream: adding to the MLP output or to the
  block output is the same thing, the MLP being the last term of every block), optimised
  by Adam on NLL(target) over all templates + kl_factor x KL(new || original) of the
  next-token distribution at the KL prompt's last subject token + weight decay
  v_weight_decay x |delta| / |reference|^2, |delta| clamped to clamp_norm_factor x |reference|.
  As in the public ROME/MEMIT code, the reference is the value at row 0 (the bare
  prompt) in the first forward pass; the loop runs ``v_num_grad_steps`` forward passes and
  steps after each but the last, and stops early once the total loss < 5e-2
  (``hparams.KeyValueHyperParams`` names the other conventions).
- The update: dW = R (lambda I + K^T C^-1 K)^-1 (C^-1 K)^T, in (out, in) orientation; with
  lambda = 0 and one key this is ROME's rank-one update, with lambda = mom2_update_weight
  MEMIT's (lambda C + K K^T)^-1 K solve, rewritten so that lambda = 0 stays defined.

Engines (``ValueObjective``); every pass goes through the partial forward ``Model.forward``,
which decides in one place whether the model's blocks are driven or whole passes run (the
TransformerLens and nnsight backends). ``"blocks"``: one pass without gradients records every
row; the positions before each row's last subject token s_i cannot see the delta (causal
attention), so each step re-runs only a branch of the recording: every row's positions s_i up to
its last scored position, from block l+1 up, entering with the recorded state + delta, with
logits only where they are scored. ``"hooks"``: a whole pass from the tokens per step with an
edit at ``Site("mlp", l)`` adding the delta; for subject noise drawn afresh for every pass (the
paper code's Fact Forcing), where nothing can be reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracekit import prompts as P
from tracekit.adapters import Site
from tracekit.editing.request import EditRequest
from tracekit.editing.subject_noise import as_subject_noise
from tracekit.errors import check
from tracekit.tracing.noise import spans_noise_hook


# ---- rows ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EditRows:
    input_ids: torch.Tensor  # [R, T] right-padded; rows 0..n_templates-1 are templates, then the KL row
    lengths: torch.Tensor  # [R]
    subject_last: torch.Tensor  # [R] position of each row's last subject token
    spans: tuple[tuple[int, int], ...]  # [R] each row's subject span
    target_ids: torch.Tensor  # [m]
    target_pos: torch.Tensor  # [n_templates, m] positions whose logits score the target tokens
    n_templates: int
    noise: object | None  # a SubjectNoise (Fact Forcing), or None
    subject_tokens: tuple[tuple[int, ...], ...] = ()  # each template row's subject token ids
    groups: tuple[int, ...] = ()  # template rows per context type ("{}" first), for MEMIT's key average

    @property
    def has_kl(self) -> bool:
        return self.input_ids.shape[0] > self.n_templates


def _subject_span(tokenizer, text: str, subject: str, after: int) -> tuple[int, int]:
    """The subject's span in ``text``, taking its first occurrence at or after character ``after``."""
    occurrence = text[:after].count(subject)
    return P.subject_span(tokenizer, text, subject, occurrence)


def flatten_templates(templates) -> tuple[list[str], tuple[int, ...]]:
    """Templates as a flat list and the size of each context type.

    Groups are given as a list of lists (MEMIT's form: [["{}"], [...]]); a flat list is read
    as the bare prompt (its first entry) followed by one group of the rest."""
    templates = list(templates)
    check(len(templates) > 0, "no context templates")
    if all(isinstance(t, str) for t in templates):
        return templates, tuple(x for x in (1, len(templates) - 1) if x)
    groups = [list(g) for g in templates]
    check(all(g and all(isinstance(t, str) for t in g) for g in groups), "context template groups must be lists of str")
    return [t for g in groups for t in g], tuple(len(g) for g in groups)


def build_rows(model, request: EditRequest, templates, kl_prompt: str | None) -> EditRows:
    templates, groups = flatten_templates(templates)
    tok = model.tokenizer
    target = model.target_ids(request.target)
    rows, spans, target_pos, subject_tokens = [], [], [], []
    for template in templates:
        check("{}" in template, f"context template {template!r} has no '{{}}'")
        at = template.index("{}")
        text = template[:at] + request.text + template[at + 2:]
        span = _subject_span(tok, text, request.subject, at + request.prompt.index("{}"))
        prompt_ids = P.token_ids(tok, text)
        rows.append(prompt_ids + target[:-1])
        spans.append(span)
        subject_tokens.append(tuple(prompt_ids[span[0]:span[1]]))
        target_pos.append([len(prompt_ids) - 1 + j for j in range(len(target))])
    n_templates = len(rows)
    if kl_prompt is not None:
        text = kl_prompt.format(request.subject)
        spans.append(_subject_span(tok, text, request.subject, kl_prompt.index("{}")))
        rows.append(P.token_ids(tok, text))
    batch = P.pad(rows, tok.pad_token_id)
    noise = as_subject_noise(model, request)
    return EditRows(batch.input_ids, batch.lengths, torch.tensor([e - 1 for _, e in spans]), tuple(spans),
                    torch.tensor(target), torch.tensor(target_pos), n_templates, noise, tuple(subject_tokens), groups)


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


def average_keys(keys: torch.Tensor, groups: tuple[int, ...], how: str) -> torch.Tensor:
    """k* from the template rows' keys: "uniform" (ROME's compute_u) or "per-context-type"
    (MEMIT's compute_ks: the mean of each context type's mean, so the bare prompt weighs as
    much as all sampled templates of one length together)."""
    if how == "uniform":
        return keys.mean(0)
    check(how == "per-context-type", f"unknown key average {how!r}; choose uniform or per-context-type")
    check(sum(groups) == keys.shape[0], f"context groups {groups} do not cover {keys.shape[0]} template rows")
    return torch.stack([chunk.mean(0) for chunk in torch.split(keys, list(groups))]).mean(0)


# ---- subject noise inside edit passes ----------------------------------------------------------
class NoisePasses:
    """The subject noise of one edit, pass by pass (one stream per edit, as the paper's code)."""

    def __init__(self, rows: EditRows, d_model: int):
        self.rows = rows
        self.noise = rows.noise
        self.source = None if self.noise is None else self.noise.source(d_model)

    @property
    def fresh(self) -> bool:
        return self.noise is not None and self.noise.fresh_per_pass

    def edits(self, row_index) -> dict:
        """The embedding hook for a pass over rows ``row_index`` (draws from the stream)."""
        if self.noise is None:
            return {}
        spans = [self.rows.spans[i] for i in row_index]
        spans, draws, align = self.noise.edit_plan(self.source, spans)
        return {Site("embed"): spans_noise_hook(spans, draws, align)}

    def suspended(self):
        """Draws made inside this block leave the stream where it was (extra passes for reporting)."""
        return _Suspended(self.source)


class _Suspended:
    def __init__(self, source):
        self.source = source

    def __enter__(self):
        self.state = None if self.source is None or not hasattr(self.source, "state") else self.source.state()

    def __exit__(self, *exc):
        if self.state is not None:
            self.source.restore(self.state)


# ---- states at the last subject token ---------------------------------------------------------
@torch.no_grad()
def subject_states(model, rows: EditRows, sites: list[Site], row_index=None,
                   noise: NoisePasses | None = None) -> dict[Site, torch.Tensor]:
    """Each site's value at the last subject token of rows ``row_index`` (default: the template
    rows), from one partial forward over those rows alone, up to the highest site's layer:
    {site: [len(row_index), d]}."""
    row_index = list(range(rows.n_templates)) if row_index is None else list(row_index)
    ids = rows.input_ids[row_index]
    width = int(rows.lengths[row_index].max())
    edits = noise.edits(row_index) if noise is not None else {}
    top = max(s.layer for s in sites if s.layer is not None)
    out = model.forward(ids[:, :width], stop_layer=top + 1, edits=edits, capture=sites)
    index = torch.arange(len(row_index))
    last = rows.subject_last[row_index]
    return {site: value[index.to(value.device), last.to(value.device)].float() for site, value in out.captured.items()}


# ---- the value objective ------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectValues:
    """The template rows' states at the last subject token in the first (delta = 0) pass."""

    keys: torch.Tensor  # [n, d_in] down-projection inputs
    mlp_out: torch.Tensor  # [n, d_model] MLP outputs
    resid: torch.Tensor  # [n, d_model] block outputs


class ValueObjective:
    """NLL of the target and KL on the KL prompt as functions of the delta at block ``layer``.

    The first call (at delta = 0; one is made first if need be) records ``initial`` (the template
    rows' key, MLP output and block output at the last subject token) and the KL prompt's
    original distribution, as the public code records target_init and kl_distr_init.

    Every pass goes through the partial forward (``Model.forward``), which decides whether the
    model's blocks are driven or whole passes run (``model.forward_path``). ``engine``:
    "blocks" (the default where the noise allows; ``kv_batch.BatchedObjective`` with one
    request): one recorded pass of every row, then each call re-runs only a branch of the
    recording: rows from their last subject token on, from block ``layer + 1`` up, entering with
    the recorded state + delta (earlier positions cannot see the delta); "hooks": a whole pass
    from the tokens for every call, the delta added by an edit at ``Site("mlp", layer)`` (subject
    noise drawn afresh per pass needs it).
    """

    def __init__(self, model, rows: EditRows, layer: int, engine: str = "auto",
                 template_weights: torch.Tensor | None = None, noise: NoisePasses | None = None):
        """``template_weights`` [n_templates], summing to 1: weigh the templates' NLL (default: equally)."""
        self.model, self.rows, self.layer = model, rows, layer
        self.template_weights = template_weights
        self.noise = noise if noise is not None else NoisePasses(rows, model.d_model)
        reason = "the subject noise is drawn afresh for every pass" if self.noise.fresh else None
        if engine == "auto":
            engine = "blocks" if reason is None else "hooks"
        check(engine in ("blocks", "hooks"), f"unknown engine {engine!r}; choose blocks or hooks")
        check(engine == "hooks" or reason is None, f"the blocks engine cannot run this edit: {reason}")
        self.mode = engine
        # what ran: "blocks" when the seam drives the blocks for a branch, else whole passes ("hooks")
        self.engine = "blocks" if engine == "blocks" and model.forward_path == "blocks" else "hooks"
        self.initial: SubjectValues | None = None
        self.kl_init: torch.Tensor | None = None
        self.calls = 0
        self.batch = None
        if self.mode == "blocks":
            from tracekit.editing.kv_batch import BatchedObjective

            self.batch = BatchedObjective(model, [rows], layer, [template_weights], noises=[self.noise])
            self.initial = self.batch.initials[0]

    # -- hooks engine: a whole pass per call --------------------------------------------------------
    def _hooks_logits(self, delta: torch.Tensor):
        rows, n = self.rows, self.rows.n_templates
        index = torch.arange(rows.input_ids.shape[0])

        def add_delta(h):
            bump = torch.zeros_like(h)
            bump[index.to(h.device), rows.subject_last.to(h.device)] = delta.to(h.device, h.dtype)
            return h + bump

        sites = [Site("mlp_in", self.layer), Site("mlp", self.layer), Site("resid", self.layer)]
        edits = {**self.noise.edits(range(len(index))), Site("mlp", self.layer): add_delta}
        cols = torch.zeros(len(index), rows.target_pos.shape[1], dtype=torch.long)
        cols[:n] = rows.target_pos - rows.subject_last[:n, None]
        out = self.model.forward(rows.input_ids, edits=edits, grad=torch.is_grad_enabled(),
                                 capture=sites if self.initial is None else (),
                                 logits=cols + rows.subject_last[:, None])
        if self.initial is None:  # delta = 0 here: the captured values are the original ones
            at = rows.subject_last[:n]
            self.initial = SubjectValues(*(out.captured[s][torch.arange(n), at.to(out.captured[s].device)]
                                           .detach().float() for s in sites))
        return out.logits[:n], (out.logits[n, 0] if rows.has_kl else None)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL of the target tokens per template, averaged over templates (or weighted by
        ``template_weights``); KL(new || original))."""
        if self.calls == 0 and bool(delta.detach().any()):  # record the originals at delta = 0 first
            with torch.no_grad():
                self(torch.zeros_like(delta.detach()))
        self.calls += 1
        if self.batch is not None:
            return self.batch.losses([delta], [0])[0]
        logits, kl_logits = self._hooks_logits(delta)
        nll, kl, self.kl_init = value_terms(self.rows, logits, kl_logits, self.template_weights, self.kl_init)
        return nll, kl


def value_terms(rows: EditRows, logits: torch.Tensor, kl_logits: torch.Tensor | None,
                template_weights: torch.Tensor | None, kl_init: torch.Tensor | None):
    """(NLL, KL, kl_init): the templates' mean NLL of the target (or weighted by
    ``template_weights``) from logits [n_templates, m, V], and KL(new || original) of the KL
    row's next-token distribution [V]; the first call's distribution becomes ``kl_init``."""
    logp = torch.log_softmax(logits.float(), -1)
    target = rows.target_ids.to(logp.device)
    token_logp = logp.gather(-1, target.expand(logp.shape[0], -1)[..., None])[..., 0]
    per_template = -token_logp.mean(-1)
    if template_weights is None:
        nll = per_template.mean()
    else:
        nll = (per_template * template_weights.to(per_template.device)).sum()
    kl = torch.zeros((), device=logp.device)
    if kl_logits is not None:
        new = torch.log_softmax(kl_logits.float(), -1)
        if kl_init is None:
            kl_init = new.detach()
        kl = (new.exp() * (new - kl_init)).sum()
    return nll, kl, kl_init


def _unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and unembedding of last-block outputs."""
    norm = model.hf.get_submodule(model.adapter.final_norm)
    return model.adapter.unembed_module(model.hf)(norm(hidden))


# ---- optimisation and the update ---------------------------------------------------------------
@dataclass
class ValueResult:
    delta: torch.Tensor
    reference: torch.Tensor  # the value the clamp radius and the weight decay are sized on
    trace: list[dict[str, float]]  # per forward pass: loss, nll, kl, weight decay, |delta|
    final_nll: float
    steps: int  # optimiser steps taken

    @property
    def reference_norm(self) -> float:
        return float(self.reference.norm())


def optimize_value(objective: ValueObjective, hp, minimize: bool = False, reference_site: str = "mlp") -> ValueResult:
    """Adam on the delta (module doc). ``hp``: a KeyValueHyperParams. ``reference_site``:
    "mlp" (ROME: the MLP output) or "resid" (MEMIT: the block output) sizes the clamp."""
    return optimize_values(_One(objective), hp, [minimize], reference_site)[0]


class _One:
    """A ``ValueObjective`` seen as a batch of one request (``optimize_values``'s interface)."""

    def __init__(self, objective: ValueObjective):
        self.objective = objective
        self.size, self.device, self.d_model = 1, objective.model.device, objective.model.d_model

    def losses(self, deltas, active):
        return [self.objective(deltas[0])]

    def initial(self, r: int) -> SubjectValues:
        return self.objective.initial

    def suspended(self):
        return self.objective.noise.suspended()


def optimize_values(objective, hp, minimize, reference_site: str = "mlp") -> list[ValueResult]:
    """``optimize_value`` for ``objective.size`` requests at once: one delta (and one Adam) per
    request, every active request's rows in each pass (``objective.losses(deltas, active)`` ->
    [(nll, kl)] for the active ones). Each request follows exactly its own single-request schedule:
    its trace, early stop and final step are decided on its own loss, and a stopped request's
    rows leave the passes."""
    k, device = objective.size, objective.device
    deltas = [torch.zeros(objective.d_model, device=device, requires_grad=True) for _ in range(k)]
    optimizers = [torch.optim.Adam([delta], lr=hp.v_lr) for delta in deltas]
    traces: list[list[dict]] = [[] for _ in range(k)]
    steps, references, ref_norms = [0] * k, [None] * k, [0.0] * k
    active = list(range(k))
    for it in range(hp.v_num_grad_steps):
        if not active:
            break
        results = objective.losses(deltas, active)
        stepping, total = [], None
        for r, (nll, kl) in zip(active, results):
            if references[r] is None:
                values = getattr(objective.initial(r), "mlp_out" if reference_site == "mlp" else "resid")
                reference = values[0] if hp.value_reference == "first-row" else values.mean(0)
                references[r] = reference.to(device)
                ref_norms[r] = float(references[r].norm())
            probability = minimize[r] and hp.erasure_objective == "probability"
            target_term = torch.exp(-nll) if probability else (-nll if minimize[r] else nll)
            decay = hp.v_weight_decay * deltas[r].norm() / max(ref_norms[r], 1e-30) ** 2
            loss = target_term + hp.kl_factor * kl + decay
            traces[r].append({"step": it, "loss": float(loss.detach()), "nll": float(nll.detach()),
                              "kl": float(kl.detach()), "decay": float(decay.detach()),
                              "delta_norm": float(deltas[r].detach().norm())})
            last = it == hp.v_num_grad_steps - 1
            if not minimize[r]:
                watched = {"loss": traces[r][-1]["loss"], "nll": traces[r][-1]["nll"]}.get(hp.v_stop_on)
                if watched is not None and watched < hp.v_stop_below:
                    continue
                if last and not hp.v_final_step:
                    continue
            elif last and not hp.erasure_final_step:  # the paper's Fact Erasure code never stops early
                continue
            stepping.append(r)
            total = loss if total is None else total + loss
        if stepping:
            for r in stepping:
                optimizers[r].zero_grad()
            total.backward()  # rows are independent: each delta gets its own request's gradient
            for r in stepping:
                optimizers[r].step()
                steps[r] += 1
                with torch.no_grad():
                    max_norm = hp.clamp_norm_factor * ref_norms[r]
                    norm = deltas[r].norm()
                    if norm > max_norm:
                        deltas[r].mul_(max_norm / norm)
        active = stepping
    final = [traces[r][-1]["nll"] if steps[r] < len(traces[r]) else None for r in range(k)]
    unseen = [r for r in range(k) if final[r] is None]  # the last pass did not see the final delta
    if unseen:
        with torch.no_grad(), objective.suspended():
            for r, (nll, _) in zip(unseen, objective.losses(deltas, unseen)):
                final[r] = float(nll)
    return [ValueResult(deltas[r].detach().clone(), references[r], traces[r], final[r], steps[r]) for r in range(k)]


def solve_update(C, keys: torch.Tensor, residuals: torch.Tensor, lam: float = 0.0,
                 ridge: float = 0.0, denominator_keys: torch.Tensor | None = None) -> torch.Tensor:
    """dW [d_out, d_in] = R (lam I + D^T A^-1 K)^-1 (A^-1 K)^T, A = C + ridge x mean eigenvalue x I.

    ``C``: the matrix, or a ``factors.KeySolver`` / ``factors.LayerStats`` whose factorisation of
    A is made once and reused (``tracekit.editing.factors``; ``ridge`` is then the LayerStats').
    ``keys`` K [d_in, n], ``residuals`` R [d_out, n]; D = ``denominator_keys`` (default K).
    lam = 0, n = 1: ROME's (v* - W k* - b)(C^-1 k*)^T / ((C^-1 k*)^T k*), or with D = k_p
    the public code's (v* - W k_p - b)(C^-1 k*)^T / ((C^-1 k*)^T k_p). lam > 0: MEMIT's
    R ((lam C + K K^T)^-1 K)^T, which equals this form (push-through identity), so MEMIT's
    system is a rank-n correction of the factored A. Solved in float64 on the factor's device.
    """
    from tracekit.editing.factors import KeySolver, LayerStats, factorise

    if isinstance(C, LayerStats):
        solver = C.solver(ridge)
    elif isinstance(C, KeySolver):
        solver = C
    else:
        solver = factorise(C, ridge)
    K = keys.double().to(solver.device)
    D = K if denominator_keys is None else denominator_keys.double().to(solver.device)
    AK = solver.solve(K)
    M = lam * torch.eye(K.shape[1], dtype=torch.float64, device=solver.device) + D.T @ AK
    check(bool(torch.isfinite(M).all()), "the key statistics give a non-finite update; check C and the key")
    return (residuals.double().to(solver.device) @ torch.linalg.solve(M, AK.T)).float()


def param_name(model, param: torch.nn.Parameter) -> str:
    """A parameter's name in ``model.hf`` (found by identity: wrappers rename module trees)."""
    return next(name for name, p in model.hf.named_parameters() if p is param)
