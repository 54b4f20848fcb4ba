"""Loss-surface planes (Garipov et al. 2018) and BatchNorm recomputation (cmm_utils.papers.medmerge.landscape)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from cmm_utils.papers.medmerge import landscape as ls
from cmm_utils.core.data import LabeledImages
from cmm_utils.core.train import to_float


class Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def images(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return LabeledImages((torch.rand(n, 3, 8, 8, generator=gen) * 255).to(torch.uint8),
                         torch.randint(0, 3, (n,), generator=gen))


def test_plane_basis_is_orthonormal_and_places_the_three_points():
    gen = torch.Generator().manual_seed(0)
    w0, w1, w2 = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    b = ls.plane_basis(w0, w1, w2)
    assert abs(float(b["u"] @ b["v"])) < 1e-10
    assert abs(float(b["u"].norm()) - 1) < 1e-10 and abs(float(b["v"].norm()) - 1) < 1e-10
    c = b["coords"]
    assert torch.allclose(c[0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(c[2], torch.tensor([b["dx"], 0.0], dtype=torch.float64))
    assert abs(float(c[1, 1]) - b["dy"]) < 1e-10
    # w1 is reconstructed from its coordinates: it lies in the plane
    assert torch.allclose(w0 + c[1, 0] * b["u"] + c[1, 1] * b["v"], w1)


def test_degenerate_planes_raise():
    w = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="coincide"):
        ls.plane_basis(w, w + 1, w)
    with pytest.raises(ValueError, match="collinear"):
        ls.plane_basis(w, w + 0.5, w + 1.0)


def test_recompute_bn_estimates_the_batch_statistics():
    model = Tiny(0)
    data = images(40)
    ls.recompute_bn(model, data, batch_size=16)
    with torch.no_grad():
        z = model.conv(to_float(data.images))
    assert torch.allclose(model.bn.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn.running_var, z.var((0, 2, 3)), rtol=1e-2)
    assert not model.training


def test_plane_grid_hits_the_corner_networks_and_round_trips(tmp_path):
    states = [Tiny(s).state_dict() for s in (1, 2, 3)]
    data = images(24)
    res = ls.plane_grid(Tiny(0), states, data, data, images(12, seed=1), grid=3, margin=0.0)
    assert res["test_err"].shape == (3, 3) and res["grid"].shape == (3, 3, 2)
    assert np.all((res["train_err"] >= 0) & (res["train_err"] <= 1))
    for (i, j), k in (((0, 0), 0), ((2, 0), 2)):  # alpha=0 -> w0, alpha=1, beta=0 -> w2
        m = Tiny(0)
        m.load_state_dict(states[k])
        ls.recompute_bn(m, data)
        loss, err = ls.evaluate(m, data)
        assert abs(res["train_loss"][i, j] - loss) < 1e-5 and abs(res["train_err"][i, j] - err) < 1e-9
    path = tmp_path / "plane.npz"
    ls.save_plane(path, res, labels=np.array(["a", "m", "b"]))
    back = ls.load_plane(path)
    assert np.array_equal(back["test_err"], res["test_err"]) and list(back["labels"]) == ["a", "m", "b"]
    ax = ls.plot_plane(back, "test_err", labels=list(back["labels"]))
    assert len(ax.texts) == 3  # the three networks are labelled


def test_plane_needs_three_networks():
    with pytest.raises(ValueError, match="three"):
        ls.plane_grid(Tiny(0), [Tiny(1).state_dict()] * 2, images(), images(), images())
