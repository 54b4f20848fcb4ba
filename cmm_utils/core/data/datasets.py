"""Load a dataset by registered name or by path into in-memory tensors with train/val/test splits.

Images are kept as ``uint8`` tensors ``[N, C, H, W]`` at the requested resolution, resized once at
load time, so the training loop never decodes or resizes a single image.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from cmm_utils.core.data.manifest import DataError, Manifest, data_root, ensure_files, get_manifest, load_manifests
from cmm_utils.core.data.readers import (SPLITS, read_cifar_binary_tar, read_idx_gz, read_image_folder_csv, read_npz,
                                         npz_class_names)
from cmm_utils.core.data.validate import check_label_range, good_copy_hint


@dataclass
class LabeledImages:
    """Images ``uint8 [N, C, H, W]`` and integer labels ``[N]``; ``groups`` optional (lesion ids)."""
    images: torch.Tensor
    labels: torch.Tensor
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "LabeledImages":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return LabeledImages(self.images[index], self.labels[index],
                             None if self.groups is None else self.groups[index.numpy()])

    def with_labels(self, labels: torch.Tensor) -> "LabeledImages":
        return replace(self, labels=labels)


@dataclass
class DatasetSplits:
    name: str
    classes: tuple[str, ...]
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    meta: dict = field(default_factory=dict)  # format, task; keyword-only in use, like licence and source
    licence: str = "unknown"
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> LabeledImages:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {SPLITS}")
        return getattr(self, name)


def make_split(labels: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None,
               stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)`` with about ``fraction`` held out, seeded.

    With ``groups`` the split is group-disjoint (no lesion on both sides), stratified as far as
    groups allow (scikit-learn's ``StratifiedGroupKFold``, first fold held out, so the held-out
    share is ``1/round(1/fraction)``). Without groups, ``train_test_split`` stratified by class
    when every class has at least two samples.
    """
    index = np.arange(len(labels))
    if groups is not None and len(set(groups)) > 1:
        groups = np.where(groups == "", np.char.add("single_", index.astype(str)), groups)
        n_folds = max(2, int(round(1 / fraction)))
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        keep, held = next(splitter.split(index, labels, groups))
        return keep, held
    counts = np.bincount(labels)
    can_stratify = stratify and counts[counts > 0].min() >= 2
    keep, held = train_test_split(index, test_size=fraction, random_state=seed,
                                  stratify=labels if can_stratify else None)
    return np.sort(keep), np.sort(held)


def _to_tensor(images: np.ndarray, size: int | None, channels: int | None) -> torch.Tensor:
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).contiguous()
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    elif channels == 1 and x.shape[1] == 3:
        x = TF.rgb_to_grayscale(x)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = TF.resize(x, [size, size], antialias=True)
    return x


def _read(manifest: Manifest, root: Path, size: int | None, download: bool):
    """The reader's arrays, checked; a bad file's error says how to get a good copy."""
    files = ensure_files(manifest, root, download=download)
    first = next(iter(files.values()))
    try:
        arrays = _read_format(manifest, files, root, size)
        if manifest.classes:
            check_label_range(arrays, manifest.num_classes, f"dataset {manifest.name!r} ({first})")
    except DataError as err:
        raise DataError(f"{err}. {good_copy_hint(manifest, first)}") from err
    return arrays


def _read_format(manifest: Manifest, files: dict[str, Path], root: Path, size: int | None):
    if manifest.format == "npz":
        return read_npz(next(iter(files.values())), manifest.keys)
    if manifest.format == "idx_gz":
        return read_idx_gz(files)
    if manifest.format == "cifar_binary_tar":
        return read_cifar_binary_tar(next(iter(files.values())))
    first = next(iter(files.values()))
    return read_image_folder_csv(files, root / (manifest.images_dir or first.parent), manifest.columns,
                                 manifest.extension, size, manifest.classes, manifest.expect)


def _manifest_for_path(path: Path) -> Manifest:
    """An ad-hoc manifest for a MedMNIST-format ``.npz`` or a folder with ``labels.csv``."""
    if path.is_dir():
        csv = path / "labels.csv"
        if not csv.exists():
            raise DataError(f"{path} is a folder without labels.csv (columns image_id,label)")
        fmt, files, images_dir = "image_folder_csv", (csv,), str(path)
    else:
        fmt, files, images_dir = "npz", (path,), None
    from cmm_utils.core.data.manifest import FileSpec
    return Manifest(name=path.stem, title=path.name, format=fmt, classes=(), channels=0,
                    image_size=(0, 0), task="multi-class", licence="unknown (user file)",
                    citation="", homepage=str(path), files=tuple(FileSpec(str(f)) for f in files),
                    splits={"make": {"val": 0.1, "test": 0.2, "stratify": True, "group_by": "groups"}},
                    images_dir=images_dir, columns={"id": "image_id", "label": "label", "group": "lesion_id"})


def load_dataset(name_or_path: str | Path | Manifest, *, seed: int = 0, size: int | None = None,
                 channels: int | None = None, root: Path | str | None = None,
                 download: bool = True, max_per_split: int | None = None) -> DatasetSplits:
    """Load a registered dataset (``data_manifests/<name>.yaml``), a :class:`Manifest`, or a file/folder path.

    Missing splits are made from the train pool as the manifest says (seeded, stratified,
    group-disjoint where groups exist); a path gets val 10% and test 20% of what it lacks.
    ``size`` resizes every image once; ``channels`` converts grey/RGB; ``max_per_split`` keeps a
    seeded, stratified subset of each split (the ``smoke`` profile).
    """
    is_manifest = isinstance(name_or_path, Manifest)
    text = "" if is_manifest else str(name_or_path)
    looks_like_path = not is_manifest and (text.endswith((".npz", "/")) or "/" in text or Path(text).exists())
    root = Path(root) if root is not None else data_root()
    if is_manifest:
        manifest = name_or_path
        arrays = _read(manifest, root, size, download)
    elif looks_like_path:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"dataset path {text!r} does not exist")
        manifest = _manifest_for_path(path.resolve())
        arrays = _read(manifest, Path("/"), size, download=False)
    else:
        manifest = get_manifest(text)
        arrays = _read(manifest, root, size, download)

    splits = _assign_splits(arrays, manifest, seed)
    classes = manifest.classes or _path_classes(Path(text), splits, manifest)
    out = {}
    for split, (images, labels, groups) in splits.items():
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"dataset {manifest.name!r} split {split}: labels span "
                            f"[{labels.min()}, {labels.max()}] but there are {len(classes)} classes")
        if max_per_split is not None and len(labels) > max_per_split:
            keep, _ = make_split(labels, 1 - max_per_split / len(labels), seed)
            images, labels = images[keep], labels[keep]
            groups = None if groups is None else groups[keep]
        out[split] = LabeledImages(_to_tensor(images, size, channels),
                                   torch.from_numpy(labels.astype(np.int64)), groups)
    return DatasetSplits(manifest.name, tuple(classes), out["train"], out["val"], out["test"],
                         licence=manifest.licence, source=manifest.homepage,
                         meta={"format": manifest.format, "task": manifest.task})


def _path_classes(path: Path, splits, manifest: Manifest) -> tuple[str, ...]:
    """A path's classes: the file's ``class_names`` when it has them (every label must name one),
    else ``0..max label``."""
    names = npz_class_names(path) if path.suffix == ".npz" else None
    n = int(max(int(s[1].max()) for s in splits.values() if len(s[1])) + 1)
    if names:
        arrays = {split: (None, labels, None) for split, (_, labels, _) in splits.items()}
        try:
            check_label_range(arrays, len(names), f"{path} (class_names lists {len(names)})")
        except DataError as err:
            raise DataError(f"{err}. {good_copy_hint(manifest, path)}") from err
        return tuple(names)
    return tuple(str(i) for i in range(n))


def _assign_splits(arrays, manifest: Manifest, seed: int):
    """Official splits as given; missing ones made from the train pool per ``manifest.splits``."""
    make = dict(manifest.splits.get("make") or {})
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for split, (images, labels, extras) in arrays.items():
        if split != "pool":
            out[split] = (images, labels, extras.get("groups"))
    if "pool" in arrays:
        images, labels, extras = arrays["pool"]
        groups = extras.get("groups")
        if "split" in extras:
            mapping = manifest.splits.get("split_values") or {v: v for v in SPLITS}
            unknown = sorted(set(extras["split"]) - set(mapping))
            if unknown:
                raise DataError(f"dataset {manifest.name!r}: split values {unknown} are not in "
                                f"the manifest's split_values {sorted(mapping)}")
            for value, split in mapping.items():
                sel = extras["split"] == value
                out[split] = (images[sel], labels[sel], None if groups is None else groups[sel])
        else:
            out["train"] = (images, labels, groups)
    if "train" not in out:
        raise DataError(f"dataset {manifest.name!r}: no train split or pool found")
    group_ok = make.get("group_by") == "groups"
    for split in ("test", "val"):
        if split in out:
            continue
        fraction = make.get(split, 0.2 if split == "test" else 0.1)
        images, labels, groups = out["train"]
        keep, held = make_split(labels, fraction, seed + (1 if split == "val" else 0),
                                groups if group_ok else None, make.get("stratify", True))
        out[split] = (images[held], labels[held], None if groups is None else groups[held])
        out["train"] = (images[keep], labels[keep], None if groups is None else groups[keep])
    return out


def registered_names() -> list[str]:
    return sorted(load_manifests())
