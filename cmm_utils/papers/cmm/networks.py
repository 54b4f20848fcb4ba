"""The networks and frozen head weights of the CMM chapter (``cmm_utils.papers.cmm.stages``).

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025), §3. The encoder with its final projection (the only tensor the
representation correction trains); θ as a state dict; and the frozen head weights: class
prototypes of θ0 (the ``cpu``/``smoke`` analogue) and the authors' zero-shot CLIP text heads. The
frozen cosine head and the network around it are ``cmm_utils.core.models.heads.FrozenHead``
(with ``scale``) and ``HeadedModel``. Why each is built the way it is: the docstring of
``cmm_utils.papers.cmm.stages`` ("Final projection", "Heads").
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from cmm_utils.papers.cmm.linearize import LinearizedModel


# --------------------------------------------------------------------------- networks
class ProjectedEncoder(nn.Module):
    """``proj(backbone(x))``: the backbone's pooled features through a bias-free ``Linear(d, d)``
    initialised to the identity, the analogue of CLIP's ``visual.proj`` that the correction trains."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        d = backbone.num_features
        self.num_features = d
        self.proj = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))


def projection_name(encoder: nn.Module) -> str:
    """Name of the final projection in θ: ``proj.weight`` (ours) or ``proj`` (open_clip's ViT)."""
    base = encoder._func if isinstance(encoder, LinearizedModel) else encoder
    if isinstance(base, ProjectedEncoder):
        return "proj.weight"
    if isinstance(getattr(base, "proj", None), nn.Parameter):
        return "proj"
    if isinstance(getattr(getattr(base, "visual", None), "proj", None), nn.Parameter):
        return "visual.proj"  # cmm_utils.core.models.clip.ClipImageEncoder around CLIP's visual tower
    raise ValueError(f"{type(base).__name__} has no final projection (expected ProjectedEncoder or a CLIP visual tower)")


def encoder_dim(encoder: nn.Module) -> int:
    for attr in ("num_features", "output_dim"):
        if hasattr(encoder, attr):
            return int(getattr(encoder, attr))
    raise ValueError(f"cannot tell the feature size of {type(encoder).__name__}")


def named_theta(encoder: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(encoder.named_theta() if isinstance(encoder, LinearizedModel) else encoder.named_parameters())


def get_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """θ as a state dict: the linearised parameters, or a standard network's full state (BN stats too)."""
    if isinstance(encoder, LinearizedModel):
        return encoder.theta()
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def set_state(encoder: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    if isinstance(encoder, LinearizedModel):
        encoder.load_theta(dict(state))
    else:
        encoder.load_state_dict(dict(state))


def make_encoder(encoder0: nn.Module, linear: bool) -> nn.Module:
    """A trainable copy of θ0: linearised around θ0 (CMM) or the network itself (standard)."""
    return LinearizedModel(encoder0) if linear else copy.deepcopy(encoder0)


# --------------------------------------------------------------------------- heads
TEMPLATES = ("photo", "simple_imagenet", "openai_imagenet")


@torch.no_grad()
def template_list(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"unknown templates {name!r}; valid: {', '.join(TEMPLATES)}")
    if name == "photo":
        return ("a photo of a {}.",)
    from open_clip import zero_shot_metadata as meta
    return meta.OPENAI_IMAGENET_TEMPLATES if name == "openai_imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES


@torch.no_grad()
def zero_shot_weights(clip_model, tokenizer, class_names: Sequence[str], templates: str) -> torch.Tensor:
    """The authors' zero-shot head (rows = classes): per template encode, L2-normalise, average,
    normalise again (open_clip's ``build_zero_shot_classifier``); the ×100 is the head's scale."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    names = [n.split(":")[-1].replace("_", " ") for n in class_names]
    dev = next(clip_model.parameters()).device
    w = build_zero_shot_classifier(clip_model, tokenizer, names, template_list(templates), device=dev)
    return w.T.float().cpu()
