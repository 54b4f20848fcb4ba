"""DynaMMo (MIUA 2024): adapters, merge-once, single-pass inference, min-others, herding, memory,
the two stages, DER, checkpoints, determinism, the paper profile (one step at 224 px), the chapter's
interface (``run`` and its cache, the profile table), the claims, the notebook."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cmm_utils.papers.dynammo as D
from cmm_utils import merging
from cmm_utils.core.continual import ContinualResult
from cmm_utils.core.data import LabeledImages, Scenario, Task
from cmm_utils.core.models import build_backbone
from cmm_utils.core.profiles import check_table
from cmm_utils.papers.dynammo import claims as C
from cmm_utils.papers.dynammo import runs
from cmm_utils.papers.dynammo.adapters import Adapter, AdapterNet, min_others_scores
from cmm_utils.papers.dynammo.common import Memory, epoch_config, herding, label_lookup
from cmm_utils.papers.dynammo.method import adapter_spread, adapter_stage1
from cmm_utils.papers.dynammo.profiles import check_method, stage2_schedule
from cmm_utils.papers.dynammo.runs import run_dynammo_method
from cmm_utils.papers.dynammo.scenarios import MEMORY_PER_CLASS, grouped_scenario, load_scenario, pycil_class_order

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Checkpoints and results of these tests go to a temporary folder; pretrained backbones are shared."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (REPO / ".cache" / "backbones").mkdir(parents=True, exist_ok=True)
    (cache / "backbones").symlink_to(REPO / ".cache" / "backbones")
    monkeypatch.setenv("CMM_CACHE", str(cache))
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine


@pytest.fixture(scope="module")
def small_backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18").eval()   # the book's 28 px ResNet-18, random init


def tiny_scenario(n_per_class: int = 6, classes: int = 4, tasks: int = 2, size: int = 28, seed: int = 0) -> Scenario:
    """Random images with a class-dependent mean, so a few steps can learn something."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(classes).repeat_interleave(n)
        base = (labels.float() * 40 + 40).view(-1, 1, 1, 1)
        images = (base + 30 * torch.randn(len(labels), 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
        return LabeledImages(images, labels)

    train, test = split(n_per_class), split(max(2, n_per_class // 2))
    per = classes // tasks
    out = []
    for t in range(tasks):
        cls = tuple(range(t * per, (t + 1) * per))
        pick = lambda d: d.subset(np.flatnonzero(np.isin(d.labels.numpy(), cls)))  # noqa: E731
        out.append(Task(t, cls, pick(train), pick(test), pick(test)))
    return Scenario("tiny", "class-incremental", out, tuple(str(c) for c in range(classes)), tuple(range(classes)))


def tiny_settings(**kw):
    s = dict(D.PROFILES["smoke"])
    s.update(train_steps=2, head_steps=2, stage2_epochs=2, der_ft_epochs=2, batch_size=8, max_train_per_task=None)
    s.update(kw)
    return s


# ---------------------------------------------------------------------------------- adapters
def test_adapter_is_the_papers_residual_block():
    a = Adapter(8)
    x = torch.randn(2, 8, 6, 6)
    assert a(x).shape == x.shape and float(a.alpha.detach()) == pytest.approx(0.02)
    assert a.conv.padding == (0, 0) and a.convt.padding == (0, 0) and a.conv.kernel_size == (3, 3)
    with torch.no_grad():
        a.alpha.zero_()
    assert torch.equal(a(x), x)                     # x + 0 * A(x)


def test_resnet18_adapters_count_as_in_the_research_note():
    counts = D.adapter_parameters(build_backbone("resnet18", scale="paper", image_size=224))
    assert counts == {"backbone": 11_176_512, "adapters_per_task": 1_625_092}


def test_new_task_copies_the_previous_adapters_and_freezes_the_old(small_backbone):
    net = AdapterNet(copy.deepcopy(small_backbone))
    net.add_task(2)
    with torch.no_grad():
        for p in net.adapters[0].parameters():
            p.add_(torch.randn_like(p))
    net.add_task(3)
    for k, v in net.adapters[0].state_dict().items():
        assert torch.equal(v, net.adapters[1].state_dict()[k]), k
    assert not any(p.requires_grad for p in net.adapters[0].parameters())
    assert all(p.requires_grad for p in net.adapters[1].parameters())
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert [h.out_features for h in net.heads] == [3, 4] and net.aux_head.out_features == 4


def test_merge_is_the_uniform_average_computed_once(small_backbone):
    net = AdapterNet(copy.deepcopy(small_backbone)).eval()
    for n in (2, 2, 2):
        net.add_task(n)
        with torch.no_grad():
            for p in net.adapters[-1].parameters():
                p.add_(0.1 * torch.randn_like(p))
    net.merge()
    expected = merging.average_adapters([a.state_dict() for a in net.adapters], "average")
    for k, v in net.merged.state_dict().items():
        assert torch.allclose(v, expected[k]), k
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = net(x)
        for p in net.adapters[0].parameters():   # changing a task adapter does not touch the merged
            p.add_(1.0)                          # model until merge() is called again
        assert torch.equal(net(x), before)
        net.merge()
        assert not torch.allclose(net(x), before)


def test_adapter_spread_measures_distance_to_the_average():
    a = {"w": torch.tensor([1.0, 0.0]), "bn.running_mean": torch.tensor([5.0])}
    b = {"w": torch.tensor([3.0, 0.0]), "bn.running_mean": torch.tensor([-5.0])}
    assert adapter_spread([a, a]) == 0.0
    assert adapter_spread([a, b]) == pytest.approx(0.5)      # |1-2| / |2|, statistics ignored


def test_bn_policy_reaches_the_merge(small_backbone):
    net = AdapterNet(copy.deepcopy(small_backbone), bn_policy="reset")
    net.add_task(2)
    net.adapters[0][0].bn1.running_mean.fill_(3.0)
    net.merge()
    assert torch.equal(net.merged[0].bn1.running_mean, torch.zeros_like(net.merged[0].bn1.running_mean))


def test_one_task_merged_equals_path_and_one_pass_equals_released_t_passes(small_backbone):
    torch.manual_seed(1)
    net = AdapterNet(copy.deepcopy(small_backbone)).eval()
    net.add_task(2)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        net.inference = "merged"
        a = net(x)
        net.inference = "paths"
        assert torch.allclose(a, net(x), atol=1e-6)
        net.add_task(3)
        for p in net.adapters[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
        net.merge()
        net.inference = "merged"
        released = torch.cat([net.heads[t](net.features(x, "merged")) for t in range(2)], 1)
        assert torch.allclose(net(x), released, atol=1e-6)
        # ACL's shared-stem paths equal full passes through each task's path
        for f, t in zip(net.path_features(x), range(2)):
            assert torch.allclose(f, net.features(x, t), atol=1e-6)


def test_unknown_inference_and_stage_are_clear_errors(small_backbone):
    net = AdapterNet(copy.deepcopy(small_backbone))
    net.add_task(2)
    net.inference = "ensemble"
    with pytest.raises(ValueError, match="unknown inference 'ensemble'.*merged"):
        net(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="no stage 'block9'"):
        AdapterNet(copy.deepcopy(small_backbone), stages=("block9",))


# -------------------------------------------------------------------------------- min-others
def test_min_others_picks_the_task_with_lowest_others_then_its_best_class():
    torch.manual_seed(0)
    classes = [(0, 3), (1, 2, 5)]
    logits = [torch.randn(50, 3), torch.randn(50, 4)]
    scores = min_others_scores(logits, classes, 7)
    probs = [torch.softmax(l, 1) for l in logits]
    others = torch.stack([p[:, -1] for p in probs], 1)
    task = others.argmin(1)
    for n in range(50):
        p = probs[int(task[n])]
        expected = classes[int(task[n])][int(p[n, :-1].argmax())]
        assert int(scores[n].argmax()) == expected
    assert torch.isinf(scores[:, [4, 6]]).all()
    with pytest.raises(ValueError, match="head 0 has 3 outputs"):
        min_others_scores([torch.randn(2, 3)], [(0, 1, 2)], 3)


# ------------------------------------------------------------------------------ memory
def herding_reference(x: np.ndarray, m: int) -> list[int]:
    """iCaRL's herding as PyCIL writes it (numpy)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu, chosen, picked = x.mean(0), [], []
    remaining = list(range(len(x)))
    for k in range(1, m + 1):
        s = np.sum(picked, axis=0) if picked else np.zeros_like(mu)
        cand = (x[remaining] + s) / k
        i = remaining[int(np.argmin(np.sqrt(((mu - cand) ** 2).sum(1))))]
        chosen.append(i)
        picked.append(x[i])
        remaining.remove(i)
    return chosen


def test_herding_matches_icarl():
    x = np.random.default_rng(0).normal(size=(40, 5))
    assert herding(torch.from_numpy(x), 12).tolist() == herding_reference(x, 12)
    assert sorted(herding(torch.from_numpy(x), 100).tolist()) == list(range(40))


def test_memory_splits_a_fixed_budget_and_keeps_herding_order():
    torch.manual_seed(0)
    data = LabeledImages(torch.randint(0, 255, (60, 3, 4, 4), dtype=torch.uint8), torch.arange(6).repeat(10))
    feat = lambda x: x.flatten(1)  # noqa: E731
    mem = Memory(12)
    mem.update(feat, data, [0, 1])
    assert [len(mem.classes[c]) for c in (0, 1)] == [6, 6]
    first = mem.classes[0].images.clone()
    mem.update(feat, data, [2, 3, 4, 5])
    assert [len(mem.classes[c]) for c in range(6)] == [2] * 6 and len(mem.data()) == 12
    assert torch.equal(mem.classes[0].images, first[:2])           # truncation keeps the herding prefix
    again = Memory.from_state(12, mem.state())
    assert torch.equal(again.data().images, mem.data().images)


def test_others_label_and_epoch_milestones():
    assert label_lookup((1, 4), 6).tolist() == [2, 0, 2, 2, 1, 2]
    cfg = epoch_config(200, 0.01, [70, 130, 170], 3555, 32)
    assert cfg.milestones == (70 * 112, 130 * 112, 170 * 112) and cfg.schedule == "multistep"


# --------------------------------------------------------------------------- whole method
def test_runs_are_deterministic_and_report_flat_merged_cost(small_backbone):
    sc, s = tiny_scenario(), tiny_settings()
    results = {}
    for method in D.METHODS:
        a = run_dynammo_method(method, sc, "smoke", 3, s, backbone=small_backbone, checkpoint=False)
        b = run_dynammo_method(method, sc, "smoke", 3, s, backbone=small_backbone, checkpoint=False)
        np.testing.assert_array_equal(np.asarray(a.R), np.asarray(b.R), err_msg=method)   # NaN == NaN here
        assert a.extra["mcr_seen"] == b.extra["mcr_seen"], method
        assert np.asarray(a.R).shape == (2, 2) and all(0 <= v <= 1 for v in a.acc_seen)
        assert all(t + 1e-9 >= v for t, v in zip(a.extra["task_acc_seen"], a.acc_seen))  # right class => right task
        results[method] = a
    dyn, acl = results["dynammo"].extra["gflops_per_task"], results["acl"].extra["gflops_per_task"]
    assert abs(dyn[1] - dyn[0]) < 1e-4 and acl[1] > 1.5 * acl[0]
    assert results["der"].extra["params_per_task"][1] > 1.9 * results["der"].extra["params_per_task"][0]
    assert results["dynammo"].extra["memory_size"] == MEMORY_PER_CLASS * sc.num_classes
    assert results["dynammo"].extra["adapter_spread"][0] == 0.0 and len(results["dynammo"].extra["alpha"]) == 2


def test_stage1_resumes_from_its_checkpoint(small_backbone, tmp_path):
    sc, s = tiny_scenario(), tiny_settings()
    straight = adapter_stage1(sc, small_backbone, s, 0, 20, None)
    ck = tmp_path / "ck"
    ck.mkdir()
    first = Scenario(sc.name, sc.kind, sc.tasks[:1], sc.class_names, sc.class_order)
    adapter_stage1(first, small_backbone, s, 0, 20, ck)              # "interrupted" after task 1
    assert [p.name for p in ck.glob("*.safetensors")] == ["stage1-task0.safetensors"]
    resumed = adapter_stage1(sc, small_backbone, s, 0, 20, ck)
    for a, b in zip(straight.adapters, resumed.adapters):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(straight.memories[-1].images, resumed.memories[-1].images)
    assert torch.equal(straight.balanced[-1].images, resumed.balanced[-1].images)  # stage 2's set resumes too
    assert [p.name for p in ck.glob("*.safetensors")] == ["stage1-task1.safetensors"]


def test_run_is_cached_and_records_the_final_mean_class_recall(small_backbone, monkeypatch):
    sc = tiny_scenario()
    overrides = dict(train_steps=2, head_steps=2, stage2_epochs=2, der_ft_epochs=2, batch_size=8)
    monkeypatch.setattr(runs, "book_backbone", lambda *a, **k: copy.deepcopy(small_backbone))
    r = D.run("dynammo", "tiny", "smoke", 0, scenario=lambda: sc, **overrides)
    assert isinstance(r, ContinualResult)
    assert isinstance(r.extra["mean_class_recall"], float) and r.extra["mean_class_recall"] == r.extra["mcr_seen"][-1]
    found = list((Path(__import__("os").environ["CMM_RESULTS"]) / "smoke" / "dynammo" / "runs").glob("*.json"))
    assert len(found) == 1
    saved = json.loads(found[0].read_text())
    assert {"method", "benchmark", "seed", "backbone", "profile"} <= set(saved["config"])
    assert saved["config"]["method"] == "dynammo" and saved["config"]["train_steps"] == 2
    assert not {"seeds", "benchmarks", "methods"} & set(saved["config"])    # what a page runs is no cache key
    np.testing.assert_array_equal(np.asarray(saved["result"]["R"], dtype=float), np.asarray(r.R))
    again = D.run("dynammo", "tiny", "smoke", 0, scenario=lambda: pytest.fail("recomputed"), **overrides)
    np.testing.assert_array_equal(np.asarray(again.R, dtype=float), np.asarray(r.R))
    assert again.extra["mean_class_recall"] == r.extra["mean_class_recall"]
    with pytest.raises(ValueError, match="unknown setting 'train_step'"):
        D.run("dynammo", "tiny", "smoke", 0, scenario=lambda: sc, train_step=2)


def test_profiles_follow_the_common_schema():
    check_table(D.CHAPTER, D.PROFILES)
    assert D.PROFILES["cpu"]["seeds"] == 3 and D.PROFILES["cpu"]["benchmarks"][0] == "ham10000-cil"
    assert all(row["methods"] == list(D.METHODS) for row in D.PROFILES.values())
    assert D.CHAPTER == "dynammo" and D.TITLE and callable(D.run)


def _claim_frames(acl=0.82, der=0.84, finetune=0.70, acl_ratio=9.6, der_ratio=6.9):
    """Hand-made page artifacts: one scenario, two seeds, DynaMMo at 0.80."""
    rows = [{"scenario": "ham", "method": m, "seed": s, "avg_mcr": v + 0.01 * s, "adapter_spread": 0.1}
            for s in (0, 1) for m, v in (("dynammo", 0.80), ("acl", acl), ("der", der), ("finetune", finetune))]
    ratios = pd.DataFrame({"tasks": [10, 10], "ACL / DynaMMo": [acl_ratio, 9.7], "DER / DynaMMo": [der_ratio, 7.9]},
                          index=[C.PAPER_SETTING, "ours: book ResNet-18, 28 px"])
    flat = {k: f"flat ({k})" for k in ratios.index}
    return pd.DataFrame(rows), ratios, flat, {"ham": "avg_mcr"}


def test_claims_are_judged_by_the_papers_criteria():
    summary, ratios, flat, metric = _claim_frames()
    judged = {c.id: c for c in C.judge_claims(summary, ratios, flat, metric, 28, evidence=True)}
    assert judged["gflops-vs-acl"].verdict == "supported" and judged["gflops-vs-acl"].ours == 9.6
    assert judged["gflops-vs-der"].verdict == "not supported"                 # 6.9 < 0.8 x 10
    assert judged["flat-cost"].verdict == "supported"
    assert judged["drop-vs-acl"].verdict == "supported" and judged["drop-vs-acl"].ours == pytest.approx(2.0)
    assert judged["drop-vs-der"].verdict == "supported"                       # 4 points <= 2 x 2.76
    assert judged["beats-finetune"].verdict == "supported"
    summary, ratios, flat, metric = _claim_frames(acl=0.90, finetune=0.85, acl_ratio=7.0)
    judged = {c.id: c for c in C.judge_claims(summary, ratios, flat, metric, 28, evidence=True)}
    assert judged["gflops-vs-acl"].verdict == "not supported"
    assert judged["drop-vs-acl"].verdict == "not supported"                   # 10 points > 5.52
    assert judged["beats-finetune"].verdict == "not supported"
    text = C.verdict_summary(list(judged.values()), summary, ratios, metric, 2, 15, evidence=True)
    assert "does not hold" in text and "not supported at our scale" in text


def test_smoke_accuracies_decide_nothing():
    summary, ratios, flat, metric = _claim_frames()
    judged = C.judge_claims(summary, ratios, flat, metric, 28, evidence=False)
    by_id = {c.id: c for c in judged}
    assert {by_id[k].verdict for k in ("drop-vs-acl", "drop-vs-der", "beats-finetune")} == {"inconclusive"}
    assert by_id["gflops-vs-acl"].verdict == "supported"
    assert "not tested in the smoke profile" in C.verdict_summary(judged, summary, ratios, metric, 1, 4, False)
    assert list(C.claims_table(judged).columns[:4]) == ["claim", "paper_value", "ours", "verdict"]


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'icarl'; valid: dynammo, acl, der"):
        check_method("icarl")
    with pytest.raises(ValueError, match="unknown scenario 'skin9'"):
        load_scenario("skin9", "smoke")
    with pytest.raises(ValueError, match="task_sizes"):
        grouped_scenario(type("X", (), {"num_classes": 4})(), (2, 3))


def test_paper_profile_scenarios_and_class_order():
    assert pycil_class_order(100)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert D.SCENARIOS["path16"]["task_sizes"] == (2, 2, 2, 2, 4, 2, 2)
    assert (D.SCENARIOS["skin8"]["memory"], D.SCENARIOS["path16"]["memory"], D.SCENARIOS["cifar100"]["memory"]) == (40, 80, 2000)
    p = D.PROFILES["paper"]
    assert (p["stage1_epochs"], p["stage1_milestones"], p["stage1_lr"], p["batch_size"]) == (200, [70, 130, 170], 0.01, 32)
    assert stage2_schedule(p, "cifar100") == (50, [15, 35]) and stage2_schedule(p, "skin8") == (100, [55, 80])


@pytest.mark.timeout(900)
def test_paper_profile_takes_one_step_of_each_stage_at_224px():
    """The paper profile's model (timm ResNet-18 at 224 px, random init instead of ImageNet weights)
    and schedules, one step of stage 1 and of stage 2, on a few 224 px images."""
    settings = dict(D.PROFILES["paper"], train_steps=1, head_steps=1)
    sc = tiny_scenario(n_per_class=2, classes=4, tasks=2, size=224)
    backbone = build_backbone("resnet18", scale="paper", image_size=224).eval()
    res = run_dynammo_method("dynammo", sc, "paper", 1993, settings, backbone=backbone, checkpoint=False)
    assert np.asarray(res.R).shape == (2, 2)
    assert res.gflops == pytest.approx(5.2257, abs=1e-3)            # one merged pass at 224 px
    assert res.extra["params_per_task"][0] == 11_176_512 + 1_625_092 + (512 * 3 + 3)


# ----------------------------------------------------------------------------- notebook
@pytest.mark.timeout(900)
def test_notebook_runs_on_an_unseen_dataset(unseen_npz, tmp_path):
    import papermill as pm

    out = tmp_path / "dynammo_out.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "dynammo.ipynb"), str(out), kernel_name="python3",
                        parameters=dict(profile="smoke", dataset=str(unseen_npz), n_tasks=5),
                        cwd=str(REPO / "notebooks"), progress_bar=False)
    text = out.read_text()
    assert "DynaMMo chapter results" in text and "digits_unseen" in text and "checks passed" in text
    results = tmp_path / "results" / "smoke" / "dynammo"
    summary = __import__("pandas").read_csv(results / "summary.csv")
    assert set(summary["method"]) == set(D.METHODS) and (summary["tasks"] == 5).all()
    verdict = json.loads((results / "verdict.json").read_text())
    assert verdict["chapter"] == "dynammo" and verdict["claims"][0]["supported"] is True
