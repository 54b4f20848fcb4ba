"""The shared evaluation protocol, FLOP counting and the run cache."""
import numpy as np
import pytest
import torch
from torch import nn

from cmm_utils.core.continual import (ContinualResult, cached_run, evaluate_after_task, evaluate_seen_tasks,
                                      gflops_per_image, load_cached_runs, pooled_mean_class_recall, score_seen_tasks,
                                      state_bytes)
from cmm_utils.core.data import DatasetSplits, LabeledImages, class_incremental


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


def test_mean_class_recall_does_not_reward_the_majority_class():
    scenario = tiny_scenario()
    always_class_0 = lambda x: torch.tensor([[9.0, 0.0, 0.0, 0.0]]).expand(x.shape[0], -1)
    # after the last task: 4 balanced classes, one always right -> recall 1, 0, 0, 0
    assert pooled_mean_class_recall(always_class_0, scenario) == pytest.approx(0.25)
    assert pooled_mean_class_recall(always_class_0, scenario, t=0) == pytest.approx(0.5)
    # the same outputs with the unseen class 3 preferred: restricted to seen classes after task 0
    prefers_3 = lambda x: torch.tensor([[1.0, 0.0, 0.0, 9.0]]).expand(x.shape[0], -1)
    assert pooled_mean_class_recall(prefers_3, scenario, t=0) == pytest.approx(0.5)


def test_one_set_of_logits_scores_every_step_like_a_fresh_evaluation():
    scenario = tiny_scenario()
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(256, 4, generator=gen)

    def logits_fn(x):  # a deterministic, image-independent but row-varying model
        return table[: x.shape[0]]

    logits = [logits_fn(torch.zeros(len(task.test), 1)) for task in scenario.tasks]
    for t in range(2):
        once = score_seen_tasks(logits, scenario, t)
        fresh = evaluate_seen_tasks(logits_fn, scenario, t)
        assert np.array_equal(np.array(once.row), np.array(fresh.row), equal_nan=True)
        assert (once.accuracy, once.mean_class_recall) == (fresh.accuracy, fresh.mean_class_recall)
        assert once.row[:t + 1] == evaluate_after_task(logits_fn, scenario, t)[0][:t + 1]
        assert torch.equal(once.labels, scenario.joint("test", upto=t).labels)
        assert once.predicted.max() <= max(scenario.seen_classes(t))  # restricted to the seen classes
    # pooled accuracy is sample-weighted over tasks 0..t
    score = score_seen_tasks(logits, scenario, 1)
    assert score.accuracy == pytest.approx(float((score.predicted == score.labels).float().mean()))


def test_leaderboard_row_reads_the_one_recall_key_every_paper_records():
    from cmm_utils.leaderboard import ENTRIES, result_row

    base = dict(method="m", R=[[0.5]], acc_seen=[0.5])
    row = result_row(ENTRIES[0], "b", 0, ContinualResult(**base, extra={"mean_class_recall": 0.3}))
    assert row["mean_class_recall"] == 0.3 and row["final_acc"] == 0.5
    with pytest.raises(KeyError, match="mean_class_recall"):
        result_row(ENTRIES[0], "b", 0, ContinualResult(**base, extra={"mcr_seen": [0.6, 0.2]}))


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
