"""The CMM paper's claims beside the chapter's measurements, judged by criteria stated here.

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). Verdict words and the file format: ``cmm_utils.core.verdicts``.

Each claim is checked on every scenario the chapter ran (its own and, in the ``cpu`` profile, both
book benchmarks) with paired differences over seeds. A difference counts only if it exceeds both
its standard error and :data:`MIN_EFFECT`; a claim is *supported* when it holds on at least one
scenario and fails on none, *not supported* when it fails somewhere and holds nowhere, and
*inconclusive* otherwise. "Competitive" means at most :data:`COMPETITIVE_MARGIN` below MagMax in
final accuracy and in mean class recall, and is not tested on a scenario where neither CMM nor
MagMax beats the majority-class floor by :data:`MIN_EFFECT`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cmm_utils.core.verdicts import (NOT_SUPPORTED, SUPPORTED, Claim, judge_condition, judge_inconclusive,
                                     not_run)

PAPER = "Toward a Holistic Approach to Continual Model Merging (Phan et al. 2025, arXiv:2509.23592)"
MIN_EFFECT = 0.01  # one accuracy point
COMPETITIVE_MARGIN = 0.02  # "competitive": at most two points below MagMax

COMPETITIVE = Claim(
    "competitive", "CMM is competitive with MagMax (and other merges) at constant memory, without old data",
    "competitive (abstract); a third-party scrape lists CIFAR100/10 tasks 77.72, ImageNet-R/20 tasks 82, "
    "Cars/10 tasks 69.7 for CMM (unverified)", "abstract",
    "at most 2 points below MagMax (paired over seeds) in final accuracy and in mean class recall on every "
    "scenario where CMM or MagMax beats the majority-class floor by a point",
    note="'competitive' read as at most 2 points below MagMax (paired over seeds) in final accuracy and in mean "
         "class recall; inconclusive on a scenario where neither beats the majority-class floor by a point")
CONSTANT_MEMORY = Claim(
    "constant-memory", "constant memory in the number of tasks (θ, θ0 and F only)", "constant memory (abstract)",
    "abstract", "the bytes carried after every task are equal", note="measured with continual.state_bytes")
ABLATION_NOTE = ("paired over seeds; a difference counts if it exceeds its standard error and one point. Below the "
                 "majority floor a gain means the stage avoids a collapse, not that the model learnt more than the "
                 "label prior")
ABLATIONS = {
    "cmm-no-linear": Claim("linearisation", "tangent-space (linearised) fine-tuning improves the merged model",
                           "yes (ablation; numbers not readable here)", "ablation",
                           "CMM − ablation in final accuracy above its standard error and one point", note=ABLATION_NOTE),
    "cmm-no-fisher": Claim("importance-merge", "optimizer-state weighting beats plain weight interpolation",
                           "yes (ablation; numbers not readable here)", "ablation",
                           "CMM − ablation in final accuracy above its standard error and one point", note=ABLATION_NOTE),
    "cmm-no-correction": Claim("correction", "the post-merging correction improves accuracy",
                               "yes (ablation; numbers not readable here)", "ablation",
                               "CMM − ablation in final accuracy above its standard error and one point",
                               note=ABLATION_NOTE),
}
MISMATCH = Claim(
    "mismatch", "the correction reduces the representation mismatch between the previous and the merged model",
    "yes (Fig. 3)", "Fig. 3", "distance after < before at every merge of every seed, on current-task data",
    note="every merge of every seed, current-task data (what the correction trains on)")
PAPER_SCALE = Claim(
    "paper-scale", "paper-scale numbers (CLIP ViT-B/16 on CIFAR100, ImageNet-R, CUB200, Cars)",
    "not readable here; the scraped values above are unverified", "tables", "the paper profile's numbers")


def paired_difference(allruns: pd.DataFrame, bench: str, a: str, b: str, metric: str = "final_acc"):
    """Mean of ``a − b`` over seeds on ``bench`` and its standard error (0 with one seed)."""
    part = allruns[allruns.benchmark == bench].pivot_table(index="seed", columns="method", values=metric)
    d = (part[a] - part[b]).to_numpy()
    return d.mean(), (d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0)


def mean_std(allruns: pd.DataFrame, bench: str, method: str, metric: str = "final_acc") -> str:
    v = allruns[(allruns.benchmark == bench) & (allruns.method == method)][metric] * 100
    return f"{v.mean():.1f} ± {v.std(ddof=0):.1f}"


def gap_holds(d: float, se: float) -> bool | None:
    """True / False when the gap exceeds its standard error and one point either way, else None."""
    if d > max(se, MIN_EFFECT):
        return True
    if d < -max(se, MIN_EFFECT):
        return False
    return None


def combine(holds: Sequence[bool | None]) -> bool | None:
    """Across scenarios: holds somewhere and fails nowhere (True), the reverse (False), else None."""
    if True in holds and False not in holds:
        return True
    if False in holds and True not in holds:
        return False
    return None


def _word(v: bool | None) -> str:
    return {True: "holds", False: "fails", None: "inconclusive"}[v]


def _judge(claim: Claim, holds: bool | None, ours: str) -> Claim:
    return judge_inconclusive(claim, ours) if holds is None else judge_condition(claim, holds, ours)


def _best(allruns: pd.DataFrame, bench: str, methods: Sequence[str]) -> float:
    part = allruns[(allruns.benchmark == bench) & allruns.method.isin(list(methods))]
    return max(part.groupby("method")["final_acc"].mean())


def judge_claims(allruns: pd.DataFrame, floors: Mapping[str, float], bytes_per_task: Sequence[int],
                 mismatch: pd.DataFrame, metric: str, name: str) -> list[Claim]:
    """The paper's claims judged on the chapter's runs.

    ``allruns``: one row per benchmark, method, seed (``final_acc``, ``mean_class_recall``);
    ``floors``: majority-class final accuracy per benchmark; ``bytes_per_task``: what CMM carried
    after each task (first seed); ``mismatch``: the representation mismatch log (``seed``, ``task``,
    ``data``, ``stage``, ``metric``); ``name``: the chapter's own scenario.
    """
    claims = []
    holds, text = [], []
    for bench in floors:
        d, _ = paired_difference(allruns, bench, "cmm", "magmax")
        d_mcr, _ = paired_difference(allruns, bench, "cmm", "magmax", "mean_class_recall")
        best = _best(allruns, bench, ["cmm", "magmax"])
        v = (None if best <= floors[bench] + MIN_EFFECT else
             bool(d >= -COMPETITIVE_MARGIN and not d_mcr < -COMPETITIVE_MARGIN))
        holds.append(v)
        text.append(f"{bench}: CMM {mean_std(allruns, bench, 'cmm')} vs MagMax {mean_std(allruns, bench, 'magmax')}, "
                    f"averaging {mean_std(allruns, bench, 'average')}, seq-FT {mean_std(allruns, bench, 'seq-ft')}, "
                    f"majority floor {100 * floors[bench]:.1f}; mean class recall CMM "
                    f"{mean_std(allruns, bench, 'cmm', 'mean_class_recall')} vs MagMax "
                    f"{mean_std(allruns, bench, 'magmax', 'mean_class_recall')} ({_word(v)})")
    claims.append(_judge(COMPETITIVE, combine(holds), "final acc (%) " + "; ".join(text)))
    b = list(bytes_per_task)
    claims.append(judge_condition(CONSTANT_MEMORY, len(set(b)) == 1,
                                  f"{b[0] / 2**20:.2f} MB after task 1, {b[-1] / 2**20:.2f} MB after task {len(b)}"))
    for m, claim in ABLATIONS.items():
        holds, text = [], []
        for bench in floors:
            d, se = paired_difference(allruns, bench, "cmm", m)
            holds.append(gap_holds(d, se))
            below = ", both below the majority floor" if _best(allruns, bench, ["cmm", m]) <= floors[bench] + MIN_EFFECT else ""
            text.append(f"{bench}: CMM {mean_std(allruns, bench, 'cmm')} vs {mean_std(allruns, bench, m)} without it "
                        f"({100 * d:+.1f} ± {100 * se:.1f} pts{below}, {_word(holds[-1])})")
        claims.append(_judge(claim, combine(holds), "final acc (%) " + "; ".join(text)))
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
       "hundred images per task, and frozen data-free heads instead of CLIP's zero-shot heads: a zero-shot head "
       "keeps old classes recognisable when the model stays close to θ0, ours does not, so every method trained "
       "with a task-local softmax is exposed to confusion between tasks.")


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
