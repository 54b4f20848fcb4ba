"""Frozen classification heads shared by the chapters, and the backbone-plus-head wrapper.

CLIP's zero-shot head (MagMax, CMM) is a frozen cosine head: ``normalize(f) @ W.T`` with ``W`` the
normalised, averaged text embeddings of the class prompts times the logit scale. The book's small
backbones have no text tower; its data-free stand-in keeps the form with seeded orthonormal class
vectors (Hoffer et al. 2018, "Fix your classifier").
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FrozenHead(nn.Module):
    """``logits = normalize(f) @ W.T`` with a fixed ``W`` (rows: unit class vectors × logit scale).

    CLIP's zero-shot head has this form (``ClassificationHead`` with ``normalize=True``); the book's
    ``fixed`` head uses seeded orthonormal class vectors instead of text embeddings (see module doc).
    ``W`` is a buffer: never trained, never merged.

    With ``scale`` given (CMM's head), the rows are normalised at every forward and the logits are
    ``scale · cos(f, w_c)``: the rows may then be set task by task (:meth:`set_rows`, :meth:`unset`),
    rows not set yet are 0 (logit 0). The two forms are kept apart because they round differently.
    """

    def __init__(self, weight: torch.Tensor, scale: float | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.scale = None if scale is None else float(scale)

    @classmethod
    def unset(cls, num_classes: int, dim: int, scale: float) -> "FrozenHead":
        """A cosine head over ``num_classes`` classes whose rows are all still 0."""
        return cls(torch.zeros(num_classes, dim), scale)

    @torch.no_grad()
    def set_rows(self, classes: Sequence[int], weights: torch.Tensor) -> None:
        self.weight[list(classes)] = weights.to(self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.normalize(features, dim=-1) @ self.weight.t()
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


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


@torch.no_grad()
def class_prototypes(model: nn.Module, data, classes, batch_size: int = 256) -> torch.Tensor:
    """Rows in ``classes`` order: the mean of ``model``'s features over ``data``'s images of each
    class (zeros for a class with no image). With θ_0 as ``model`` these are the book's stand-in for
    CLIP's zero-shot head: built from the pretrained model and the class alone, frozen, and already
    a classifier at θ_0 (MagMax's and CMM's ``cpu`` heads)."""
    from cmm_utils.core.train import predict

    feats = predict(model, data, batch_size)
    rows = []
    for c in classes:
        mask = data.labels == c
        rows.append(feats[mask].mean(0) if mask.any() else torch.zeros(feats.shape[1]))
    return torch.stack(rows)

