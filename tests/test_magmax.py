"""MagMax chapter: analyses, head, loss, the fine-tune-once/merge-many run, the interface (``run``,
profiles, claims), the paper profile, the notebook."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pandas as pd

from cmm_utils import merging as mg
from cmm_utils.core.continual import ContinualResult, task_local_loss
from cmm_utils.core.data import LabeledImages, Scenario, Task, class_incremental, load_dataset
from cmm_utils.core.models import build_backbone
from cmm_utils.core.models.clip import CIFAR100_TEMPLATES, IMAGENET_TEMPLATES
from cmm_utils.core.models.heads import FrozenHead, HeadedModel, fixed_head_weight
from cmm_utils.core.profiles import check_table
from cmm_utils.papers import magmax
from cmm_utils.papers.magmax import analysis, chapter, experiment
from cmm_utils.papers.magmax import data as magmax_data
from cmm_utils.papers.magmax import method as mm
from cmm_utils.papers.magmax.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_nan=True)


def _tv(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


# ------------------------------------------------------------------------- analyses and kernels use
def test_selection_share_counts_winners_with_ties_to_the_later_task():
    tvs = [_tv(w=[3.0, -1.0, 2.0, 0.0]), _tv(w=[1.0, -2.0, -2.0, 0.0]), _tv(w=[0.5, 1.0, 1.0, 0.0])]
    # winners: p0 -> task 0, p1 -> task 1, p2 -> tie 0/1 -> task 1, p3 -> tie of all -> task 2
    assert np.allclose(analysis.selection_share(tvs), [0.25, 0.5, 0.25])
    merged = mg.magmax(tvs)["w"]  # the kernel picks the same entries (signed)
    assert torch.equal(merged, torch.tensor([3.0, -2.0, -2.0, 0.0]))


def test_selection_share_ignores_batchnorm_statistics():
    tvs = [{"w": torch.tensor([1.0, 0.0]), "bn.running_var": torch.tensor([9.0, 9.0, 9.0])},
           {"w": torch.tensor([0.0, 1.0]), "bn.running_var": torch.tensor([0.0, 0.0, 0.0])}]
    assert np.allclose(analysis.selection_share(tvs), [0.5, 0.5])


def test_sign_agreement_on_a_toy_case():
    tvs = [_tv(w=[1.0, 1.0, -1.0, 0.0]), _tv(w=[1.0, -1.0, -1.0, 1.0]), _tv(w=[2.0, 3.0, 1.0, 1.0])]
    A, all_agree = analysis.sign_agreement(tvs)
    assert np.allclose(np.diag(A), 1.0) and np.allclose(A, A.T)
    assert A[0, 1] == pytest.approx(2 / 3)  # both non-zero on 3 entries, same sign on 2
    assert A[0, 2] == pytest.approx(2 / 3)
    assert A[1, 2] == pytest.approx(2 / 4)
    # entries non-zero in >= 2 vectors: all four; all agree on p0 and p3
    assert all_agree == pytest.approx(2 / 4)


def test_fixed_head_is_orthonormal_scaled_and_deterministic():
    w = fixed_head_weight(7, 16, scale=16.0, seed=0)
    assert torch.allclose(w @ w.t(), 256.0 * torch.eye(7), atol=1e-3)
    assert torch.equal(w, fixed_head_weight(7, 16, scale=16.0, seed=0))
    head = FrozenHead(w)
    assert not list(head.parameters())  # a buffer: never trained, never merged
    logits = head(torch.randn(4, 16) * 50)
    assert logits.abs().max() <= 16.0 + 1e-4  # scale x cosine


def test_task_local_loss_uses_only_the_current_classes():
    model = torch.nn.Identity()
    loss = task_local_loss((1, 4), num_classes=6)
    logits = torch.randn(3, 6)
    y = torch.tensor([4, 1, 4])
    expect = torch.nn.functional.cross_entropy(logits[:, [1, 4]], torch.tensor([1, 0, 1]))
    assert torch.allclose(loss(model, logits, y), expect)
    logits2 = logits.clone()
    logits2[:, [0, 2, 3, 5]] += 100.0  # other tasks' logits do not matter (task-local softmax)
    assert torch.allclose(loss(model, logits2, y), expect)


def test_lambda_rules_and_grids():
    assert mm.step_lambda("magmax", 0.5, 4) == 0.5
    assert mm.step_lambda("average", None, 4) == 1.0
    assert mm.step_lambda("task-arithmetic", 2.0, 3) == pytest.approx(0.5)  # k / t
    assert mm.lambda_grid("ties", 4, 0.55)[0] == 0.55 and 1.5 in mm.lambda_grid("ties", 4, 0.55)
    assert mm.lambda_grid("magmax", 20, 0.5) == pytest.approx(np.linspace(0, 1, 21)[1:].round(6).tolist())


def test_apply_merged_clamps_negative_variances_only():
    base = {"bn.running_var": torch.tensor([1.0, 1.0]), "w": torch.tensor([0.0, 0.0]),
            "bn.num_batches_tracked": torch.tensor(5)}
    tv = {"bn.running_var": torch.tensor([-3.0, 0.5]), "w": torch.tensor([-3.0, 0.5])}
    out = mm.apply_merged(base, tv, 1.0)
    assert torch.equal(out["bn.running_var"], torch.tensor([0.0, 1.5]))
    assert torch.equal(out["w"], torch.tensor([-3.0, 0.5]))
    assert int(out["bn.num_batches_tracked"]) == 5


def test_bad_inputs_are_rejected_with_the_valid_values():
    with pytest.raises(ValueError, match="unknown method 'maxmag'.*magmax"):
        mm.check_method("maxmag")
    with pytest.raises(ValueError, match="unknown merge 'sum'.*magmax"):
        mm.merge_task_vectors("sum", [_tv(w=[1.0])])
    with pytest.raises(ValueError, match="unknown dataset 'no_such_data'.*ham10000-cil"):
        experiment.load_scenario("no_such_data", "smoke", 0, 3)
    with pytest.raises(ValueError, match="n_tasks=12 must be an integer between 1 and 9"):
        experiment.load_scenario("pathmnist_1k", "smoke", 0, 12)
    with pytest.raises(ValueError, match="unknown profile"):
        experiment.load_scenario("pathmnist_1k", "gpu", 0, 3)


# ------------------------------------------------------------------------- a tiny end-to-end run
@pytest.fixture(scope="module")
def tiny():
    data = load_dataset("pathmnist_1k", seed=0, size=28, channels=3, max_per_split=90)
    scenario = class_incremental(data, 3, seed=1993)
    settings = dict(PROFILES["smoke"], batch_size=16, min_steps=2, max_steps=2, sweep_points=2, sweep_val_max=16)
    return scenario, settings


def _run(scenario, settings, ckpt, seed=0):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", scale="cpu", image_size=28)  # random init: fast, no cache
    head = FrozenHead(fixed_head_weight(scenario.num_classes, backbone.num_features, 16.0))
    return experiment.MagMaxRun(scenario, "smoke", seed, settings, benchmark="tiny", backbone=backbone, head=head,
                        checkpoint_dir=ckpt)


def test_run_fine_tunes_once_shares_task_one_and_is_deterministic(tiny, tmp_path):
    scenario, settings = tiny
    run = _run(scenario, settings, tmp_path / "a")
    res = {m: run.result(m) for m in ["seq-ft", "magmax", "average", "average-ind", "ties-ind", "joint", "pretrained"]}
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files == sorted(["task0.safetensors", "seq-task1.safetensors", "seq-task2.safetensors",
                            "ind-task1.safetensors", "ind-task2.safetensors", "joint.safetensors"])
    for r in res.values():
        R = np.asarray(r.R, dtype=float)
        assert R.shape == (3, 3) and np.isnan(R[np.triu_indices(3, 1)]).all()
        assert all(0.0 <= a <= 1.0 for a in r.acc_seen)
    # task 1 is the same checkpoint in both regimes; averaging one vector is that model
    assert _same(res["average"].R[0], res["average-ind"].R[0]) and _same(res["average"].R[0], res["seq-ft"].R[0])
    # the sequential task vectors are cumulative: tau_2 - tau_1 is what task 2 learnt
    tvs = run.task_vectors("sequential")
    assert not torch.equal(tvs[1]["conv1.0.weight"], tvs[0]["conv1.0.weight"])
    # a second run on fresh checkpoints gives the same numbers; a third on the same ones trains nothing
    again = _run(scenario, settings, tmp_path / "b")
    assert _same(again.result("magmax").R, res["magmax"].R) and _same(again.result("seq-ft").R, res["seq-ft"].R)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.safetensors")}
    reread = _run(scenario, settings, tmp_path / "a")
    assert _same(reread.result("ties-ind").R, res["ties-ind"].R)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.safetensors")}
    # the last row (one pass that also gives mean class recall) is the pinned protocol's row
    row, acc = run.evaluate(run.merged("magmax", "sequential", 2, 0.5), 2)
    assert _same(row, res["magmax"].R[-1]) and acc == res["magmax"].acc_seen[-1]
    assert all(0.0 <= r.extra["mean_class_recall"] <= 1.0 for r in res.values())
    # the merged model costs one network whatever the merge
    assert len({r.gflops for r in res.values()}) == 1
    sweep = run.sweep("magmax", "sequential")
    assert sweep["chosen"].sum() == 1 and 0.5 in set(sweep["lambda"])
    table = chapter.lambda_table(run, res, merges=["magmax"], regimes=["sequential"])
    assert table.loc[0, "test_acc_paper_lambda"] == res["magmax"].acc_seen[-1]
    shares = analysis.regime_analysis({r: run.task_vectors(r) for r in mm.REGIMES})
    assert np.isclose(sum(shares["sequential"]["share"]), 1.0)


def test_cached_run_config_names_method_benchmark_seed_backbone(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    scenario, settings = tiny
    run = _run(scenario, settings, tmp_path / "c")
    experiment.cached_result("seq-ft", "tiny", "smoke", 0, settings, run=run)
    files = list((tmp_path / "results" / "smoke" / "magmax" / "runs").glob("*.json"))
    assert len(files) == 1
    cfg = json.loads(files[0].read_text())["config"]
    for k in ("method", "benchmark", "seed", "backbone", "profile", "lr", "regime", "data"):
        assert k in cfg
    assert cfg["method"] == "seq-ft" and cfg["benchmark"] == "tiny"


# ------------------------------------------------------------------------- paper profile
def test_paper_profile_builds_clip_and_takes_one_step():
    pytest.importorskip("open_clip")
    settings = dict(PROFILES["paper"], max_steps=1, min_steps=0, batch_size=2, warmup_steps=500)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=gen)
    split = LabeledImages(images, torch.tensor([0, 2]))
    task = Task(0, (0, 2), split, split, split)
    scenario = Scenario("cifar100", "class-incremental", [task], ("apple", "aquarium_fish", "baby"), (0, 1, 2))
    encoder, head = mm.build_backbone_and_head(settings, "paper", scenario, templates=CIFAR100_TEMPLATES[:2],
                                               pretrained=None)  # random init: no download
    assert head.weight.shape == (3, 512)
    model = HeadedModel(encoder, head)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    meta = mm.finetune(model, split, task_local_loss(task.classes, 3), settings, seed=5)
    assert meta["steps"] == 1 and np.isfinite(meta["last_loss"])
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(k.startswith("visual.") for k in after)  # only the image tower is fine-tuned and merged
    cfg = mm.fit_config(len(split), settings)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.clip_grad, cfg.optimizer) == (1e-5, 0.1, 500, 1.0, "adamw")


def test_authors_class_orders_and_templates():
    assert magmax_data.CIFAR100_CLASS_ORDER[:10] == (70, 89, 11, 13, 63, 53, 86, 57, 41, 43)
    assert sorted(magmax_data.CIFAR100_CLASS_ORDER) == list(range(100))
    assert magmax_data.IMAGENET_R_CLASS_ORDER[:8] == (186, 157, 67, 59, 117, 1, 122, 14)
    assert sorted(magmax_data.IMAGENET_R_CLASS_ORDER) == list(range(200))
    assert len(CIFAR100_TEMPLATES) == 18 and len(set(CIFAR100_TEMPLATES)) == 18
    assert len(IMAGENET_TEMPLATES) == 80
    assert [magmax_data.IMAGENET_R_DOMAINS[i] for i in magmax_data.IMAGENET_R_DOMAIN_ORDER][:3] == ["tattoo", "sketch", "graphic"]


def test_imagenet_r_loader_persists_its_split_and_builds_domains(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls in ("ant", "zebra"):
        (root / "imagenet-r" / cls).mkdir(parents=True)
        for dom in ("art", "sketch"):
            for i in range(6):
                arr = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / "imagenet-r" / cls / f"{dom}_{i}.png")
    split = tmp_path / "split.json"
    data, domains = magmax_data.load_imagenet_r(root, seed=0, size=32, split_file=split)
    assert data.classes == ("ant", "zebra") and data.train.images.shape[1:] == (3, 32, 32)
    assert len(data.train) + len(data.val) + len(data.test) == 24 and split.exists()
    again, _ = magmax_data.load_imagenet_r(root, seed=1, size=32, split_file=split)  # the persisted list wins
    assert torch.equal(again.test.labels, data.test.labels)
    sc = magmax_data.domain_incremental(data, domains, ["sketch", "art"])
    assert [t.name for t in sc.tasks] == ["sketch", "art"] and sc.tasks[0].classes == (0, 1)


# ------------------------------------------------------------------------- the notebook
@pytest.mark.timeout(900)
def test_notebook_runs_on_an_unseen_dataset(unseen_npz, tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "magmax.ipynb"), str(out), kernel_name="python3",
                        parameters=dict(profile="smoke", benchmarks=[str(unseen_npz)], n_tasks=5),
                        cwd=str(REPO / "notebooks"), progress_bar=False)
    text = out.read_text()
    assert "Final accuracy (%) on all classes" in text and "digits_unseen-cil5" in text
    folder = tmp_path / "results" / "smoke" / "magmax"
    summary = pd.read_csv(folder / "summary.csv")
    assert set(summary["benchmark"]) >= {"digits_unseen-cil5"} and (summary["T"] == 5).any()
    verdict = json.loads((folder / "verdict.json").read_text())
    assert verdict["chapter"] == "magmax" and verdict["claims"] and verdict["counts"]
    assert all("verdict" in c and "criterion" in c for c in verdict["claims"])


# ------------------------------------------------------------------------- the interface
def test_profiles_pass_the_common_schema_and_name_known_methods():
    check_table(magmax.CHAPTER, magmax.PROFILES)
    for row in magmax.PROFILES.values():
        assert all(m in magmax.METHODS for m in row["methods"])
    assert magmax.PROFILES["smoke"]["benchmarks"] == ["pathmnist_1k", "medical-dil"]
    assert chapter.experiments(magmax.PROFILES["smoke"]) == [("pathmnist_1k", 3), ("medical-dil", None)]
    assert chapter.experiments(magmax.PROFILES["paper"])[-1] == ("imagenet-r-dil", None)
    assert len(chapter.experiments(magmax.PROFILES["paper"])) == 9  # 2 datasets x 4 task counts + DIL


def test_seeds_are_the_core_derivation():
    # fine-tuning task t of seed s and the joint model: the values the cached checkpoints were made with
    from cmm_utils.core.seeds import JOINT, task_seed
    assert task_seed(3, 2) == 3002 and task_seed(3, 0, JOINT) == 3999


def test_run_returns_a_cached_result_with_mean_class_recall(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("CMM_CACHE", str(tmp_path / "cache"))
    scenario, settings = tiny
    made = []
    real = experiment.MagMaxRun

    def small_run(scenario_, profile, seed, settings_=None, benchmark=None, **kw):
        made.append(benchmark)
        torch.manual_seed(0)
        backbone = build_backbone("resnet18", scale="cpu", image_size=28)
        head = FrozenHead(fixed_head_weight(scenario_.num_classes, backbone.num_features, 16.0))
        return real(scenario_, profile, seed, settings_, benchmark=benchmark, backbone=backbone, head=head,
                    checkpoint_dir=tmp_path / "ckpt")

    monkeypatch.setattr(experiment, "MagMaxRun", small_run)
    monkeypatch.setattr(experiment, "load_scenario", lambda *a, **k: scenario)
    overrides = {k: settings[k] for k in ("batch_size", "min_steps", "max_steps", "sweep_points", "sweep_val_max")}
    first = magmax.run("seq-ft", "pathmnist_1k-cil3", "smoke", 0, **overrides)
    assert isinstance(first, ContinualResult) and 0.0 <= first.extra["mean_class_recall"] <= 1.0
    assert made == ["pathmnist_1k-cil3"]
    again = magmax.run("seq-ft", "pathmnist_1k-cil3", "smoke", 0, **overrides)
    assert made == ["pathmnist_1k-cil3"]  # read from the chapter's cache: no new run
    assert _same(again.R, first.R) and again.extra["mean_class_recall"] == first.extra["mean_class_recall"]
    with pytest.raises(ValueError, match="unknown setting 'n_seeds'"):
        magmax.run("seq-ft", "pathmnist_1k-cil3", "smoke", 0, n_seeds=2)
    with pytest.raises(ValueError, match="unknown method"):
        magmax.run("maxmag", "pathmnist_1k-cil3", "smoke", 0)


# The claims on hand-made frames (paired-bootstrap verdicts, regime checks): tests/test_regime_magmax.py
