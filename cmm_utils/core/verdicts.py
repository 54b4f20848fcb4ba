"""Verdicts: a paper's claim beside our measurement, judged by a criterion stated once, here.

A :class:`Claim` is its text, the paper's value and where that value comes from, the criterion
that would support it, and (once judged) our value, the verdict and, for comparisons, the paired
gap with its 95 % interval. Chapters build their claims in ``papers/<paper>/claims.py`` with the
judges below and write them with :func:`write_verdict` to ``results/<profile>/<chapter>/verdict.json``;
the front page reads those files (:func:`cmm_utils.runner.write_verdicts_page`). No notebook holds
a threshold.

The verdict words, pinned:

- ``supported``: the criterion holds; for a comparison, the whole 95 % interval of the paired gap
  lies on the claimed side of ``min_effect``.
- ``not supported``: the criterion fails; for a comparison, the whole interval lies on the other
  side of zero (the opposite effect is shown).
- ``inconclusive``: a comparison whose interval straddles the bound, or that has a single unit (no
  interval can be formed).
- ``not testable here``: the regime check failed (the experiment cannot tell the methods apart);
  the failing numbers are given in ``ours``.
- ``not run``: the measurement needs a profile or data this build did not have.

Intervals. :func:`paired_gap_interval` takes per-unit paired gaps (one per seed, or per
scenario × seed) and gives a Student-t 95 % interval of their mean; :func:`paired_bootstrap_metric`
takes per-image predictions of the two methods on the same test images, resamples images within
each unit (the units' resamples averaged, so seed-to-seed and test-set variation both count) and
gives a percentile interval of the gap in accuracy, or in mean class recall recomputed on each
resample; :func:`judge_bootstrap` turns it into a verdict.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from cmm_utils.core.io import write_json

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
NOT_TESTABLE, NOT_RUN = "not testable here", "not run"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_TESTABLE, NOT_RUN)


@dataclass(frozen=True)
class Claim:
    """One claim of a paper; ``judge_*`` return a copy with ``ours``, ``verdict`` (and interval) set."""
    id: str
    text: str
    paper_value: Any
    source: str
    criterion: str
    ours: Any = None
    verdict: str = NOT_RUN
    estimate: float | None = None
    interval: tuple[float, float] | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def supported(self) -> bool | None:
        """The front page's tri-state: True, False, or None (inconclusive, not testable, not run)."""
        return {SUPPORTED: True, NOT_SUPPORTED: False}.get(self.verdict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["claim"] = out.pop("text")
        out["supported"] = self.supported
        out["interval"] = None if self.interval is None else [float(v) for v in self.interval]
        return out


def paired_gap_interval(gaps: Sequence[float], level: float = 0.95) -> tuple[float, tuple[float, float] | None]:
    """Mean of paired gaps and its Student-t interval (``None`` for fewer than two units)."""
    g = np.asarray(gaps, dtype=float)
    if g.size == 0 or not np.isfinite(g).all():
        raise ValueError(f"paired gaps must be finite and non-empty, got {g.tolist()}")
    mean = float(g.mean())
    if g.size < 2:
        return mean, None
    half = float(stats.t.ppf(0.5 + level / 2, g.size - 1) * g.std(ddof=1) / math.sqrt(g.size))
    return mean, (mean - half, mean + half)


METRICS = ("accuracy", "mean_class_recall")


def _replicate_scores(pred: np.ndarray, labels: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` of ``pred`` on each resample (a row of ``idx``): accuracy, or mean class recall
    (the mean over the classes present in the resample of hits / images, as balanced accuracy)."""
    hit = (pred == labels).astype(float)
    if metric == "accuracy":
        return hit[idx].mean(axis=1)
    C = int(labels.max()) + 1
    flat = (np.arange(idx.shape[0])[:, None] * C + labels[idx]).ravel()
    total = np.bincount(flat, minlength=idx.shape[0] * C).reshape(-1, C)
    hits = np.bincount(flat, weights=hit[idx].ravel(), minlength=idx.shape[0] * C).reshape(-1, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(total > 0, hits / total, np.nan), axis=1)


def paired_bootstrap_metric(pred_a: Sequence[np.ndarray], pred_b: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                            metric: str = "accuracy", n_boot: int = 2000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """A paired bootstrap for a metric of predictions: the gap ``metric(a) − metric(b)``
    over per-image predictions of two methods on the same test images (one array per unit, a unit
    being a seed or a scenario × seed, with its labels). Images are resampled within each unit, the
    same resample for both methods (paired), and the units' replicate gaps averaged; mean class
    recall is recomputed on each resample, so its rare classes' few images count as few."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if not (len(pred_a) == len(pred_b) == len(labels)) or not pred_a:
        raise ValueError(f"one prediction array per unit for each method and one label array per unit; got "
                         f"{len(pred_a)}, {len(pred_b)} and {len(labels)}")
    rng = np.random.default_rng(seed)
    replicates, estimate = np.zeros(n_boot), 0.0
    for a, b, y in zip(pred_a, pred_b, labels):
        a, b, y = (np.asarray(v, dtype=np.int64).ravel() for v in (a, b, y))
        if not (a.shape == b.shape == y.shape) or y.size == 0:
            raise ValueError(f"predictions and labels must be paired and non-empty; got {a.shape}, {b.shape}, {y.shape}")
        whole = np.arange(y.size)[None, :]
        estimate += float(_replicate_scores(a, y, whole, metric)[0] - _replicate_scores(b, y, whole, metric)[0])
        for start in range(0, n_boot, 250):  # chunks keep the resample matrix small on large test sets
            idx = rng.integers(0, y.size, size=(min(250, n_boot - start), y.size))
            replicates[start:start + len(idx)] += _replicate_scores(a, y, idx, metric) - _replicate_scores(b, y, idx, metric)
    replicates /= len(labels)
    lo, hi = np.quantile(replicates, [0.5 - level / 2, 0.5 + level / 2])
    return estimate / len(labels), (float(lo), float(hi))


def gap_verdict(estimate: float, interval: tuple[float, float] | None, direction: int = 1,
                min_effect: float = 0.0) -> str:
    """The verdict of a comparison claimed to be ``direction`` (+1: ours above, −1: below) by more
    than ``min_effect``."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if interval is None:
        return INCONCLUSIVE
    lo, hi = sorted(direction * v for v in interval)
    if lo > min_effect:
        return SUPPORTED
    if hi < 0:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def judge_gap(claim: Claim, gaps: Sequence[float], direction: int = 1, min_effect: float = 0.0,
              ours: Any = None, note: str = "") -> Claim:
    """A comparison from per-unit paired gaps (e.g. method − baseline per seed)."""
    estimate, interval = paired_gap_interval(gaps)
    return replace(claim, ours=ours if ours is not None else f"{estimate:+.4g}", estimate=estimate, interval=interval,
                   verdict=gap_verdict(estimate, interval, direction, min_effect), note=note or claim.note)


def judge_bootstrap(claim: Claim, pred_a: Sequence[np.ndarray], pred_b: Sequence[np.ndarray],
                    labels: Sequence[np.ndarray], metric: str = "accuracy", direction: int = 1,
                    min_effect: float = 0.0, ours: Any = None, note: str = "") -> Claim:
    """A comparison from per-image predictions (:func:`paired_bootstrap_metric`, a − b)."""
    estimate, interval = paired_bootstrap_metric(pred_a, pred_b, labels, metric)
    return replace(claim, ours=ours if ours is not None else f"{estimate:+.4g}", estimate=estimate, interval=interval,
                   verdict=gap_verdict(estimate, interval, direction, min_effect), note=note or claim.note)


def judge_condition(claim: Claim, holds: bool, ours: Any, note: str = "") -> Claim:
    """A claim whose criterion is a plain condition on our numbers (a count, a tolerance)."""
    return replace(claim, ours=ours, verdict=SUPPORTED if holds else NOT_SUPPORTED, note=note or claim.note)


def judge_inconclusive(claim: Claim, ours: Any, note: str = "") -> Claim:
    """A claim whose measurement exists but cannot decide it (mixed results, one unit)."""
    return replace(claim, ours=ours, verdict=INCONCLUSIVE, note=note or claim.note)


def not_testable(claim: Claim, failing: str) -> Claim:
    """The regime check failed: say which numbers failed instead of a verdict."""
    return replace(claim, ours=failing, verdict=NOT_TESTABLE)


def shift_gap(claim: Claim, by: float, direction: int = 1) -> Claim:
    """``claim`` re-judged as if its gap were ``by`` larger, estimate and interval kept as measured:
    a "within a margin" claim (a − b > −margin) is the plain comparison of ``a − b + margin`` with 0."""
    if claim.estimate is None:
        return claim
    interval = None if claim.interval is None else (claim.interval[0] + by, claim.interval[1] + by)
    return replace(claim, verdict=gap_verdict(claim.estimate + by, interval, direction))


def combine_scenarios(claim: Claim, judged: dict, direction: int = 1) -> Claim:
    """One verdict from per-scenario verdicts of the same claim (``{scenario: Claim}``): not
    testable where every scenario is; else, over the testable ones, not supported if any is,
    supported if all are, inconclusive otherwise. The estimate and interval shown are the weakest
    testable scenario's (lowest lower bound in the claimed direction); ``ours`` lists every scenario.
    Scenarios "not run" are left out (all of them: "not run")."""
    if not judged:
        raise ValueError(f"claim {claim.id!r}: no scenario judged")
    testable = {n: c for n, c in judged.items() if c.verdict != NOT_TESTABLE}
    def part(n, c):
        if c.verdict == NOT_TESTABLE:
            return f"{c.ours} → {c.verdict}"
        iv = "" if c.interval is None else f", 95 % [{100 * c.interval[0]:+.1f}, {100 * c.interval[1]:+.1f}] pts"
        return f"{n}: {c.ours}{iv} → {c.verdict}"
    ours = "; ".join(part(n, c) for n, c in judged.items())
    if not testable:
        return replace(claim, ours="; ".join(c.ours for c in judged.values()), verdict=NOT_TESTABLE)
    words = [c.verdict for c in testable.values() if c.verdict != NOT_RUN]
    if not words:
        return replace(claim, ours=ours, verdict=NOT_RUN)
    verdict = (NOT_SUPPORTED if NOT_SUPPORTED in words else SUPPORTED if all(w == SUPPORTED for w in words)
               else INCONCLUSIVE)
    with_iv = [c for c in testable.values() if c.interval is not None]
    weakest = min(with_iv, key=lambda c: min(direction * v for v in c.interval)) if with_iv else None
    return replace(claim, ours=ours, verdict=verdict, estimate=weakest.estimate if weakest else None,
                   interval=weakest.interval if weakest else None)


def not_run(claim: Claim, why: str) -> Claim:
    return replace(claim, ours=None, verdict=NOT_RUN, note=why)


def count_verdicts(claims: Sequence[Claim]) -> dict[str, int]:
    return {v: sum(c.verdict == v for c in claims) for v in VERDICTS}


def verdict_lines(claims: Sequence[Claim]) -> list[str]:
    """One Markdown bullet per claim: paper value, ours, verdict (and interval)."""
    lines = []
    for c in claims:
        interval = "" if c.interval is None else f", 95 % interval [{c.interval[0]:+.3g}, {c.interval[1]:+.3g}]"
        ours = "not run" if c.ours is None else c.ours
        lines.append(f"- **{c.text}**: paper {c.paper_value}; ours {ours}{interval} → {c.verdict}.")
    return lines


def write_verdict(path: Path | str, paper: str, chapter: str, claims: Sequence[Claim], summary: str,
                  rerun: str, **extra: Any) -> dict:
    """``verdict.json`` as the front page reads it; returns what was written."""
    unknown = [c.verdict for c in claims if c.verdict not in VERDICTS]
    if unknown:
        raise ValueError(f"unknown verdict(s) {unknown}; valid: {', '.join(VERDICTS)}")
    verdict = {"paper": paper, "chapter": chapter, "claims": [c.as_dict() for c in claims], "summary": summary,
               "counts": count_verdicts(claims), "rerun": rerun, **extra}
    write_json(path, verdict)
    return verdict
