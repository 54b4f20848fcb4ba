"""The MagMax chapter's task-vector analyses: which task MagMax takes each parameter from, and how
often the task vectors agree in sign (sequential vs independent fine-tuning).

The paper analyses update magnitude, sign consistency and the tasks' contributions to the merge
(Marczak et al., ECCV 2024; the authors' code has none of it, research note ``magmax_cmm_code.md``
§4-5), so these are computed here from the task vectors; :func:`regime_analysis` reports them for
both regimes of a :class:`cmm_utils.papers.magmax.experiment.MagMaxRun`. Weights only (BatchNorm statistics left out).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from cmm_utils import merging


def _param_keys(tv: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tv.items() if v.is_floating_point() and not merging.bn_statistic(k)]


@torch.no_grad()
def selection_share(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """Share of parameters MagMax takes from each task: ``argmax_t |τ_t^p|`` with ties to the later
    task (as :func:`cmm_utils.merging.kernels.magmax`); weights only (BatchNorm statistics left out)."""
    T = len(task_vectors)
    counts = torch.zeros(T, dtype=torch.float64)
    for k in _param_keys(task_vectors[0]):
        mags = torch.stack([tv[k].reshape(-1).abs().float() for tv in task_vectors]).flip(0)
        winner = T - 1 - mags.argmax(0)  # argmax returns the first maximum: on the flipped stack, the latest task
        counts += torch.bincount(winner, minlength=T).double()
    return (counts / counts.sum()).numpy()


@torch.no_grad()
def sign_agreement(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> tuple[np.ndarray, float]:
    """``A[i, j]``: share of parameters where ``τ_i`` and ``τ_j`` have the same sign (among those
    non-zero in both), and the share of parameters on which all non-zero ``τ_t`` agree in sign
    (among those non-zero in at least two). Weights only."""
    T = len(task_vectors)
    dot = torch.zeros(T, T, dtype=torch.float64)
    both = torch.zeros(T, T, dtype=torch.float64)
    agree_all = considered = 0.0
    for k in _param_keys(task_vectors[0]):
        s = torch.stack([torch.sign(tv[k].reshape(-1).float()) for tv in task_vectors]).double()
        a = s.abs()
        dot += s @ s.t()
        both += a @ a.t()
        n_nz, total = a.sum(0), s.sum(0)
        multi = n_nz >= 2
        considered += float(multi.sum())
        agree_all += float((multi & (total.abs() == n_nz)).sum())
    agree = ((both + dot) / 2 / both.clamp(min=1)).numpy()
    return agree, agree_all / max(1.0, considered)


def regime_analysis(task_vectors: Mapping[str, Sequence[Mapping[str, torch.Tensor]]]) -> dict:
    """Per regime (``{regime: [τ_1..τ_T]}``): MagMax's share per task, the sign agreement of the
    task vectors (pairwise and all at once) and their norms (weights only)."""
    out = {}
    for regime, tvs in task_vectors.items():
        agree, all_agree = sign_agreement(tvs)
        keys = _param_keys(tvs[0])
        norms = [float(torch.sqrt(sum((tv[k].double() ** 2).sum() for k in keys))) for tv in tvs]
        out[regime] = {"share": selection_share(tvs).tolist(), "sign_agreement": agree.tolist(),
                       "all_agree": all_agree, "norms": norms}
    return out
