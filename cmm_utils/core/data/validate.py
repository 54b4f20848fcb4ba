"""Checks on what the readers return, so a bad file fails at load time with a clear message.

A truncated download, a hand-made ``.npz`` with one label too few, float images full of NaN or
labels outside ``[0, C)`` would otherwise train and score silently (NaN pixels cast to 0, extra
images dropped, a negative label crashing deep inside NumPy). Every error is a
:class:`~cmm_utils.core.data.manifest.DataError` naming the file (and array), the check that
failed, and, via :func:`good_copy_hint`, the expected checksum and where to get a good copy.
"""
from __future__ import annotations

import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cmm_utils.core.data.manifest import DataError, Manifest

# what NumPy, zipfile, gzip, tarfile and PIL raise on a truncated or corrupt file
UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, IndexError, tarfile.TarError)


@contextmanager
def readable(path: Path | str, fmt: str):
    """Turn a low-level read failure of ``path`` into a :class:`DataError` that says so."""
    try:
        yield
    except (FileNotFoundError, PermissionError):
        raise
    except UNREADABLE as err:
        raise DataError(f"{path}: cannot be read as {fmt} ({type(err).__name__}: {err}); "
                        f"the file is truncated or corrupt") from err


def check_images(raw: np.ndarray, where: str) -> np.ndarray:
    """Images as uint8 ``[N, H, W, C]`` (C 1 or 3), from uint8, integer 0..255 or finite float
    (``[0, 1]`` scaled by 255, else ``[0, 255]``) arrays; grey ``[N, H, W]`` gets C = 1."""
    raw = np.asarray(raw)
    if raw.ndim == 3:                       # grey (N, H, W)
        raw = raw[..., None]
    if raw.ndim != 4 or raw.shape[-1] not in (1, 3) or 0 in raw.shape[1:]:
        raise DataError(f"{where}: images of shape {raw.shape}; expected (N, H, W), (N, H, W, 1) or (N, H, W, 3)")
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype.kind not in "iuf":
        raise DataError(f"{where}: images of dtype {raw.dtype}; expected uint8 (or integers 0..255, or floats)")
    if not raw.size:
        return raw.astype(np.uint8)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        bad = int((~np.isfinite(raw)).reshape(len(raw), -1).any(1).sum())
        raise DataError(f"{where}: {bad} of {len(raw)} images hold NaN or infinite pixels; expected finite values")
    low, high = float(raw.min()), float(raw.max())
    if low < 0 or high > 255:
        raise DataError(f"{where}: pixel values span [{low:g}, {high:g}]; expected [0, 1] (floats) or [0, 255]")
    scale = 255.0 if raw.dtype.kind == "f" and high <= 1.0 else 1.0
    return np.clip(np.rint(raw * scale), 0, 255).astype(np.uint8)


def check_labels(raw: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64 ``[N]`` from ``(N,)`` or ``(N, 1)``: whole numbers, none negative. Multi-label
    ``(N, K)`` sets are refused (the scenarios need one class per image)."""
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise DataError(f"{where}: labels of shape {raw.shape}; expected (N,) or (N, 1), one class per "
                        "image (multi-label sets are not supported)")
    if raw.dtype.kind == "b" or raw.dtype.kind not in "iuf":
        raise DataError(f"{where}: labels of dtype {raw.dtype}; expected integer class indices 0..C-1")
    if raw.dtype.kind == "f":
        whole = np.isfinite(raw) & (raw == np.round(raw))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise DataError(f"{where}: label {float(raw[i]):g} at index {i} is not a whole number; expected "
                            "integer class indices 0..C-1")
    if raw.size and raw.min() < 0:
        i = int(np.argmin(raw))
        raise DataError(f"{where}: label {raw[i]:g} at index {i} is negative; expected class indices 0..C-1")
    return raw.astype(np.int64)


def check_split(images: np.ndarray, labels: np.ndarray, extras: dict[str, np.ndarray], where: str) -> None:
    """One label (and one of each extra) per image: a short array would silently drop images."""
    counts = {"images": len(images), "labels": len(labels), **{k: len(v) for k, v in extras.items()}}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: counts differ ({', '.join(f'{k} {n}' for k, n in counts.items())}); "
                        "expected one label per image")


def check_arrays(arrays: dict, where: str) -> dict:
    """:func:`check_split` on every split a reader returns, and the same image shape in all of them
    (a model trained on one size cannot score another; ``load_dataset(size=...)`` resizes)."""
    for split, (images, labels, extras) in arrays.items():
        check_split(images, labels, extras, f"{where} split {split}")
        if split in ("train", "pool") and not len(labels):
            raise DataError(f"{where} split {split}: no images; expected at least one per class")
    shapes = {split: tuple(a[0].shape[1:]) for split, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{where}: image shapes (H, W, C) differ between splits {shapes}; expected one shape "
                        "(pass size= and channels= to load_dataset to convert them as they load)")
    return arrays


def check_label_range(arrays: dict, num_classes: int, where: str) -> None:
    """Every label a class index below ``num_classes``."""
    for split, (_, labels, _) in arrays.items():
        if labels.size and labels.max() >= num_classes:
            raise DataError(f"{where} split {split}: label {int(labels.max())} is not below the {num_classes} "
                            f"classes; expected class indices 0..{num_classes - 1}")


def good_copy_hint(manifest: Manifest, path: Path | None = None) -> str:
    """What to do about a bad file: its expected md5 and where a good copy comes from. A user's
    file (a path, no manifest) named like a registered file gets that file's checksum and source."""
    from cmm_utils.core.data.manifest import load_manifests

    name = None if path is None else Path(path).name
    if manifest.source_file:
        spec = next((f for f in manifest.files if name is None or Path(f.path).name == name), None)
        if spec is not None:
            return _hint(manifest, spec)
    for m in load_manifests().values():
        spec = next((f for f in m.files if f.md5 and Path(f.path).name == name), None)
        if spec is not None:
            return f"If it is a copy of {m.name!r}: " + _hint(m, spec)
    return ("Fix or replace the file (MedMNIST layout: {split}_images uint8 (N, H, W[, C]), {split}_labels "
            "integers (N,) or (N, 1)); `make data` fetches the registered sets.")


def _hint(m: Manifest, spec) -> str:
    md5 = f"Expected md5 {spec.md5} ({m.name}). " if spec.md5 else ""
    if m.download == "auto" and spec.url:
        return f"{md5}Delete it and run `make data` (downloads {spec.url})."
    how = m.instructions.strip().replace("\n", " ") or (f"download {spec.url}" if spec.url else f"see {m.homepage}")
    return f"{md5}Get a good copy: {how}"
