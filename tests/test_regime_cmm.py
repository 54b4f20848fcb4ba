"""Issue 12 for the CMM chapter: the regime check and the claims' paired-bootstrap verdicts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmm_utils.core.verdicts import INCONCLUSIVE, NOT_RUN, NOT_SUPPORTED, NOT_TESTABLE, SUPPORTED
from cmm_utils.papers.cmm import claims as cmm_claims
from cmm_utils.papers.cmm import regime
from cmm_utils.papers.cmm.profiles import PROFILES

Y = np.tile(np.arange(4), 150)  # 4 classes, 600 test images
ABLATIONS = ("cmm-no-linear", "cmm-no-fisher", "cmm-no-correction")
COMPARED = ("competitive", "linearisation", "importance-merge", "correction")


def seed_numbers(joint: float, last_row: tuple, diag: float = 0.9) -> dict:
    return {"num_classes": 4, "task_classes": [[0, 1], [2, 3]], "test_labels": Y.tolist(), "theta0_recall": 0.4,
            "joint_recall": joint, "seqft_R": [[diag, np.nan], list(last_row)]}


def test_the_regime_fails_at_the_floor_and_passes_when_informative():
    floor = regime.scenario_regime("toy", [seed_numbers(0.3, (0.3, 0.3), diag=0.3)] * 2)
    assert not floor.passed
    assert "joint mean class recall = 0.3" in floor.failing() and "seq-ft forgetting" in floor.failing()
    informative = regime.scenario_regime("toy", [seed_numbers(0.8, (0.4, 0.9)), seed_numbers(0.78, (0.5, 0.88))])
    assert informative.passed, informative.failing()
    assert {"chance accuracy", "θ0 mean class recall", "seq-ft forgetting"} <= set(informative.table()["check"])
    with pytest.raises(ValueError, match="no regime numbers"):
        regime.scenario_regime("toy", [])


def hand_made(acc: dict[str, float], seeds=(0, 1, 2)):
    """Chapter frames on one scenario "toy": runs, per-image predictions with the given accuracy
    (each method right on its own random images),
    a mismatch log that the correction shrinks, constant bytes."""
    runs = pd.DataFrame([dict(benchmark="toy", method=m, seed=s, final_acc=a, mean_class_recall=a)
                         for s in seeds for m, a in acc.items()])
    preds = {}
    for s in seeds:
        preds[str(s)] = {"labels": Y.tolist()}
        for i, (m, a) in enumerate(acc.items()):  # each method errs on its own images
            order = np.random.default_rng([s, i]).permutation(Y.size)
            p = (Y + 1) % 4
            p[order[: int(a * Y.size)]] = Y[order[: int(a * Y.size)]]
            preds[str(s)][m] = p.tolist()
    mismatch = pd.DataFrame([dict(seed=s, task=1, data=d, stage=stage, l1=0.5 - 0.1 * (stage == "after"))
                             for s in seeds for d in ("current", "old") for stage in ("before", "after")])
    return runs, {"toy": preds}, mismatch


def judge(acc, regimes):
    runs, preds, mismatch = hand_made(acc)
    return {c.id: c for c in cmm_claims.judge_claims(runs, {"toy": 0.25}, [100, 100], mismatch, "l1", "toy",
                                                     regimes, preds)}


def test_claims_are_supported_or_not_by_the_interval_of_the_paired_gap():
    ok = {"toy": regime.scenario_regime("toy", [seed_numbers(0.8, (0.4, 0.9))])}
    good = judge({"cmm": 0.80, "magmax": 0.70, "average": 0.6, "seq-ft": 0.4, **{m: 0.6 for m in ABLATIONS}}, ok)
    for cid in COMPARED:
        c = good[cid]
        assert c.verdict == SUPPORTED and c.interval is not None and c.interval[0] > 0, (cid, c.ours)
    assert good["constant-memory"].verdict == SUPPORTED and good["paper-scale"].verdict == NOT_RUN
    bad = judge({"cmm": 0.55, "magmax": 0.80, "average": 0.6, "seq-ft": 0.4, **{m: 0.7 for m in ABLATIONS}}, ok)
    assert all(bad[cid].verdict == NOT_SUPPORTED for cid in COMPARED), {cid: bad[cid].ours for cid in COMPARED}
    # gaps of a point on 3 x 600 images with independent errors: the intervals straddle the bounds
    close = judge({"cmm": 0.70, "magmax": 0.71, "average": 0.6, "seq-ft": 0.4, **{m: 0.697 for m in ABLATIONS}}, ok)
    assert close["competitive"].verdict == INCONCLUSIVE and close["correction"].verdict == INCONCLUSIVE
    lo, hi = close["competitive"].interval
    assert lo < -cmm_claims.COMPETITIVE_MARGIN < hi


def test_claims_in_a_failing_regime_are_not_testable_with_the_failing_numbers():
    floor = {"toy": regime.scenario_regime("toy", [seed_numbers(0.3, (0.3, 0.3), diag=0.3)])}
    judged = judge({"cmm": 0.80, "magmax": 0.70, "average": 0.6, "seq-ft": 0.4, **{m: 0.6 for m in ABLATIONS}}, floor)
    for cid in COMPARED:
        assert judged[cid].verdict == NOT_TESTABLE and "joint mean class recall = 0.3" in judged[cid].ours
    assert judged["constant-memory"].verdict == SUPPORTED  # not a comparison of methods: judged anyway


def test_cpu_and_smoke_use_the_prototype_head():
    assert PROFILES["cpu"]["head"] == "prototype" and PROFILES["smoke"]["head"] == "prototype"
