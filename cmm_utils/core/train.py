"""One loop to fit and evaluate: batches from in-memory uint8 tensors, seeded order, schedules.

The optimiser is returned so methods can read its state (CMM merges with Adam's second moments).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cmm_utils.core.data import LabeledImages
from cmm_utils.core.device import MixedPrecision, device, to_device  # noqa: F401  (CMM_DEVICE, CMM_PRECISION)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "multistep")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs; deterministic algorithms where torch has them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_float(images: torch.Tensor, *, train: bool = False, generator: torch.Generator | None = None,
             mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` to normalised float; in training, a seeded per-sample horizontal flip."""
    x = images.float().div_(255.0)
    if train:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def batches(data: LabeledImages, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            pin_memory: bool | None = None):
    """``(images, labels)`` batches of ``data`` in a seeded order. The images are in memory already
    (decoded once at load), so a batch is one gather; on CUDA (``pin_memory`` None: when the device
    setting is CUDA) it lands in pinned memory, as a DataLoader's ``pin_memory`` would put it, so the
    copy to the GPU is a DMA transfer (asynchronous with ``.to(dev, non_blocking=True)``)."""
    pin = device().type == "cuda" if pin_memory is None else pin_memory
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        idx = order[start:start + batch_size]
        images, labels = data.images[idx], data.labels[idx]
        yield (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups, e.g. {"params": [...], "lr": ...}
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, milestones: tuple = (), gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``.

    ``warmup_cosine`` is mlfoundations' ``cosine_lr`` that MagMax and CMM use: linear warm-up
    ``(step+1)/warmup``, then cosine to 0 over the remaining steps. Like the authors', the warm-up
    length is in steps and restarts per task, so short tasks may never leave warm-up.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    if schedule == "warmup_cosine":
        if step < warmup:
            return (step + 1) / warmup
        e, es = step - warmup, max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * e / es))
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


@dataclass
class FitConfig:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    milestones: tuple = ()
    clip_grad: float | None = None
    augment: bool = True
    max_steps: int | None = None  # cap for smoke runs and one-step tests


class DivergedError(RuntimeError):
    """A run whose loss or weights became NaN/inf: it must never be merged, scored or cached."""


def _lrs(opt: torch.optim.Optimizer) -> str:
    lrs = sorted({float(g["lr"]) for g in opt.param_groups})
    return ", ".join(f"{lr:.3g}" for lr in lrs)


def check_finite_loss(value: float, desc: str, step: int, total: int, opt: torch.optim.Optimizer) -> None:
    """Stop at the first non-finite loss (the value is already on the host: no extra sync)."""
    if not math.isfinite(value):
        raise DivergedError(f"{desc}: loss is {value} at step {step} of {total} (0-based; lr {_lrs(opt)}); "
                            "the run diverged and nothing of it is cached. Lower the learning rate or set clip_grad")


def check_finite_weights(params: list, desc: str, step: int, total: int, opt: torch.optim.Optimizer) -> None:
    """Every optimised tensor finite: a finite last loss does not prove the last update was."""
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    bad = sum(int(not torch.isfinite(p.detach()).all()) for p in tensors)
    if bad:
        raise DivergedError(f"{desc}: {bad} of {len(tensors)} parameter tensors hold NaN/inf after step {step} of "
                            f"{total} (lr {_lrs(opt)}); the run diverged and nothing of it is cached. Lower "
                            "the learning rate or set clip_grad")


@dataclass
class FitResult:
    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    steps: int = 0


def fit(model: nn.Module, data: LabeledImages, cfg: FitConfig, *, seed: int = 0,
        params: Iterable[nn.Parameter] | None = None,
        loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        desc: str = "train", train_mode: Callable[[nn.Module], None] | None = None) -> FitResult:
    """Fit ``model`` on ``data`` with a seeded order; ``loss_fn(model, x, y)`` defaults to CE.

    ``params`` restricts what is optimised (default: parameters with ``requires_grad``); it may
    also be a list of optimizer parameter groups (dicts with ``"params"`` and e.g. ``"lr"``);
    ``train_mode`` sets train/eval per module (default ``model.train()``), e.g. to keep a
    frozen backbone's BatchNorm statistics fixed. A non-finite loss (checked every step) or weight
    (checked after every epoch) raises :class:`DivergedError` naming ``desc``, the step and the
    learning rate, so a diverged run is never cached, merged or scored.
    """
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, cfg.schedule, cfg.warmup_steps, cfg.milestones))
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    (train_mode or (lambda m: m.train()))(model)
    result = FitResult(opt)
    amp = MixedPrecision(dev)  # CMM_PRECISION on CUDA; fp32 (exactly the plain loop) elsewhere
    with tqdm(total=total, desc=desc, leave=False) as bar:
        for _ in range(cfg.epochs):
            for images, labels in batches(data, cfg.batch_size, shuffle=True, generator=gen):
                if result.steps >= total:
                    break
                x = to_float(images.to(dev), train=cfg.augment, generator=gen)
                with amp.autocast():
                    loss = loss_fn(model, x, labels.to(dev))
                value = float(loss.detach())
                check_finite_loss(value, desc, result.steps, total, opt)
                opt.zero_grad(set_to_none=True)
                amp.backward(loss, opt)
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params,
                        cfg.clip_grad)
                amp.step(opt)
                sched.step()
                result.losses.append(value)
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
            check_finite_weights(params, desc, result.steps, total, opt)
    return result


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], data: LabeledImages, batch_size: int = 256) -> torch.Tensor:
    """Concatenated outputs of ``fn`` (logits or features) over ``data`` in order, on the CPU."""
    if isinstance(fn, nn.Module):
        fn.eval()
        dev = next(fn.parameters()).device
    else:
        dev = device()
    with MixedPrecision(dev).autocast():
        outs = [fn(to_float(images.to(dev))).float().cpu() for images, _ in batches(data, batch_size, shuffle=False)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
