"""The MedMerge chapter's regime check (issue 12): can its runs tell a merge of two sources from
fine-tuning one? Computed per (backbone, target) from the chapter's ``results.csv`` and the target's
test labels, before any claim is judged.

Checks (macro F1, the paper's headline, on the target's test split; means over seeds):

- **floors**: chance ``1/C`` and the majority-class share (reported); the macro-F1 floor is the
  larger of a majority predictor's macro F1 (``2m / ((1 + m) C)``, ``m`` the majority share) and a
  uniform random predictor's expected macro F1;
- **the target is learnt, with room**: fine-tuning from the better source at least
  :data:`MIN_ROOM` above the floor;
- **each source alone carries something to the target**: a linear probe on source ``a``
  (natural) and on source ``b`` (medical) at least :data:`MIN_SOURCE_GAIN` above the floor;
  fine-tuning from each is reported beside it, with the output ensemble of the two and the
  seed-to-seed std of the better fine-tuning (the scale of the effects the claims judge).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from cmm_utils.core.regime import Regime, at_least, regime_table, reported

__all__ = ["MIN_ROOM", "MIN_SOURCE_GAIN", "chapter_regime", "macro_f1_floor", "run_regime"]

MIN_ROOM = 0.10         # FT from the better source >= floor + 10 points of macro F1
MIN_SOURCE_GAIN = 0.05  # a probe on either source alone >= floor + 5 points


def macro_f1_floor(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Chance, majority share, and the macro F1 of the two trivial predictors (see the module docstring)."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise ValueError("no test labels: the floors need the target's test set")
    share = np.bincount(labels, minlength=num_classes) / labels.size
    m = float(share.max())
    majority_f1 = 2 * m / ((1 + m) * num_classes)
    # uniform random prediction: recall 1/C, precision p_c, for every class c
    random_f1 = float(np.mean([2 * p / (1 + p * num_classes) if p > 0 else 0.0 for p in share]))
    return {"chance": 1.0 / num_classes, "majority": m, "majority_f1": majority_f1, "random_f1": random_f1,
            "floor_f1": max(majority_f1, random_f1)}


def run_regime(name: str, results: pd.DataFrame, test_labels: np.ndarray, num_classes: int) -> Regime:
    """The regime of one (backbone, target): ``results`` are that run's rows of ``results.csv``."""
    f1 = results.groupby("method")["macro_f1"].mean()
    need = {"ft_natural", "ft_medical", "lp_natural", "lp_medical"} - set(f1.index)
    if need:
        raise ValueError(f"the regime of {name!r} needs the runs of {sorted(need)}; ran: {sorted(f1.index)}")
    fl = macro_f1_floor(test_labels, num_classes)
    floor = fl["floor_f1"]
    best = "ft_natural" if f1["ft_natural"] >= f1["ft_medical"] else "ft_medical"
    seed_std = results[results.method == best]["macro_f1"].std()
    checks = [reported("chance accuracy", fl["chance"]), reported("majority-class accuracy", fl["majority"]),
              reported("macro-F1 floor", floor, f"majority predictor {fl['majority_f1']:.3g}, uniform random "
                                                f"{fl['random_f1']:.3g}"),
              at_least("FT from the better source (macro F1)", f1[best], floor + MIN_ROOM,
                       f"{best}; floor {floor:.3g} + {MIN_ROOM:g}"),
              at_least("LP on source a alone (macro F1)", f1["lp_natural"], floor + MIN_SOURCE_GAIN,
                       f"natural source; floor + {MIN_SOURCE_GAIN:g}"),
              at_least("LP on source b alone (macro F1)", f1["lp_medical"], floor + MIN_SOURCE_GAIN,
                       f"medical source; floor + {MIN_SOURCE_GAIN:g}"),
              reported("FT from source a alone (macro F1)", f1["ft_natural"]),
              reported("FT from source b alone (macro F1)", f1["ft_medical"]),
              reported("seed std of the better FT (macro F1)", 0.0 if np.isnan(seed_std) else float(seed_std))]
    if "ensemble" in f1:
        checks.append(reported("output ensemble of the two FT models (macro F1)", f1["ensemble"]))
    return Regime(name, tuple(checks))


def chapter_regime(results: pd.DataFrame, labels: Mapping[tuple[str, str], tuple[np.ndarray, int]]) -> dict:
    """:func:`run_regime` for every (backbone, target) of ``results`` (its ``arch`` and ``target``
    columns); ``labels[(arch, target)]`` = (the target's test labels, its number of classes).
    Returns ``{(arch, target): Regime}``, the regime named ``"arch/target"``."""
    out = {}
    for (arch, target), grp in results.groupby(["arch", "target"], sort=False):
        y, n = labels[(arch, target)]
        out[(arch, target)] = run_regime(f"{arch}/{target}", grp, y, n)
    return out


def regime_frame(regimes: Mapping) -> pd.DataFrame:
    """The regime table as ``regime.csv`` holds it."""
    return regime_table(list(regimes.values()))
