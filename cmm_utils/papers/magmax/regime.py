"""The MagMax chapter's regime check (issue 12): can these runs tell the merges apart at all?

Per scenario and seed, :func:`regime_numbers` reads from one :class:`~cmm_utils.papers.magmax.experiment.MagMaxRun`
and its results the numbers of :func:`cmm_utils.core.regime.continual_regime`: the floors (from the
pooled test labels), θ_0's and joint training's mean class recall, sequential fine-tuning's ``R``
(task-agnostic, from its result) and its diagonal task-aware (each θ_t on task t's classes only),
and the norms and pairwise cosines of the task vectors of both regimes. :func:`scenario_regime`
averages them over seeds and applies the checks; thresholds are the defaults of ``core.regime``
except those named here. The numbers are cached with the run's analyses, so a rerun reads them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cmm_utils.core.continual import predictions
from cmm_utils.core.regime import Regime, continual_regime, regime_table, reported, task_vector_geometry
from cmm_utils.core.train import predict

# MagMax merges the *sequential* task vectors, which are cumulative (τ_t holds τ_1..τ_{t-1}): they
# must still differ for a max-magnitude selection to pick from several tasks, so the cosine bound
# is checked on them (the default 0.95 of core.regime); the independent ones are reported beside.
GEOMETRY_REGIME = "sequential"


def task_aware_diagonal(run, states: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """``R[t, t]`` task-aware: θ_t on task t's test images, predicting among task t's classes only."""
    out = []
    for t, task in enumerate(run.scenario.tasks):
        logits = predict(run.eval_model(states[t]), task.test, int(run.settings["eval_batch"]))
        mask = torch.zeros(run.scenario.num_classes, dtype=torch.bool)
        mask[list(task.classes)] = True
        out.append(float((predictions(logits, mask) == task.test.labels).float().mean()) if len(task.test) else float("nan"))
    return out


def regime_numbers(run, results: Mapping) -> dict:
    """The regime's raw numbers of one scenario and seed (JSON-able; see the module docstring)."""
    labels = torch.cat([t.test.labels for t in run.scenario.tasks])
    seq = results["seq-ft"]
    geometry = {}
    for regime in ("sequential", "independent"):
        geo = task_vector_geometry(run.task_vectors(regime))
        geometry[regime] = {"norms": geo["norms"], "mean_pairwise_cosine": geo["mean_pairwise_cosine"]}
    return {"num_classes": run.scenario.num_classes, "task_classes": [list(t.classes) for t in run.scenario.tasks],
            "test_labels": labels.tolist(),
            "theta0_recall": results["pretrained"].extra["mean_class_recall"] if "pretrained" in results else None,
            "joint_recall": results["joint"].extra["mean_class_recall"], "seqft_R": seq.R,
            "task_aware_diagonal": task_aware_diagonal(run, run.finetuned("sequential")), "geometry": geometry}


def scenario_regime(name: str, per_seed: Sequence[Mapping]) -> Regime:
    """The checks of one scenario on the seed means of :func:`regime_numbers`."""
    if not per_seed:
        raise ValueError(f"no regime numbers for scenario {name!r}")
    first = per_seed[0]
    T = len(first["task_classes"])
    aware = np.mean([s["task_aware_diagonal"] for s in per_seed], axis=0)
    aware_R = np.full((T, T), np.nan)
    aware_R[np.diag_indices(T)] = aware
    theta0 = [s["theta0_recall"] for s in per_seed if s["theta0_recall"] is not None]

    def geo(regime):
        return {"norms": np.mean([s["geometry"][regime]["norms"] for s in per_seed], axis=0).tolist(),
                "mean_pairwise_cosine": float(np.mean([s["geometry"][regime]["mean_pairwise_cosine"] for s in per_seed]))}
    regime = continual_regime(
        name, num_classes=first["num_classes"], test_labels=np.asarray(first["test_labels"]),
        joint_recall=float(np.mean([s["joint_recall"] for s in per_seed])),
        seqft_R=np.mean([s["seqft_R"] for s in per_seed], axis=0), task_classes=first["task_classes"],
        theta0_recall=float(np.mean(theta0)) if theta0 else None, task_aware_R=aware_R,
        geometry=geo(GEOMETRY_REGIME) if T > 1 else None)
    other = geo("independent")
    extra = reported("independent task vectors' mean pairwise cosine", other["mean_pairwise_cosine"],
                     "norms " + ", ".join(f"{n:.3g}" for n in other["norms"])) if T > 1 else None
    return Regime(name, regime.checks + ((extra,) if extra else ()))


def chapter_regimes(numbers: Mapping[str, Sequence[Mapping]]) -> dict[str, Regime]:
    """``{scenario: Regime}`` from ``{scenario: [numbers of each seed]}``."""
    return {name: scenario_regime(name, per_seed) for name, per_seed in numbers.items()}


def regime_frame(regimes: Mapping[str, Regime]) -> pd.DataFrame:
    """The page's table (``regime.csv``): one row per check and scenario, with ``passed`` per scenario."""
    table = regime_table(list(regimes.values()))
    if len(table):
        table["scenario_passes"] = table["scenario"].map({n: r.passed for n, r in regimes.items()})
    return table


def regimes_from_frame(frame: pd.DataFrame) -> dict[str, Regime]:
    """The :class:`Regime` objects back from ``regime.csv`` (the claims read the artifact)."""
    from cmm_utils.core.regime import Check
    out = {}
    for name, part in frame.groupby("scenario", sort=False):
        checks = tuple(Check(r["check"], float(r["value"]), "" if pd.isna(r["bound"]) else str(r["bound"]),
                             {"pass": True, "FAIL": False}.get(r["result"]), "" if pd.isna(r["detail"]) else str(r["detail"]))
                       for _, r in part.iterrows())
        out[name] = Regime(str(name), checks)
    return out
