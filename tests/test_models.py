"""Backbones build at small and paper scale; the pretraining cache is keyed by configuration."""
import pytest
import torch

from cmm_utils.core.models import ARCHS, Classifier, PretrainConfig, build_backbone, count_parameters, pretrained_backbone


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_scale_backbones_run_at_28px(arch):
    b = build_backbone(arch, scale="cpu", image_size=28)
    out = Classifier(b, 7)(torch.zeros(2, 3, 28, 28))
    assert out.shape == (2, 7)
    assert count_parameters(b) < 8e6  # sized for 2 CPU cores


def test_paper_scale_resnet18_is_torchvision_sized():
    b = build_backbone("resnet18", scale="paper", image_size=224)
    assert count_parameters(b) == 11176512 and b.num_features == 512


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*resnet18"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="unknown scale"):
        build_backbone("resnet18", scale="huge")


def test_pretraining_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_CACHE", str(tmp_path))
    cfg = PretrainConfig(sources=("cifar10_partial",), epochs=1, max_per_split=64, batch_size=32)
    a = pretrained_backbone("resnet18", scale="cpu", image_size=28, cfg=cfg, verbose=False)
    files = list((tmp_path / "backbones").glob("*.safetensors"))
    assert len(files) == 1 and files[0].with_suffix(".json").exists()
    b = pretrained_backbone("resnet18", scale="cpu", image_size=28, cfg=cfg, verbose=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    pretrained_backbone("resnet18", scale="cpu", image_size=28, cfg=PretrainConfig(**{**cfg.__dict__, "lr": 1e-3}),
                        verbose=False)
    assert len(list((tmp_path / "backbones").glob("*.safetensors"))) == 2


def test_paper_scale_cnns_carry_the_torchvision_imagenet_tag():
    """Issue 13, item 2: the authors used torchvision's ImageNet weights; timm's default tags
    (``resnet18.a1_in1k``, ``densenet121.ra_in1k``) are other recipes."""
    from cmm_utils.core.models.weights import TIMM_TAGS, timm_spec

    for arch, timm_name in (("resnet18", "resnet18"), ("resnet50", "resnet50"), ("densenet121", "densenet121")):
        assert timm_spec(timm_name).stem == f"{timm_name}.tv_in1k"
        assert timm_spec(timm_name).hub_id == f"timm/{timm_name}.tv_in1k"
        assert build_backbone(arch, scale="paper", image_size=224).pretrained_cfg["tag"] == "tv_in1k"
    assert TIMM_TAGS["densenet121"] == "tv_in1k"
    with pytest.raises(ValueError, match="no pinned ImageNet weights for timm model 'resnet34'.*resnet18"):
        timm_spec("resnet34")


def test_pretrained_paper_backbone_asks_timm_for_the_tv_tag(monkeypatch, tmp_path):
    """The name passed to timm with ``pretrained=True`` (no download: create_model is recorded)."""
    import timm

    from cmm_utils.core.models import weights

    calls = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append((name, kw)) or torch.nn.Identity())
    monkeypatch.setenv("CMM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("CMM_WEIGHTS_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for arch in ("resnet18", "resnet50", "densenet121"):
        build_backbone(arch, scale="paper", image_size=224, pretrained=True)
    assert [c[0] for c in calls] == ["resnet18.tv_in1k", "resnet50.tv_in1k", "densenet121.tv_in1k"]
    assert all(kw["pretrained"] is True and kw["num_classes"] == 0 for _, kw in calls)
    assert weights.download_allowed()
