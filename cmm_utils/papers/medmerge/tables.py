"""The chapter's tables, computed from its artifacts (``results.csv``, ``kernel_weights.csv``, the
planes' ``.npz``): mean ± std over seeds per method, MedMerge's gains over the best baseline of
each family (paired per seed), the ablation of the open choices, the kernel weights by depth.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cmm_utils.papers.medmerge.profiles import FT_BASELINES, LPFT_BASELINES, MERGES, METHOD_LABELS

# The deployed networks first, then the probes (frozen backbones) that MedMerge and LP-FT start from
ORDER = ["ft_natural", "ft_medical", "lpft_natural", "lpft_medical", "average", "permutation", "permutation_act",
         "zipit", "medmerge", "zeros", "ensemble", "interp_global", "interp_layer", "lp_natural", "lp_medical",
         "medmerge_lp", "zeros_lp", "interp_global_lp", "interp_layer_lp"]


def summary_table(results: pd.DataFrame, metrics: Sequence[str] = ("macro_f1", "accuracy", "kappa")) -> pd.DataFrame:
    """Mean and std over seeds of each metric per (arch, target, method), in % (kappa x 100)."""
    main = results[~results["method"].str.startswith("ablation:")]
    g = main.groupby(["arch", "target", "method"], sort=False)
    out = g[list(metrics)].agg(["mean", "std"]) * 100
    out.columns = [f"{m} {s}" for m, s in out.columns]
    out["seeds"] = g.size()
    return out.reset_index()


def gaps(results: pd.DataFrame, method: str, baselines: Sequence[str], metric: str = "macro_f1") -> pd.DataFrame:
    """Per (arch, target): ``method`` minus the *best* of ``baselines`` (best by mean over seeds),
    in points; paired per seed, with the std over seeds of the paired difference."""
    rows = []
    for (arch, target), grp in results.groupby(["arch", "target"], sort=False):
        piv = grp.pivot_table(index="seed", columns="method", values=metric)
        have = [b for b in baselines if b in piv]
        if method not in piv or not have:
            continue
        best = max(have, key=lambda b: piv[b].mean())
        diff = (piv[method] - piv[best]) * 100
        rows.append({"arch": arch, "target": target, "best baseline": METHOD_LABELS.get(best, best),
                     f"{method} {metric}": piv[method].mean() * 100, f"baseline {metric}": piv[best].mean() * 100,
                     "gap (points)": diff.mean(), "gap std": diff.std(ddof=1) if len(diff) > 1 else float("nan"),
                     "seeds won": int((diff > 0).sum()), "seeds": int(len(diff))})
    return pd.DataFrame(rows)


def _fmt(mean: float, std: float) -> str:
    return "—" if np.isnan(mean) else (f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}")


def comparison_tables(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per backbone and target (keyed by a title): macro F1, accuracy (and quadratic kappa where
    the target is graded) as "mean ± std" over seeds in %, methods in :data:`ORDER`."""
    tables = {}
    for (arch, tgt), grp in summary_table(results).groupby(["arch", "target"], sort=False):
        grp = grp.set_index("method").reindex([m for m in ORDER if m in set(grp["method"])])
        cols = {"macro F1": ("macro_f1 mean", "macro_f1 std"), "accuracy": ("accuracy mean", "accuracy std")}
        if grp["kappa mean"].notna().any():
            cols["quadratic kappa"] = ("kappa mean", "kappa std")
        t = pd.DataFrame({name: [_fmt(m, s) for m, s in zip(grp[a], grp[b])] for name, (a, b) in cols.items()},
                         index=[METHOD_LABELS[m] for m in grp.index])
        t["seeds"] = grp["seeds"].values
        tables[f"{arch} on {tgt} (medical source {results.loc[results['target'] == tgt, 'medical'].iloc[0]})"] = t
    return tables


def gap_tables(results: pd.DataFrame, merges: Sequence[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """MedMerge minus the best baseline of each family (fine-tuning, LP-FT, the merges run) by
    macro F1 and accuracy, and minus merging with zeros by macro F1, on the final networks."""
    final = results[results["stage"] == "final"]
    families = {"fine-tuning": FT_BASELINES, "LP-FT": LPFT_BASELINES,
                "merges of FT models": tuple(m for m in MERGES if m in merges)}
    out = {(fam, metric): gaps(final, "medmerge", base, metric)
           for fam, base in families.items() for metric in ("macro_f1", "accuracy")}
    out[("zeros", "macro_f1")] = gaps(final, "medmerge", ("zeros",), "macro_f1")
    return out


def gap_view(tables: Mapping[tuple[str, str], pd.DataFrame]) -> pd.DataFrame:
    """:func:`gap_tables` as one table to read (``gaps.csv``)."""
    show = []
    for (fam, metric), g in tables.items():
        for _, r in g.iterrows():
            show.append({"MedMerge vs": fam if fam != "zeros" else "merge with zeros", "metric": metric,
                         "backbone": r["arch"], "target": r["target"], "best baseline": r["best baseline"],
                         "gap (points)": round(r["gap (points)"], 2),
                         "± std": round(r["gap std"], 2) if not np.isnan(r["gap std"]) else None,
                         "seeds won": f"{r['seeds won']}/{r['seeds']}"})
    return pd.DataFrame(show)


def main_weights(weights: pd.DataFrame) -> pd.DataFrame:
    """The per-layer kernel weights of MedMerge and of merging with zeros (not the ablations')."""
    return weights[weights["variant"].isin(["medmerge", "zeros"])]


def depth_summary(weights: pd.DataFrame) -> pd.DataFrame:
    """Per backbone and variant, averaged over seeds: layers, the lowest and highest per-layer mean
    ``w`` and the mean within-layer std of ``w``."""
    return (main_weights(weights).groupby(["arch", "variant", "seed"])
            .agg(layers=("depth", "nunique"), min_layer_mean=("mean_w", "min"), max_layer_mean=("mean_w", "max"),
                 mean_within_layer_std=("std_w", "mean"))
            .groupby(level=[0, 1]).mean().round(3))


def largest_layer_shift(weights: pd.DataFrame, init: float) -> pd.Series:
    """Per backbone: the largest |mean w - init| over layers of MedMerge (means over seeds)."""
    wm = weights[weights["variant"] == "medmerge"]
    return wm.groupby(["arch", "depth"])["mean_w"].mean().groupby(level=0).agg(lambda v: float(np.max(np.abs(v - init))))


def ablation_table(results: pd.DataFrame, arch: str) -> tuple[pd.DataFrame, float, float]:
    """The ablation of the open choices on ``arch``'s first target: macro F1 (%) after the probe and
    after fine-tuning per variant (mean and std over seeds); with the spread of the variants' mean
    final macro F1 and the mean std over seeds, both in points."""
    abl = results[results["method"].str.startswith("ablation:") | results["method"].isin(["medmerge", "medmerge_lp"])].copy()
    abl["variant"] = abl["variant"].fillna("init 0.5, direct (main)")
    abl = abl[(abl["arch"] == arch) & (abl["target"] == results.loc[results["arch"] == arch, "target"].iloc[0])]
    table = (abl.pivot_table(index="variant", columns="stage", values="macro_f1", aggfunc=["mean", "std"]) * 100).round(1)
    table.columns = [f"macro F1 {stage} ({stat})" for stat, stage in table.columns]
    final = abl[abl["stage"] == "final"]
    table["seeds"] = final.groupby("variant").size()
    seed_std = float(final.groupby("variant")["macro_f1"].std().mean() * 100)
    spread = float(final.groupby("variant")["macro_f1"].mean().agg(np.ptp) * 100)
    return table, spread, seed_std


def plane_corners(planes: Mapping[str, Mapping]) -> pd.DataFrame:
    """The test error (%) at the grid point nearest each of a plane's three networks."""
    return pd.DataFrame([{"plane": METHOD_LABELS[m], "point": str(lab),
                          "test error at the grid point nearest it (%)": round(100 * float(pl["test_err"].ravel()[
                              np.argmin(((pl["grid"].reshape(-1, 2) - xy) ** 2).sum(1))]), 1)}
                         for m, pl in planes.items() for lab, xy in zip(pl["labels"], pl["coords"])])


def plane_spans(planes: Mapping[str, Mapping]) -> str:
    """Each plane's lowest and highest test error (%), in words."""
    return "; ".join(f"{METHOD_LABELS[m]}: {100 * float(pl['test_err'].min()):.1f} to "
                     f"{100 * float(pl['test_err'].max()):.1f}" for m, pl in planes.items())
