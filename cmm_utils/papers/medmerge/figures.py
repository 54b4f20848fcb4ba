"""The chapter's figures, drawn from its artifacts only: the error on the planes through three
networks (the paper's Fig. 2) and the mean learned kernel weight per convolution layer (Fig. 3).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from cmm_utils.papers.medmerge.landscape import plot_plane
from cmm_utils.papers.medmerge.profiles import METHOD_LABELS
from cmm_utils.papers.medmerge.tables import main_weights


def plot_planes(planes: Mapping[str, Mapping], arch: str, target: str, seed: int):
    """Train (top) and test (bottom) error on each plane, one colour scale per row; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(planes), figsize=(4.2 * len(planes), 6.6), squeeze=False)
    for i, key in enumerate(("train_err", "test_err")):
        lo = 100 * min(float(pl[key].min()) for pl in planes.values())  # one colour scale per row
        hi = 100 * max(float(pl[key].max()) for pl in planes.values())
        for j, (m, pl) in enumerate(planes.items()):
            plot_plane(pl, key, ax=axes[i, j], labels=["FT natural", "merged", "FT medical"], vmin=lo, vmax=hi,
                       title=f"{METHOD_LABELS[m]}: {key.split('_')[0]} error")
    fig.suptitle(f"Error on the plane through three networks ({arch}, {target}, seed {seed})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_kernel_weights(weights: pd.DataFrame, init: float):
    """Per backbone, a heatmap of the mean learned ``w`` per convolution layer (input -> output) for
    MedMerge and merging with zeros, means over seeds, colours centred on the initial ``w``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    wmain = main_weights(weights)
    archs = list(dict.fromkeys(wmain["arch"]))
    fig, axes = plt.subplots(len(archs), 1, squeeze=False,
                             figsize=(11, 1.2 + 0.55 * wmain.groupby(["target", "variant"]).ngroups * len(archs)))
    for ax, arch in zip(axes[:, 0], archs):
        sub = wmain[wmain["arch"] == arch]
        heat = sub.pivot_table(index=["target", "variant"], columns="depth", values="mean_w", aggfunc="mean")
        heat.index = [f"{t}: {'merge with zeros' if v == 'zeros' else 'natural vs medical'}" for t, v in heat.index]
        span = max(0.02, float(np.nanmax(np.abs(heat.values - init))))
        sns.heatmap(heat, ax=ax, cmap="RdBu_r", center=init, vmin=init - span, vmax=init + span,
                    cbar_kws={"label": "mean w"}, xticklabels=max(1, heat.shape[1] // 12))
        ax.set_title(f"{arch}: mean learned kernel weight per convolution layer (depth →)", fontsize=9)
        ax.set_xlabel("convolution layer (input → output)")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig
