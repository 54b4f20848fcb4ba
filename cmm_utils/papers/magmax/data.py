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
from cmm_utils.core.data import DatasetSplits, LabeledImages, Scenario, Task, class_incremental, load_dataset, make_split
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


def load_imagenet_r(root: Path | str | None = None, seed: int = 0, size: int = 224,
                    split_file: Path | str | None = None) -> tuple[DatasetSplits, dict]:
    """ImageNet-R (Hendrycks et al. 2021) from ``<root>/imagenet-r/<class>/<domain>_<n>.jpg``.

    Classes are the sorted folder names (ImageFolder's order, which the authors' class order
    indexes), shown with ``_`` as spaces as the authors do; wnid folders are renamed through
    ``README.txt`` when present. The authors' split is an unseeded 80/20 ``random_split``; here the
    80/20 split is drawn from ``seed`` once and *persisted* as a file list (``split_file``, default
    under the cache) so it never changes; 10 % of train is the validation split. Images: shorter
    side resized to ``size`` (bicubic), centre crop (the authors' ``val_preprocess``).
    """
    from PIL import Image

    from cmm_utils.core.data import data_root
    base = Path(root) if root is not None else data_root()
    folder = base / "imagenet-r"
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet-R not found at {folder}: download "
                                "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and extract it there")
    rename = {}
    readme = folder / "README.txt"
    if readme.exists():
        for line in readme.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith("n"):
                rename[parts[0]] = parts[1]
    dirs = sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: rename.get(d.name, d.name))
    names = [rename.get(d.name, d.name) for d in dirs]
    files = [(f"{d.name}/{f.name}", c) for c, d in enumerate(dirs) for f in sorted(d.iterdir()) if f.is_file()]
    split_path = Path(split_file) if split_file else cache_root() / CHAPTER / f"imagenet-r-split-seed{seed}.json"
    if split_path.exists():
        test_set = set(json.loads(split_path.read_text())["test"])
    else:
        perm = np.random.default_rng(seed).permutation(len(files))
        test_set = {files[i][0] for i in perm[int(0.8 * len(files)):]}
        write_json(split_path, {"seed": seed, "test": sorted(test_set)})

    def read(rel: str) -> np.ndarray:
        img = Image.open(folder / rel).convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)))

    images = np.stack([read(rel) for rel, _ in files])
    labels = np.array([c for _, c in files], dtype=np.int64)
    dom = np.array([rel.split("/")[-1].split("_")[0] for rel, _ in files])
    is_test = np.array([rel in test_set for rel, _ in files])
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    keep, held = make_split(labels[train_idx], 0.1, seed + 1)
    parts = {"train": train_idx[keep], "val": train_idx[held], "test": test_idx}

    def pack(idx):
        return LabeledImages(torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous(),
                             torch.from_numpy(labels[idx]))

    data = DatasetSplits("imagenet-r", tuple(n.replace("_", " ") for n in names),
                         pack(parts["train"]), pack(parts["val"]), pack(parts["test"]), licence="MIT (ImageNet-R)",
                         source="https://github.com/hendrycks/imagenet-r")
    return data, {s: dom[idx] for s, idx in parts.items()}

