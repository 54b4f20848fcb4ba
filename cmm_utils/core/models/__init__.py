"""Backbones (timm), heads and the book's pretrained-backbone cache."""
from cmm_utils.core.models.backbones import ARCHS, SCALES, Classifier, build_backbone, count_parameters
from cmm_utils.core.models.pretrain import BOOK_IMAGE_SIZE, PRETRAIN, PretrainConfig, book_backbone, pretrained_backbone

__all__ = ["ARCHS", "SCALES", "Classifier", "build_backbone", "count_parameters",
           "PretrainConfig", "pretrained_backbone", "book_backbone", "PRETRAIN", "BOOK_IMAGE_SIZE"]
