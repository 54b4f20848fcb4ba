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
