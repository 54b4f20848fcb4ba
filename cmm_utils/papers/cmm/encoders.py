"""θ0 of a CMM run and the frozen heads built from it (``cmm_utils.papers.cmm.stages``, "Heads").

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). The pretrained encoder (the book's backbone with the identity projection
appended, or CLIP ViT-B/16), the head rows of each task, and a fingerprint of θ0 that enters every
cache key; θ0 is built once per notebook (:func:`pretrained_encoder`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cmm_utils.core.data import Scenario, Task
from cmm_utils.core.io import config_key
from cmm_utils.core.models.heads import class_prototypes, fixed_head_weight  # fixed: the MagMax chapter's head
from cmm_utils.core.train import device
from cmm_utils.papers.cmm.networks import ProjectedEncoder, encoder_dim, zero_shot_weights
from cmm_utils.papers.cmm.profiles import BACKBONES, CMMConfig
from cmm_utils.papers.cmm.stages import subsample


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
        from cmm_utils.core.models.clip import ClipImageEncoder, clip_model  # OpenAI normalisation, upsampling to 224 px

        use = (profile == "paper") if pretrained is None else pretrained
        model, tokenizer = clip_model("ViT-B-16", pretrained="openai" if use else None)
        model.eval()
        return ClipImageEncoder(model.visual).eval(), (model, tokenizer)
    from cmm_utils.core.models import book_backbone

    return ProjectedEncoder(book_backbone(backbone, profile, verbose=False)), None


def head_weights_fn(cfg: CMMConfig, encoder0: nn.Module, clip, scenario: Scenario) -> Callable[[Task], torch.Tensor]:
    """``task -> rows of the frozen head for task.classes`` (``cmm_utils.papers.cmm.stages``, "Heads")."""
    if cfg.head == "zeroshot":
        if clip is None:
            raise ValueError("head='zeroshot' needs the CLIP backbone (backbone='clip_vit_b16')")
        table = zero_shot_weights(clip[0], clip[1], scenario.class_names, cfg.templates)
        return lambda task: table[list(task.classes)]
    if cfg.head == "fixed":
        table = fixed_head_weight(scenario.num_classes, encoder_dim(encoder0), 1.0)
        return lambda task: table[list(task.classes)]
    enc = encoder0.to(device()).eval()
    cap = cfg.max_train_per_task
    return lambda task: class_prototypes(enc, subsample(task.train, cap, 0), task.classes)


@torch.no_grad()
def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of a network's weights (names, shapes, sums): θ0 is part of every cache key, so
    a re-pretrained backbone never reuses checkpoints or results made from the old one."""
    parts = [[k, list(v.shape), float(v.double().sum()), float(v.double().abs().sum())]
             for k, v in module.state_dict().items()]
    return config_key(parts, 16)


_ENCODERS: dict = {}


def pretrained_encoder(backbone: str, profile: str) -> tuple[nn.Module, object, str]:
    """``(θ0, clip, fingerprint)`` of ``backbone`` in ``profile``, built once per process: θ0 is
    reused by every run of a notebook and never modified."""
    key = (backbone, profile)
    if key not in _ENCODERS:
        encoder, clip = build_encoder(backbone, profile)
        _ENCODERS[key] = (encoder, clip, weights_fingerprint(encoder))
    return _ENCODERS[key]
