"""Facts for a dataset card: split sizes, per-class counts, group leakage between splits."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cmm_utils.core.data.datasets import DatasetSplits

BOOK_DATASETS = {
    # the datasets each profile's chapters use (the data chapter shows a card for each)
    "smoke": ("ham10000", "pathmnist_1k", "retinamnist", "fashion_mnist", "cifar10_partial"),
    "cpu": ("ham10000", "pathmnist_1k", "retinamnist", "fashion_mnist", "cifar10_partial"),
    "paper": ("isic2019", "skin8", "ham10000_full", "aptos2019", "eyepacs", "path16", "cifar100"),
}


def split_counts(data: DatasetSplits) -> pd.DataFrame:
    """Long table: class, split, images."""
    rows = []
    for split in ("train", "val", "test"):
        counts = np.bincount(data.split(split).labels.numpy(), minlength=data.num_classes)
        rows += [{"class": data.classes[c], "split": split, "images": int(n)} for c, n in enumerate(counts)]
    return pd.DataFrame(rows)


def split_sizes(data: DatasetSplits) -> dict[str, int]:
    return {split: len(data.split(split)) for split in ("train", "val", "test")}


def shared_groups(data: DatasetSplits) -> int:
    """How many non-empty groups (lesions) appear in more than one split: 0 for a clean split."""
    sets = [set(g[g != ""]) if (g := data.split(s).groups) is not None else set() for s in ("train", "val", "test")]
    return len((sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2]))
