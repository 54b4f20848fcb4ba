"""MedMerge's two sources and the target data: the natural source ``a`` (the book's pretrained
backbone, or a backbone trained on a dataset) and the medical source ``b``, trained *from a
different random initialisation* on the medical source data (Almakky et al. 2024, Sec. 3: two
models of one architecture trained on different data), cached as safetensors keyed by the whole
configuration; and the second model of the *merging with zeros* ablation.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from cmm_utils.core.data import DatasetSplits, load_dataset
from cmm_utils.core.data.leakage import remove_source_images
from cmm_utils.core.io import cache_root, cached_state, config_key, load_meta
from cmm_utils.core.models import Classifier, book_backbone, build_backbone
from cmm_utils.core.train import fit, seed_everything
from cmm_utils.papers.medmerge.profiles import CHAPTER, VERSION
from cmm_utils.papers.medmerge.training import evaluate, fit_config, on_device

_TARGET_CAP = object()


def load_target(name: str, seed: int, cfg: Mapping, max_per_split=_TARGET_CAP) -> DatasetSplits:
    """A target (or, with its own ``max_per_split``, source) dataset at the profile's resolution, RGB;
    by default each split is capped at the profile's ``max_per_split``."""
    return load_dataset(name, seed=seed, size=cfg["image_size"], channels=3,
                        max_per_split=cfg["max_per_split"] if max_per_split is _TARGET_CAP else max_per_split)


def target_without_source(target: str, medical: str, seed: int, cfg: Mapping) -> DatasetSplits:
    """The target's data with every image of the medical source (and of its lesions) removed from
    its validation and test splits (:func:`cmm_utils.core.data.leakage.remove_source_images`).

    HAM10000 is a subset of ISIC-2019: MedMerge's HAM10000 → ISIC-2019 transfer would otherwise score
    the target on images the medical source was trained on. The filter needs image ids on both sides
    (the ISIC image folders carry them); for sets without ids (the MedMNIST files, from other
    sources than the targets) there is nothing to match and the target is returned as loaded. The
    source is read uncapped so that every one of its ids is known; what was removed is kept in
    ``meta["removed_source_images"]`` for the page."""
    data = load_target(target, seed, cfg)
    if data.test.ids is None or Path(str(medical)).stem == Path(str(target)).stem:
        return data
    source = load_dataset(medical, seed=cfg["source_data_seed"], size=cfg["image_size"], channels=3)
    if source.train.ids is None:
        return data
    clean, _ = remove_source_images(data, source)
    return clean


MEDICAL_INITS = ("random", "natural")


def starts_from_natural(cfg: Mapping, init_seed: int) -> bool:
    """Whether the source trained with ``init_seed`` starts from the natural source's weights: the
    medical source (seed ``source_init_seed``; the natural one is seed 0) under ``medical_init =
    "natural"``. Whether the paper's medical sources were ImageNet-initialised is not known; its
    abstract stresses merging models "starting from different initializations", so ``"random"``
    (a different random initialisation) is the default and ``"natural"`` the alternative."""
    init = cfg.get("medical_init", "random")
    if init not in MEDICAL_INITS:
        raise ValueError(f"unknown medical_init {init!r}; valid: {', '.join(MEDICAL_INITS)}")
    return init == "natural" and init_seed == cfg["source_init_seed"] and init_seed != 0


def source_key(arch: str, dataset: str, cfg: Mapping, init_seed: int) -> dict:
    start = {"start": f"natural:{cfg['natural_source']}:{cfg['profile']}"} if starts_from_natural(cfg, init_seed) else {}
    return {**start, "chapter": CHAPTER, "version": VERSION, "arch": arch, "scale": cfg["scale"],
            "image_size": cfg["image_size"], "dataset": dataset, "init_seed": init_seed,
            "data_seed": cfg["source_data_seed"], "epochs": cfg["source_epochs"], "lr": cfg["source_lr"],
            "batch_size": cfg["source_batch_size"], "weight_decay": cfg["source_weight_decay"],
            "max_per_split": cfg["source_max_per_split"], "max_steps": cfg.get("max_steps")}


def _source_path(arch: str, dataset: str, cfg: Mapping, init_seed: int) -> Path:
    key = source_key(arch, dataset, cfg, init_seed)
    return cache_root() / CHAPTER / "sources" / f"{arch}-{Path(str(dataset)).stem}-{config_key(key)}.safetensors"


def train_source(arch: str, dataset: str, cfg: Mapping, init_seed: int, verbose: bool = True) -> nn.Module:
    """A backbone trained from random initialisation ``init_seed`` on ``dataset`` (all of its
    layers), cached as safetensors keyed by the whole configuration; returns the backbone."""
    key = source_key(arch, dataset, cfg, init_seed)
    path = _source_path(arch, dataset, cfg, init_seed)

    def train() -> tuple[dict, dict]:
        data = load_target(dataset, cfg["source_data_seed"], cfg, max_per_split=cfg["source_max_per_split"])
        seed_everything(init_seed)
        backbone = build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"])
        if starts_from_natural(cfg, init_seed):
            backbone.load_state_dict(source_backbone(cfg["natural_source"], arch, cfg, 0, verbose=False).state_dict())
        model = on_device(Classifier(backbone, data.num_classes))
        fit(model, data.train, fit_config(cfg, "source"), seed=init_seed, desc=f"source {arch} on {data.name}")
        scores = evaluate(model, data.test)
        return backbone.state_dict(), {**key, "test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"],
                                       "classes": list(data.classes)}

    state, meta, cached = cached_state(path, train)
    backbone = build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"])
    backbone.load_state_dict(state)
    backbone = on_device(backbone)
    if verbose:
        start = "the natural source" if starts_from_natural(cfg, init_seed) else f"random init (seed {init_seed})"
        how = "loaded from cache:" if cached else f"trained from {start}, cached at {path}:"
        print(f"{arch} source on {dataset} {how} test accuracy {meta.get('test_accuracy', float('nan')):.3f}, "
              f"macro F1 {meta.get('test_macro_f1', float('nan')):.3f}")
    return backbone


def source_backbone(spec: str, arch: str, cfg: Mapping, init_seed: int, verbose: bool = True) -> nn.Module:
    """``"book"``: the book's pretrained backbone of the profile; otherwise a dataset name/path on
    which a backbone is trained from random initialisation ``init_seed``."""
    if spec == "book":
        return on_device(book_backbone(arch, cfg["profile"], verbose=verbose))
    return train_source(arch, spec, cfg, init_seed, verbose=verbose)


def source_meta(spec: str, arch: str, cfg: Mapping, init_seed: int) -> dict:
    """What a source is, for tables (its training set and, where cached, its test scores)."""
    if spec == "book":
        return {"source": "book backbone", "trained on": "Fashion-MNIST + CIFAR-10 subset" if cfg["profile"] != "paper"
                else "ImageNet (published weights)"}
    meta = load_meta(_source_path(arch, spec, cfg, init_seed))
    start = "the natural source" if starts_from_natural(cfg, init_seed) else f"random init (seed {init_seed})"
    return {"source": f"{spec} from {start}", "trained on": spec,
            "test accuracy": meta.get("test_accuracy"), "test macro F1": meta.get("test_macro_f1")}


def zero_convolutions(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` whose convolution kernels (and biases) are all zero: the second
    model of the "merging with zeros" ablation."""
    out = copy.deepcopy(backbone)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
    return out
