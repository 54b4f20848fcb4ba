"""MagMax (Marczak et al., ECCV 2024): the chapter's one interface.

``run(method, benchmark, profile, seed, **overrides)`` gives one method's
:class:`~cmm_utils.core.continual.ContinualResult` (cached; ``extra["mean_class_recall"]`` is the
final mean class recall). The rooms: :mod:`.method` (the method's functions), :mod:`.profiles`,
:mod:`.experiment` (one run, its checkpoints and cache), :mod:`.chapter` (the page's runs and
tables), :mod:`.claims`, :mod:`.data` (benchmarks), :mod:`.analysis` (task-vector analyses).
"""
from __future__ import annotations

from cmm_utils.core.continual import ContinualResult
from cmm_utils.core.profiles import seed_list, select
from cmm_utils.papers.magmax.chapter import (agreement_table, bn_summary, experiments, final_table, lambda_summary,
                                             run_chapter)
from cmm_utils.papers.magmax.claims import PAPER, judge_claims, method_means, verdict_summary
from cmm_utils.papers.magmax.data import CHAPTER, benchmark_name
from cmm_utils.papers.magmax.experiment import cached_result
from cmm_utils.papers.magmax.method import METHODS, REGIMES, SWEPT, check_method, merge_task_vectors
from cmm_utils.papers.magmax.profiles import PROFILES

TITLE = "MagMax: model merging for continual learning"

__all__ = ["CHAPTER", "TITLE", "PAPER", "PROFILES", "METHODS", "REGIMES", "SWEPT", "run", "grid_units", "run_chapter", "experiments",
           "benchmark_name", "check_method", "merge_task_vectors", "final_table", "lambda_summary", "bn_summary",
           "agreement_table", "judge_claims", "method_means", "verdict_summary"]


def run(method: str, benchmark: str, profile: str, seed: int, **overrides) -> ContinualResult:
    """One method on one benchmark and seed under ``profile``'s settings with ``overrides``
    (:func:`cmm_utils.core.profiles.select`): read from the chapter's cache when it already ran,
    else fine-tuned (checkpoints shared by every method), merged, evaluated and cached."""
    return cached_result(check_method(method), benchmark, profile, seed, select(PROFILES, profile, **overrides))


def grid_units(profile: str, first_seed: int = 0) -> list[tuple[str, int, tuple[str, ...]]]:
    """The chapter's independent jobs for :mod:`cmm_utils.grid`: per scenario (each ``T`` of
    ``n_tasks`` its own, named as the runs are cached) and seed, one job for the sequential regime
    (and the baselines) and one for the independent regime, so the two fine-tunings run in
    parallel while every merge of a regime reuses its regime's checkpoints."""
    row = select(PROFILES, profile)
    methods = tuple(row["methods"])
    groups = [tuple(m for m in methods if not m.endswith("-ind")), tuple(m for m in methods if m.endswith("-ind"))]
    return [(benchmark_name(name, T), s, group) for name, T in experiments(row)
            for s in seed_list(first_seed, row["seeds"]) for group in groups if group]
