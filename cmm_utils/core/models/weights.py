"""Where published weights come from: the book's weights directory first, the hub second.

Every pretrained timm backbone and every CLIP model of the book is resolved here
(:func:`timm_weights`, :func:`clip_weights`), so each chapter can run on a machine without a network.

The directory is ``CMM_WEIGHTS`` (default ``~/.cache/cmm_weights``). It holds one file per checkpoint,
named after what the book loads (``.safetensors``, ``.bin``, ``.pt`` or ``.pth``, in that order of
preference)::

    $CMM_WEIGHTS/timm/resnet18.tv_in1k.safetensors        # hub id timm/resnet18.tv_in1k, file model.safetensors
    $CMM_WEIGHTS/timm/resnet50.tv_in1k.safetensors
    $CMM_WEIGHTS/timm/densenet121.tv_in1k.safetensors
    $CMM_WEIGHTS/open_clip/ViT-B-16-quickgelu-openai.safetensors
        # hub id timm/vit_base_patch16_clip_224.openai, file open_clip_model.safetensors (or
        # open_clip_pytorch_model.bin saved as ...-openai.bin). OpenAI's own ViT-B-16.pt is a TorchScript
        # archive, which open_clip's weights-only file loading refuses: use the hub file.

When the file is missing the hub is tried (timm's and open_clip's own download, which also reads a
populated Hugging Face cache), unless ``CMM_WEIGHTS_DOWNLOAD=0`` or ``HF_HUB_OFFLINE=1``. When that fails
too, :class:`WeightsNotFound` names the file expected, the directory and variable it looked in, and
where to download it on a machine with a network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_ENV = "CMM_WEIGHTS"
DOWNLOAD_ENV = "CMM_WEIGHTS_DOWNLOAD"
DEFAULT_WEIGHTS = Path("~/.cache/cmm_weights")
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class WeightsNotFound(FileNotFoundError, RuntimeError):
    """Published weights that are neither in the weights directory nor downloadable here (also a
    ``RuntimeError``, what a failed download raised before, so existing handlers still catch it)."""


@dataclass(frozen=True)
class WeightSpec:
    """One checkpoint: the library loading it, its file stem, and where it is published."""
    library: str      # "timm" | "open_clip": the sub-directory of CMM_WEIGHTS
    stem: str         # file name without suffix, e.g. "resnet18.tv_in1k"
    hub_id: str       # Hugging Face repository
    hub_file: str     # file in that repository to save as <stem><suffix>
    url: str = ""     # another official source, if any


def weights_root() -> Path:
    """``CMM_WEIGHTS`` (default ``~/.cache/cmm_weights``), user-expanded, not necessarily existing."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS).expanduser()


def candidates(spec: WeightSpec) -> list[Path]:
    """The paths looked at, in order; the first is the one the book documents."""
    return [weights_root() / spec.library / f"{spec.stem}{suffix}" for suffix in SUFFIXES]


def local_file(spec: WeightSpec) -> Path | None:
    return next((p for p in candidates(spec) if p.is_file()), None)


def download_allowed() -> bool:
    """The hub is tried unless ``CMM_WEIGHTS_DOWNLOAD=0`` or ``HF_HUB_OFFLINE=1`` (read at call time)."""
    off = {"0", "false", "no", "off"}
    return (os.environ.get(DOWNLOAD_ENV, "1").strip().lower() not in off
            and os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in off | {""})


def missing_message(spec: WeightSpec, err: BaseException | None = None) -> str:
    where = candidates(spec)
    how = (f"https://huggingface.co/{spec.hub_id}/resolve/main/{spec.hub_file}"
           + (f" (or {spec.url})" if spec.url else ""))
    tried = (f"; the hub download failed too: {type(err).__name__}: {str(err)[:300]}" if err is not None
             else f"; the hub was not tried ({DOWNLOAD_ENV}=0 or HF_HUB_OFFLINE=1)")
    return (f"{spec.library} weights {spec.stem!r} not found: expected {where[0]} "
            f"(also looked for {', '.join(p.suffix for p in where[1:])}) in {where[0].parent}, the {spec.library}/ "
            f"folder of {WEIGHTS_ENV}={os.environ.get(WEIGHTS_ENV) or str(DEFAULT_WEIGHTS) + ' (default)'}{tried}. "
            f"On a machine with a network download {how} (hub id {spec.hub_id}), save it as {where[0]} "
            f"and copy the {WEIGHTS_ENV} folder here, or set {WEIGHTS_ENV} to where it is")


# ------------------------------------------------------------------------------------ timm
# The authors' ImageNet weights are torchvision's (DynaMMo: torchvision 0.12 ``pretrained=True``;
# CMM's medical runs and MedMerge: ImageNet ResNet / DenseNet); timm publishes them as ``*.tv_in1k``.
# The ViTs have no torchvision counterpart in the papers: timm's default tags, pinned.
TIMM_TAGS = {"resnet18": "tv_in1k", "resnet50": "tv_in1k", "densenet121": "tv_in1k",
             "vit_tiny_patch16_224": "augreg_in21k_ft_in1k", "vit_base_patch16_224": "augreg2_in21k_ft_in1k"}


def timm_spec(timm_name: str) -> WeightSpec:
    """``timm_name`` (e.g. ``"resnet18"``) with the book's tag: ``resnet18.tv_in1k`` on the hub."""
    if timm_name not in TIMM_TAGS:
        raise ValueError(f"no pinned ImageNet weights for timm model {timm_name!r}; valid: {', '.join(TIMM_TAGS)}")
    stem = f"{timm_name}.{TIMM_TAGS[timm_name]}"
    return WeightSpec("timm", stem, f"timm/{stem}", "model.safetensors")


def timm_weights(timm_name: str, **kwargs):
    """``timm.create_model`` of ``timm_name`` with its pinned ImageNet weights: the local file if
    present (``pretrained_cfg_overlay=dict(file=...)``, no network), else the hub, else
    :class:`WeightsNotFound`."""
    import timm

    spec = timm_spec(timm_name)
    path = local_file(spec)
    if path is not None:
        return timm.create_model(spec.stem, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    if not download_allowed():
        raise WeightsNotFound(missing_message(spec))
    try:
        return timm.create_model(spec.stem, pretrained=True, **kwargs)
    except Exception as err:  # hub errors come in many types
        raise WeightsNotFound(missing_message(spec, err)) from err


# ------------------------------------------------------------------------------------ open_clip
def clip_spec(arch: str, tag: str) -> WeightSpec:
    """``arch`` an open_clip model name as built (e.g. ``"ViT-B-16-quickgelu"``), ``tag`` a pretrained tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch!r}; valid: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
    hub = cfg.get("hf_hub", "").rstrip("/")
    return WeightSpec("open_clip", f"{arch}-{tag}", hub, "open_clip_model.safetensors", cfg.get("url", ""))


def clip_weights(arch: str, tag: str) -> str:
    """What to pass as open_clip's ``pretrained``: the local file if present, else the tag (open_clip
    then downloads it); :class:`WeightsNotFound` when neither can work."""
    spec = clip_spec(arch, tag)
    path = local_file(spec)
    if path is not None:
        return str(path)
    if not download_allowed():
        raise WeightsNotFound(missing_message(spec))
    return tag
