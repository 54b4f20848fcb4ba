"""Permutation alignment of two networks with different initialisations (Git Re-Basin weight matching).

MedMerge's "other merging methods" (Almakky et al. 2024) are merges of two models that started
from different initialisations. Averaging such models unit by unit is meaningless unless the units
are first put into correspondence. This module finds that correspondence by *weight matching*
(Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023, Algorithm 2; Entezari et al. 2022 for the permutation conjecture that MedMerge cites):
for every permutation group ``p``, with all other groups fixed,

    P_p = argmax_P  sum_{(W, axis) touching p}  < W_a , P W_b >     (a linear assignment problem)

solved with ``scipy.optimize.linear_sum_assignment`` and iterated over the groups in a seeded
random order until no group improves (the reference ``weight_matching`` loop of
``samuela/git-re-basin`` ``src/weight_matching.py``).

**Specs.** The permutation groups of each architecture are in
:mod:`cmm_utils.papers.medmerge.permutation_specs` (:func:`~cmm_utils.papers.medmerge.permutation_specs.permutation_spec`).

**Feature matching and ZipIt!** The same groups carry merge/unmerge matrices (see below):
activation matching (the MedMerge authors' ``match_tensors_permute``: an assignment on the
correlation of the two models' features) and ZipIt! (Stoica et al., ICLR 2024,
``match_tensors_zipit``: greedy pairing of the 2n features of both models, within-model pairs
allowed). Deviations from ZipIt!'s graph code: the merge points are exactly the spec's groups (a
convolution's output, after its BN and ReLU where there is one; a residual stream pools the
correlations of every block output that adds into it; a dense layer's new features before the
concatenation), the whole network is zipped (no partial zipping), BN parameters are merged with the
merge matrix of their channels and the running statistics recomputed afterwards, as the authors'
scripts do with ``reset_bn_stats``.

Deliberate deviations from the reference code, all for BatchNorm (its spec lists BN ``scale`` and
``bias`` only): running statistics are in the spec, so :func:`apply_permutation` is exactly
function-preserving, but they are left out of the matching cost (they are statistics, not
weights), and after averaging the book resets and recomputes them on target training data
(:func:`cmm_utils.papers.medmerge.landscape.recompute_bn`; the authors' baseline scripts call ``reset_bn_stats``).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from cmm_utils import merging
from cmm_utils.papers.medmerge.permutation_specs import (BN_STATS, PermutationSpec, StateDict, apply_permutation,
                                                        identity_perms, permute_tensor)


def _cost_keys(spec: PermutationSpec, state: StateDict) -> set[str]:
    return {k for k in spec.axes if k in state and not k.endswith(BN_STATS)}


@torch.no_grad()
def weight_matching(spec: PermutationSpec, a: StateDict, b: StateDict, *, max_iter: int = 100,
                    seed: int = 0, init: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Permutations of ``b``'s units that best align its weights with ``a``'s (Git Re-Basin
    weight matching; BN running statistics excluded from the cost). Apply them with
    :func:`apply_permutation` to ``b``."""
    for k in _cost_keys(spec, a):
        if k not in b or a[k].shape != b[k].shape:
            raise ValueError(f"state dicts differ at {k!r}: {tuple(a[k].shape)} vs "
                             f"{tuple(b[k].shape) if k in b else 'missing'}")
    keys = _cost_keys(spec, a)
    perms = {g: p.clone() for g, p in (init or identity_perms(spec)).items()}
    occ = {g: [o for o in spec.occurrences(g) if o[0] in keys] for g in spec.groups}
    rng = np.random.default_rng(seed)
    groups = spec.groups
    for _ in range(max_iter):
        progress = False
        for i in rng.permutation(len(groups)):
            g = groups[i]
            n = spec.sizes[g]
            cost = torch.zeros(n, n)
            for key, axis, offset in occ[g]:
                wa = a[key].float().narrow(axis, offset, n)
                # narrowing commutes with permuting the other axes: narrow first (cheaper)
                wb = permute_tensor(spec, perms, key, b[key].float().narrow(axis, offset, n), except_axis=axis)
                cost += torch.movedim(wa, axis, 0).reshape(n, -1) @ torch.movedim(wb, axis, 0).reshape(n, -1).T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            cols = torch.from_numpy(cols).long()
            old = cost[torch.arange(n), perms[g]].sum()
            new = cost[torch.arange(n), cols].sum()
            if new > old + 1e-12:
                progress = True
                perms[g] = cols
        if not progress:
            break
    return perms


@torch.no_grad()
def permute_average(spec: PermutationSpec, a: StateDict, b: StateDict, perms: Mapping[str, Tensor],
                    alpha: float = 0.5) -> dict[str, Tensor]:
    """``(1-alpha) a + alpha P(b)``: interpolation after alignment (``cmm_utils.merging.kernels``). BN running
    statistics come out interpolated too; reset and recompute them before use."""
    return merging.linear_interpolation(a, apply_permutation(spec, perms, b), alpha)


# ------------------------------------------------------------------ merge / unmerge matrices
#
# A two-model merge in the form of ZipIt! (Stoica et al., "ZipIt! Merging Models from Different
# Tasks without Training", ICLR 2024): for every group g of width n, a merge matrix
# M_g = [M_a | M_b] (n x 2n) maps the stacked features [f_a; f_b] to n merged features and an
# unmerge matrix U_g = [U_a; U_b] (2n x n) maps them back. A layer's merged weight is
#
#     W = M_a^out W_a U_a^in + M_b^out W_b U_b^in,
#
# block-diagonal over the segments of a concatenated (DenseNet) axis; an entry whose output axis
# is unpermuted (the linear head) is averaged. Plain averaging (M = [I/2 | I/2], U = [I; I]),
# permutation alignment (M = [I/2 | P/2], U = [I; P^T]) and ZipIt are all of this form.

Mats = Mapping[str, tuple[Tensor, Tensor]]


def identity_mats(spec: PermutationSpec) -> dict[str, tuple[Tensor, Tensor]]:
    """Unit-by-unit averaging (the authors' ``match_tensors_identity``)."""
    out = {}
    for g, n in spec.sizes.items():
        eye = torch.eye(n)
        out[g] = (torch.cat([eye, eye], 1) / 2, torch.cat([eye, eye], 0))
    return out


def perm_mats(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Averaging after permuting ``b`` by ``perms`` (as :func:`apply_permutation`)."""
    out = {}
    for g, n in spec.sizes.items():
        eye = torch.eye(n)
        P = eye[perms[g]]  # (P W)[i] = W[perm[i]]
        out[g] = (torch.cat([eye, P], 1) / 2, torch.cat([eye, P.T], 0))
    return out


def correlation(cov: Tensor, eps: float = 1e-7) -> Tensor:
    std = cov.diagonal().clamp_min(0).sqrt()
    return cov / torch.outer(std, std).clamp_min(eps)


def zipit_match(corr: Tensor, alpha: float = 0.3, beta: float = 0.125) -> tuple[Tensor, Tensor]:
    """ZipIt!'s greedy matching (Sec. 4.3 of the paper, ``match_tensors_zipit`` with r = 0.5):
    repeatedly merge the most correlated pair of the 2n features of both models, pairs *within* a
    model allowed up to a budget of ``floor(n/2 * beta)`` per model; a merged feature's
    correlations become the minimum of its members' times ``alpha``. Returns ``(M, U)``."""
    O = corr.shape[0]
    n = O // 2
    sims = corr.double().numpy().copy()
    np.fill_diagonal(sims, -np.inf)
    members = np.eye(O)
    active = np.ones(O, dtype=bool)
    origin = np.arange(O) // n
    budget = [int((n // 2) * beta + 1e-4)] * 2
    for _ in range(O - n):  # removed columns are masked with -inf instead of deleted
        r, c = sorted(divmod(int(np.argmax(sims)), O))
        members[:, r] += members[:, c]
        sims[:, r] = np.minimum(sims[:, r], sims[:, c]) * alpha
        sims[r, :] = np.minimum(sims[r, :], sims[c, :]) * alpha
        sims[r, r] = -np.inf
        sims[c, :] = -np.inf
        sims[:, c] = -np.inf
        active[c] = False
        if origin[r] == origin[c]:
            o = origin[r]
            budget[o] -= 1
            if budget[o] <= 0:
                sel = active & (origin == o)
                sims[np.ix_(sel, sel)] = -np.inf
    members = torch.from_numpy(members[:, active]).float()
    merge_m = (members / (members.sum(0, keepdim=True) + 1e-5)).T
    return merge_m, members


def permute_match(corr: Tensor) -> tuple[Tensor, Tensor]:
    """Activation matching (the authors' ``match_tensors_permute``): the assignment of ``b``'s
    features to ``a``'s maximising their correlation, then averaging. Returns ``(M, U)``."""
    n = corr.shape[0] // 2
    _, cols = linear_sum_assignment(corr[:n, n:].double().numpy(), maximize=True)
    eye = torch.eye(n)
    P = eye[torch.from_numpy(cols).long()]
    return torch.cat([eye, P], 1) / 2, torch.cat([eye, P.T], 0)


MATCHERS = {"zipit": zipit_match, "permute": permute_match}


@torch.no_grad()
def feature_covariance(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, images: Tensor,
                       batch_size: int = 64) -> dict[str, Tensor]:
    """Covariance (2n x 2n) of the stacked features ``[f_a; f_b]`` of every group, each spatial
    position of each image one sample, pooled over the group's modules (a residual stream's every
    block output). ``images`` are uint8 ``[N, C, H, W]``; both models run in eval mode."""
    from cmm_utils.core.train import to_float

    missing = [g for g in spec.sizes if g not in spec.features]
    if missing:
        raise ValueError(f"the spec names no feature module for groups {missing[:5]}")
    where = {}
    for g, mods in spec.features.items():
        for m in mods:
            where.setdefault(m, []).append(g)
    stats = {g: [torch.zeros(2 * n, dtype=torch.float64), torch.zeros(2 * n, 2 * n, dtype=torch.float64), 0]
             for g, n in spec.sizes.items()}
    grabbed: dict[str, Tensor] = {}

    def hook(name):
        def fn(_m, _i, out):
            grabbed[name] = out.detach().movedim(1, -1).reshape(-1, out.shape[1]).double()
        return fn

    pairs = []
    for model in (model_a, model_b):
        model.eval()
        mods = dict(model.named_modules())
        hooks = [mods[m].register_forward_hook(hook(m)) for m in where]
        pairs.append((model, hooks))
    try:
        dev = next(model_a.parameters()).device
        for start in range(0, len(images), batch_size):
            x = to_float(images[start:start + batch_size].to(dev))
            grabbed.clear()
            model_a(x)
            feats_a = dict(grabbed)
            grabbed.clear()
            model_b(x)
            for m, groups in where.items():
                f = torch.cat([feats_a[m], grabbed[m]], 1).cpu()
                for g in groups:
                    s = stats[g]
                    s[0] += f.sum(0)
                    s[1] += f.T @ f
                    s[2] += f.shape[0]
    finally:
        for _, hooks in pairs:
            for h in hooks:
                h.remove()
    out = {}
    for g, (s1, s2, count) in stats.items():
        mean = s1 / count
        out[g] = (s2 / count - torch.outer(mean, mean)).float()
    return out


def match_features(spec: PermutationSpec, covariances: Mapping[str, Tensor], method: str = "zipit",
                   **kw) -> dict[str, tuple[Tensor, Tensor]]:
    """Merge/unmerge matrices for every group from feature covariances (``"zipit"`` or the
    activation-matching ``"permute"``)."""
    if method not in MATCHERS:
        raise ValueError(f"unknown feature matcher {method!r}; valid: {', '.join(MATCHERS)}")
    return {g: MATCHERS[method](correlation(covariances[g]), **kw) for g in spec.sizes}


def _side_block(spec: PermutationSpec, mats: Mats, segs, side: int, output: bool) -> Tensor:
    blocks = []
    for g in segs:
        n = spec.sizes[g]
        M, U = mats[g]
        blocks.append(M[:, side * n:(side + 1) * n] if output else U[side * n:(side + 1) * n, :].T)
    return torch.block_diag(*blocks)


@torch.no_grad()
def zip_merge(spec: PermutationSpec, a: StateDict, b: StateDict, mats: Mats) -> dict[str, Tensor]:
    """The merged network ``sum_side M_side^out W_side U_side^in`` (see above); entries with an
    unpermuted output axis (the head) are averaged, entries outside the spec copied from ``a``. BN
    running statistics come out merged like weights: reset and recompute them before use."""
    out = {}
    for key, va in a.items():
        if key not in spec.axes or not va.is_floating_point():
            out[key] = va.clone()
            continue
        axes = spec.axes[key]
        total = torch.zeros((), dtype=torch.float64)
        for side, t in enumerate((va, b[key])):
            t = t.double()
            for axis, segs in enumerate(axes):
                if segs:
                    T = _side_block(spec, mats, segs, side, output=axis == 0).double()
                    t = torch.movedim(torch.tensordot(T, t, dims=([1], [axis])), 0, axis)
            if not axes[0]:
                t = t / 2
            total = total + t
        out[key] = total.to(va.dtype)
    return out
