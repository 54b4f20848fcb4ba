"""The CMM paper's claims beside the chapter's measurements, judged by criteria stated here.

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). Verdict words and the file format: ``cmm_utils.core.verdicts``.

Each claim is checked on every scenario the chapter ran (its own and, in the ``cpu`` profile, both
book benchmarks). A scenario whose regime check fails (:mod:`.regime`: floors, θ0, joint, R[t, t],
forgetting) is "not testable here" with its failing numbers. On the others every comparison is a
paired gap with a 95 % interval: a bootstrap over the test images within each seed, the seeds'
replicates averaged (``core.verdicts.paired_bootstrap_metric``), in the scenario's primary metric
(:data:`PRIMARY_METRIC`). A claim is *supported* when the interval lies on the claimed side of 0 on
every testable scenario, *not supported* when it lies on the other side on one, *inconclusive*
otherwise (``core.verdicts.combine_scenarios``). "Competitive" means CMM − MagMax above
−:data:`COMPETITIVE_MARGIN`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import pandas as pd

from cmm_utils.core.regime import Regime
from cmm_utils.core.verdicts import (NOT_SUPPORTED, SUPPORTED, Claim, combine_scenarios, judge_bootstrap,
                                     judge_condition, not_run, not_testable, shift_gap)

PAPER = "Toward a Holistic Approach to Continual Model Merging (Phan et al. 2025, arXiv:2509.23592)"
MIN_EFFECT = 0.01  # one accuracy point (the floor test of the page's tables)
COMPETITIVE_MARGIN = 0.02  # "competitive": at most two points below MagMax
# the metric each scenario's comparisons are judged in: mean class recall where one class dominates
# (HAM10000: ~60 % naevi, a majority predictor scores 60 % accuracy but 1/7 recall); accuracy elsewhere
PRIMARY_METRIC = {"ham10000-cil": "mean_class_recall"}

COMPETITIVE = Claim(
    "competitive", "CMM is competitive with MagMax (and other merges) at constant memory, without old data",
    "competitive (abstract); a third-party scrape lists CIFAR100/10 tasks 77.72, ImageNet-R/20 tasks 82, "
    "Cars/10 tasks 69.7 for CMM (unverified)", "abstract",
    "CMM − MagMax (paired bootstrap over test images within seeds, primary metric): the 95 % interval above "
    "−2 points on every scenario whose regime passes",
    note="'competitive' read as at most 2 points below MagMax; the primary metric is mean class recall on "
         "HAM10000 (imbalanced), accuracy elsewhere")
CONSTANT_MEMORY = Claim(
    "constant-memory", "constant memory in the number of tasks (θ, θ0 and F only)", "constant memory (abstract)",
    "abstract", "the bytes carried after every task are equal", note="measured with continual.state_bytes")
ABLATION_NOTE = ("paired bootstrap over test images within seeds, the seeds' replicates averaged; primary metric "
                 "(mean class recall on HAM10000, accuracy elsewhere)")
ABLATION_CRITERION = "CMM − ablation: the 95 % interval above 0 on every scenario whose regime passes"
ABLATIONS = {
    "cmm-no-linear": Claim("linearisation", "tangent-space (linearised) fine-tuning improves the merged model",
                           "yes (ablation; numbers not readable here)", "ablation",
                           ABLATION_CRITERION, note=ABLATION_NOTE),
    "cmm-no-fisher": Claim("importance-merge", "optimizer-state weighting beats plain weight interpolation",
                           "yes (ablation; numbers not readable here)", "ablation",
                           ABLATION_CRITERION, note=ABLATION_NOTE),
    "cmm-no-correction": Claim("correction", "the post-merging correction improves accuracy",
                               "yes (ablation; numbers not readable here)", "ablation",
                               ABLATION_CRITERION, note=ABLATION_NOTE),
}
MISMATCH = Claim(
    "mismatch", "the correction reduces the representation mismatch between the previous and the merged model",
    "yes (Fig. 3)", "Fig. 3", "distance after < before at every merge of every seed, on current-task data",
    note="every merge of every seed, current-task data (what the correction trains on)")
PAPER_SCALE = Claim(
    "paper-scale", "paper-scale numbers (CLIP ViT-B/16 on CIFAR100, ImageNet-R, CUB200, Cars)",
    "not readable here; the scraped values above are unverified", "tables", "the paper profile's numbers")


def mean_std(allruns: pd.DataFrame, bench: str, method: str, metric: str = "final_acc") -> str:
    v = allruns[(allruns.benchmark == bench) & (allruns.method == method)][metric] * 100
    return f"{v.mean():.1f} ± {v.std(ddof=0):.1f}"


def primary_metric(bench: str) -> str:
    """The metric a scenario's comparisons are judged in (:data:`PRIMARY_METRIC`, else accuracy)."""
    return PRIMARY_METRIC.get(bench, "accuracy")


def bootstrap_gap(claim: Claim, preds: Mapping, bench: str, a: str, b: str) -> Claim:
    """``a − b`` in ``bench``'s primary metric: paired bootstrap over the test images within each
    seed, the seeds' replicates averaged (``core.verdicts.paired_bootstrap_metric``)."""
    seeds = [s for s, p in preds.get(bench, {}).items() if p.get(a) is not None and p.get(b) is not None]
    if not seeds:
        return not_run(claim, f"{bench}: no per-image predictions of {a} and {b}")
    c = judge_bootstrap(claim, [preds[bench][s][a] for s in seeds], [preds[bench][s][b] for s in seeds],
                        [preds[bench][s]["labels"] for s in seeds], primary_metric(bench))
    return replace(c, ours=f"{a} − {b} {100 * c.estimate:+.1f} pts ({primary_metric(bench)}, {len(seeds)} seed(s))")


def per_scenario(claim: Claim, regimes: Mapping[str, Regime], benches: Sequence[str], judge) -> Claim:
    """``judge(bench)`` where the scenario's regime passes, "not testable here" (with the failing
    numbers) elsewhere, combined over scenarios (``core.verdicts.combine_scenarios``)."""
    return combine_scenarios(claim, {b: judge(b) if b not in regimes or regimes[b].passed
                                     else not_testable(claim, regimes[b].failing()) for b in benches})


def judge_claims(allruns: pd.DataFrame, floors: Mapping[str, float], bytes_per_task: Sequence[int],
                 mismatch: pd.DataFrame, metric: str, name: str, regimes: Mapping[str, Regime] | None = None,
                 predictions: Mapping | None = None) -> list[Claim]:
    """The paper's claims judged on the chapter's runs.

    ``allruns``: one row per benchmark, method, seed (``final_acc``, ``mean_class_recall``);
    ``floors``: majority-class final accuracy per benchmark; ``bytes_per_task``: what CMM carried
    after each task (first seed); ``mismatch``: the representation mismatch log (``seed``, ``task``,
    ``data``, ``stage``, ``metric``); ``name``: the chapter's own scenario; ``regimes``: the regime
    check per scenario (:mod:`.regime`); ``predictions``: scenario → seed → method → the final
    model's per-image test predictions, and ``labels``.
    """
    regimes, preds = regimes or {}, predictions or {}
    benches = list(floors)
    claims = [per_scenario(COMPETITIVE, regimes, benches,
                           lambda b: shift_gap(bootstrap_gap(COMPETITIVE, preds, b, "cmm", "magmax"), COMPETITIVE_MARGIN))]
    b = list(bytes_per_task)
    claims.append(judge_condition(CONSTANT_MEMORY, len(set(b)) == 1,
                                  f"{b[0] / 2**20:.2f} MB after task 1, {b[-1] / 2**20:.2f} MB after task {len(b)}"))
    for m, claim in ABLATIONS.items():
        claims.append(per_scenario(claim, regimes, benches, lambda bench, m=m, claim=claim:
                                   bootstrap_gap(claim, preds, bench, "cmm", m)))
    cur = mismatch[(mismatch.data == "current")].pivot_table(index=["seed", "task"], columns="stage", values=metric)
    old = mismatch[(mismatch.data == "old")].pivot_table(index=["seed", "task"], columns="stage", values=metric)
    claims.append(judge_condition(
        MISMATCH, bool((cur["after"] < cur["before"]).all()),
        f"{metric} distance on current-task data {cur['before'].mean():.4f} → {cur['after'].mean():.4f}; "
        f"on earlier tasks' data {old['before'].mean():.4f} → {old['after'].mean():.4f} ({name})"))
    claims.append(not_run(PAPER_SCALE, "run the notebook with -p profile paper on a GPU box"))
    return claims


WHY = ("Our setting differs from the paper's in ways that matter for every comparison: 28x28 images, "
       "a small ResNet-18 pretrained on Fashion-MNIST and a CIFAR-10 subset instead of CLIP, one pass over a few "
       "hundred images per task, and frozen heads built from θ0's class means instead of CLIP's zero-shot text "
       "heads: both classify at θ0, but from a far weaker backbone, so every method trained with a task-local "
       "softmax is more exposed to confusion between tasks.")


def summary(allruns: pd.DataFrame, claims: Sequence[Claim], floors: Mapping[str, float], name: str, profile: str,
            n_seeds: int, bytes_per_task: Sequence[int]) -> str:
    """The verdict's one-paragraph summary."""
    sup = sum(c.verdict == SUPPORTED for c in claims)
    nsup = sum(c.verdict == NOT_SUPPORTED for c in claims)
    return (f"On {name} ({profile} profile, {n_seeds} seed(s)), CMM reaches a final accuracy of "
            f"{mean_std(allruns, name, 'cmm')} % vs {mean_std(allruns, name, 'magmax')} % for MagMax with the same "
            f"backbone, heads and recipe (majority-class floor {100 * floors[name]:.1f} %), carrying a constant "
            f"{bytes_per_task[-1] / 2**20:.1f} MB; {sup} of {len(claims)} claims are supported by our runs, {nsup} "
            f"are not, the rest are inconclusive or not testable here.")


def caveats(name: str, earlier_task_accuracy: Sequence[float]) -> str:
    """Why our numbers are not the paper's: CMM's accuracy on the earlier tasks after the last
    task (mean over seeds), then the setting's differences."""
    forget = (f"On {name}, after the last task CMM's accuracy on the earlier tasks is "
              f"{', '.join(f'{100 * v:.0f} %' for v in earlier_task_accuracy)}. ") if len(earlier_task_accuracy) else ""
    return forget + WHY
