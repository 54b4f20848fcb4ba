"""Holistic continual model merging (CMM): tangent-space fine-tuning, optimizer-state-weighted
merging and a post-merging representation correction, at constant memory and without old data.

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). Code read: github.com/VietHoang1512/CMM, ``finetune_splitted_linear.py``
(the method), ``src/linearize.py`` (the linearisation), ``finetune_splitted_linear_debug.py`` (the
figures). Research note: ``shared/research/magmax_cmm_code.md`` §3.

For task t = 1..T (the authors' loop, §3.6 of the note):

1. **Pre-merging** (:class:`~cmm_utils.papers.cmm.linearize.LinearizedModel`): fine-tune
   ``f(x;θ0) + J f(x;θ0)(θ−θ0)`` on task t, starting from the merged θ_{t−1}, with a fresh AdamW
   (weight decay 0.1, warm-up + cosine restarting each task, gradient clipping 1.0), a frozen
   head and a task-local softmax (:func:`train_task`).
2. **Merging** (:func:`merge_step`): ``F_t`` = Adam's ``exp_avg_sq`` of the task just trained
   (:func:`adam_importance`, no bias correction, as the authors);
   ``θ = ((1−α)F θ_{t−1} + α F_t θ_t) / ((1−α)F + α F_t)``, ``F ← (1−α)F + α F_t``
   (``cmm_utils.merging.pairwise.importance_weighted``; parameters without importance get F = 1).
3. **Post-merging correction** (:func:`correct_representation`): one pass over task t's training
   data that trains only the final projection so that the merged model's features match the
   previous merged model's (teacher θ_{t−1}), L1 or L2, AdamW at ``representation_lr``, clip 1.0.

Only θ, θ0 and F travel from task to task: a constant memory, whatever T (:func:`carried_bytes`).

Choices for the book's backbones (deviations from the authors' code, each deliberate):

- **Final projection.** CLIP's image tower ends in ``visual.proj`` (768x512), the only tensor the
  authors' correction trains. timm's ResNet-18/ViT end in a pooled feature with no projection, so
  :class:`ProjectedEncoder` appends one: a bias-free ``Linear(d, d)`` initialised to the identity
  (so θ0's function is unchanged), part of θ, linearised, fine-tuned and merged like every other
  parameter, exactly as CLIP's ``proj`` is. Correcting "the last linear layer of the backbone"
  instead would be ill-defined for a ResNet (its last layer is a convolution followed by BN).
- **Heads.** The authors classify with frozen zero-shot CLIP text heads (cosine × 100, built from
  the *pretrained* model), one per task in training (task-local softmax), all of them at
  evaluation. Our backbones have no text tower. The ``cpu``/``smoke`` default (since issue 12,
  ``head="prototype"``) is class means of the pretrained encoder's features on the task's training
  data (:func:`cmm_utils.core.models.heads.class_prototypes`; like a zero-shot head it depends only on θ0 and the class, is
  never trained and already classifies at θ0, but it reads current-task images), cosine × 16,
  task-local softmax in training and all seen classes at evaluation. The MagMax chapter uses the
  same head (its rows from the same θ0 class means), so the two chapters' runs stay comparable.
  ``head="fixed"`` (``cmm_utils.core.models.heads.fixed_head_weight``: data-free, seeded orthonormal
  class vectors) is the ablation: it carries no prior knowledge of the classes, so θ0 scores at
  chance and every task must build its classes from nothing. The
  ``paper`` profile uses the authors' zero-shot text heads (:func:`zero_shot_weights`, open_clip's
  ``build_zero_shot_classifier``; OpenAI's 80 ImageNet templates for every dataset, where the
  authors use 18 for CIFAR100 and 8 for Cars).
- **BatchNorm.** The linearised network runs with θ0's fixed BN statistics (see
  ``linearize.py``). The standard fine-tuning ablation updates BN statistics as usual; they are
  floating buffers without importance, so they are interpolated plainly. The correction runs the
  student in eval mode (only the projection changes; BN statistics stay fixed).
- **Evaluation.** The book's pinned protocol (``cmm_utils.core.continual``): after task t, all classes
  scored, predictions restricted to the classes seen so far. The authors score all classes of the
  dataset including unseen ones at intermediate steps; the final-task numbers coincide.
- **Guard.** Where both importances are 0 the authors' formula is 0/0; ``merge.importance_weighted``
  falls back to plain interpolation there.
- **CLIP input** (``paper``): ``cmm_utils.core.models.clip.ClipImageEncoder`` re-normalises the book's
  ImageNet-normalised batches with OpenAI's constants and upsamples smaller images to 224 px
  (bicubic), so CIFAR100 is kept at 32 px in memory; the authors' train transform also crops
  (``RandomResizedCrop(scale=(0.9, 1))``), ours only flips.
- The correction's AdamW keeps PyTorch's default weight decay 0.01, as the authors' code does.

The networks live in ``cmm_utils.papers.cmm.networks`` (the frozen heads in ``cmm_utils.core.models.heads``), the
computations behind the chapter's figures in ``cmm_utils.papers.cmm.figures``; this module holds the three
stages, ``loop`` the authors' loop over tasks with its per-task checkpoints, ``baselines`` seq-FT and
the MagMax paper's merges, ``runs`` the cached entry point :func:`cmm_utils.papers.cmm.run`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils import merging
from cmm_utils.core.continual import state_bytes, task_local_loss
from cmm_utils.core.data import LabeledImages
from cmm_utils.core.models.heads import HeadedModel
from cmm_utils.core.train import FitConfig, FitResult, fit
from cmm_utils.papers.cmm.networks import named_theta, projection_name
from cmm_utils.papers.cmm.profiles import CORRECTION_LOSSES, SWITCHES


def subsample(data: LabeledImages, n: int | None, seed: int) -> LabeledImages:
    """A seeded random subset of ``n`` images (kept in their original order); all if ``n`` is None."""
    if n is None or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    return data.subset(idx)



def train_task(net: HeadedModel, data: LabeledImages, classes: Sequence[int], num_classes: int, cfg: FitConfig,
               seed: int, desc: str = "train") -> FitResult:
    """Pre-merging: fine-tune the encoder (linearised or not) on one task under its frozen head."""
    params = [p for _, p in named_theta(net.backbone)]
    return fit(net, data, cfg, seed=seed, params=params, loss_fn=task_local_loss(classes, num_classes), desc=desc)


def adam_importance(optimizer: torch.optim.Optimizer, named_params: Sequence[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Adam's second moments ``exp_avg_sq`` (raw EMA of squared clipped gradients, no bias
    correction) keyed by parameter name: the authors' importance ``F_t``. Parameters that never
    received a step are left out (they merge with F = 1)."""
    out = {}
    for name, p in named_params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            out[name] = state["exp_avg_sq"].detach().clone().cpu()
    return out


def merge_step(prev: Mapping[str, torch.Tensor], prev_importance: Mapping[str, torch.Tensor] | None,
               new: Mapping[str, torch.Tensor], new_importance: Mapping[str, torch.Tensor] | None,
               alpha: float, rule: str = "importance"):
    """Merging: ``(θ, F)`` after one CMM merge (``importance``, ``merge.importance_weighted``) or the
    plain-interpolation ablation ``(1−α)θ_{t−1} + αθ_t`` (``interpolate``; F is not kept)."""
    if rule == "importance":
        if prev_importance is None or new_importance is None:
            raise ValueError("rule='importance' needs both importances")
        return merging.importance_weighted(prev, prev_importance, new, new_importance, alpha)
    if rule == "interpolate":
        return merging.linear_interpolation(prev, new, alpha), None
    raise ValueError(f"unknown merge rule {rule!r}; valid: 'importance', 'interpolate'")


def _feature_loss(kind: str):
    if kind not in CORRECTION_LOSSES:
        raise ValueError(f"unknown correction loss {kind!r}; valid: {', '.join(CORRECTION_LOSSES)}")
    return F.l1_loss if kind == "l1" else F.mse_loss


def correct_representation(student: nn.Module, teacher: nn.Module, data: LabeledImages, cfg: FitConfig,
                           loss: str = "l1", seed: int = 0) -> list[float]:
    """Post-merging correction: one pass over ``data`` training only the final projection of
    ``student`` so that its features match ``teacher``'s (L1 or MSE on unnormalised features).

    As the authors: teacher = the previous merged model, frozen, eval mode; AdamW(proj, rep. lr)
    with PyTorch's default weight decay 0.01; clip 1.0; current-task data with training
    augmentation; no schedule. The student runs in eval mode (fixed BN statistics, our choice).
    Returns the per-step losses.
    """
    name = projection_name(student)
    theta = dict(named_theta(student))
    proj = theta[name]
    flags = {n: p.requires_grad for n, p in theta.items()}
    for p in theta.values():
        p.requires_grad_(False)
    proj.requires_grad_(True)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fn = _feature_loss(loss)

    def loss_fn(model, x, _y):
        with torch.no_grad():
            target = teacher(x)
        return fn(model(x), target)

    try:
        result = fit(student, data, cfg, seed=seed, params=[proj], loss_fn=loss_fn,
                     train_mode=lambda m: m.eval(), desc="correction")
    finally:
        for n, p in theta.items():
            p.requires_grad_(flags[n])
    return result.losses


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean L1 and mean squared distance between two feature matrices (the representation
    mismatch of the paper's Fig. 3, in the correction losses' own units)."""
    return {"l1": float(F.l1_loss(a, b)), "l2": float(F.mse_loss(a, b))}


def carried_bytes(method: str, theta: Mapping, theta0: Mapping, importance: Mapping | None) -> int:
    """What a CMM variant keeps from one task to the next (``continual.state_bytes``): θ, plus θ0
    if linearised (the linearisation point), plus F if importance-weighted."""
    spec = SWITCHES[method]
    parts = [theta] + ([theta0] if spec["linear"] else []) + ([importance] if importance is not None else [])
    return state_bytes(*parts)


