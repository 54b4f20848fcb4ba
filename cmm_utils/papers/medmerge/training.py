"""Training on the target: fine-tuning, linear probing, MedMerge's probe of the kernel-weight merge,
the merges of two fine-tuned models (the authors' baselines) and the scores.

MedMerge (Almakky et al. 2024): the per-kernel weights ``w`` of ``theta_hat_j = w_j theta^(a)_j +
(1 - w_j) theta^(b)_j`` are learned during *linear probing* (convolutions frozen, the head and
``w`` trained, :func:`kernel_merge_probe`); the collapsed network is then fine-tuned
(:func:`fine_tune`). Choices where the paper is silent are listed in
:mod:`cmm_utils.papers.medmerge.method`.
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

from cmm_utils import merging
from cmm_utils.core import train as core_train
from cmm_utils.core.data import LabeledImages
from cmm_utils.core.metrics import macro_f1, mean_class_recall, quadratic_kappa
from cmm_utils.core.models import Classifier
from cmm_utils.core.train import FitConfig, fit, predict, seed_everything
from cmm_utils.papers.medmerge import alignment
from cmm_utils.papers.medmerge.kernel_merge import collapse_kernel_merge, kernel_weights, tie_merge_weights, \
    wrap_kernel_merge
from cmm_utils.papers.medmerge.landscape import recompute_bn
from cmm_utils.papers.medmerge.permutation_specs import permutation_spec
from cmm_utils.papers.medmerge.profiles import MERGES


def on_device(model: nn.Module) -> nn.Module:
    """``model`` (in place) on the book's device, ``core.train.device()`` (CUDA when there is one).
    ``fit`` and ``predict`` run where the model's parameters are, so every network MedMerge builds or
    loads goes through here before it is trained, merged or scored."""
    return model.to(core_train.device())


def fit_config(cfg: Mapping, stage: str) -> FitConfig:
    """The optimiser settings of a stage: ``source`` (the medical source), ``lp`` (probing) or ``ft``."""
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


def w_learning_rate(cfg: Mapping, n_train: int) -> float:
    """The learning rate of the kernel weights ``w`` for a probe on ``n_train`` images. ``w_lr`` was
    tuned (``cpu`` profile) for ``w_lr_steps`` = 48 probe steps; Adam moves each ``w`` by about the
    learning rate per step, so a probe of ``S`` steps could drift ``S / 48`` times as far, which
    the unconstrained (direct) ``w`` does not survive. Where the profile sets ``w_lr_steps``
    (``paper``: ~5,700 steps on ISIC-2019) the rate is scaled by ``min(1, w_lr_steps / S)``, keeping
    the largest total drift the tuned one; without it (``cpu``, ``smoke``) ``w_lr`` is used as is.
    The paper's own schedule is unknown: this rule is ours."""
    ref = cfg.get("w_lr_steps")
    if ref is None:
        return float(cfg["w_lr"])
    steps = math.ceil(n_train / cfg["batch_size"]) * cfg["lp_epochs"]
    if cfg.get("max_steps") is not None:
        steps = min(steps, cfg["max_steps"])
    return float(cfg["w_lr"]) * min(1.0, ref / max(1, steps))


def new_classifier(backbone: nn.Module, num_classes: int, seed: int) -> Classifier:
    """A copy of ``backbone`` under a fresh linear head initialised from ``seed``."""
    backbone = copy.deepcopy(backbone)
    seed_everything(seed)
    return on_device(Classifier(backbone, num_classes))


def fine_tune(model: nn.Module, data: LabeledImages, cfg: Mapping, seed: int, desc: str = "fine-tune") -> nn.Module:
    """Every parameter trained (BatchNorm in train mode)."""
    model = on_device(model)
    for p in model.parameters():
        p.requires_grad_(True)
    fit(model, data, fit_config(cfg, "ft"), seed=seed, desc=desc)
    return model.eval()


def linear_probe(model: Classifier, data: LabeledImages, cfg: Mapping, seed: int, desc: str = "linear probe") -> Classifier:
    """Backbone frozen: BN statistics recomputed on ``data``, then only the head trained (BN in
    eval mode)."""
    model = on_device(model)
    recompute_bn(model, data)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    fit(model, data, fit_config(cfg, "lp"), seed=seed, desc=desc, train_mode=lambda m: m.eval())
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def kernel_merge_probe(backbone_a: nn.Module, backbone_b: nn.Module, num_classes: int, data: LabeledImages,
                       cfg: Mapping, seed: int, *, init: float = 0.5, parametrisation: str = "direct",
                       learn_w: bool = True, granularity: str = "kernel",
                       desc: str = "MedMerge probe") -> tuple[Classifier, dict[str, torch.Tensor]]:
    """MedMerge's linear probe: every convolution ``w * W_a + (1 - w) * W_b`` with learnable
    per-kernel ``w`` (frozen kernels), a new linear head; head and ``w`` trained on ``data``,
    BatchNorm in train mode with frozen affine parameters from ``backbone_a``. Returns the
    collapsed plain network (BN statistics recomputed on ``data``) and the learned ``w`` per layer."""
    merged = wrap_kernel_merge(on_device(backbone_a), on_device(backbone_b), init=init,
                               parametrisation=parametrisation, other_params=cfg.get("other_params", "a"))
    tie_merge_weights(merged, granularity)  # "layer" / "global": the regime's controls; "kernel": MedMerge
    seed_everything(seed)
    model = on_device(Classifier(merged, num_classes))
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters())}]
    if learn_w:
        groups.append({"params": [p for n, p in model.named_parameters() if n.endswith("w_raw")],
                       "lr": w_learning_rate(cfg, len(data))})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    fit(model, data, fit_config(cfg, "lp"), seed=seed, params=groups, desc=desc)
    weights = kernel_weights(model)
    plain = on_device(collapse_kernel_merge(model))
    for p in plain.parameters():
        p.requires_grad_(True)
    recompute_bn(plain, data)
    return plain, weights


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, ordinal: bool = False, recall: bool = False) -> dict[str, float]:
    """Accuracy, macro F1 (``cmm_utils.core.metrics``) and, for ordinal grading, quadratic kappa;
    with ``recall`` also the mean class recall (the book's leaderboard metric)."""
    pred = predict(on_device(model), data).argmax(1).numpy()
    y = data.labels.numpy()
    out = {"accuracy": float((pred == y).mean()), "macro_f1": macro_f1(y, pred)}
    out["kappa"] = quadratic_kappa(y, pred) if ordinal else float("nan")
    if recall:
        out["mean_class_recall"] = mean_class_recall(y, pred)
    return out


def merge_models(method: str, model_a: Classifier, model_b: Classifier, data: LabeledImages, cfg: Mapping,
                 seed: int) -> Classifier:
    """A merge of two target-trained networks of the same architecture (different initialisations),
    BN statistics recomputed on ``data`` afterwards: ``average`` (unit by unit), ``permutation``
    (Git Re-Basin weight matching), ``permutation_act`` (activation matching, the authors'
    ``match_tensors_permute``) or ``zipit`` (ZipIt!, r = 0.5)."""
    if method not in MERGES:
        raise ValueError(f"unknown merge {method!r}; valid: {', '.join(MERGES)}")
    # the matching and zipping arithmetic runs on the CPU (SciPy's assignment, float64 blocks);
    # the feature covariances are computed where the models are
    a = {k: v.cpu() for k, v in model_a.state_dict().items()}
    b = {k: v.cpu() for k, v in model_b.state_dict().items()}
    spec = permutation_spec(model_a)
    if method == "average":
        state = merging.linear_interpolation(a, b, 0.5)
    elif method == "permutation":
        perms = alignment.weight_matching(spec, a, b, max_iter=cfg["wm_iters"], seed=seed)
        state = alignment.permute_average(spec, a, b, perms)
    else:
        images = data.images[:cfg["match_images"]]
        cov = alignment.feature_covariance(on_device(model_a), on_device(model_b), spec, images)
        kw = {"alpha": cfg["zipit_alpha"], "beta": cfg["zipit_beta"]} if method == "zipit" else {}
        mats = alignment.match_features(spec, cov, "zipit" if method == "zipit" else "permute", **kw)
        state = alignment.zip_merge(spec, a, b, mats)
    out = on_device(copy.deepcopy(model_a))
    out.load_state_dict(state)
    return recompute_bn(out, data)
