"""Shared machinery of the DynaMMo chapter's methods (Qazi et al., MIUA 2024, arXiv:2404.14099):
used alike by DynaMMo/ACL (:mod:`cmm_utils.papers.dynammo.method`) and the DER / fine-tune / joint baselines
(:mod:`cmm_utils.papers.dynammo.baselines`), so it lives below both.

- data helpers: class-stratified subsampling, concatenation, epoch-based MultiStep schedules;
- the exemplar memory: iCaRL herding under a fixed total budget (paper Sec. 2, step 2);
- training heads on precomputed (and flipped) features (DynaMMo's stage 2, DER's balanced re-training);
- evaluation after each task (the pinned row, mean class recall and task accuracy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.core.continual import evaluate_seen_tasks
from cmm_utils.core.data import LabeledImages, Scenario, make_split
from cmm_utils.core.train import (FitConfig, check_finite_loss, check_finite_weights, lr_factor, make_optimizer,
                                  predict)


def epoch_config(epochs: int, lr: float, milestones: Sequence[int], n: int, batch_size: int, *,
                 optimizer: str = "sgd", weight_decay: float = 0.0, max_steps: int | None = None,
                 augment: bool = True) -> FitConfig:
    """A :class:`FitConfig` whose MultiStep milestones, given in epochs as in the authors' YAMLs,
    are converted to optimiser steps for ``n`` training samples."""
    per_epoch = max(1, math.ceil(n / batch_size))
    return FitConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                     weight_decay=weight_decay, schedule="multistep" if milestones else "constant",
                     milestones=tuple(m * per_epoch for m in milestones), augment=augment, max_steps=max_steps)


def subsample(data: LabeledImages, max_n: int | None, seed: int) -> LabeledImages:
    """At most ``max_n`` training images, a seeded class-stratified subset that keeps the class
    proportions (the ``cpu`` profile's time budget); ``None`` keeps everything."""
    if max_n is None or len(data) <= max_n:
        return data
    _, held = make_split(data.labels.numpy(), max_n / len(data), seed)
    return data.subset(np.sort(held))


def concat(parts: Sequence[LabeledImages]) -> LabeledImages:
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("nothing to concatenate")
    return LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


# ------------------------------------------------------------------------------------- memory
def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding (Rebuffi et al., CVPR 2017, Alg. 4), as DynaMMo's ``replayBank`` L403-423:
    on L2-normalised features, greedily pick (without replacement) the sample that keeps the mean of
    the picked ones closest to the class mean (the mean itself is not re-normalised).
    Returns indices in selection order; ``m`` larger than the class gives every sample."""
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = ((mu - (running + f) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += f[i]
    return torch.tensor(chosen, dtype=torch.long)


@dataclass
class Memory:
    """Exemplars per class in herding order, under a fixed total ``budget`` split evenly over the
    seen classes (``per_class = budget // seen``; DynaMMo's ``fixed_memory: false``)."""
    budget: int
    classes: dict[int, LabeledImages] = field(default_factory=dict)

    def per_class(self, n_seen: int) -> int:
        return self.budget // max(1, n_seen)

    def update(self, feature_fn: Callable[[torch.Tensor], torch.Tensor], data: LabeledImages,
               new_classes: Sequence[int]) -> None:
        """Truncate old classes to the new quota, then herd the quota of each new class."""
        m = self.per_class(len(self.classes) + len(new_classes))
        self.classes = {c: ex.subset(np.arange(min(m, len(ex)))) for c, ex in self.classes.items()}
        for c in new_classes:
            part = data.subset(np.flatnonzero(data.labels.numpy() == c))
            if len(part) == 0 or m == 0:
                self.classes[c] = part.subset(np.arange(0))
                continue
            pick = herding(predict(feature_fn, part), m)
            self.classes[c] = part.subset(pick.numpy())

    def balanced(self, feature_fn: Callable[[torch.Tensor], torch.Tensor], data: LabeledImages,
                 new_classes: Sequence[int]) -> LabeledImages:
        """The class-balanced set of DynaMMo's stage 2 (and DER's classifier re-training) as the
        authors build it (``replayBank.get_unified_sample_dataset``, called *before* the memory is
        updated for the new task): the memory as it stands, old classes at the old quota
        ``budget // (old classes)``, plus that many herded images of each new class. On SKIN8 (budget
        40, tasks of 2 classes) that is 40 + 40 = 80 images at the second task, where the memory after
        its update (10 per class) would give 40. Call it before :meth:`update`."""
        m = self.per_class(len(self.classes))
        parts = [self.data()] if self.classes else []
        for c in new_classes:
            part = data.subset(np.flatnonzero(data.labels.numpy() == c))
            if len(part) and m:
                parts.append(part.subset(herding(predict(feature_fn, part), m).numpy()))
        return concat(parts)

    def data(self) -> LabeledImages:
        parts = [self.classes[c] for c in sorted(self.classes)]
        if not parts or not sum(len(p) for p in parts):
            first = next(iter(self.classes.values()), None)
            shape = (0,) + tuple(first.images.shape[1:]) if first is not None else (0, 3, 1, 1)
            return LabeledImages(torch.zeros(shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
        return concat(parts)

    def state(self) -> dict[str, torch.Tensor]:
        d = self.data()
        return {"memory_images": d.images, "memory_labels": d.labels}

    @classmethod
    def from_state(cls, budget: int, state: Mapping[str, torch.Tensor]) -> "Memory":
        images, labels = state["memory_images"], state["memory_labels"]
        out = cls(budget)
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).flatten()
            out.classes[int(c)] = LabeledImages(images[idx], labels[idx])
        return out


# ----------------------------------------------------------------------- training on features
def label_lookup(classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Global label -> local index in ``classes``, or ``len(classes)`` ("others") for the rest."""
    lut = torch.full((num_classes,), len(classes), dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    return lut


def features_with_flips(feature_fn: Callable[[torch.Tensor], torch.Tensor], data: LabeledImages,
                        augment: bool = True) -> torch.Tensor:
    """``[2, N, d]``: features of the images and of their horizontal flips (``[1, N, d]`` without
    augmentation). With a frozen extractor, picking one of the two per sample and step is exactly
    training under random horizontal flips (the authors' train transform)."""
    views = [predict(feature_fn, data)]
    if augment:
        views.append(predict(feature_fn, LabeledImages(data.images.flip(-1), data.labels)))
    return torch.stack(views)


def fit_on_features(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params: Sequence[nn.Parameter],
                    feats: torch.Tensor, labels: torch.Tensor, cfg: FitConfig, seed: int,
                    desc: str = "dynammo: head on features") -> list[float]:
    """Minimise ``loss_fn(batch_feats [P, b, d], labels [b])`` over ``feats [P, V, N, d]`` (P feature
    sources, V views: original and flipped), with the seeded order and the schedule of ``cfg``; a
    non-finite loss or weight stops it with :class:`~cmm_utils.core.train.DivergedError`, as in ``fit``."""
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    n = feats.shape[2]
    per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.schedule, 0, cfg.milestones))
    losses, step = [], 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = order[start:start + cfg.batch_size]
            view = (torch.rand(len(idx), generator=gen) < 0.5).long() if feats.shape[1] > 1 \
                else torch.zeros(len(idx), dtype=torch.long)
            loss = loss_fn(feats[:, view, idx], labels[idx])
            value = float(loss.detach())
            check_finite_loss(value, desc, step, total, opt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(value)
            step += 1
        check_finite_weights(list(params), desc, step, total, opt)
    return losses


# --------------------------------------------------------------------------------- evaluation
def evaluate(logits_fn: Callable[[torch.Tensor], torch.Tensor], scenario: Scenario, t: int) -> tuple[list, float, float, float]:
    """The pinned row ``R[t, :]``, pooled accuracy and mean class recall over the seen classes
    (:func:`~cmm_utils.core.continual.evaluate_seen_tasks`), plus, from the same predictions, the task
    accuracy: how often the predicted class belongs to the right task (for DynaMMo and ACL, how often
    the min-others rule routes an image to its own task's head)."""
    score = evaluate_seen_tasks(logits_fn, scenario, t)
    task_of = torch.zeros(scenario.num_classes, dtype=torch.long)
    for i, task in enumerate(scenario.tasks):
        task_of[list(task.classes)] = i
    task_acc = (float((task_of[score.predicted] == task_of[score.labels]).float().mean())
                if len(score.labels) else float("nan"))
    return score.row, score.accuracy, score.mean_class_recall, task_acc
