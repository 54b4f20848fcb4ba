"""The DynaMMo chapter's runs and their cache (Qazi et al., MIUA 2024, arXiv:2404.14099): one method
on one scenario (:func:`run_dynammo_method`), the cached entry point every reader of the chapter
uses (:func:`run`: the notebook, the leaderboard), and the page's tables over every scenario, seed
and method (:func:`chapter_runs`).

A run is keyed by :func:`run_config` (:data:`~cmm_utils.papers.dynammo.profiles.RUN_KEYS` of the
profile, the scenario, the seed); DynaMMo and ACL share one stage-1 run, checkpointed per task under
``cache_root()/dynammo/<profile>/`` and keyed by the stage-1 settings only, so the second reuses it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from cmm_utils.core.benchmarks import BENCHMARKS
from cmm_utils.core.continual import ContinualResult, cached_run
from cmm_utils.core.data import Scenario
from cmm_utils.core.io import cache_root, config_key
from cmm_utils.core.models import book_backbone
from cmm_utils.core.profiles import check_profile, select
from cmm_utils.core.train import device, seed_everything
from cmm_utils.papers.dynammo.baselines import single_model_runs
from cmm_utils.papers.dynammo.method import INFERENCE_OF, adapter_method, adapter_stage1
from cmm_utils.papers.dynammo.profiles import CHAPTER, PROFILES, RUN_KEYS, STAGE1_KEYS, VERSION, check_method
from cmm_utils.papers.dynammo.scenarios import load_scenario, memory_budget, scenario_label

__all__ = ["chapter_runs", "run", "run_config", "run_dynammo_method"]


def run_config(method: str, benchmark: str, profile: str, seed: int, settings: Mapping,
               n_tasks: int | None = None) -> dict:
    """The JSON-able configuration a cached run is keyed by (the leaderboard reads it)."""
    check_method(method)
    cfg = {"method": method, "benchmark": str(benchmark), "seed": int(seed), "backbone": settings["backbone"],
           "profile": profile, "n_tasks": n_tasks, "chapter": CHAPTER, "version": VERSION}
    cfg.update({k: settings[k] for k in RUN_KEYS if k in settings})
    return cfg


def _checkpoint_dir(profile: str, config: Mapping, keys: Sequence[str]) -> Path:
    sub = {k: config[k] for k in ("benchmark", "seed", "profile", "n_tasks", "version", "bn_policy") if k in config}
    sub.update({k: config.get(k) for k in keys})
    path = cache_root() / CHAPTER / profile / f"{Path(str(config['benchmark'])).stem}-{config_key(sub)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dynammo_method(method: str, scenario: Scenario, profile: str, seed: int, settings: Mapping | None = None,
                       benchmark: str | None = None, backbone: nn.Module | None = None,
                       checkpoint: bool = True, n_tasks: int | None = None) -> ContinualResult:
    """Run one method of this chapter on ``scenario``, uncached.

    ``settings`` default to ``PROFILES[profile]``; ``backbone`` to the book's pretrained ResNet-18
    (``book_backbone``). DynaMMo and ACL share one stage-1 run, checkpointed per task under
    ``cache_root()/dynammo/<profile>/`` (keyed by the configuration) so the second reuses it.
    """
    check_method(method)
    settings = dict(PROFILES[check_profile(profile)] if settings is None else settings)
    name = benchmark or scenario.name
    seed_everything(seed)
    backbone = backbone if backbone is not None else book_backbone(settings["backbone"], profile, verbose=False)
    backbone = backbone.to(device()).eval()
    budget = memory_budget(name, scenario)
    config = run_config(method, name, profile, seed, settings, n_tasks)
    if method in INFERENCE_OF:  # DynaMMo, ACL and the two controls share one stage 1
        ck = _checkpoint_dir(profile, config, STAGE1_KEYS) if checkpoint else None
        stage1 = adapter_stage1(scenario, backbone, settings, seed, budget, ck)
        return adapter_method(method, scenario, backbone, stage1, settings, seed, name)
    ck = _checkpoint_dir(profile, config, RUN_KEYS) if checkpoint else None
    return single_model_runs(method, scenario, backbone, settings, seed, budget, name, ck)


def run(method: str, benchmark: str, profile: str, seed: int, *,
        scenario: Scenario | Callable[[], Scenario] | None = None, **overrides) -> ContinualResult:
    """One method of the chapter on one scenario and seed, cached: ``cached_run(profile, "dynammo",
    config, ...)`` reads a finished run back and computes a missing one.

    ``overrides`` are profile settings (:func:`cmm_utils.core.profiles.select` checks them);
    ``n_tasks`` counts only for a dataset path or a class-incremental scenario, not for the book's
    benchmarks. ``scenario`` (a :class:`Scenario` or a function returning one) spares reloading the
    data for each method; by default it is loaded with :func:`load_scenario`. The result records
    mean class recall per task (``extra["mcr_seen"]``) and after the last task
    (``extra["mean_class_recall"]``)."""
    settings = select(PROFILES, profile, **overrides)
    n_tasks = None if benchmark in BENCHMARKS else settings["n_tasks"]
    config = run_config(method, benchmark, profile, seed, settings, n_tasks)

    def compute():
        sc = scenario() if callable(scenario) else scenario
        sc = sc if sc is not None else load_scenario(benchmark, profile, seed, settings["n_tasks"])
        return run_dynammo_method(method, sc, profile, seed, settings, benchmark=benchmark, n_tasks=n_tasks)

    return cached_run(profile, CHAPTER, config, compute)


def _summary_row(label: str, method: str, seed: int, result: ContinualResult) -> dict:
    row, extra = result.summary(), result.extra
    return {"scenario": label, "method": method, "seed": seed,
            "avg_incremental_acc": row["avg_incremental_acc"], "last_acc": row["final_acc"],
            "avg_mcr": float(np.mean(extra["mcr_seen"])), "last_mcr": extra["mcr_seen"][-1],
            "last_task_acc": extra["task_acc_seen"][-1],
            "forgetting": row["forgetting"], "gflops": row["gflops"],
            "params_m": extra["params_per_task"][-1] / 1e6,
            "stored_mb": row["bytes_stored"] / 2**20, "train_seconds": row["train_seconds"],
            "tasks": len(result.R),
            "adapter_spread": extra["adapter_spread"][-1] if "adapter_spread" in extra else np.nan,
            "alpha_abs": float(np.mean(np.abs(extra["alpha"]))) if "alpha" in extra else np.nan,
            "feature_shift": float(np.mean(extra["feature_shift"])) if "feature_shift" in extra else np.nan,
            "merged_shift": extra.get("merged_shift", np.nan), "path_spread": extra.get("path_spread", np.nan)}


def chapter_runs(profile: str, seeds: Sequence[int], benchmarks: Sequence[str], methods: Sequence[str],
                 **overrides) -> dict[str, pd.DataFrame]:
    """Every method on every scenario and seed through :func:`run` (each scenario loaded once per
    seed), as the page's three tables: ``summary`` (one row per run), ``per_task`` (accuracy, mean
    class recall, task accuracy and cost after each task) and ``accuracy_matrix`` (``R[t, i]``)."""
    load = functools.lru_cache(maxsize=1)(
        lambda name, s: load_scenario(name, profile, s, overrides.get("n_tasks")))
    summary_rows, task_rows, matrix_rows = [], [], []
    jobs = [(name, s, method) for name in benchmarks for s in seeds for method in methods]
    for name, s, method in tqdm(jobs, desc="runs"):
        result = run(method, name, profile, s, scenario=lambda name=name, s=s: load(name, s), **overrides)
        label, extra = scenario_label(name), result.extra
        summary_rows.append(_summary_row(label, method, s, result))
        for t, (acc, rec, tacc) in enumerate(zip(result.acc_seen, extra["mcr_seen"], extra["task_acc_seen"])):
            task_rows.append({"scenario": label, "method": method, "seed": s, "task": t + 1,
                              "acc_seen": acc, "mcr_seen": rec, "task_acc_seen": tacc,
                              "gflops": extra["gflops_per_task"][t],
                              "params_m": extra["params_per_task"][t] / 1e6})
        for t, r in enumerate(result.R):
            for i, acc in enumerate(r):
                matrix_rows.append({"scenario": label, "method": method, "seed": s,
                                    "after_task": t, "task": i, "acc": acc})
    return {"summary": pd.DataFrame(summary_rows), "per_task": pd.DataFrame(task_rows),
            "accuracy_matrix": pd.DataFrame(matrix_rows)}
