"""Frozen classification heads shared by the chapters, and the backbone-plus-head wrapper.

CLIP's zero-shot head (MagMax, CMM) is a frozen cosine head: ``normalize(f) @ W.T`` with ``W`` the
normalised, averaged text embeddings of the class prompts times the logit scale. The book's small
backbones have no text tower; its data-free stand-in keeps the form with seeded orthonormal class
vectors (Hoffer et al. 2018, "Fix your classifier").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenHead(nn.Module):
    """``logits = normalize(f) @ W.T`` with a fixed ``W`` (rows: unit class vectors × logit scale).

    CLIP's zero-shot head has this form (``ClassificationHead`` with ``normalize=True``); the book's
    ``fixed`` head uses seeded orthonormal class vectors instead of text embeddings (see module doc).
    ``W`` is a buffer: never trained, never merged.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) @ self.weight.t()


HEADS = ("fixed", "clip")


def fixed_head_weight(num_classes: int, dim: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Data-free class vectors: rows of a seeded random orthonormal matrix (or unit Gaussian rows
    when there are more classes than feature dimensions), times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(dim, num_classes, generator=gen, dtype=torch.float64)
    if num_classes <= dim:
        q, r = torch.linalg.qr(g)
        w = (q * torch.sign(torch.diagonal(r))).t()
    else:
        w = F.normalize(g.t(), dim=1)
    return (w * scale).float()


class HeadedModel(nn.Module):
    """``head(backbone(x))``: the merged backbone and the shared frozen head (all classes)."""

    def __init__(self, backbone: nn.Module, head: FrozenHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
