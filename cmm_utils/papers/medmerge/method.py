"""MedMerge: transfer learning from two source models merged with learned kernel-level weights.

I. Almakky, S. Sanjeev, A. U. R. Hashmi, M. A. Qazi, (H. Wang,) M. Yaqub, "MedMerge: Merging
Models for Effective Transfer Learning to Medical Imaging Tasks", arXiv:2403.11646 (v1 2024, v2
2025). The authors' code (github.com/BioMedIA-MBZUAI/MedMerge) could not be read; what is known
is the merge equation, per convolution kernel ``j`` (as reported on a public review page),

    theta_hat_j = w_j theta^(a)_j + (1 - w_j) theta^(b)_j,                          (MedMerge eq.)

with the weights ``w`` learned during *linear probing* on the target (convolutions frozen, the
linear head and ``w`` trained), the merged network then fine-tuned on the target, and the
comparison with fine-tuning, LP-FT and other merges by macro F1 and accuracy.

The pipeline here, per backbone, target and seed (:func:`run_experiment`):

1. sources: ``a`` = natural images (the book's ``book_backbone``: Fashion-MNIST + a CIFAR-10
   subset at 28 px; ImageNet weights in ``paper``), ``b`` = a medical source trained *from a
   different random initialisation* on HAM10000 (:func:`train_source`, cached as safetensors);
2. MedMerge: ``cmm_utils.papers.medmerge.kernel_merge.wrap_kernel_merge(a, b)`` + a new linear head; the head and
   ``w`` trained (linear probing), then ``collapse_kernel_merge`` gives one plain network, whose
   BatchNorm statistics are recomputed on target training data, and which is fine-tuned;
3. baselines: fine-tuning (FT) from each source, linear probing (LP) and LP-FT (Kumar et al.,
   ICLR 2022) from each source, and merges of the two target-fine-tuned models, as the authors'
   baseline scripts do (``santosh9sanjeev/zipit``: ``match_tensors_identity``, ``_permute``,
   ``_zipit``, each followed by ``reset_bn_stats``): uniform averaging, permutation alignment by
   weight matching (Git Re-Basin) or by activation matching, and ZipIt!
   (:mod:`cmm_utils.papers.medmerge.alignment`); BN statistics recomputed on target training data after merging;
4. the ablation *merging with zeros* (``theta^(b) = 0``: the natural source rescaled kernel by
   kernel), and the open choices (initial ``w``, direct vs sigmoid parametrisation, ``w`` learned
   or frozen at its initial value) on one backbone and target.

Choices where the paper is silent (each is a literal in :data:`PROFILES` or an argument):

* kernel granularity: one ``w`` per 2-D kernel (``C_out x C_in``), ``cmm_utils.papers.medmerge.kernel_merge``'s;
* ``w`` initialised at 0.5, used directly (the equation, unconstrained); the ablation varies both;
* non-convolution parameters (BatchNorm affine, frozen) from source ``a``, read as the paper's
  "anchored" extractor; during the probe BN normalises with batch statistics (train mode), since
  the running statistics of either source do not describe the merged convolutions; after the
  probe they are recomputed on the target's training images;
* plain LP: the source's BN statistics are first recomputed on the target's training images (the
  same free adaptation the merged network gets), then the head is trained with BN in eval mode;
* optimisers: Adam for probing, with its own learning rate for ``w`` (``w_lr``; at the head's rate
  the per-kernel weights barely leave their initial value in a few dozen steps), AdamW for
  fine-tuning, cosine schedules, horizontal flips; no validation-based model selection (last epoch);
* the medical source is trained on all its training images (AdamW, cosine), from random
  initialisation ``source_init_seed`` (the natural source uses seed 0).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cmm_utils.papers.medmerge import alignment
from cmm_utils.merging import kernels as merge
from cmm_utils.core.data import DatasetSplits, LabeledImages, load_dataset
from cmm_utils.core.io import cache_root, cached_state, config_key, load_meta, load_state, save_state
from cmm_utils.papers.medmerge.kernel_merge import collapse_kernel_merge, kernel_weights, wrap_kernel_merge
from cmm_utils.papers.medmerge.landscape import plane_grid, recompute_bn
from cmm_utils.core.metrics import macro_f1, quadratic_kappa
from cmm_utils.core.models import PRETRAIN, Classifier, book_backbone, build_backbone
from cmm_utils.core.profiles import check_profile, select
from cmm_utils.core.train import FitConfig, fit, predict, seed_everything

VERSION = 2
CHAPTER = "medmerge"

# Ablation variants: (name, init, parametrisation, learn_w); the main run is init 0.5, direct, learned
ABLATIONS = (
    ("init 0.25, direct", 0.25, "direct", True),
    ("init 0.75, direct", 0.75, "direct", True),
    ("init 0.5, sigmoid", 0.5, "sigmoid", True),
    ("w frozen at 0.5 (source average + LP-FT)", 0.5, "direct", False),
)

_COMMON = {
    "natural_source": "book", "init": 0.5, "parametrisation": "direct", "other_params": "a", "w_lr": 0.05,
    "optimizer_lp": "adam", "optimizer_ft": "adamw", "weight_decay": 1e-4,
    "zipit_alpha": 0.3, "zipit_beta": 0.125, "wm_iters": 30, "plane_margin": 0.25,
    "source_init_seed": 1, "source_data_seed": 0, "source_lr": 1e-3, "source_weight_decay": 1e-4,
}
# smoke: plumbing only. cpu: 28 px, three seeds, <= 500 images per target split. paper: the paper's
# datasets and backbones at 224 px; its optimiser settings are not public, so epochs and learning
# rates there are ours (LP then FT, as in LP-FT), as is every hyper-parameter of the other profiles.
PROFILES = {
    "smoke": {**_COMMON,
              "runs": (("resnet18", "ham10000", "retinamnist"),),
              "scale": "cpu", "image_size": 28, "n_seeds": 1, "max_per_split": 96,
              "source_epochs": 1, "source_max_per_split": 384, "source_batch_size": 64,
              "lp_epochs": 1, "lp_lr": 1e-2, "ft_epochs": 1, "ft_lr": 1e-3, "batch_size": 32,
              "merges": ("average", "permutation", "zipit"), "match_images": 32,
              "ablations": ABLATIONS[2:3], "plane_merges": ("medmerge", "permutation"),
              "plane_grid": 3, "plane_images": 32},
    "cpu": {**_COMMON,
            "runs": (("resnet18", "ham10000", "retinamnist"), ("resnet18", "ham10000", "pathmnist_1k"),
                     ("densenet121", "ham10000", "retinamnist")),
            "scale": "cpu", "image_size": 28, "n_seeds": 3, "max_per_split": 500,
            "source_epochs": 6, "source_max_per_split": None, "source_batch_size": 64,
            "lp_epochs": 3, "lp_lr": 1e-2, "ft_epochs": 4, "ft_lr": 1e-3, "batch_size": 32,
            "merges": ("average", "permutation", "permutation_act", "zipit"), "match_images": 256,
            "ablations": ABLATIONS, "plane_merges": ("medmerge", "permutation", "zipit"),
            "plane_grid": 9, "plane_images": 200},
    "paper": {**_COMMON,
              "runs": (("densenet121", "ham10000_full", "isic2019"), ("densenet121", "eyepacs", "aptos2019"),
                       ("resnet50", "ham10000_full", "isic2019"), ("resnet50", "eyepacs", "aptos2019")),
              "scale": "paper", "image_size": 224, "n_seeds": 3, "max_per_split": None,
              "source_epochs": 30, "source_max_per_split": None, "source_batch_size": 32,
              "lp_epochs": 10, "lp_lr": 1e-3, "ft_epochs": 30, "ft_lr": 1e-4, "batch_size": 32,
              "merges": ("average", "permutation", "permutation_act", "zipit"), "match_images": 1024,
              "ablations": ABLATIONS, "plane_merges": ("medmerge", "permutation", "zipit"),
              "plane_grid": 21, "plane_images": 2000},
}

METHOD_LABELS = {
    "ft_natural": "FT (natural source)", "ft_medical": "FT (medical source)",
    "lp_natural": "LP (natural source)", "lp_medical": "LP (medical source)",
    "lpft_natural": "LP-FT (natural source)", "lpft_medical": "LP-FT (medical source)",
    "average": "Average of FT models", "permutation": "Permutation, weight matching (FT models)",
    "permutation_act": "Permutation, activation matching (FT models)", "zipit": "ZipIt! (FT models)",
    "medmerge_lp": "MedMerge, after the probe (no FT)", "medmerge": "MedMerge",
    "zeros_lp": "Merge with zeros, after the probe", "zeros": "Merge with zeros (ablation)",
}
FT_BASELINES = ("ft_natural", "ft_medical")
LPFT_BASELINES = ("lpft_natural", "lpft_medical")
MERGES = ("average", "permutation", "permutation_act", "zipit")
BACKBONES = ("resnet18", "resnet50", "densenet121")  # CNNs with permutation specs (cmm_utils.papers.medmerge.alignment)


def configure(profile: str, seed: int = 0, *, target: str | None = None, source_natural: str | None = None,
              source_medical: str | None = None, backbone: str | None = None, **overrides) -> dict:
    """The profile's settings with the notebook's parameters applied (``None`` = profile default).

    ``target`` (a registered name or a MedMNIST-format ``.npz`` path) replaces every run's target,
    ``source_medical`` every run's medical source, ``backbone`` every run's architecture.
    """
    cfg = select(PROFILES, check_profile(profile), **overrides)
    runs = list(cfg["runs"])
    if backbone is not None:
        runs = [(backbone, m, t) for _, m, t in runs]
    if source_medical is not None:
        runs = [(a, source_medical, t) for a, _, t in runs]
    if target is not None:
        runs = [(a, m, str(target)) for a, m, _ in runs]
    cfg["runs"] = tuple(dict.fromkeys(runs))  # de-duplicated, order kept
    if source_natural is not None:
        cfg["natural_source"] = source_natural
    cfg["profile"], cfg["seeds"] = profile, tuple(seed + i for i in range(cfg["n_seeds"]))
    for arch, _, _ in cfg["runs"]:
        if arch not in BACKBONES:
            raise ValueError(f"unknown backbone {arch!r} for MedMerge (a CNN is needed); valid: {', '.join(BACKBONES)}")
    for m in cfg["merges"]:
        if m not in MERGES:
            raise ValueError(f"unknown merge baseline {m!r}; valid: {', '.join(MERGES)}")
    for m in cfg["plane_merges"]:
        if m not in ("medmerge",) + MERGES:
            raise ValueError(f"unknown plane merge {m!r}; valid: medmerge, {', '.join(MERGES)}")
    return cfg


# ------------------------------------------------------------------------------- sources

def _fit_config(cfg: Mapping, stage: str) -> FitConfig:
    if stage == "source":
        return FitConfig(epochs=cfg["source_epochs"], lr=cfg["source_lr"], batch_size=cfg["source_batch_size"],
                         optimizer="adamw", weight_decay=cfg["source_weight_decay"], schedule="cosine",
                         max_steps=cfg.get("max_steps"))
    if stage == "lp":
        return FitConfig(epochs=cfg["lp_epochs"], lr=cfg["lp_lr"], batch_size=cfg["batch_size"],
                         optimizer=cfg["optimizer_lp"], schedule="cosine", max_steps=cfg.get("max_steps"))
    if stage == "ft":
        return FitConfig(epochs=cfg["ft_epochs"], lr=cfg["ft_lr"], batch_size=cfg["batch_size"],
                         optimizer=cfg["optimizer_ft"], weight_decay=cfg["weight_decay"], schedule="cosine",
                         max_steps=cfg.get("max_steps"))
    raise ValueError(f"unknown stage {stage!r}; valid: source, lp, ft")


_TARGET_CAP = object()


def load_target(name: str, seed: int, cfg: Mapping, max_per_split=_TARGET_CAP) -> DatasetSplits:
    """A target (or, with its own ``max_per_split``, source) dataset at the profile's resolution, RGB;
    by default each split is capped at the profile's ``max_per_split``."""
    return load_dataset(name, seed=seed, size=cfg["image_size"], channels=3,
                        max_per_split=cfg["max_per_split"] if max_per_split is _TARGET_CAP else max_per_split)


def _source_key(arch: str, dataset: str, cfg: Mapping, init_seed: int) -> dict:
    return {"chapter": CHAPTER, "version": VERSION, "arch": arch, "scale": cfg["scale"],
            "image_size": cfg["image_size"], "dataset": dataset, "init_seed": init_seed,
            "data_seed": cfg["source_data_seed"], "epochs": cfg["source_epochs"], "lr": cfg["source_lr"],
            "batch_size": cfg["source_batch_size"], "weight_decay": cfg["source_weight_decay"],
            "max_per_split": cfg["source_max_per_split"], "max_steps": cfg.get("max_steps")}


def _source_path(arch: str, dataset: str, cfg: Mapping, init_seed: int) -> Path:
    key = _source_key(arch, dataset, cfg, init_seed)
    return cache_root() / CHAPTER / "sources" / f"{arch}-{Path(str(dataset)).stem}-{config_key(key)}.safetensors"


def train_source(arch: str, dataset: str, cfg: Mapping, init_seed: int, verbose: bool = True) -> nn.Module:
    """A backbone trained from random initialisation ``init_seed`` on ``dataset`` (all of its
    layers), cached as safetensors keyed by the whole configuration; returns the backbone."""
    key = _source_key(arch, dataset, cfg, init_seed)
    path = _source_path(arch, dataset, cfg, init_seed)

    def train() -> tuple[dict, dict]:
        data = load_target(dataset, cfg["source_data_seed"], cfg, max_per_split=cfg["source_max_per_split"])
        seed_everything(init_seed)
        backbone = build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"])
        model = Classifier(backbone, data.num_classes)
        fit(model, data.train, _fit_config(cfg, "source"), seed=init_seed, desc=f"source {arch} on {data.name}")
        scores = evaluate(model, data.test)
        return backbone.state_dict(), {**key, "test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"],
                                       "classes": list(data.classes)}

    state, meta, cached = cached_state(path, train)
    backbone = build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"])
    backbone.load_state_dict(state)
    if verbose:
        how = "loaded from cache:" if cached else f"trained from random init (seed {init_seed}), cached at {path}:"
        print(f"{arch} source on {dataset} {how} test accuracy {meta.get('test_accuracy', float('nan')):.3f}, "
              f"macro F1 {meta.get('test_macro_f1', float('nan')):.3f}")
    return backbone


def source_backbone(spec: str, arch: str, cfg: Mapping, init_seed: int, verbose: bool = True) -> nn.Module:
    """``"book"``: the book's pretrained backbone of the profile; otherwise a dataset name/path on
    which a backbone is trained from random initialisation ``init_seed``."""
    if spec == "book":
        return book_backbone(arch, cfg["profile"], verbose=verbose)
    return train_source(arch, spec, cfg, init_seed, verbose=verbose)


def source_meta(spec: str, arch: str, cfg: Mapping, init_seed: int) -> dict:
    """What a source is, for tables (its training set and, where cached, its test scores)."""
    if spec == "book":
        return {"source": "book backbone", "trained on": "Fashion-MNIST + CIFAR-10 subset" if cfg["profile"] != "paper"
                else "ImageNet (published weights)"}
    meta = load_meta(_source_path(arch, spec, cfg, init_seed))
    return {"source": f"{spec} from random init (seed {init_seed})", "trained on": spec,
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


# ------------------------------------------------------------------------------- training

def new_classifier(backbone: nn.Module, num_classes: int, seed: int) -> Classifier:
    """A copy of ``backbone`` under a fresh linear head initialised from ``seed``."""
    backbone = copy.deepcopy(backbone)
    seed_everything(seed)
    return Classifier(backbone, num_classes)


def fine_tune(model: nn.Module, data: LabeledImages, cfg: Mapping, seed: int, desc: str = "fine-tune") -> nn.Module:
    """Every parameter trained (BatchNorm in train mode)."""
    for p in model.parameters():
        p.requires_grad_(True)
    fit(model, data, _fit_config(cfg, "ft"), seed=seed, desc=desc)
    return model.eval()


def linear_probe(model: Classifier, data: LabeledImages, cfg: Mapping, seed: int, desc: str = "linear probe") -> Classifier:
    """Backbone frozen: BN statistics recomputed on ``data``, then only the head trained (BN in
    eval mode)."""
    recompute_bn(model, data)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    fit(model, data, _fit_config(cfg, "lp"), seed=seed, desc=desc, train_mode=lambda m: m.eval())
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def kernel_merge_probe(backbone_a: nn.Module, backbone_b: nn.Module, num_classes: int, data: LabeledImages,
                       cfg: Mapping, seed: int, *, init: float = 0.5, parametrisation: str = "direct",
                       learn_w: bool = True, desc: str = "MedMerge probe") -> tuple[Classifier, dict[str, torch.Tensor]]:
    """MedMerge's linear probe: every convolution ``w * W_a + (1 - w) * W_b`` with learnable
    per-kernel ``w`` (frozen kernels), a new linear head; head and ``w`` trained on ``data``,
    BatchNorm in train mode with frozen affine parameters from ``backbone_a``. Returns the
    collapsed plain network (BN statistics recomputed on ``data``) and the learned ``w`` per layer."""
    merged = wrap_kernel_merge(backbone_a, backbone_b, init=init, parametrisation=parametrisation,
                               other_params=cfg.get("other_params", "a"))
    seed_everything(seed)
    model = Classifier(merged, num_classes)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters())}]
    if learn_w:
        groups.append({"params": [p for n, p in model.named_parameters() if n.endswith("w_raw")], "lr": cfg["w_lr"]})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    fit(model, data, _fit_config(cfg, "lp"), seed=seed, params=groups, desc=desc)
    weights = kernel_weights(model)
    plain = collapse_kernel_merge(model)
    for p in plain.parameters():
        p.requires_grad_(True)
    recompute_bn(plain, data)
    return plain, weights


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, ordinal: bool = False) -> dict[str, float]:
    """Accuracy, macro F1 (``cmm_utils.core.metrics``) and, for ordinal grading, quadratic kappa."""
    pred = predict(model, data).argmax(1).numpy()
    y = data.labels.numpy()
    out = {"accuracy": float((pred == y).mean()), "macro_f1": macro_f1(y, pred)}
    out["kappa"] = quadratic_kappa(y, pred) if ordinal else float("nan")
    return out


def merge_models(method: str, model_a: Classifier, model_b: Classifier, data: LabeledImages, cfg: Mapping,
                 seed: int) -> Classifier:
    """A merge of two target-trained networks of the same architecture (different initialisations),
    BN statistics recomputed on ``data`` afterwards: ``average`` (unit by unit), ``permutation``
    (Git Re-Basin weight matching), ``permutation_act`` (activation matching, the authors'
    ``match_tensors_permute``) or ``zipit`` (ZipIt!, r = 0.5)."""
    if method not in MERGES:
        raise ValueError(f"unknown merge {method!r}; valid: {', '.join(MERGES)}")
    a, b = model_a.state_dict(), model_b.state_dict()
    spec = alignment.permutation_spec(model_a)
    if method == "average":
        state = merge.linear_interpolation(a, b, 0.5)
    elif method == "permutation":
        perms = alignment.weight_matching(spec, a, b, max_iter=cfg["wm_iters"], seed=seed)
        state = alignment.permute_average(spec, a, b, perms)
    else:
        images = data.images[:cfg["match_images"]]
        cov = alignment.feature_covariance(model_a, model_b, spec, images)
        kw = {"alpha": cfg["zipit_alpha"], "beta": cfg["zipit_beta"]} if method == "zipit" else {}
        mats = alignment.match_features(spec, cov, "zipit" if method == "zipit" else "permute", **kw)
        state = alignment.zip_merge(spec, a, b, mats)
    out = copy.deepcopy(model_a)
    out.load_state_dict(state)
    return recompute_bn(out, data)


# ------------------------------------------------------------------------------- experiments

def _run_key(cfg: Mapping, arch: str, medical: str, target: str, seed: int, **extra) -> dict:
    keys = ("scale", "image_size", "max_per_split", "natural_source", "lp_epochs", "lp_lr", "w_lr", "ft_epochs",
            "ft_lr", "batch_size", "optimizer_lp", "optimizer_ft", "weight_decay", "other_params", "max_steps")
    key = {k: cfg.get(k) for k in keys}
    if cfg["natural_source"] == "book":  # the book's pretraining recipe of the profile
        natural = {"book": cfg["profile"], **({k: v for k, v in vars(PRETRAIN[cfg["profile"]]).items()}
                                              if cfg["profile"] in PRETRAIN else {})}
    else:
        natural = _source_key(arch, cfg["natural_source"], cfg, 0)
    key.update(chapter=CHAPTER, version=VERSION, profile=cfg["profile"], arch=arch, target=str(target), seed=seed,
               natural=natural, medical=_source_key(arch, medical, cfg, cfg["source_init_seed"]))
    key.update(extra)
    return key


def _cached_model(key: Mapping, template: nn.Module, build, extra_tensors: str | None = None):
    """Load the state keyed by ``key`` into ``template`` or build, save and return it (resumable).
    ``build`` returns a model, or ``(model, tensors)`` when ``extra_tensors`` names what to keep."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", str(key["method"])).strip("-")
    path = cache_root() / CHAPTER / "runs" / f"{slug}-{config_key(dict(key))}.safetensors"
    side = path.with_name(path.stem + "-extra.safetensors")
    if path.exists() and (extra_tensors is None or side.exists()):
        template.load_state_dict(load_state(path))
        return (template.eval(), load_state(side)) if extra_tensors else template.eval()
    built = build()
    model, tensors = built if extra_tensors else (built, None)
    if extra_tensors:
        save_state(side, tensors)
    save_state(path, model.state_dict(), dict(key))
    return (model.eval(), tensors) if extra_tensors else model.eval()


def _layer_rows(weights: Mapping[str, torch.Tensor], **tags) -> list[dict]:
    return [{**tags, "depth": i, "layer": name, "mean_w": float(w.mean()), "std_w": float(w.std()) if w.numel() > 1 else 0.0,
             "kernels": int(w.numel())} for i, (name, w) in enumerate(weights.items())]


def run_experiment(arch: str, medical: str, target: str, seed: int, cfg: Mapping, *,
                   ablations: Sequence[tuple] = (), keep_states: bool = False, verbose: bool = True) -> dict:
    """Every method of the chapter on one (backbone, medical source, target, seed).

    Returns ``{"results": [rows], "weights": [rows], "states": {method: model}}``: one result row
    per method (accuracy, macro F1, kappa on the target's test split), per-layer mean kernel
    weights of MedMerge, of merging with zeros and of each ablation, and (``keep_states``) the
    trained networks for the loss-surface planes. Every trained network is cached (resumable).
    """
    data = load_target(target, seed, cfg)
    ordinal = data.meta.get("task") == "ordinal"
    n = data.num_classes
    natural = source_backbone(cfg["natural_source"], arch, cfg, 0, verbose=verbose)
    medical_bb = source_backbone(medical, arch, cfg, cfg["source_init_seed"], verbose=verbose)
    template = lambda: Classifier(build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"]), n)
    tags = {"arch": arch, "medical": str(medical), "target": data.name, "seed": seed}
    rows, wrows, states = [], [], {}

    def record(method, model, stage):
        rows.append({**tags, "method": method, "stage": stage, **evaluate(model, data.test, ordinal)})
        if keep_states:
            states[method] = model

    key = lambda method, **kw: _run_key(cfg, arch, medical, target, seed, method=method, **kw)
    sources = {"natural": natural, "medical": medical_bb}
    ft = {}
    for name, bb in sources.items():
        ft[name] = _cached_model(key(f"ft_{name}"), template(), lambda: fine_tune(
            new_classifier(bb, n, seed), data.train, cfg, seed, desc=f"FT from {name}"))
        record(f"ft_{name}", ft[name], "final")
        lp = _cached_model(key(f"lp_{name}"), template(), lambda: linear_probe(
            new_classifier(bb, n, seed), data.train, cfg, seed, desc=f"LP on {name}"))
        record(f"lp_{name}", lp, "probe")
        lpft = _cached_model(key(f"lpft_{name}"), template(), lambda: fine_tune(
            copy.deepcopy(lp), data.train, cfg, seed, desc=f"LP-FT from {name}"))
        record(f"lpft_{name}", lpft, "final")
    for method in cfg["merges"]:
        record(method, merge_models(method, ft["natural"], ft["medical"], data.train, cfg, seed), "final")

    main = ("main", cfg["init"], cfg["parametrisation"], True)
    variants = [("medmerge", main, medical_bb), ("zeros", main, zero_convolutions(natural))]
    variants += [(f"ablation:{v[0]}", v, medical_bb) for v in ablations]
    for method, (vname, init, param, learn), second in variants:
        probe_key = key(f"{method}_lp", init=init, parametrisation=param, learn_w=learn)
        probed, w = _cached_model(probe_key, template(), lambda: kernel_merge_probe(
            natural, second, n, data.train, cfg, seed, init=init, parametrisation=param, learn_w=learn,
            desc=f"probe {method}"), extra_tensors="w")
        final = _cached_model(key(method, init=init, parametrisation=param, learn_w=learn), template(),
                              lambda: fine_tune(copy.deepcopy(probed), data.train, cfg, seed, desc=f"FT {method}"))
        if method.startswith("ablation:"):
            for stage, model in (("probe", probed), ("final", final)):
                rows.append({**tags, "method": method, "stage": stage, "variant": vname,
                             **evaluate(model, data.test, ordinal)})
        else:
            record(f"{method}_lp", probed, "probe")
            record(method, final, "final")
        wrows += _layer_rows(w, **tags, variant=method)
    return {"results": rows, "weights": wrows, "states": states}


def plane_states(states: Mapping[str, nn.Module], merges: Iterable[str]) -> dict[str, list]:
    """The three networks of each plane: ``[w0, w1, w2]`` = [FT from the natural source, the merged
    network, FT from the medical source] (Garipov's order: w0 at the origin, w2 on the first axis)."""
    return {m: [states["ft_natural"].state_dict(), states[m].state_dict(), states["ft_medical"].state_dict()]
            for m in merges}


def compute_plane(arch: str, target: str, seed: int, cfg: Mapping, states: Mapping[str, nn.Module],
                  merge_name: str) -> dict[str, np.ndarray]:
    """The loss surface on the plane through FT(natural), ``merge_name`` and FT(medical); BN
    recomputed at every point on ``plane_images`` training images, on which the train error is
    also measured; test error on up to ``plane_images`` test images."""
    data = load_target(target, seed, cfg)
    k = cfg["plane_images"]
    gen = torch.Generator().manual_seed(seed)
    train = data.train.subset(torch.randperm(len(data.train), generator=gen)[:k].sort().values)
    test = data.test.subset(torch.arange(min(k, len(data.test))))
    model = Classifier(build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"]), data.num_classes)
    three = plane_states(states, [merge_name])[merge_name]
    return plane_grid(model, three, train, train, test, grid=cfg["plane_grid"], margin=cfg["plane_margin"],
                      desc=f"plane {merge_name}")


# ------------------------------------------------------------------------------- tables and claims

def summary_table(results: pd.DataFrame, metrics: Sequence[str] = ("macro_f1", "accuracy", "kappa")) -> pd.DataFrame:
    """Mean and std over seeds of each metric per (arch, target, method), in % (kappa x 100)."""
    main = results[~results["method"].str.startswith("ablation:")]
    g = main.groupby(["arch", "target", "method"], sort=False)
    out = g[list(metrics)].agg(["mean", "std"]) * 100
    out.columns = [f"{m} {s}" for m, s in out.columns]
    out["seeds"] = g.size()
    return out.reset_index()


def gaps(results: pd.DataFrame, method: str, baselines: Sequence[str], metric: str = "macro_f1") -> pd.DataFrame:
    """Per (arch, target): ``method`` minus the *best* of ``baselines`` (best by mean over seeds),
    in points; paired per seed, with the std over seeds of the paired difference."""
    rows = []
    for (arch, target), grp in results.groupby(["arch", "target"], sort=False):
        piv = grp.pivot_table(index="seed", columns="method", values=metric)
        have = [b for b in baselines if b in piv]
        if method not in piv or not have:
            continue
        best = max(have, key=lambda b: piv[b].mean())
        diff = (piv[method] - piv[best]) * 100
        rows.append({"arch": arch, "target": target, "best baseline": METHOD_LABELS.get(best, best),
                     f"{method} {metric}": piv[method].mean() * 100, f"baseline {metric}": piv[best].mean() * 100,
                     "gap (points)": diff.mean(), "gap std": diff.std(ddof=1) if len(diff) > 1 else float("nan"),
                     "seeds won": int((diff > 0).sum()), "seeds": int(len(diff))})
    return pd.DataFrame(rows)


def judge(gap_table: pd.DataFrame) -> bool | None:
    """True when the mean gap is positive in every experiment and, pooled over experiments, more
    seeds are won than lost; False when the mean gap is <= 0 in every experiment; else None (also
    with fewer than two seeds per experiment: one seed supports nothing)."""
    if gap_table.empty or gap_table["seeds"].min() < 2:
        return None
    g = gap_table["gap (points)"]
    if (g > 0).all() and gap_table["seeds won"].sum() > gap_table["seeds"].sum() / 2:
        return True
    if (g <= 0).all():
        return False
    return None
