"""The shared evaluation protocol, FLOP counting and the run cache."""
import numpy as np
import pytest
import torch
from torch import nn

from cmm_utils.continual import (ContinualResult, cached_run, evaluate_after_task, gflops_per_image,
                                 load_cached_runs, state_bytes)
from cmm_utils.data import DatasetSplits, LabeledImages, class_incremental


def tiny_scenario():
    labels = torch.arange(4).repeat_interleave(5)
    images = torch.zeros(20, 3, 4, 4, dtype=torch.uint8)
    part = LabeledImages(images, labels)
    return class_incremental(DatasetSplits("tiny", ("a", "b", "c", "d"), part, part, part), 2, class_order=[0, 1, 2, 3])


def test_predictions_are_restricted_to_seen_classes():
    scenario = tiny_scenario()
    # a model that always prefers the unseen class 3, then class 0
    logits = lambda x: torch.tensor([[1.0, 0.0, 0.0, 9.0]]).expand(x.shape[0], -1)
    row, seen = evaluate_after_task(logits, scenario, 0)
    assert row[0] == pytest.approx(0.5) and np.isnan(row[1])  # predicts class 0: right on half of task 0
    assert seen == pytest.approx(0.5)
    row, seen = evaluate_after_task(logits, scenario, 1)
    assert row == [0.0, pytest.approx(0.5)]  # class 3 is now allowed and always predicted
    assert seen == pytest.approx(0.25)


def test_gflops_counts_multiply_adds_twice():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8 out channels * 3 in * 9 taps * 16x16 positions, x2 for multiply-add
    assert gflops_per_image(conv, 16) == pytest.approx(2 * 8 * 3 * 9 * 256 / 1e9)


def test_state_bytes():
    assert state_bytes({"a": torch.zeros(10)}, torch.zeros(5, dtype=torch.float64)) == 40 + 40


def test_cached_run_reuses_and_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path))
    calls = []

    def run():
        calls.append(1)
        return ContinualResult("m", [[0.5, float("nan")], [0.4, 0.6]], [0.5, 0.5], bytes_stored=10)

    cfg = {"method": "m", "seed": 0}
    a = cached_run("smoke", "ch", cfg, run)
    b = cached_run("smoke", "ch", cfg, run)
    assert len(calls) == 1 and a.R[1] == b.R[1]
    assert load_cached_runs("smoke", "ch")[0]["config"] == cfg
    s = b.summary()
    assert s["forgetting"] == pytest.approx(0.1) and s["final_acc"] == 0.5
