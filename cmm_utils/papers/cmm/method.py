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
   (``cmm_utils.merging.kernels.importance_weighted``; parameters without importance get F = 1).
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
  evaluation. Our backbones have no text tower. The ``cpu``/``smoke`` default (``head="fixed"``)
  is the MagMax chapter's analogue, ``cmm_utils.core.models.heads.fixed_head_weight``: frozen, data-free,
  seeded orthonormal class vectors, cosine × 16, task-local softmax in training and all seen
  classes at evaluation. Using the *same* head as the MagMax chapter keeps the two chapters' runs
  (and the leaderboard's rows) comparable; unlike CLIP's head it carries no prior knowledge of the
  classes. ``head="prototype"`` is the other analogue we tried: class means of the pretrained
  encoder's features on the task's training data (:func:`prototype_weights`; like a zero-shot head
  it depends only on θ0 and the class and is never trained, but it reads current-task images). The
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

The networks and frozen heads live in ``cmm_utils.papers.cmm.networks`` (re-exported here), the
computations behind the chapter's figures in ``cmm_utils.papers.cmm.figures``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.merging import kernels as mg
from cmm_utils.core.benchmarks import load_benchmark
from cmm_utils.papers.cmm.networks import (TEMPLATES, CMMNet, CosineHead, ProjectedEncoder, encoder_dim, get_state, make_encoder,
                                           named_theta, projection_name, prototype_weights, set_state, template_list,
                                           zero_shot_weights)
from cmm_utils.core.continual import (ContinualResult, cached_run, evaluate_seen_tasks, gflops_per_image, pooled_mean_class_recall,
                                      scenario_fingerprint, state_bytes, task_local_loss)
from cmm_utils.core.data import LabeledImages, Scenario, Task
from cmm_utils.core.io import cache_root, config_key, load_meta, load_state, save_state, strip_prefix, with_prefix
from cmm_utils.papers.cmm.linearize import LinearizedModel
from cmm_utils.core.train import FitConfig, FitResult, device, fit, predict, seed_everything

__all__ = [
    # profiles and configs
    "CHAPTER", "PROFILES", "PAPER_DATASETS", "IMAGE_SIZE", "METHODS", "CMM_METHODS", "BASELINES", "MAGMAX_SCALE",
    "CORRECTION_LOSSES", "HEADS", "BACKBONES", "TEMPLATES", "CMMConfig", "method_config",
    # networks and heads (cmm_utils.papers.cmm.networks), the linearisation (cmm_utils.papers.cmm.linearize)
    "ProjectedEncoder", "projection_name", "encoder_dim", "CosineHead", "CMMNet", "named_theta", "get_state",
    "set_state", "make_encoder", "prototype_weights", "template_list", "zero_shot_weights", "LinearizedModel",
    # encoders θ0
    "build_encoder", "head_weights_fn",
    # the three stages
    "subsample", "train_task", "adam_importance", "merge_step", "correct_representation", "feature_distance",
    "carried_bytes",
    # runs
    "weights_fingerprint", "run_cmm", "run_seq_baseline",
    # entry points
    "load_scenario", "run_config", "run_cmm_method", "cached_method_run", "benchmark_run", "majority_reference",
]

CHAPTER = "cmm"

# --------------------------------------------------------------------------- profiles
# Profiles are data. ``seeds`` is how many seeds (starting at the notebook's ``seed``).
# smoke/cpu: the recipe scaled to 28 px and a one-pass budget (lr 1e-3, a few warm-up steps);
# ``representation_lr`` keeps the authors' ratio to ``lr`` in their main runs (1e-7 / 1e-5).
PROFILES = {
    "smoke": dict(
        dataset="ham10000-cil", n_tasks=3, seeds=1, backbone="resnet18", head="fixed",
        logit_scale=16.0, templates="photo", max_per_split=150, image_size=28,
        epochs=1, lr=1e-3, weight_decay=0.1, batch_size=32, warmup_steps=1, clip_grad=1.0,
        max_train_per_task=64, max_steps=2,
        alpha=0.4, correction_loss="l1", representation_lr=1e-5, correction_weight_decay=0.01,
        mismatch_images=32, benchmarks=(), alpha_grid=3, path_images=32, tsne_images=24),
    "cpu": dict(
        dataset="ham10000-cil", n_tasks=3, seeds=3, backbone="resnet18", head="fixed",
        logit_scale=16.0, templates="photo", max_per_split=None, image_size=28,
        epochs=1, lr=1e-3, weight_decay=0.1, batch_size=32, warmup_steps=3, clip_grad=1.0,
        max_train_per_task=512, max_steps=None,
        alpha=0.4, correction_loss="l1", representation_lr=1e-5, correction_weight_decay=0.01,
        mismatch_images=128, benchmarks=("ham10000-cil", "medical-dil"), alpha_grid=11,
        path_images=256, tsne_images=150),
    # The authors' recipe (note §2.3, §3.2, §3.8): CLIP ViT-B/16 (openai), AdamW 1e-5, wd 0.1,
    # batch 128, 500 warm-up steps per task, 10 epochs, α 0.4, rep. lr 1e-7, l2 (CIFAR100), seed 5.
    # ImageNet-R, CUB200 and Cars have no manifest in the book yet (pass their path when they do).
    "paper": dict(
        dataset="cifar100", n_tasks=10, seeds=1, backbone="clip_vit_b16", head="zeroshot",
        logit_scale=100.0, templates="openai_imagenet", max_per_split=None, image_size=None,
        epochs=10, lr=1e-5, weight_decay=0.1, batch_size=128, warmup_steps=500, clip_grad=1.0,
        max_train_per_task=None, max_steps=None,
        alpha=0.4, correction_loss="l2", representation_lr=1e-7, correction_weight_decay=0.01,
        mismatch_images=1024, benchmarks=("ham10000-cil", "medical-dil"), alpha_grid=21,
        path_images=2048, tsne_images=500),
}
PAPER_DATASETS = ("cifar100", "imagenet-r", "cub200", "cars")  # the paper's CIL datasets
IMAGE_SIZE = {"smoke": 28, "cpu": 28, "paper": 224}  # what the encoder sees (FLOP counts)

# Each method: the three switches of the ablation, or a sequential-fine-tuning baseline.
METHODS = {
    "cmm": {"linear": True, "merge": "importance", "correction": True},
    "cmm-no-linear": {"linear": False, "merge": "importance", "correction": True},
    "cmm-no-fisher": {"linear": True, "merge": "interpolate", "correction": True},
    "cmm-no-correction": {"linear": True, "merge": "importance", "correction": False},
    "seq-ft": {"linear": False, "merge": "last", "correction": False},
    "average": {"linear": False, "merge": "average", "correction": False},
    "magmax": {"linear": False, "merge": "magmax", "correction": False},
}
CMM_METHODS = tuple(m for m in METHODS if m.startswith("cmm"))
BASELINES = ("seq-ft", "average", "magmax")
MAGMAX_SCALE = 0.5  # the authors' λ for MagMax (note §2.5)
CORRECTION_LOSSES = ("l1", "l2")
HEADS = ("fixed", "prototype", "zeroshot")
BACKBONES = ("resnet18", "densenet121", "vit_tiny", "clip_vit_b16")


@dataclass(frozen=True)
class CMMConfig:
    """Everything that changes a run's numbers (the cache key), nothing that only changes plots."""
    method: str = "cmm"
    linear: bool = True
    merge: str = "importance"        # importance | interpolate | last | average | magmax
    correction: bool = True
    alpha: float = 0.4
    correction_loss: str = "l1"
    representation_lr: float = 1e-7
    correction_weight_decay: float = 0.01
    epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 128
    warmup_steps: int = 500
    clip_grad: float = 1.0
    max_train_per_task: int | None = None
    max_steps: int | None = None
    head: str = "prototype"
    logit_scale: float = 100.0
    templates: str = "openai_imagenet"
    mismatch_images: int = 256

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer="adamw",
                         weight_decay=self.weight_decay, schedule="warmup_cosine",
                         warmup_steps=self.warmup_steps, clip_grad=self.clip_grad, max_steps=self.max_steps)

    def correction_config(self) -> FitConfig:
        return FitConfig(epochs=1, lr=self.representation_lr, batch_size=self.batch_size, optimizer="adamw",
                         weight_decay=self.correction_weight_decay, schedule="constant",
                         clip_grad=1.0, max_steps=self.max_steps)


def method_config(method: str, settings: Mapping) -> CMMConfig:
    """The :class:`CMMConfig` of ``method`` under a profile row ``settings`` (see :data:`PROFILES`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if settings.get("correction_loss", "l1") not in CORRECTION_LOSSES:
        raise ValueError(f"unknown correction_loss {settings['correction_loss']!r}; valid: {', '.join(CORRECTION_LOSSES)}")
    if settings.get("head", "prototype") not in HEADS:
        raise ValueError(f"unknown head {settings['head']!r}; valid: {', '.join(HEADS)}")
    if not 0.0 <= float(settings.get("alpha", 0.4)) <= 1.0:
        raise ValueError(f"alpha={settings['alpha']!r} must lie in [0, 1]")
    fields = {f for f in CMMConfig.__dataclass_fields__}
    kw = {k: v for k, v in settings.items() if k in fields}
    return CMMConfig(method=method, **METHODS[method], **kw)


# --------------------------------------------------------------------------- encoders θ0
def build_encoder(backbone: str, profile: str, *, pretrained: bool | None = None, seed: int = 0):
    """θ0 of a run: ``(encoder, clip)``. ``clip = (model, tokenizer)`` for the CLIP backbone (the
    text tower builds the zero-shot heads), else None.

    ``clip_vit_b16``: open_clip ``ViT-B-16``, ``pretrained="openai"`` in the ``paper`` profile
    (``pretrained=False`` gives random weights, for tests). Other names: the book's backbone of the
    profile (``cmm_utils.core.models.book_backbone``) with the identity projection appended.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if backbone == "clip_vit_b16":
        import open_clip  # lazy: only the paper profile needs it

        from cmm_utils.core.models.clip import ClipImageEncoder  # OpenAI normalisation, upsampling to 224 px

        use = (profile == "paper") if pretrained is None else pretrained
        model = open_clip.create_model("ViT-B-16", pretrained="openai" if use else None)
        model.eval()
        return ClipImageEncoder(model.visual).eval(), (model, open_clip.get_tokenizer("ViT-B-16"))
    from cmm_utils.core.models import book_backbone

    return ProjectedEncoder(book_backbone(backbone, profile, verbose=False)), None


def head_weights_fn(cfg: CMMConfig, encoder0: nn.Module, clip, scenario: Scenario) -> Callable[[Task], torch.Tensor]:
    """``task -> rows of the frozen head for task.classes`` (see the module docstring, "Heads")."""
    if cfg.head == "zeroshot":
        if clip is None:
            raise ValueError("head='zeroshot' needs the CLIP backbone (backbone='clip_vit_b16')")
        table = zero_shot_weights(clip[0], clip[1], scenario.class_names, cfg.templates)
        return lambda task: table[list(task.classes)]
    if cfg.head == "fixed":
        from cmm_utils.core.models.heads import fixed_head_weight  # the MagMax chapter's head: same head, comparable runs

        table = fixed_head_weight(scenario.num_classes, encoder_dim(encoder0), 1.0)
        return lambda task: table[list(task.classes)]
    enc = encoder0.to(device()).eval()
    cap = cfg.max_train_per_task
    return lambda task: prototype_weights(enc, subsample(task.train, cap, 0), task.classes)


# --------------------------------------------------------------------------- the three stages
def subsample(data: LabeledImages, n: int | None, seed: int) -> LabeledImages:
    """A seeded random subset of ``n`` images (kept in their original order); all if ``n`` is None."""
    if n is None or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    return data.subset(idx)


def train_task(net: CMMNet, data: LabeledImages, classes: Sequence[int], num_classes: int, cfg: FitConfig,
               seed: int, desc: str = "train") -> FitResult:
    """Pre-merging: fine-tune the encoder (linearised or not) on one task under its frozen head."""
    params = [p for _, p in named_theta(net.encoder)]
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
        return mg.importance_weighted(prev, prev_importance, new, new_importance, alpha)
    if rule == "interpolate":
        return mg.linear_interpolation(prev, new, alpha), None
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
    spec = METHODS[method]
    parts = [theta] + ([theta0] if spec["linear"] else []) + ([importance] if importance is not None else [])
    return state_bytes(*parts)


# --------------------------------------------------------------------------- runs
@torch.no_grad()
def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of a network's weights (names, shapes, sums): θ0 is part of every cache key, so
    a re-pretrained backbone never reuses checkpoints or results made from the old one."""
    parts = [[k, list(v.shape), float(v.double().sum()), float(v.double().abs().sum())]
             for k, v in module.state_dict().items()]
    return config_key(parts, 16)


def _ckpt_dir() -> Path:
    return cache_root() / CHAPTER / "checkpoints"


def _ckpt_path(identity: Mapping, cfg: CMMConfig, t: int) -> Path:
    """Per-task checkpoint; task 0 of the CMM variants that share its training is shared."""
    c = asdict(cfg)
    if cfg.merge in ("last", "average", "magmax"):
        fam = {"family": "seq-ft-chain", **{k: v for k, v in c.items() if k not in
                                            ("method", "merge", "alpha", "correction", "correction_loss",
                                             "representation_lr", "correction_weight_decay", "mismatch_images")}}
    elif t == 0:
        fam = {"family": "cmm", **{k: v for k, v in c.items() if k not in
                                   ("method", "merge", "alpha", "correction", "correction_loss",
                                    "representation_lr", "correction_weight_decay")}}
    else:
        fam = {"family": "cmm", **{k: v for k, v in c.items() if k != "method"}}
    return _ckpt_dir() / f"{fam['family']}-task{t}-{config_key({**identity, **fam}, 16)}.safetensors"


def run_cmm(scenario: Scenario, encoder0: nn.Module, head_fn: Callable[[Task], torch.Tensor], cfg: CMMConfig,
            seed: int, identity: Mapping, *, debug: bool = False, resume: bool = True,
            stop_after: int | None = None, image_size: int = 28, channels: int = 3) -> ContinualResult:
    """One CMM variant over a scenario (the authors' loop, module docstring): returns the R matrix
    and the book's measurements; ``extra`` holds per-task bytes carried, representation mismatch
    before/after correction, correction losses and importance statistics.

    Per-task checkpoints (θ, F, results so far) under ``cache_root()/cmm/checkpoints`` make a rerun
    resume; ``debug=True`` also saves the two-task states the paper's figures need
    (:func:`two_task_states`); ``stop_after=k`` stops after k tasks (the figures need two).
    """
    seed_everything(seed)
    dev = device()
    T, C = len(scenario.tasks), scenario.num_classes
    enc = make_encoder(encoder0, cfg.linear).to(dev)
    theta0 = get_state(encoder0)
    head = CosineHead(C, encoder_dim(encoder0), cfg.logit_scale).to(dev)
    net = CMMNet(enc, head)
    R, acc_seen, bytes_per_task, mismatch, corr_losses, imp_stats = [], [], [], [], [], []
    seconds, importance, start, mcr = 0.0, None, 0, float("nan")
    if resume:
        for t in reversed(range(T)):
            if debug and t >= 1:
                continue  # the figures need task 1 recomputed from task 0
            path = _ckpt_path(identity, cfg, t)
            if path.exists():
                state = load_state(path)
                meta = load_meta(path)
                set_state(enc, strip_prefix(state, "theta."))
                importance = (strip_prefix(state, "F.") or None) if cfg.merge == "importance" else None
                R, acc_seen, mismatch = meta["R"], meta["acc_seen"], meta["mismatch"]
                # task 0 may come from another variant's run: count this variant's own state
                bytes_per_task = meta["bytes_per_task"][:t] + [carried_bytes(cfg.method, get_state(enc), theta0, importance)]
                corr_losses, imp_stats, seconds = meta["correction_losses"], meta["importance"], meta["seconds"]
                mcr = meta.get("mean_class_recall", float("nan"))
                start = t + 1
                break
    for t, task in enumerate(scenario.tasks[:stop_after]):
        head.set_rows(task.classes, head_fn(task))
        if t < start:
            continue
        train = subsample(task.train, cfg.max_train_per_task, seed * 1000 + t)
        prev = get_state(enc)
        tic = time.time()
        res = train_task(net, train, task.classes, C, cfg.fit_config(), seed * 1000 + t, desc=f"{cfg.method} task {t + 1}")
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
                                                          cfg.correction_loss, seed * 1000 + t))
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
        mcr = score.mean_class_recall
        bytes_per_task.append(carried_bytes(cfg.method, get_state(enc), theta0, importance))
        meta = {"R": R, "acc_seen": acc_seen, "bytes_per_task": bytes_per_task, "mismatch": mismatch,
                "correction_losses": corr_losses, "importance": imp_stats, "seconds": seconds,
                "mean_class_recall": mcr}
        save_state(_ckpt_path(identity, cfg, t),
                   {**with_prefix("theta.", get_state(enc)), **with_prefix("F.", importance)}, meta)
        if t >= 2:  # only the latest (and the shared task 0) is needed to resume
            _ckpt_path(identity, cfg, t - 1).unlink(missing_ok=True)
            _ckpt_path(identity, cfg, t - 1).with_suffix(".json").unlink(missing_ok=True)
        if dbg:
            save_state(_debug_path(identity, cfg), dbg)
    complete = len(R) == T
    if not complete:
        mcr = float("nan")
    elif math.isnan(mcr):  # resumed from a checkpoint written before checkpoints kept it
        mcr = pooled_mean_class_recall(net, scenario)
    gflops = gflops_per_image(net, image_size, channels)
    return ContinualResult(cfg.method, R, acc_seen, bytes_stored=bytes_per_task[-1], gflops=gflops,
                           train_seconds=seconds,
                           extra={"bytes_per_task": bytes_per_task, "mismatch": mismatch,
                                  "correction_losses": corr_losses, "importance": imp_stats,
                                  "mean_class_recall": mcr})


def _debug_path(identity: Mapping, cfg: CMMConfig) -> Path:
    return _ckpt_dir() / f"debug-{config_key({**identity, **asdict(cfg)}, 16)}.safetensors"


def run_seq_baseline(scenario: Scenario, encoder0: nn.Module, head_fn: Callable[[Task], torch.Tensor], cfg: CMMConfig,
                     seed: int, identity: Mapping, *, resume: bool = True, image_size: int = 28,
                     channels: int = 3) -> ContinualResult:
    """Sequential fine-tuning and the MagMax paper's merges of its checkpoints, same heads and recipe.

    One chain θ_1, θ_2, … (standard fine-tuning, each task from the previous model, MagMax's
    "seq-FT"); task vectors τ_i = θ_i − θ0. After task t the evaluated model is
    ``seq-ft``: θ_t; ``average``: θ0 + mean_i τ_i (``merge.average`` as a running sum);
    ``magmax``: θ0 + 0.5·magmax(τ_1..τ_t) (``merge.magmax`` as a running max-|τ| fold, which is
    exactly the T-vector rule since ties go to the later task). The chain's checkpoints are shared
    by the three methods, so the chain is trained once. Bytes carried: θ_t, plus θ0 and the running
    merge for the merges; ``extra['bytes_all_checkpoints']`` is what the authors' merge script keeps
    (θ0 and every θ_i).
    """
    seed_everything(seed)
    dev = device()
    C = scenario.num_classes
    enc = make_encoder(encoder0, False).to(dev)
    theta0 = get_state(encoder0)
    head = CosineHead(C, encoder_dim(encoder0), cfg.logit_scale).to(dev)
    net = CMMNet(enc, head)
    running, seconds = None, 0.0
    R, acc_seen, bytes_per_task, bytes_all = [], [], [], []
    for t, task in enumerate(scenario.tasks):
        head.set_rows(task.classes, head_fn(task))
        path = _ckpt_path(identity, cfg, t)
        if resume and path.exists():
            state, meta = load_state(path), load_meta(path)
            seq = strip_prefix(state, "theta.")
            running = {"sum": strip_prefix(state, "sum."), "max": strip_prefix(state, "max.")}
            set_state(enc, seq)
            seconds = meta["seconds"]
        else:
            train = subsample(task.train, cfg.max_train_per_task, seed * 1000 + t)
            tic = time.time()
            train_task(net, train, task.classes, C, cfg.fit_config(), seed * 1000 + t, desc=f"seq-ft task {t + 1}")
            seq = get_state(enc)
            tau = mg.task_vector(seq, theta0)
            running = ({"sum": tau, "max": {k: v.clone() for k, v in tau.items()}} if running is None else
                       {"sum": mg.task_arithmetic([running["sum"], tau], 1.0), "max": mg.magmax([running["max"], tau])})
            seconds += time.time() - tic
            save_state(path, {**with_prefix("theta.", seq), **with_prefix("sum.", running["sum"]),
                              **with_prefix("max.", running["max"])}, {"seconds": seconds})
        if cfg.merge == "last":
            model, keep = seq, [seq]
        elif cfg.merge == "average":
            model, keep = mg.apply(theta0, running["sum"], 1.0 / (t + 1)), [seq, theta0, running["sum"]]
        else:
            model, keep = mg.apply(theta0, running["max"], MAGMAX_SCALE), [seq, theta0, running["max"]]
        eval_enc = copy.deepcopy(enc)
        set_state(eval_enc, model)
        score = evaluate_seen_tasks(CMMNet(eval_enc, head), scenario, t)
        R.append(score.row)
        acc_seen.append(score.accuracy)
        bytes_per_task.append(state_bytes(*keep))
        bytes_all.append(state_bytes(theta0, *([seq] * (t + 1))) if cfg.merge != "last" else state_bytes(seq))
    mcr = score.mean_class_recall  # of the model after the last task
    gflops = gflops_per_image(net, image_size, channels)
    return ContinualResult(cfg.method, R, acc_seen, bytes_stored=bytes_per_task[-1], gflops=gflops,
                           train_seconds=seconds,
                           extra={"bytes_per_task": bytes_per_task, "bytes_all_checkpoints": bytes_all,
                                  "mean_class_recall": mcr})


# --------------------------------------------------------------------------- entry points
def load_scenario(dataset: str, profile: str, seed: int, n_tasks: int | None = None,
                  max_per_split: int | None = None, image_size: int | None = 28) -> Scenario:
    """A book benchmark by name (``cmm_utils.core.benchmarks``), or any dataset (registered name or a
    MedMNIST-format ``.npz``) cut into ``n_tasks`` class-incremental tasks, at ``image_size``
    (None: native; the CLIP encoder upsamples). The class order is fixed by the benchmarks'
    order seed, so seeds vary training and made splits, not the tasks."""
    from cmm_utils.core.benchmarks import BENCHMARKS, CLASS_ORDER_SEED, load_benchmark
    from cmm_utils.core.data import class_incremental, load_dataset

    if dataset in BENCHMARKS:
        return load_benchmark(dataset, profile, seed)
    if n_tasks is None:
        raise ValueError(f"dataset {dataset!r} is not a benchmark ({', '.join(BENCHMARKS)}): give n_tasks")
    data = load_dataset(dataset, seed=seed, size=image_size, channels=3, max_per_split=max_per_split)
    return class_incremental(data, n_tasks, seed=CLASS_ORDER_SEED)


def run_config(method: str, benchmark: str, profile: str, seed: int, settings: Mapping, backbone: str) -> dict:
    """The JSON-able cache key of a run: method, benchmark, seed, backbone, profile + hyper-parameters."""
    cfg = method_config(method, settings)
    unused = {"method"}
    if not cfg.correction:
        unused |= {"correction_loss", "representation_lr", "correction_weight_decay"}
    if method in BASELINES:
        unused |= {"alpha", "mismatch_images"}
    # result_version 2: results carry the final mean class recall (checkpoints are reused)
    return {"method": method, "benchmark": benchmark, "seed": seed, "backbone": backbone, "profile": profile,
            "chapter": CHAPTER, "result_version": 2, **{k: v for k, v in asdict(cfg).items() if k not in unused}}


_ENCODERS: dict = {}


def _encoder(backbone: str, profile: str):
    key = (backbone, profile)
    if key not in _ENCODERS:  # θ0 is reused by every run of a notebook (never modified)
        encoder, clip = build_encoder(backbone, profile)
        _ENCODERS[key] = (encoder, clip, weights_fingerprint(encoder))
    return _ENCODERS[key][:2]


def _fingerprint(backbone: str, profile: str) -> str:
    _encoder(backbone, profile)
    return _ENCODERS[(backbone, profile)][2]


def _run_parts(method: str, scenario: Scenario, profile: str, seed: int, backbone: str | None, overrides: Mapping):
    from cmm_utils.core.profiles import select

    settings = select(PROFILES, profile, **overrides)
    backbone = backbone or settings["backbone"]
    if backbone != "clip_vit_b16" and settings["head"] == "zeroshot":
        settings["head"] = "prototype"  # zero-shot text heads need CLIP's text tower
    cfg = method_config(method, settings)
    encoder0, clip = _encoder(backbone, profile)
    identity = {"scenario": scenario_fingerprint(scenario), "backbone": backbone, "profile": profile, "seed": seed,
                "theta0": _fingerprint(backbone, profile)}
    return cfg, encoder0, clip, identity


def run_cmm_method(method: str, scenario: Scenario, profile: str, seed: int, *, backbone: str | None = None,
                   debug: bool = False, stop_after: int | None = None, resume: bool = True,
                   **overrides) -> ContinualResult:
    """Run one method of this chapter (``METHODS``) on a scenario in a profile (the leaderboard's
    hook for a missing run). ``overrides`` replace the profile's settings (e.g. ``alpha=0.5``)."""
    cfg, encoder0, clip, identity = _run_parts(method, scenario, profile, seed, backbone, overrides)
    head_fn = head_weights_fn(cfg, encoder0, clip, scenario)
    kw = dict(image_size=IMAGE_SIZE[profile], channels=3, resume=resume)
    if method in BASELINES:
        return run_seq_baseline(scenario, encoder0, head_fn, cfg, seed, identity, **kw)
    return run_cmm(scenario, encoder0, head_fn, cfg, seed, identity, debug=debug, stop_after=stop_after, **kw)


def cached_method_run(method: str, scenario: Scenario, benchmark: str, profile: str, seed: int, *,
                      backbone: str | None = None, debug: bool = False, **overrides) -> ContinualResult:
    """``continual.cached_run(profile, "cmm", config, ...)`` around :func:`run_cmm_method`."""
    from cmm_utils.core.profiles import select

    settings = select(PROFILES, profile, **overrides)
    backbone = backbone or settings["backbone"]
    config = run_config(method, benchmark, profile, seed, settings, backbone)
    config["data"] = config_key(scenario_fingerprint(scenario))  # a different file under one name never collides
    config["theta0"] = _fingerprint(backbone, profile)  # a re-pretrained backbone is a different run
    return cached_run(profile, CHAPTER, config,
                      lambda: run_cmm_method(method, scenario, profile, seed, backbone=backbone, debug=debug,
                                             **overrides))


def benchmark_run(method: str, benchmark: str, profile: str, seed: int, scenario: Scenario | None = None,
                  **overrides) -> ContinualResult:
    """A cached run of ``method`` on a book benchmark with its backbone (the leaderboard's entry);
    pass ``scenario`` if the benchmark is already loaded."""
    from cmm_utils.core.benchmarks import BACKBONE

    scenario = scenario or load_benchmark(benchmark, profile, seed)
    return cached_method_run(method, scenario, benchmark, profile, seed, backbone=BACKBONE, **overrides)


def majority_reference(scenario: Scenario) -> list[float]:
    """Accuracy, after each task, of always predicting the most frequent class of the pooled test
    set seen so far: the floor a class-incremental method must beat to have learnt anything
    beyond the label prior (HAM10000's ``nv`` is ~58% of its images)."""
    out = []
    for t in range(len(scenario.tasks)):
        labels = scenario.joint("test", upto=t).labels
        out.append(float(torch.bincount(labels).max()) / max(1, len(labels)))
    return out
