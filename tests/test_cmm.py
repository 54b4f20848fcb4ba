"""CMM chapter: linearisation, optimizer-state merge, correction, constant memory, runs, paper profile, notebook."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cmm_utils.papers.cmm as cmm_paper
from cmm_utils.core.continual import ContinualResult, scenario_fingerprint, task_local_loss
from cmm_utils.core.data import LabeledImages, Scenario, Task
from cmm_utils.core.models.heads import FrozenHead, HeadedModel
from cmm_utils.core.profiles import check_table
from cmm_utils.core.train import FitConfig
from cmm_utils.papers.cmm import figures as cmm_figures
from cmm_utils.papers.cmm import runs as cmm_runs
from cmm_utils.papers.cmm.baselines import run_seq_baseline
from cmm_utils.papers.cmm.encoders import build_encoder, head_weights_fn
from cmm_utils.papers.cmm.linearize import LinearizedModel
from cmm_utils.papers.cmm.loop import run_cmm
from cmm_utils.papers.cmm.networks import ProjectedEncoder, named_theta, projection_name, zero_shot_weights
from cmm_utils.papers.cmm.profiles import BASELINES, CMM_METHODS, METHODS, PROFILES, SWITCHES, CMMConfig, method_config
from cmm_utils.papers.cmm.runs import load_scenario, run_config
from cmm_utils.papers.cmm.stages import (adam_importance, carried_bytes, correct_representation, feature_distance,
                                         merge_step, train_task)

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """Conv + BatchNorm + ReLU + pooled features: the ResNet ingredients at toy size."""

    def __init__(self, width: int = 4, dim: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, dim)
        self.num_features = dim

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def tiny_encoder(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics, as a pretrained network has
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return ProjectedEncoder(net).to(dtype).eval()


def synthetic_scenario(n_tasks: int, per_class: int = 12, seed: int = 0, size: int = 8) -> Scenario:
    """Two classes per task; class c has a mean colour so that it can be learnt."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        classes = (2 * t, 2 * t + 1)
        splits = {}
        for split in ("train", "val", "test"):
            imgs, labels = [], []
            for c in classes:
                base = torch.full((per_class, 3, size, size), 40.0 + 25 * c)
                imgs.append((base + torch.randint(0, 60, base.shape, generator=g)).clamp(0, 255).to(torch.uint8))
                labels.append(torch.full((per_class,), c, dtype=torch.long))
            splits[split] = LabeledImages(torch.cat(imgs), torch.cat(labels))
        tasks.append(Task(t, classes, splits["train"], splits["val"], splits["test"], name=f"task {t}"))
    names = tuple(f"c{i}" for i in range(2 * n_tasks))
    return Scenario("synthetic", "class-incremental", tasks, names, tuple(range(2 * n_tasks)))


def tiny_config(method: str = "cmm", **kw) -> CMMConfig:
    settings = dict(epochs=1, lr=1e-2, weight_decay=0.1, batch_size=8, warmup_steps=1, clip_grad=1.0,
                    max_train_per_task=None, max_steps=3, alpha=0.4, correction_loss="l1",
                    representation_lr=1e-2, head="fixed", logit_scale=16.0, mismatch_images=16, **kw)
    return method_config(method, settings)


def run_tiny(method: str, scenario: Scenario, seed: int = 0, resume: bool = False, **kw):
    enc0 = tiny_encoder()
    cfg = tiny_config(method, **kw)
    head_fn = head_weights_fn(cfg, enc0, None, scenario)
    identity = {"scenario": scenario_fingerprint(scenario), "test": "tiny", "seed": seed}
    runner = run_seq_baseline if method in BASELINES else run_cmm
    return runner(scenario, enc0, head_fn, cfg, seed, identity, resume=resume, image_size=8)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))


# ----------------------------------------------------------------------------- linearisation
def test_linearized_model_equals_the_network_at_theta0():
    enc = tiny_encoder()
    x = torch.randn(5, 3, 8, 8)
    lin = LinearizedModel(enc)
    assert torch.allclose(lin(x), enc(x), atol=1e-6)
    # θ is exactly the network's parameters, and only θ is trainable
    assert len(list(lin.parameters())) == len(list(enc.parameters()))
    assert set(lin.theta()) == {n for n, _ in enc.named_parameters()}


def test_linearized_output_is_affine_in_theta_minus_theta0():
    enc = tiny_encoder()
    lin = LinearizedModel(enc)
    x = torch.randn(4, 3, 8, 8)
    theta0 = lin.theta0()
    gen = torch.Generator().manual_seed(1)
    delta = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in theta0.items()}

    def at(a):
        lin.load_theta({k: theta0[k] + a * delta[k] for k in theta0})
        return lin(x).detach()

    f0, f1 = at(0.0), at(1.0)
    for a in (-1.5, 0.25, 3.0):  # far from θ0 too: f_lin stays on the line, the network does not
        assert torch.allclose(at(a), f0 + a * (f1 - f0), atol=1e-5)
    nonlinear = lin.function_at({k: theta0[k] + 3.0 * delta[k] for k in theta0})(x)
    assert not torch.allclose(nonlinear, f0 + 3.0 * (f1 - f0), atol=1e-3)


def test_jvp_matches_finite_differences_for_a_small_step():
    enc = tiny_encoder(dtype=torch.float64)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    check = cmm_figures.linearization_check(enc, x, eps=1e-6)
    assert check["at_theta0"] < 1e-12
    assert check["fd_rel"] < 1e-4
    assert check["affine"] < 1e-10


def test_linearized_model_uses_fixed_batchnorm_statistics():
    enc = tiny_encoder()
    lin = LinearizedModel(enc)
    lin.train()  # must not switch the wrapped network to batch statistics
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    before = {k: v.clone() for k, v in lin.named_buffers()}
    out = lin(x)
    assert torch.allclose(out, enc.eval()(x), atol=1e-6)  # eval-mode BN with θ0's statistics
    assert all(torch.equal(before[k], v) for k, v in lin.named_buffers())  # nothing updated


def test_linearized_training_step_changes_theta_not_theta0():
    enc = tiny_encoder()
    lin = LinearizedModel(enc)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    lin(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    opt.step()
    assert any(not torch.equal(lin.theta()[k], lin.theta0()[k]) for k in lin.names)
    assert all(torch.equal(lin.theta0()[k], v) for k, v in enc.state_dict().items() if k in lin.names)


# ----------------------------------------------------------------------------- projection and heads
def test_projection_is_identity_at_init_and_named():
    enc = tiny_encoder()
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(enc(x), enc.backbone(x), atol=1e-6)
    assert projection_name(enc) == "proj.weight"
    assert projection_name(LinearizedModel(enc)) == "proj.weight"
    with pytest.raises(ValueError, match="no final projection"):
        projection_name(TinyNet())


def test_task_local_loss_ignores_other_classes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0]])
    model = lambda x: logits  # noqa: E731
    loss = task_local_loss((1, 2), 4)(model, None, torch.tensor([2]))
    expected = torch.nn.functional.cross_entropy(torch.tensor([[5.0, 1.0]]), torch.tensor([1]))
    assert torch.allclose(loss, expected)


# ----------------------------------------------------------------------------- merging
def test_adam_importance_is_exp_avg_sq():
    lin = LinearizedModel(tiny_encoder())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        lin(torch.randn(4, 3, 8, 8)).sum().backward()
        opt.step()
    imp = adam_importance(opt, list(lin.named_theta()))
    assert set(imp) == set(lin.names)
    for name, p in lin.named_theta():
        assert torch.equal(imp[name], opt.state[p]["exp_avg_sq"])
        assert (imp[name] >= 0).all()


def test_merge_step_is_the_cmm_formula():
    prev, new = {"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([3.0, 0.0, 3.0])}
    Fp, Fn = {"w": torch.tensor([1.0, 0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0, 0.5])}
    a = 0.4
    merged, F = merge_step(prev, Fp, new, Fn, a, "importance")
    expect = ((1 - a) * Fp["w"] * prev["w"] + a * Fn["w"] * new["w"]) / ((1 - a) * Fp["w"] + a * Fn["w"])
    assert torch.allclose(merged["w"], expect)
    assert torch.allclose(F["w"], (1 - a) * Fp["w"] + a * Fn["w"])
    assert torch.equal(merge_step(prev, Fp, new, Fn, 0.0)[0]["w"], prev["w"])
    assert torch.equal(merge_step(prev, Fp, new, Fn, 1.0)[0]["w"], new["w"])
    # equal importances reduce to plain interpolation
    same = merge_step(prev, Fn, new, Fn, a)[0]["w"]
    plain, none = merge_step(prev, None, new, None, a, "interpolate")
    assert torch.allclose(same, plain["w"]) and none is None
    with pytest.raises(ValueError, match="unknown merge rule"):
        merge_step(prev, Fp, new, Fn, a, "mean")


# ----------------------------------------------------------------------------- correction
def test_correction_trains_only_the_projection_and_reduces_mismatch():
    enc0 = tiny_encoder()
    teacher = LinearizedModel(enc0)
    student = LinearizedModel(enc0)
    with torch.no_grad():  # a "merged" model that drifted from the teacher
        for _, p in student.named_theta():
            p.add_(0.2 * torch.randn_like(p))
    scenario = synthetic_scenario(1, per_class=16)
    data = scenario.tasks[0].train
    from cmm_utils.core.train import predict

    before = feature_distance(predict(student, data), predict(teacher, data))["l1"]
    theta_before = student.theta()
    cfg = FitConfig(epochs=3, lr=5e-2, batch_size=8, optimizer="adamw", weight_decay=0.01,
                    schedule="constant", clip_grad=1.0)
    losses = correct_representation(student, teacher, data, cfg, loss="l1")
    after = feature_distance(predict(student, data), predict(teacher, data))["l1"]
    changed = [k for k, v in student.theta().items() if not torch.equal(v, theta_before[k])]
    assert changed == ["proj.weight"]
    assert after < before and len(losses) == 12
    assert all(p.requires_grad for p in student.parameters())  # flags restored


# ----------------------------------------------------------------------------- runs
def test_cmm_run_has_constant_memory_in_the_number_of_tasks():
    b2 = run_tiny("cmm", synthetic_scenario(2)).extra["bytes_per_task"]
    b4 = run_tiny("cmm", synthetic_scenario(4)).extra["bytes_per_task"]
    assert len(set(b2 + b4)) == 1
    enc = tiny_encoder()
    theta = {k: v for k, v in enc.named_parameters()}
    assert b4[0] == carried_bytes("cmm", theta, enc.state_dict(), theta)  # θ, θ0 (+ BN stats) and F
    grow = run_tiny("magmax", synthetic_scenario(4)).extra["bytes_all_checkpoints"]
    assert grow == sorted(grow) and grow[-1] > grow[0]  # the authors' storage grows with T


def test_runs_are_deterministic_and_resume(tmp_path):
    sc = synthetic_scenario(3)
    a = run_tiny("cmm", sc, resume=False)
    b = run_tiny("cmm", sc, resume=False)
    assert np.array_equal(np.asarray(a.R), np.asarray(b.R), equal_nan=True)
    c = run_tiny("cmm", sc, resume=True)  # everything from checkpoints
    assert np.array_equal(np.asarray(a.R), np.asarray(c.R), equal_nan=True)
    assert c.train_seconds == pytest.approx(a.train_seconds, rel=1, abs=10)
    R = np.asarray(a.R)
    assert R.shape == (3, 3) and np.isnan(R[np.triu_indices(3, 1)]).all()
    # the mismatch log has before/after on current and old data for every merge
    assert {(m["task"], m["data"], m["stage"]) for m in a.extra["mismatch"]} == {
        (t, d, s) for t in (1, 2) for d in ("current", "old") for s in ("before", "after")}


def test_ablations_differ_only_where_they_should():
    sc = synthetic_scenario(2)
    full = run_tiny("cmm", sc)
    no_corr = run_tiny("cmm-no-correction", sc)
    no_fisher = run_tiny("cmm-no-fisher", sc)
    assert full.R[0] == no_corr.R[0] or np.array_equal(full.R[0], no_corr.R[0], equal_nan=True)
    assert np.array_equal(full.R[0], no_fisher.R[0], equal_nan=True)  # the same task-1 model
    assert all(m["stage"] in ("before", "after") for m in no_corr.extra["mismatch"])
    before = [m["l1"] for m in no_corr.extra["mismatch"] if m["stage"] == "before"]
    after = [m["l1"] for m in no_corr.extra["mismatch"] if m["stage"] == "after"]
    assert before == after  # no correction, no change
    assert no_fisher.extra["bytes_per_task"][0] < full.extra["bytes_per_task"][0]  # no F kept


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'cmm-fast'.*valid"):
        method_config("cmm-fast", {})
    with pytest.raises(ValueError, match="unknown correction_loss 'huber'"):
        method_config("cmm", {"correction_loss": "huber"})
    with pytest.raises(ValueError, match="alpha=1.5"):
        method_config("cmm", {"alpha": 1.5})
    with pytest.raises(ValueError, match="unknown head"):
        method_config("cmm", {"head": "text"})
    with pytest.raises(ValueError, match="unknown backbone"):
        build_encoder("resnet1000", "cpu")
    with pytest.raises(ValueError, match="not a benchmark"):
        load_scenario("retinamnist", "smoke", 0)


def test_run_config_has_the_leaderboard_keys():
    cfg = run_config("cmm", "ham10000-cil", "cpu", 1, PROFILES["cpu"], "resnet18")
    assert {"method", "benchmark", "seed", "backbone", "profile", "alpha", "representation_lr"} <= set(cfg)
    json.dumps(cfg)
    assert set(CMM_METHODS) == {"cmm", "cmm-no-linear", "cmm-no-fisher", "cmm-no-correction"}


# ----------------------------------------------------------------------------- interface
def test_run_returns_a_cached_result_with_mean_class_recall(tmp_path, monkeypatch):
    """``run`` (the leaderboard's entry) computes once, caches under CMM_RESULTS, then reads the cache."""
    sc = synthetic_scenario(2)
    enc0 = tiny_encoder()
    monkeypatch.setattr(cmm_runs, "pretrained_encoder", lambda backbone, profile: (enc0, None, "tiny-theta0"))
    tiny = dict(max_train_per_task=16, max_steps=2, batch_size=8, mismatch_images=8)
    first = cmm_paper.run("cmm", "synthetic", "smoke", 0, scenario=sc, **tiny)
    assert isinstance(first, ContinualResult) and first.method == "cmm"
    mcr = first.extra["mean_class_recall"]
    assert isinstance(mcr, float) and 0.0 <= mcr <= 1.0
    assert np.asarray(first.R).shape == (2, 2)
    stored = list((tmp_path / "results" / "smoke" / "cmm" / "runs").glob("cmm-*.json"))
    assert len(stored) == 1
    assert json.loads(stored[0].read_text())["config"]["theta0"] == "tiny-theta0"

    def computes(*args, **kw):
        raise AssertionError("computed again instead of reading the cache")

    monkeypatch.setattr(cmm_runs, "run_method", computes)
    second = cmm_paper.run("cmm", "synthetic", "smoke", 0, scenario=sc, **tiny)
    assert isinstance(second, ContinualResult)
    assert np.array_equal(np.asarray(second.R, dtype=float), np.asarray(first.R, dtype=float), equal_nan=True)
    assert isinstance(second.extra["mean_class_recall"], float) and second.extra["mean_class_recall"] == mcr
    with pytest.raises(AssertionError, match="computed again"):  # another setting is another run
        cmm_paper.run("cmm", "synthetic", "smoke", 0, scenario=sc, **{**tiny, "alpha": 0.5})
    with pytest.raises(ValueError):  # overrides are profile settings, checked by core.profiles.select
        cmm_paper.run("cmm", "synthetic", "smoke", 0, scenario=sc, no_such_setting=1)


def test_profiles_follow_the_common_schema():
    assert check_table("cmm", PROFILES) is PROFILES
    assert METHODS == tuple(SWITCHES) and set(BASELINES) | set(CMM_METHODS) == set(METHODS)
    for row in PROFILES.values():
        assert isinstance(row["seeds"], int) and row["seeds"] >= 1
        assert set(row["methods"]) <= set(METHODS)
    assert (cmm_paper.CHAPTER, cmm_paper.METHODS) == ("cmm", METHODS)
    assert {"CHAPTER", "TITLE", "PROFILES", "METHODS", "run"} <= set(cmm_paper.__all__)


# The claims on hand-made frames (paired-bootstrap verdicts, regime checks): tests/test_regime_cmm.py


# ----------------------------------------------------------------------------- paper profile
@pytest.mark.timeout(900)
def test_paper_profile_builds_clip_and_takes_one_linearised_step(data_root):
    """CLIP ViT-B/16 (random weights: no download here), zero-shot heads from its text tower,
    one linearised training step on two real 224 px images, then the correction's parameter."""
    from PIL import Image

    s = PROFILES["paper"]
    assert (s["backbone"], s["lr"], s["weight_decay"], s["batch_size"], s["warmup_steps"], s["epochs"],
            s["alpha"], s["representation_lr"], s["correction_loss"]) == (
        "clip_vit_b16", 1e-5, 0.1, 128, 500, 10, 0.4, 1e-7, "l2")
    visual, clip = build_encoder("clip_vit_b16", "paper", pretrained=False)
    folder = data_root / "ham10000" / "jpg224_sample"
    files = sorted(folder.glob("*.jpg"))[:2]
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((224, 224)))).permute(2, 0, 1)
                          for f in files])
    data = LabeledImages(images, torch.tensor([0, 1]))
    weights = zero_shot_weights(clip[0], clip[1], ["melanoma", "nevus"], "photo")
    assert weights.shape == (2, 512)
    head = FrozenHead.unset(2, 512, 100.0)
    head.set_rows((0, 1), weights)
    net = HeadedModel(LinearizedModel(visual), head)
    cfg = method_config("cmm", {**s, "max_steps": 1, "batch_size": 2}).fit_config()
    res = train_task(net, data, (0, 1), 2, cfg, seed=5)
    assert res.steps == 1 and np.isfinite(res.losses[0])
    imp = adam_importance(res.optimizer, named_theta(net.backbone))
    assert projection_name(net.backbone) == "visual.proj"
    assert imp["visual.proj"].shape == (768, 512)


# ----------------------------------------------------------------------------- notebook
@pytest.mark.timeout(900)
def test_notebook_runs_on_an_unseen_dataset(unseen_npz, tmp_path, monkeypatch):
    import papermill as pm

    # tiny 28 px batches gain nothing from a second thread, and OpenMP threads that spin on a
    # shared machine slow the kernel several-fold
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (REPO / ".cache" / "backbones").mkdir(parents=True, exist_ok=True)
    (cache / "backbones").symlink_to(REPO / ".cache" / "backbones")  # the book's pretrained backbones
    out = tmp_path / "cmm_out.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "cmm.ipynb"), str(out), kernel_name="python3",
                        parameters=dict(profile="smoke", dataset=str(unseen_npz), n_tasks=5),
                        cwd=str(REPO / "notebooks"), progress_bar=False)
    text = out.read_text()
    assert "digits_unseen-cil5: accuracy and mean class recall" in text
    assert "all checks passed" in text
    results = tmp_path / "results" / "smoke" / "cmm"
    assert (results / "verdict.json").exists() and (results / "runs_digits_unseen-cil5.csv").exists()
    verdict = json.loads((results / "verdict.json").read_text())
    assert verdict["chapter"] == "cmm" and verdict["claims"]
