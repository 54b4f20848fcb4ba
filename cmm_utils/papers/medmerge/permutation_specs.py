"""Permutation specs: which permutation group acts on every axis of a ResNet's or DenseNet's weights.

The symmetry that :mod:`cmm_utils.papers.medmerge.alignment` exploits (Ainsworth et al., "Git
Re-Basin", ICLR 2023; Entezari et al. 2022): reordering the units of a hidden layer, and the
input axis of the layers that read it, leaves the function unchanged.

**Specs.** A :class:`PermutationSpec` says, for every floating entry of a state dict, which
permutation group acts on each of its axes; :func:`permutation_spec` builds it from a model:

* timm ResNets (basic and bottleneck blocks; plain or "deep" stem): one group per hidden width
  inside a block, and *one group per residual stream*: every tensor that adds into the stream
  (the stem's last convolution and BN, each block's last convolution and BN, the downsample
  convolution and BN) shares it, as in the reference ``resnet20_permutation_spec``;
* timm DenseNets: the channel concatenation makes an axis a *concatenation of groups*: each dense
  layer's output is a group, and a later layer's input axis is the stem's (or the transition's)
  group followed by every earlier layer's group in order. The reference ``get_permuted_param``
  assumes one group per axis and cannot express this; here an axis is a tuple of groups
  (*segments*) and a group's cost is accumulated over its slice of the axis;
* a :class:`~cmm_utils.core.models.Classifier` wrapping either (keys ``backbone.*``) and its linear
  ``head`` (input axis = the backbone's output groups, output axis unpermuted).

BatchNorm running statistics are in the spec, so :func:`apply_permutation` is exactly
function-preserving (the reference spec lists BN ``scale`` and ``bias`` only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]
Axes = tuple  # per tensor axis: None, or a tuple of group names concatenated along that axis
BN_STATS = ("running_mean", "running_var")


@dataclass
class PermutationSpec:
    """``axes[key]`` gives, per axis of ``state[key]``, ``None`` or the tuple of permutation groups
    laid end to end along that axis; ``sizes[group]`` is the group's width. ``features[group]`` names
    the modules whose outputs live in that group's feature space (for activation statistics: a
    residual stream has one per block). Axis 0 of every entry is its *output* side (a convolution's
    filters, a BatchNorm's channels), axes >= 1 its *input* side."""
    axes: dict[str, Axes]
    sizes: dict[str, int]
    features: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return list(self.sizes)

    def occurrences(self, group: str) -> list[tuple[str, int, int]]:
        """``(key, axis, offset)`` for every slice of an axis that ``group`` permutes."""
        out = []
        for key, axes in self.axes.items():
            for axis, segs in enumerate(axes):
                offset = 0
                for g in segs or ():
                    if g == group:
                        out.append((key, axis, offset))
                    offset += self.sizes[g]
        return out


class _Builder:
    def __init__(self, prefix: str):
        self.prefix, self.axes, self.sizes, self.features = prefix, {}, {}, {}

    def group(self, name: str, size: int, feature: str | None = None) -> str:
        self.sizes[name] = int(size)
        if feature is not None:
            self.feature(name, feature)
        return name

    def feature(self, group: str, module: str) -> None:
        self.features[group] = self.features.get(group, ()) + (self.prefix + module,)

    def conv(self, name: str, module: nn.Conv2d, out: tuple, inp: tuple | None) -> None:
        if module.groups != 1:
            raise ValueError(f"{name}: grouped convolutions are not supported by the permutation spec")
        self.axes[f"{self.prefix}{name}.weight"] = (out, inp, None, None)
        if module.bias is not None:
            self.axes[f"{self.prefix}{name}.bias"] = (out,)

    def norm(self, name: str, module: nn.Module, segs: tuple) -> None:
        for attr in ("weight", "bias", *BN_STATS):
            if getattr(module, attr, None) is not None:
                self.axes[f"{self.prefix}{name}.{attr}"] = (segs,)


def _resnet_spec(model, b: _Builder) -> tuple:
    from timm.models.resnet import Bottleneck

    if isinstance(model.conv1, nn.Sequential):  # timm "deep" stem: conv-bn-act x2, conv
        convs = [(i, m) for i, m in enumerate(model.conv1) if isinstance(m, nn.Conv2d)]
        prev = None
        for j, (i, conv) in enumerate(convs):
            last = j == len(convs) - 1
            g = b.group("stream0" if last else f"stem{j}", conv.out_channels, None if last else f"conv1.{i + 2}")
            b.conv(f"conv1.{i}", conv, (g,), prev)
            if not last:
                b.norm(f"conv1.{i + 1}", model.conv1[i + 1], (g,))
            prev = (g,)
    else:
        b.group("stream0", model.conv1.out_channels)
        b.conv("conv1", model.conv1, ("stream0",), None)
    b.norm("bn1", model.bn1, ("stream0",))
    b.feature("stream0", "act1")
    stream, n_streams = "stream0", 0
    for s in range(1, 5):
        for k, block in enumerate(getattr(model, f"layer{s}")):
            name = f"layer{s}.{k}"
            convs = ["conv1", "conv2", "conv3"] if isinstance(block, Bottleneck) else ["conv1", "conv2"]
            if block.downsample is not None:
                n_streams += 1
                new = b.group(f"stream{n_streams}", getattr(block, convs[-1]).out_channels)
                ds = [(i, m) for i, m in enumerate(block.downsample)]
                for i, m in ds:
                    if isinstance(m, nn.Conv2d):
                        b.conv(f"{name}.downsample.{i}", m, (new,), (stream,))
                    elif isinstance(m, nn.BatchNorm2d):
                        b.norm(f"{name}.downsample.{i}", m, (new,))
            else:
                new = stream
            prev = (stream,)
            for j, c in enumerate(convs):
                conv, bn = getattr(block, c), getattr(block, f"bn{j + 1}")
                if j == len(convs) - 1:
                    g = new
                else:
                    g = b.group(f"{name}.{c}", conv.out_channels, f"{name}.act{j + 1}")
                b.conv(f"{name}.{c}", conv, (g,), prev)
                b.norm(f"{name}.bn{j + 1}", bn, (g,))
                prev = (g,)
            b.feature(new, name)  # block output (after the add and act2)
            stream = new
    return (stream,)


def _densenet_spec(model, b: _Builder) -> tuple:
    feats = model.features
    g = b.group("stem", feats.conv0.out_channels, "features.norm0")
    b.conv("features.conv0", feats.conv0, (g,), None)
    b.norm("features.norm0", feats.norm0, (g,))
    segs: tuple = (g,)
    for name, module in feats.named_children():
        if name.startswith("denseblock"):
            for lname, layer in module.named_children():
                p = f"features.{name}.{lname}"
                b.norm(f"{p}.norm1", layer.norm1, segs)
                mid = b.group(f"{p}.mid", layer.conv1.out_channels, f"{p}.norm2")
                b.conv(f"{p}.conv1", layer.conv1, (mid,), segs)
                b.norm(f"{p}.norm2", layer.norm2, (mid,))
                out = b.group(p, layer.conv2.out_channels, f"{p}.conv2")
                b.conv(f"{p}.conv2", layer.conv2, (out,), (mid,))
                segs = segs + (out,)
        elif name.startswith("transition"):
            p = f"features.{name}"
            b.norm(f"{p}.norm", module.norm, segs)
            g = b.group(p, module.conv.out_channels, f"{p}.conv")
            b.conv(f"{p}.conv", module.conv, (g,), segs)
            segs = (g,)
        elif name == "norm5":
            b.norm("features.norm5", module, segs)
    return segs


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutation groups of a timm ResNet or DenseNet, bare or inside a ``Classifier``."""
    from timm.models.densenet import DenseNet
    from timm.models.resnet import ResNet

    prefix, backbone, head = "", model, None
    if hasattr(model, "backbone") and hasattr(model, "head"):
        prefix, backbone, head = "backbone.", model.backbone, model.head
    b = _Builder(prefix)
    if isinstance(backbone, ResNet):
        out = _resnet_spec(backbone, b)
    elif isinstance(backbone, DenseNet):
        out = _densenet_spec(backbone, b)
    else:
        raise ValueError(f"no permutation spec for {type(backbone).__name__}; "
                         "valid: timm ResNet, timm DenseNet (bare or inside a Classifier)")
    if isinstance(head, nn.Linear):
        b.axes["head.weight"] = (None, out)
        if head.bias is not None:
            b.axes["head.bias"] = (None,)
    spec = PermutationSpec(b.axes, b.sizes, b.features)
    missing = [k for k, v in model.state_dict().items() if v.is_floating_point() and k not in spec.axes]
    if missing:
        raise ValueError(f"the permutation spec misses floating entries {missing[:5]} of {type(backbone).__name__}")
    return spec


def _axis_index(spec: PermutationSpec, perms: Mapping[str, Tensor], segs) -> Tensor:
    parts, offset = [], 0
    for g in segs:
        parts.append(perms[g] + offset)
        offset += spec.sizes[g]
    return torch.cat(parts)


def permute_tensor(spec: PermutationSpec, perms: Mapping[str, Tensor], key: str, w: Tensor,
                   except_axis: int | None = None) -> Tensor:
    """``w`` (the entry ``key``) with every axis but ``except_axis`` permuted."""
    for axis, segs in enumerate(spec.axes[key]):
        if segs and axis != except_axis:
            w = w.index_select(axis, _axis_index(spec, perms, segs).to(w.device))
    return w


def identity_perms(spec: PermutationSpec) -> dict[str, Tensor]:
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def random_perms(spec: PermutationSpec, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(n, generator=gen) for g, n in spec.sizes.items()}


@torch.no_grad()
def apply_permutation(spec: PermutationSpec, perms: Mapping[str, Tensor], state: StateDict) -> dict[str, Tensor]:
    """The network ``state`` with its units reordered by ``perms`` (channel ``i`` of group ``g``
    becomes old channel ``perms[g][i]``); the function it computes is unchanged. Entries outside the
    spec (``num_batches_tracked``) are copied."""
    return {k: (permute_tensor(spec, perms, k, v) if k in spec.axes else v).clone() for k, v in state.items()}
