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
from cmm_utils.core.data.readers import (SPLITS, read_cifar_binary_tar, read_cifar_python, read_idx_gz,
                                         read_image_folder_csv, read_npz, npz_class_names)
from cmm_utils.core.data.validate import check_label_range, good_copy_hint


@dataclass
class LabeledImages:
    """Images ``uint8 [N, C, H, W]`` and integer labels ``[N]``; optional per-image strings: ``groups``
    (lesion or patient ids) and ``ids`` (the image ids of the source files, e.g. ``ISIC_0024306``)."""
    images: torch.Tensor
    labels: torch.Tensor
    groups: np.ndarray | None = None
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "LabeledImages":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        pick = index.numpy()
        return LabeledImages(self.images[index], self.labels[index],
                             None if self.groups is None else self.groups[pick],
                             None if self.ids is None else self.ids[pick])

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


def _present(manifest: Manifest, root: Path, download: bool) -> tuple[Manifest, dict[str, Path]]:
    """The manifest's files when they are all there; else those of the first other ``layout`` that is
    all there (the manifest rewritten to it); else the manifest's files fetched, or an error that
    names the files of every layout it looked for."""
    if manifest.layouts and not all((root / f.path).exists() for f in manifest.files):
        for layout in manifest.layouts:
            if all((root / f.path).exists() for f in layout.files):
                other = replace(manifest, format=layout.format, files=layout.files)
                return other, ensure_files(other, root, download=False)
        try:
            return manifest, ensure_files(manifest, root, download=download)
        except DataError as err:
            looked = "; ".join(f"{lay.format}: {', '.join(str(root / f.path) for f in lay.files)}"
                               for lay in manifest.layouts)
            raise DataError(f"{err}. Other layouts read instead, none complete: {looked}") from err
    return manifest, ensure_files(manifest, root, download=download)


def _read(manifest: Manifest, root: Path, size: int | None, download: bool):
    """The reader's arrays, checked; a bad file's error says how to get a good copy."""
    return _read_layout(manifest, root, size, download)[1]


def _read_layout(manifest: Manifest, root: Path, size: int | None, download: bool):
    """The manifest of the layout read (:func:`_present`) and its arrays, as :func:`_read`."""
    manifest, files = _present(manifest, root, download)
    first = next(iter(files.values()))
    try:
        arrays = _read_format(manifest, files, root, size)
        if manifest.classes:
            check_label_range(arrays, manifest.num_classes, f"dataset {manifest.name!r} ({first})")
    except DataError as err:
        raise DataError(f"{err}. {good_copy_hint(manifest, first)}") from err
    return manifest, arrays


def _read_format(manifest: Manifest, files: dict[str, Path], root: Path, size: int | None):
    if manifest.format == "npz":
        return read_npz(next(iter(files.values())), manifest.keys)
    if manifest.format == "idx_gz":
        return read_idx_gz(files)
    if manifest.format == "cifar_binary_tar":
        return read_cifar_binary_tar(next(iter(files.values())))
    if manifest.format == "cifar_python":
        return read_cifar_python(files)
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
                 download: bool = True, max_per_split: int | None = None,
                 val_fraction: float | None = None) -> DatasetSplits:
    """Load a registered dataset (``data_manifests/<name>.yaml``), a :class:`Manifest`, or a file/folder path.

    Missing splits are made from the train pool as the manifest says (seeded, stratified,
    group-disjoint where groups exist); a path gets val 10% and test 20% of what it lacks.
    ``size`` resizes every image once; ``channels`` converts grey/RGB; ``max_per_split`` keeps a
    seeded, stratified subset of each split (the ``smoke`` profile). ``val_fraction`` overrides the
    share of the train pool made into a validation split (``None``: the manifest's ``splits.make.val``,
    else 0.1); ``0`` makes none, so a chapter that never reads val trains on the whole pool (the
    manifests' ``splits.val_read_by`` names the chapters that read it). An official val split is kept.
    """
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}; valid: None (the manifest's) or 0 <= val_fraction < 1")
    is_manifest = isinstance(name_or_path, Manifest)
    text = "" if is_manifest else str(name_or_path)
    looks_like_path = not is_manifest and (text.endswith((".npz", "/")) or "/" in text or Path(text).exists())
    root = Path(root) if root is not None else data_root()
    if is_manifest:
        manifest, arrays = _read_layout(name_or_path, root, size, download)
    elif looks_like_path:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"dataset path {text!r} does not exist")
        manifest = _manifest_for_path(path.resolve())
        arrays = _read(manifest, Path("/"), size, download=False)
    else:
        manifest, arrays = _read_layout(get_manifest(text), root, size, download)

    splits = _assign_splits(arrays, manifest, seed, val_fraction)
    classes = manifest.classes or _path_classes(Path(text), splits, manifest)
    out = {}
    for split, part in splits.items():
        labels = part[1]
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"dataset {manifest.name!r} split {split}: labels span "
                            f"[{labels.min()}, {labels.max()}] but there are {len(classes)} classes")
        if max_per_split is not None and len(labels) > max_per_split:
            part = _take(part, make_split(labels, 1 - max_per_split / len(labels), seed)[0])
        images, labels, extras = part
        out[split] = LabeledImages(_to_tensor(images, size, channels), torch.from_numpy(labels.astype(np.int64)),
                                   extras.get("groups"), extras.get("ids"))
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


PER_IMAGE = ("groups", "ids")   # the extras a split keeps (``split`` is spent assigning them)


def _take(part, index):
    """Rows ``index`` of one split's ``(images, labels, extras)``."""
    images, labels, extras = part
    return images[index], labels[index], {k: v[index] for k, v in extras.items()}


def _assign_splits(arrays, manifest: Manifest, seed: int, val_fraction: float | None = None):
    """Official splits as given; missing ones made from the train pool per ``manifest.splits``
    (``val_fraction``, when given, instead of ``splits.make.val``)."""
    make = dict(manifest.splits.get("make") or {})
    out: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}
    for split, (images, labels, extras) in arrays.items():
        if split != "pool":
            out[split] = (images, labels, {k: v for k, v in extras.items() if k in PER_IMAGE})
    if "pool" in arrays:
        images, labels, extras = arrays["pool"]
        kept = {k: v for k, v in extras.items() if k in PER_IMAGE}
        if "split" in extras:
            mapping = manifest.splits.get("split_values") or {v: v for v in SPLITS}
            unknown = sorted(set(extras["split"]) - set(mapping))
            if unknown:
                raise DataError(f"dataset {manifest.name!r}: split values {unknown} are not in "
                                f"the manifest's split_values {sorted(mapping)}")
            for value, split in mapping.items():
                out[split] = _take((images, labels, kept), extras["split"] == value)
        else:
            out["train"] = (images, labels, kept)
    if "train" not in out:
        raise DataError(f"dataset {manifest.name!r}: no train split or pool found")
    group_ok = make.get("group_by") == "groups"
    for split in ("test", "val"):
        if split in out:
            continue
        fraction = make.get(split, 0.2 if split == "test" else 0.1)
        if split == "val" and val_fraction is not None:
            fraction = val_fraction
        if fraction == 0:       # no val asked for: an empty split, the whole pool stays in train
            out[split] = _take(out["train"], slice(0, 0))
            continue
        labels, groups = out["train"][1], out["train"][2].get("groups")
        keep, held = make_split(labels, fraction, seed + (1 if split == "val" else 0),
                                groups if group_ok else None, make.get("stratify", True))
        out[split], out["train"] = _take(out["train"], held), _take(out["train"], keep)
    return out


def registered_names() -> list[str]:
    return sorted(load_manifests())
