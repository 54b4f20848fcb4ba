"""One device and one precision for every chapter: ``CMM_DEVICE`` and ``CMM_PRECISION``.

- ``CMM_DEVICE``: ``cpu``, ``cuda`` or ``cuda:<index>``; unset, ``cuda`` when torch sees a GPU, else
  ``cpu``. :func:`device` reads it at each call (``cmm_utils.core.train.device`` is this function),
  and every chapter puts its models there (:func:`to_device`).
- ``CMM_PRECISION``: ``fp32`` (default), ``amp-bf16`` or ``amp-fp16``: ``fit`` and ``predict`` run
  their forward passes under ``torch.autocast`` (fp16 with a gradient scaler), **on CUDA only**; on
  the CPU everything stays fp32 (a warning says so), so CPU results never change with it. None of
  the four papers' released code uses mixed precision (MagMax/CMM: mlfoundations' fp32 loop;
  DynaMMo: PyCIL's fp32 loop; MedMerge: no code), hence the default.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Iterable

import torch
from torch import nn

DEVICE_ENV = "CMM_DEVICE"
PRECISION_ENV = "CMM_PRECISION"
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16")
_AMP_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def device() -> torch.device:
    """``CMM_DEVICE`` if set (validated), else ``cuda`` when available, else ``cpu``."""
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if not value:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"{DEVICE_ENV}={value!r} is not a device; valid: cpu, cuda, cuda:<index>")
    dev = torch.device(value)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}={value!r} but torch sees no CUDA device "
                               f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); valid here: cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"{DEVICE_ENV}={value!r} but only {torch.cuda.device_count()} CUDA device(s): "
                               f"valid: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def to_device(module: nn.Module) -> nn.Module:
    """``module`` on :func:`device` (in place, as ``nn.Module.to``; returned for chaining)."""
    return module.to(device())


def precision() -> str:
    """``CMM_PRECISION`` (default ``fp32``), validated."""
    value = os.environ.get(PRECISION_ENV, "").strip().lower() or "fp32"
    if value not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV}={value!r} is not a precision; valid: {', '.join(PRECISIONS)}")
    return value


_WARNED: set = set()


def effective_precision(dev: torch.device) -> str:
    """The precision used on ``dev``: :func:`precision` on CUDA, always ``fp32`` elsewhere."""
    value = precision()
    if value != "fp32" and dev.type != "cuda":
        if value not in _WARNED:
            warnings.warn(f"{PRECISION_ENV}={value} applies on CUDA only; running fp32 on {dev}", stacklevel=3)
            _WARNED.add(value)
        return "fp32"
    return value


class MixedPrecision:
    """The autocast context and the (fp16-only) gradient scaler of one fit on ``dev``.

    In fp32 :meth:`backward` is ``loss.backward()`` and :meth:`step` is ``opt.step()``: nothing else.
    """

    def __init__(self, dev: torch.device):
        self.mode = effective_precision(dev)
        self.dev = dev
        self.scaler = torch.amp.GradScaler("cuda") if self.mode == "amp-fp16" else None

    def autocast(self):
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=_AMP_DTYPES[self.mode])

    def backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Backward; with the scaler, gradients are unscaled at once so clipping sees true norms."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)  # skipped when fp16 gradients overflowed, as torch.amp intends
        self.scaler.update()


def _same(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` are the same place."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def misplaced(dev: torch.device, modules: dict[str, nn.Module],
              tensors: Iterable[tuple[str, torch.Tensor]] = ()) -> list[str]:
    """``"name: device"`` of every parameter, buffer (and extra tensor) that is not on ``dev``."""
    bad = []
    for label, module in modules.items():
        for kind, items in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
            bad += [f"{label}.{n} ({kind}): {t.device}" for n, t in items if not _same(t.device, dev)]
    bad += [f"{n}: {t.device}" for n, t in tensors if not _same(t.device, dev)]
    return bad


def check_on_device(dev: torch.device, modules: dict[str, nn.Module],
                    tensors: Iterable[tuple[str, torch.Tensor]] = ()) -> int:
    """Raise naming the first misplaced tensors; else the number of tensors checked."""
    tensors = list(tensors)
    bad = misplaced(dev, modules, tensors)
    if bad:
        raise RuntimeError(f"{len(bad)} tensor(s) not on {dev}: {'; '.join(bad[:5])}"
                           + (" ..." if len(bad) > 5 else ""))
    return len(tensors) + sum(len(list(m.parameters())) + len(list(m.buffers())) for m in modules.values())
