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
3. **Merge**: ``Ā = 1/T Σ_t A_t`` (:func:`cmm_utils.merging.average_adapters`), once per task.
4. **Stage 2 (balanced head fine-tuning)**, ``t > 0``: every head, on features of the merged
   adapters, trained on the class-balanced set, built as the authors do *before* the memory
   update (:meth:`~cmm_utils.papers.dynammo.common.Memory.balanced`: the memory at the old quota
   ``m = budget // old classes`` plus ``m`` herded exemplars per new class); loss ``Σ_{i present in batch} CE(head_i(f̄), y_i)``
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
- fine-tuning and joint training use stage 1's SGD schedule; their learning rates in ``paper`` are
  the authors' YAMLs' (fine-tune 1e-3; joint 1e-4 on PATH16, 1e-3 on SKIN8 and, with no YAML, on
  CIFAR100), in ``cpu``/``smoke`` ``baseline_lr`` = 0.01, since those profiles cap a task at a few
  dozen steps;
- the authors' SKIN8 YAML selects MobileNetV2; every scenario here runs ResNet-18 (the other YAMLs' and,
  per a third-party summary, the paper's backbone; the adapters' hook points are written for it),
  said on the chapter page;
- images are normalised with ImageNet statistics (:func:`cmm_utils.core.train.to_float`), not the
  per-dataset statistics of the authors' transforms;
- the ``cpu`` profile caps each training at ``train_steps`` optimiser steps per task and
  ``max_train_per_task`` images per task (class-stratified), for its time budget, and starts the
  adapters' output scale at ``adapter_alpha`` (the authors' 0.02 in ``paper``): at 0.02 and a few
  dozen steps the adapters barely change the features, so there is nothing to merge (issue 12);
- two controls that are not in the paper share stage 1 with DynaMMo (:data:`CONTROLS`):
  ``no_adapters`` (the merged bank replaced by the identity, α = 0: the frozen backbone with the
  same stage-2 heads) and ``last_adapters`` (the bank replaced by the newest task's adapters only).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.core.checkpoints import TaskCheckpoints
from cmm_utils.core.continual import ContinualResult, gflops_per_image, state_bytes
from cmm_utils.core.data import LabeledImages, Scenario
from cmm_utils.core.io import strip_prefix, with_prefix
from cmm_utils.core.seeds import HEAD_STAGE, task_seed
from cmm_utils.core.train import FitConfig, device, fit, to_float
from cmm_utils.papers.dynammo.adapters import AdapterNet, min_others_scores
from cmm_utils.papers.dynammo.common import (Memory, concat, epoch_config, evaluate, features_with_flips,
                                             fit_on_features, label_lookup, subsample)
from cmm_utils.papers.dynammo.profiles import stage2_schedule

__all__ = ["CONTROLS", "Stage1State", "adapter_method", "adapter_spread", "adapter_stage1", "feature_shifts",
           "train_stage1", "train_stage2"]

# what each adapter method's merged bank holds at inference (DynaMMo, ACL's paths, the two controls)
INFERENCE_OF = {"dynammo": "merged", "acl": "paths", "no_adapters": "merged", "last_adapters": "merged"}
CONTROLS = ("no_adapters", "last_adapters")
SHIFT_IMAGES = 256  # test images the feature-shift diagnostic reads (a diagnostic: a few hundred suffice)


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
    memories: list[LabeledImages]                    # the memory after each task's update
    seconds: list[float]
    losses: list[list[float]] = field(default_factory=list)
    balanced: list[LabeledImages] = field(default_factory=list)  # stage 2's set per task (t = 0: unused)


def adapter_stage1(scenario: Scenario, backbone: nn.Module, settings: Mapping, seed: int, budget: int,
                   checkpoint_dir: Path | None = None) -> Stage1State:
    """Stage 1 and the memory for every task; with ``checkpoint_dir``, per-task checkpoints
    (``stage1-task<t>``, :class:`~cmm_utils.core.checkpoints.TaskCheckpoints`) are written and the run
    resumes from the last one."""
    dev = device()
    net = AdapterNet(copy.deepcopy(backbone), alpha=settings.get("adapter_alpha", 0.02),
                     bn_policy=settings["bn_policy"]).to(dev)
    memory = Memory(budget)
    state = Stage1State([], {}, [], [])
    checkpoints = TaskCheckpoints(checkpoint_dir, "stage1")
    resumed = checkpoints.latest()
    if resumed.tasks:
        ck = resumed.tensors
        for t in range(resumed.tasks):
            net.add_task(len(scenario.tasks[t].classes))
            net.adapters[t].load_state_dict(strip_prefix(ck, f"adapters.{t}."))
            state.memories.append(LabeledImages(ck[f"memory.{t}.images"], ck[f"memory.{t}.labels"]))
            state.balanced.append(LabeledImages(ck[f"balanced.{t}.images"], ck[f"balanced.{t}.labels"]) if t
                                  else state.memories[-1])
        state.aux_head0 = strip_prefix(ck, "aux_head0.")
        state.seconds, state.losses = list(resumed.meta["seconds"]), list(resumed.meta["losses"])
        memory = Memory.from_state(budget, {"memory_images": state.memories[-1].images,
                                            "memory_labels": state.memories[-1].labels})
    for t in range(resumed.tasks, len(scenario.tasks)):
        task = scenario.tasks[t]
        t0 = time.time()
        torch.manual_seed(task_seed(seed, t))
        net.add_task(len(task.classes))
        current = subsample(task.train, settings["max_train_per_task"], task_seed(seed, t))
        train = concat([current, memory.data()])
        cfg = epoch_config(settings["stage1_epochs"], settings["stage1_lr"], settings["stage1_milestones"],
                           len(train), settings["batch_size"], optimizer="sgd",
                           weight_decay=settings["stage1_weight_decay"], max_steps=settings["train_steps"])
        losses = train_stage1(net, train, task.classes, scenario.num_classes, cfg, task_seed(seed, t))
        if t == 0:
            state.aux_head0 = {k: v.detach().cpu().clone() for k, v in net.aux_head.state_dict().items()}
        net.eval()
        path_t = lambda x: net.features(x, t)
        balanced = memory.balanced(path_t, current, task.classes) if t > 0 else None  # before the update
        memory.update(path_t, current, task.classes)
        state.memories.append(memory.data())
        state.balanced.append(balanced if balanced is not None else state.memories[-1])
        state.seconds.append(time.time() - t0)
        state.losses.append(losses)
        if checkpoint_dir is not None:
            tensors = with_prefix("aux_head0.", state.aux_head0)
            for i, a in enumerate(net.adapters):
                tensors.update(with_prefix(f"adapters.{i}.", a.state_dict()))
            for i, (mem, bal) in enumerate(zip(state.memories, state.balanced)):
                tensors[f"memory.{i}.images"], tensors[f"memory.{i}.labels"] = mem.images, mem.labels
                if i:  # task 0 has no stage 2 (its entry is the memory itself: safetensors refuses shared tensors)
                    tensors[f"balanced.{i}.images"], tensors[f"balanced.{i}.labels"] = bal.images, bal.labels
            checkpoints.save(t, tensors, {"seconds": state.seconds, "losses": state.losses})
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
    inference = INFERENCE_OF[method]
    dev = device()
    net = AdapterNet(copy.deepcopy(backbone), alpha=settings.get("adapter_alpha", 0.02),
                     bn_policy=settings["bn_policy"]).to(dev)
    net.inference = inference
    task_classes = [t.classes for t in scenario.tasks]
    R, acc_seen, mcr, task_acc, gflops, params, seconds, spread = [], [], [], [], [], [], [], []
    epochs2, milestones2 = stage2_schedule(settings, scenario_name)
    for t, task in enumerate(scenario.tasks):
        t0 = time.time()
        torch.manual_seed(task_seed(seed, t, HEAD_STAGE))
        net.add_task(len(task.classes))
        net.adapters[t].load_state_dict(stage1.adapters[t])
        net.merge()
        _control_bank(net, method)
        spread.append(adapter_spread(stage1.adapters[:t + 1]))
        if t == 0:
            net.heads[0].load_state_dict(stage1.aux_head0)
        else:
            balanced = stage1.balanced[t]
            cfg = epoch_config(epochs2, settings["stage2_lr"], milestones2, len(balanced), settings["batch_size"],
                               optimizer="adam", max_steps=settings["head_steps"])
            train_stage2(net, balanced, task_classes[:t + 1], scenario.num_classes, cfg,
                         task_seed(seed, t, HEAD_STAGE), inference)
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
                                  "alpha": [[float(a.alpha.detach()) for a in ad] for ad in net.adapters],
                                  "mean_class_recall": float(mcr[-1]), **feature_shifts(net, scenario)})


@torch.no_grad()
def _control_bank(net: AdapterNet, method: str) -> None:
    """The controls' bank in place of the average: the identity (α = 0 makes each adapter
    ``x + 0``) or the newest task's adapters."""
    if method == "no_adapters":
        for a in net.merged:
            a.alpha.zero_()
    elif method == "last_adapters":
        net.merged.load_state_dict(net.adapters[-1].state_dict())


@torch.no_grad()
def feature_shifts(net: AdapterNet, scenario: Scenario, n_images: int = SHIFT_IMAGES) -> dict[str, object]:
    """How far the adapters move the pooled features, on the first ``n_images`` pooled test images
    (a diagnostic for the regime check, not part of the method): ``feature_shift[t]`` =
    mean ``‖f_t(x) − f_0(x)‖ / ‖f_0(x)‖`` (task ``t``'s adapters against the bare backbone),
    ``merged_shift`` the same for the merged bank, and ``path_spread`` = mean over tasks of
    ``‖f_t(x) − f_merged(x)‖ / ‖f_merged(x)‖`` (how far the task paths are from the average)."""
    net.eval()
    x = torch.cat([t.test.images for t in scenario.tasks])[:n_images]
    x = to_float(x).to(next(net.parameters()).device)
    rel = lambda a, b: float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).mean())
    base, merged = net.features(x, None), net.features(x, "merged")
    paths = [net.features(x, t) for t in range(len(net.adapters))]
    return {"feature_shift": [rel(f, base) for f in paths], "merged_shift": rel(merged, base),
            "path_spread": float(sum(rel(f, merged) for f in paths) / len(paths))}
