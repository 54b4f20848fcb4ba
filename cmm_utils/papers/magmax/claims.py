"""The MagMax paper's claims beside the chapter's measurements (:mod:`cmm_utils.core.verdicts`).

Paper values are literals with their source; ours come from the chapter's artifacts (``summary.csv``
and ``lambda.csv``). The criteria and thresholds are stated once, here. A claim is supported only
when our runs show it on every scenario, or as its criterion says; one that needs a profile this
build did not run (the CIFAR-100 headline number) is "not run".
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cmm_utils.core.verdicts import Claim, count_verdicts, judge_condition, not_run
from cmm_utils.papers.magmax.method import MERGES, parse_method

PAPER = "MagMax: Leveraging Model Merging for Seamless Continual Learning (ECCV 2024)"
# The paper's claims that the chapter checks (abstract; research note §4). Only the CIFAR-100
# 10-task number could be read; the paper's tables are not in the notes.
PAPER_CLAIMS = {"cifar100_t10_magmax": 77.04}
HEADLINE_BENCHMARK = "cifar100-cil10"
HEADLINE_TOLERANCE = 2.0        # points of accuracy within which the headline number counts as reproduced
SIMPLE_MERGE_MARGIN = 0.05      # averaging and random selection "hold up": within 5 points of the best merge
SEQ_FT_SLACK = 0.01             # "match or beat seq-ft": at most 1 point below it (reported in the note)
FIXED_LAMBDA_TOLERANCE = 0.02   # a fixed λ is robust: within 2 points of the validation-chosen λ
OTHER_MERGES = ("average", "task-arithmetic", "ties", "random", "average-ind", "task-arithmetic-ind",
                "ties-ind", "random-ind", "magmax-ind")
HELPED_MERGES = ("average", "task-arithmetic", "ties", "random")

CLAIMS = {
    "headline": Claim("headline", "CIFAR-100, 10 tasks: MagMax reaches 77.04 % (ViT-B/16 CLIP)",
                      PAPER_CLAIMS["cifar100_t10_magmax"], "papers/magmax.txt (leaderboard listing of the paper)",
                      f"within {HEADLINE_TOLERANCE:g} points of 77.04 % on {HEADLINE_BENCHMARK}"),
    "best-merge": Claim("best-merge", "MagMax (sequential fine-tuning, λ = 0.5) beats the other merges",
                        "best merge in CIL and DIL", "abstract",
                        "MagMax's mean final accuracy at least every other merge's on every scenario"),
    "simple-merges": Claim("simple-merges", "simple averaging and random selection hold up well",
                           "qualitative (abstract)", "abstract",
                           f"both within {100 * SIMPLE_MERGE_MARGIN:g} points of the best merge on every scenario"),
    "sequential-helps": Claim("sequential-helps", "sequential fine-tuning helps other merges (vs independent fine-tuning)",
                              "qualitative (paper's ablation)", "the paper's ablation",
                              "sequential beats independent in most pairs (averaging, task arithmetic, TIES, random)"),
    "fixed-lambda": Claim("fixed-lambda", "a fixed λ (MagMax 0.5) is largely robust",
                          "qualitative (third-party summary, unverified)", "third-party summary of the paper",
                          f"within {100 * FIXED_LAMBDA_TOLERANCE:g} points of the validation-chosen λ on every scenario"),
}


def method_means(summary: pd.DataFrame, metric: str = "final_acc") -> pd.DataFrame:
    """Mean ``metric`` over seeds: a row per method, a column per scenario."""
    return summary.groupby(["benchmark", "method"])[metric].mean().unstack(0)


def _mean(means: pd.DataFrame, bench: str, method: str) -> float:
    return float(means.loc[method, bench]) if method in means.index and bench in means.columns else float("nan")


def _merge_names(means: pd.DataFrame) -> list[str]:
    return [m for m in means.index if parse_method(m)[0] in MERGES]


def judge_claims(summary: pd.DataFrame, lambdas: pd.DataFrame) -> list[Claim]:
    """The claims of :data:`CLAIMS`, judged on the chapter's ``summary`` and ``lambda`` frames."""
    means, recall = method_means(summary), method_means(summary, "mean_class_recall")
    benches = list(means.columns)
    others = [m for m in OTHER_MERGES if m in means.index]
    judged = []

    if HEADLINE_BENCHMARK in benches:
        ours = round(100 * _mean(means, HEADLINE_BENCHMARK, "magmax"), 2)
        judged.append(judge_condition(CLAIMS["headline"], bool(abs(ours - 77.04) <= HEADLINE_TOLERANCE), ours,
                                      note=f"within {HEADLINE_TOLERANCE:g} points counts as reproduced"))
    else:
        judged.append(not_run(CLAIMS["headline"], "needs the `paper` profile (GPU, CLIP weights); not run here"))

    if "magmax" in means.index and others:
        wins = [b for b in benches if _mean(means, b, "magmax") >= max(_mean(means, b, m) for m in others)]
        detail = "; ".join(f"{b}: MagMax {100 * _mean(means, b, 'magmax'):.1f} vs best other "
                           f"{max(others, key=lambda m: _mean(means, b, m))} {100 * max(_mean(means, b, m) for m in others):.1f}"
                           for b in benches)
        wins_mcr = [b for b in benches if "magmax" in recall.index and recall.loc["magmax", b]
                    >= max(recall.loc[m, b] for m in others if m in recall.index)]
        judged.append(judge_condition(CLAIMS["best-merge"], len(wins) == len(benches),
                                      f"best on {len(wins)} of {len(benches)} scenarios",
                                      note=detail + f"; by mean class recall best on {len(wins_mcr)} of {len(benches)}"))
    else:
        judged.append(not_run(CLAIMS["best-merge"], "MagMax or the other merges were not run"))

    merges = _merge_names(means)
    if {"average", "random"} <= set(means.index):
        gaps = {b: max(_mean(means, b, m) for m in merges) - min(_mean(means, b, "average"), _mean(means, b, "random"))
                for b in benches}
        beat_ft = [b for b in benches
                   if min(_mean(means, b, "average"), _mean(means, b, "random")) >= _mean(means, b, "seq-ft") - SEQ_FT_SLACK]
        judged.append(judge_condition(
            CLAIMS["simple-merges"], all(g <= SIMPLE_MERGE_MARGIN for g in gaps.values()),
            "; ".join(f"{b}: {100 * g:.1f} points below the best merge" for b, g in gaps.items()),
            note=f"they match or beat seq-ft on {len(beat_ft)} of {len(benches)}"))
    else:
        judged.append(not_run(CLAIMS["simple-merges"], "averaging or random selection was not run"))

    pairs = [(b, m) for b in benches for m in HELPED_MERGES if m in means.index and f"{m}-ind" in means.index]
    if pairs:
        helped = [(b, m) for b, m in pairs if _mean(means, b, m) > _mean(means, b, f"{m}-ind")]
        diff = np.mean([_mean(means, b, m) - _mean(means, b, f"{m}-ind") for b, m in pairs])
        judged.append(judge_condition(CLAIMS["sequential-helps"], len(helped) > len(pairs) / 2,
                                      f"{len(helped)} of {len(pairs)} (merge, scenario) pairs; "
                                      f"mean change {100 * diff:+.1f} points"))
    else:
        judged.append(not_run(CLAIMS["sequential-helps"], "no merge was run in both regimes"))

    magmax_lambda = lambdas[(lambdas["merge"] == "magmax") & (lambdas["regime"] == "sequential")] if len(lambdas) else lambdas
    if len(magmax_lambda):
        by_bench = magmax_lambda.groupby("benchmark")
        gain = by_bench["test_acc_chosen_lambda"].mean() - by_bench["test_acc_paper_lambda"].mean()
        judged.append(judge_condition(
            CLAIMS["fixed-lambda"], bool((gain.abs() <= FIXED_LAMBDA_TOLERANCE).all()),
            "; ".join(f"{b}: validation-chosen λ changes test accuracy by {100 * g:+.1f} points" for b, g in gain.items())))
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
