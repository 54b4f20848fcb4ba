"""DynaMMo's regime check and interval verdicts (issue 12): a floor-level run is not testable, an
informative one is judged with a 95 % interval; the two controls do what their names say."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cmm_utils.papers.dynammo as D
from cmm_utils.core.data import LabeledImages, Scenario, Task
from cmm_utils.core.models import build_backbone
from cmm_utils.papers.dynammo import claims as C
from cmm_utils.papers.dynammo import regime as DR
from cmm_utils.papers.dynammo.runs import run_dynammo_method

METHODS = ("dynammo", "acl", "der", "finetune", "joint", "no_adapters", "last_adapters")


def scenario(classes: int = 4, tasks: int = 2, n: int = 10, seed: int = 0) -> Scenario:
    """Random images whose mean depends on the class (a few steps can learn something)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n)
    images = ((labels.float() * 40 + 40).view(-1, 1, 1, 1) + 30 * torch.randn(len(labels), 3, 28, 28, generator=g))
    data = LabeledImages(images.clamp(0, 255).to(torch.uint8), labels)
    per, out = classes // tasks, []
    for t in range(tasks):
        cls = tuple(range(t * per, (t + 1) * per))
        part = data.subset(np.flatnonzero(np.isin(labels.numpy(), cls)))
        out.append(Task(t, cls, part, part, part))
    return Scenario("tiny", "class-incremental", out, tuple(map(str, range(classes))), tuple(range(classes)))


def frames(informative: bool, name: str = "ham", drops=(1.0, 2.0, 3.0), ft_gaps=(5.0, 6.0, 7.0),
           last_gaps=(-1.0, 0.0, 1.0)):
    """Hand-made page tables for one scenario of 2 tasks x 2 classes and 3 seeds: DynaMMo at 0.60;
    ``drops`` = ACL − DynaMMo, ``ft_gaps`` = DynaMMo − fine-tuning, ``last_gaps`` = DynaMMo − last
    adapters, in points per seed. ``informative=False``: joint at the recall floor, fine-tuning at
    chance, adapters that do not move the features."""
    rows, mats = [], []
    for s in range(3):
        values = {"dynammo": 0.60, "acl": 0.60 + drops[s] / 100, "der": 0.61, "finetune": 0.60 - ft_gaps[s] / 100,
                  "joint": 0.70 if informative else 0.25, "no_adapters": 0.40 if informative else 0.61,
                  "last_adapters": 0.60 - last_gaps[s] / 100}
        for m, v in values.items():
            rows.append({"scenario": name, "method": m, "seed": s, "avg_mcr": v, "last_mcr": v,
                         "feature_shift": 0.3 if informative else 0.004, "path_spread": 0.2 if informative else 0.001,
                         "adapter_spread": 0.05})
        diag, old = (0.9, 0.1) if informative else (0.5, 0.5)   # task-agnostic chance: 1/2, then 1/4
        R = [[diag, np.nan], [old, 0.9 if informative else 0.25]]
        for t in range(2):
            for i in range(2):
                mats.append({"scenario": name, "method": "finetune", "seed": s, "after_task": t, "task": i,
                             "acc": R[t][i]})
    return pd.DataFrame(rows), pd.DataFrame(mats)


def cost_frames():
    ratios = pd.DataFrame({"tasks": [10, 10], "ACL / DynaMMo": [9.6, 9.7], "DER / DynaMMo": [6.9, 7.9]},
                          index=[C.PAPER_SETTING, "ours: book ResNet-18, 28 px"])
    return ratios, {k: "flat" for k in ratios.index}


def judge(summary, regimes, evidence=True):
    ratios, flat = cost_frames()
    metric = {n: "avg_mcr" for n in summary.scenario.unique()}
    return {c.id: c for c in C.judge_claims(summary, ratios, flat, metric, 28, evidence, regimes)}


def test_floor_level_run_is_not_testable_with_the_failing_numbers():
    summary, mats = frames(informative=False)
    regime = DR.scenario_regime("ham", summary, mats, scenario(), "avg_mcr")
    assert not regime.passed
    failing = regime.failing()
    for check in ("joint mean class recall", "R[0,0] task-agnostic", "adapters' feature shift",
                  "task paths' distance to the merged path", "ACL - no adapters"):
        assert check in failing, check
    judged = judge(summary, {"ham": regime})
    for cid in ("drop-vs-acl", "drop-vs-der", "beats-finetune", "merge-beats-last"):
        assert judged[cid].verdict == "not testable here", cid
        assert "joint mean class recall = 0.25" in judged[cid].ours and judged[cid].interval is None
    assert judged["gflops-vs-acl"].verdict == "supported"      # a count on the cost tables: no regime needed
    text = C.verdict_summary(list(judged.values()), summary, *cost_frames()[:1], {"ham": "avg_mcr"}, 3, 60, True)
    assert "not testable here" in text


def test_informative_run_is_judged_with_intervals():
    summary, mats = frames(informative=True)
    regime = DR.scenario_regime("ham", summary, mats, scenario(), "avg_mcr")
    assert regime.passed, regime.failing()
    table = DR.regime_frame({"ham": regime})
    assert {"check", "value", "bound", "result"} <= set(table.columns) and (table["result"] != "FAIL").all()
    judged = judge(summary, {"ham": regime})
    half = 4.302653 / np.sqrt(3)                                   # t(0.975, 2) x sd 1 / sqrt(3)
    drop = judged["drop-vs-acl"]
    assert drop.estimate == pytest.approx(2.0) and drop.interval == pytest.approx((2 - half, 2 + half))
    assert drop.verdict == "supported"                            # upper end 4.48 < 5.52
    ft = judged["beats-finetune"]
    assert ft.interval == pytest.approx((6 - half, 6 + half)) and ft.verdict == "supported"
    assert judged["merge-beats-last"].verdict == "inconclusive"   # -1, 0, +1: the interval straddles 0


def test_interval_verdicts_flip_with_the_data():
    summary, mats = frames(informative=True, drops=(8.0, 9.0, 10.0), ft_gaps=(-5.0, -6.0, -7.0),
                           last_gaps=(2.0, 2.5, 3.0))
    regime = DR.scenario_regime("ham", summary, mats, scenario(), "avg_mcr")
    judged = judge(summary, {"ham": regime})
    assert judged["drop-vs-acl"].verdict == "not supported"       # lower end 6.5 > 5.52
    assert judged["beats-finetune"].verdict == "not supported"
    assert judged["merge-beats-last"].verdict == "supported"
    smoke = judge(summary, {"ham": regime}, evidence=False)
    assert smoke["drop-vs-acl"].verdict == "inconclusive"          # smoke decides nothing


def test_only_scenarios_that_pass_their_regime_count():
    good, good_m = frames(informative=True, name="path")
    bad, bad_m = frames(informative=False, name="ham", drops=(30.0, 30.0, 30.0))
    summary, mats = pd.concat([good, bad]), pd.concat([good_m, bad_m])
    regimes = {n: DR.scenario_regime(n, summary, mats, scenario(), "avg_mcr") for n in ("path", "ham")}
    assert regimes["path"].passed and not regimes["ham"].passed
    drop = judge(summary, regimes)["drop-vs-acl"]
    assert drop.estimate == pytest.approx(2.0) and drop.verdict == "supported"   # ham's 30-point drop left out
    assert "Scenarios left out" in drop.note and "ham:" in drop.note


def test_regime_needs_the_control_runs():
    summary, mats = frames(informative=True)
    with pytest.raises(ValueError, match=r"needs the runs of \['no_adapters'\]"):
        DR.scenario_regime("ham", summary[summary.method != "no_adapters"], mats, scenario(), "avg_mcr")


def test_controls_replace_the_merged_bank():
    torch.manual_seed(0)
    bb = build_backbone("resnet18").eval()
    s = dict(D.PROFILES["smoke"], train_steps=2, head_steps=2, stage2_epochs=2, batch_size=8,
             max_train_per_task=None, adapter_alpha=0.3)
    sc = scenario()
    res = {m: run_dynammo_method(m, sc, "smoke", 0, s, backbone=bb, checkpoint=False)
           for m in ("dynammo", "no_adapters", "last_adapters")}
    assert res["no_adapters"].extra["merged_shift"] == 0.0          # alpha = 0: the bare backbone
    assert res["last_adapters"].extra["merged_shift"] == pytest.approx(res["last_adapters"].extra["feature_shift"][-1])
    assert res["dynammo"].extra["merged_shift"] > 0
    assert set(METHODS) == set(D.METHODS)
