"""MedMerge (Almakky et al. 2024): transfer learning from two source models merged with learned
kernel-level weights. The chapter's interface: :data:`CHAPTER`, :data:`TITLE`, :data:`PROFILES`,
:data:`METHODS` and :func:`run` (one method on one ``"arch:medical->target"`` benchmark and seed,
cached, as a one-task :class:`~cmm_utils.core.continual.ContinualResult`); and what the notebook uses.

Modules: ``method`` (the pipeline and the run cache), ``profiles``, ``sources``, ``training`` (probe,
fine-tuning, merges of fine-tuned models), ``kernel_merge`` (the learnable merge), ``alignment`` and
``permutation_specs`` (weight matching, activation matching, ZipIt!), ``landscape`` (loss-surface
planes), ``tables``, ``figures``, ``claims``.
"""
from cmm_utils.papers.medmerge.method import compute_plane, run, run_chapter, run_experiment
from cmm_utils.papers.medmerge.profiles import (ABLATIONS, CHAPTER, FT_BASELINES, LPFT_BASELINES, MERGES,
                                                METHOD_LABELS, METHODS, PROFILES, TITLE, configure)
from cmm_utils.papers.medmerge.sources import load_target, source_backbone, source_meta
from cmm_utils.papers.medmerge.training import evaluate, merge_models

__all__ = ["ABLATIONS", "CHAPTER", "FT_BASELINES", "LPFT_BASELINES", "MERGES", "METHODS", "METHOD_LABELS",
           "PROFILES", "TITLE", "compute_plane", "configure", "evaluate", "load_target", "merge_models", "run",
           "run_chapter", "run_experiment", "source_backbone", "source_meta"]
