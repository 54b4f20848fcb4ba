"""The DynaMMo chapter's regime check (issue 12): can its runs tell merged adapters from per-task
paths at all? Computed per scenario from the page's own tables, before any claim is judged.

The book's standard checks (:func:`cmm_utils.core.regime.continual_regime`) on the scenario's test
labels, joint training's final mean class recall and sequential fine-tuning's ``R`` (mean over
seeds, task-agnostic: the fine-tuned model has one head over every seen class), and three of this
chapter (thresholds below):

- **the adapters move the features**: task adapters change the pooled features of test images by
  at least :data:`MIN_FEATURE_SHIFT` of their norm on average (``feature_shift``,
  :func:`cmm_utils.papers.dynammo.method.feature_shifts`);
- **the adapters differ across tasks**: each task's path lies at least :data:`MIN_PATH_SPREAD`
  from the merged path (``path_spread``), otherwise averaging them cannot lose anything and the
  merge is untested; the weights' ``adapter_spread`` is reported beside it;
- **the adapters matter**: ACL's per-task paths beat the control without adapters by at least
  :data:`MIN_ADAPTER_GAIN` on the headline metric; DynaMMo minus the control "last task's adapters
  only" is reported (what the merge adds over keeping one set).

A task-aware ``R`` is not recorded by this chapter's runs (the baselines have one head), so the
task-aware diagonal check is not part of this table.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cmm_utils.core.data import Scenario
from cmm_utils.core.regime import Regime, at_least, continual_regime, regime_table, reported

__all__ = ["MIN_ADAPTER_GAIN", "MIN_FEATURE_SHIFT", "MIN_PATH_SPREAD", "chapter_regime", "regime_frame",
           "scenario_regime"]

MIN_FEATURE_SHIFT = 0.05  # adapters move the pooled features by >= 5 % of their norm
MIN_PATH_SPREAD = 0.02    # a task's path is >= 2 % away from the merged one (the merge has something to average)
MIN_ADAPTER_GAIN = 0.02   # per-task adapters beat no adapters by >= 2 points of the headline metric


def _mean_R(matrices: pd.DataFrame, scenario: str, method: str) -> np.ndarray:
    g = matrices[(matrices.scenario == scenario) & (matrices.method == method)]
    if g.empty:
        raise ValueError(f"no accuracy matrix for {method!r} on {scenario!r}; the regime needs the {method} runs")
    return g.groupby(["after_task", "task"])["acc"].mean().unstack("task").sort_index().to_numpy()


def scenario_regime(name: str, summary: pd.DataFrame, matrices: pd.DataFrame, scenario: Scenario,
                    metric: str) -> Regime:
    """The regime of one scenario (``name`` as in the tables' ``scenario`` column) from the page's
    ``summary`` and ``accuracy_matrix`` tables and the scenario's test labels; ``metric`` is the
    headline column (``avg_mcr`` or ``avg_incremental_acc``)."""
    runs = summary[summary.scenario == name]
    need = {"joint", "finetune", "acl", "dynammo", "no_adapters", "last_adapters"} - set(runs.method)
    if need:
        raise ValueError(f"the regime of {name!r} needs the runs of {sorted(need)}; ran: {sorted(set(runs.method))}")
    mean = runs.groupby("method")[[metric, "last_mcr", "feature_shift", "path_spread", "adapter_spread"]].mean()
    labels = np.concatenate([t.test.labels.numpy() for t in scenario.tasks])
    base = continual_regime(name, num_classes=scenario.num_classes, test_labels=labels,
                            joint_recall=float(mean.loc["joint", "last_mcr"]),
                            seqft_R=_mean_R(matrices, name, "finetune"),
                            task_classes=[t.classes for t in scenario.tasks])
    dyn = mean.loc["dynammo"]
    checks = [at_least("adapters' feature shift", dyn["feature_shift"], MIN_FEATURE_SHIFT,
                       "mean over tasks of |f_t - f_0| / |f_0| on test images"),
              at_least("task paths' distance to the merged path", dyn["path_spread"], MIN_PATH_SPREAD,
                       f"adapter weights' spread {dyn['adapter_spread']:.3g}"),
              at_least(f"ACL - no adapters ({metric})", mean.loc["acl", metric] - mean.loc["no_adapters", metric],
                       MIN_ADAPTER_GAIN, "per-task adapters against the frozen backbone, same heads' training"),
              reported(f"DynaMMo - last task's adapters only ({metric})",
                       mean.loc["dynammo", metric] - mean.loc["last_adapters", metric])]
    return Regime(name, base.checks + tuple(checks))


def chapter_regime(summary: pd.DataFrame, matrices: pd.DataFrame, scenarios: Mapping[str, Scenario],
                   metric: Mapping[str, str]) -> dict[str, Regime]:
    """:func:`scenario_regime` for every scenario of the page (``scenarios``: label -> scenario)."""
    return {name: scenario_regime(name, summary, matrices, sc, metric[name]) for name, sc in scenarios.items()}


def regime_frame(regimes: Mapping[str, Regime] | Sequence[Regime]) -> pd.DataFrame:
    """The regime table as ``regime.csv`` holds it (one row per check, a last row per scenario)."""
    regimes = list(regimes.values()) if isinstance(regimes, Mapping) else list(regimes)
    return regime_table(regimes)
