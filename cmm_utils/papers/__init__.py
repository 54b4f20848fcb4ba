"""One package per paper: its algorithm, baselines, profiles and the computations behind its figures.

Every paper exposes the same interface (its package's ``__init__``): ``CHAPTER`` (the notebook),
``TITLE``, ``PROFILES`` (one schema: :func:`cmm_utils.core.profiles.check_table`), ``METHODS`` and
``run(method, benchmark, profile, seed, **overrides) -> ContinualResult`` (cached). The
leaderboard and the runner iterate :data:`PAPERS` through :func:`paper`.

A paper imports :mod:`cmm_utils.core` and :mod:`cmm_utils.merging`, never another paper
(``tests/test_structure.py``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

PAPERS = ("magmax", "cmm", "dynammo", "medmerge")
INTERFACE = ("CHAPTER", "TITLE", "PROFILES", "METHODS", "run")


def paper(name: str) -> ModuleType:
    """The paper package ``cmm_utils.papers.<name>``, checked to expose the common interface."""
    if name not in PAPERS:
        raise ValueError(f"unknown paper {name!r}; valid: {', '.join(PAPERS)}")
    module = importlib.import_module(f"cmm_utils.papers.{name}")
    missing = [k for k in INTERFACE if not hasattr(module, k)]
    if missing:
        raise AttributeError(f"cmm_utils.papers.{name} lacks {missing} of the paper interface {INTERFACE}")
    return module
