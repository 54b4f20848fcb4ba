"""Inference cost of the DynaMMo chapter's methods as the number of tasks ``T`` grows: GFLOPs per
image, parameters an inference pass uses and CPU latency, for DynaMMo (merged adapters, constant
cost), ACL (one adapter path per task), DER (one backbone per task) and a single model; the table
behind the paper's "around 10-fold reduction in GFLOPS" claim (abstract)."""
from __future__ import annotations

import copy
import time
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cmm_utils.core.continual import gflops_per_image
from cmm_utils.core.models import Classifier
from cmm_utils.papers.dynammo.adapters import AdapterNet
from cmm_utils.papers.dynammo.baselines import ExpandableNet


# ------------------------------------------------------------------------------ cost as T grows
def inference_ms(model: nn.Module, image_size: int, batch_size: int = 64, repeats: int = 5) -> float:
    """Median CPU wall time per image (ms) of ``model`` on a random batch, after one warm-up."""
    model = model.cpu().eval()
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times)) / batch_size


def _growing_models(backbone: nn.Module, classes_per_task: int, max_tasks: int, dev: str):
    """Yield ``(T, {method: model})`` for ``T = 1..max_tasks``, each model grown by one task per step."""
    backbone = copy.deepcopy(backbone).to(dev).eval()
    adapter_net = AdapterNet(copy.deepcopy(backbone)).eval()
    der = ExpandableNet(copy.deepcopy(backbone), classes_per_task * max_tasks).eval()
    single = Classifier(copy.deepcopy(backbone), classes_per_task * max_tasks).to(dev).eval()
    for T in range(1, max_tasks + 1):
        adapter_net.add_task(classes_per_task)
        der.add_task(classes_per_task)
        yield T, {"dynammo": adapter_net, "acl": adapter_net, "der": der, "finetune": single}


def _inference_params(method: str, model: nn.Module) -> int:
    if method in ("dynammo", "acl"):
        model.inference = "merged" if method == "dynammo" else "paths"
    return model.inference_parameters() if hasattr(model, "inference_parameters") \
        else sum(p.numel() for p in model.parameters())


def cost_table(backbone: nn.Module, image_size: int, max_tasks: int = 10, classes_per_task: int = 2,
               timing_tasks: Sequence[int] = (), timing_repeats: int = 3, timing_batch: int = 64,
               tasks: Sequence[int] | None = None) -> pd.DataFrame:
    """Inference cost of every method with ``T`` tasks, ``T`` in ``tasks`` (default ``1..max_tasks``):
    GFLOPs per image counted by ``torch.utils.flop_counter`` (:func:`gflops_per_image`), parameters
    an inference pass uses, and for ``T`` in ``timing_tasks`` the measured CPU ms per image.

    Weights are irrelevant, so untrained modules of the right shapes are counted; fine-tuning and joint
    training share the single-model row (``finetune``). FLOPs are counted on PyTorch's ``meta`` device
    (shapes only, no memory, no arithmetic; the counter gives the same count as on the CPU), so even the
    224 px table is quick; only the timed models are real."""
    tasks = sorted(tasks) if tasks is not None else list(range(1, max_tasks + 1))
    rows = []
    for T, models in _growing_models(backbone, classes_per_task, max(tasks), "meta"):
        if T in tasks:
            for method, model in models.items():
                n_params = _inference_params(method, model)
                rows.append({"method": method, "tasks": T, "image_size": image_size,
                             "gflops": gflops_per_image(model, image_size), "params_m": n_params / 1e6,
                             "ms_per_image": float("nan")})
    table = pd.DataFrame(rows)
    if timing_tasks:
        for T, models in _growing_models(backbone, classes_per_task, max(timing_tasks), "cpu"):
            if T in timing_tasks:
                for method, model in models.items():
                    _inference_params(method, model)
                    ms = inference_ms(model, image_size, timing_batch, timing_repeats)
                    hit = (table["method"] == method) & (table["tasks"] == T)
                    if hit.any():
                        table.loc[hit, "ms_per_image"] = ms
                    else:
                        table.loc[len(table)] = {"method": method, "tasks": T, "image_size": image_size,
                                                 "gflops": float("nan"), "params_m": float("nan"), "ms_per_image": ms}
    return table


def adapter_parameters(backbone: nn.Module) -> dict[str, int]:
    """Parameters of one adapter set and of the backbone (the note: 1,625,092 per task on ResNet-18)."""
    net = AdapterNet(copy.deepcopy(backbone))
    net.add_task(1)
    return {"backbone": sum(p.numel() for p in backbone.parameters()),
            "adapters_per_task": sum(p.numel() for p in net.adapters[0].parameters())}


def chapter_costs(backbone: nn.Module, image_size: int, paper_backbone: nn.Module, settings: Mapping) -> pd.DataFrame:
    """The page's cost table: every method as ``T`` grows at our resolution (timed too) and at the
    paper's (timm ResNet-18 at 224 px, 10 classes per task as CIFAR100), one ``setting`` column apart."""
    ours = cost_table(backbone, image_size, settings["cost_tasks"], settings["cost_classes_per_task"],
                      timing_tasks=settings["timing_tasks"], timing_repeats=settings["timing_repeats"],
                      timing_batch=settings["timing_batch"])
    paper_res = cost_table(paper_backbone, 224, max(settings["paper_res_tasks"]), 10, tasks=settings["paper_res_tasks"])
    costs = pd.concat([ours.assign(setting=f"ours: book ResNet-18, {image_size} px"),
                       paper_res.assign(setting="paper: timm ResNet-18, 224 px")], ignore_index=True)
    costs["method"] = costs["method"].replace({"finetune": "finetune / joint"})
    return costs


def cost_growth(costs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """How cost grows with ``T`` per setting of :func:`chapter_costs`, checked: DynaMMo's is flat in
    ``T`` (each head adds ``2·d·(n_t+1)`` FLOPs, < 0.001 GFLOPs), ACL's grows linearly, by most of a
    network per task (the four stages and their adapters; the stem is shared). Returns the ratios
    ACL / DynaMMo and DER / DynaMMo at the largest ``T`` and, per setting, DynaMMo's flat cost in words."""
    flat_in_t = {}
    for setting, part in costs.groupby("setting"):
        dyn = part[part.method == "dynammo"].sort_values("tasks")
        acl = part[part.method == "acl"].sort_values("tasks")
        assert len(dyn) >= 2 and dyn["gflops"].round(3).nunique() == 1, (setting, dyn["gflops"].tolist())
        steps = np.diff(acl["gflops"].to_numpy()) / np.diff(acl["tasks"].to_numpy())
        assert np.allclose(steps, steps[0], rtol=1e-3), (setting, steps)          # linear in T
        assert steps[0] > 0.5 * acl["gflops"].iloc[0], (setting, steps[0])        # most of a network per task
        flat_in_t[setting] = f"{dyn['gflops'].iloc[0]:.3f} GFLOPs for every T ({setting})"
    last = costs[costs.tasks == costs.groupby("setting").tasks.transform("max")]
    at_last = last.pivot_table(index="setting", columns="method", values="gflops")
    ratios = pd.DataFrame({"tasks": last.groupby("setting").tasks.max(),
                           "ACL / DynaMMo": at_last["acl"] / at_last["dynammo"],
                           "DER / DynaMMo": at_last["der"] / at_last["dynammo"]}).round(2)
    return ratios, flat_in_t
