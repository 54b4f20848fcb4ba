"""Loss-surface planes through three networks (Garipov et al. 2018), and BatchNorm recomputation.

MedMerge (Almakky et al. 2024, Fig. 2) draws the training and test error on the 2-D plane through
three weight vectors: the two source models and the merged one. The recipe is Garipov, Izmailov,
Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs",
NeurIPS 2018, ``dnn-mode-connectivity/plane.py``, which the MedMerge authors' group reuses
(``santosh9sanjeev/mode-connectivity``): with the three points flattened to ``w0, w1, w2``,

    u = (w2 - w0) / |w2 - w0|,   v = (w1 - w0) - <u, w1 - w0> u,  v /= |v|     (Gram-Schmidt)
    p(alpha, beta) = w0 + alpha dx u + beta dy v,    alpha, beta in linspace(-margin, 1 + margin, G)

and at every grid point the BatchNorm statistics are recomputed on training data before the train
and test loss and error are measured. :func:`plane_grid` computes and returns plain arrays
(written to an ``.npz`` artifact by the caller, like ``plane.py``); :func:`plot_plane` only reads
those arrays (like ``plane_plot.py``).

Deviations: the flattened vector holds every learnable parameter (convolutions, BN affine
parameters, the linear head), not BN running statistics (recomputed at each point, as Garipov
does); BN is recomputed and train error measured on a seeded *subset* of the training data to fit
a CPU budget; ``utils.update_bn`` is re-written here (the original uses ``cuda(async=True)``, a syntax error on Python >= 3.7; :func:`recompute_bn` follows it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmm_utils.core.data import LabeledImages
from cmm_utils.core.io import atomic_path
from cmm_utils.core.train import batches, predict, to_float

StateDict = Mapping[str, Tensor]


@torch.no_grad()
def recompute_bn(model: nn.Module, images: LabeledImages | Tensor, batch_size: int = 128) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them on ``images`` in train mode,
    without augmentation, each batch weighted by its size (Garipov's ``utils.update_bn``: momentum
    ``b / (n + b)``, so the running mean is the mean over all images); the model is left in eval
    mode. A no-op for a model without BatchNorm."""
    data = images if isinstance(images, LabeledImages) else LabeledImages(images, torch.zeros(len(images), dtype=torch.long))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model.eval()
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
    model.train()
    dev = next(model.parameters()).device
    seen = 0
    for x, _ in batches(data, batch_size, shuffle=False):
        b = len(x)
        for m in bns:
            m.momentum = b / (seen + b)
        model(to_float(x.to(dev)))
        seen += b
    for m, mom in momenta.items():
        m.momentum = mom
    return model.eval()


def learnable_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the learnable parameters (the plane's coordinates)."""
    return [k for k, _ in model.named_parameters()]


def flatten(state: StateDict, keys: Sequence[str]) -> Tensor:
    return torch.cat([state[k].detach().reshape(-1).double().cpu() for k in keys])


def plane_basis(w0: Tensor, w1: Tensor, w2: Tensor) -> dict[str, Tensor | float]:
    """Garipov's orthonormal basis of the plane through ``w0, w1, w2`` and the three points'
    coordinates in it (``w0`` at the origin, ``w2`` on the first axis)."""
    u = w2 - w0
    dx = float(u.norm())
    if dx == 0:
        raise ValueError("w0 and w2 coincide: the plane is not defined")
    u = u / dx
    v = (w1 - w0) - torch.dot(u, w1 - w0) * u
    dy = float(v.norm())
    if dy < 1e-12 * max(1.0, dx):
        raise ValueError("the three points are collinear: the plane is not defined")
    v = v / dy
    coords = torch.stack([torch.stack([torch.dot(w - w0, u), torch.dot(w - w0, v)]) for w in (w0, w1, w2)])
    return {"u": u, "v": v, "dx": dx, "dy": dy, "coords": coords}


def _unflatten(vec: Tensor, template: StateDict, keys: Sequence[str]) -> dict[str, Tensor]:
    out, i = dict(template), 0
    for k in keys:
        n = template[k].numel()
        out[k] = vec[i:i + n].view_as(template[k]).to(template[k].dtype)
        i += n
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages) -> tuple[float, float]:
    """Mean cross-entropy and error (in [0, 1]) of ``model`` on ``data``."""
    logits = predict(model, data)
    return float(F.cross_entropy(logits, data.labels)), float((logits.argmax(1) != data.labels).float().mean())


def plane_grid(model: nn.Module, states: Sequence[StateDict], bn_data: LabeledImages, train_data: LabeledImages,
               test_data: LabeledImages, *, grid: int = 9, margin: float = 0.2,
               desc: str = "plane") -> dict[str, np.ndarray]:
    """Train/test loss and error on a ``grid`` x ``grid`` lattice of the plane through ``states``
    (``[w0, w1, w2]``: origin, the point off the axis, the point on the axis), BN recomputed on
    ``bn_data`` at every point. ``model`` is only a container of the right architecture."""
    if len(states) != 3:
        raise ValueError(f"a plane needs exactly three networks, got {len(states)}")
    keys = learnable_keys(model)
    w = [flatten(s, keys) for s in states]
    basis = plane_basis(*w)
    template = {k: v.clone() for k, v in states[0].items()}
    alphas = np.linspace(-margin, 1 + margin, grid)
    betas = np.linspace(-margin, 1 + margin, grid)
    out = {n: np.zeros((grid, grid)) for n in ("train_loss", "train_err", "test_loss", "test_err")}
    xy = np.zeros((grid, grid, 2))
    with tqdm(total=grid * grid, desc=desc, leave=False) as bar:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                p = w[0] + a * basis["dx"] * basis["u"] + b * basis["dy"] * basis["v"]
                model.load_state_dict(_unflatten(p, template, keys))
                recompute_bn(model, bn_data)
                out["train_loss"][i, j], out["train_err"][i, j] = evaluate(model, train_data)
                out["test_loss"][i, j], out["test_err"][i, j] = evaluate(model, test_data)
                xy[i, j] = (a * basis["dx"], b * basis["dy"])
                bar.update(1)
    return {"alphas": alphas, "betas": betas, "grid": xy, "coords": basis["coords"].numpy(),
            "dx": np.float64(basis["dx"]), "dy": np.float64(basis["dy"]), **out}


def save_plane(path: Path | str, result: Mapping[str, np.ndarray], **extra) -> None:
    """Write a plane (and ``extra`` arrays or strings, e.g. point labels) to ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **result, **{k: np.asarray(v) for k, v in extra.items()})


def load_plane(path: Path | str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def plot_plane(result: Mapping[str, np.ndarray], key: str = "test_err", ax=None, labels: Sequence[str] | None = None,
               markers: Sequence[str] = ("s", "D", "o"), title: str = "", vmin: float | None = None,
               vmax: float | None = None):
    """Filled contours of ``result[key]`` (error shown in %) over the plane (dark = low), the three
    networks marked and labelled (Garipov's ``plane_plot.py``, linear levels). ``vmin``/``vmax`` (in
    the plotted unit, % for errors) fix the colour scale, e.g. to share it between planes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3.4))
    z = np.asarray(result[key]) * (100.0 if key.endswith("err") else 1.0)
    g = np.asarray(result["grid"])
    lo = float(np.nanmin(z)) if vmin is None else vmin
    hi = max(float(np.nanmax(z)) if vmax is None else vmax, lo + 1e-6)
    levels = np.linspace(lo, hi, 12)
    zc = np.clip(z, lo, hi)
    cs = ax.contourf(g[..., 0], g[..., 1], zc, levels=levels, cmap="viridis")
    ax.contour(g[..., 0], g[..., 1], zc, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    cbar = ax.figure.colorbar(cs, ax=ax, fraction=0.046, pad=0.04, format="%.0f")
    cbar.set_label(key.replace("_", " ") + (" (%)" if key.endswith("err") else ""), fontsize=8)
    labels = list(labels) if labels is not None else ["w0", "w1", "w2"]
    for (x, y), lab, mk in zip(np.asarray(result["coords"]), labels, markers):
        ax.scatter([x], [y], marker=mk, s=55, c="white", edgecolors="k", zorder=3)
        ax.annotate(lab, (x, y), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=7,
                    color="white", fontweight="bold", zorder=4)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]); ax.set_yticks([])
    return ax
