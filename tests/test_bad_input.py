"""Bad input files fail at load time with a DataError naming the file, the check and what to do.

A fuzz set of broken MedMNIST-format files, each loaded by path as a user would
(``load_dataset("x.npz")``, the notebooks' ``-p dataset x.npz``): none may load silently.
"""
from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cmm_utils.core.data import DataError, get_manifest, load_dataset
from cmm_utils.core.data.manifest import FileSpec
from cmm_utils.core.data.readers import read_cifar_binary_tar, read_idx_gz

RETINA_MD5 = "bd4c0672f1bba3e3a89f0e4e876791e4"


def good_arrays(n: int = 40, classes: int = 4) -> dict[str, np.ndarray]:
    """A tiny valid MedMNIST-layout set: every class in every split."""
    rng = np.random.default_rng(0)
    out = {}
    for split, size in (("train", n), ("val", n // 4), ("test", n // 4)):
        out[f"{split}_images"] = rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(size) % classes).astype(np.uint8)[:, None]
    return out


def write_npz(path: Path, **changes) -> Path:
    """``good_arrays`` with ``changes`` applied (``None`` drops a key), saved as ``path``."""
    arrays = {**good_arrays(), **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def truncated(path: Path) -> Path:
    write_npz(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


good = good_arrays()
BAD_FILES = {
    "truncated": (truncated, r"cannot be read as npz \(BadZipFile.*truncated or corrupt"),
    "empty file": (lambda p: (p.write_bytes(b""), p)[1], r"cannot be read as npz"),
    "not a zip": (lambda p: (p.write_bytes(b"hello" * 100), p)[1], r"cannot be read as npz"),
    "count mismatch": (lambda p: write_npz(p, train_labels=good["train_labels"][:-1]),
                       r"split train: counts differ \(images 40, labels 39\); expected one label per image"),
    "NaN float images": (lambda p: write_npz(p, train_images=np.full((40, 8, 8, 3), np.nan, np.float32)),
                         r"train_images: 40 of 40 images hold NaN or infinite pixels"),
    "one inf image": (lambda p: write_npz(p, test_images=np.where(np.arange(10)[:, None, None, None] == 3, np.inf,
                                                                   good["test_images"] / 255.0)),
                      r"test_images: 1 of 10 images hold NaN or infinite pixels"),
    "float images out of range": (lambda p: write_npz(p, val_images=good["val_images"] * 4.0 - 100),
                                  r"val_images: pixel values span \[-100, .*\]; expected \[0, 1\]"),
    "negative labels": (lambda p: write_npz(p, train_labels=good["train_labels"].astype(np.int64) - 1),
                        r"train_labels: label -1 at index 0 is negative"),
    "fractional float labels": (lambda p: write_npz(p, train_labels=good["train_labels"] + 0.5),
                                r"train_labels: label 0.5 at index 0 is not a whole number"),
    "NaN labels": (lambda p: write_npz(p, val_labels=np.full(10, np.nan)), r"val_labels: label nan .* whole number"),
    "string labels": (lambda p: write_npz(p, train_labels=good["train_labels"].astype(str)),
                      r"train_labels: labels of dtype <U\d+; expected integer class indices"),
    "too-large labels (class_names)": (
        lambda p: write_npz(p, test_labels=np.full(10, 7), class_names=np.array(["a", "b", "c", "d"])),
        r"split test: label 7 is not below the 4 classes; expected class indices 0..3"),
    "two channels": (lambda p: write_npz(p, train_images=good["train_images"][..., :2]),
                     r"train_images: images of shape \(40, 8, 8, 2\); expected \(N, H, W\)"),
    "channels first": (lambda p: write_npz(p, train_images=good["train_images"].transpose(0, 3, 1, 2)),
                       r"images of shape \(40, 3, 8, 8\)"),
    "flat images": (lambda p: write_npz(p, train_images=good["train_images"].reshape(40, -1)),
                    r"images of shape \(40, 192\)"),
    "multi-label": (lambda p: write_npz(p, train_labels=np.zeros((40, 3), np.uint8)),
                    r"labels of shape \(40, 3\); expected \(N,\) or \(N, 1\)"),
    "splits of different sizes": (lambda p: write_npz(p, test_images=np.zeros((10, 16, 16, 3), np.uint8)),
                                  r"image shapes \(H, W, C\) differ between splits.*pass size="),
    "empty train": (lambda p: write_npz(p, train_images=np.zeros((0, 8, 8, 3), np.uint8),
                                        train_labels=np.zeros(0, np.uint8)), r"split train: no images"),
    "wrong keys": (lambda p: (np.savez(p, x=np.zeros(3)), p)[1], r"no image arrays found. Keys present: \['x'\]"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_npz_by_path_is_a_clear_data_error(tmp_path, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path / "user_set.npz")
    with pytest.raises(DataError, match=message) as err:
        load_dataset(str(path))
    text = str(err.value)
    assert str(path) in text and "\n" not in text
    assert "Fix or replace the file" in text  # what to do


def test_good_variants_still_load(tmp_path):
    """Floats in [0, 1], whole-number float labels and grey images are fine, converted exactly."""
    images = good["train_images"][..., 0]
    path = write_npz(tmp_path / "ok.npz", train_images=images / 255.0, train_labels=good["train_labels"] * 1.0,
                     val_images=good["val_images"][..., 0], test_images=good["test_images"][..., 0])
    d = load_dataset(str(path))
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape == (40, 1, 8, 8)
    assert np.array_equal(d.train.images[:, 0].numpy(), images)
    assert d.num_classes == 4 and d.train.labels.dtype == torch.int64


def test_truncated_copy_of_a_registered_file_names_its_checksum(tmp_path):
    """A user's truncated ``retinamnist.npz`` passed by path: the hint gives MedMNIST's md5 and source."""
    path = truncated(tmp_path / "retinamnist.npz")
    with pytest.raises(DataError, match=f"truncated or corrupt. If it is a copy of 'retinamnist': Expected md5 "
                                        f"{RETINA_MD5}.*make data.*zenodo"):
        load_dataset(str(path))


def test_corrupt_file_with_a_manifest_md5_names_the_checksum(tmp_path):
    path = truncated(tmp_path / "retinamnist.npz")
    manifest = get_manifest("retinamnist")
    with pytest.raises(DataError, match=f"checksum mismatch for {path}: md5 [0-9a-f]{{32}}, expected {RETINA_MD5}"
                                        r".*delete it and download it again from https://zenodo.*make data"):
        load_dataset(manifest, root=tmp_path, download=False)


def test_registered_manifest_checks_labels_against_its_classes(tmp_path):
    """A file under a registered manifest (no md5 here) whose labels exceed its 5 classes; the hint
    points at the manifest's source."""
    path = write_npz(tmp_path / "r.npz", train_labels=np.full(40, 6, np.uint8))
    manifest = replace(get_manifest("retinamnist"), files=(FileSpec(str(path)),))
    with pytest.raises(DataError, match=r"dataset 'retinamnist' .*split train: label 6 is not below the 5 classes.*"
                                        r"Get a good copy: see https://medmnist.com/"):
        load_dataset(manifest, root=tmp_path)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("damage", ["truncated gzip", "labels short"])
def test_bad_idx_files(tmp_path, damage):
    images, labels = np.zeros((6, 4, 4), np.uint8), np.arange(6) % 2
    files = {}
    for role, array in (("train_images", images), ("train_labels", labels)):
        files[role] = tmp_path / f"{role}.gz"
        files[role].write_bytes(gzip.compress(_idx(array)))
    if damage == "truncated gzip":
        files["train_images"].write_bytes(files["train_images"].read_bytes()[:20])
        message = r"train_images.gz: cannot be read as gzipped idx"
    else:
        files["train_labels"].write_bytes(gzip.compress(_idx(labels[:5])))
        message = r"counts differ \(images 6, labels 5\)"
    with pytest.raises(DataError, match=message):
        read_idx_gz(files)


def test_corrupt_cifar_tar(tmp_path):
    path = tmp_path / "cifar-10-binary.tar.gz"
    path.write_bytes(gzip.compress(b"not a tar archive" * 50)[:100])
    with pytest.raises(DataError, match=f"{path}: cannot be read as CIFAR binary tar.gz"):
        read_cifar_binary_tar(path)
