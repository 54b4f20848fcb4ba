"""MedMerge's claims beside our measurements, and the criteria that judge them
(:mod:`cmm_utils.core.verdicts`).

A gain claim (MedMerge above a baseline, or the best of a family of baselines by mean over seeds) is
judged on paired gaps in points, one per backbone/target × seed (the same target split, head seed
and fine-tuning recipe for both), with a Student-t 95 % interval over those units
(:func:`cmm_utils.core.verdicts.judge_gap`): supported when the whole interval is above zero, not
supported when it is below, inconclusive otherwise (and with a single unit). Only the runs whose
regime check passes (:mod:`cmm_utils.papers.medmerge.regime`) count; where none passes, the claim is
"not testable here" with the failing numbers.

The second source's value is judged against what the natural source gives alone (the better of FT
and LP-FT from it), not against the paper's "merge with zeros": once BatchNorm statistics are
recomputed, a kernel-wise rescaling of source ``a`` is source ``a`` again, so that control cannot
fail. The per-kernel weights are judged against the controls of :mod:`~cmm_utils.papers.medmerge.controls`
(one global and one per-layer interpolation weight), and MedMerge is set beside the output ensemble.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cmm_utils.core.regime import Regime
from cmm_utils.core.verdicts import Claim, judge_condition, judge_gap, judge_inconclusive, not_run, not_testable
from cmm_utils.papers.medmerge.profiles import FT_BASELINES, LPFT_BASELINES, MERGES, METHOD_LABELS

PAPER = "MedMerge: Merging Models for Effective Transfer Learning to Medical Imaging Tasks (Almakky et al. 2024)"
ABLATION_TOLERANCE_POINTS = 1.0  # the open choices "matter little" when their spread is within max(seed std, this)
LAYER_PATTERN_RATIO = 0.25  # layers "lean" when a layer mean moves more than this share of the within-layer spread

GAIN_CRITERION = ("MedMerge − {other} in points, one per backbone/target × seed, runs whose regime check passes: "
                  "supported if the whole 95 % t-interval is above 0, not supported if below, else inconclusive")
# (claim id, text, the baselines (best by mean over seeds), metric, paper value, source)
GAINS = (
    ("macro_f1_vs_fine-tuning", "MedMerge improves macro F1 over fine-tuning", FT_BASELINES, "macro_f1",
     "up to +7 macro-F1 points (v2 abstract; v1: up to +3)", "arXiv:2403.11646 v2 abstract"),
    ("macro_f1_vs_lp-ft", "MedMerge improves macro F1 over LP-FT", LPFT_BASELINES, "macro_f1",
     "MedMerge better (numbers not public)", "the paper's comparison (tables not readable)"),
    ("macro_f1_vs_merges", "MedMerge improves macro F1 over merges of FT models", MERGES, "macro_f1",
     "MedMerge better than other merges (numbers not public)", "the paper's comparison (tables not readable)"),
    ("accuracy_vs_fine-tuning", "MedMerge improves accuracy over fine-tuning", FT_BASELINES, "accuracy",
     "higher accuracy (numbers not public)", "the paper's comparison"),
    ("medical_source_helps", "The second (medical) source helps: MedMerge beats the natural source alone",
     ("ft_natural", "lpft_natural"), "macro_f1", "implied by the zeros ablation (Fig. 3b); numbers not public",
     "Fig. 3b (the zeros control replaced: see the module docstring)"),
    ("kernel_weights_matter", "Per-kernel weights matter: MedMerge beats one global or one per-layer weight",
     ("interp_global", "interp_layer"), "macro_f1", "implied by the method (kernel-level weights)",
     "paper Sec. 3; a control of ours"),
    ("merge_vs_ensemble", "control: MedMerge (one network) beats the output ensemble of the two FT models (two)",
     ("ensemble",), "macro_f1", "not claimed", "a control of ours: what the two sources give together"),
)


def paired_units(final: pd.DataFrame, method: str, baselines: Sequence[str], metric: str,
                 runs: Sequence[tuple[str, str]] | None = None) -> tuple[np.ndarray, str]:
    """MedMerge − the best of ``baselines`` (best by mean over seeds, per backbone/target) in points,
    one per (backbone, target, seed) of ``runs`` (default: all), and the per-run gaps in words."""
    gaps, words = [], []
    for (arch, target), grp in final.groupby(["arch", "target"], sort=False):
        if runs is not None and (arch, target) not in runs:
            continue
        piv = grp.pivot_table(index="seed", columns="method", values=metric)
        have = [b for b in baselines if b in piv]
        if method not in piv or not have:
            continue
        best = max(have, key=lambda b: piv[b].mean())
        diff = (100 * (piv[method] - piv[best])).dropna()
        gaps += diff.tolist()
        sd = f" ± {diff.std(ddof=1):.1f}" if len(diff) > 1 else ""
        words.append(f"{arch}/{target} vs {METHOD_LABELS.get(best, best)}: {diff.mean():+.1f}{sd} "
                     f"({int((diff > 0).sum())}/{len(diff)} seeds won)")
    return np.asarray(gaps, dtype=float), "; ".join(words)


def _regime_split(regimes: Mapping[tuple[str, str], Regime] | None, final: pd.DataFrame):
    runs = list(dict.fromkeys(zip(final["arch"], final["target"])))
    if regimes is None:
        return runs, ""
    ok = [r for r in runs if r in regimes and regimes[r].passed]
    return ok, "; ".join(regimes[r].failing() for r in runs if r in regimes and not regimes[r].passed)


def judge_claims(results: pd.DataFrame, gap_tables: Mapping[tuple[str, str], pd.DataFrame],
                 depth: pd.DataFrame, layer_shift: pd.Series, spread: float, seed_std: float,
                 init: float, regimes: Mapping[tuple[str, str], Regime] | None = None) -> list[Claim]:
    """Every claim, judged from the chapter's artifacts: the results, the kernel weights'
    :func:`~cmm_utils.papers.medmerge.tables.depth_summary` and
    :func:`~cmm_utils.papers.medmerge.tables.largest_layer_shift`, the ablation's spread and seed std
    (points), the initial ``w`` and the regime of each (backbone, target) (``None``: all count).
    ``gap_tables`` (:func:`~cmm_utils.papers.medmerge.tables.gap_tables`) are the page's view of the
    same gaps and are not needed for the verdicts."""
    final = results[results["stage"] == "final"]
    testable, failing = _regime_split(regimes, final)
    excluded = f" Left out (regime check failed): {failing}." if failing and testable else ""
    claims = []
    for cid, text, baselines, metric, paper_value, source in GAINS:
        other = "the best of " + ", ".join(baselines) if len(baselines) > 1 else baselines[0]
        claim = Claim(cid, text, paper_value, source, GAIN_CRITERION.format(other=other))
        gaps, words = paired_units(final, "medmerge", baselines, metric, testable)
        _, all_words = paired_units(final, "medmerge", baselines, metric)
        if not all_words:
            claims.append(not_run(claim, "no experiment compares these methods in this build"))
        elif not testable:
            claims.append(not_testable(replace(claim, note=f"{metric} gaps (points): {all_words}"), failing))
        else:
            claims.append(judge_gap(claim, gaps, note=f"{metric} gaps (points): {words}.{excluded}"))
    shift, kernel_spread = layer_shift_and_spread(depth, init)
    claims.append(judge_inconclusive(
        Claim("layer_patterns", "Learned kernel weights show layer-wise patterns (Fig. 3)", "qualitative", "Fig. 3",
              "descriptive only: the figure shows the per-layer means"),
        "largest |mean w − init| over layers: " + ", ".join(f"{a}: {v:.3f}" for a, v in layer_shift.items()),
        note=f"descriptive only (Figure 2): within-layer std of w {kernel_spread:.2f} vs largest layer shift {shift:.3f}"))
    claim = Claim("open_choices", "Open choices (initial w, parametrisation, learning w at all) matter little",
                  "not discussed", "our own check of our choices, not a claim of the paper",
                  f"spread of the variants' mean final macro F1 <= max(seed std, {ABLATION_TOLERANCE_POINTS} points)")
    ours = f"spread of variants {spread:.1f} points vs seed std {seed_std:.1f} points (macro F1)"
    claims.append(judge_inconclusive(claim, ours, note="one seed: no seed std") if np.isnan(seed_std) else
                  judge_condition(claim, bool(spread <= max(seed_std, ABLATION_TOLERANCE_POINTS)), ours))
    return claims


def layer_shift_and_spread(depth: pd.DataFrame, init: float) -> tuple[float, float]:
    """MedMerge's largest move of a layer's mean ``w`` from ``init`` and its mean within-layer std."""
    mm_rows = depth.xs("medmerge", level="variant")
    shift = float(max(init - mm_rows["min_layer_mean"].min(), mm_rows["max_layer_mean"].max() - init))
    return shift, float(mm_rows["mean_within_layer_std"].mean())


def layer_pattern_text(depth: pd.DataFrame, init: float) -> str:
    """What Figure 2 shows, in words: do whole layers lean towards one source (a layer mean moving
    more than :data:`LAYER_PATTERN_RATIO` of the within-layer spread)?"""
    mm_rows = depth.xs("medmerge", level="variant")
    shift, spread = layer_shift_and_spread(depth, init)
    return ("Per-layer means of $w$ stay between "
            f"{mm_rows['min_layer_mean'].min():.3f} and {mm_rows['max_layer_mean'].max():.3f} (initial value {init}), "
            f"while inside a layer the kernels' weights spread with a standard deviation of about {spread:.2f}: "
            + ("the probe moves individual kernels much more than it moves whole layers, i.e. we see little systematic "
               "preference of a layer for one source." if shift < LAYER_PATTERN_RATIO * spread else
               "some layers lean systematically towards one source."))


def caveat(max_per_split) -> str:
    """Why our numbers may differ from the paper's."""
    return ("28 px images, backbones sized for 2 CPU cores, a natural source pretrained on Fashion-MNIST and a "
            "CIFAR-10 subset instead of ImageNet, a medical source trained briefly from scratch, a few epochs of "
            f"probing/fine-tuning on at most {max_per_split} training images per target")


def summary(profile: str, n_seeds: int, gap_tables: Mapping[tuple[str, str], pd.DataFrame], claims: list[Claim]) -> str:
    """The verdict in one paragraph: the headline gain over fine-tuning, with its interval."""
    by_id = {c.id: c for c in claims}
    head = by_id["macro_f1_vs_fine-tuning"]
    main_ft = gap_tables[("fine-tuning", "macro_f1")]["gap (points)"]
    if head.verdict == "not testable here":
        return (f"In the {profile} profile ({n_seeds} seed(s)), the gain claims are not testable here: the regime "
                f"check fails ({head.ours}).")
    iv = "" if head.interval is None else f", 95 % interval [{head.interval[0]:+.1f}, {head.interval[1]:+.1f}]"
    helps = by_id["medical_source_helps"]
    iv2 = "" if helps.interval is None else f" [{helps.interval[0]:+.1f}, {helps.interval[1]:+.1f}]"
    return (f"In the {profile} profile ({n_seeds} seed(s), {len(main_ft)} backbone/target pair(s)), MedMerge's "
            f"macro-F1 gain over the better fine-tuned source is {head.estimate:+.1f} points on average{iv} "
            f"(paper: up to +7; v1: +3), so the claim is {head.verdict} here; against the natural source alone "
            f"the gap is {helps.estimate if helps.estimate is not None else float('nan'):+.1f}{iv2} "
            f"({helps.verdict}).")
