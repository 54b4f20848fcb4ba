"""Permutation specs, weight matching, merge/unmerge matrices and ZipIt! (cmm_utils.papers.medmerge.alignment)."""
from __future__ import annotations

import pytest
import torch
from timm.models.densenet import DenseNet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from cmm_utils import merging as merge
from cmm_utils.papers.medmerge import alignment as al, permutation_specs as ps
from cmm_utils.core.models import Classifier, build_backbone


def tiny_resnet(block=BasicBlock, deep=True):
    m = ResNet(block, (1, 1, 1, 1), num_classes=0, channels=(8, 16, 16, 32),
               stem_type="deep" if deep else "", stem_width=4 if deep else 64)
    return m


def tiny_densenet():
    return DenseNet(growth_rate=4, block_config=(2, 3), num_classes=0, stem_type="")


def randomise_bn(model, seed=0, live=False):
    """Random BN statistics and affine parameters; ``live``: positive BN biases, so that no ReLU
    unit is dead (a dead unit has no correlation with anything and any match of it is a tie)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen) * (0.1 if live else 1.0))
                bias = torch.randn(m.num_features, generator=gen)
                m.bias.copy_(bias.abs() + 1.0 if live else bias)
    return model.eval()


MODELS = {
    "resnet-basic-deep": lambda: Classifier(tiny_resnet(), 3),
    "resnet-bottleneck-plain": lambda: Classifier(tiny_resnet(Bottleneck, deep=False), 3),
    "densenet": lambda: Classifier(tiny_densenet(), 3),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_preserves_the_function(name):
    torch.manual_seed(0)
    model = randomise_bn(MODELS[name]())
    spec = ps.permutation_spec(model)
    x = torch.randn(3, 3, 32, 32)
    perms = ps.random_perms(spec, seed=1)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    other = randomise_bn(MODELS[name](), seed=5)
    other.load_state_dict(ps.apply_permutation(spec, perms, model.state_dict()))
    other.eval()
    assert torch.allclose(other(x), model(x), atol=1e-4)
    # a state dict really changed (the test is not vacuous)
    assert any(not torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_undoes_a_permutation(name):
    torch.manual_seed(0)
    model = randomise_bn(MODELS[name]())
    spec = ps.permutation_spec(model)
    a = model.state_dict()
    b = ps.apply_permutation(spec, ps.random_perms(spec, seed=2), a)
    found = al.weight_matching(spec, a, b, seed=0)
    back = ps.apply_permutation(spec, found, b)
    for k, v in a.items():
        assert torch.equal(back[k], v), k
    # and averaging after alignment gives the model back
    avg = al.permute_average(spec, a, b, found)
    assert all(torch.allclose(avg[k].float(), v.float(), atol=1e-6) for k, v in a.items())


def test_specs_cover_the_book_backbones_and_name_residual_streams():
    for arch in ("resnet18", "densenet121"):
        model = Classifier(build_backbone(arch, scale="cpu"), 5)
        spec = ps.permutation_spec(model)  # raises if a floating entry is not covered
        assert set(spec.features) == set(spec.sizes)
    spec = ps.permutation_spec(Classifier(build_backbone("resnet18", scale="cpu"), 5))
    # resnet18: stem groups, one hidden group per block, one stream per stage
    streams = [g for g in spec.sizes if g.startswith("stream")]
    assert len(streams) == 4
    assert spec.axes["backbone.layer1.0.conv2.weight"][0] == ("stream0",)
    assert spec.axes["backbone.layer2.0.downsample.0.weight"][:2] == (("stream1",), ("stream0",))
    assert spec.axes["head.weight"] == (None, ("stream3",))
    dspec = ps.permutation_spec(Classifier(build_backbone("densenet121", scale="cpu"), 5))
    segs = dspec.axes["backbone.features.denseblock1.denselayer3.norm1.weight"][0]
    assert segs == ("stem", "features.denseblock1.denselayer1", "features.denseblock1.denselayer2")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no permutation spec"):
        ps.permutation_spec(nn.Sequential(nn.Conv2d(3, 4, 3)))
    m1, m2 = Classifier(tiny_resnet(), 3), Classifier(tiny_resnet(), 4)
    spec = ps.permutation_spec(m1)
    with pytest.raises(ValueError, match="head"):
        al.weight_matching(spec, m1.state_dict(), m2.state_dict())
    with pytest.raises(ValueError, match="unknown feature matcher"):
        al.match_features(spec, {}, "kmeans")


def test_identity_and_permutation_mats_reproduce_averaging():
    torch.manual_seed(0)
    a_model, b_model = Classifier(tiny_densenet(), 3), Classifier(tiny_densenet(), 3)
    spec = ps.permutation_spec(a_model)
    a, b = a_model.state_dict(), b_model.state_dict()
    z = al.zip_merge(spec, a, b, al.identity_mats(spec))
    avg = merge.linear_interpolation(a, b, 0.5)
    perms = ps.random_perms(spec, 3)
    zp = al.zip_merge(spec, a, b, al.perm_mats(spec, perms))
    pa = al.permute_average(spec, a, b, perms)
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.allclose(z[k], avg[k], atol=1e-6), k
            assert torch.allclose(zp[k], pa[k], atol=1e-6), k


def _zipit_reference(corr, alpha, beta):
    """A direct transcription of ZipIt!'s greedy loop (columns deleted, not masked): the oracle."""
    O = corr.shape[0]
    n = O // 2
    sims = corr.clone().double()
    sims.fill_diagonal_(-float("inf"))
    members = torch.eye(O, dtype=torch.float64)
    origin = list(torch.arange(O) // n)
    budget = [int((n // 2) * beta + 1e-4)] * 2
    while members.shape[1] > n:
        flat = int(sims.argmax())
        r, c = sorted((flat // sims.shape[1], flat % sims.shape[1]))
        members[:, r] += members[:, c]
        sims[:, r] = torch.minimum(sims[:, r], sims[:, c]) * alpha
        sims[r, :] = torch.minimum(sims[r, :], sims[c, :]) * alpha
        sims[r, r] = -float("inf")
        keep = [i for i in range(sims.shape[0]) if i != c]
        members, sims = members[:, keep], sims[keep][:, keep]
        same, o = origin[r] == origin[c], int(origin[r])
        origin = [origin[i] for i in keep]
        if same:
            budget[o] -= 1
            if budget[o] <= 0:
                sel = torch.tensor([int(g) == o for g in origin])
                sims[sel[:, None] & sel[None, :]] = -float("inf")
    return members.float()


@pytest.mark.parametrize("seed", range(4))
def test_zipit_match_agrees_with_the_reference_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 6 + seed * 3
    x = torch.randn(200, 2 * n, generator=gen)
    x[:, n:] += 0.8 * x[:, :n][:, torch.randperm(n, generator=gen)]  # b's features resemble a permuted a
    corr = al.correlation(torch.cov(x.T))
    M, U = al.zipit_match(corr, alpha=0.3, beta=0.5)
    assert M.shape == (n, 2 * n) and U.shape == (2 * n, n)
    assert torch.equal(U.sum(1), torch.ones(2 * n))  # every feature goes to exactly one merged feature
    assert torch.allclose(M.sum(1), torch.ones(n), atol=1e-4)
    ref = _zipit_reference(corr, 0.3, 0.5)
    assert torch.equal(U, ref)


def test_activation_matching_recovers_a_permuted_copy_and_zipit_runs_on_real_shapes():
    torch.manual_seed(0)
    model = randomise_bn(Classifier(tiny_resnet(), 3), live=True)
    spec = ps.permutation_spec(model)
    perms = ps.random_perms(spec, 4)
    twin = randomise_bn(Classifier(tiny_resnet(), 3), seed=9)
    twin.load_state_dict(ps.apply_permutation(spec, perms, model.state_dict()))
    images = (torch.rand(32, 3, 48, 48) * 255).to(torch.uint8)
    cov = al.feature_covariance(model, twin, spec, images)
    for g, c in cov.items():
        assert c.shape == (2 * spec.sizes[g],) * 2 and torch.allclose(c, c.T, atol=1e-4)
    mats = al.match_features(spec, cov, "permute")
    merged = al.zip_merge(spec, model.state_dict(), twin.state_dict(), mats)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(merged[k], v, atol=1e-5), k
    zmats = al.match_features(spec, cov, "zipit")
    zipped = al.zip_merge(spec, model.state_dict(), twin.state_dict(), zmats)
    out = Classifier(tiny_resnet(), 3)
    out.load_state_dict(zipped)
    assert torch.isfinite(out.eval()(torch.randn(2, 3, 32, 32))).all()
