"""Shared fixtures: the real data root, and a MedMNIST-format file the book has never seen."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    os.environ.setdefault("CMM_DATA", str(SHARED_DATA))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["CMM_DATA"])
    if not (root / "retinamnist.npz").exists():
        pytest.fail(f"CMM_DATA={root} does not hold the book's real data (retinamnist.npz missing)")
    return root


def write_unseen_npz(path: Path, labels_shape: str = "(N,)") -> Path:
    """scikit-learn's bundled handwritten digits (real scans, 8x8 grey, 10 classes), upscaled
    to 28x28 and saved with MedMNIST's keys: a dataset no chapter of the book uses."""
    from sklearn.datasets import load_digits
    import torch
    import torch.nn.functional as F

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    x = (F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False) * 255).clamp(0, 255)
    images = x.squeeze(1).to(torch.uint8).numpy()
    labels = digits.target.astype(np.uint8)
    if labels_shape == "(N,1)":
        labels = labels[:, None]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    cut = {"train": order[:1200], "val": order[1200:1400], "test": order[1400:]}
    np.savez_compressed(path, **{f"{s}_images": images[i] for s, i in cut.items()},
                        **{f"{s}_labels": labels[i] for s, i in cut.items()})
    return path


@pytest.fixture(scope="session")
def unseen_npz(tmp_path_factory) -> Path:
    return write_unseen_npz(tmp_path_factory.mktemp("unseen") / "digits_unseen.npz")
