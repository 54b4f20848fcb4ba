"""The MagMax chapter's benchmarks: the authors' class orders, domains and prompt templates, and the
scenarios a run loads (class-incremental CIFAR-100 / ImageNet-R / the book's data, domain-incremental
ImageNet-R).

MagMax (Marczak et al., ECCV 2024) evaluates on class-incremental CIFAR-100 and ImageNet-R split into
T ∈ {5, 10, 20, 50} tasks in the authors' fixed class orders, and on domain-incremental ImageNet-R (one
task per domain, all classes). The orders, domains and templates are copied from the authors' code
(research note ``magmax_cmm_code.md`` §2.1-2.2). The method is in :mod:`cmm_utils.papers.magmax.method`, its
runs in :mod:`cmm_utils.papers.magmax.experiment` (whose ``load_scenario`` fills ``settings`` in from the profile).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from cmm_utils.core.benchmarks import BENCHMARKS, CLASS_ORDER_SEED, load_benchmark
from cmm_utils.core.data import (DatasetSplits, LabeledImages, Scenario, Task, class_incremental, data_root,
                                 decode_images, load_dataset, make_split)
from cmm_utils.core.io import cache_root, write_json
from cmm_utils.core.models import BOOK_IMAGE_SIZE
from cmm_utils.core.models.clip import CIFAR100_TEMPLATES, IMAGENET_TEMPLATES
from cmm_utils.core.profiles import check_profile

CHAPTER = "magmax"

# Class orders copied from the authors' repository (danielm1405/magmax, commit 4f49f18):
# src/datasets/cifar100.py L32 (``default_class_order``) and src/datasets/imagenetr.py L152.
CIFAR100_CLASS_ORDER = (
    70, 89, 11, 13, 63, 53, 86, 57, 41, 43, 14, 98, 52, 73, 95, 96, 33, 16, 39, 74, 25, 88, 35, 28, 79,
    82, 72, 4, 30, 17, 59, 97, 36, 38, 29, 55, 83, 7, 22, 48, 19, 47, 2, 44, 67, 71, 34, 84, 6, 46,
    61, 8, 80, 10, 49, 15, 68, 9, 99, 40, 27, 45, 51, 37, 21, 64, 92, 24, 60, 31, 5, 91, 93, 90, 65,
    66, 77, 20, 58, 62, 23, 76, 75, 42, 0, 26, 87, 50, 3, 56, 81, 1, 94, 69, 18, 78, 54, 12, 85, 32)
IMAGENET_R_CLASS_ORDER = (
    186, 157, 67, 59, 117, 1, 122, 14, 131, 40, 66, 199, 92, 170, 197, 118, 173, 37, 146, 191, 4, 198,
    64, 56, 51, 165, 0, 107, 175, 148, 187, 161, 137, 180, 133, 181, 177, 12, 20, 74, 143, 142, 110, 116,
    194, 138, 183, 89, 45, 121, 190, 94, 36, 83, 130, 120, 21, 38, 125, 145, 182, 103, 105, 61, 32, 141,
    13, 112, 111, 104, 26, 69, 39, 156, 147, 108, 72, 10, 96, 188, 16, 63, 152, 86, 160, 119, 184, 7,
    172, 132, 44, 42, 82, 15, 114, 127, 85, 168, 55, 65, 3, 95, 171, 176, 33, 43, 17, 97, 163, 62, 75,
    123, 128, 124, 99, 29, 28, 166, 41, 35, 76, 77, 5, 84, 102, 60, 78, 70, 164, 113, 30, 91, 81, 18,
    155, 179, 73, 46, 80, 31, 150, 79, 174, 153, 50, 144, 9, 167, 134, 135, 101, 49, 106, 154, 23, 100,
    48, 25, 71, 139, 162, 158, 159, 87, 90, 11, 24, 57, 19, 52, 129, 140, 178, 53, 169, 195, 126, 47,
    151, 136, 22, 58, 34, 8, 185, 54, 109, 193, 68, 192, 149, 115, 98, 88, 93, 6, 196, 189, 2, 27)
# ImageNet-R domains (imagenetr.py ``DOMAINS``) and the DIL order ``default_domain_order``.
IMAGENET_R_DOMAINS = ("deviantart", "cartoon", "misc", "embroidery", "videogame", "painting", "art",
                      "graphic", "origami", "tattoo", "toy", "sticker", "graffiti", "sculpture", "sketch")
IMAGENET_R_DOMAIN_ORDER = (9, 14, 7, 5, 6, 8, 13, 12, 1, 2, 10, 3, 4, 11, 0)
CLASS_ORDERS = {"cifar100": CIFAR100_CLASS_ORDER, "imagenet-r": IMAGENET_R_CLASS_ORDER}

TEMPLATES = {"cifar100": CIFAR100_TEMPLATES, "imagenet-r": IMAGENET_TEMPLATES, "imagenet-r-dil": IMAGENET_TEMPLATES}


def _is_path(name: str) -> bool:
    return str(name).endswith(".npz") or "/" in str(name) or Path(str(name)).exists()


def fixed_benchmark(dataset: str) -> bool:
    """A scenario that brings its own tasks (a book benchmark, ImageNet-R's domains): no ``n_tasks``."""
    return dataset in BENCHMARKS or dataset == "imagenet-r-dil"


def benchmark_name(dataset: str, n_tasks: int | None) -> str:
    """The name a run is cached under: a book benchmark as is, else ``<dataset>-cil<T>``."""
    if fixed_benchmark(dataset):
        return dataset
    return f"{Path(str(dataset)).stem if _is_path(dataset) else dataset}-cil{n_tasks}"


def load_scenario(dataset: str, profile: str, seed: int, n_tasks: int | None, settings: Mapping) -> Scenario:
    """The scenario a run of this chapter uses, under ``settings`` (a row of
    :data:`cmm_utils.papers.magmax.profiles.PROFILES`; :func:`cmm_utils.papers.magmax.experiment.load_scenario`
    defaults it to the profile's).

    - a book benchmark (``ham10000-cil``, ``medical-dil``): :func:`cmm_utils.core.benchmarks.load_benchmark`;
    - ``imagenet-r-dil``: ImageNet-R's 15 domains in the authors' order (``paper``);
    - any other registered name or MedMNIST-format path: class-incremental over ``n_tasks`` tasks in
      the authors' class order where they fixed one (CIFAR-100, ImageNet-R), else the book's
      seed-1993 permutation (PyCIL's convention).
    """
    check_profile(profile)
    if dataset in BENCHMARKS:
        return load_benchmark(dataset, profile, seed)
    size = None if settings["head"] == "clip" else BOOK_IMAGE_SIZE[profile]
    if dataset in ("imagenet-r", "imagenet-r-dil"):
        data, domains = load_imagenet_r(seed=seed)
        if dataset == "imagenet-r-dil":
            return domain_incremental(data, domains, [IMAGENET_R_DOMAINS[i] for i in IMAGENET_R_DOMAIN_ORDER])
        return class_incremental(data, int(n_tasks or 10), class_order=IMAGENET_R_CLASS_ORDER)
    if not _is_path(dataset):
        from cmm_utils.core.data import registered_names
        if dataset not in registered_names():
            raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(BENCHMARKS)}, imagenet-r, "
                             f"imagenet-r-dil, a registered name ({', '.join(registered_names())}) or an .npz path")
    data = load_dataset(dataset, seed=seed, size=size, channels=3, max_per_split=settings["max_per_split"])
    if n_tasks is None or not 1 <= int(n_tasks) <= data.num_classes:
        raise ValueError(f"n_tasks={n_tasks!r} must be an integer between 1 and {data.num_classes} "
                         f"(the classes of {dataset!r})")
    order = CLASS_ORDERS.get(str(dataset))
    return class_incremental(data, int(n_tasks), seed=CLASS_ORDER_SEED, class_order=order)


def domain_incremental(data: DatasetSplits, domains: Mapping[str, np.ndarray], order: Sequence[str]) -> Scenario:
    """One task per domain, all classes in every task (labels shared; MagMax's DIL, §2.2).

    ``domains[split]`` names the domain of each image of that split.
    """
    tasks = []
    classes = tuple(range(data.num_classes))
    for i, dom in enumerate(order):
        pick = {s: data.split(s).subset(np.flatnonzero(np.asarray(domains[s]) == dom))
                for s in ("train", "val", "test")}
        tasks.append(Task(i, classes, pick["train"], pick["val"], pick["test"], name=dom))
    return Scenario(f"{data.name}-dil", "domain-incremental", tasks, data.classes, classes)


IMAGENET_R_LAYOUTS = ("imagenet-r/<class folder>/<domain>_<n>.jpg (imagenet-r.tar as extracted; wnid folders "
                      "are named through its README.txt)",
                      "imagenet-r/{train,test}/<class>/<domain>_<n>.jpg (as the authors' imagenetr.py leaves it "
                      "after moving the files into its 80/20 split)")


def _subdirs(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []


def _imagenet_r_layout(folder: Path) -> str:
    """``processed`` (``train/`` and ``test/`` holding class folders) or ``raw`` (class folders holding
    images); anything else is an error naming the folder and both layouts."""
    if all(_subdirs(folder / s) for s in ("train", "test")):
        return "processed"
    if any(f.is_file() for d in _subdirs(folder) if d.name not in ("train", "test") for f in d.iterdir()):
        return "raw"
    raise FileNotFoundError(f"ImageNet-R not found at {folder}: expected either {IMAGENET_R_LAYOUTS[0]} or "
                            f"{IMAGENET_R_LAYOUTS[1]}. Download https://people.eecs.berkeley.edu/~hendrycks/"
                            "imagenet-r.tar and extract it there")


def _imagenet_r_files(folder: Path, layout: str, split_path: Path, seed: int):
    """Class names, ``(relative path, class index)`` of every image, and the relative paths of the test
    images: the processed tree's ``test/``, or the raw tree's 80/20 split drawn from ``seed`` once and
    persisted at ``split_path`` (the authors' unseeded ``random_split`` cannot be redrawn)."""
    rename = {}
    readme = folder / "README.txt"
    if readme.exists():
        for line in readme.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith("n"):
                rename[parts[0]] = parts[1]
    roots = [folder / "train", folder / "test"] if layout == "processed" else [folder]
    class_dirs = sorted((d for r in roots for d in _subdirs(r)
                         if layout == "processed" or d.name not in ("train", "test")),
                        key=lambda d: rename.get(d.name, d.name))
    names = sorted({rename.get(d.name, d.name) for d in class_dirs})   # ImageFolder's order, as the class order
    index = {n: c for c, n in enumerate(names)}
    files = [(f.relative_to(folder).as_posix(), index[rename.get(d.name, d.name)])
             for d in class_dirs for f in sorted(d.iterdir()) if f.is_file()]
    if not files:
        raise FileNotFoundError(f"ImageNet-R at {folder} ({layout} layout) holds no image files; expected "
                                f"{IMAGENET_R_LAYOUTS[0 if layout == 'raw' else 1]}")
    if layout == "processed":
        return names, files, {rel for rel, _ in files if rel.startswith("test/")}
    if split_path.exists():
        return names, files, set(json.loads(split_path.read_text())["test"])
    perm = np.random.default_rng(seed).permutation(len(files))
    test_set = {files[i][0] for i in perm[int(0.8 * len(files)):]}
    write_json(split_path, {"seed": seed, "test": sorted(test_set)})
    return names, files, test_set


def load_imagenet_r(root: Path | str | None = None, seed: int = 0, size: int = 224,
                    split_file: Path | str | None = None, val_fraction: float = 0.1) -> tuple[DatasetSplits, dict]:
    """ImageNet-R (Hendrycks et al. 2021) in either of :data:`IMAGENET_R_LAYOUTS`, detected.

    Classes are the sorted class-folder names (ImageFolder's order, which the authors' class order
    indexes), shown with ``_`` as spaces as the authors do; wnid folders are renamed through
    ``README.txt`` when present. A processed tree brings the authors' split; for the raw tree the
    authors' unseeded 80/20 ``random_split`` is replaced by an 80/20 split drawn from ``seed`` once and
    *persisted* as a file list (``split_file``, default under the cache) so it never changes.
    ``val_fraction`` of train (seeded) is the validation split MagMax's λ sweep reads. Images: shorter
    side resized to ``size`` (bicubic), centre crop (the authors' ``val_preprocess``), decoded once
    per process in workers (:func:`cmm_utils.core.data.decode_images`).
    """
    base = Path(root) if root is not None else data_root()
    folder = base / "imagenet-r"
    layout = _imagenet_r_layout(folder)
    split_path = Path(split_file) if split_file else cache_root() / CHAPTER / f"imagenet-r-split-seed{seed}.json"
    names, files, test_set = _imagenet_r_files(folder, layout, split_path, seed)
    images = decode_images([folder / rel for rel, _ in files], size, fit="shorter_side_crop", listed_in=folder)
    labels = np.array([c for _, c in files], dtype=np.int64)
    dom = np.array([rel.split("/")[-1].split("_")[0] for rel, _ in files])
    is_test = np.array([rel in test_set for rel, _ in files])
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    keep, held = (make_split(labels[train_idx], val_fraction, seed + 1) if val_fraction
                  else (np.arange(len(train_idx)), np.arange(0)))
    parts = {"train": train_idx[keep], "val": train_idx[held], "test": test_idx}

    def pack(idx):
        return LabeledImages(torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous(),
                             torch.from_numpy(labels[idx]))

    data = DatasetSplits("imagenet-r", tuple(n.replace("_", " ") for n in names),
                         pack(parts["train"]), pack(parts["val"]), pack(parts["test"]), licence="MIT (ImageNet-R)",
                         source="https://github.com/hendrycks/imagenet-r")
    return data, {s: dom[idx] for s, idx in parts.items()}
