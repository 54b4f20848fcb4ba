"""The one way a chapter chooses a merge: a rule's name → its kernel, its parameters and defaults.

Names are the chapters' (hyphenated, as in the papers' tables). :func:`merge` rejects an unknown
rule or parameter with the valid ones, fills the defaults, and calls the pure kernel. The defaults
are the papers': TIES keeps the top 20 % (``density=0.2``, Yadav et al. 2023 and MagMax's
``ties.py``); task arithmetic returns the plain sum (``scale=1.0``; λ is applied by
:func:`cmm_utils.merging.kernels.apply`, as in the authors' code); random selection is seeded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from cmm_utils.merging import kernels as k
from cmm_utils.merging import pairwise as pw


@dataclass(frozen=True)
class MergeRule:
    name: str
    kernel: Callable[..., dict]
    defaults: dict[str, Any] = field(default_factory=dict)
    inputs: str = "task vectors"          # what the kernel folds: task vectors, or two states
    reference: str = ""


RULES: dict[str, MergeRule] = {r.name: r for r in (
    MergeRule("average", k.average, {}, reference="model soups (Wortsman et al. 2022): mean of the task vectors"),
    MergeRule("task-arithmetic", k.task_arithmetic, {"scale": 1.0},
              reference="Ilharco et al. 2023: scale · sum of the task vectors"),
    MergeRule("ties", k.ties, {"density": 0.2, "scope": "global"},
              reference="Yadav et al. 2023: trim to the top density, elect the mass sign, disjoint mean"),
    MergeRule("random", k.random_select, {"seed": 0},
              reference="MagMax's baseline: per parameter the value of a uniformly drawn task"),
    MergeRule("magmax", k.magmax, {}, reference="Marczak et al. 2024, Eq. 2: per parameter the largest |τ|"),
    MergeRule("interpolation", pw.linear_interpolation, {}, inputs="two states",
              reference="(1 − α)·a + α·b, α given by the caller"),
    MergeRule("importance-weighted", pw.importance_weighted, {}, inputs="two states",
              reference="CMM (Phan et al. 2025): Adam-second-moment-weighted interpolation"),
    MergeRule("average-adapters", pw.average_adapters, {"bn_policy": "average"}, inputs="adapter states",
              reference="DynaMMo (Qazi et al. 2024): mean of the task adapters"),
)}
TASK_VECTOR_RULES = tuple(n for n, r in RULES.items() if r.inputs == "task vectors")


def rule(name: str) -> MergeRule:
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merge {name!r}; valid: {', '.join(RULES)}") from None


def merge(name: str, *inputs, **params) -> dict:
    """``RULES[name].kernel(*inputs, **(defaults | params))``; an unknown parameter is an error."""
    r = rule(name)
    unknown = sorted(set(params) - set(r.defaults))
    if unknown:
        raise ValueError(f"merge {name!r} takes no parameter(s) {unknown}; valid: {', '.join(r.defaults) or 'none'}")
    return r.kernel(*inputs, **{**r.defaults, **params})
