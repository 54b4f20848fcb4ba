"""Figures shared by the chapters; each reads plain arrays or DataFrames (artifacts), never models."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def sample_grid(images, labels, class_names: Sequence[str], per_class: int = 6, seed: int = 0, title: str = ""):
    """A grid with one row per class and ``per_class`` random images of it (uint8 [N, C, H, W])."""
    images, labels = np.asarray(images), np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = len(class_names)
    fig, axes = plt.subplots(n, per_class, figsize=(per_class * 0.9, n * 0.95), squeeze=False)
    for c in range(n):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(pick):
                img = images[pick[j]].transpose(1, 2, 0)
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray")
        axes[c, 0].text(-0.1, 0.5, class_names[c][:18], transform=axes[c, 0].transAxes,
                        ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def class_histogram(counts: pd.DataFrame, title: str = ""):
    """Bars of images per class and split; ``counts`` has columns class, split, images."""
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * counts["class"].nunique() + 2), 2.8))
    sns.barplot(data=counts, x="class", y="images", hue="split", ax=ax)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    return fig


def accuracy_matrix(R, title: str = "", ax=None):
    """Heatmap of ``R[t, i]`` (rows: after task t; columns: task i), upper triangle masked."""
    R = np.asarray(R, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * len(R) + 2, 0.5 * len(R) + 1.5))
    mask = np.triu(np.ones_like(R, dtype=bool), k=1)
    sns.heatmap(100 * R, mask=mask, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, ax=ax,
                cbar=False, xticklabels=[f"T{i + 1}" for i in range(len(R))],
                yticklabels=[f"after T{t + 1}" for t in range(len(R))])
    ax.set_title(title, fontsize=10)
    return ax


def curves(frame: pd.DataFrame, x: str, y: str, hue: str, title: str = "", ylabel: str | None = None,
           ax=None, errorbar=("sd", 1)):
    """Mean line with a ±1 sd band over seeds (seaborn ``lineplot``)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker="o", errorbar=errorbar, ax=ax)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel or y)
    ax.legend(fontsize=7)
    return ax


def mean_std_table(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], scale: float = 100.0,
                   digits: int = 1) -> pd.DataFrame:
    """``mean ± std`` over seeds of each metric, one row per group (numbers scaled by ``scale``)."""
    grouped = frame.groupby(list(by), sort=False)[list(metrics)]
    mean, std = grouped.mean() * scale, grouped.std(ddof=0).fillna(0) * scale
    out = mean.round(digits).astype(str) + " ± " + std.round(digits).astype(str)
    out["seeds"] = grouped.size()
    return out.reset_index()
