"""Tests for cmm_utils.papers.medmerge.kernel_merge (MedMerge's kernel-level merge)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmm_utils.papers.medmerge.kernel_merge import KernelMergedConv2d, collapse_kernel_merge, kernel_weights, wrap_kernel_merge


class TinyCNN(nn.Module):
    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=2)
        self.reflect = nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect")
        self.dilated = nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False)
        self.head = nn.Linear(width, 4)
        with torch.no_grad():  # non-trivial BN statistics
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.reflect(x)) + self.dilated(x)
        return self.head(x.mean((2, 3)))


def _randomise_w(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KernelMergedConv2d):
                m.w_raw.copy_(torch.rand(m.w_raw.shape, generator=g) * 1.5 - 0.25)
                if m.bias_w_raw is not None:
                    m.bias_w_raw.copy_(torch.rand(m.bias_w_raw.shape, generator=g))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("parametrisation", ["direct", "sigmoid"])
def test_collapse_gives_identical_outputs_tiny_cnn(parametrisation):
    a, b = TinyCNN(seed=0).eval(), TinyCNN(seed=1).eval()
    merged = wrap_kernel_merge(a, b, parametrisation=parametrisation).eval()
    _randomise_w(merged)
    plain = collapse_kernel_merge(merged)
    assert not any(isinstance(m, KernelMergedConv2d) for m in plain.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 4
    torch.testing.assert_close(plain(X), merged(X), atol=1e-5, rtol=1e-5)


def test_collapse_gives_identical_outputs_timm_resnet18():
    timm = pytest.importorskip("timm")
    a = timm.create_model("resnet18", num_classes=5).eval()
    b = timm.create_model("resnet18", num_classes=5).eval()
    merged = wrap_kernel_merge(a, b).eval()
    _randomise_w(merged, seed=3)
    assert len(kernel_weights(merged)) == 20  # stem + 16 block convs + 3 downsample
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(collapse_kernel_merge(merged)(x), merged(x), atol=1e-5, rtol=1e-5)


def test_w_one_gives_model_a_and_w_zero_gives_model_b_convs():
    a, b = TinyCNN(seed=0).eval(), TinyCNN(seed=1).eval()
    with torch.no_grad():
        assert torch.equal(wrap_kernel_merge(a, b, init=1.0).eval()(X), a(X))
        # w = 0: b's kernels (and biases) inside a's non-conv parameters
        b_convs = TinyCNN(seed=0).eval()
        for name in ("stem", "grouped", "reflect", "dilated"):
            getattr(b_convs, name).load_state_dict(getattr(b, name).state_dict())
        assert torch.equal(wrap_kernel_merge(a, b, init=0.0).eval()(X), b_convs(X))
    layer = wrap_kernel_merge(a, b, init=1.0).grouped
    assert torch.equal(layer.merged_weight(), a.grouped.weight)
    assert torch.equal(layer.merged_bias(), a.grouped.bias)


def test_gradient_flows_only_into_merge_weights():
    a, b = TinyCNN(seed=0), TinyCNN(seed=1)
    merged = wrap_kernel_merge(a, b)
    for name, p in merged.named_parameters():
        p.requires_grad_(name.endswith("w_raw"))  # the caller freezes the rest
    trainable = [n for n, p in merged.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("w_raw", "bias_w_raw")) for n in trainable)
    # the source kernels are buffers, never parameters
    assert not any(n.endswith(("weight_a", "weight_b")) for n, _ in merged.named_parameters())
    before = {n: v.clone() for n, v in merged.state_dict().items()}
    opt = torch.optim.SGD([p for p in merged.parameters() if p.requires_grad], lr=0.1)
    merged(X).square().sum().backward()
    for n, p in merged.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    opt.step()
    after = merged.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith("w_raw") or "running" in n or "num_batches" in n for n in changed), changed
    assert all(torch.equal(before[n], after[n]) for n in before if n.endswith(("weight_a", "weight_b", "bias_a")))
    # by default the non-conv parameters stay trainable (left to the caller)
    default = wrap_kernel_merge(a, b)
    assert default.bn.weight.requires_grad and default.head.weight.requires_grad


def test_kernel_weights_shapes_init_and_sigmoid():
    a, b = TinyCNN(seed=0), TinyCNN(seed=1)
    w = kernel_weights(wrap_kernel_merge(a, b, init=0.3))
    assert list(w) == ["stem", "grouped", "reflect", "dilated"]
    assert w["stem"].shape == (8, 3) and w["grouped"].shape == (8, 4)  # (C_out, C_in/groups)
    assert all(torch.allclose(v, torch.full_like(v, 0.3)) for v in w.values())
    s = wrap_kernel_merge(a, b, init=0.3, parametrisation="sigmoid")
    assert torch.allclose(s.stem.w, torch.full((8, 3), 0.3))
    assert not any(v.requires_grad for v in kernel_weights(s).values())
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        wrap_kernel_merge(a, b, init=1.0, parametrisation="sigmoid")
    with pytest.raises(ValueError, match="'softmax'"):
        wrap_kernel_merge(a, b, parametrisation="softmax")


def test_other_params_average():
    a, b = TinyCNN(seed=0), TinyCNN(seed=1)
    a.bn.num_batches_tracked.fill_(3)
    b.bn.num_batches_tracked.fill_(9)
    m = wrap_kernel_merge(a, b, other_params="average")
    torch.testing.assert_close(m.head.weight, (a.head.weight + b.head.weight) / 2)
    torch.testing.assert_close(m.bn.running_var, (a.bn.running_var + b.bn.running_var) / 2)
    assert m.bn.num_batches_tracked.item() == 3
    assert torch.equal(wrap_kernel_merge(a, b).head.weight, a.head.weight)  # default: model a
    with pytest.raises(ValueError, match="'b'.*valid"):
        wrap_kernel_merge(a, b, other_params="b")


def test_mismatched_models_raise_naming_the_module():
    a = TinyCNN(width=8)
    with pytest.raises(ValueError, match="'stem'"):
        wrap_kernel_merge(a, TinyCNN(width=6))
    b = TinyCNN(width=8)
    b.grouped = nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=2)
    with pytest.raises(ValueError, match="'grouped'.*differ"):
        wrap_kernel_merge(a, b)
    c = TinyCNN(width=8)
    c.extra = nn.Identity()
    with pytest.raises(ValueError, match="'extra'"):
        wrap_kernel_merge(a, c)
    d = TinyCNN(width=8)
    d.head = nn.Linear(8, 5)
    with pytest.raises(ValueError, match="'head.weight'"):
        wrap_kernel_merge(a, d)
    e = TinyCNN(width=8)
    e.bn = nn.GroupNorm(2, 8)
    with pytest.raises(ValueError, match="'bn'.*BatchNorm2d.*GroupNorm"):
        wrap_kernel_merge(a, e)


def test_conv_subclass_with_custom_forward_is_rejected():
    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x)

    a, b = TinyCNN(), TinyCNN()
    a.stem = SameConv(3, 8, 3, padding=1, bias=False)
    b.stem = SameConv(3, 8, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="'stem'.*SameConv"):
        wrap_kernel_merge(a, b)
