"""Issue 12 for the MagMax chapter: the regime check, the claims' paired-bootstrap verdicts, the
θ_0 class-prototype head."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cmm_utils.core.data import LabeledImages, Scenario, Task
from cmm_utils.core.verdicts import INCONCLUSIVE, NOT_RUN, NOT_SUPPORTED, NOT_TESTABLE, SUPPORTED
from cmm_utils.papers.magmax import claims, regime
from cmm_utils.papers.magmax.method import prototype_head_weight
from cmm_utils.papers.magmax.profiles import PROFILES

LABELS = np.repeat(np.arange(6), 100)  # 6 classes, 600 test images, 3 tasks of 2 classes
MERGES = ("seq-ft", "average", "random", "ties", "task-arithmetic", "magmax",
          "average-ind", "random-ind", "ties-ind", "task-arithmetic-ind", "magmax-ind")


def numbers(joint: float, diag: float, last_row: tuple, seed: int = 0, cosine: float = 0.5) -> dict:
    """Hand-made regime numbers of one seed: joint's recall, R[t, t] (task-agnostic and aware),
    the seq-ft row after the last task, the task vectors' mean cosine."""
    R = [[diag, np.nan, np.nan], [0.5 * diag, diag, np.nan], list(last_row)]
    geo = {"norms": [1.0, 2.0, 3.0], "mean_pairwise_cosine": cosine}
    return {"num_classes": 6, "task_classes": [[0, 1], [2, 3], [4, 5]], "test_labels": LABELS.tolist(),
            "theta0_recall": 0.3, "joint_recall": joint + 0.001 * seed, "seqft_R": R,
            "task_aware_diagonal": [diag] * 3, "geometry": {"sequential": geo, "independent": geo}}


def test_a_floor_level_run_fails_the_regime_and_names_the_numbers():
    floor = regime.scenario_regime("b1", [numbers(0.17, 0.2, (0.2, 0.2, 0.2), s) for s in range(3)])
    assert not floor.passed
    failing = floor.failing()
    assert "joint mean class recall" in failing and "R[0,0] task-aware" in failing and "seq-ft forgetting" in failing
    ok = regime.scenario_regime("b1", [numbers(0.8, 0.9, (0.3, 0.4, 0.9), s) for s in range(3)])
    assert ok.passed, ok.failing()
    same = regime.scenario_regime("b1", [numbers(0.8, 0.9, (0.3, 0.4, 0.9), cosine=0.99)])
    assert not same.passed and "cosine" in same.failing()
    floor2 = regime.scenario_regime("b2", [numbers(0.17, 0.2, (0.2, 0.2, 0.2))])
    frame = regime.regime_frame({"b1": ok, "b2": floor2})
    back = regime.regimes_from_frame(frame)
    assert back["b1"].passed and not back["b2"].passed and back["b2"].failing() == floor2.failing()
    with pytest.raises(ValueError, match="no regime numbers for scenario 'b3'"):
        regime.scenario_regime("b3", [])


def predictions(acc: dict[str, float], seeds=(0, 1, 2)) -> dict:
    """Per-image predictions with the given accuracy (a seeded set of images right, the rest wrong)."""
    out = {}
    for s in seeds:
        rng = np.random.default_rng(s)
        order = rng.permutation(LABELS.size)
        out[str(s)] = {"labels": LABELS.tolist()}
        for m, a in acc.items():
            pred = (LABELS + 1) % 6
            right = order[: int(a * LABELS.size)]
            pred[right] = LABELS[right]
            out[str(s)][m] = pred.tolist()
    return out


def frames(acc: dict[str, float], chosen_gap: float):
    summary = pd.DataFrame([{"benchmark": "b1", "seed": s, "method": m, "final_acc": a, "mean_class_recall": a}
                            for s in range(3) for m, a in acc.items()])
    lambdas = pd.DataFrame([{"benchmark": "b1", "seed": s, "merge": "magmax", "regime": "sequential",
                             "test_acc_paper_lambda": 0.60, "test_acc_chosen_lambda": 0.60 + chosen_gap + 0.002 * s}
                            for s in range(3)])
    return summary, lambdas, {"b1": predictions(acc)}


GOOD = {"seq-ft": 0.40, "average": 0.68, "random": 0.67, "ties": 0.55, "task-arithmetic": 0.6, "magmax": 0.70,
        "average-ind": 0.50, "random-ind": 0.50, "ties-ind": 0.45, "task-arithmetic-ind": 0.5, "magmax-ind": 0.55}
BAD = {"seq-ft": 0.40, "average": 0.40, "random": 0.45, "ties": 0.70, "task-arithmetic": 0.5, "magmax": 0.50,
       "average-ind": 0.55, "random-ind": 0.55, "ties-ind": 0.75, "task-arithmetic-ind": 0.6, "magmax-ind": 0.55}
CHECKED = ("best-merge", "simple-merges", "sequential-helps", "fixed-lambda")


def test_claims_are_judged_by_paired_intervals_on_hand_made_frames():
    ok = {"b1": regime.scenario_regime("b1", [numbers(0.8, 0.9, (0.3, 0.4, 0.9))])}
    judged = {c.id: c for c in claims.judge_claims(*frames(GOOD, 0.0)[:2], ok, frames(GOOD, 0.0)[2])}
    assert judged["headline"].verdict == NOT_RUN
    for k in CHECKED:
        c = judged[k]
        assert c.verdict == SUPPORTED, (k, c.ours)
        assert c.interval is not None and c.interval[0] <= c.estimate <= c.interval[1]
    # MagMax 70 vs averaging 68: the interval is above 0 (same images, paired), the gap is 2 points
    assert judged["best-merge"].estimate == pytest.approx(0.02, abs=1e-9) and judged["best-merge"].interval[0] > 0
    summary, lambdas, preds = frames(BAD, 0.10)
    judged = {c.id: c for c in claims.judge_claims(summary, lambdas, ok, preds)}
    assert all(judged[k].verdict == NOT_SUPPORTED for k in CHECKED), {k: judged[k].ours for k in CHECKED}
    # a gap inside the noise: inconclusive, never supported
    close = {**GOOD, "magmax": 0.681}
    judged = {c.id: c for c in claims.judge_claims(*frames(close, 0.0)[:2], ok, frames(close, 0.0)[2])}
    assert judged["best-merge"].verdict == INCONCLUSIVE


def test_a_failing_regime_makes_every_comparison_not_testable_with_its_numbers():
    floor = {"b1": regime.scenario_regime("b1", [numbers(0.17, 0.2, (0.2, 0.2, 0.2))])}
    summary, lambdas, preds = frames(GOOD, 0.0)
    judged = {c.id: c for c in claims.judge_claims(summary, lambdas, floor, preds)}
    for k in CHECKED:
        assert judged[k].verdict == NOT_TESTABLE and judged[k].interval is None
        assert "joint mean class recall = 0.17" in judged[k].ours
    # without predictions the comparisons are "not run", not a verdict
    judged = {c.id: c for c in claims.judge_claims(summary, lambdas, {}, {})}
    assert judged["best-merge"].verdict == NOT_RUN


class MeanPixel(nn.Module):
    """A toy backbone: per-channel mean intensity plus a constant (features of dimension 4)."""
    num_features = 4

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # predict() reads the device from a parameter

    def forward(self, x):
        m = x.float().mean(dim=(2, 3)) * self.gain
        return torch.cat([m, torch.ones(len(x), 1)], dim=1)


def test_the_prototype_head_holds_theta0_class_means_and_classifies_at_theta0():
    gen = torch.Generator().manual_seed(0)

    def images(c, n):  # class c: channel c bright
        x = torch.randint(0, 40, (n, 3, 4, 4), generator=gen, dtype=torch.uint8)
        x[:, c] += 200
        return LabeledImages(x, torch.full((n,), c))

    def task(i, classes):
        parts = [images(c, 20) for c in classes]
        data = LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
        return Task(i, tuple(classes), data, data, data)
    scenario = Scenario("toy", "class-incremental", [task(0, [0, 1]), task(1, [2])], ("a", "b", "c"), (0, 1, 2))
    w = prototype_head_weight(MeanPixel(), scenario, scale=16.0)
    assert w.shape == (3, 4) and torch.allclose(w.norm(dim=1), torch.full((3,), 16.0))
    assert w[:, :3].argmax(1).tolist() == [0, 1, 2]  # each class's row points at its bright channel
    assert PROFILES["cpu"]["head"] == "prototype" and PROFILES["smoke"]["head"] == "prototype"
    assert PROFILES["cpu"]["min_steps"] == PROFILES["cpu"]["max_steps"]  # the same steps for every task
