"""Training loop, schedules, checkpoints and artifacts."""
import pytest
import torch
from torch import nn

from cmm_utils.core.data import LabeledImages
from cmm_utils.core.io import (atomic_path, cached_state, config_key, load_meta, load_state, save_state, strip_prefix,
                               with_prefix)
from cmm_utils.core.profiles import check_profile, select
from cmm_utils.core.train import DivergedError, FitConfig, fit, lr_factor, make_optimizer, predict, seed_everything


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (n, 3, 8, 8), generator=g)).to(torch.uint8)
    return LabeledImages(images, labels)


def toy_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 3))


def test_warmup_cosine_is_mlfoundations_cosine_lr():
    assert lr_factor(0, 1000, "warmup_cosine", warmup=500) == pytest.approx(1 / 500)
    assert lr_factor(499, 1000, "warmup_cosine", warmup=500) == pytest.approx(1.0)
    assert lr_factor(750, 1000, "warmup_cosine", warmup=500) == pytest.approx(0.5)
    # a task shorter than the warm-up ends still warming up (the authors' quirk for large T)
    assert lr_factor(399, 400, "warmup_cosine", warmup=500) == pytest.approx(0.8)
    assert lr_factor(130, 200, "multistep", milestones=(70, 130, 170)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 1, "linear")
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer([nn.Parameter(torch.zeros(1))], "lion", 0.1)


def test_fit_learns_and_is_deterministic():
    data = toy_data()
    outs = []
    for _ in range(2):
        seed_everything(0)
        model = toy_model()
        res = fit(model, data, FitConfig(epochs=5, lr=0.05, batch_size=16, optimizer="sgd", augment=True), seed=1)
        outs.append(predict(model, data))
    assert torch.equal(outs[0], outs[1])
    assert res.losses[-1] < res.losses[0]
    assert float((outs[0].argmax(1) == data.labels).float().mean()) > 0.9


def test_max_steps_caps_training():
    res = fit(toy_model(), toy_data(), FitConfig(epochs=10, batch_size=8, max_steps=3))
    assert res.steps == 3


def test_adam_state_is_returned_for_importance():
    res = fit(toy_model(), toy_data(), FitConfig(epochs=1, batch_size=16, optimizer="adamw"))
    assert all("exp_avg_sq" in s for s in res.optimizer.state.values())


def test_save_load_state_roundtrip_with_meta(tmp_path):
    sd = toy_model().state_dict()
    save_state(tmp_path / "m.safetensors", sd, {"task": 3})
    back = load_state(tmp_path / "m.safetensors")
    assert all(torch.equal(sd[k], back[k]) for k in sd) and load_meta(tmp_path / "m.safetensors") == {"task": 3}


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    dest = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_cached_state_resumes_without_recomputing(tmp_path):
    calls = []
    compute = lambda: (calls.append(1), ({"w": torch.ones(2)}, {"score": 0.5}))[1]
    a, meta_a, cached_a = cached_state(tmp_path / "c.safetensors", compute)
    b, meta_b, cached_b = cached_state(tmp_path / "c.safetensors", compute)
    assert len(calls) == 1 and torch.equal(a["w"], b["w"])
    assert (cached_a, cached_b) == (False, True) and meta_a == meta_b == {"score": 0.5}


def test_cached_state_is_computed_once_by_concurrent_callers(tmp_path):
    import threading
    import time

    calls = []

    def slow_training():
        calls.append(1)
        time.sleep(0.3)
        return {"w": torch.full((2,), float(len(calls)))}, {}

    results = []
    workers = [threading.Thread(target=lambda: results.append(cached_state(tmp_path / "s.safetensors", slow_training)))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1
    assert sorted(flag for _, _, flag in results) == [False, True, True]
    assert all(torch.equal(state["w"], torch.ones(2)) for state, _, _ in results)


def test_config_key_changes_with_any_parameter():
    assert config_key({"a": 1, "b": 2}) == config_key({"b": 2, "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_profiles():
    table = {"smoke": {"epochs": 1}, "cpu": {"epochs": 5}, "paper": {"epochs": 10}}
    assert select(table, "cpu") == {"epochs": 5}
    assert select(table, "cpu", epochs=None) == {"epochs": 5}
    assert select(table, "smoke", epochs=3) == {"epochs": 3}
    with pytest.raises(ValueError, match="unknown profile 'fast'.*smoke, cpu, paper"):
        check_profile("fast")
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        select(table, "cpu", epoch=3)


def test_several_states_pack_into_one_file_and_unpack(tmp_path):
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(3), "b": torch.ones(1)}
    save_state(tmp_path / "s.safetensors", {**with_prefix("a.", a), **with_prefix("ab.", b), **with_prefix("c.", None)})
    back = load_state(tmp_path / "s.safetensors")
    assert set(back) == {"a.w", "ab.w", "ab.b"}
    assert strip_prefix(back, "a.").keys() == {"w"} and torch.equal(strip_prefix(back, "a.")["w"], a["w"])
    assert torch.equal(strip_prefix(back, "ab.")["w"], b["w"]) and strip_prefix(back, "c.") == {}


def test_relative_root_variables_are_anchored_where_cmm_utils_is_first_imported(tmp_path, monkeypatch):
    import os

    import cmm_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CMM_DATA", "../data")
    monkeypatch.setenv("CMM_CACHE", "cache")
    monkeypatch.setenv("CMM_RESULTS", "/already/absolute")
    cmm_utils.anchor_root_variables()
    assert os.environ["CMM_DATA"] == str((tmp_path / ".." / "data").resolve())
    assert os.environ["CMM_CACHE"] == str(tmp_path / "cache")
    assert os.environ["CMM_RESULTS"] == "/already/absolute"


def nan_at(step: int, *, poison_weights: bool = False):
    """A cross-entropy loss that returns NaN at call ``step`` (0-based), or, with
    ``poison_weights``, stays finite but writes NaN into the weights at that call."""
    calls = []

    def loss(model, x, y):
        calls.append(1)
        value = torch.nn.functional.cross_entropy(model(x), y)
        if len(calls) - 1 == step:
            if poison_weights:
                with torch.no_grad():
                    model[1].weight[0, 0] = float("nan")
            else:
                value = value * float("nan")
        return value
    return loss


def test_nan_loss_stops_fit_naming_desc_step_and_lr():
    cfg = FitConfig(epochs=3, lr=0.05, batch_size=16, optimizer="sgd", schedule="constant")
    with pytest.raises(DivergedError, match=r"^magmax task 2: loss is nan at step 3 of 12 \(0-based; lr 0.05\); "
                                            r"the run diverged and nothing of it is cached") as err:
        fit(toy_model(), toy_data(), cfg, loss_fn=nan_at(3), desc="magmax task 2")
    assert isinstance(err.value, RuntimeError)


def test_lr_in_the_message_is_the_scheduled_one():
    cfg = FitConfig(epochs=1, lr=0.1, batch_size=16, schedule="warmup_cosine", warmup_steps=10)
    with pytest.raises(DivergedError, match=r"step 1 of 4 \(0-based; lr 0.02\)"):
        fit(toy_model(), toy_data(), cfg, loss_fn=nan_at(1), desc="cmm task 0")


def test_non_finite_weights_stop_fit_at_the_end():
    """The last update poisons the weights with a finite loss: the end-of-epoch check catches it."""
    cfg = FitConfig(epochs=1, lr=0.05, batch_size=16, max_steps=2)
    with pytest.raises(DivergedError, match=r"dynammo task 1: 1 of 2 parameter tensors hold NaN/inf after step 2 of 2"):
        fit(toy_model(), toy_data(), cfg, loss_fn=nan_at(1, poison_weights=True), desc="dynammo task 1")


def test_diverged_compute_leaves_no_cached_state(tmp_path):
    path = tmp_path / "task.safetensors"

    def train():
        model = toy_model()
        fit(model, toy_data(), FitConfig(epochs=1, batch_size=16), loss_fn=nan_at(0), desc="medmerge source")
        return model.state_dict(), {}

    with pytest.raises(DivergedError, match="medmerge source"):
        cached_state(path, train)
    assert not path.exists() and not path.with_suffix(".json").exists()


def test_dynammo_feature_loop_stops_on_a_nan_loss_like_fit():
    """DynaMMo's head fine-tuning on stored features is the book's second training loop: it has the
    same divergence guard as ``fit``."""
    from cmm_utils.core.train import DivergedError, FitConfig
    from cmm_utils.papers.dynammo.common import fit_on_features

    head = torch.nn.Linear(4, 3)
    feats, labels = torch.randn(1, 1, 32, 4), torch.randint(0, 3, (32,))
    calls = []

    def loss_fn(f, y):
        calls.append(1)
        out = torch.nn.functional.cross_entropy(head(f[0]), y)
        return out * float("nan") if len(calls) == 3 else out

    cfg = FitConfig(epochs=2, lr=0.05, batch_size=8, optimizer="sgd", schedule="constant")
    with pytest.raises(DivergedError, match=r"heads: loss is nan at step 2 of 8 .*lr 0.05"):
        fit_on_features(loss_fn, list(head.parameters()), feats, labels, cfg, seed=0, desc="heads")
