"""DynaMMo's claims (Qazi et al., MIUA 2024, arXiv:2404.14099) beside the chapter's measurements,
judged by criteria stated once, here (:mod:`cmm_utils.core.verdicts`).

The abstract gives two numbers: "around 10-fold reduction in GFLOPS with a small drop of 2.76 in
average accuracy when compared to state-of-the-art dynamic-based approaches". The cost claim is
judged on the cost tables (:func:`cmm_utils.papers.dynammo.costs.cost_growth`): a count, no
interval needed. The accuracy claims are paired gaps, one per scenario × seed (the same splits and
stage 1 for both methods), with a Student-t 95 % interval over those units
(:func:`cmm_utils.core.verdicts.judge_gap`), on the scenarios whose regime check passes
(:mod:`cmm_utils.papers.dynammo.regime`); where none passes they are "not testable here" with the
failing numbers. The ``smoke`` profile runs a few steps on a subset, so its accuracies are
measured but decide nothing (inconclusive, where its regime lets them be judged at all).

The criteria, in points of the headline metric (mean class recall for skin lesions, average
incremental accuracy otherwise):

- *a small drop* against a baseline: the drop ``baseline − DynaMMo`` is supported as small when
  the upper end of its 95 % interval is below :data:`DROP_TOLERANCE` × 2.76, not supported when the
  lower end is above it;
- *beats fine-tuning* and the control *merge beats the last task's adapters*: the gap
  ``DynaMMo − other`` has its whole interval above zero (supported) or below zero (not supported).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cmm_utils.core.regime import Regime
from cmm_utils.core.verdicts import (Claim, gap_verdict, judge_condition, judge_gap, judge_inconclusive, not_run,
                                     not_testable, paired_gap_interval)

__all__ = ["DROP_TOLERANCE", "GFLOPS_TOLERANCE", "PAPER", "PAPER_TASKS", "PAPER_SETTING", "judge_claims",
           "claims_table", "reference_table", "verdict_summary"]

# What the paper claims (abstract, /work/shared/papers/dynammo.txt) and the ACL paper's curves the
# DynaMMo repository ships (visualize/draw.ipynb; research note §1.9, averages computed there).
PAPER = {
    "gflops_reduction": 10.0,          # "around 10-fold reduction in GFLOPS" vs dynamic expansion
    "avg_acc_drop": 2.76,              # "a small drop of 2.76 in average accuracy"
    "acl_reference": {                 # ACL paper, avg / last (%), research note §1.9
        "CIFAR100": {"acl": (82.50, 73.02), "der": (78.59, 64.97)},
        "SKIN8 (MCR)": {"acl": (66.89, 50.69), "der": (60.24, 39.47)},
        "PATH16": {"acl": (76.57, 73.24), "der": (74.45, 69.87)},
    },
}
ABSTRACT = "abstract, arXiv:2404.14099"
GFLOPS_TOLERANCE = 0.8   # "around 10-fold": supported from 0.8 x 10 = 8-fold up
PAPER_TASKS = 10         # the ratio is judged with 10 tasks, as CIFAR100's 10 x 10 classes
DROP_TOLERANCE = 2.0     # "a small drop": supported up to twice the paper's 2.76 points
PAPER_SETTING = "paper: timm ResNet-18, 224 px"


def _ours_setting(image_size: int) -> str:
    return f"ours: book ResNet-18, {image_size} px"


def _headline(summary: pd.DataFrame, metric: Mapping[str, str]) -> pd.DataFrame:
    """Per (scenario, seed), each method's headline metric (columns: methods)."""
    return pd.concat([summary[summary.scenario == k].pivot_table(index=["scenario", "seed"], columns="method", values=m)
                      for k, m in metric.items()])


def accuracy_gaps(summary: pd.DataFrame, metric: Mapping[str, str], baseline: str) -> pd.DataFrame:
    """``baseline − DynaMMo`` in points per scenario, mean and std over seeds (a positive gap is a drop)."""
    pivot = _headline(summary, metric)
    return (100 * (pivot[baseline] - pivot["dynammo"])).groupby("scenario").agg(["mean", "std"])


def _fmt(d: pd.DataFrame) -> str:
    return "; ".join(f"{k}: {v['mean']:+.2f} ± {0 if np.isnan(v['std']) else v['std']:.2f}" for k, v in d.iterrows())


def _unit_gaps(pivot: pd.DataFrame, a: str, b: str, scenarios: Sequence[str]) -> np.ndarray:
    """``a − b`` in points, one per (scenario, seed) of ``scenarios``."""
    part = pivot[pivot.index.get_level_values("scenario").isin(list(scenarios))]
    return (100 * (part[a] - part[b])).dropna().to_numpy()


def _judge_small_drop(claim: Claim, drops: np.ndarray, tolerance: float, note: str) -> Claim:
    """The drop's mean and 95 % interval, judged against ``tolerance`` (see the module docstring)."""
    estimate, interval = paired_gap_interval(drops)
    margin = None if interval is None else (tolerance - interval[1], tolerance - interval[0])
    return replace(claim, ours=round(float(estimate), 2), estimate=estimate, interval=interval, note=note,
                   verdict=gap_verdict(tolerance - estimate, margin, 1))


def _regime_split(regimes: Mapping[str, Regime] | None, scenarios: Sequence[str]) -> tuple[list[str], str]:
    """The scenarios whose regime passes, and the failing numbers of the others."""
    if regimes is None:
        return list(scenarios), ""
    ok = [s for s in scenarios if s in regimes and regimes[s].passed]
    return ok, "; ".join(regimes[s].failing() for s in scenarios if s in regimes and not regimes[s].passed)


def judge_claims(summary: pd.DataFrame, ratios: pd.DataFrame, flat_in_t: Mapping[str, str], metric: Mapping[str, str],
                 image_size: int, evidence: bool, regimes: Mapping[str, Regime] | None = None) -> list[Claim]:
    """The chapter's claims, judged. ``summary``: one row per run (scenario, method, seed and the
    headline metrics); ``ratios`` and ``flat_in_t`` from :func:`~cmm_utils.papers.dynammo.costs.cost_growth`;
    ``metric``: the headline column per scenario; ``evidence``: whether the runs' accuracies count
    (not in ``smoke``); ``regimes``: the regime of each scenario (:mod:`cmm_utils.papers.dynammo.regime`;
    ``None``: every scenario counts)."""
    x, drop = PAPER["gflops_reduction"], PAPER["avg_acc_drop"]
    paper_ratio, our_ratio = ratios.loc[PAPER_SETTING], ratios.loc[_ours_setting(image_size)]
    at_ten = int(paper_ratio["tasks"]) == PAPER_TASKS
    ratio_criterion = f"ratio at least {GFLOPS_TOLERANCE} x {x:g} with {PAPER_TASKS} tasks, ResNet-18 at 224 px"
    pivot = _headline(summary, metric)
    testable, failing = _regime_split(regimes, list(metric))
    excluded = f" Scenarios left out (regime check failed): {failing}." if failing and testable else ""
    smoke = "smoke runs a few steps on a subset: its accuracies are no evidence. "
    claims = []

    for cid, column, text, note in (
            ("gflops-vs-acl", "ACL / DynaMMo", "about 10x fewer inference GFLOPs than dynamic expansion (ACL's "
             "per-task paths), 10 tasks, ResNet-18 at 224 px", "counted with torch.utils.flop_counter; DER (one "
             f"backbone per task) / DynaMMo = {paper_ratio['DER / DynaMMo']:.2f}x"),
            ("gflops-vs-der", "DER / DynaMMo", "about 10x fewer inference GFLOPs than DER (one backbone per task), "
             "10 tasks, ResNet-18 at 224 px", "the abstract does not name the dynamic-expansion method; against DER "
             "the saving is smaller, since a DER branch has no adapters and the merged DynaMMo model keeps one "
             "adapter set")):
        holds = bool(paper_ratio[column] >= GFLOPS_TOLERANCE * x and at_ten)
        claims.append(judge_condition(Claim(cid, text, x, ABSTRACT, ratio_criterion), holds,
                                      round(float(paper_ratio[column]), 2), note=note))
    c = Claim("gflops-ours", "the same ratio at our resolution (book ResNet-18, 28 px, 10 tasks)", None, ABSTRACT,
              "none: the paper gives no value at this resolution; shown beside the 224 px ratio")
    claims.append(judge_inconclusive(c, round(float(our_ratio["ACL / DynaMMo"]), 2),
                                     note=f"DER / DynaMMo = {our_ratio['DER / DynaMMo']:.2f}x at {image_size} px"))
    c = Claim("flat-cost", "the merged model's inference cost does not grow with the number of tasks", "flat",
              "paper Sec. 2 (one pass through the merged adapters)",
              "DynaMMo's GFLOPs equal for every T (to 0.001), ACL's linear in T, in both settings")
    claims.append(judge_condition(c, len(flat_in_t) == len(ratios), "; ".join(flat_in_t.values()),
                                  note="checked by cost_growth; ACL grows linearly, by the four stages and their "
                                       "adapters per task"))

    tol = DROP_TOLERANCE * drop
    drop_criterion = (f"drop = baseline − DynaMMo in points, one per scenario × seed: supported if the upper end of "
                      f"its 95 % t-interval is below {tol:.2f} ({DROP_TOLERANCE:g} x the paper's), not supported if "
                      "the lower end is above it; scenarios whose regime check passes; cpu and paper profiles only")
    gap_criterion = ("DynaMMo − {other} in points, one per scenario × seed: supported if the whole 95 % t-interval is "
                     "above 0, not supported if below; scenarios whose regime check passes; cpu and paper profiles only")
    specs = [("drop-vs-acl", "acl", "a small drop in average accuracy (2.76 points) against the dynamic-expansion "
              "method (ACL); average incremental accuracy, or its mean class recall for skin lesions", drop, drop_criterion),
             ("drop-vs-der", "der", "a small drop in average accuracy against DER (expandable representation)", drop,
              drop_criterion),
             ("beats-finetune", "finetune", "DynaMMo outperforms plain fine-tuning (forgetting is contained)", "better",
              gap_criterion.format(other="fine-tuning")),
             ("merge-beats-last", "last_adapters", "control: the merged adapters beat keeping only the last task's "
              "adapters (what merging adds)", "implied (paper Sec. 2)", gap_criterion.format(other="last adapters"))]
    for cid, other, text, paper_value, criterion in specs:
        c = Claim(cid, text, paper_value, ABSTRACT if cid.startswith("drop") else "paper Sec. 2-3", criterion)
        if other not in pivot or "dynammo" not in pivot:
            claims.append(not_run(c, f"no {other} runs in this build"))
            continue
        per_scenario = (100 * (pivot[other] - pivot["dynammo"])).groupby("scenario").agg(["mean", "std"])
        note = (f"{other} − DynaMMo in points per scenario (mean ± std over seeds): {_fmt(per_scenario)}.{excluded}")
        if not testable:
            claims.append(not_testable(replace(c, note=note), failing))
            continue
        if cid.startswith("drop"):
            judged = _judge_small_drop(c, _unit_gaps(pivot, other, "dynammo", testable), tol, note)
        else:
            judged = judge_gap(c, _unit_gaps(pivot, "dynammo", other, testable), note=note)
        claims.append(judged if evidence else judge_inconclusive(judged, judged.ours, note=smoke + note))
    return claims


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """Paper vs ours, one row per claim."""
    return pd.DataFrame([{"claim": c.text, "paper_value": c.paper_value, "ours": c.ours, "verdict": c.verdict,
                          "criterion": c.criterion, "note": c.note} for c in claims])


def reference_table() -> pd.DataFrame:
    """The ACL paper's own avg / last accuracies for ACL and DER (224 px, ImageNet ResNet-18)."""
    return pd.DataFrame([{"dataset": k, "method": m, "avg (%)": v[0], "last (%)": v[1]}
                         for k, d in PAPER["acl_reference"].items() for m, v in d.items()])


def verdict_summary(claims: Sequence[Claim], summary: pd.DataFrame, ratios: pd.DataFrame, metric: Mapping[str, str],
                    n_seeds: int, train_steps: int | None, evidence: bool) -> str:
    """The verdict in a paragraph: the cost claim, then the accuracy claim and how far apart the
    merged adapters were (the merge is tested only as far as they had room to diverge)."""
    by_id = {c.id: c for c in claims}
    paper_ratio = ratios.loc[PAPER_SETTING]
    drop_acl, drop_der = accuracy_gaps(summary, metric, "acl"), accuracy_gaps(summary, metric, "der")
    acl_drop, der_drop = drop_acl["mean"].mean(), drop_der["mean"].mean()
    mean_spread = float(summary.loc[summary.method == "dynammo", "adapter_spread"].mean())

    def below(d):
        return f"{abs(d):.2f} points {'below' if d >= 0 else 'above'}"

    cost_ok = by_id["gflops-vs-acl"].supported
    text = (f"The cost claim {'holds' if cost_ok else 'does not hold'}: at the paper's resolution the merged model "
            f"needs {paper_ratio['ACL / DynaMMo']:.1f}x fewer GFLOPs than ACL's per-task paths at 10 tasks "
            f"({paper_ratio['DER / DynaMMo']:.1f}x fewer than DER's ten backbones), and its cost is flat in T. ")
    acl_claim = by_id["drop-vs-acl"]
    if acl_claim.verdict == "not testable here":
        return text + f"The accuracy claims are not testable here: the regime check fails ({acl_claim.ours})."
    if not evidence:
        return text + "The accuracy claim is not tested in the smoke profile."
    # the verdict's own estimates (the scenarios whose regime passes) where there are any
    acl_drop = acl_claim.estimate if acl_claim.estimate is not None else acl_drop
    der_drop = by_id["drop-vs-der"].estimate if by_id["drop-vs-der"].estimate is not None else der_drop
    iv = "" if acl_claim.interval is None else \
        f" (drop {acl_claim.estimate:+.2f}, 95 % interval [{acl_claim.interval[0]:+.2f}, {acl_claim.interval[1]:+.2f}])"
    return text + (
        f"The accuracy claim is {acl_claim.verdict} at our scale{iv}: DynaMMo's average "
        f"accuracy is {below(acl_drop)} ACL's (paper: a 2.76-point drop) and {below(der_drop)} DER's, averaged over "
        f"the scenarios whose regime check passes (of {len(drop_acl)}) and {n_seeds} seed(s). The task adapters being averaged lie on average "
        f"{100 * mean_spread:.1f}% (of the average's norm) away from it after {train_steps or 'full'} "
        "stage-1 steps per task, so the merge is tested only as far as the adapters had room to diverge.")
