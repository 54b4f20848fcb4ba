"""Backbones through timm, at the papers' size (``scale="paper"``) or sized for 2 CPU cores.

``scale="cpu"`` keeps each paper's architecture family (ResNet's basic blocks in [2, 2, 2, 2],
DenseNet-121's (6, 12, 24, 16) dense blocks, a ViT with patch tokens) and shrinks width, with a
small-image stem (3x3 convolutions, one stride-2, no max-pool) so that 28-32 px inputs keep a 14x14 map
after the stem instead of 7x7.
"""
from __future__ import annotations

import timm
import torch
from torch import nn
from timm.models.densenet import DenseNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer

from cmm_utils.core.models.weights import timm_spec, timm_weights

ARCHS = ("resnet18", "resnet50", "densenet121", "vit_tiny", "vit_b16")
SCALES = ("cpu", "paper")
TIMM_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50", "densenet121": "densenet121",
              "vit_tiny": "vit_tiny_patch16_224", "vit_b16": "vit_base_patch16_224"}


def _small_stem_resnet(block, layers, channels) -> ResNet:
    # timm's "deep" stem (three 3x3 convolutions, the first with stride 2) is the only stem whose
    # width follows the stages; the max-pool is dropped so 28 px inputs keep a 14x14 map.
    model = ResNet(block, layers, num_classes=0, channels=channels, stem_type="deep",
                   stem_width=channels[0] // 2)
    model.maxpool = nn.Identity()
    return model


def _small_stem_densenet(growth_rate: int) -> DenseNet:
    model = DenseNet(growth_rate=growth_rate, block_config=(6, 12, 24, 16), num_classes=0)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, 3, stride=2, padding=1, bias=False)
    model.features.pool0 = nn.Identity()
    return model


def build_backbone(arch: str, *, scale: str = "cpu", image_size: int = 28,
                   pretrained: bool = False) -> nn.Module:
    """A feature extractor (``num_classes=0``) with ``.num_features`` set.

    ``scale="paper"`` builds the timm model by name with the book's pinned weight tag
    (:data:`cmm_utils.core.models.weights.TIMM_TAGS`: torchvision's ImageNet weights, ``*.tv_in1k``,
    for the CNNs, as the authors used); ``pretrained=True`` loads them from ``CMM_WEIGHTS`` or the hub
    (:func:`cmm_utils.core.models.weights.timm_weights`), else raises ``WeightsNotFound``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; valid: {', '.join(ARCHS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    if scale == "paper":
        kwargs = {"img_size": image_size} if arch.startswith("vit") else {}
        if pretrained:
            return timm_weights(TIMM_NAMES[arch], num_classes=0, **kwargs)
        return timm.create_model(timm_spec(TIMM_NAMES[arch]).stem, pretrained=False, num_classes=0, **kwargs)
    if arch == "resnet18":
        return _small_stem_resnet(BasicBlock, (2, 2, 2, 2), (32, 64, 128, 256))
    if arch == "resnet50":
        return _small_stem_resnet(Bottleneck, (3, 4, 6, 3), (16, 32, 64, 128))
    if arch == "densenet121":
        return _small_stem_densenet(growth_rate=12)
    patch = 4 if image_size <= 64 else 16
    depth, width, heads = (6, 192, 3) if arch == "vit_tiny" else (8, 256, 4)
    return VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth,
                             num_heads=heads, num_classes=0)


class Classifier(nn.Module):
    """``head(backbone(x))``; ``features(x)`` is the backbone's pooled output."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
