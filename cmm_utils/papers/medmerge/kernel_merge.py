"""MedMerge's learnable kernel-level merge of two CNNs.

I. Almakky, S. Sanjeev, A. U. R. Hashmi, M. A. Qazi, (H. Wang,) M. Yaqub,
"MedMerge: Merging Models for Effective Transfer Learning to Medical Imaging
Tasks", arXiv:2403.11646. No official code could be read. This module implements
the merge equation as stated for every 2-D convolution:

.. math::  W = w \\odot W_a + (1 - w) \\odot W_b

Here :math:`W_a, W_b \\in \\mathbb R^{C_{out} \\times C_{in}/g \\times k_h \\times k_w}`
are the two models' frozen kernels. :math:`w \\in \\mathbb R^{C_{out} \\times C_{in}/g}`
is learnable, one scalar per 2-D kernel, broadcast over the spatial dims. After
training, :func:`collapse_kernel_merge` folds every layer into a plain
``nn.Conv2d``, so the merged model costs the same at inference as one model.

Open choices, all [inferred] and kept configurable:

* *Granularity*: one weight per kernel (C_out × C_in/groups). The paper says
  "kernel-level".
* *Parametrisation*: ``"direct"`` (default) uses w as is, exactly the equation and
  unconstrained. ``"sigmoid"`` uses w = sigmoid(logit), which keeps w in (0, 1).
* *Biases*: a conv bias is merged the same way, with its own learnable weight per
  output channel: b = w_b ⊙ b_a + (1 − w_b) ⊙ b_b.
* *Non-conv parameters* (BatchNorm, classifier): taken from model a, the anchor,
  by default (``other_params="a"``), or averaged (``"average"``). They stay
  trainable unless the caller freezes them.
* "Merging with zeros" (an ablation): pass a ``model_b`` whose conv weights are
  zero.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KernelMergedConv2d", "collapse_kernel_merge", "kernel_weights", "wrap_kernel_merge"]

PARAMETRISATIONS = ("direct", "sigmoid")
_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)


def _conv_config(conv: nn.Conv2d) -> dict:
    cfg = {a: getattr(conv, a) for a in _CONV_ATTRS}
    cfg["bias"] = conv.bias is not None
    return cfg


def _check_plain_conv(conv: nn.Module, name: str) -> None:
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        raise ValueError(f"module {name!r}: {type(conv).__name__} overrides Conv2d's forward; not supported")


class KernelMergedConv2d(nn.Module):
    """A Conv2d whose kernel is ``w ⊙ W_a + (1 − w) ⊙ W_b`` with learnable ``w``.

    ``W_a``, ``W_b`` (and the biases) are frozen copies, stored as buffers so that
    they are never parameters. The learnable parameters are ``w_raw`` of shape
    ``(C_out, C_in/groups)`` and, when the convs have biases, ``bias_w_raw`` of
    shape ``(C_out,)``. The effective weights are :attr:`w` and :attr:`bias_w`.
    The forward pass is ``F.conv2d`` with the original stride, padding, dilation,
    groups and padding mode.

    Args:
        conv_a, conv_b: convolutions with identical configuration.
        init: initial merge weight w, 0.5 by default. It must lie in (0, 1) for
            ``"sigmoid"``.
        parametrisation: ``"direct"`` (w = w_raw, the paper's equation) or
            ``"sigmoid"`` (w = sigmoid(w_raw)). This is an open choice; see the
            module docstring.
    """

    def __init__(self, conv_a: nn.Conv2d, conv_b: nn.Conv2d, init: float = 0.5, parametrisation: str = "direct"):
        super().__init__()
        if parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"unknown parametrisation {parametrisation!r}; valid: {', '.join(PARAMETRISATIONS)}")
        cfg_a, cfg_b = _conv_config(conv_a), _conv_config(conv_b)
        if cfg_a != cfg_b:
            diff = {k: (cfg_a[k], cfg_b[k]) for k in cfg_a if cfg_a[k] != cfg_b[k]}
            raise ValueError(f"convolutions differ (a, b): {diff}")
        if parametrisation == "sigmoid":
            if not 0.0 < init < 1.0:
                raise ValueError(f"init must be in (0, 1) for the sigmoid parametrisation, got {init}")
            raw = math.log(init / (1.0 - init))
        else:
            raw = float(init)
        self.parametrisation = parametrisation
        self.config = cfg_a
        for attr in _CONV_ATTRS:
            setattr(self, attr, cfg_a[attr])
        self._reversed_padding_repeated_twice = conv_a._reversed_padding_repeated_twice
        wa = conv_a.weight.detach()
        self.register_buffer("weight_a", wa.clone())
        self.register_buffer("weight_b", conv_b.weight.detach().to(wa).clone())
        self.w_raw = nn.Parameter(torch.full(wa.shape[:2], raw, dtype=wa.dtype, device=wa.device))
        if conv_a.bias is not None:
            self.register_buffer("bias_a", conv_a.bias.detach().clone())
            self.register_buffer("bias_b", conv_b.bias.detach().to(conv_a.bias).clone())
            self.bias_w_raw = nn.Parameter(torch.full((wa.shape[0],), raw, dtype=wa.dtype, device=wa.device))
        else:
            self.register_buffer("bias_a", None)
            self.register_buffer("bias_b", None)
            self.register_parameter("bias_w_raw", None)

    def _effective(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.parametrisation == "sigmoid" else raw

    @property
    def w(self) -> Tensor:
        """The per-kernel merge weight w, shape ``(C_out, C_in/groups)``."""
        return self._effective(self.w_raw)

    @property
    def bias_w(self) -> Tensor | None:
        """The per-output-channel merge weight of the bias (None without bias)."""
        return None if self.bias_w_raw is None else self._effective(self.bias_w_raw)

    def merged_weight(self) -> Tensor:
        # lerp(W_b, W_a, w) = W_b + w (W_a - W_b): exactly W_a at w = 1, W_b at w = 0
        return torch.lerp(self.weight_b, self.weight_a, self.w[:, :, None, None])

    def merged_bias(self) -> Tensor | None:
        return None if self.bias_a is None else torch.lerp(self.bias_b, self.bias_a, self.bias_w)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.merged_weight(), self.merged_bias()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the current merged kernel (and bias)."""
        c = self.config
        conv = nn.Conv2d(
            c["in_channels"],
            c["out_channels"],
            c["kernel_size"],
            stride=c["stride"],
            padding=c["padding"],
            dilation=c["dilation"],
            groups=c["groups"],
            bias=c["bias"],
            padding_mode=c["padding_mode"],
            device=self.weight_a.device,
            dtype=self.weight_a.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.merged_weight())
            if conv.bias is not None:
                conv.bias.copy_(self.merged_bias())
        return conv

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{c['in_channels']}, {c['out_channels']}, kernel_size={c['kernel_size']}, stride={c['stride']}, "
            f"padding={c['padding']}, groups={c['groups']}, bias={c['bias']}, parametrisation={self.parametrisation!r}"
        )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap_kernel_merge(
    model_a: nn.Module,
    model_b: nn.Module,
    init: float = 0.5,
    parametrisation: str = "direct",
    other_params: str = "a",
) -> nn.Module:
    """A deep copy of ``model_a`` in which every ``nn.Conv2d`` is a :class:`KernelMergedConv2d`.

    Each one is built from the matching convolutions of ``model_a`` and ``model_b``.
    The two models must have the same module names, module types, conv
    configurations, and parameter and buffer shapes; otherwise ``ValueError``
    names the first offending module or tensor. Conv2d subclasses that override
    the forward (e.g. timm's ``Conv2dSame``) are rejected.

    ``other_params`` sets the non-conv parameters and buffers (BatchNorm,
    classifier): ``"a"`` (default) keeps model a's, the anchored model.
    ``"average"`` averages the floating ones of a and b, BN running statistics
    included; integer buffers come from a. Only ``w`` (and ``bias_w``) are new
    parameters. Everything else keeps model a's ``requires_grad``. Freeze it if
    only the merge weights should train.
    """
    if other_params not in ("a", "average"):
        raise ValueError(f"unknown other_params {other_params!r}; valid: 'a', 'average'")
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    for name, mod in mods_a.items():
        if name not in mods_b:
            raise ValueError(f"module {name!r}: in model_a but not in model_b")
        if type(mods_b[name]) is not type(mod):
            raise ValueError(f"module {name!r}: {type(mod).__name__} in model_a, {type(mods_b[name]).__name__} in model_b")
        if isinstance(mod, nn.Conv2d):
            _check_plain_conv(mod, name)
            if _conv_config(mod) != _conv_config(mods_b[name]):
                raise ValueError(f"module {name!r}: conv configurations differ: {_conv_config(mod)} vs {_conv_config(mods_b[name])}")
    for name in mods_b:
        if name not in mods_a:
            raise ValueError(f"module {name!r}: in model_b but not in model_a")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    for key, va in sd_a.items():
        if key not in sd_b or sd_b[key].shape != va.shape:
            found = tuple(sd_b[key].shape) if key in sd_b else "nothing"
            raise ValueError(f"tensor {key!r}: shape {tuple(va.shape)} in model_a, {found} in model_b")

    merged = copy.deepcopy(model_a)
    if other_params == "average":
        with torch.no_grad():
            for key, tensor in merged.state_dict(keep_vars=True).items():
                if tensor.is_floating_point():
                    tensor.copy_((sd_a[key].double() + sd_b[key].double()).div(2).to(tensor.dtype))
    for name, mod in mods_a.items():
        if isinstance(mod, nn.Conv2d):
            _replace(merged, name, KernelMergedConv2d(mod, mods_b[name], init=init, parametrisation=parametrisation))
    return merged


GRANULARITIES = ("kernel", "layer", "global")


def tie_merge_weights(model: nn.Module, granularity: str = "kernel") -> nn.Module:
    """Coarser merge weights for the controls of the regime check (issue 12, not the paper's
    method): ``"kernel"`` leaves MedMerge's one ``w`` per 2-D kernel; ``"layer"`` gives each
    convolution one ``w`` (shape ``(1, 1)``, broadcast over its kernels); ``"global"`` one ``w``
    shared by every convolution (one interpolation weight between the two sources). A uniform ``w``
    is not undone by BatchNorm, unlike a merge with zeros: it mixes two different kernels. Each ``w``
    keeps the module's current (initial) value; in place, returns ``model``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    if granularity == "kernel":
        return model
    convs = [m for m in model.modules() if isinstance(m, KernelMergedConv2d)]
    shared: dict[str, nn.Parameter] = {}
    for m in convs:
        for name in ("w_raw", "bias_w_raw"):
            old = getattr(m, name)
            if old is None:
                continue
            shape = (1, 1) if name == "w_raw" else (1,)
            start = old.detach().flatten()[:1].reshape(shape).clone()
            if granularity == "layer":
                setattr(m, name, nn.Parameter(start))
            else:
                setattr(m, name, shared.setdefault(name, nn.Parameter(start)))
    return model


def collapse_kernel_merge(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`KernelMergedConv2d` replaced by a
    plain ``nn.Conv2d`` holding the merged kernel: the same outputs, the cost of
    one network."""
    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, KernelMergedConv2d):
            _replace(out, name, mod.to_conv2d())
    return out


def kernel_weights(model: nn.Module) -> dict[str, Tensor]:
    """Layer name → detached merge weight w, shape ``(C_out, C_in/groups)``, in
    module order, e.g. for depth-wise heatmaps of the mean learned weight."""
    return {n: m.w.detach().clone() for n, m in model.named_modules() if isinstance(m, KernelMergedConv2d)}
