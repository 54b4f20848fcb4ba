"""The controls of MedMerge's regime check (issue 12; not the paper's methods): what the two
sources give the target without MedMerge's per-kernel weights.

- ``interp_global``: one learned interpolation weight between the two sources for every
  convolution (:func:`~cmm_utils.papers.medmerge.kernel_merge.tie_merge_weights`, ``"global"``);
- ``interp_layer``: one learned weight per convolution (``"layer"``);
- ``ensemble``: the output ensemble of the two target-fine-tuned sources (:class:`OutputEnsemble`).

Both interpolations run MedMerge's own probe and fine-tuning, so the gap MedMerge − control isolates
the per-kernel weights; unlike merging with zeros, BatchNorm cannot absorb them (a uniform weight
between two *different* kernels is not a rescaling of one).
"""
from __future__ import annotations

import torch
from torch import nn

# method name -> granularity of the merge weight (the probe's ``granularity``)
INTERPOLATIONS = {"interp_global": "global", "interp_layer": "layer"}
CONTROL_METHODS = ("ensemble", "interp_global_lp", "interp_global", "interp_layer_lp", "interp_layer")


class OutputEnsemble(nn.Module):
    """The mean of two classifiers' softmax outputs, returned as log-probabilities (so that the
    arg-max, and every score computed from logits, is the ensemble's)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module):
        super().__init__()
        self.a, self.b = model_a, model_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.a(x).softmax(dim=1) + self.b(x).softmax(dim=1)) / 2
        return p.clamp_min(1e-12).log()
