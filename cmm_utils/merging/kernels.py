"""Merge kernels over task vectors (MagMax, task arithmetic, TIES, averaging, random selection);
the two-state and adapter merges (CMM, interpolation, DynaMMo) are in :mod:`cmm_utils.merging.pairwise`.

Every rule is a pure function over state dicts: ``Mapping[str, Tensor]`` in,
``dict[str, Tensor]`` out. Nothing is modified in place and nothing returned
aliases an input. Shared conventions:

* **Floating vs. other entries.** Only floating-point tensors are merged. Integer
  and bool buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied, unmerged,
  from the *base*: the ``base`` argument of :func:`apply`, the first state dict of
  the T-vector rules and of the CMM fold, ``prev`` in :func:`importance_weighted`,
  ``a`` in :func:`linear_interpolation`. :func:`average_adapters` is the exception:
  it takes them from the *last* adapter. Task vectors made by :func:`task_vector`
  hold only floating keys.
* **Validation.** All state dicts given to one call must have the same keys, shapes
  and dtypes. A mismatch raises ``ValueError`` naming the first offending key and
  what was expected vs. found. An empty iterable also raises ``ValueError``.
* **Streaming.** :func:`average`, :func:`task_arithmetic`, :func:`random_select`,
  :func:`magmax`, :func:`continual_importance_merge` and :func:`average_adapters`
  accept any iterable, generators included. They hold one running accumulator and
  the current state dict, never the T inputs, so memory does not grow with T.
  :func:`ties` needs two passes (see its docstring).
* **Precision.** Sums are accumulated in float32 (float64 for float64 tensors).
  Results are returned in the input dtype. Selection rules (MagMax, random) copy
  values and never round them.
* **Non-finite values** are not supported. The selection kernels use ``torch.lerp``
  with a 0/1 weight, which is exact for finite values but turns ``inf`` into NaN.
  A selected ``-0.0`` may come out as ``+0.0``; the two compare equal.

Scaling by λ (``θ = θ0 + λ·τ``) is left to :func:`apply`, as in the authors' code.

References
----------
* MagMax: D. Marczak, B. Twardowski, T. Trzciński, S. Cygert, "MagMax: Leveraging
  Model Merging for Seamless Continual Learning", ECCV 2024, arXiv:2407.06322.
  Code: github.com/danielm1405/magmax (``src/merging/task_vectors.py``, ``ties.py``).
* Task arithmetic: G. Ilharco et al., "Editing Models with Task Arithmetic",
  ICLR 2023, arXiv:2212.04089.
* Weight averaging: M. Wortsman et al., "Model soups", ICML 2022, arXiv:2203.05482.
* TIES: P. Yadav et al., "TIES-Merging: Resolving Interference When Merging
  Models", NeurIPS 2023, arXiv:2306.01708.
* CMM: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual
  Model Merging", arXiv:2509.23592. Code: github.com/VietHoang1512/CMM
  (``interpolate_weights``).
* DynaMMo: M. A. Qazi, I. Almakky, A. U. R. Hashmi, S. Sanjeev, M. Yaqub,
  "DynaMMo: Dynamic Model Merging for Efficient Class Incremental Learning for
  Medical Images", arXiv:2404.14099.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from cmm_utils.merging import streaming as ms
from cmm_utils.merging.streaming import StateDict

__all__ = [
    "apply",
    "average",
    "magmax",
    "random_select",
    "task_arithmetic",
    "task_vector",
    "ties",
]

TwoPassSource = Union[Sequence[StateDict], Callable[[], Iterable[StateDict]]]

# The streaming and validation machinery (chunked constant-memory folds, key/shape/
# dtype checks) lives in merge_streaming, imported as ``ms``.


# ------------------------------------------------------------------- task vectors


@torch.no_grad()
def task_vector(finetuned: StateDict, base: StateDict) -> dict[str, Tensor]:
    r"""Task vector :math:`\tau = \theta_{ft} - \theta_0` (Ilharco et al. 2023, Eq. 1).

    Only floating keys are kept. The authors' ``TaskVector`` skips int64 and uint8
    keys; this function skips every non-floating key (bool and int32 included).
    """
    ms.check(finetuned, ms.spec_of(base, "base"), "finetuned", "base")
    return {k: torch.sub(finetuned[k], base[k]) for k in ms.float_keys(base)}


@torch.no_grad()
def apply(base: StateDict, task_vector: StateDict, scale: float = 1.0) -> dict[str, Tensor]:
    r"""Full state dict :math:`\theta = \theta_0 + \lambda\,\tau` (``TaskVector.apply_to``).

    ``task_vector`` must hold exactly the floating keys of ``base``, with the same
    shapes and dtypes. Non-floating entries are copied from ``base``. The sum is
    computed in the accumulation dtype and rounded once.
    """
    spec = {k: v for k, v in ms.spec_of(base, "base").items() if v[1].is_floating_point}
    ms.check(task_vector, spec, "task vector", "the floating keys of base")
    out = {}
    for k, v in base.items():
        if ms.is_float(v):
            acc = ms.acc_dtype(v.dtype)
            out[k] = torch.add(v.to(acc), task_vector[k].to(acc), alpha=scale).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


# ---------------------------------------------------------- T-vector merge rules


def _add_(cur: Sequence[Tensor], new: Sequence[Tensor], t: int) -> None:
    for cc, nc in zip(cur, new):
        cc.add_(nc)


@torch.no_grad()
def average(task_vectors: Iterable[StateDict]) -> dict[str, Tensor]:
    r"""Element-wise mean :math:`\bar\tau = \frac1T\sum_{t=1}^T \tau_t`.

    This is MagMax's "Avg" baseline (Marczak et al. 2024, Sec. 4; ``sum`` of
    TaskVectors applied with λ = 1/T) and, since all τ share θ0, the weight average
    of the checkpoints (model soups, Wortsman et al. 2022). Streaming; the float32
    sum is divided by T once at the end. The authors instead multiply by λ = 1/T in
    ``apply_to``, so results can differ in the last bit.
    """
    run, n = ms.stream(task_vectors, _add_, ms.acc_dtype)
    for cur in run.flats:
        cur.div_(n)
    return run.result()


@torch.no_grad()
def task_arithmetic(task_vectors: Iterable[StateDict], scale: float) -> dict[str, Tensor]:
    r"""Scaled sum :math:`\tau = \lambda \sum_{t=1}^T \tau_t` (Ilharco et al. 2023, Sec. 2).

    Streaming. The float32 sum is scaled once at the end. The MagMax code has no
    separate task-arithmetic merge: its commented λ sweep over ``sum`` (λ ∈ (0, 2/T])
    is the same rule.
    """
    run, _ = ms.stream(task_vectors, _add_, ms.acc_dtype)
    for cur in run.flats:
        cur.mul_(scale)
    return run.result()


@torch.no_grad()
def magmax(task_vectors: Iterable[StateDict]) -> dict[str, Tensor]:
    r"""Maximum-magnitude selection (MagMax, Marczak et al. 2024, Eq. 3).

    .. math:: \tau^p = \tau^p_{k}, \quad k = \arg\max_t |\tau^p_t|

    Per parameter p, this keeps the *signed* value of the task vector with the
    largest magnitude; there is no sign election. A tie goes to the later task,
    as in the authors' ``merge_max_abs``
    (``torch.where(cur_new.abs() >= cur.abs(), cur_new, cur)``). The paper applies
    the result with λ = 0.5. Streaming: one running selection plus the current τ.
    The result equals the authors' up to the sign of zeros (a selected ``-0.0`` may
    come out as ``+0.0``); inputs must be finite.

    Implementation: ``torch.where`` and bool masks are slow, unvectorised paths on
    CPU. Per cache-sized chunk, a 0/1 float mask from ``ge(out=float)`` followed by
    ``lerp(cur, new, mask)`` does the same selection with vectorised kernels. lerp
    returns exactly ``start`` at weight 0 and exactly ``end`` at weight 1 on finite
    values.
    """
    scratch = ms.Scratch()

    def step(cur: Sequence[Tensor], new: Sequence[Tensor], t: int) -> None:
        for cc, nc in zip(cur, new):
            a = torch.abs(nc, out=scratch.get(0, cc.numel(), cc.dtype, cc.device))
            b = torch.abs(cc, out=scratch.get(1, cc.numel(), cc.dtype, cc.device))
            torch.ge(a, b, out=a)  # 1.0 where |new| >= |cur| (tie -> later task), else 0.0
            torch.lerp(cc, nc, a, out=cc)

    return ms.stream(task_vectors, step)[0].result()


@torch.no_grad()
def random_select(task_vectors: Iterable[StateDict], seed: int) -> dict[str, Tensor]:
    r"""Random mixing: each element is taken from one task drawn uniformly (MagMax's
    "random" baseline, Marczak et al. 2024, Sec. 4; ``merge_rnd_mix``).

    .. math:: \tau^p = \tau^p_{k_p}, \quad k_p \sim \mathcal U\{1,\dots,T\}

    **Deliberate deviation (streaming).** The authors draw
    ``torch.randint(0, T, shape)`` from the global RNG, which needs T up front. A
    generator does not reveal T, so this uses reservoir sampling. The first vector
    is copied. For the t-th vector (t ≥ 2, 1-based), each element is replaced with
    probability 1/t, using a ``torch.Generator`` seeded with ``seed``
    (``random_(0, t) == 0``). Element p ends up from task i with probability
    :math:`\frac1i\prod_{j=i+1}^{T}(1-\frac1j) = \frac1T`, the same uniform
    distribution as the authors' rule (up to the generator's modulo bias,
    < t·2⁻³²). The random bits differ from theirs, so the same seed does not give
    their mask. There is one draw per element and step, in a fixed element order
    (the key packing does not depend on the thread count). Results are therefore
    reproducible for a fixed seed, set of keys and shapes, and torch version,
    whatever the number of threads. A list and a generator of the same vectors
    give the same result.
    CPU tensors only (the generator is a CPU one). The paper applies the result
    with λ = 1.
    """
    gen = torch.Generator().manual_seed(int(seed))
    scratch = ms.Scratch()

    def step(cur: Sequence[Tensor], new: Sequence[Tensor], t: int) -> None:
        for cc, nc in zip(cur, new):
            if cc.device.type != "cpu":
                raise ValueError(f"random_select supports CPU tensors only, found {cc.device}")
            draw = scratch.get(0, cc.numel(), torch.int32, cc.device).random_(0, t, generator=gen)
            pick = torch.eq(draw, 0, out=scratch.get(1, cc.numel(), cc.dtype, cc.device))  # P = 1/t
            torch.lerp(cc, nc, pick, out=cc)

    return ms.stream(task_vectors, step)[0].result()


def _two_pass_source(task_vectors: TwoPassSource) -> Callable[[], Iterable[StateDict]]:
    if callable(task_vectors) and not isinstance(task_vectors, Mapping):
        return task_vectors
    if isinstance(task_vectors, Sequence) and not isinstance(task_vectors, (str, bytes)):
        return lambda: task_vectors
    raise TypeError(
        "ties needs two passes over the task vectors: pass a Sequence (e.g. a list) or a "
        f"zero-argument callable returning a fresh iterable, not a {type(task_vectors).__name__}"
    )


def _ties_thresholds(tv: StateDict, keys: list[str], density: float, scope: str) -> dict[str, float]:
    """Magnitude threshold per key: the k-th smallest |τ| with k = d − int(d·density)."""

    def kth(flat_abs: Tensor) -> float:
        d = flat_abs.numel()
        k = d - int(d * density)
        if d == 0 or k == 0:  # density = 1: keep everything (the authors' kthvalue(0) raises)
            return 0.0
        return flat_abs.kthvalue(k).values.item()

    if scope == "global":
        thr = kth(torch.cat([tv[k].reshape(-1).abs() for k in keys])) if keys else 0.0
        return {k: thr for k in keys}
    return {k: kth(tv[k].reshape(-1).abs()) for k in keys}


def _trimmed(v: Tensor, thr: float) -> Tensor:
    v = v.to(ms.acc_dtype(v.dtype))
    return v * (v.abs() >= thr)


@torch.no_grad()
def ties(task_vectors: TwoPassSource, density: float = 0.2, scope: str = "global") -> dict[str, Tensor]:
    r"""TIES-merging (Yadav et al. 2023, Sec. 3), the version vendored in MagMax
    (``ties.merge_methods("topk", ..., reset_thresh=20, resolve_method="mass",
    merge_func="dis-mean")``). The paper applies the result with λ = 0.55.

    1. *Trim.* For each task, keep the entries with
       :math:`|\tau_t^p| \ge \kappa_t`, where :math:`\kappa_t` is the k-th smallest
       magnitude, k = d − int(d·density), over the flattened vector (d entries).
       Ties at the threshold are kept (``>=``), so a little more than ``density``
       may survive. Call the result :math:`\hat\tau_t`.
    2. *Elect.* :math:`\gamma^p = \mathrm{sign}(\sum_t \hat\tau_t^p)`. Entries with
       :math:`\gamma^p = 0` take the majority sign
       :math:`\mathrm{sign}(\sum_p \gamma^p)`, computed over the whole vector.
    3. *Disjoint mean.* :math:`\tau^p = \sum_{t \in A^p} \hat\tau_t^p / \max(1, |A^p|)`,
       where :math:`A^p = \{t : \hat\tau_t^p > 0\}` if :math:`\gamma^p > 0`, else
       :math:`\{t : \hat\tau_t^p < 0\}`. As in the authors' ``torch.where``, a sign
       that is still 0 counts as negative.

    ``scope="global"`` (default, the authors') computes κ_t over the whole
    flattened task vector: every floating key, key order irrelevant.
    ``scope="per_tensor"`` computes κ_t separately for each tensor, as mergekit
    does. Only the trimming changes; the election and the mean stay the same.
    mergekit also picks exactly k entries by index, not by a ``>=`` threshold.

    Deviation: ``density=1`` keeps every entry, where the authors' ``kthvalue(0)``
    raises. ``density`` must lie in [0, 1]. The authors pass K=20 and divide it by
    100.

    **Memory and input.** TIES needs two passes: one to elect the sign, one for the
    disjoint mean. ``task_vectors`` is therefore either a Sequence (e.g. a list,
    with all T vectors held by the caller) or a zero-argument callable returning a
    fresh iterable for each pass. The callable is the streaming version: it holds
    only the current vector plus about three vectors of state (sum, then int8
    signs + sum + count). In global scope, ``kthvalue`` also needs the flattened
    |τ_t| and its internal copy: two more vectors, briefly. A one-shot iterator or generator raises ``TypeError``. The authors'
    code ``vstack``-s all T flattened vectors (T × d, plus copies).
    """
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"unknown ties scope {scope!r}; valid: 'global', 'per_tensor'")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    make = _two_pass_source(task_vectors)

    # Pass 1: per-task thresholds and the sum of trimmed vectors (for sign election).
    thresholds: list[dict[str, float]] = []
    ssum: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    spec = None
    for tv in ms.validated(make()):
        if not thresholds:
            spec = ms.spec_of(tv, "task vector 1")
            keys = ms.float_keys(tv)
            out = {k: v.clone() for k, v in tv.items() if not ms.is_float(v)}
            dtypes = {k: tv[k].dtype for k in keys}
            ssum = {k: torch.zeros(tv[k].shape, dtype=ms.acc_dtype(tv[k].dtype), device=tv[k].device) for k in keys}
        thr = _ties_thresholds(tv, keys, density, scope)
        thresholds.append(thr)
        for k in keys:
            ssum[k].add_(_trimmed(tv[k], thr[k]))
        del tv

    # Sign election; zeros take the majority sign over the whole vector.
    signs: dict[str, Tensor] = {}
    total = 0.0
    for k in keys:
        signs[k] = torch.sign(ssum.pop(k)).to(torch.int8)
        total += signs[k].sum(dtype=torch.float64).item()
    majority = int((total > 0) - (total < 0))
    for s in signs.values():
        s.masked_fill_(s == 0, majority)

    # Pass 2: disjoint mean of the trimmed entries that agree with the elected sign.
    total_sum = {k: torch.zeros_like(signs[k], dtype=ms.acc_dtype(dtypes[k])) for k in keys}
    count = {k: torch.zeros_like(signs[k], dtype=ms.acc_dtype(dtypes[k])) for k in keys}
    n = 0
    for tv in make():
        n += 1
        if n > len(thresholds):
            break
        ms.check(tv, spec, f"task vector {n} (second pass)", "task vector 1")
        for k in keys:
            trimmed = _trimmed(tv[k], thresholds[n - 1][k])
            keep = torch.where(signs[k] > 0, trimmed > 0, trimmed < 0)
            total_sum[k].add_(trimmed * keep)
            count[k].add_(keep)
        del tv
    if n != len(thresholds):
        raise ValueError(
            f"ties: the second pass yielded {'more than ' if n > len(thresholds) else ''}{n} task vectors, "
            f"the first {len(thresholds)}; the callable must return the same vectors each time"
        )
    for k in keys:
        out[k] = total_sum[k].div_(count[k].clamp_(min=1)).to(dtypes[k])
    return {k: out[k] for k in spec}
