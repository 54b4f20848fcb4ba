"""The shared protocol beneath the chapters: seeds, per-task checkpoints, profiles' schema and typed
overrides, verdicts with intervals, regime checks."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cmm_utils.core import checkpoints, profiles, regime, seeds, verdicts


# ----------------------------------------------------------------------------------- seeds
def test_task_seed_is_the_books_historical_derivation_and_stages_do_not_collide():
    assert seeds.task_seed(3, 2) == 3002
    assert seeds.task_seed(3, 2, seeds.HEAD_STAGE) == 3502
    assert seeds.task_seed(0, 0, seeds.JOINT) == 999
    stage0 = {seeds.task_seed(s, t) for s in range(3) for t in range(seeds.HEAD_STAGE)}
    stage1 = {seeds.task_seed(s, t, seeds.HEAD_STAGE) for s in range(3) for t in range(seeds.HEAD_STAGE)}
    assert not stage0 & stage1
    with pytest.raises(ValueError, match="task index 500"):
        seeds.task_seed(0, 500)


# ----------------------------------------------------------------------------------- checkpoints
def test_task_checkpoints_resume_from_the_latest_and_keep_only_it(tmp_path):
    ck = checkpoints.TaskCheckpoints(tmp_path, "run")
    assert ck.latest().tasks == 0
    for t in range(3):
        ck.save(t, {"w": torch.full((2,), float(t))}, {"acc": [t]})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["run-task2.safetensors"]
    got = ck.latest()
    assert got.tasks == 3 and got.meta["acc"] == [2] and torch.equal(got.tensors["w"], torch.full((2,), 2.0))
    assert checkpoints.TaskCheckpoints(None, "run").latest().tasks == 0  # nothing kept, nothing resumed


def test_keep_all_holds_every_task_and_load_skips_a_damaged_one(tmp_path):
    ck = checkpoints.TaskCheckpoints(tmp_path, "tau", keep="all")
    for t in range(3):
        ck.save(t, {"w": torch.full((4,), float(t))})
    assert [ck.load(t).tensors["w"][0].item() for t in range(3)] == [0.0, 1.0, 2.0]
    ck.path(1).write_bytes(b"not safetensors")
    with pytest.warns(RuntimeWarning, match="damaged checkpoint"):
        assert ck.load(1) is None
    assert ck.load(5) is None and ck.latest().tasks == 3
    ck.clear()
    assert not list(tmp_path.glob("tau-task*"))
    with pytest.raises(ValueError, match="keep='some'"):
        checkpoints.TaskCheckpoints(tmp_path, "x", keep="some")


@pytest.mark.parametrize("damage", ["truncate", "sidecar", "mismatch"])
def test_a_damaged_checkpoint_is_ignored_with_a_warning(tmp_path, damage):
    ck = checkpoints.TaskCheckpoints(tmp_path, "run")
    ck.save(0, {"w": torch.ones(1000)})
    path = ck.path(0)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "sidecar":
        path.with_suffix(".json").write_text('{"tasks": ')
    else:
        path.with_suffix(".json").write_text('{"tasks": 7}')
    with pytest.warns(RuntimeWarning, match="damaged checkpoint"):
        assert ck.latest().tasks == 0
    assert not path.exists()


# ----------------------------------------------------------------------------------- profiles
TABLE = {"smoke": {"seeds": 1, "benchmarks": ["a"], "methods": ["m"], "lr": 0.1, "steps": 3},
         "cpu": {"seeds": 3, "benchmarks": ["a", "b"], "methods": ["m", "n"], "lr": 0.1, "steps": 30},
         "paper": {"seeds": 5, "benchmarks": ["a"], "methods": ["m"], "lr": 0.01, "steps": 300}}


def test_check_table_enforces_the_common_schema():
    assert profiles.check_table("x", TABLE) is TABLE
    with pytest.raises(ValueError, match="lacks the common setting 'methods'"):
        profiles.check_table("x", {p: {"seeds": 1, "benchmarks": []} for p in profiles.PROFILES})
    with pytest.raises(ValueError, match="'seeds' must be int"):
        profiles.check_table("x", {**TABLE, "cpu": {**TABLE["cpu"], "seeds": [0, 1]}})
    with pytest.raises(ValueError, match=r"lacks \['paper'\]"):
        profiles.check_table("x", {"smoke": TABLE["smoke"], "cpu": TABLE["cpu"]})


@pytest.mark.parametrize("override, message", [
    ({"methods": "magmaxx"}, "'methods'.*expects list.*got str 'magmaxx'.*methods: \\[magmaxx\\]"),
    ({"steps": 2.5}, "'steps'.*expects int"),
    ({"seeds": -1}, "'seeds' must be at least 1"),
    ({"stpes": 3}, "unknown setting 'stpes'"),
])
def test_select_rejects_overrides_of_the_wrong_kind(override, message):
    with pytest.raises(ValueError, match=message):
        profiles.select(TABLE, "smoke", **override)


def test_select_applies_overrides_and_seed_list_counts_from_the_first_seed():
    row = profiles.select(TABLE, "cpu", lr=1, methods=["n"], steps=None)
    assert row["lr"] == 1 and row["methods"] == ["n"] and row["steps"] == 30
    assert profiles.seed_list(2, 3) == [2, 3, 4]
    with pytest.raises(ValueError, match="non-negative"):
        profiles.seed_list(-1, 2)


# ----------------------------------------------------------------------------------- verdicts
CLAIM = verdicts.Claim("c1", "A beats B", "+3 points", "paper Table 1", "paired gap A − B > 0")


def test_paired_gap_interval_matches_student_t():
    mean, (lo, hi) = verdicts.paired_gap_interval([0.01, 0.03, 0.02])
    assert mean == pytest.approx(0.02) and lo == pytest.approx(0.02 - 4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)
    assert verdicts.paired_gap_interval([0.5]) == (0.5, None)
    with pytest.raises(ValueError, match="finite"):
        verdicts.paired_gap_interval([float("nan"), 1.0])


@pytest.mark.parametrize("gaps, direction, expected", [
    ([0.05, 0.06, 0.055], 1, verdicts.SUPPORTED),
    ([-0.05, -0.06, -0.055], 1, verdicts.NOT_SUPPORTED),
    ([-0.05, -0.06, -0.055], -1, verdicts.SUPPORTED),
    ([0.05, -0.04, 0.01], 1, verdicts.INCONCLUSIVE),
    ([0.05], 1, verdicts.INCONCLUSIVE),
])
def test_judge_gap_needs_the_interval_on_the_claimed_side(gaps, direction, expected):
    judged = verdicts.judge_gap(CLAIM, gaps, direction)
    assert judged.verdict == expected and judged.supported == {verdicts.SUPPORTED: True,
                                                               verdicts.NOT_SUPPORTED: False}.get(expected)


def test_min_effect_must_be_cleared_by_the_whole_interval():
    assert verdicts.judge_gap(CLAIM, [0.011, 0.012, 0.013], min_effect=0.02).verdict == verdicts.INCONCLUSIVE


def test_paired_bootstrap_brackets_the_gap_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, 400) for _ in range(3)]
    a = [np.where(rng.random(400) < 0.7, y, (y + 1) % 4) for y in labels]  # ~70 % correct
    b = [np.where(rng.random(400) < 0.5, y, (y + 1) % 4) for y in labels]  # ~50 % correct
    est, (lo, hi) = verdicts.paired_bootstrap_metric(a, b, labels, n_boot=500, seed=1)
    assert lo < est < hi and lo > 0.05
    assert verdicts.paired_bootstrap_metric(a, b, labels, n_boot=500, seed=1) == (est, (lo, hi))
    with pytest.raises(ValueError, match="paired"):
        verdicts.paired_bootstrap_metric([a[0]], [b[0][:10]], [labels[0]])


def test_write_verdict_records_words_counts_and_rejects_unknown(tmp_path):
    claims = [verdicts.judge_gap(CLAIM, [0.05, 0.06, 0.055]), verdicts.not_testable(CLAIM, "joint at floor"),
              verdicts.not_run(CLAIM, "needs a GPU")]
    out = verdicts.write_verdict(tmp_path / "v.json", "P", "ch", claims, "s", "make book")
    assert out["counts"][verdicts.SUPPORTED] == 1 and out["claims"][1]["verdict"] == verdicts.NOT_TESTABLE
    assert out["claims"][0]["claim"] == "A beats B" and out["claims"][0]["supported"] is True
    assert "→ supported" in verdicts.verdict_lines(claims)[0]
    with pytest.raises(ValueError, match="unknown verdict"):
        verdicts.write_verdict(tmp_path / "w.json", "P", "ch", [verdicts.Claim("x", "t", 1, "s", "c", verdict="maybe")],
                               "s", "r")
    assert not (tmp_path / "w.json").exists()


# ----------------------------------------------------------------------------------- regime
def test_a_regime_at_the_floor_fails_and_says_which_numbers():
    labels = np.array([0] * 60 + [1] * 20 + [2] * 20)
    R_floor = [[0.34, np.nan], [0.30, 0.33]]
    reg = regime.continual_regime("toy", num_classes=3, test_labels=labels, joint_recall=0.36,
                                  seqft_R=R_floor, task_classes=[[0, 1], [2]], theta0_recall=1 / 3)
    assert not reg.passed
    text = reg.failing()
    assert "joint mean class recall" in text and "seq-ft forgetting" in text
    assert set(reg.table()["result"]) == {"FAIL", "(reported)"}


def test_an_informative_regime_passes():
    labels = np.repeat(np.arange(4), 25)
    R = [[0.9, np.nan], [0.2, 0.9]]
    tvs = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    reg = regime.continual_regime("toy", num_classes=4, test_labels=labels, joint_recall=0.8, seqft_R=R,
                                  task_classes=[[0, 1], [2, 3]], task_aware_R=[[0.95, np.nan], [0.6, 0.95]],
                                  task_vectors=tvs)
    assert reg.passed, reg.table()
    geo = regime.task_vector_geometry(tvs)
    assert geo["mean_pairwise_cosine"] == pytest.approx(0.0) and geo["norms"] == [1.0, 1.0]


def test_paired_bootstrap_metric_recall_matches_balanced_accuracy_and_is_paired():
    from sklearn.metrics import balanced_accuracy_score
    y = np.repeat([0, 1, 2], [300, 30, 30])  # imbalanced: recall is not accuracy
    a, b = y.copy(), y.copy()
    a[300:315] = 0           # a misses half of class 1
    b[:] = 0                 # b: the majority predictor
    est, (lo, hi) = verdicts.paired_bootstrap_metric([a], [b], [y], "mean_class_recall", n_boot=500)
    assert est == pytest.approx(balanced_accuracy_score(y, a) - balanced_accuracy_score(y, b))
    assert lo <= est <= hi and lo > 0
    acc, _ = verdicts.paired_bootstrap_metric([a], [b], [y], "accuracy", n_boot=200)
    assert acc == pytest.approx(np.mean(a == y) - np.mean(b == y))
    with pytest.raises(ValueError, match="unknown metric 'f1'; valid: accuracy, mean_class_recall"):
        verdicts.paired_bootstrap_metric([a], [b], [y], "f1")
    with pytest.raises(ValueError, match="one prediction array per unit"):
        verdicts.paired_bootstrap_metric([a, a], [b], [y])


def test_shift_gap_and_combine_scenarios():
    c = verdicts.Claim("c", "a beats b", 1, "src", "a − b > 0")
    near = verdicts.judge_gap(c, [-0.01, -0.011, -0.012])  # clearly below 0, within a 2-point margin
    assert near.verdict == verdicts.NOT_SUPPORTED
    assert verdicts.shift_gap(near, 0.02).verdict == verdicts.SUPPORTED
    assert verdicts.shift_gap(near, 0.02).interval == near.interval  # shown as measured
    up = verdicts.judge_gap(c, [0.05, 0.06, 0.055])
    failing = verdicts.not_testable(c, "s3: joint = 0.1 (needs >= 0.2)")
    both = verdicts.combine_scenarios(c, {"s1": up, "s2": near, "s3": failing})
    assert both.verdict == verdicts.NOT_SUPPORTED and "s3: joint = 0.1" in both.ours
    assert verdicts.combine_scenarios(c, {"s1": up, "s3": failing}).verdict == verdicts.SUPPORTED
    assert verdicts.combine_scenarios(c, {"s3": failing}).verdict == verdicts.NOT_TESTABLE
    assert verdicts.combine_scenarios(c, {"s1": verdicts.not_run(c, "no data")}).verdict == verdicts.NOT_RUN
