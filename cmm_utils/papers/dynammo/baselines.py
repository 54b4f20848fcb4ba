"""The DynaMMo chapter's baselines: DER in its *expandable representation* sense (Yan et al., CVPR
2021; :class:`ExpandableNet`), the dynamic-expansion approach the paper's abstract compares DynaMMo's
GFLOPs and accuracy against, plus sequential fine-tuning and joint training, all run by
:func:`single_model_runs`. The deviations from the authors' code are listed in
:mod:`cmm_utils.papers.dynammo.method`'s docstring."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.core.checkpoints import TaskCheckpoints
from cmm_utils.core.continual import ContinualResult, gflops_per_image, seen_mask, state_bytes
from cmm_utils.core.data import Scenario
from cmm_utils.core.models import Classifier
from cmm_utils.core.seeds import HEAD_STAGE, task_seed
from cmm_utils.core.train import device, fit
from cmm_utils.papers.dynammo.common import (Memory, concat, epoch_config, evaluate, features_with_flips, fit_on_features,
                                             label_lookup, subsample)


# ------------------------------------------------------------------------ DER and single models
class ExpandableNet(nn.Module):
    """DER's expandable representation (Yan et al., "DER: Dynamically Expandable Representation for
    Class Incremental Learning", CVPR 2021), without the pruning mask, as the ACL/DynaMMo repository's
    ``DERNet``: one backbone per task (the new one a copy of the previous, the old ones frozen),
    features concatenated, one classifier over all classes, and an auxiliary head over the task's
    classes + one "old" output. Logits cover all ``num_classes`` global classes; callers mask unseen ones."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.template = [backbone]            # a list keeps it out of the module tree
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.backbones = nn.ModuleList()
        self.fc: nn.Linear | None = None
        self.aux: nn.Linear | None = None

    def add_task(self, n_new: int) -> None:
        for b in self.backbones:
            b.requires_grad_(False)
        source = self.backbones[-1] if len(self.backbones) else self.template[0]
        dev = next(source.parameters()).device
        self.backbones.append(copy.deepcopy(source).requires_grad_(True).to(dev))
        d, T = self.num_features, len(self.backbones)
        fc = nn.Linear(d * T, self.num_classes).to(dev)
        if self.fc is not None and dev.type != "meta":
            with torch.no_grad():
                fc.weight[:, : d * (T - 1)] = self.fc.weight
                fc.bias.copy_(self.fc.bias)
        self.fc, self.aux = fc, nn.Linear(d, n_new + 1).to(dev)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.backbones], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def inference_parameters(self) -> int:
        return sum(p.numel() for p in self.backbones.parameters()) + sum(p.numel() for p in self.fc.parameters())


def baseline_lr(settings: Mapping, method: str, scenario_name: str) -> float:
    """The learning rate of fine-tuning or joint training: ``finetune_lr`` / ``joint_lr`` where the
    profile has them (``paper``, from the authors' YAMLs: fine-tune 1e-3; joint 1e-4 on PATH16 and 1e-3
    on SKIN8, a mapping by scenario with ``"default"`` for the others), else ``baseline_lr``."""
    value = settings.get(f"{method}_lr", settings["baseline_lr"])
    if isinstance(value, Mapping):
        return float(value.get(scenario_name, value["default"]))
    return float(value)


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def _der_train_mode(net: ExpandableNet) -> None:
    net.eval()
    net.backbones[-1].train()


def single_model_runs(method: str, scenario: Scenario, backbone: nn.Module, settings: Mapping, seed: int,
                      budget: int, scenario_name: str = "", checkpoint_dir: Path | None = None) -> ContinualResult:
    """DER, fine-tuning or joint training, evaluated after each task under the pinned protocol.

    - ``finetune``: one model trained on each task's data in turn, CE over the classes seen so far.
    - ``joint``: after task ``t`` a fresh model trained on all training data of tasks ``0..t``.
    - ``der``: :class:`ExpandableNet`; per task, the new backbone, the classifier and (``t > 0``, as
      the authors: at ``t = 0`` the auxiliary head would only repeat the classifier) the auxiliary
      head trained on the task's data + memory (``CE(fc) + CE(aux)``), then (``t > 0``) the classifier
      reset and re-trained on the balanced set (built before the memory update, as the authors':
      :meth:`~cmm_utils.papers.dynammo.common.Memory.balanced`) with logits divided by
      ``der_temperature`` (the authors' ``dynamic_er`` stage 2); the memory updated by herding on the
      concatenated features.
    - learning rates: ``finetune_lr`` and ``joint_lr`` where the profile sets them (``paper``: the
      authors' YAMLs, :func:`baseline_lr`), else ``baseline_lr``.

    With ``checkpoint_dir``, the state after each task is saved (latest only) and a rerun resumes;
    the checkpoint is removed once the run is complete (its result is cached by the caller).
    """
    dev = device()
    C = scenario.num_classes
    cap = settings["max_train_per_task"]
    net: nn.Module
    net = ExpandableNet(copy.deepcopy(backbone).to(dev), C) if method == "der" else \
        Classifier(copy.deepcopy(backbone), C).to(dev)
    memory = Memory(budget)
    R, acc_seen, mcr, task_acc, gflops, params, seconds = [], [], [], [], [], [], []
    checkpoints = TaskCheckpoints(checkpoint_dir, method)
    resumed = checkpoints.latest()
    if resumed.tasks:
        meta, ck = resumed.meta, resumed.tensors
        if method == "der":
            for t in range(resumed.tasks):
                net.add_task(len(scenario.tasks[t].classes))
            net.backbones[-1].requires_grad_(False)
            memory = Memory.from_state(budget, ck)
        model_state = {k[6:]: v for k, v in ck.items() if k.startswith("model.")}
        net.load_state_dict(model_state)
        R, acc_seen, mcr, task_acc = meta["R"], meta["acc_seen"], meta["mcr"], meta["task_acc"]
        gflops, params, seconds = meta["gflops"], meta["params"], meta["seconds"]
    for t in range(resumed.tasks, len(scenario.tasks)):
        task = scenario.tasks[t]
        t0 = time.time()
        torch.manual_seed(task_seed(seed, t))
        mask = seen_mask(scenario, t)
        current = subsample(task.train, cap, task_seed(seed, t))
        if method == "joint":
            net = Classifier(copy.deepcopy(backbone), C).to(dev)
            train = concat([subsample(s.train, cap, task_seed(seed, i)) for i, s in enumerate(scenario.tasks[:t + 1])])
        else:
            train = current
        if method == "der":
            net.add_task(len(task.classes))
            train = concat([current, memory.data()])
            lut = label_lookup(task.classes, C)
            cfg = epoch_config(settings["der_epochs"], settings["der_lr"], settings["der_milestones"], len(train),
                               settings["batch_size"], optimizer="sgd", weight_decay=settings["stage1_weight_decay"],
                               max_steps=settings["train_steps"])

            def loss_fn(model, x, y, mask=mask, lut=lut, aux=t > 0):
                f = model.features(x)
                loss = F.cross_entropy(_masked(model.fc(f), mask), y)
                if not aux:  # the authors' DER adds the auxiliary loss from the second task on
                    return loss
                return loss + F.cross_entropy(model.aux(f[:, -model.num_features:]), lut.to(y.device)[y])

            params_ = [p for p in net.parameters() if p.requires_grad]
            fit(net, train, cfg, seed=task_seed(seed, t), params=params_, loss_fn=loss_fn, train_mode=_der_train_mode,
                desc=f"DER, task {t + 1}")
            net.eval()
            balanced = memory.balanced(net.features, current, task.classes) if t > 0 else None
            memory.update(net.features, current, task.classes)
            if t > 0:
                with torch.no_grad():
                    feats = features_with_flips(net.features, balanced)[None]
                net.fc = nn.Linear(net.fc.in_features, C).to(dev)
                temp = settings["der_temperature"]
                cfg2 = epoch_config(settings["der_ft_epochs"], settings["der_ft_lr"], settings["der_ft_milestones"],
                                    len(balanced), settings["batch_size"], optimizer="sgd",
                                    max_steps=settings["head_steps"])
                fit_on_features(lambda f, y: F.cross_entropy(_masked(net.fc(f[0].to(dev)) / temp, mask), y.to(dev)),
                                list(net.fc.parameters()), feats, balanced.labels, cfg2, task_seed(seed, t, HEAD_STAGE))
            for b in net.backbones:
                b.requires_grad_(False)
        else:
            cfg = epoch_config(settings["baseline_epochs"], baseline_lr(settings, method, scenario_name),
                               settings["baseline_milestones"],
                               len(train), settings["batch_size"], optimizer="sgd",
                               weight_decay=settings["stage1_weight_decay"], max_steps=settings["train_steps"])
            fit(net, train, cfg, seed=task_seed(seed, t),
                loss_fn=lambda model, x, y, mask=mask: F.cross_entropy(_masked(model(x), mask), y),
                desc=f"{method}, task {t + 1}")
        seconds.append(time.time() - t0)
        net.eval()
        row, acc, rec, tacc = evaluate(net, scenario, t)
        R.append(row), acc_seen.append(acc), mcr.append(rec), task_acc.append(tacc)
        gflops.append(gflops_per_image(net, task.test.images.shape[-1]))
        params.append(net.inference_parameters() if method == "der" else sum(p.numel() for p in net.parameters()))
        if checkpoint_dir is not None:
            tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
            if method == "der":
                tensors.update(memory.state())
            checkpoints.save(t, tensors, {"R": R, "acc_seen": acc_seen, "mcr": mcr, "task_acc": task_acc,
                                          "gflops": gflops, "params": params, "seconds": seconds})
    if checkpoint_dir is not None:  # finished: the caller caches the result; the weights are not needed again
        for old in checkpoint_dir.glob(f"{method}-task*.*"):
            old.unlink(missing_ok=True)
    kept = [net.state_dict()] + ([memory.data().images] if method == "der" else [])
    if method == "joint":
        kept.append(scenario.joint("train").images)
    return ContinualResult(method, R, acc_seen, bytes_stored=state_bytes(*kept), gflops=gflops[-1],
                           train_seconds=float(sum(seconds)),
                           extra={"mcr_seen": mcr, "task_acc_seen": task_acc, "gflops_per_task": gflops,
                                  "params_per_task": params, "seconds_per_task": seconds,
                                  "memory_size": len(memory.data()) if method == "der" else 0,
                                  "mean_class_recall": float(mcr[-1])})
