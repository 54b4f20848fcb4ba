"""The MagMax paper's claims beside the chapter's measurements (:mod:`cmm_utils.core.verdicts`).

Paper values are literals with their source; ours come from the chapter's artifacts (``summary.csv``,
``lambda.csv``, ``regime.csv`` and ``predictions.json``). The criteria and thresholds are stated once,
here. Every comparison is a paired gap with a 95 % interval: a bootstrap over the test images
within each seed, the seeds' replicates averaged (:func:`cmm_utils.core.verdicts.paired_bootstrap_metric`),
in the scenario's primary metric (:data:`PRIMARY_METRIC`); the λ comparison, whose per-image
predictions are not kept, uses a Student-t interval over seeds. A scenario whose regime check
fails (:mod:`.regime`) is "not testable here" for every claim; over the testable scenarios a claim
is supported when its interval excludes zero (or the margin) in the claimed direction on all of
them, not supported when the opposite holds on one, inconclusive otherwise
(:func:`cmm_utils.core.verdicts.combine_scenarios`). One that needs a profile this build did not
run (the CIFAR-100 headline number) is "not run".
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import pandas as pd

from cmm_utils.core.regime import Regime
from cmm_utils.core.verdicts import (Claim, combine_scenarios, count_verdicts, judge_bootstrap, judge_condition,
                                     judge_gap, not_run, not_testable, shift_gap)
from cmm_utils.papers.magmax.method import MERGES, parse_method

PAPER = "MagMax: Leveraging Model Merging for Seamless Continual Learning (ECCV 2024)"
# The paper's claims that the chapter checks (abstract; research note §4). The paper's tables could
# not be read: the CIFAR-100 10-task 77.04 comes from an aggregator's listing (papers/magmax.txt)
# that also attributes unrelated results (e.g. Cityscapes mIoU) to the paper, so it is *unverified*,
# a target to check against the PDF's table, not the paper's number.
PAPER_CLAIMS = {"cifar100_t10_magmax": 77.04}
HEADLINE_BENCHMARK = "cifar100-cil10"
HEADLINE_TOLERANCE = 2.0        # points of accuracy within which the headline number counts as reproduced
SIMPLE_MERGE_MARGIN = 0.05      # averaging and random selection "hold up": within 5 points of the best merge
# the metric each scenario's comparisons are judged in: mean class recall where one class dominates
# (HAM10000: ~60 % naevi, a majority predictor scores 60 % accuracy but 1/7 recall); accuracy elsewhere
PRIMARY_METRIC = {"ham10000-cil": "mean_class_recall"}
FIXED_LAMBDA_TOLERANCE = 0.02   # a fixed λ is robust: within 2 points of the validation-chosen λ
OTHER_MERGES = ("average", "task-arithmetic", "ties", "random", "average-ind", "task-arithmetic-ind",
                "ties-ind", "random-ind", "magmax-ind")
HELPED_MERGES = ("average", "task-arithmetic", "ties", "random")

CLAIMS = {
    "headline": Claim("headline", "CIFAR-100, 10 tasks: MagMax reaches 77.04 % (ViT-B/16 CLIP; unverified target, "
                      "not read in the paper)",
                      PAPER_CLAIMS["cifar100_t10_magmax"], "unverified: an aggregator's listing (papers/magmax.txt) "
                      "that also attributes unrelated rows to the paper; not checked against the paper's tables",
                      f"within {HEADLINE_TOLERANCE:g} points of 77.04 % on {HEADLINE_BENCHMARK}"),
    "best-merge": Claim("best-merge", "MagMax (sequential fine-tuning, λ = 0.5) beats the other merges",
                        "best merge in CIL and DIL", "abstract",
                        "MagMax − the best other merge (by mean), paired bootstrap over test images within seeds: the "
                        "95 % interval above 0 on every scenario whose regime passes (primary metric)"),
    "simple-merges": Claim("simple-merges", "simple averaging and random selection hold up well",
                           "qualitative (abstract)", "abstract",
                           f"averaging − best merge and random − best merge: the 95 % interval above −{100 * SIMPLE_MERGE_MARGIN:g} "
                           "points on every scenario whose regime passes (paired bootstrap, primary metric)"),
    "sequential-helps": Claim("sequential-helps", "sequential fine-tuning helps other merges (vs independent fine-tuning)",
                              "qualitative (paper's ablation)", "the paper's ablation",
                              "sequential − independent, pooled over averaging, task arithmetic, TIES and random: the "
                              "95 % interval above 0 on every scenario whose regime passes (paired bootstrap)"),
    "fixed-lambda": Claim("fixed-lambda", "a fixed λ (MagMax 0.5) is largely robust",
                          "qualitative (third-party summary, unverified)", "third-party summary of the paper",
                          f"fixed λ − validation-chosen λ in test accuracy: the 95 % interval (Student t over seeds) "
                          f"above −{100 * FIXED_LAMBDA_TOLERANCE:g} points on every scenario whose regime passes"),
}


def method_means(summary: pd.DataFrame, metric: str = "final_acc") -> pd.DataFrame:
    """Mean ``metric`` over seeds: a row per method, a column per scenario."""
    return summary.groupby(["benchmark", "method"])[metric].mean().unstack(0)


def _mean(means: pd.DataFrame, bench: str, method: str) -> float:
    return float(means.loc[method, bench]) if method in means.index and bench in means.columns else float("nan")


def _merge_names(means: pd.DataFrame) -> list[str]:
    return [m for m in means.index if parse_method(m)[0] in MERGES]


def primary_metric(bench: str) -> str:
    """The metric a scenario's comparisons are judged in (:data:`PRIMARY_METRIC`, else accuracy)."""
    return PRIMARY_METRIC.get(bench, "accuracy")


def _units(preds: Mapping, bench: str, a: str, b: str) -> tuple[list, list, list]:
    """Per-seed predictions of methods ``a`` and ``b`` and the labels, for the paired bootstrap."""
    seeds = [s for s, p in preds.get(bench, {}).items() if a in p and b in p]
    return ([preds[bench][s][a] for s in seeds], [preds[bench][s][b] for s in seeds],
            [preds[bench][s]["labels"] for s in seeds])


def _gap(claim: Claim, preds: Mapping, bench: str, a: str, b: str, label: str | None = None) -> Claim:
    """``a − b`` in the scenario's primary metric, paired bootstrap over test images within seeds."""
    pa, pb, y = _units(preds, bench, a, b)
    metric = primary_metric(bench)
    if not pa:
        return not_run(claim, f"{bench}: no per-image predictions of {a} and {b}")
    c = judge_bootstrap(claim, pa, pb, y, metric)
    return replace(c, ours=f"{label or a + ' − ' + b} {100 * c.estimate:+.1f} pts ({metric})")


def _per_scenario(claim: Claim, regimes: Mapping[str, Regime], benches, judge) -> Claim:
    """``judge(bench)`` on every scenario whose regime passes, "not testable here" on the others."""
    judged = {b: (judge(b) if b not in regimes or regimes[b].passed else not_testable(claim, regimes[b].failing()))
              for b in benches}
    return combine_scenarios(claim, judged)


def judge_claims(summary: pd.DataFrame, lambdas: pd.DataFrame, regimes: Mapping[str, Regime] | None = None,
                 predictions: Mapping | None = None) -> list[Claim]:
    """The claims of :data:`CLAIMS`, judged on the chapter's frames: ``summary``, ``lambda``, the
    regime checks (``regime.csv`` as :class:`~cmm_utils.core.regime.Regime` per scenario) and the final
    models' per-image test predictions (``predictions.json``: scenario → seed → method → predictions,
    and ``labels``). Every comparison is a paired gap with a 95 % interval (module docstring)."""
    regimes, preds = regimes or {}, predictions or {}
    means = method_means(summary, "final_acc")
    benches = list(means.columns)
    others = [m for m in OTHER_MERGES if m in means.index]
    judged = []

    if HEADLINE_BENCHMARK in benches:
        ours = round(100 * _mean(means, HEADLINE_BENCHMARK, "magmax"), 2)
        judged.append(judge_condition(CLAIMS["headline"], bool(abs(ours - 77.04) <= HEADLINE_TOLERANCE), ours,
                                      note=f"within {HEADLINE_TOLERANCE:g} points counts as reproduced"))
    else:
        judged.append(not_run(CLAIMS["headline"], "needs the `paper` profile (GPU, CLIP weights); not run here"))

    def best_other(bench: str, pool: Sequence[str]) -> str:
        metric = "mean_class_recall" if primary_metric(bench) == "mean_class_recall" else "final_acc"
        col = method_means(summary, metric)
        return max(pool, key=lambda m: _mean(col, bench, m))

    if "magmax" in means.index and others:
        judged.append(_per_scenario(CLAIMS["best-merge"], regimes, benches, lambda b: _gap(
            CLAIMS["best-merge"], preds, b, "magmax", best_other(b, others), f"MagMax − {best_other(b, others)}")))
    else:
        judged.append(not_run(CLAIMS["best-merge"], "MagMax or the other merges were not run"))

    merges = _merge_names(means)
    if {"average", "random"} <= set(means.index):
        def simple(b):
            best = best_other(b, merges)
            each = {m: shift_gap(_gap(CLAIMS["simple-merges"], preds, b, m, best, f"{m} − {best}")
                                 if m != best else _gap(CLAIMS["simple-merges"], preds, b, m, m, f"{m} is the best"),
                                 SIMPLE_MERGE_MARGIN) for m in ("average", "random")}
            return combine_scenarios(CLAIMS["simple-merges"], each)
        judged.append(_per_scenario(CLAIMS["simple-merges"], regimes, benches, simple))
    else:
        judged.append(not_run(CLAIMS["simple-merges"], "averaging or random selection was not run"))

    helped = [m for m in HELPED_MERGES if m in means.index and f"{m}-ind" in means.index]
    if helped:
        def seq_vs_ind(b):
            units = [_units(preds, b, m, f"{m}-ind") for m in helped]
            pa, pb, y = (sum((u[i] for u in units), []) for i in range(3))
            if not pa:
                return not_run(CLAIMS["sequential-helps"], f"{b}: no per-image predictions")
            c = judge_bootstrap(CLAIMS["sequential-helps"], pa, pb, y, primary_metric(b))
            return replace(c, ours=f"sequential − independent {100 * c.estimate:+.1f} pts over {', '.join(helped)}")
        judged.append(_per_scenario(CLAIMS["sequential-helps"], regimes, benches, seq_vs_ind))
    else:
        judged.append(not_run(CLAIMS["sequential-helps"], "no merge was run in both regimes"))

    magmax_lambda = lambdas[(lambdas["merge"] == "magmax") & (lambdas["regime"] == "sequential")] if len(lambdas) else lambdas
    if len(magmax_lambda):
        def fixed(b):
            part = magmax_lambda[magmax_lambda["benchmark"] == b]
            gaps = (part["test_acc_paper_lambda"] - part["test_acc_chosen_lambda"]).to_numpy()
            c = judge_gap(CLAIMS["fixed-lambda"], gaps, ours=f"fixed − chosen λ {100 * gaps.mean():+.1f} pts")
            return shift_gap(c, FIXED_LAMBDA_TOLERANCE)
        judged.append(_per_scenario(CLAIMS["fixed-lambda"], regimes, sorted(set(magmax_lambda["benchmark"])), fixed))
    else:
        judged.append(not_run(CLAIMS["fixed-lambda"], "MagMax's λ was not swept"))
    return judged


def verdict_summary(claims: list[Claim], summary: pd.DataFrame, profile: str, seeds: int) -> str:
    """One paragraph: the scenarios, the verdict counts, the best merge per scenario."""
    means = method_means(summary)
    benches, merges = list(means.columns), _merge_names(means)
    counts = count_verdicts(claims)
    best = {b: max(merges, key=lambda m: _mean(means, b, m)) for b in benches}
    return (f"On {len(benches)} scenario(s) ({', '.join(benches)}; profile `{profile}`, {seeds} seed(s)), "
            f"{counts['supported']} of {len(claims)} checked claims are supported, {counts['not supported']} not, "
            f"{len(claims) - counts['supported'] - counts['not supported']} not decided here (inconclusive, not testable "
            "or not run). Best merge per scenario: "
            + ", ".join(f"{b}: {m} ({100 * _mean(means, b, m):.1f} %)" for b, m in best.items()) + ".")
