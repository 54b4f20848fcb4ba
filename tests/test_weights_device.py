"""Issue 13: published weights from a local directory (CMM_WEIGHTS), CLIP's activation, and the one
device / precision setting (CMM_DEVICE, CMM_PRECISION)."""
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cmm_utils.core import device as dv
from cmm_utils.core.models import build_backbone
from cmm_utils.core.models.weights import WeightsNotFound
from cmm_utils.core.train import FitConfig, fit, predict
from cmm_utils.core.data import LabeledImages


# ----------------------------------------------------------------------------- local weights
def test_timm_weights_load_from_the_weights_directory(tmp_path, monkeypatch):
    import timm

    source = timm.create_model("resnet18", num_classes=0)  # random weights: the "published" file
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    (tmp_path / "timm").mkdir()
    save_file(state, str(tmp_path / "timm" / "resnet18.tv_in1k.safetensors"))
    monkeypatch.setenv("CMM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("CMM_WEIGHTS_DOWNLOAD", "0")  # a network would not be used anyway
    loaded = build_backbone("resnet18", scale="paper", image_size=224, pretrained=True).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_timm_file_names_the_path_the_variable_and_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsNotFound) as err:
        build_backbone("densenet121", scale="paper", image_size=224, pretrained=True)
    msg = str(err.value)
    assert str(tmp_path / "timm" / "densenet121.tv_in1k.safetensors") in msg
    assert "CMM_WEIGHTS" in msg and "huggingface.co/timm/densenet121.tv_in1k" in msg


def test_failed_hub_download_is_the_same_clear_error(tmp_path, monkeypatch):
    import timm

    def offline(*a, **kw):
        raise OSError("no route to host")

    monkeypatch.setenv("CMM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("CMM_WEIGHTS_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsNotFound, match="resnet50.tv_in1k.safetensors.*CMM_WEIGHTS.*no route to host"):
        build_backbone("resnet50", scale="paper", image_size=224, pretrained=True)


# ----------------------------------------------------------------------------- CLIP
def _activations(model):
    import open_clip

    return {type(m) for m in model.modules() if isinstance(m, (nn.GELU, open_clip.transformer.QuickGELU))}


def test_clip_for_openai_weights_uses_quickgelu():
    """Issue 13, item 1: open_clip's "ViT-B-16" config is nn.GELU; OpenAI's weights need QuickGELU.
    Built the way MagMax and CMM build it (random weights here: same architecture)."""
    import open_clip

    from cmm_utils.core.models.clip import clip_arch, clip_model

    assert clip_arch("ViT-B-16", "openai") == "ViT-B-16-quickgelu"
    model, _ = clip_model("ViT-B-16", pretrained=None)
    assert _activations(model) == {open_clip.transformer.QuickGELU}
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-17'"):
        clip_model("ViT-B-17", pretrained=None)


def test_clip_loads_openai_weights_from_the_weights_directory(tmp_path, monkeypatch):
    from cmm_utils.core.models.clip import clip_model

    source, _ = clip_model("ViT-B-16", pretrained=None)
    state = {k: v.detach().half().contiguous() for k, v in source.state_dict().items()}  # half: half the disk
    del source
    (tmp_path / "open_clip").mkdir()
    save_file(state, str(tmp_path / "open_clip" / "ViT-B-16-quickgelu-openai.safetensors"))
    monkeypatch.setenv("CMM_WEIGHTS", str(tmp_path))
    model, _ = clip_model("ViT-B-16", pretrained="openai")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k].float()) for k in state)
    (tmp_path / "open_clip" / "ViT-B-16-quickgelu-openai.safetensors").unlink()
    with pytest.raises(WeightsNotFound) as err:
        clip_model("ViT-B-16", pretrained="openai")
    msg = str(err.value)
    assert str(tmp_path / "open_clip" / "ViT-B-16-quickgelu-openai.safetensors") in msg and "CMM_WEIGHTS" in msg
    assert "timm/vit_base_patch16_clip_224.openai" in msg


# ----------------------------------------------------------------------------- device, precision
def test_cmm_device_is_read_and_validated(monkeypatch):
    monkeypatch.setenv("CMM_DEVICE", "cpu")
    assert dv.device() == torch.device("cpu")
    model = dv.to_device(nn.Linear(2, 2))
    assert dv.check_on_device(torch.device("cpu"), {"m": model}) == 2
    monkeypatch.setenv("CMM_DEVICE", "gpu")
    with pytest.raises(ValueError, match="CMM_DEVICE='gpu'.*valid: cpu, cuda"):
        dv.device()
    monkeypatch.delenv("CMM_DEVICE")
    assert dv.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("CMM_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="CMM_DEVICE='cuda' but torch sees no CUDA device"):
            dv.device()


def test_misplaced_tensors_are_named():
    model = nn.BatchNorm1d(3)
    bad = dv.misplaced(torch.device("meta"), {"bn": model})
    assert "bn.weight (param): cpu" in bad and "bn.running_mean (buffer): cpu" in bad
    with pytest.raises(RuntimeError, match="not on meta: bn.weight"):
        dv.check_on_device(torch.device("meta"), {"bn": model})


def _toy_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    data = LabeledImages(torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8), torch.arange(20) % 3)
    fit(model, data, FitConfig(epochs=2, batch_size=8, clip_grad=1.0), seed=0, desc="toy")
    return model, predict(model, data)


def test_precision_is_validated_and_cpu_stays_fp32(monkeypatch):
    monkeypatch.setenv("CMM_PRECISION", "fp8")
    with pytest.raises(ValueError, match="CMM_PRECISION='fp8'.*valid: fp32, amp-bf16, amp-fp16"):
        dv.precision()
    monkeypatch.delenv("CMM_PRECISION")
    ref_model, ref_out = _toy_fit()
    monkeypatch.setenv("CMM_PRECISION", "amp-fp16")
    dv._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, out = _toy_fit()
    assert any("applies on CUDA only; running fp32 on cpu" in str(w.message) for w in caught)
    assert torch.equal(out, ref_out)  # CPU numerics never change with CMM_PRECISION
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["amp-bf16", "amp-fp16"])
def test_amp_on_cuda_trains(monkeypatch, mode):
    monkeypatch.setenv("CMM_PRECISION", mode)
    model = nn.Linear(8, 2).cuda()
    data = LabeledImages(torch.randint(0, 256, (16, 8, 1, 1), dtype=torch.uint8), torch.arange(16) % 2)
    wrapped = nn.Sequential(nn.Flatten(), model)
    result = fit(wrapped, data, FitConfig(epochs=1, batch_size=8, augment=False), desc=mode)
    assert result.steps == 2 and dv.MixedPrecision(torch.device("cuda")).mode == mode
