"""MagMax (Marczak, Twardowski, Trzciński, Cygert, ECCV 2024, arXiv:2407.06322), as plain functions.

The method (paper Sec. 3; authors' code github.com/danielm1405/magmax, research note
``magmax_cmm_code.md`` §2):

1. **Fine-tune** the pretrained model on each task in turn. *Sequential* (the method): task ``t``
   starts from the model after task ``t-1``, so the task vector ``τ_t = θ_t − θ_0`` is cumulative
   (it holds the updates of tasks ``1..t``). *Independent* (the ablation): every task starts from
   ``θ_0``. Per task: a fresh AdamW (lr 1e-5, weight decay 0.1), batch 128, a linear warm-up of 500
   *steps* restarted per task then cosine, gradient-norm clipping 1.0, cross-entropy over the
   current task's classes only (task-local softmax through a frozen zero-shot CLIP head).
2. **Merge** the task vectors and apply ``θ = θ_0 + λ·τ_merged`` (:mod:`cmm_utils.merging.kernels`):
   MagMax (per parameter the signed value of largest magnitude, ties to the later task, λ = 0.5),
   random selection (λ = 1), averaging (sum with λ = 1/T), TIES (top 20 %, mass sign, disjoint
   mean, λ = 0.55), task arithmetic (sum, λ chosen on validation data, Ilharco et al. 2023).
3. **Evaluate** task-agnostically: top-1 over all classes with the full head, on the full test
   set, after merging all ``T`` task vectors (and, for the curves, ``τ_1..τ_t`` after task ``t``,
   as the authors' commented ``evaluate_merged_fts``), with :func:`cmm_utils.core.continual.evaluate_after_task`
   (the last row from one pass over the test logits with the same masking, which also gives the
   mean class recall that skewed medical data need beside accuracy).

Deliberate deviations from the authors' code (each said again where it happens):

- **Head** (``cpu``/``smoke``): the book's ResNet-18 has no text tower, so CLIP's zero-shot head
  (class-name prompts → text embeddings, normalised, averaged, normalised, × logit scale 100) is
  replaced by a *fixed, data-free* head of the same form: one unit vector per class (the rows of a
  seeded random orthonormal matrix, Hoffer et al. 2018 "Fix your classifier"), times a logit
  scale, on L2-normalised features. Like CLIP's head it is frozen, built without images, covers
  all classes of the scenario from the start, and is identical for every merge, regime and the
  joint model, so only the backbone is merged. Unlike CLIP's it carries no prior knowledge of the
  classes (the pretrained model scores at chance) and the class vectors are mutually orthogonal
  rather than semantically arranged. ``paper`` builds CLIP's head exactly. Since issue 12 the
  ``cpu`` default is ``head="prototype"`` (:func:`prototype_head_weight`: θ_0's class means,
  which, like CLIP's head, already classify at θ_0); the random fixed head is the ablation.
- **BatchNorm** (ResNet-18; CLIP's ViT has none): weights are merged as the paper says, but the
  running means/variances are set to the *average* of the fine-tuned models' statistics for every
  merge and λ (``bn_stats="average"``). They are measurements of the data, not directions in weight
  space: scaled by λ < 1 toward θ_0 they would mix in the statistics of the pretraining images.
  FusionBench's policy (statistics merged and scaled like weights, ``bn_stats="merge"``) is kept as
  an option and shown beside ours on the page; ``num_batches_tracked`` comes from ``θ_0``.
- **Task arithmetic's λ** is chosen as ``k/T`` with ``k`` on the authors' sum grid ``(0, 2]``
  on validation data; the curves use ``k/t`` after task ``t`` (``k = 1`` is averaging).
- **Schedule** (``cpu``/``smoke``): the recipe is scaled to 28 px data: lr, steps per task
  (``epochs`` with a floor ``min_steps`` and a cap ``max_steps``) and a warm-up of a few steps.
  ``paper`` keeps the authors' 500-step warm-up, which most of their CIL tasks never leave.
- **Random selection** draws its mask with a seeded reservoir rule (see
  :func:`cmm_utils.merging.kernels.random_select`): the same distribution, not the authors' bits.
- **TIES** trims the image tower's task vector only; the authors' flattened vector also holds the
  all-zero text tower (~40 % of CLIP), so their "top 20 %" keeps ~35 % of the visual entries.
- **Dataset-incremental** (``medical-dil``): the book's sequence has disjoint label sets (retina,
  skin, pathology), so the task-local softmax covers one dataset's classes; in the authors' DIL
  (ImageNet-R, DomainNet domains) every task has all classes and the softmax covers them all. The
  rule is the same (the current task's classes), which ``imagenet-r-dil`` (``paper``) reproduces.
- **TIES**' global top-20 % threshold also sees the BatchNorm statistics' entries (0.2 % of the
  ResNet-18 vector); with ``bn_stats="average"`` their merged values are then replaced.
- **Joint training** (upper bound) trains once on all tasks with the full softmax, for as many
  steps as the sequential run; its ``R`` rows before the last reuse that model (it saw every task).
- ``paper`` loads CIFAR-100 at 32 px and upsamples to 224 px inside the encoder (the authors'
  ``Resize(224, bicubic)``); it trains on 90 % of the training set (10 % is the validation split
  the λ sweep reads; the authors swept λ on test) and uses no augmentation (the authors:
  ``RandomResizedCrop(scale=(0.9, 1))``).

This module holds the method's functions (fine-tune, merge through the registry, apply with λ
and the BatchNorm policy, the λ grids). Beside it: the profiles (:mod:`~cmm_utils.papers.magmax.profiles`),
one run with its checkpoints and cache (:mod:`~cmm_utils.papers.magmax.experiment`), the chapter's
tables (:mod:`~cmm_utils.papers.magmax.chapter`), the claims (:mod:`~cmm_utils.papers.magmax.claims`),
the benchmarks (:mod:`~cmm_utils.papers.magmax.data`) and the task-vector analyses
(:mod:`~cmm_utils.papers.magmax.analysis`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cmm_utils import merging
from cmm_utils.core.data import LabeledImages, Scenario
from cmm_utils.core.models import book_backbone
from cmm_utils.core.models.clip import IMAGENET_TEMPLATES, ClipImageEncoder, clip_model, zeroshot_weight
from cmm_utils.core.models.heads import HEADS, FrozenHead, HeadedModel, class_prototypes, fixed_head_weight
from cmm_utils.core.train import FitConfig, fit
from cmm_utils.papers.magmax.data import TEMPLATES

MERGES = ("average", "task-arithmetic", "ties", "random", "magmax")
REGIMES = ("sequential", "independent")
BASELINES = ("seq-ft", "joint", "pretrained")
METHODS = BASELINES + MERGES + tuple(f"{m}-ind" for m in MERGES)

# The authors' fixed scaling factors (merge_splitted.py); averaging is the sum with λ = 1/T and
# task arithmetic has no fixed λ in the code (chosen on validation data here, as Ilharco et al.).
PAPER_LAMBDA = {"magmax": 0.5, "random": 1.0, "ties": 0.55, "average": None, "task-arithmetic": None}
# The authors' commented λ sweeps (merge_*.py): (low, high) of linspace(low, high, n + 1)[1:];
# the sum's grid is (0, 2/T], written here as the multiplier k of 1/T.
LAMBDA_GRID = {"magmax": (0.0, 1.0), "random": (0.5, 1.5), "ties": (0.5, 1.5), "task-arithmetic": (0.0, 2.0)}
SWEPT = ("magmax", "random", "ties", "task-arithmetic")
BN_STATS = ("average", "merge")
MAGMAX_HEADS = HEADS + ("prototype",)  # prototype: θ_0's class means (:func:`prototype_head_weight`)  # the BatchNorm statistics policies of :func:`apply_merged`


def fixed_lambda(merge: str, settings: Mapping) -> float | None:
    """The fixed λ of a merge in ``settings`` (``lambda_<merge>``; defaults: the paper's), ``None``
    for averaging (1/T) and task arithmetic (chosen on validation data)."""
    return settings.get(f"lambda_{merge}", PAPER_LAMBDA.get(merge)) if merge in ("magmax", "random", "ties") else None


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ``ValueError`` naming the valid ones."""
    known = method in METHODS
    if known:
        return method
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def parse_method(method: str) -> tuple[str, str]:
    """``"magmax-ind"`` → ``("magmax", "independent")``; baselines keep their name, regime sequential."""
    check_method(method)
    if method.endswith("-ind"):
        return method[:-4], "independent"
    return method, "sequential"


# ----------------------------------------------------------------------------------- models
def build_backbone_and_head(settings: Mapping, profile: str, scenario: Scenario, templates: Sequence[str] | None = None,
                            pretrained: str | None = "openai") -> tuple[nn.Module, FrozenHead]:
    """The pretrained backbone θ_0 and the frozen head over all classes of ``scenario``."""
    if settings["head"] == "clip":
        model, tokenizer = clip_model(settings["backbone"], pretrained=pretrained)
        weight = zeroshot_weight(model, tokenizer, scenario.class_names,
                                 templates or TEMPLATES.get(scenario.name, IMAGENET_TEMPLATES))
        encoder = ClipImageEncoder(model.visual)
        del model  # the text tower is only needed for the head
        return encoder, FrozenHead(weight)
    if settings["head"] not in MAGMAX_HEADS:
        raise ValueError(f"unknown head {settings['head']!r}; valid: {', '.join(MAGMAX_HEADS)}")
    backbone = book_backbone(settings["backbone"], profile, verbose=False)
    if settings["head"] == "prototype":
        return backbone, FrozenHead(prototype_head_weight(backbone, scenario, float(settings["head_scale"])))
    return backbone, FrozenHead(fixed_head_weight(scenario.num_classes, backbone.num_features,
                                                  float(settings["head_scale"])))


@torch.no_grad()
def prototype_head_weight(backbone: nn.Module, scenario: Scenario, scale: float, batch_size: int = 512) -> torch.Tensor:
    """The ``cpu`` stand-in for CLIP's zero-shot head (issue 12): row ``c`` is the normalised mean of
    θ_0's features over the training images of class ``c`` (those of the task that brings ``c``),
    times ``scale``. Like CLIP's head it is frozen, the same for every merge, and already works at
    θ_0. Built for all tasks at once: the pinned protocol masks classes not seen yet and training
    uses the current task's classes only, so no row is used before its task arrives."""
    was_training = backbone.training
    rows = torch.zeros(scenario.num_classes, int(backbone.num_features))
    for task in scenario.tasks:
        rows[list(task.classes)] = class_prototypes(backbone, task.train, task.classes, batch_size)
    backbone.train(was_training)
    return torch.nn.functional.normalize(rows, dim=1) * scale


# ----------------------------------------------------------------------------------- training
def task_steps(n: int, settings: Mapping) -> int:
    """Optimiser steps for ``n`` images: ``epochs`` passes, at least ``min_steps``, at most ``max_steps``."""
    steps = max(int(settings["epochs"]) * math.ceil(n / int(settings["batch_size"])), int(settings["min_steps"] or 0))
    return min(steps, int(settings["max_steps"])) if settings.get("max_steps") else steps


def fit_config(n: int, settings: Mapping, steps: int | None = None) -> FitConfig:
    """The authors' recipe (AdamW, wd, warm-up in steps restarted per task then cosine, clip) for a task."""
    steps = steps or task_steps(n, settings)
    per_epoch = max(1, math.ceil(n / int(settings["batch_size"])))
    return FitConfig(epochs=math.ceil(steps / per_epoch), lr=float(settings["lr"]),
                     batch_size=int(settings["batch_size"]),
                     optimizer=settings["optimizer"], weight_decay=float(settings["weight_decay"]),
                     schedule=settings["schedule"], warmup_steps=int(settings["warmup_steps"]),
                     clip_grad=settings["clip_grad"], augment=bool(settings["augment"]), max_steps=steps)


def finetune(model: HeadedModel, data: LabeledImages, loss_fn: Callable, settings: Mapping, seed: int,
             steps: int | None = None, desc: str = "fine-tune") -> dict:
    """Fine-tune the whole backbone (head frozen, BatchNorm in training mode); returns timing meta."""
    cfg = fit_config(len(data), settings, steps)
    start = time.time()
    res = fit(model, data, cfg, seed=seed, params=model.backbone.parameters(), loss_fn=loss_fn, desc=desc)
    return {"seconds": time.time() - start, "steps": res.steps, "last_loss": res.losses[-1] if res.losses else None}


# ----------------------------------------------------------------------------------- merging
def merge_task_vectors(method: str, task_vectors: Sequence[Mapping[str, torch.Tensor]], seed: int = 0) -> dict:
    """The merged task vector of ``method`` through the merge registry, with the papers' defaults
    (λ applied separately): MagMax, random (seeded), TIES (top 20 %), averaging (mean) or task
    arithmetic (plain sum; λ scales it)."""
    if method not in MERGES:
        raise ValueError(f"unknown merge {method!r}; valid: {', '.join(MERGES)}")
    if method == "random":
        return merging.merge("random", task_vectors, seed=seed)
    return merging.merge(method, list(task_vectors) if method == "ties" else task_vectors)


def apply_merged(base: Mapping[str, torch.Tensor], merged_tv: Mapping[str, torch.Tensor], lam: float,
                 stats_tv: Mapping[str, torch.Tensor] | None = None) -> dict:
    """``θ_0 + λ·τ`` (:func:`cmm_utils.merging.kernels.apply`) with the BatchNorm policy.

    ``stats_tv=None`` (FusionBench's policy, ``bn_stats="merge"``): running means/variances are
    merged and scaled like weights; a variance that falls below 0 is clamped to 0. Otherwise
    (``bn_stats="average"``, the book's default) they are ``θ_0 + stats_tv`` with ``stats_tv`` the
    mean of the task vectors: the average of the fine-tuned models' statistics, whatever the merge
    and λ. Running statistics are measurements of the data, not directions in weight space, and λ
    scaled toward θ_0 would mix the pretraining data's statistics into the medical ones.
    """
    out = merging.apply(base, merged_tv, lam)
    for k, v in out.items():
        if merging.bn_statistic(k):
            if stats_tv is not None:
                out[k] = (base[k].double() + stats_tv[k].double()).to(v.dtype)
            if k.endswith("running_var"):
                out[k].clamp_(min=0.0)
    return out


def step_lambda(method: str, lam: float | None, t: int) -> float:
    """λ used after task ``t`` (0-based) for the merge of ``τ_1..τ_{t+1}``: the paper's fixed λ;
    averaging's mean is already divided; task arithmetic's ``k`` becomes ``k/(t+1)``."""
    if method == "average":
        return 1.0
    if method == "task-arithmetic":
        return float(lam) / (t + 1)
    return float(lam)


def lambda_grid(method: str, points: int, fixed: float | None = None) -> list[float]:
    """The authors' sweep grid (``linspace(lo, hi, points+1)[1:]``) plus the fixed λ; for task
    arithmetic the values are multipliers ``k`` of 1/T (``k = 1`` is averaging)."""
    lo, hi = LAMBDA_GRID[method]
    grid = set(np.round(np.linspace(lo, hi, points + 1)[1:], 6).tolist())
    grid.add(float(fixed if fixed is not None else (PAPER_LAMBDA.get(method) or 1.0)))
    return sorted(grid)
