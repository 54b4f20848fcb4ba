"""The computations behind the CMM chapter's figures (``notebooks/cmm.ipynb``).

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025), Figs. 1, 2, 4, 5 (the authors' ``finetune_splitted_linear_debug.py``,
research note ``shared/research/magmax_cmm_code.md`` §5.2): the two-task states of a run, the
loss/accuracy along the plain and importance-weighted interpolation paths, the t-SNE of features
before and after the correction, and the numerical checks of the linearisation. The method itself
is ``cmm_utils.papers.cmm.stages``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils import merging
from cmm_utils.core.data import LabeledImages, Scenario, Task
from cmm_utils.core.io import read_cached_state, strip_prefix
from cmm_utils.core.models.heads import FrozenHead, HeadedModel
from cmm_utils.core.train import device, predict
from cmm_utils.papers.cmm.encoders import head_weights_fn
from cmm_utils.papers.cmm.linearize import LinearizedModel
from cmm_utils.papers.cmm.loop import debug_states_path
from cmm_utils.papers.cmm.networks import encoder_dim, make_encoder, set_state
from cmm_utils.papers.cmm.runs import run_method, run_parts


# --------------------------------------------------------------------------- figures (compute)
def two_task_states(scenario: Scenario, profile: str, seed: int, linear: bool = True, **overrides) -> dict:
    """The states behind the paper's Figs. 1, 2, 4, 5 (authors' debug scripts, note §5.2), from the
    ``cmm`` (linear) or ``cmm-no-linear`` (standard) run: ``prev`` = model after task 1 with its
    importance ``prev_F``; ``new`` = fine-tuned on task 2 from it, with ``new_F``; ``merged`` and
    ``corrected`` = after the merge, before and after the correction. Computed (two tasks, resumed
    from the task-1 checkpoint) if the run did not save them."""
    method = "cmm" if linear else "cmm-no-linear"
    parts = run_parts(method, scenario, profile, seed, None, overrides)
    path = debug_states_path(parts.identity, parts.cfg)
    found = read_cached_state(path, require_meta=False)  # damaged: warned about and recomputed
    if found is None:
        path.unlink(missing_ok=True)
        run_method(method, scenario, profile, seed, debug=True, stop_after=2, **overrides)
        found = read_cached_state(path, require_meta=False)
    state = found[0]
    return {k: strip_prefix(state, k + ".") for k in ("prev", "prev_F", "new", "new_F", "merged", "corrected")}


def _probe(task: Task, n: int) -> LabeledImages:
    return task.train.subset(np.arange(min(n, len(task.train))))


@torch.no_grad()
def interpolation_curves(scenario: Scenario, profile: str, seed: int, grid: Sequence[float],
                         images: int = 256, **overrides) -> pd.DataFrame:
    """Accuracy and loss along the paths between the task-1 model θ1 and the task-2 model θ2
    (fine-tuned from θ1), as the authors' debug scripts: plain ``(1−α)θ1 + αθ2`` and the
    importance-weighted path, for linearised and standard fine-tuning; each point evaluated on the
    first ``images`` training images of task 1 and of task 2 with that task's local head (CE and
    accuracy). Columns: training, path, alpha, task, accuracy, loss."""
    rows = []
    for linear in (True, False):
        st = two_task_states(scenario, profile, seed, linear=linear, **overrides)
        parts = run_parts("cmm" if linear else "cmm-no-linear", scenario, profile, seed, None, overrides)
        head_fn = head_weights_fn(parts.cfg, parts.encoder0, parts.clip, scenario)
        enc = make_encoder(parts.encoder0, linear).to(device())
        head = FrozenHead.unset(scenario.num_classes, encoder_dim(parts.encoder0), parts.cfg.logit_scale).to(device())
        tasks = scenario.tasks[:2]
        for task in tasks:
            head.set_rows(task.classes, head_fn(task))
        net = HeadedModel(enc, head)
        probes = [_probe(task, images) for task in tasks]
        for path in ("plain", "importance"):
            for a in grid:
                theta = (merging.linear_interpolation(st["prev"], st["new"], a) if path == "plain" else
                         merging.importance_weighted(st["prev"], st["prev_F"], st["new"], st["new_F"], a)[0])
                set_state(enc, theta)
                for i, (task, probe) in enumerate(zip(tasks, probes)):
                    logits = predict(net, probe)[:, list(task.classes)]
                    local = torch.tensor([list(task.classes).index(int(c)) for c in probe.labels])
                    rows.append({"training": "linearised" if linear else "standard", "path": path, "alpha": float(a),
                                 "task": f"task {i + 1}", "accuracy": float((logits.argmax(1) == local).float().mean()),
                                 "loss": float(F.cross_entropy(logits, local))})
    return pd.DataFrame(rows)


@torch.no_grad()
def tsne_embedding(scenario: Scenario, profile: str, seed: int, images: int = 150, task: int = 1,
                   **overrides) -> dict[str, np.ndarray]:
    """Features of one class (the most frequent of task ``task``'s training probe, task 2 by default:
    the data the correction sees) under the previous model, the merged model before correction and
    after it; one ``sklearn.manifold.TSNE(random_state=seed)`` fit on the concatenation (the
    authors fit one t-SNE on all three). Returns ``xy``, ``model`` (prev/merged/corrected), ``cls``."""
    from sklearn.manifold import TSNE

    st = two_task_states(scenario, profile, seed, linear=True, **overrides)
    encoder0 = run_parts("cmm", scenario, profile, seed, None, overrides).encoder0
    t = scenario.tasks[task]
    labels = t.train.labels
    cls = int(torch.bincount(labels).argmax())
    idx = np.flatnonzero(labels.numpy() == cls)[:images]
    probe = t.train.subset(idx)
    enc = make_encoder(encoder0, True).to(device())
    feats, names = [], []
    for name in ("prev", "merged", "corrected"):
        set_state(enc, st[name])
        feats.append(predict(enc, probe).numpy())
        names += [name] * len(idx)
    X = np.concatenate(feats)
    xy = TSNE(n_components=2, random_state=seed, perplexity=float(min(30, max(2, len(X) // 4))),
              init="pca").fit_transform(X)
    return {"xy": xy, "model": np.array(names), "cls": np.array(cls),
            "class_name": np.array(scenario.class_names[cls])}


@torch.no_grad()
def linearization_check(encoder0: nn.Module, x: torch.Tensor, eps: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Numerical checks of the linearisation on a batch ``x`` (the unit tests' properties):
    ``at_theta0`` = max |f_lin(x;θ0) − f(x;θ0)|; ``affine`` = max deviation of f_lin(θ0 + aΔ) from
    the line through a = 0 and a = 1, over a ∈ {−1, 0.5, 2} (0 up to rounding: f_lin is affine in θ);
    ``fd_rel`` = ‖(f(θ0+εΔ) − f(θ0))/ε − JΔ‖ / ‖JΔ‖ (first-order agreement with the network)."""
    gen = torch.Generator().manual_seed(seed)
    lin = LinearizedModel(encoder0).eval()
    f0 = lin.function_at()
    theta0 = lin.theta0()
    delta = {k: torch.randn(v.shape, generator=gen) * (v.std() if v.numel() > 1 else 1.0) * 0.05 for k, v in theta0.items()}

    def flin(a: float) -> torch.Tensor:
        lin.load_theta({k: theta0[k] + a * delta[k] for k in theta0})
        return lin(x)

    base, one = flin(0.0), flin(1.0)
    affine = max(float((flin(a) - (base + a * (one - base))).abs().max()) for a in (-1.0, 0.5, 2.0))
    jd = one - base
    fe = lin.function_at({k: theta0[k] + eps * delta[k] for k in theta0})
    fd = (fe(x) - f0(x)) / eps
    return {"at_theta0": float((base - f0(x)).abs().max()), "affine": affine,
            "affine_scale": float(jd.abs().max()), "fd_rel": float((fd - jd).norm() / jd.norm())}
