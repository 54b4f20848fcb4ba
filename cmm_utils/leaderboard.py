"""One benchmark across all four papers' continual methods (none of the papers compares the others).

Every entry runs through its chapter's cached entry point with the chapter's settings for the
profile, on the book's shared benchmarks (:mod:`cmm_utils.core.benchmarks`): when the chapter already
ran the same configuration, its cached result is read back instead of retraining.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pandas as pd

from cmm_utils.core.continual import ContinualResult


@dataclass(frozen=True)
class Entry:
    label: str
    chapter: str
    method: str
    family: str


ENTRIES = (
    Entry("Sequential fine-tuning", "magmax", "seq-ft", "baseline"),
    Entry("Joint training (upper bound)", "magmax", "joint", "baseline"),
    Entry("Averaging", "magmax", "average", "weight merging"),
    Entry("Task arithmetic", "magmax", "task-arithmetic", "weight merging"),
    Entry("TIES", "magmax", "ties", "weight merging"),
    Entry("Random selection", "magmax", "random", "weight merging"),
    Entry("MagMax", "magmax", "magmax", "weight merging"),
    Entry("CMM", "cmm", "cmm", "weight merging"),
    Entry("CMM without linearisation", "cmm", "cmm-no-linear", "CMM ablation"),
    Entry("CMM without optimizer-state weighting", "cmm", "cmm-no-fisher", "CMM ablation"),
    Entry("CMM without correction", "cmm", "cmm-no-correction", "CMM ablation"),
    Entry("DynaMMo", "dynammo", "dynammo", "adapters + replay"),
    Entry("ACL", "dynammo", "acl", "adapters + replay"),
    Entry("DER (dynamically expandable representation)", "dynammo", "der", "expansion + replay"),
    Entry("Fine-tuning with replay (DynaMMo's baseline)", "dynammo", "finetune", "baseline"),
)

# The chapter modules' cached entry points: (module, function), called as f(method, benchmark, profile, seed).
RUNNERS = {"magmax": ("cmm_utils.papers.magmax.method", "cached_magmax_run"),
           "cmm": ("cmm_utils.papers.cmm.method", "benchmark_run"),
           "dynammo": ("cmm_utils.papers.dynammo.method", "cached_dynammo_run")}


def entries(methods: list[str] | None = None) -> list[Entry]:
    """The entries named by ``chapter:method`` or label (all by default); unknown names are an error."""
    if methods is None:
        return list(ENTRIES)
    known = {f"{e.chapter}:{e.method}": e for e in ENTRIES} | {e.label: e for e in ENTRIES}
    missing = [m for m in methods if m not in known]
    if missing:
        raise ValueError(f"unknown leaderboard method(s) {missing}; valid: {', '.join(k for k in known if ':' in k)}")
    return [known[m] for m in methods]


def run_entry(entry: Entry, benchmark: str, profile: str, seed: int) -> ContinualResult:
    module, function = RUNNERS[entry.chapter]
    return getattr(importlib.import_module(module), function)(entry.method, benchmark, profile, seed)


def final_mean_class_recall(result: ContinualResult) -> float:
    """Mean class recall on all classes after the last task, as each chapter records it
    (``extra['mean_class_recall']``; DynaMMo keeps it per task in ``extra['mcr_seen']``)."""
    if "mean_class_recall" in result.extra:
        return float(result.extra["mean_class_recall"])
    per_task = result.extra.get("mcr_seen") or [float("nan")]
    return float(per_task[-1])


def result_rows(entry: Entry, benchmark: str, seed: int, result: ContinualResult) -> dict:
    return {"benchmark": benchmark, "method": entry.label, "chapter": entry.chapter, "family": entry.family,
            "seed": seed, **{k: v for k, v in result.summary().items() if k != "method"},
            "mean_class_recall": final_mean_class_recall(result)}


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """mean ± std over seeds per benchmark and method; accuracies in %, memory in MB."""
    metrics = ["final_acc", "mean_class_recall", "avg_incremental_acc", "forgetting"]
    g = frame.groupby(["benchmark", "method"], sort=False)
    out = pd.DataFrame({m: (100 * g[m].mean()).round(1).astype(str) + " ± " + (100 * g[m].std(ddof=0)).round(1).astype(str)
                        for m in metrics})
    out["stored MB"] = (g["bytes_stored"].mean() / 2 ** 20).round(2)
    out["GFLOPs"] = g["gflops"].mean().round(4)
    out["train s"] = g["train_seconds"].mean().round(0)
    out["seeds"] = g.size()
    return out.reset_index()
