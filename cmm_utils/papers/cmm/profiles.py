"""The CMM chapter's profiles, methods and run configuration (what changes a run's numbers).

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). Profiles are data (``cmm_utils.core.profiles``): every row has the common
settings ``seeds`` (how many seeds, starting at the notebook's ``seed``), ``benchmarks`` (the book
benchmarks run besides the chapter's own ``dataset``) and ``methods`` (names of :data:`METHODS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cmm_utils.core.profiles import check_table
from cmm_utils.core.train import FitConfig

CHAPTER = "cmm"
TITLE = "Holistic continual model merging (CMM)"

# Each method: the three switches of the ablation, or a sequential-fine-tuning baseline.
SWITCHES = {
    "cmm": {"linear": True, "merge": "importance", "correction": True},
    "cmm-no-linear": {"linear": False, "merge": "importance", "correction": True},
    "cmm-no-fisher": {"linear": True, "merge": "interpolate", "correction": True},
    "cmm-no-correction": {"linear": True, "merge": "importance", "correction": False},
    "seq-ft": {"linear": False, "merge": "last", "correction": False},
    "average": {"linear": False, "merge": "average", "correction": False},
    "magmax": {"linear": False, "merge": "magmax", "correction": False},
}
METHODS = tuple(SWITCHES)
CMM_METHODS = tuple(m for m in METHODS if m.startswith("cmm"))
BASELINES = ("seq-ft", "average", "magmax")
MAGMAX_SCALE = 0.5  # the authors' λ for MagMax (note §2.5)
CORRECTION_LOSSES = ("l1", "l2")
HEADS = ("fixed", "prototype", "zeroshot")
BACKBONES = ("resnet18", "densenet121", "vit_tiny", "clip_vit_b16")

# smoke/cpu: the recipe scaled to 28 px and a one-pass budget (lr 1e-3, a few warm-up steps), the
# same number of steps for every task (max_train_per_task images, one pass); θ0's class-prototype
# head plays CLIP's zero-shot head (it classifies at θ0; head="fixed" is the random-head ablation);
# ``representation_lr`` keeps the authors' ratio to ``lr`` in their main runs (1e-7 / 1e-5).
PROFILES = check_table(CHAPTER, {
    "smoke": dict(
        dataset="ham10000-cil", n_tasks=3, seeds=1, backbone="resnet18", head="prototype",
        logit_scale=16.0, templates="photo", max_per_split=150, image_size=28,
        epochs=1, lr=1e-3, weight_decay=0.1, batch_size=32, warmup_steps=1, clip_grad=1.0,
        max_train_per_task=64, max_steps=2,
        alpha=0.4, correction_loss="l1", representation_lr=1e-5, correction_weight_decay=0.01,
        mismatch_images=32, benchmarks=[], methods=list(METHODS), alpha_grid=3, path_images=32, tsne_images=24),
    "cpu": dict(
        dataset="ham10000-cil", n_tasks=3, seeds=3, backbone="resnet18", head="prototype",
        logit_scale=16.0, templates="photo", max_per_split=None, image_size=28,
        epochs=1, lr=1e-3, weight_decay=0.1, batch_size=32, warmup_steps=3, clip_grad=1.0,
        max_train_per_task=512, max_steps=None,
        alpha=0.4, correction_loss="l1", representation_lr=1e-5, correction_weight_decay=0.01,
        mismatch_images=128, benchmarks=["ham10000-cil", "medical-dil"], methods=list(METHODS), alpha_grid=11,
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
        mismatch_images=1024, benchmarks=["ham10000-cil", "medical-dil"], methods=list(METHODS), alpha_grid=21,
        path_images=2048, tsne_images=500),
})
PAPER_DATASETS = ("cifar100", "imagenet-r", "cub200", "cars")  # the paper's CIL datasets
IMAGE_SIZE = {"smoke": 28, "cpu": 28, "paper": 224}  # what the encoder sees (FLOP counts)


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
    if method not in SWITCHES:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if settings.get("correction_loss", "l1") not in CORRECTION_LOSSES:
        raise ValueError(f"unknown correction_loss {settings['correction_loss']!r}; valid: {', '.join(CORRECTION_LOSSES)}")
    if settings.get("head", "prototype") not in HEADS:
        raise ValueError(f"unknown head {settings['head']!r}; valid: {', '.join(HEADS)}")
    if not 0.0 <= float(settings.get("alpha", 0.4)) <= 1.0:
        raise ValueError(f"alpha={settings['alpha']!r} must lie in [0, 1]")
    fields = {f for f in CMMConfig.__dataclass_fields__}
    kw = {k: v for k, v in settings.items() if k in fields}
    return CMMConfig(method=method, **SWITCHES[method], **kw)
