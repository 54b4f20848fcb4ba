"""The authors' loop over tasks (``finetune_splitted_linear.py``; ``cmm_utils.papers.cmm.stages``,
module docstring): fine-tune, merge, correct, evaluate, task after task, with per-task checkpoints.

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025), §3. Checkpoints are ``cmm_utils.core.checkpoints.TaskCheckpoints`` under
``cache_root()/cmm/checkpoints``: a run keeps its latest task; task 0, whose training the CMM
variants share, is kept apart so that every variant resumes from it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from cmm_utils.core.checkpoints import TaskCheckpoints
from cmm_utils.core.continual import ContinualResult, evaluate_seen_tasks, gflops_per_image
from cmm_utils.core.data import Scenario, Task
from cmm_utils.core.io import cache_root, config_key, save_state, strip_prefix, with_prefix
from cmm_utils.core.models.heads import FrozenHead, HeadedModel
from cmm_utils.core.seeds import task_seed
from cmm_utils.core.train import device, predict, seed_everything
from cmm_utils.papers.cmm.networks import encoder_dim, get_state, make_encoder, named_theta, set_state
from cmm_utils.papers.cmm.profiles import CHAPTER, CMMConfig
from cmm_utils.papers.cmm.stages import (adam_importance, carried_bytes, correct_representation, feature_distance,
                                         merge_step, subsample, train_task)

# settings a run's task 0 does not depend on (the CMM variants share it) / a seq-FT chain does not
NOT_IN_TASK0 = ("method", "merge", "alpha", "correction", "correction_loss", "representation_lr",
                "correction_weight_decay")
NOT_IN_CHAIN = NOT_IN_TASK0 + ("mismatch_images",)


def checkpoint_dir() -> Path:
    return cache_root() / CHAPTER / "checkpoints"


def checkpoint_name(identity: Mapping, cfg: CMMConfig, family: str, leave_out: tuple[str, ...]) -> str:
    """``<family>-<key>``: the key covers the run's identity and every setting not in ``leave_out``."""
    fam = {"family": family, **{k: v for k, v in asdict(cfg).items() if k not in leave_out}}
    return f"{family}-{config_key({**identity, **fam}, 16)}"


def cmm_checkpoints(identity: Mapping, cfg: CMMConfig) -> tuple[TaskCheckpoints, TaskCheckpoints]:
    """``(task 0, tasks 1..)`` of a CMM variant: task 0 is shared by the variants that train it alike."""
    return (TaskCheckpoints(checkpoint_dir(), checkpoint_name(identity, cfg, "cmm", NOT_IN_TASK0)),
            TaskCheckpoints(checkpoint_dir(), checkpoint_name(identity, cfg, "cmm", ("method",))))


def debug_states_path(identity: Mapping, cfg: CMMConfig) -> Path:
    """Where ``run_cmm(..., debug=True)`` saves the two-task states the paper's figures read
    (``cmm_utils.papers.cmm.figures.two_task_states``)."""
    return checkpoint_dir() / f"debug-{config_key({**identity, **asdict(cfg)}, 16)}.safetensors"


def run_cmm(scenario: Scenario, encoder0: nn.Module, head_fn: Callable[[Task], torch.Tensor], cfg: CMMConfig,
            seed: int, identity: Mapping, *, debug: bool = False, resume: bool = True,
            stop_after: int | None = None, image_size: int = 28, channels: int = 3) -> ContinualResult:
    """One CMM variant over a scenario (the authors' loop, module docstring): returns the R matrix
    and the book's measurements; ``extra`` holds per-task bytes carried, representation mismatch
    before/after correction, correction losses and importance statistics.

    Per-task checkpoints (θ, F, results so far; :func:`cmm_checkpoints`) make a rerun resume;
    ``debug=True`` also saves the two-task states the paper's figures need
    (:func:`debug_states_path`); ``stop_after=k`` stops after k tasks (the figures need two).
    """
    seed_everything(seed)
    dev = device()
    T, C = len(scenario.tasks), scenario.num_classes
    enc = make_encoder(encoder0, cfg.linear).to(dev)
    theta0 = get_state(encoder0)
    head = FrozenHead.unset(C, encoder_dim(encoder0), cfg.logit_scale).to(dev)
    net = HeadedModel(enc, head)
    R, acc_seen, bytes_per_task, mismatch, corr_losses, imp_stats = [], [], [], [], [], []
    seconds, importance, start, mcr, final_pred = 0.0, None, 0, float("nan"), None
    first, later = cmm_checkpoints(identity, cfg)
    if resume:
        found = first.latest() if debug else later.latest()  # the figures need task 1 recomputed from task 0
        if found.tasks == 0 and not debug:
            found = first.latest()
        if found.tasks:
            t, state, meta = found.tasks - 1, found.tensors, found.meta
            set_state(enc, strip_prefix(state, "theta."))
            importance = (strip_prefix(state, "F.") or None) if cfg.merge == "importance" else None
            R, acc_seen, mismatch = meta["R"], meta["acc_seen"], meta["mismatch"]
            # task 0 may come from another variant's run: count this variant's own state
            bytes_per_task = meta["bytes_per_task"][:t] + [carried_bytes(cfg.method, get_state(enc), theta0, importance)]
            corr_losses, imp_stats, seconds = meta["correction_losses"], meta["importance"], meta["seconds"]
            mcr, final_pred = meta.get("mean_class_recall", float("nan")), meta.get("final_pred")
            start = t + 1
    for t, task in enumerate(scenario.tasks[:stop_after]):
        head.set_rows(task.classes, head_fn(task))
        if t < start:
            continue
        train = subsample(task.train, cfg.max_train_per_task, task_seed(seed, t))
        prev = get_state(enc)
        tic = time.time()
        res = train_task(net, train, task.classes, C, cfg.fit_config(), task_seed(seed, t), desc=f"{cfg.method} task {t + 1}")
        new_importance = adam_importance(res.optimizer, named_theta(enc))
        new = get_state(enc)
        imp_stats.append({"task": t, "mean": float(torch.cat([v.flatten() for v in new_importance.values()]).mean()),
                          "zero_fraction": float(torch.cat([(v == 0).flatten().float() for v in new_importance.values()]).mean())})
        dbg = {}
        if t == 0:
            importance = new_importance if cfg.merge == "importance" else None
        else:
            prev_importance = importance
            merged, importance = merge_step(prev, prev_importance, new,
                                            new_importance if cfg.merge == "importance" else None, cfg.alpha, cfg.merge)
            set_state(enc, merged)
            teacher = make_encoder(encoder0, cfg.linear).to(dev)
            set_state(teacher, prev)
            probes = {"current": train.subset(np.arange(min(len(train), cfg.mismatch_images))),
                      "old": subsample(scenario.joint("test", upto=t - 1), cfg.mismatch_images, seed)}
            target = {k: predict(teacher, v) for k, v in probes.items()}
            before = {k: feature_distance(predict(enc, v), target[k]) for k, v in probes.items()}
            if cfg.correction:
                corr_losses.append(correct_representation(enc, teacher, train, cfg.correction_config(),
                                                          cfg.correction_loss, task_seed(seed, t)))
                after = {k: feature_distance(predict(enc, v), target[k]) for k, v in probes.items()}
            else:
                after = before
            for data in ("current", "old"):
                for stage, d in (("before", before), ("after", after)):
                    mismatch.append({"task": t, "data": data, "stage": stage, **d[data]})
            del teacher
            if debug and t == 1:
                dbg = {**with_prefix("prev.", prev), **with_prefix("prev_F.", prev_importance), **with_prefix("new.", new),
                       **with_prefix("new_F.", new_importance), **with_prefix("merged.", merged),
                       **with_prefix("corrected.", get_state(enc))}
        seconds += time.time() - tic
        score = evaluate_seen_tasks(net, scenario, t)
        R.append(score.row)
        acc_seen.append(score.accuracy)
        mcr, final_pred = score.mean_class_recall, score.predicted.tolist()  # per-image: the claims' bootstrap
        bytes_per_task.append(carried_bytes(cfg.method, get_state(enc), theta0, importance))
        meta = {"R": R, "acc_seen": acc_seen, "bytes_per_task": bytes_per_task, "mismatch": mismatch,
                "correction_losses": corr_losses, "importance": imp_stats, "seconds": seconds,
                "mean_class_recall": mcr, "final_pred": final_pred}
        (first if t == 0 else later).save(t, {**with_prefix("theta.", get_state(enc)), **with_prefix("F.", importance)},
                                          meta)
        if dbg:
            save_state(debug_states_path(identity, cfg), dbg)
    complete = len(R) == T
    if not complete:
        mcr = float("nan")
    elif math.isnan(mcr) or final_pred is None:  # resumed from a checkpoint written before checkpoints kept them
        score = evaluate_seen_tasks(net, scenario, T - 1)
        mcr, final_pred = score.mean_class_recall, score.predicted.tolist()
    gflops = gflops_per_image(net, image_size, channels)
    return ContinualResult(cfg.method, R, acc_seen, bytes_stored=bytes_per_task[-1], gflops=gflops,
                           train_seconds=seconds,
                           extra={"bytes_per_task": bytes_per_task, "mismatch": mismatch,
                                  "correction_losses": corr_losses, "importance": imp_stats,
                                  "mean_class_recall": mcr, "final_pred": final_pred if complete else None})
