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
  rather than semantically arranged. ``paper`` builds CLIP's head exactly.
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

The benchmarks (the authors' class orders, domains, prompt templates and the scenarios) are in
:mod:`cmm_utils.papers.magmax.data`, the task-vector analyses in :mod:`cmm_utils.papers.magmax.analysis`; their
names stay importable from here.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.papers.magmax import data as magmax_data
from cmm_utils import merging
from cmm_utils.merging import kernels as mg
from cmm_utils.core.benchmarks import BACKBONE, BENCHMARKS, SMOKE_MAX_PER_SPLIT
from cmm_utils.core.continual import (ContinualResult, cached_run, evaluate_after_task, evaluate_seen_tasks, gflops_per_image,
                                      scenario_fingerprint, score_seen_tasks, state_bytes, task_local_loss)
from cmm_utils.core.data import LabeledImages, Scenario, make_split
from cmm_utils.core.io import cache_root, config_key, load_meta, load_state, save_state, write_json
from cmm_utils.papers.magmax.analysis import _param_keys, selection_share, sign_agreement
from cmm_utils.papers.magmax.data import (CHAPTER, CIFAR100_CLASS_ORDER, CLASS_ORDERS, IMAGENET_R_CLASS_ORDER,
                                          IMAGENET_R_DOMAIN_ORDER, IMAGENET_R_DOMAINS, TEMPLATES, benchmark_name, domain_incremental,
                                          load_imagenet_r)
from cmm_utils.core.models import book_backbone
from cmm_utils.core.models.heads import HEADS, FrozenHead, HeadedModel, fixed_head_weight
from cmm_utils.core.models.clip import CIFAR100_TEMPLATES, IMAGENET_TEMPLATES, ClipImageEncoder, clip_model, zeroshot_weight
from cmm_utils.core.profiles import check_profile
from cmm_utils.core.train import FitConfig, device, fit, predict, seed_everything

__all__ = [
    # the method and its run (this module)
    "VERSION", "MERGES", "REGIMES", "BASELINES", "METHODS", "PAPER_LAMBDA", "LAMBDA_GRID", "SWEPT", "PAPER_CLAIMS",
    "PROFILES", "FT_KEYS", "RUN_KEYS", "fixed_lambda", "check_method", "parse_method", "load_scenario",
    "FrozenHead", "HEADS", "fixed_head_weight", "HeadedModel", "build_backbone_and_head", "task_steps", "fit_config",
    "finetune", "merge_task_vectors", "BN_STATS", "apply_merged", "step_lambda", "lambda_grid", "run_config",
    "MagMaxRun", "run_magmax_method", "cached_magmax_run", "cached_json",
    # kept importable from here (callers use ``magmax.X``): the benchmarks, the analyses, the prompts
    "CHAPTER", "CIFAR100_CLASS_ORDER", "IMAGENET_R_CLASS_ORDER", "IMAGENET_R_DOMAINS", "IMAGENET_R_DOMAIN_ORDER",
    "CLASS_ORDERS", "TEMPLATES", "benchmark_name", "domain_incremental", "load_imagenet_r",
    "selection_share", "sign_agreement", "CIFAR100_TEMPLATES", "IMAGENET_TEMPLATES",
]

VERSION = 2

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

# The paper's claims that the chapter checks (abstract; research note §4). Only the CIFAR-100
# 10-task number could be read; the paper's tables are not in the notes.
PAPER_CLAIMS = {"cifar100_t10_magmax": 77.04}

# ----------------------------------------------------------------------------------- profiles
_RECIPE = dict(optimizer="adamw", weight_decay=0.1, schedule="warmup_cosine", clip_grad=1.0, bn_stats="average",
               lambda_magmax=0.5, lambda_random=1.0, lambda_ties=0.55)
PROFILES = {
    # the whole notebook in well under a minute: a tiny subset, a few steps per task, one seed
    "smoke": dict(datasets=["pathmnist_1k"], dil_benchmark="medical-dil", n_tasks=3, n_seeds=1,
                  methods=["seq-ft", "joint", "pretrained", "average", "task-arithmetic", "ties", "random",
                           "magmax", "average-ind", "magmax-ind"],
                  sweep_merges=["magmax", "task-arithmetic"], backbone=BACKBONE, head="fixed", head_scale=16.0,
                  lr=1e-3, batch_size=32, epochs=1, min_steps=3, max_steps=3, warmup_steps=1, augment=True,
                  max_per_split=SMOKE_MAX_PER_SPLIT, eval_max_per_task=100, keep_states=True,
                  sweep_points=2, sweep_val_max=48, eval_batch=512, **_RECIPE),
    # real 28 px medical data, 3 seeds; one pass per task with a floor and a cap on steps (time budget)
    "cpu": dict(datasets=["ham10000-cil", "pathmnist_1k"], dil_benchmark="medical-dil", n_tasks=3, n_seeds=3,
                methods=list(METHODS), sweep_merges=list(SWEPT), backbone=BACKBONE, head="fixed", head_scale=16.0,
                lr=1e-3, batch_size=64, epochs=1, min_steps=15, max_steps=40, warmup_steps=5, augment=True,
                max_per_split=None, eval_max_per_task=None, keep_states=True,
                sweep_points=4, sweep_val_max=200, eval_batch=512, **_RECIPE),
    # the authors' setting (GPU box): CLIP ViT-B/16 (OpenAI), zero-shot heads, their recipe (they ran seed 5)
    "paper": dict(datasets=["cifar100", "imagenet-r"], dil_benchmark="imagenet-r-dil", n_tasks=[5, 10, 20, 50],
                  n_seeds=1, methods=list(METHODS), sweep_merges=list(SWEPT), backbone="ViT-B-16", head="clip",
                  head_scale=None, lr=1e-5, batch_size=128, epochs=10, min_steps=0, max_steps=None,
                  warmup_steps=500, augment=False, max_per_split=None, eval_max_per_task=None, keep_states=False,
                  sweep_points=20, sweep_val_max=None, eval_batch=256, **_RECIPE),
}
# settings that change what a run computes (cache keys); the rest only orchestrate the page
FT_KEYS = ("backbone", "head", "head_scale", "lr", "batch_size", "epochs", "min_steps", "max_steps",
           "warmup_steps", "augment", "max_per_split", "optimizer", "weight_decay", "schedule", "clip_grad")
RUN_KEYS = FT_KEYS + ("eval_max_per_task", "bn_stats", "sweep_points", "sweep_val_max",
                      "lambda_magmax", "lambda_random", "lambda_ties")


def fixed_lambda(merge: str, settings: Mapping) -> float | None:
    """The fixed λ of a merge in ``settings`` (``lambda_<merge>``; defaults: the paper's), ``None``
    for averaging (1/T) and task arithmetic (chosen on validation data)."""
    return settings.get(f"lambda_{merge}", PAPER_LAMBDA.get(merge)) if merge in ("magmax", "random", "ties") else None


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return method


def parse_method(method: str) -> tuple[str, str]:
    """``"magmax-ind"`` → ``("magmax", "independent")``; baselines keep their name, regime sequential."""
    check_method(method)
    if method.endswith("-ind"):
        return method[:-4], "independent"
    return method, "sequential"


# ----------------------------------------------------------------------------------- scenarios
def load_scenario(dataset: str, profile: str, seed: int = 0, n_tasks: int | None = None,
                  settings: Mapping | None = None) -> Scenario:
    """The scenario a run of this chapter uses (:func:`cmm_utils.papers.magmax.data.load_scenario`), under
    ``settings`` (default: the profile's row of :data:`PROFILES`)."""
    check_profile(profile)
    return magmax_data.load_scenario(dataset, profile, seed, n_tasks,
                                     PROFILES[profile] if settings is None else settings)


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
    if settings["head"] not in HEADS:
        raise ValueError(f"unknown head {settings['head']!r}; valid: {', '.join(HEADS)}")
    backbone = book_backbone(settings["backbone"], profile, verbose=False)
    return backbone, FrozenHead(fixed_head_weight(scenario.num_classes, backbone.num_features,
                                                  float(settings["head_scale"])))


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


BN_STATS = ("average", "merge")


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
    out = mg.apply(base, merged_tv, lam)
    for k, v in out.items():
        if mg.bn_statistic(k):
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


# ----------------------------------------------------------------------------------- one run
def _detached(state: Mapping[str, torch.Tensor]) -> dict:
    """A CPU copy of ``state`` in the default (contiguous) memory format."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def _cap_split(scenario: Scenario, split: str, cap: int | None, seed: int) -> Scenario:
    """``scenario`` with each task's ``split`` cut to at most ``cap`` images (seeded, stratified):
    the validation subset of the λ sweep, and the ``smoke`` profile's small test sets."""
    if not cap:
        return scenario
    tasks = []
    for task in scenario.tasks:
        part = getattr(task, split)
        if len(part) > cap:
            keep, _ = make_split(part.labels.numpy(), 1 - cap / len(part), seed)
            part = part.subset(keep)
        tasks.append(replace(task, **{split: part}))
    return replace(scenario, tasks=tasks)


def run_config(method: str, benchmark: str, profile: str, seed: int, settings: Mapping) -> dict:
    """The JSON-able configuration a cached run is keyed by (the leaderboard reads it)."""
    merge, regime = parse_method(method)
    cfg = {"method": method, "benchmark": str(benchmark), "seed": int(seed), "backbone": settings["backbone"],
           "profile": profile, "chapter": CHAPTER, "version": VERSION, "regime": regime,
           "lambda": fixed_lambda(merge, settings)}
    cfg.update({k: settings[k] for k in RUN_KEYS if k in settings})
    return cfg


class MagMaxRun:
    """One scenario and seed: per-task checkpoints (fine-tuned once per regime, cached as
    safetensors and reused by every merge and λ), merges, evaluation and analyses.

    Checkpoints live under ``cache_root()/magmax/<profile>/<benchmark>-s<seed>-<key>/``, keyed by
    the scenario's fingerprint and the fine-tuning settings; task 1 is shared by both regimes
    (both start it from θ_0). An interrupted run resumes at the first missing task.
    """

    def __init__(self, scenario: Scenario, profile: str, seed: int, settings: Mapping | None = None,
                 benchmark: str | None = None, backbone: nn.Module | None = None, head: FrozenHead | None = None,
                 checkpoint_dir: Path | str | None = None):
        self.profile = check_profile(profile)
        self.settings = dict(PROFILES[profile] if settings is None else settings)
        self.seed = int(seed)
        self.scenario = _cap_split(scenario, "test", self.settings.get("eval_max_per_task"), self.seed)
        self.benchmark = benchmark or scenario.name
        seed_everything(self.seed)
        if backbone is None or head is None:
            backbone, head = build_backbone_and_head(self.settings, profile, scenario)
        self.backbone, self.head = backbone.cpu(), head.cpu()
        self.base = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        key = config_key({"scenario": scenario_fingerprint(scenario), "seed": self.seed, "profile": profile,
                          "version": VERSION, **{k: self.settings.get(k) for k in FT_KEYS},
                          "head_weight": float(self.head.weight.double().sum())})
        self.dir = Path(checkpoint_dir) if checkpoint_dir else (
            cache_root() / CHAPTER / profile / f"{Path(self.benchmark).stem}-s{self.seed}-{key}")
        self._states: dict[str, dict] = {}
        self._meta: dict[str, dict] = {}
        self._sweeps: dict[tuple, pd.DataFrame] = {}
        self._gflops: float | None = None
        self._eval_net: HeadedModel | None = None
        self._tvs: dict[str, list] = {}
        self._final: dict[tuple, dict] = {}

    # -- models and checkpoints
    @property
    def T(self) -> int:
        return len(self.scenario.tasks)

    def model(self, state: Mapping[str, torch.Tensor] | None = None) -> HeadedModel:
        """A fresh model (on the compute device) with ``state`` loaded into the backbone."""
        net = HeadedModel(copy.deepcopy(self.backbone), self.head)
        net.backbone.load_state_dict(state if state is not None else self.base)
        # channels-last convolution weights: ~1.3x faster evaluation on CPU, same results up to rounding
        return net.to(device(), memory_format=torch.channels_last)

    def eval_model(self, state: Mapping[str, torch.Tensor]) -> HeadedModel:
        """One model reused for every evaluation: ``state`` is copied into it (no re-allocation)."""
        if self._eval_net is None:
            self._eval_net = self.model()
        self._eval_net.backbone.load_state_dict(state)
        return self._eval_net.eval()

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def _load_or_train(self, name: str, train: Callable[[], tuple[dict, dict]]) -> dict:
        """The checkpoint ``name``: from memory, from disk, or trained now and saved (resume point).
        With ``keep_states=False`` (``paper``: T × ViT-B/16 would not fit) nothing is kept in memory."""
        if name in self._states:
            return self._states[name]
        path = self._path(name)
        if path.exists():
            state, self._meta[name] = load_state(path), load_meta(path)
        else:
            state, meta = train()
            save_state(path, state, meta)
            self._meta[name] = meta
        if self.settings.get("keep_states", True):
            self._states[name] = state
        return state

    def _ckpt_name(self, regime: str, t: int) -> str:
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
        return "task0" if t == 0 else f"{regime[:3]}-task{t}"

    def finetuned(self, regime: str) -> list[dict]:
        """θ_1..θ_T of ``regime`` (trained once, then read from the checkpoints)."""
        states = []
        for t, task in enumerate(self.scenario.tasks):
            def train(t=t, task=task):
                init = states[t - 1] if (regime == "sequential" and t > 0) else self.base
                net = self.model(init)
                meta = finetune(net, task.train, task_local_loss(task.classes, self.scenario.num_classes),
                                self.settings, seed=self.seed * 1000 + t, desc=f"{regime[:3]} task {t + 1}/{self.T}")
                return _detached(net.backbone.state_dict()), meta
            states.append(self._load_or_train(self._ckpt_name(regime, t), train))
        return states

    def task_vectors(self, regime: str) -> list[dict]:
        if regime not in self._tvs:
            self._tvs[regime] = [mg.task_vector(s, self.base) for s in self.finetuned(regime)]
        return self._tvs[regime]

    def final_merge(self, merge: str, regime: str) -> dict:
        """merge(τ_1..τ_T), before λ (kept in memory: every λ of the sweep reuses it)."""
        if (merge, regime) not in self._final:
            self._final[(merge, regime)] = merge_task_vectors(merge, self.task_vectors(regime), seed=self.seed)
        return self._final[(merge, regime)]

    def joint(self) -> dict:
        """The upper bound: one model trained on all tasks with the full softmax, for as many steps
        as the sequential run takes in total."""
        def train():
            data = self.scenario.joint("train")
            steps = sum(task_steps(len(t.train), self.settings) for t in self.scenario.tasks)
            net = self.model()
            meta = finetune(net, data, lambda m, x, y: F.cross_entropy(m(x), y), self.settings,
                            seed=self.seed * 1000 + 999, steps=steps, desc="joint")
            return _detached(net.backbone.state_dict()), meta
        return self._load_or_train("joint", train)

    def train_seconds(self, names: Sequence[str]) -> float:
        return float(sum(self._meta.get(n, {}).get("seconds", float("nan")) for n in names))

    # -- evaluation
    def evaluate(self, state: Mapping[str, torch.Tensor], t: int, split: str = "test",
                 scenario: Scenario | None = None) -> tuple[list[float], float]:
        """Row ``R[t, :]`` and pooled accuracy on tasks ``0..t`` (the book's pinned protocol)."""
        return evaluate_after_task(self.eval_model(state), scenario or self.scenario, t, split,
                                   batch_size=int(self.settings["eval_batch"]))

    def _logit_rows(self, state: Mapping[str, torch.Tensor], ts: Sequence[int]) -> tuple[list, list, float]:
        """Rows ``R[t, :]`` for ``t`` in ``ts`` of one model (the pretrained or joint baseline), its
        test logits computed once and scored by :func:`cmm_utils.core.continual.score_seen_tasks`. Also
        returns the mean class recall on the pooled test set of the last ``t`` (HAM10000 is 58 %
        naevi: accuracy alone flatters a model that answers "nv" to everything)."""
        net = self.eval_model(state)
        logits = [predict(net, task.test, int(self.settings["eval_batch"])) for task in self.scenario.tasks[: max(ts) + 1]]
        scores = [score_seen_tasks(logits, self.scenario, t) for t in ts]
        return [s.row for s in scores], [s.accuracy for s in scores], scores[-1].mean_class_recall

    def _rows(self, state_after: Callable[[int], Mapping[str, torch.Tensor]]) -> tuple[list, list, float]:
        """``R`` of a method whose model after task ``t`` is ``state_after(t)``, and the mean class
        recall of the model after the last task."""
        scores = [evaluate_seen_tasks(self.eval_model(state_after(t)), self.scenario, t,
                                      batch_size=int(self.settings["eval_batch"])) for t in range(self.T)]
        return [s.row for s in scores], [s.accuracy for s in scores], scores[-1].mean_class_recall

    def merged(self, merge: str, regime: str, upto: int, lam: float, bn_stats: str | None = None) -> dict:
        """θ_0 + λ_t·merge(τ_1..τ_{upto+1}), BatchNorm statistics by ``bn_stats`` (default: settings)."""
        tvs = self.task_vectors(regime)[: upto + 1]
        final = upto == self.T - 1
        merged_tv = self.final_merge(merge, regime) if final else merge_task_vectors(merge, tvs, seed=self.seed)
        policy = bn_stats or self.settings.get("bn_stats", "merge")
        if policy not in BN_STATS:
            raise ValueError(f"unknown bn_stats {policy!r}; valid: {', '.join(BN_STATS)}")
        stats = None
        if policy == "average":
            stats = self.final_merge("average", regime) if final else mg.average(tvs)
        return apply_merged(self.base, merged_tv, step_lambda(merge, lam, upto), stats)

    def val_scenario(self) -> Scenario:
        """The scenario with each task's validation split capped at ``sweep_val_max`` (stratified)."""
        return _cap_split(self.scenario, "val", self.settings.get("sweep_val_max"), self.seed)

    def sweep(self, merge: str, regime: str) -> pd.DataFrame:
        """Validation accuracy (all tasks, all classes) of the final merge for each λ of the grid;
        ``chosen`` marks the best (ties: the one nearest the paper's λ). Never reads test data."""
        if (merge, regime) in self._sweeps:
            return self._sweeps[(merge, regime)]
        val = self.val_scenario()
        paper = self.fixed(merge)
        rows = []
        for lam in lambda_grid(merge, int(self.settings["sweep_points"]), paper):
            state = self.merged(merge, regime, self.T - 1, lam)
            _, acc = self.evaluate(state, self.T - 1, "val", val)
            rows.append({"merge": merge, "regime": regime, "lambda": lam, "val_acc": acc,
                         "paper": bool(np.isclose(lam, paper))})
        frame = pd.DataFrame(rows)
        best = frame.assign(d=(frame["lambda"] - paper).abs()).sort_values(["val_acc", "d"], ascending=[False, True])
        frame["chosen"] = frame.index == best.index[0]
        self._sweeps[(merge, regime)] = frame
        return frame

    def lam(self, merge: str, regime: str) -> tuple[float, str]:
        """``(λ, source)``: the paper's fixed λ, averaging's 1/T, or the validation choice for task arithmetic."""
        if merge == "task-arithmetic":
            frame = self.sweep(merge, regime)
            return float(frame.loc[frame["chosen"], "lambda"].iloc[0]), "validation"
        if merge == "average":
            return 1.0, "1/T"
        return self.fixed(merge), "paper"

    def fixed(self, merge: str) -> float:
        """The fixed λ of ``merge`` (task arithmetic: k = 1, i.e. averaging)."""
        lam = fixed_lambda(merge, self.settings)
        return 1.0 if lam is None else float(lam)

    def gflops(self) -> float:
        if self._gflops is None:
            size = int(self.scenario.tasks[0].test.images.shape[-1])
            self._gflops = gflops_per_image(self.model(), size)
        return self._gflops

    def result(self, method: str) -> ContinualResult:
        """The method's :class:`ContinualResult`: ``R`` from the merge of ``τ_1..τ_t`` after each task."""
        merge, regime = parse_method(method)
        model_bytes = state_bytes(self.base, self.head.weight)
        names = [self._ckpt_name(regime, t) for t in range(self.T)]
        extra = {"regime": regime, "benchmark": self.benchmark}
        if merge == "pretrained":
            R, seen, mcr = self._logit_rows(self.base, range(self.T))
            return ContinualResult(method, R, seen, model_bytes, self.gflops(), 0.0,
                                   {**extra, "mean_class_recall": mcr})
        if merge == "joint":
            R, seen, mcr = self._logit_rows(self.joint(), range(self.T))
            data = self.scenario.joint("train")
            stored = model_bytes + state_bytes(data.images, data.labels)
            extra.update({"mean_class_recall": mcr, "note": "rows before the last reuse the final joint model"})
            return ContinualResult(method, R, seen, stored, self.gflops(), self.train_seconds(["joint"]), extra)
        states = self.finetuned(regime)
        if merge == "seq-ft":
            R, seen, mcr = self._rows(lambda t: states[t])
            return ContinualResult(method, R, seen, model_bytes, self.gflops(), self.train_seconds(names),
                                   {**extra, "mean_class_recall": mcr})
        lam, source = self.lam(merge, regime)
        R, seen, mcr = self._rows(lambda t: self.merged(merge, regime, t, lam))
        # kept across tasks: θ_0, the running merge and the model being trained; TIES needs every τ (two passes)
        stored = model_bytes * ((self.T + 1) if merge == "ties" else 3)
        extra.update({"lambda": lam, "lambda_source": source, "mean_class_recall": mcr})
        return ContinualResult(method, R, seen, stored, self.gflops(), self.train_seconds(names), extra)

    # -- the chapter's analyses
    def lambda_table(self, results: Mapping[str, ContinualResult] | None = None, merges: Sequence[str] | None = None,
                     regimes: Sequence[str] = REGIMES) -> pd.DataFrame:
        """Per merge and regime: the validation sweep's choice beside the paper's λ, both scored on
        test (final merge, all classes). Test accuracies already in ``results`` (the main runs at the
        paper's λ, averaging = task arithmetic with k = 1) are reused instead of re-evaluated."""
        results = results or {}
        merges = merges or self.settings.get("sweep_merges") or SWEPT
        rows = []
        for regime in regimes:
            suffix = "" if regime == "sequential" else "-ind"
            for merge in merges:
                frame = self.sweep(merge, regime)
                paper = self.fixed(merge)
                chosen = float(frame.loc[frame["chosen"], "lambda"].iloc[0])
                known = {}
                main = "average" if merge == "task-arithmetic" else merge
                if main + suffix in results:
                    known[paper] = results[main + suffix].acc_seen[-1]
                if merge == "task-arithmetic" and merge + suffix in results:
                    known[chosen] = results[merge + suffix].acc_seen[-1]
                for lam in {paper, chosen} - set(known):
                    state = self.merged(merge, regime, self.T - 1, lam)
                    known[lam] = self.evaluate(state, self.T - 1)[1]
                rows.append({"merge": merge, "regime": regime, "paper_lambda": paper, "chosen_lambda": chosen,
                             "test_acc_paper_lambda": known[paper], "test_acc_chosen_lambda": known[chosen]})
        return pd.DataFrame(rows)

    def bn_table(self, results: Mapping[str, ContinualResult] | None = None,
                 merges: Sequence[str] = ("magmax", "ties"),
                 regimes: Sequence[str] = REGIMES) -> pd.DataFrame:
        """Final test accuracy at the fixed λ under both BatchNorm policies (``average``: the fine-tuned
        models' mean statistics; ``merge``: statistics merged and scaled like weights, FusionBench)."""
        results = results or {}
        rows = []
        for regime in regimes:
            suffix = "" if regime == "sequential" else "-ind"
            for merge in merges:
                lam, _ = self.lam(merge, regime)
                row = {"merge": merge, "regime": regime, "lambda": lam}
                for policy in BN_STATS:
                    if policy == self.settings.get("bn_stats") and merge + suffix in results:
                        row[f"bn_{policy}"] = results[merge + suffix].acc_seen[-1]
                    else:
                        state = self.merged(merge, regime, self.T - 1, lam, policy)
                        row[f"bn_{policy}"] = self.evaluate(state, self.T - 1)[1]
                rows.append(row)
        return pd.DataFrame(rows)

    def analysis(self) -> dict:
        """MagMax's per-task share and the sign agreement of the task vectors, for both regimes."""
        out = {}
        for regime in REGIMES:
            tvs = self.task_vectors(regime)
            agree, all_agree = sign_agreement(tvs)
            keys = _param_keys(tvs[0])
            norms = [float(torch.sqrt(sum((tv[k].double() ** 2).sum() for k in keys))) for tv in tvs]
            out[regime] = {"share": selection_share(tvs).tolist(), "sign_agreement": agree.tolist(),
                           "all_agree": all_agree, "norms": norms}
        return out


# ----------------------------------------------------------------------------------- entry points
def run_magmax_method(method: str, scenario: Scenario, profile: str, seed: int, settings: Mapping | None = None,
                      benchmark: str | None = None, run: MagMaxRun | None = None) -> ContinualResult:
    """Run one method of this chapter on ``scenario`` (the leaderboard calls this for a missing run).

    Fine-tuned checkpoints are cached per task and shared by every method of the same scenario,
    seed and settings, so asking for all twelve methods fine-tunes each regime once.
    """
    check_method(method)
    run = run or MagMaxRun(scenario, profile, seed, settings, benchmark=benchmark)
    return run.result(method)


def cached_magmax_run(method: str, benchmark: str, profile: str, seed: int, settings: Mapping | None = None,
                      n_tasks: int | None = None, scenario: Scenario | None = None,
                      run: MagMaxRun | None = None) -> ContinualResult:
    """``cached_run(profile, "magmax", config, ...)``: the result of a finished run is read back.

    ``benchmark`` is a book benchmark (``ham10000-cil``, ``medical-dil``) or a name made by
    :func:`benchmark_name` (then ``n_tasks`` and the dataset name are read from it unless given);
    pass ``scenario``/``run`` to reuse what is already loaded. The configuration includes a
    fingerprint of the scenario's data, so a different file under the same name is never reused.
    """
    settings = dict(PROFILES[check_profile(profile)] if settings is None else settings)
    if run is not None:
        scenario = run.scenario
    if scenario is None:
        name, tasks = benchmark, n_tasks
        if benchmark not in BENCHMARKS and "-cil" in benchmark:
            name, _, t = benchmark.rpartition("-cil")
            tasks = n_tasks or int(t)
        scenario = load_scenario(name, profile, seed, tasks, settings)
    config = run_config(method, benchmark, profile, seed, settings)
    capped = _cap_split(scenario, "test", settings.get("eval_max_per_task"), seed)  # what MagMaxRun evaluates on
    config["data"] = config_key(scenario_fingerprint(capped))
    return cached_run(profile, CHAPTER, config,
                      lambda: run_magmax_method(method, scenario, profile, seed, settings, benchmark=benchmark,
                                                run=run))


def cached_json(path: Path, compute: Callable[[], object]):
    """Read ``path`` if present, else compute, write atomically and return (analyses, sweeps)."""
    if path.exists():
        return json.loads(path.read_text())
    obj = compute()
    write_json(path, obj)
    return json.loads(path.read_text())
