"""Merges of two states and of adapters: CMM's importance-weighted fold, plain interpolation,
DynaMMo's adapter averaging. The conventions (floating entries only, validation, streaming,
precision) are those of :mod:`cmm_utils.merging.kernels`; the references are listed there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from cmm_utils.merging import streaming as ms
from cmm_utils.merging.kernels import average
from cmm_utils.merging.streaming import StateDict

__all__ = ["BN_POLICIES", "average_adapters", "bn_statistic", "continual_importance_merge", "importance_weighted",
           "linear_interpolation"]


# -------------------------------------------------------------------------- CMM


class _CMMState:
    """Running (θ, F) of the CMM fold, owned, in the accumulation dtype."""

    def __init__(self, model: StateDict, importance: StateDict) -> None:
        fkeys = ms.float_keys(model)
        self.order, self.imp_order = list(model), list(importance)
        self.dtypes = {k: model[k].dtype for k in fkeys}
        self.imp_dtypes = {k: v.dtype for k, v in importance.items()}
        compute = {k: torch.promote_types(ms.acc_dtype(model[k].dtype), ms.acc_dtype(f.dtype)) for k, f in importance.items()}
        self.lay_imp = ms.Layout(list(importance), [model, importance])
        self.theta = self.lay_imp.own(model, compute)
        self.imp = self.lay_imp.own(importance, compute)
        self.chunk = ms.chunk()
        self.theta_chunks = [f.split(self.chunk) for f in self.theta]
        self.imp_chunks = [f.split(self.chunk) for f in self.imp]
        rest = [k for k in fkeys if k not in importance]
        self.lay_rest = ms.Layout(rest, [model])
        self.rest = self.lay_rest.own(model, {k: ms.acc_dtype(self.dtypes[k]) for k in rest})
        self.carried = {k: v.clone() for k, v in model.items() if not ms.is_float(v)}
        self.scratch = ms.Scratch()

    def step(self, model: StateDict, importance: StateDict, alpha: float) -> None:
        """One merge, in place. w = αF_t/((1−α)F + αF_t); θ ← lerp(θ, θ_t, w)."""
        sc = self.scratch
        flats = zip(self.theta_chunks, self.imp_chunks, self.lay_imp.flats(model), self.lay_imp.flats(importance))
        for th_chunks, f_chunks, tt, ft in flats:
            for th, fc, tc, fn in zip(th_chunks, f_chunks, tt.split(self.chunk), ft.split(self.chunk)):
                cd, n = th.dtype, th.numel()
                b = torch.mul(sc.cast(1, fn, cd), alpha, out=sc.get(0, n, cd, th.device))
                fc.mul_(1.0 - alpha).add_(b)  # F ← (1−α)F_prev + αF_t, the denominator
                w = torch.div(b, fc, out=b)  # αF_t / denominator; 0/0 = NaN
                torch.nan_to_num(w, nan=alpha, out=w)  # guard: zero denominator → weight α
                torch.lerp(th, sc.cast(2, tc, cd), w, out=th)
        for th, tt in zip(self.rest, self.lay_rest.flats(model)):
            th.lerp_(tt.to(th.dtype), alpha)  # no importance: plain interpolation

    def result(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        merged = {**self.lay_imp.unpack(self.theta, self.dtypes), **self.lay_rest.unpack(self.rest, self.dtypes)}
        merged.update(self.carried)
        imp = self.lay_imp.unpack(self.imp, self.imp_dtypes)
        return {k: merged[k] for k in self.order}, {k: imp[k] for k in self.imp_order}


@torch.no_grad()
def importance_weighted(
    prev: StateDict,
    prev_importance: StateDict,
    new: StateDict,
    new_importance: StateDict,
    alpha: float,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""CMM's optimizer-state-weighted merge (Phan et al. 2025; ``interpolate_weights``).

    .. math::
        \theta = \frac{(1-\alpha)F_{prev}\,\theta_{prev} + \alpha F_t\,\theta_t}
                      {(1-\alpha)F_{prev} + \alpha F_t}, \qquad
        F = (1-\alpha)F_{prev} + \alpha F_t

    Element-wise. F is Adam's ``exp_avg_sq`` (no bias correction) in the authors'
    code; α is ``--alpha_merge`` (default 0.4). Returns ``(merged, importance)``.
    ``merged`` is a full state dict with non-floating entries from ``prev``.
    ``importance`` has the keys of ``prev_importance``, in its dtype.

    The importances may cover only some floating keys of the model. Keys without
    importance are interpolated plainly, :math:`(1-\alpha)\theta_{prev}+\alpha\theta_t`,
    as the authors do for keys with no Fisher. F must be non-negative and
    0 ≤ α ≤ 1.

    The equation is evaluated as ``lerp(θ_prev, θ_t, w)`` with
    :math:`w = \alpha F_t / ((1-\alpha)F_{prev}+\alpha F_t)`. That is the same
    quantity, rounded differently. It is exactly θ_prev at α = 0 and exactly θ_t
    at α = 1.

    **Deviation (guard):** where the denominator is 0 (both importances 0), the
    authors' code gives NaN. Here it falls back to plain interpolation
    (1−α)θ_prev + αθ_t. A NaN in F also lands in this fallback.
    """
    alpha = ms.check_alpha(alpha)
    mspec = ms.spec_of(prev, "prev")
    ms.check(new, mspec, "new", "prev")
    ispec = ms.check_importance(prev_importance, mspec, "prev_importance")
    ms.check(new_importance, ispec, "new_importance", "prev_importance")
    state = _CMMState(prev, prev_importance)
    state.step(new, new_importance, alpha)
    return state.result()


@torch.no_grad()
def continual_importance_merge(
    models_and_importances: Iterable[tuple[StateDict, StateDict]], alpha: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    r"""Fold :func:`importance_weighted` over a stream of ``(θ_t, F_t)`` pairs (CMM).

    :math:`(\theta, F) \leftarrow (\theta_1, F_1)`, then for t = 2..T
    :math:`(\theta, F) \leftarrow \mathrm{merge}_\alpha(\theta, F, \theta_t, F_t)`.
    Older tasks' importance is discounted by (1−α) at each step. Only the running
    pair and the current pair are held, so memory does not depend on T (paper,
    Sec. "constant memory"; the authors keep the merged model and ``fisher_{t}.pt``).

    The running pair is kept in float32 (float64 for float64) across steps and
    rounded to the input dtype once at the end. For float32 inputs the result is
    bit-identical to chaining :func:`importance_weighted`. For float16/bfloat16 it
    is slightly more accurate than rounding at every step, as the authors do. Same
    guard as :func:`importance_weighted`.
    """
    alpha = ms.check_alpha(alpha)
    state = mspec = ispec = None
    n = 0
    for pair in models_and_importances:
        n += 1
        try:
            model, importance = pair
        except (TypeError, ValueError):
            raise TypeError(f"item {n} must be a (model, importance) pair") from None
        if n == 1:
            mspec = ms.spec_of(model, "model 1")
            ispec = ms.check_importance(importance, mspec, "importance 1")
            state = _CMMState(model, importance)
        else:
            ms.check(model, mspec, f"model {n}", "model 1")
            ms.check(importance, ispec, f"importance {n}", "importance 1")
            state.step(model, importance, alpha)
        del pair, model, importance
    if n == 0:
        raise ValueError("expected at least one (model, importance) pair, got an empty iterable")
    return state.result()


@torch.no_grad()
def linear_interpolation(a: StateDict, b: StateDict, alpha: float) -> dict[str, Tensor]:
    r""":math:`\theta = (1-\alpha)\,\theta_a + \alpha\,\theta_b` (``torch.lerp``).

    This is CMM's "linear interpolation (no Fisher)" ablation, which the committed
    DIL script runs via ``if True:`` in ``interpolate_weights``, and it traces the
    1-D paths in the loss-path figures. α may lie outside [0, 1] (extrapolation).
    The result is exactly ``a`` at α = 0 and exactly ``b`` at α = 1. Non-floating
    entries are copied from ``a``.
    """
    ms.check(b, ms.spec_of(a, "a"), "b", "a")
    out = {}
    for k, va in a.items():
        if ms.is_float(va):
            acc = ms.acc_dtype(va.dtype)
            out[k] = torch.lerp(va.to(acc), b[k].to(acc), float(alpha)).to(va.dtype)
        else:
            out[k] = va.clone()
    return out


# ---------------------------------------------------------------------- DynaMMo

BN_POLICIES = ("average", "last", "reset")


def bn_statistic(key: str) -> str | None:
    """``"running_mean"`` / ``"running_var"`` if ``key`` is a BatchNorm running statistic, else None."""
    for suffix in ("running_mean", "running_var"):
        if key.endswith(suffix):
            return suffix
    return None


@torch.no_grad()
def average_adapters(adapter_state_dicts: Iterable[StateDict], bn_policy: str = "average") -> dict[str, Tensor]:
    r"""DynaMMo's adapter merge (Qazi et al. 2024, Sec. 2, merged inference):
    :math:`\bar A = \frac1T \sum_t A_t`, element-wise over the adapters' state dicts.

    Every floating entry is averaged, including the adapter's learnable scale α, as
    in the released ``test_mode`` (which averages whole ``state_dict``-s through
    an undefined ``average_dicts``; the element-wise mean is the natural reading).
    BatchNorm running statistics (keys ending in ``running_mean`` /
    ``running_var``) follow ``bn_policy``:

    * ``"average"``: averaged like weights (the natural reading of the code).
    * ``"last"``: taken from the newest (last) adapter.
    * ``"reset"``: running_mean = 0, running_var = 1.

    Non-floating entries (``num_batches_tracked``) come from the last adapter, under
    every policy. The released code would average them too: ``torch.mean`` fails on
    int64, hence this choice. Streaming: one running sum plus the current adapter.
    The released code instead re-averages at every forward call.
    """
    if bn_policy not in BN_POLICIES:
        raise ValueError(f"unknown bn_policy {bn_policy!r}; valid: {', '.join(map(repr, BN_POLICIES))}")
    order: list[str] = []
    last: dict[str, Tensor] = {}

    def averaged(k: str, v: Tensor) -> bool:
        return ms.is_float(v) and (bn_policy == "average" or not bn_statistic(k))

    def split(stream: Iterable[StateDict]) -> Iterator[dict[str, Tensor]]:
        for sd in ms.validated(stream, "adapter state dict"):
            if not order:
                order.extend(sd)
            last.clear()
            last.update({k: v.clone() for k, v in sd.items() if not averaged(k, v)})  # small
            yield {k: v for k, v in sd.items() if averaged(k, v)}
            del sd

    out = average(split(adapter_state_dicts))
    for k, v in last.items():
        stat = bn_statistic(k)
        if bn_policy == "reset" and stat and ms.is_float(v):
            out[k] = torch.full_like(v, 0.0 if stat == "running_mean" else 1.0)
        else:
            out[k] = v
    return {k: out[k] for k in order}
