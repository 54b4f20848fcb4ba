"""CLIP ViT-B/16 as a backbone for the ``paper`` profile (open_clip, an optional dependency).

What MagMax's and CMM's code share: the image tower behind the book's ImageNet-normalised
batches (:class:`ClipImageEncoder`), the open_clip loader and the zero-shot head of MagMax's
``build_classification_head`` with the prompt templates the authors copy from CLIP's notebooks.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils.core.models.weights import WeightsNotFound, clip_spec, clip_weights, missing_message
from cmm_utils.core.train import IMAGENET_MEAN, IMAGENET_STD

# Prompt templates (src/datasets/templates.py; from CLIP's zero-shot notebooks): CIFAR-100 uses
# 18, ImageNet-R (and DomainNet, CUB) the 80 ImageNet templates. "{}" is the class name.
CIFAR100_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.")
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageEncoder(nn.Module):
    """CLIP's image tower as a backbone (``encode_image``, 512-d, unnormalised).

    Takes the book's batches (ImageNet-normalised) and re-normalises them with OpenAI's statistics;
    smaller images are upsampled to ``image_size`` (bicubic), as open_clip's ``Resize(224)`` does.
    """

    def __init__(self, visual: nn.Module, image_size: int = 224):
        super().__init__()
        self.visual = visual
        self.image_size = image_size
        self.num_features = int(visual.output_dim)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
        self.register_buffer("_scale", (torch.tensor(IMAGENET_STD) / torch.tensor(OPENAI_STD)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self._scale + self._shift
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return self.visual(x)


def clip_arch(name: str, tag: str = "openai") -> str:
    """The open_clip model to build for ``name`` so that it computes what the ``tag`` weights were
    trained as: OpenAI's CLIP uses QuickGELU, but open_clip's plain ``"ViT-B-16"`` config has
    ``nn.GELU`` (open_clip only warns), so ``"ViT-B-16"`` with ``"openai"`` becomes ``"ViT-B-16-quickgelu"``."""
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; valid: e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    quick = f"{name}-quickgelu"
    if cfg.get("quick_gelu") and not name.endswith("-quickgelu") and quick in open_clip.list_models():
        return quick
    return name


def clip_model(name: str = "ViT-B-16", pretrained: str | None = "openai", *, image_size: int | None = None):
    """``(model, tokenizer)`` from open_clip (an optional dependency, imported here only).

    ``pretrained``: an open_clip tag (``"openai"``, resolved by :func:`cmm_utils.core.models.weights.clip_weights`:
    the file in ``CMM_WEIGHTS`` first, the hub second), a path to a checkpoint file, or None (random
    weights). The architecture is always the one OpenAI's weights were trained with (QuickGELU, see
    :func:`clip_arch`), random weights included, so tests and ``gpu-check`` run the papers' function.
    ``image_size`` (random weights only: tiny dry runs) overrides the input resolution.
    """
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - environment dependent
        raise ImportError("the paper profile needs open_clip: pip install open_clip_torch") from err
    is_file = pretrained is not None and os.path.isfile(str(pretrained))
    arch = clip_arch(name, "openai" if pretrained is None or is_file else pretrained)
    if image_size is not None and pretrained is not None:
        raise ValueError(f"image_size={image_size} changes the positional embedding: only with pretrained=None")
    extra = {"force_image_size": image_size} if image_size is not None else {}
    source = None if pretrained is None else str(pretrained) if is_file else clip_weights(arch, pretrained)
    try:
        model = open_clip.create_model(arch, pretrained=source, **extra)
    except RuntimeError as err:  # open_clip wraps hub failures in RuntimeError
        if source != pretrained or is_file:
            raise
        raise WeightsNotFound(missing_message(clip_spec(arch, pretrained), err)) from err
    return model, open_clip.get_tokenizer(arch)


@torch.no_grad()
def zeroshot_weight(model, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """The authors' ``build_classification_head``: per class, encode every template, L2-normalise,
    average, L2-normalise again; stack and multiply by ``logit_scale.exp()`` (100 for OpenAI CLIP)."""
    model.eval()
    dev = next(model.parameters()).device
    rows = []
    for name in classnames:
        emb = model.encode_text(tokenizer([t.format(name) for t in templates]).to(dev)).float()
        emb = F.normalize(emb, dim=-1).mean(0)
        rows.append(emb / emb.norm())
    return torch.stack(rows).cpu() * model.logit_scale.exp().float().cpu()
