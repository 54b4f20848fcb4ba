"""Backbones (timm), heads and the book's pretrained-backbone cache."""
from .backbones import ARCHS, SCALES, Classifier, build_backbone, count_parameters
from .pretrain import PretrainConfig, pretrained_backbone

__all__ = ["ARCHS", "SCALES", "Classifier", "build_backbone", "count_parameters",
           "PretrainConfig", "pretrained_backbone"]
