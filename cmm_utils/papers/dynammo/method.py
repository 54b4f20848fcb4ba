"""DynaMMo (Qazi et al., MIUA 2024, arXiv:2404.14099) and its baselines, as plain functions.

The method (paper Sec. 2, figure "Adapter tuning / Merging and finetuning head"; research note
``dynammo_medmerge_code.md`` §1.3, which reads the released code):

1. **Stage 1 (adapter tuning)**, per task ``t``: a frozen pretrained ResNet with one residual
   adapter per stage for task ``t`` (:class:`cmm_utils.papers.dynammo.adapters.AdapterNet`), trained with a
   head ``Linear(d, n_t + 1)`` on the task's data plus the exemplar memory, whose old-class samples
   are labelled "others" (index ``n_t``). SGD 0.01, momentum 0.9, wd 5e-4, 200 epochs,
   milestones [70, 130, 170], batch 32. At task 0 the kept head is this head.
2. **Memory**: iCaRL herding on L2-normalised features of task ``t``'s path, a fixed total budget
   split evenly over the seen classes (old classes truncated, keeping herding order).
3. **Merge**: ``Ā = 1/T Σ_t A_t`` (:func:`cmm_utils.merging.kernels.average_adapters`), once per task.
4. **Stage 2 (balanced head fine-tuning)**, ``t > 0``: every head, on features of the merged
   adapters, trained on the class-balanced set (the memory after its update: ``m`` herded
   exemplars per old class and per new class); loss ``Σ_{i present in batch} CE(head_i(f̄), y_i)``
   with ``y_i`` the local label or "others". Adam 1e-3, 100 epochs [55, 80] (50 [15, 35] on CIFAR100).
5. **Inference**: one pass through the merged adapters, all heads on that feature, the task with
   the lowest "others" probability, then its best class (:func:`cmm_utils.papers.dynammo.adapters.min_others_scores`).

ACL (Zhang et al., MICCAI 2023) is the same pipeline with each head reading its own task's
adapter path in stage 2 and at inference (T passes); it shares stage 1 and the memory with
DynaMMo exactly (stage 2 never feeds back into stage 1), so :func:`adapter_stage1` is run once
and both methods read it. Baselines: DER in its *expandable representation* sense (Yan et al.,
CVPR 2021; not Dark Experience Replay): one backbone per task, features concatenated, one
classifier (:class:`ExpandableNet`); sequential fine-tuning; joint training on all data so far.

Deliberate deviations from the authors' code (each said again where it happens):
- the released configs run ACL and the merge cannot run (undefined ``average_dicts``); here the
  merge is done as the paper and the orphan ``dynammo_cl_net .py`` intend, once per task;
- stage 2 trains the heads on *precomputed* features of the balanced set and of its horizontally
  flipped copy, choosing the flip per sample and step: with the backbone and adapters frozen (eval
  mode) this is exactly training with random flips, at a fraction of the cost;
- herding uses test-time (unflipped) images; the code extracts them with training transforms;
- no open-set evaluation; the book's pinned protocol (:mod:`cmm_utils.core.continual`) is used, and
  mean class recall (the code's ``mcr``) is recorded for every run;
- DER: no pruning mask (as in the authors' ``dynamic_er`` baseline); its balanced classifier
  re-training runs for ``t > 0`` like DynaMMo's stage 2; trained backbones keep BatchNorm in
  training mode (full fine-tuning), only DynaMMo/ACL's backbone is frozen; weight decay 5e-4 as in
  stage 1 (the DER YAMLs' value was not recorded);
- ACL at inference runs the stem (which has no adapter) once and repeats only the four stages per
  task; the released code repeats the whole network, so its cost ratio would be exactly ``T``;
- fine-tuning and joint training use stage 1's SGD schedule (their YAMLs were not recorded);
- images are normalised with ImageNet statistics (:func:`cmm_utils.core.train.to_float`), not the
  per-dataset statistics of the authors' transforms;
- the ``cpu`` profile caps each training at ``train_steps`` optimiser steps per task and
  ``max_train_per_task`` images per task (class-stratified), for its time budget.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.papers.dynammo.adapters import AdapterNet, min_others_scores
from cmm_utils.core.benchmarks import BACKBONE, BENCHMARKS, CLASS_ORDER_SEED, SMOKE_MAX_PER_SPLIT, load_benchmark
from cmm_utils.core.continual import ContinualResult, cached_run, gflops_per_image, state_bytes
from cmm_utils.core.data import LabeledImages, Scenario, Task, class_incremental, load_dataset
from cmm_utils.papers.dynammo.baselines import ExpandableNet, single_model_runs
from cmm_utils.papers.dynammo.common import (Memory, concat, epoch_config, evaluate, features_with_flips, fit_on_features, herding,
                                             label_lookup, subsample)
from cmm_utils.papers.dynammo.costs import adapter_parameters, cost_table, inference_ms
from cmm_utils.core.io import cache_root, config_key, load_meta, load_state, save_state, strip_prefix, with_prefix
from cmm_utils.core.models import BOOK_IMAGE_SIZE, book_backbone
from cmm_utils.core.profiles import check_profile
from cmm_utils.core.train import FitConfig, device, fit, seed_everything

__all__ = [
    # defined here: scenarios, profiles, the two stages, DynaMMo/ACL, entry points
    "CHAPTER", "MEMORY_PER_CLASS", "METHODS", "METHOD_LABELS", "PAPER", "PROFILES", "RUN_KEYS", "SCENARIOS",
    "SMOKE_PATH_CAP", "STAGE1_KEYS", "VERSION", "Stage1State", "adapter_method", "adapter_spread",
    "adapter_stage1", "cached_dynammo_run", "check_method", "grouped_scenario", "load_scenario", "memory_budget",
    "pycil_class_order", "run_config", "run_dynammo_method", "stage2_schedule", "train_stage1", "train_stage2",
    # re-exported from cmm_utils.papers.dynammo.common (memory, training on features, evaluation)
    "Memory", "concat", "epoch_config", "evaluate", "features_with_flips", "fit_on_features", "herding",
    "label_lookup", "subsample",
    # re-exported from cmm_utils.papers.dynammo.baselines (DER, fine-tuning, joint training)
    "ExpandableNet", "single_model_runs",
    # re-exported from cmm_utils.papers.dynammo.costs (cost as T grows)
    "adapter_parameters", "cost_table", "inference_ms",
]

CHAPTER = "dynammo"
METHODS = ("dynammo", "acl", "der", "finetune", "joint")
METHOD_LABELS = {"dynammo": "DynaMMo (merged adapters)", "acl": "ACL (per-task adapter paths)",
                 "der": "DER (expandable representation)", "finetune": "Fine-tuning",
                 "joint": "Joint training"}
VERSION = 3

# What the paper claims (abstract, /work/shared/papers/dynammo.txt) and the ACL paper's curves the
# DynaMMo repository ships (visualize/draw.ipynb; research note §1.9, averages computed there).
PAPER = {
    "gflops_reduction": 10.0,          # "around 10-fold reduction in GFLOPS" vs dynamic expansion
    "avg_acc_drop": 2.76,              # "a small drop of 2.76 in average accuracy"
    "acl_reference": {                 # ACL paper, avg / last (%), research note §1.9
        "CIFAR100": {"acl": (82.50, 73.02), "der": (78.59, 64.97)},
        "SKIN8 (MCR)": {"acl": (66.89, 50.69), "der": (60.24, 39.47)},
        "PATH16": {"acl": (76.57, 73.24), "der": (74.45, 69.87)},
    },
}

# ---------------------------------------------------------------------------------- scenarios
# ``stands_in_for``: the paper dataset a 28 px scenario replaces. ``memory``: exemplar budget;
# None = 5 per class of the scenario, which is exactly the paper's budget for SKIN8 (40 / 8
# classes) and PATH16 (80 / 16).
SCENARIOS = {
    "ham10000-cil": {"kind": "benchmark", "stands_in_for": "SKIN8", "metric": "mcr", "memory": None},
    "pathmnist_1k": {"kind": "class-incremental", "dataset": "pathmnist_1k", "n_tasks": 4,
                     "stands_in_for": "PATH16", "metric": "acc", "memory": None},
    "medical-dil": {"kind": "benchmark", "stands_in_for": None, "metric": "acc", "memory": None},
    "cifar100": {"kind": "class-incremental", "dataset": "cifar100", "n_tasks": 10, "order": "np1993",
                 "stands_in_for": "CIFAR100", "metric": "acc", "memory": 2000},
    "skin8": {"kind": "groups", "dataset": "skin8", "task_sizes": (2, 2, 2, 2), "stands_in_for": "SKIN8",
              "metric": "mcr", "memory": 40},
    "path16": {"kind": "groups", "dataset": "path16", "task_sizes": (2, 2, 2, 2, 4, 2, 2),
               "stands_in_for": "PATH16", "metric": "acc", "memory": 80},
}
MEMORY_PER_CLASS = 5
SMOKE_PATH_CAP = 100  # images per split of a user's dataset in ``smoke`` (5 methods x T tasks in seconds)


def pycil_class_order(num_classes: int, seed: int = 1993) -> list[int]:
    """PyCIL's / DynaMMo's class order: ``np.random.seed(seed); np.random.permutation(C)``."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return [int(c) for c in np.random.permutation(num_classes)]
    finally:
        np.random.set_state(state)


def grouped_scenario(data, task_sizes: Sequence[int], class_order: Sequence[int] | None = None) -> Scenario:
    """Tasks of the given sizes over ``class_order`` (default 0..C-1), e.g. PATH16's [2,2,2,2,4,2,2]."""
    order = list(class_order) if class_order is not None else list(range(data.num_classes))
    if sum(task_sizes) != len(order) or sorted(order) != list(range(data.num_classes)):
        raise ValueError(f"task_sizes {list(task_sizes)} must cover the {data.num_classes} classes once")
    tasks, start = [], 0
    for i, n in enumerate(task_sizes):
        classes = tuple(sorted(order[start:start + n]))
        start += n
        pick = {s: data.split(s).subset(np.flatnonzero(np.isin(data.split(s).labels.numpy(), classes)))
                for s in ("train", "val", "test")}
        tasks.append(Task(i, classes, pick["train"], pick["val"], pick["test"],
                          name=f"task {i + 1}: " + ", ".join(data.classes[c] for c in classes)))
    return Scenario(data.name, "class-incremental", tasks, data.classes, tuple(order))


def load_scenario(name: str, profile: str, seed: int = 0, n_tasks: int | None = None) -> Scenario:
    """A scenario of :data:`SCENARIOS` or a dataset path (class-incremental over ``n_tasks`` tasks,
    class order from seed 1993) at the profile's resolution; ``smoke`` keeps a small subset."""
    check_profile(profile)
    size = BOOK_IMAGE_SIZE[profile]
    cap = SMOKE_MAX_PER_SPLIT if profile == "smoke" else None
    spec = SCENARIOS.get(name)
    if spec is None:
        if not (str(name).endswith(".npz") or "/" in str(name) or Path(str(name)).exists()):
            raise ValueError(f"unknown scenario {name!r}; valid: {', '.join(SCENARIOS)} or a dataset path")
        cap = SMOKE_PATH_CAP if profile == "smoke" else None
        data = load_dataset(name, seed=seed, size=size, channels=3, max_per_split=cap)
        return class_incremental(data, n_tasks or 5, seed=CLASS_ORDER_SEED)
    if spec["kind"] == "benchmark":
        return load_benchmark(name, profile, seed)
    data = load_dataset(spec["dataset"], seed=seed, size=size, channels=3, max_per_split=cap)
    if spec["kind"] == "groups":
        return grouped_scenario(data, spec["task_sizes"])
    order = pycil_class_order(data.num_classes) if spec.get("order") == "np1993" else None
    return class_incremental(data, n_tasks or spec["n_tasks"], seed=CLASS_ORDER_SEED, class_order=order)


def memory_budget(name: str, scenario: Scenario) -> int:
    spec = SCENARIOS.get(name, {})
    return spec.get("memory") or MEMORY_PER_CLASS * scenario.num_classes


# ----------------------------------------------------------------------------------- profiles
# SGD momentum is 0.9 throughout (``cmm_utils.core.train.make_optimizer``), as in the authors' YAMLs
_STAGE1 = dict(stage1_lr=0.01, stage1_weight_decay=5e-4, batch_size=32, bn_policy="average")
PROFILES = {
    # the whole notebook in well under a minute: a tiny subset, a few steps per stage
    "smoke": dict(threads=1, scenarios=["ham10000-cil"], seeds=[0], methods=list(METHODS), n_tasks=None,
                  backbone=BACKBONE, **_STAGE1,
                  stage1_epochs=1, stage1_milestones=[], stage2_epochs=2, stage2_lr=1e-3,
                  stage2_milestones=[], baseline_epochs=1, baseline_lr=0.01, baseline_milestones=[],
                  der_epochs=1, der_lr=0.01, der_milestones=[], der_ft_epochs=2, der_ft_lr=0.01,
                  der_ft_milestones=[], der_temperature=5.0, train_steps=4, head_steps=8, max_train_per_task=None,
                  cost_tasks=10, cost_classes_per_task=2, paper_res_tasks=[1, 10], timing_tasks=[1, 10],
                  timing_repeats=1, timing_batch=16),
    # real 28 px data, 3 seeds, epochs scaled down hard to fit the page's time budget
    "cpu": dict(threads=1, scenarios=["ham10000-cil", "pathmnist_1k", "medical-dil"], seeds=[0, 1, 2],
                methods=list(METHODS), n_tasks=None, backbone=BACKBONE, **_STAGE1,
                stage1_epochs=10, stage1_milestones=[], stage2_epochs=100, stage2_lr=1e-3,
                stage2_milestones=[55, 80], baseline_epochs=10, baseline_lr=0.01, baseline_milestones=[],
                der_epochs=10, der_lr=0.01, der_milestones=[], der_ft_epochs=100, der_ft_lr=1e-3,
                der_ft_milestones=[55, 80], der_temperature=5.0, train_steps=15, head_steps=None, max_train_per_task=500,
                cost_tasks=10, cost_classes_per_task=2, paper_res_tasks=list(range(1, 11)), timing_tasks=[1, 5, 10],
                timing_repeats=3, timing_batch=64),
    # the authors' datasets and schedules (GPU box); DER's from the authors' dynamic_er PATH16 config
    "paper": dict(threads=None, scenarios=["cifar100", "skin8", "path16"], seeds=[1993, 1, 42, 50, 100],
                  methods=list(METHODS), n_tasks=None, backbone=BACKBONE, **_STAGE1,
                  stage1_epochs=200, stage1_milestones=[70, 130, 170], stage2_epochs=100, stage2_lr=1e-3,
                  stage2_milestones=[55, 80], stage2_cifar100=(50, [15, 35]),
                  baseline_epochs=200, baseline_lr=0.01, baseline_milestones=[70, 130, 170],
                  der_epochs=200, der_lr=1e-3, der_milestones=[100, 120], der_ft_epochs=100, der_ft_lr=1e-3,
                  der_ft_milestones=[55, 80], der_temperature=5.0, train_steps=None, head_steps=None, max_train_per_task=None,
                  cost_tasks=10, cost_classes_per_task=10, paper_res_tasks=list(range(1, 11)), timing_tasks=[1, 5, 10],
                  timing_repeats=3, timing_batch=64),
}
# settings that change what a run computes (the cache key); the rest only orchestrate the page
RUN_KEYS = ("backbone", "stage1_lr", "stage1_weight_decay", "batch_size", "bn_policy",
            "stage1_epochs", "stage1_milestones", "stage2_epochs", "stage2_lr", "stage2_milestones",
            "stage2_cifar100", "baseline_epochs", "baseline_lr", "baseline_milestones", "der_epochs",
            "der_lr", "der_milestones", "der_ft_epochs", "der_ft_lr", "der_ft_milestones",
            "der_temperature", "train_steps", "head_steps", "max_train_per_task")
STAGE1_KEYS = ("backbone", "stage1_lr", "stage1_weight_decay", "batch_size",
               "stage1_epochs", "stage1_milestones", "train_steps", "max_train_per_task")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return method


def stage2_schedule(settings: Mapping, scenario_name: str) -> tuple[int, list[int]]:
    """Stage-2 epochs and milestones; CIFAR100 has its own (50 epochs, [15, 35])."""
    if scenario_name == "cifar100" and settings.get("stage2_cifar100"):
        epochs, milestones = settings["stage2_cifar100"]
        return int(epochs), list(milestones)
    return int(settings["stage2_epochs"]), list(settings["stage2_milestones"])


# ---------------------------------------------------------------------------- DynaMMo stages
def _adapter_train_mode(net: AdapterNet) -> None:
    """Backbone, merged and old adapters in eval mode (frozen BN statistics); the newest adapter trains."""
    net.eval()
    net.adapters[-1].train()
    net.aux_head.train()


def train_stage1(net: AdapterNet, data: LabeledImages, classes: Sequence[int], num_classes: int,
                 cfg: FitConfig, seed: int) -> list[float]:
    """Stage 1 (adapter tuning) of the newest task: ``CE(aux_head(F_{A_t}(x)), y')`` with ``y'`` the
    local label for the task's classes and ``n_t`` ("others") for replayed old classes (``dynammo.py``
    L163-165); only the newest adapters and the stage-1 head are optimised."""
    t = len(net.adapters) - 1
    lut = label_lookup(classes, num_classes)

    def loss_fn(model, x, y):
        return F.cross_entropy(model.aux_head(model.features(x, t)), lut.to(y.device)[y])

    params = list(net.adapters[t].parameters()) + list(net.aux_head.parameters())
    return fit(net, data, cfg, seed=seed, params=params, loss_fn=loss_fn, train_mode=_adapter_train_mode,
               desc=f"stage 1, task {t + 1}").losses


def train_stage2(net: AdapterNet, balanced: LabeledImages, task_classes: Sequence[Sequence[int]],
                 num_classes: int, cfg: FitConfig, seed: int, inference: str = "merged") -> list[float]:
    """Stage 2 (balanced head fine-tuning): every head (old ones too, as in the code) on the
    balanced set, ``Σ_{i: task i present in the batch} CE(head_i(f), y_i)`` (``dynammo.py`` L168-185),
    where ``f`` is the merged adapters' feature (DynaMMo) or head ``i``'s own path (ACL)."""
    net.eval()
    paths = ["merged"] if inference == "merged" else list(range(len(net.heads)))
    with torch.no_grad():
        feats = torch.stack([features_with_flips(lambda x, p=p: net.features(x, p), balanced, cfg.augment)
                             for p in paths])
    luts = [label_lookup(c, num_classes) for c in task_classes]
    dev = next(net.parameters()).device

    def loss_fn(f, y):
        loss = torch.zeros((), device=dev)
        for i, head in enumerate(net.heads):
            present = torch.isin(y, torch.tensor(list(task_classes[i])))
            if present.any():
                src = f[0 if inference == "merged" else i].to(dev)
                loss = loss + F.cross_entropy(head(src), luts[i][y].to(dev))
        return loss

    params = [p for h in net.heads for p in h.parameters()]
    return fit_on_features(loss_fn, params, feats, balanced.labels, cfg, seed)


@dataclass
class Stage1State:
    """Everything stage 1 and the memory leave behind, for DynaMMo and ACL alike."""
    adapters: list[dict[str, torch.Tensor]]          # per task, final (frozen after its task)
    aux_head0: dict[str, torch.Tensor]               # the task-0 stage-1 head (becomes head 0)
    memories: list[LabeledImages]                    # balanced set after each task's memory update
    seconds: list[float]
    losses: list[list[float]] = field(default_factory=list)


def adapter_stage1(scenario: Scenario, backbone: nn.Module, settings: Mapping, seed: int, budget: int,
                   checkpoint_dir: Path | None = None) -> Stage1State:
    """Stage 1 and the memory for every task; with ``checkpoint_dir``, per-task checkpoints (safetensors)
    are written and the run resumes from the last one."""
    dev = device()
    net = AdapterNet(copy.deepcopy(backbone), bn_policy=settings["bn_policy"]).to(dev)
    memory = Memory(budget)
    state = Stage1State([], {}, [], [])
    start_task = 0
    if checkpoint_dir is not None:
        done = sorted(checkpoint_dir.glob("stage1-task*.safetensors"), key=lambda p: int(p.stem[11:]))
        if done:
            ck = load_state(done[-1])
            meta = load_meta(done[-1])
            for t in range(meta["tasks"]):
                net.add_task(len(scenario.tasks[t].classes))
                net.adapters[t].load_state_dict(strip_prefix(ck, f"adapters.{t}."))
                state.memories.append(LabeledImages(ck[f"memory.{t}.images"], ck[f"memory.{t}.labels"]))
            state.aux_head0 = strip_prefix(ck, "aux_head0.")
            state.seconds, state.losses = list(meta["seconds"]), list(meta["losses"])
            memory = Memory.from_state(budget, {"memory_images": state.memories[-1].images,
                                                "memory_labels": state.memories[-1].labels})
            start_task = meta["tasks"]
    for t in range(start_task, len(scenario.tasks)):
        task = scenario.tasks[t]
        t0 = time.time()
        torch.manual_seed(seed * 1000 + t)
        net.add_task(len(task.classes))
        current = subsample(task.train, settings["max_train_per_task"], seed * 1000 + t)
        train = concat([current, memory.data()])
        cfg = epoch_config(settings["stage1_epochs"], settings["stage1_lr"], settings["stage1_milestones"],
                           len(train), settings["batch_size"], optimizer="sgd",
                           weight_decay=settings["stage1_weight_decay"], max_steps=settings["train_steps"])
        losses = train_stage1(net, train, task.classes, scenario.num_classes, cfg, seed * 1000 + t)
        if t == 0:
            state.aux_head0 = {k: v.detach().cpu().clone() for k, v in net.aux_head.state_dict().items()}
        net.eval()
        memory.update(lambda x: net.features(x, t), current, task.classes)
        state.memories.append(memory.data())
        state.seconds.append(time.time() - t0)
        state.losses.append(losses)
        if checkpoint_dir is not None:
            tensors = with_prefix("aux_head0.", state.aux_head0)
            for i, a in enumerate(net.adapters):
                tensors.update(with_prefix(f"adapters.{i}.", a.state_dict()))
            for i, mem in enumerate(state.memories):
                tensors[f"memory.{i}.images"], tensors[f"memory.{i}.labels"] = mem.images, mem.labels
            path = checkpoint_dir / f"stage1-task{t}.safetensors"
            save_state(path, tensors, {"tasks": t + 1, "seconds": state.seconds, "losses": state.losses})
            for old in checkpoint_dir.glob("stage1-task*.safetensors"):
                if old != path:
                    old.unlink(missing_ok=True)
                    old.with_suffix(".json").unlink(missing_ok=True)
    state.adapters = [{k: v.detach().cpu().clone() for k, v in a.state_dict().items()} for a in net.adapters]
    return state


def adapter_spread(adapters: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """``mean_t ‖θ_t − θ̄‖ / ‖θ̄‖`` over the adapters' learnable weights (BatchNorm statistics and
    counters left out), ``θ̄`` their average: how far the merged adapter is from the task adapters it
    replaces (0 for one task). A diagnostic, not part of the method."""
    keys = [k for k, v in adapters[0].items() if v.is_floating_point() and "running_" not in k]
    flat = torch.stack([torch.cat([a[k].detach().float().flatten().cpu() for k in keys]) for a in adapters])
    mean = flat.mean(0)
    return float((flat - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-12))


def adapter_method(method: str, scenario: Scenario, backbone: nn.Module, stage1: Stage1State, settings: Mapping,
                   seed: int, scenario_name: str = "") -> ContinualResult:
    """DynaMMo (``inference="merged"``) or ACL (``"paths"``) on top of a finished stage 1: per task,
    merge, stage 2 for ``t > 0`` (head 0 is the task-0 stage-1 head), evaluate."""
    inference = {"dynammo": "merged", "acl": "paths"}[method]
    dev = device()
    net = AdapterNet(copy.deepcopy(backbone), bn_policy=settings["bn_policy"]).to(dev)
    net.inference = inference
    task_classes = [t.classes for t in scenario.tasks]
    R, acc_seen, mcr, task_acc, gflops, params, seconds, spread = [], [], [], [], [], [], [], []
    epochs2, milestones2 = stage2_schedule(settings, scenario_name)
    for t, task in enumerate(scenario.tasks):
        t0 = time.time()
        torch.manual_seed(seed * 1000 + 500 + t)
        net.add_task(len(task.classes))
        net.adapters[t].load_state_dict(stage1.adapters[t])
        net.merge()
        spread.append(adapter_spread(stage1.adapters[:t + 1]))
        if t == 0:
            net.heads[0].load_state_dict(stage1.aux_head0)
        else:
            balanced = stage1.memories[t]
            cfg = epoch_config(epochs2, settings["stage2_lr"], milestones2, len(balanced), settings["batch_size"],
                               optimizer="adam", max_steps=settings["head_steps"])
            train_stage2(net, balanced, task_classes[:t + 1], scenario.num_classes, cfg, seed * 1000 + 500 + t,
                         inference)
        seconds.append(stage1.seconds[t] + time.time() - t0)
        net.eval()
        seen = task_classes[:t + 1]

        def logits_fn(x, net=net, seen=seen):
            return min_others_scores(net.head_logits(x), seen, scenario.num_classes)

        row, acc, rec, tacc = evaluate(logits_fn, scenario, t)
        R.append(row), acc_seen.append(acc), mcr.append(rec), task_acc.append(tacc)
        gflops.append(gflops_per_image(net, scenario.tasks[0].test.images.shape[-1]))
        params.append(net.inference_parameters())
    kept = [net.backbone.state_dict(), net.heads.state_dict(), *(a.state_dict() for a in net.adapters)]
    if inference == "merged":
        kept.append(net.merged.state_dict())
    kept.append(stage1.memories[-1].images)
    return ContinualResult(method, R, acc_seen, bytes_stored=state_bytes(*kept),
                           gflops=gflops[-1], train_seconds=float(sum(seconds)),
                           extra={"mcr_seen": mcr, "task_acc_seen": task_acc, "gflops_per_task": gflops,
                                  "params_per_task": params, "seconds_per_task": seconds,
                                  "memory_size": len(stage1.memories[-1]), "adapter_spread": spread,
                                  "alpha": [[float(a.alpha.detach()) for a in ad] for ad in net.adapters]})


# --------------------------------------------------------------------------------- entry points
def run_config(method: str, benchmark: str, profile: str, seed: int, settings: Mapping,
               n_tasks: int | None = None) -> dict:
    """The JSON-able configuration a cached run is keyed by (the leaderboard reads it)."""
    check_method(method)
    cfg = {"method": method, "benchmark": str(benchmark), "seed": int(seed), "backbone": settings["backbone"],
           "profile": profile, "n_tasks": n_tasks, "chapter": CHAPTER, "version": VERSION}
    cfg.update({k: settings[k] for k in RUN_KEYS if k in settings})
    return cfg


def _checkpoint_dir(profile: str, config: Mapping, keys: Sequence[str]) -> Path:
    sub = {k: config[k] for k in ("benchmark", "seed", "profile", "n_tasks", "version", "bn_policy") if k in config}
    sub.update({k: config.get(k) for k in keys})
    path = cache_root() / CHAPTER / profile / f"{Path(str(config['benchmark'])).stem}-{config_key(sub)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dynammo_method(method: str, scenario: Scenario, profile: str, seed: int, settings: Mapping | None = None,
                       benchmark: str | None = None, backbone: nn.Module | None = None,
                       checkpoint: bool = True, n_tasks: int | None = None) -> ContinualResult:
    """Run one method of this chapter on ``scenario`` (the leaderboard calls this for a missing run).

    ``settings`` default to ``PROFILES[profile]``; ``backbone`` to the book's pretrained ResNet-18
    (``book_backbone``). DynaMMo and ACL share one stage-1 run, checkpointed per task under
    ``cache_root()/dynammo/<profile>/`` (keyed by the configuration) so the second reuses it.
    """
    check_method(method)
    settings = dict(PROFILES[check_profile(profile)] if settings is None else settings)
    name = benchmark or scenario.name
    seed_everything(seed)
    backbone = backbone if backbone is not None else book_backbone(settings["backbone"], profile, verbose=False)
    backbone = backbone.to(device()).eval()
    budget = memory_budget(name, scenario)
    config = run_config(method, name, profile, seed, settings, n_tasks)
    if method in ("dynammo", "acl"):
        ck = _checkpoint_dir(profile, config, STAGE1_KEYS) if checkpoint else None
        stage1 = adapter_stage1(scenario, backbone, settings, seed, budget, ck)
        return adapter_method(method, scenario, backbone, stage1, settings, seed, name)
    ck = _checkpoint_dir(profile, config, RUN_KEYS) if checkpoint else None
    return single_model_runs(method, scenario, backbone, settings, seed, budget, name, ck)


def cached_dynammo_run(method: str, benchmark: str, profile: str, seed: int, settings: Mapping | None = None,
                       n_tasks: int | None = None,
                       scenario: Scenario | Callable[[], Scenario] | None = None) -> ContinualResult:
    """``cached_run(profile, "dynammo", config, ...)``: a finished run is read back, a missing one run.

    ``scenario`` (a :class:`Scenario` or a function returning one) spares reloading the data for
    each method; by default it is loaded with :func:`load_scenario`."""
    settings = dict(PROFILES[check_profile(profile)] if settings is None else settings)
    n_tasks = None if benchmark in BENCHMARKS else n_tasks
    config = run_config(method, benchmark, profile, seed, settings, n_tasks)

    def run():
        sc = scenario() if callable(scenario) else scenario
        sc = sc if sc is not None else load_scenario(benchmark, profile, seed, n_tasks)
        return run_dynammo_method(method, sc, profile, seed, settings, benchmark=benchmark, n_tasks=n_tasks)

    return cached_run(profile, CHAPTER, config, run)
