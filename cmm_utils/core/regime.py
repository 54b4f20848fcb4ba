"""Regime checks: can this experiment tell the methods apart at all?

A claim about merging is only testable where the tasks are learnt, forgotten by plain sequential
fine-tuning, and leave room between the floors and joint training. Each chapter computes these
numbers from its own runs and shows them, as a table, before any claim; a claim judged in a
failing regime reads "not testable here" with the failing numbers (:mod:`cmm_utils.core.verdicts`).

The checks and their default thresholds (a chapter may pass others; each is stated in the table):

- **floors**: chance ``1/C`` and the majority-class share of the test set; a majority predictor has
  mean class recall ``1/C``.
- **room above the floors**: joint training's mean class recall at least :data:`JOINT_MARGIN`
  (10 points) above the best floor (``1/C``, and θ0's recall where the method starts from θ0).
- **tasks learnt**: every task's accuracy right after training it, ``R[t, t]``, at least
  :data:`DIAGONAL_FACTOR` (2) times chance, or halfway from chance to 1 where twice chance is out of
  reach (a two-class task: 0.75); task-aware chance is ``1/|classes of t|``, task-agnostic chance
  ``1/|classes seen up to t|``.
- **forgetting to undo**: sequential fine-tuning forgets at least :data:`MIN_FORGETTING` (5 points;
  forgetting as in :func:`cmm_utils.core.metrics.forgetting`).
- **something to merge**: the task vectors differ (mean pairwise cosine at most
  :data:`MAX_TASK_VECTOR_COSINE`); their norms are reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cmm_utils.core.metrics import forgetting

JOINT_MARGIN = 0.10
DIAGONAL_FACTOR = 2.0
MIN_FORGETTING = 0.05
MAX_TASK_VECTOR_COSINE = 0.95


@dataclass(frozen=True)
class Check:
    """One number of the regime, the bound it must meet, and whether it does (``None``: reported only)."""
    name: str
    value: float
    bound: str = ""
    passed: bool | None = None
    detail: str = ""

    def row(self) -> dict:
        mark = {True: "pass", False: "FAIL", None: "(reported)"}[self.passed]
        return {"check": self.name, "value": round(float(self.value), 4), "bound": self.bound, "result": mark,
                "detail": self.detail}


def at_least(name: str, value: float, bound: float, detail: str = "") -> Check:
    return Check(name, float(value), f">= {bound:.4g}", bool(value >= bound), detail)


def at_most(name: str, value: float, bound: float, detail: str = "") -> Check:
    return Check(name, float(value), f"<= {bound:.4g}", bool(value <= bound), detail)


def reported(name: str, value: float, detail: str = "") -> Check:
    return Check(name, float(value), "", None, detail)


@dataclass(frozen=True)
class Regime:
    """The checks of one scenario; it passes when every bounded check does."""
    scenario: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def failing(self) -> str:
        """The failing checks in words, for a "not testable here" verdict."""
        bad = [c for c in self.checks if c.passed is False]
        return "; ".join(f"{self.scenario}: {c.name} = {c.value:.3g} (needs {c.bound})" for c in bad)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"scenario": self.scenario, **c.row()} for c in self.checks])


def floors(test_labels: np.ndarray | torch.Tensor, num_classes: int) -> dict[str, float]:
    """Chance accuracy, the majority class's share of the test set, and the recall floor (``1/C``)."""
    labels = np.asarray(test_labels).ravel()
    if labels.size == 0:
        raise ValueError("no test labels: floors need the test set")
    share = np.bincount(labels, minlength=num_classes).max() / labels.size
    return {"chance": 1.0 / num_classes, "majority": float(share), "recall_floor": 1.0 / num_classes}


def diagonal_checks(R: Sequence[Sequence[float]], task_classes: Sequence[Sequence[int]], task_aware: bool,
                    factor: float = DIAGONAL_FACTOR) -> list[Check]:
    """``R[t, t]`` against ``factor`` × chance for each task (see the module docstring)."""
    R = np.asarray(R, dtype=float)
    checks, seen = [], 0
    for t, classes in enumerate(task_classes):
        seen += len(classes)
        chance = 1.0 / (len(classes) if task_aware else seen)
        kind = "task-aware" if task_aware else "task-agnostic"
        bound = min(factor * chance, (1 + chance) / 2)
        checks.append(at_least(f"R[{t},{t}] {kind}", R[t, t], bound,
                               f"min({factor:g} x chance, halfway to 1); chance {chance:.3g}"))
    return checks


def task_vector_geometry(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, object]:
    """Norms of the task vectors and their pairwise cosines (floating entries, flattened)."""
    if len(task_vectors) < 1:
        raise ValueError("no task vectors")
    keys = [k for k, v in task_vectors[0].items() if v.is_floating_point()]
    flat = torch.stack([torch.cat([tv[k].detach().double().flatten().cpu() for k in keys]) for tv in task_vectors])
    norms = flat.norm(dim=1)
    unit = flat / norms.clamp_min(1e-30)[:, None]
    cos = (unit @ unit.T).numpy()
    pairs = cos[np.triu_indices(len(task_vectors), k=1)]
    return {"norms": norms.tolist(), "cosine": cos.tolist(),
            "mean_pairwise_cosine": float(pairs.mean()) if pairs.size else float("nan")}


def continual_regime(scenario: str, *, num_classes: int, test_labels, joint_recall: float,
                     seqft_R: Sequence[Sequence[float]], task_classes: Sequence[Sequence[int]],
                     theta0_recall: float | None = None, task_aware_R: Sequence[Sequence[float]] | None = None,
                     task_vectors: Sequence[Mapping[str, torch.Tensor]] | None = None,
                     geometry: Mapping | None = None, joint_margin: float = JOINT_MARGIN, min_forgetting: float = MIN_FORGETTING,
                     diagonal_factor: float = DIAGONAL_FACTOR,
                     max_cosine: float = MAX_TASK_VECTOR_COSINE) -> Regime:
    """The standard checks of a continual scenario from a chapter's own runs: the floors, θ0,
    joint training, sequential fine-tuning's ``R`` (task-agnostic, and task-aware if given) and,
    for merging chapters, the task vectors (or their ``geometry`` from :func:`task_vector_geometry`,
    e.g. averaged over seeds: ``norms`` and ``mean_pairwise_cosine``)."""
    f = floors(test_labels, num_classes)
    best_floor = max(f["recall_floor"], theta0_recall if theta0_recall is not None else 0.0)
    checks = [reported("chance accuracy", f["chance"]), reported("majority-class accuracy", f["majority"])]
    if theta0_recall is not None:
        checks.append(reported("θ0 mean class recall", theta0_recall))
    checks.append(at_least("joint mean class recall", joint_recall, best_floor + joint_margin,
                           f"best floor {best_floor:.3g} + {joint_margin:g}"))
    checks += diagonal_checks(seqft_R, task_classes, task_aware=False, factor=diagonal_factor)
    if task_aware_R is not None:
        checks += diagonal_checks(task_aware_R, task_classes, task_aware=True, factor=diagonal_factor)
    if len(task_classes) > 1:
        checks.append(at_least("seq-ft forgetting", forgetting(np.asarray(seqft_R, dtype=float)), min_forgetting))
    if geometry is None and task_vectors is not None and len(task_vectors) > 1:
        geometry = task_vector_geometry(task_vectors)
    if geometry is not None:
        geo = geometry
        checks.append(at_most("task vectors' mean pairwise cosine", geo["mean_pairwise_cosine"], max_cosine,
                              "norms " + ", ".join(f"{n:.3g}" for n in geo["norms"])))
    return Regime(scenario, tuple(checks))


def regime_table(regimes: Sequence[Regime]) -> pd.DataFrame:
    return pd.concat([r.table() for r in regimes], ignore_index=True) if regimes else pd.DataFrame()
