"""The paper profiles as a GPU-box user runs them (issue 13): MedMerge's networks on the book's
device, CMM's CIFAR-100 class order and its skippable benchmarks, DynaMMo's balanced set, DER's
auxiliary loss and baseline learning rates as the authors', MedMerge's paper row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cmm_utils.core import train as core_train
from cmm_utils.core.continual import ContinualResult
from cmm_utils.core.data import DatasetSplits, LabeledImages


# ------------------------------------------------------------------ item 3: MedMerge on the device
def test_medmerge_trains_merges_and_scores_every_network_on_the_books_device(tmp_path, unseen_npz, monkeypatch):
    """A smoke-sized MedMerge run (sources, FT, LP, LP-FT, the kernel-merge probe, merges of FT
    models, BN recomputation, a loss plane) with ``core.train.device`` returning a sentinel device
    object: every network handed to fit / predict / BN recomputation / feature matching must have
    been moved with ``.to(sentinel)`` (so the code asks ``device()``), and sit on ``device()``."""
    from cmm_utils.papers.medmerge import alignment, landscape, method as mm, profiles as prof, sources, training

    sentinel = torch.device("cpu")  # this very object: a move to it can only come from device()
    moved: set[int] = set()
    module_to = nn.Module.to

    def spy_to(self, *args, **kwargs):
        if (args[0] if args else kwargs.get("device")) is sentinel:
            moved.update(id(m) for m in self.modules())
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy_to)
    monkeypatch.setattr(core_train, "device", lambda: sentinel)
    seen = []

    def recorded(fn, where, *models):
        def wrapper(*args, **kwargs):
            for i in models:
                m = args[i]
                if isinstance(m, nn.Module):
                    seen.append((where, id(m) in moved, next(m.parameters()).device))
            return fn(*args, **kwargs)
        return wrapper

    for mod in (training, sources):
        monkeypatch.setattr(mod, "fit", recorded(mod.fit, f"{mod.__name__}.fit", 0))
    for mod in (training, landscape):
        monkeypatch.setattr(mod, "predict", recorded(mod.predict, f"{mod.__name__}.predict", 0))
        monkeypatch.setattr(mod, "recompute_bn", recorded(mod.recompute_bn, f"{mod.__name__}.recompute_bn", 0))
    monkeypatch.setattr(alignment, "feature_covariance", recorded(alignment.feature_covariance, "covariance", 0, 1))

    monkeypatch.setenv("CMM_CACHE", str(tmp_path / "cache"))
    cfg = prof.configure("smoke", 0, target="retinamnist", source_natural=str(unseen_npz), source_medical="pathmnist_1k",
                         max_per_split=32, source_max_per_split=48, match_images=16, wm_iters=2)
    cfg["max_steps"] = 1
    out = mm.run_experiment("resnet18", "pathmnist_1k", "retinamnist", 0, cfg, keep_states=True, verbose=False)
    cfg["plane_grid"], cfg["plane_images"] = 2, 16
    mm.compute_plane("resnet18", "retinamnist", 0, cfg, out["states"], "medmerge")

    wheres = {w for w, _, _ in seen}
    assert {"cmm_utils.papers.medmerge.sources.fit", "cmm_utils.papers.medmerge.training.fit",
            "cmm_utils.papers.medmerge.training.predict", "cmm_utils.papers.medmerge.landscape.recompute_bn",
            "covariance"} <= wheres, wheres
    not_moved = sorted({w for w, ok, _ in seen if not ok})
    assert not not_moved, f"networks used without .to(device()): {not_moved}"
    assert {d for _, _, d in seen} == {torch.device("cpu")}


def test_medmerge_paper_profile_has_resnet18_on_isic_first_a_step_aware_w_rate_and_both_medical_inits():
    from cmm_utils.papers.medmerge import profiles as prof, sources, training

    cfg = prof.configure("paper")
    assert cfg["runs"][0] == ("resnet18", "ham10000_full", "isic2019")  # the loss planes' run (paper Fig. 2)
    assert {a for a, _, _ in cfg["runs"]} == {"resnet18", "densenet121", "resnet50"}
    # the tuned rate for the cpu probe's 48 steps; ~6,000 steps get 48/6,000 of it
    assert training.w_learning_rate(prof.configure("cpu"), 500) == prof.configure("cpu")["w_lr"]
    steps = int(np.ceil(20000 / cfg["batch_size"])) * cfg["lp_epochs"]
    assert training.w_learning_rate(cfg, 20000) == pytest.approx(cfg["w_lr"] * 48 / steps)
    assert training.w_learning_rate(dict(cfg, max_steps=10), 20000) == cfg["w_lr"]
    assert cfg["medical_init"] == "random" and not sources.starts_from_natural(cfg, cfg["source_init_seed"])
    nat = prof.configure("paper", medical_init="natural")
    assert sources.starts_from_natural(nat, nat["source_init_seed"]) and not sources.starts_from_natural(nat, 0)
    assert sources.source_key("resnet18", "x", nat, 1) != sources.source_key("resnet18", "x", cfg, 1)
    with pytest.raises(ValueError, match="medical_init.*valid: random, natural"):
        sources.starts_from_natural(dict(cfg, medical_init="imagenet"), 1)


def test_medmerge_medical_source_can_start_from_the_natural_one(tmp_path, unseen_npz, monkeypatch):
    from cmm_utils.papers.medmerge import profiles as prof, sources

    monkeypatch.setenv("CMM_CACHE", str(tmp_path / "cache"))
    cfg = dict(prof.configure("smoke", 0, source_natural=str(unseen_npz), source_max_per_split=24), max_steps=1,
               medical_init="natural", source_lr=0.0)  # lr 0: the trained source is its start
    natural = sources.source_backbone(cfg["natural_source"], "resnet18", cfg, 0, verbose=False)
    medical = sources.source_backbone("pathmnist_1k", "resnet18", cfg, cfg["source_init_seed"], verbose=False)
    k = "layer1.0.conv1.weight"
    assert torch.equal(natural.state_dict()[k], medical.state_dict()[k])
    random_start = sources.source_backbone("pathmnist_1k", "resnet18", dict(cfg, medical_init="random"),
                                           cfg["source_init_seed"], verbose=False)
    assert not torch.equal(natural.state_dict()[k], random_start.state_dict()[k])


# -------------------------------------------------------------- item 5: CMM's CIFAR-100 class order
def _fake_dataset(n_classes: int, per_class: int = 2) -> DatasetSplits:
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    split = LabeledImages(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels)
    return DatasetSplits("cifar100", tuple(f"c{i}" for i in range(n_classes)), split, split, split)


def test_cmm_paper_scenario_cuts_cifar100_in_the_authors_class_order(monkeypatch):
    from cmm_utils.papers.cmm import profiles as cprof, runs
    from cmm_utils.papers.magmax.data import CIFAR100_CLASS_ORDER as MAGMAX_ORDER  # the test may read both papers

    monkeypatch.setattr(runs, "load_dataset", lambda *a, **k: _fake_dataset(100))
    row = cprof.PROFILES["paper"]
    sc = runs.load_scenario(row["dataset"], "paper", 0, row["n_tasks"], row["max_per_split"], row["image_size"])
    assert sc.class_order[:10] == (70, 89, 11, 13, 63, 53, 86, 57, 41, 43)  # VietHoang1512/CMM cifar100.py
    assert sc.class_order == MAGMAX_ORDER  # CMM forks MagMax and keeps its order
    assert sc.tasks[0].classes == tuple(sorted(sc.class_order[:10]))
    other = runs.load_scenario("pathmnist_1k", "paper", 0, 3, None, None)  # no authors' order: the seed's
    assert other.class_order != tuple(range(other.num_classes)) or other.num_classes < 3


# ------------------------------------------------------------------ item 6: CMM benchmarks skippable
def test_cmm_skips_a_benchmark_whose_data_is_missing_and_runs_the_others(tmp_path, data_root, monkeypatch):
    from cmm_utils.papers.cmm import chapter

    root = tmp_path / "data"  # HAM10000 only: medical-dil also needs RetinaMNIST and PathMNIST
    root.mkdir()
    (root / "ham10000").symlink_to(data_root / "ham10000")
    monkeypatch.setenv("CMM_DATA", str(root))
    calls = []

    def fake_run(method, bench, profile, seed, scenario=None, **kw):
        calls.append((method, bench, seed))
        return ContinualResult(method, [[0.5]], [0.5], extra={"mean_class_recall": 0.4})

    monkeypatch.setattr(chapter, "run", fake_run)
    monkeypatch.setattr(chapter, "pretrained_encoder", lambda backbone, profile: (None, None, "fp"))
    ch = chapter.Chapter("smoke", {"dataset": "ham10000-cil", "benchmarks": ["medical-dil", "ham10000-cil"],
                                   "methods": ["cmm", "seq-ft"]}, {}, [0], "ham10000-cil", tmp_path / "out",
                         {0: object()})
    got = chapter.run_benchmark(ch, "medical-dil")
    assert isinstance(got, str) and got.startswith("skipped: medical-dil:") and "retinamnist" in got
    assert str(root) in got  # names where it looked
    frame = chapter.benchmark_runs(ch)
    assert set(frame["benchmark"]) == {"ham10000-cil"} and len(frame) == 2
    assert {b for _, b, _ in calls} == {"ham10000-cil"}
    assert list(ch.skipped) == ["medical-dil"] and ch.skipped["medical-dil"].startswith("skipped: ")


def test_cmm_skips_a_benchmark_whose_weights_are_missing(tmp_path, monkeypatch):
    from cmm_utils.papers.cmm import chapter

    def no_weights(backbone, profile):
        raise FileNotFoundError(f"weights for {backbone} not found: expected /w/resnet18.tv_in1k.safetensors")

    monkeypatch.setattr(chapter, "pretrained_encoder", no_weights)
    monkeypatch.setattr(chapter, "run", lambda *a, **k: pytest.fail("a skipped benchmark must not run"))
    ch = chapter.Chapter("paper", {"dataset": "cifar100", "benchmarks": ["ham10000-cil"], "methods": ["cmm"]}, {},
                         [0], "cifar100-cil10", tmp_path, {0: object()})
    monkeypatch.setattr(chapter, "load_benchmark", lambda *a, **k: object())
    got = chapter.run_benchmark(ch, "ham10000-cil")
    assert got == "skipped: ham10000-cil: weights for resnet18 not found: expected /w/resnet18.tv_in1k.safetensors"


# ------------------------------------------------------------------- item 10: DynaMMo vs the authors
def _images(labels):
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(0)
    return LabeledImages((torch.rand(len(labels), 3, 4, 4, generator=gen) * 255).to(torch.uint8), labels)


def test_dynammo_balanced_set_takes_the_quota_before_the_memory_update_as_the_authors():
    """SKIN8's budget 40, two classes per task: after task 1 the memory holds 20 per class; the
    authors' balanced set at task 2 is those 40 plus 20 herded images of each new class (80), not
    the memory after its update (10 per class, 40)."""
    from cmm_utils.papers.dynammo.common import Memory, herding

    feature = lambda x: x.float().flatten(1)
    mem = Memory(40)
    mem.update(feature, _images([0] * 30 + [1] * 30), [0, 1])
    new = _images([2] * 30 + [3] * 30)
    bal = mem.balanced(feature, new, [2, 3])
    assert len(bal) == 80 and torch.bincount(bal.labels).tolist() == [20, 20, 20, 20]
    part = new.subset(np.flatnonzero(new.labels.numpy() == 2))
    assert torch.equal(bal.images[bal.labels == 2], part.images[herding(core_train.predict(feature, part), 20)])
    before = mem.data()
    mem.update(feature, new, [2, 3])
    assert len(mem.data()) == 40  # what the balanced set used to be
    assert torch.equal(bal.images[:40], before.images)  # the old classes at the old quota


def test_dynammo_stage2_reads_the_balanced_set_and_der_adds_its_aux_loss_from_the_second_task(monkeypatch):
    from cmm_utils.core.data import class_incremental
    from cmm_utils.papers.dynammo import baselines, method as dm, profiles as dprof

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(12)
    split = LabeledImages((torch.rand(len(labels), 3, 28, 28, generator=gen) * 255).to(torch.uint8), labels)
    sc = class_incremental(DatasetSplits("toy", ("a", "b", "c", "d"), split, split, split), 2, class_order=[0, 1, 2, 3])
    from cmm_utils.core.models import build_backbone
    torch.manual_seed(0)
    bb = build_backbone("resnet18", scale="cpu", image_size=28)
    settings = dict(dprof.PROFILES["smoke"], train_steps=1, head_steps=1)
    stage1 = dm.adapter_stage1(sc, bb, settings, 0, budget=8)
    assert len(stage1.memories[1]) == 8 and len(stage1.balanced[1]) == 16  # 4 old (2 x 4) + 4 per new class

    aux_calls = []
    real_ce = baselines.F.cross_entropy

    def spy_ce(logits, y, *a, **k):
        aux_calls.append(logits.shape[1])
        return real_ce(logits, y, *a, **k)

    monkeypatch.setattr(baselines.F, "cross_entropy", spy_ce)
    fits = []
    real_fit = baselines.fit
    monkeypatch.setattr(baselines, "fit", lambda *a, **k: (fits.append(len(aux_calls)), real_fit(*a, **k))[1])
    baselines.single_model_runs("der", sc, bb, settings, 0, budget=8)
    # task 1: one CE per step (the classifier over 4 classes); task 2: classifier + aux (2 new + "old")
    assert 3 in aux_calls[fits[1]:]
    assert 3 not in aux_calls[:fits[1]]


def test_dynammo_paper_baseline_learning_rates_are_the_authors(monkeypatch):
    from cmm_utils.papers.dynammo import baselines, profiles as dprof

    paper, cpu = dprof.PROFILES["paper"], dprof.PROFILES["cpu"]
    assert baselines.baseline_lr(paper, "finetune", "skin8") == 1e-3
    assert baselines.baseline_lr(paper, "joint", "path16") == 1e-4
    assert baselines.baseline_lr(paper, "joint", "skin8") == 1e-3
    assert baselines.baseline_lr(paper, "joint", "cifar100") == 1e-3
    assert baselines.baseline_lr(cpu, "joint", "path16") == cpu["baseline_lr"] == 0.01
    assert dprof.VERSION >= 4 and "joint_lr" in dprof.RUN_KEYS


def test_magmax_headline_target_is_called_unverified():
    from cmm_utils.papers.magmax import claims

    claim = claims.CLAIMS["headline"]
    assert "unverified" in claim.text and "unverified" in claim.source and "leaderboard listing" not in claim.source
