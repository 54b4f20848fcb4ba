"""MedMerge's claims beside our measurements, and the criteria that judge them
(:mod:`cmm_utils.core.verdicts`).

A gain claim (MedMerge above a family of baselines) is judged on the paired per-seed gaps of
:func:`cmm_utils.papers.medmerge.tables.gaps` by :func:`judge`: supported when the mean gap is
positive on every backbone/target and more seeds are won than lost; not supported when it is <= 0
everywhere; inconclusive otherwise and with fewer than :data:`MIN_SEEDS` seeds.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from cmm_utils.core.verdicts import Claim, judge_condition, judge_inconclusive, not_run
from cmm_utils.papers.medmerge.tables import gaps

PAPER = "MedMerge: Merging Models for Effective Transfer Learning to Medical Imaging Tasks (Almakky et al. 2024)"
MIN_SEEDS = 2  # one seed supports nothing
ABLATION_TOLERANCE_POINTS = 1.0  # the open choices "matter little" when their spread is within max(seed std, this)
LAYER_PATTERN_RATIO = 0.25  # layers "lean" when a layer mean moves more than this share of the within-layer spread

GAIN_CRITERION = ("supported: mean gap > 0 on every backbone/target and more seeds won than lost; not supported: "
                  "mean gap <= 0 everywhere; otherwise, or with one seed, inconclusive")
FAMILIES = (("fine-tuning", "up to +7 macro-F1 points (v2 abstract; v1: up to +3)", "arXiv:2403.11646 v2 abstract"),
            ("LP-FT", "MedMerge better (numbers not public)", "the paper's comparison (tables not readable)"),
            ("merges of FT models", "MedMerge better than other merges (numbers not public)",
             "the paper's comparison (tables not readable)"))


def judge(gap_table: pd.DataFrame) -> bool | None:
    """True when the mean gap is positive in every experiment and, pooled over experiments, more
    seeds are won than lost; False when the mean gap is <= 0 in every experiment; else None (also
    with fewer than two seeds per experiment: one seed supports nothing)."""
    if gap_table.empty or gap_table["seeds"].min() < MIN_SEEDS:
        return None
    g = gap_table["gap (points)"]
    if (g > 0).all() and gap_table["seeds won"].sum() > gap_table["seeds"].sum() / 2:
        return True
    if (g <= 0).all():
        return False
    return None


def _gap_text(gt: pd.DataFrame) -> str:
    return "; ".join(f"{r['arch']}/{r['target']}: {r['gap (points)']:+.1f}"
                     + ("" if np.isnan(r["gap std"]) else f" ± {r['gap std']:.1f}")
                     + f" ({r['seeds won']}/{r['seeds']} seeds)" for _, r in gt.iterrows())


def _judge_gain(claim: Claim, gt: pd.DataFrame, ours: str) -> Claim:
    if gt.empty:
        return not_run(claim, "no experiment compares these methods in this build")
    ok = judge(gt)
    return judge_inconclusive(claim, ours) if ok is None else judge_condition(claim, ok, ours)


def judge_claims(results: pd.DataFrame, gap_tables: Mapping[tuple[str, str], pd.DataFrame],
                 depth: pd.DataFrame, layer_shift: pd.Series, spread: float, seed_std: float,
                 init: float) -> list[Claim]:
    """Every claim, judged from the chapter's artifacts: the results, :func:`~cmm_utils.papers.medmerge.
    tables.gap_tables`, the kernel weights' :func:`~cmm_utils.papers.medmerge.tables.depth_summary` and
    :func:`~cmm_utils.papers.medmerge.tables.largest_layer_shift`, the ablation's spread and seed std
    (points), and the initial ``w``."""
    final = results[results["stage"] == "final"]
    claims = []
    for fam, paper_value, source in FAMILIES:
        ours = _gap_text(gap_tables[(fam, "macro_f1")]) if not gap_tables[(fam, "macro_f1")].empty else "not run"
        if fam == "fine-tuning":  # the usual baseline is FT from the natural-image (ImageNet) source alone
            nat = gaps(final, "medmerge", ("ft_natural",), "macro_f1")
            ours = f"{ours}. Against FT from the natural source only: {_gap_text(nat) if not nat.empty else 'not run'}"
        claim = Claim(f"macro_f1_vs_{fam.split()[0].lower()}", f"MedMerge improves macro F1 over {fam}", paper_value,
                      source, GAIN_CRITERION)
        claims.append(_judge_gain(claim, gap_tables[(fam, "macro_f1")], f"MedMerge − best {fam} (points): {ours}"))
    gt = gap_tables[("fine-tuning", "accuracy")]
    claims.append(_judge_gain(Claim("accuracy_vs_fine-tuning", "MedMerge improves accuracy over fine-tuning",
                                    "higher accuracy (numbers not public)", "the paper's comparison", GAIN_CRITERION),
                              gt, f"MedMerge − best FT (accuracy points): {_gap_text(gt) or 'not run'}"))
    gt = gap_tables[("zeros", "macro_f1")]
    claims.append(_judge_gain(Claim("medical_source_helps", "The second (medical) source helps: MedMerge beats merging "
                                    "with zeros", "implied by the zeros ablation (Fig. 3b); numbers not public",
                                    "Fig. 3b", GAIN_CRITERION),
                              gt, f"MedMerge − merge with zeros (points): {_gap_text(gt) or 'not run'}"))
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
    """The verdict in one paragraph: the headline gain over fine-tuning and over merging with zeros."""
    main_ft = gap_tables[("fine-tuning", "macro_f1")]["gap (points)"]
    zeros = gap_tables[("zeros", "macro_f1")]["gap (points)"]
    return (f"In the {profile} profile ({n_seeds} seed(s), {len(main_ft)} backbone/target pair(s)), MedMerge's "
            f"macro-F1 gain over the better fine-tuned source ranges from {main_ft.min():+.1f} to {main_ft.max():+.1f} "
            f"points (paper: up to +7; v1: +3), so the claim is {claims[0].verdict} here; MedMerge minus "
            f"merging with zeros ranges from {zeros.min():+.1f} to {zeros.max():+.1f} points.")
