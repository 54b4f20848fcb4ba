"""MedMerge's regime check, interval verdicts and controls (issue 12): a floor-level run is not
testable, an informative one is judged with a 95 % interval; the global / per-layer interpolation
and the output ensemble do what their names say."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cmm_utils.papers.medmerge import claims as mc, profiles as prof, regime as mr, tables as tab
from cmm_utils.papers.medmerge.controls import OutputEnsemble
from cmm_utils.papers.medmerge.kernel_merge import KernelMergedConv2d, kernel_weights, tie_merge_weights, \
    wrap_kernel_merge

LABELS = np.array([0] * 6 + [1] * 2 + [2] * 2)   # majority share 0.6, three classes


def test_macro_f1_floor_is_the_better_trivial_predictor():
    f = mr.macro_f1_floor(LABELS, 3)
    assert f["chance"] == pytest.approx(1 / 3) and f["majority"] == pytest.approx(0.6)
    assert f["majority_f1"] == pytest.approx(1.2 / (1.6 * 3))                    # 2m / ((1 + m) C)
    assert f["random_f1"] == pytest.approx(np.mean([1.2 / 2.8, 0.4 / 1.6, 0.4 / 1.6]))
    assert f["floor_f1"] == pytest.approx(f["random_f1"])
    with pytest.raises(ValueError, match="no test labels"):
        mr.macro_f1_floor(np.array([], dtype=int), 3)


def results(medmerge=0.70, ft=(0.60, 0.62), lp=(0.45, 0.45), gaps=(4.0, 5.0, 6.0), arch="r", target="t"):
    """Hand-made ``results.csv`` rows for one backbone/target and 3 seeds: MedMerge = the better FT
    (ft_medical) + ``gaps`` points per seed."""
    rows = []
    for s in range(3):
        f1 = {"ft_natural": ft[0], "ft_medical": ft[1], "lpft_natural": ft[0], "lpft_medical": ft[1],
              "average": 0.3, "zeros": 0.5, "ensemble": ft[1], "interp_global": ft[1], "interp_layer": ft[1],
              "medmerge": ft[1] + gaps[s] / 100, "lp_natural": lp[0], "lp_medical": lp[1]}
        for m, v in f1.items():
            rows.append({"arch": arch, "target": target, "medical": "h", "seed": s, "method": m,
                         "stage": "probe" if m.startswith("lp_") else "final", "macro_f1": v, "accuracy": v,
                         "kappa": float("nan")})
    return pd.DataFrame(rows)


def judged(res, regimes):
    weights = pd.DataFrame([{"arch": a, "seed": s, "variant": v, "depth": d, "mean_w": 0.5, "std_w": 0.1, "target": t}
                            for a, t in set(zip(res.arch, res.target)) for s in range(3)
                            for v in ("medmerge", "zeros") for d in range(2)])
    return {c.id: c for c in mc.judge_claims(res, tab.gap_tables(res, ["average"]), tab.depth_summary(weights),
                                             tab.largest_layer_shift(weights, 0.5), 0.5, 2.0, 0.5, regimes)}


def test_floor_level_run_is_not_testable():
    res = results(ft=(0.33, 0.34), lp=(0.30, 0.31))      # FT and both probes at the macro-F1 floor (0.31)
    regime = mr.run_regime("r/t", res, LABELS, 3)
    assert not regime.passed
    for check in ("FT from the better source", "LP on source a alone", "LP on source b alone"):
        assert check in regime.failing(), check
    out = judged(res, {("r", "t"): regime})
    for cid in ("macro_f1_vs_fine-tuning", "medical_source_helps", "kernel_weights_matter", "merge_vs_ensemble"):
        assert out[cid].verdict == "not testable here" and "LP on source a alone" in out[cid].ours, cid
    assert "not testable here" in mc.summary("cpu", 3, tab.gap_tables(res, ["average"]), list(out.values()))


def test_informative_run_is_judged_with_intervals():
    res = results()
    regime = mr.run_regime("r/t", res, LABELS, 3)
    assert regime.passed, regime.failing()
    assert (mr.regime_frame({("r", "t"): regime})["result"] != "FAIL").all()
    out = judged(res, {("r", "t"): regime})
    half = 4.302653 / np.sqrt(3)                                     # t(0.975, 2) x sd 1 / sqrt(3)
    head = out["macro_f1_vs_fine-tuning"]
    assert head.estimate == pytest.approx(5.0) and head.interval == pytest.approx((5 - half, 5 + half))
    assert head.verdict == "supported"
    assert out["medical_source_helps"].estimate == pytest.approx(7.0)   # against the natural source alone (0.60)
    assert out["kernel_weights_matter"].verdict == "supported" and out["merge_vs_ensemble"].verdict == "supported"
    flat = judged(results(gaps=(-1.0, 0.0, 1.0)), {("r", "t"): regime})
    assert flat["macro_f1_vs_fine-tuning"].verdict == "inconclusive"
    worse = judged(results(gaps=(-3.0, -4.0, -5.0)), {("r", "t"): regime})
    assert worse["macro_f1_vs_fine-tuning"].verdict == "not supported"


def test_only_runs_that_pass_their_regime_count():
    res = pd.concat([results(), results(ft=(0.33, 0.34), lp=(0.30, 0.31), gaps=(-30.0, -30.0, -30.0), target="u")])
    regimes = mr.chapter_regime(res, {("r", "t"): (LABELS, 3), ("r", "u"): (LABELS, 3)})
    assert regimes[("r", "t")].passed and not regimes[("r", "u")].passed
    head = judged(res, regimes)["macro_f1_vs_fine-tuning"]
    assert head.estimate == pytest.approx(5.0) and head.verdict == "supported"
    assert "Left out" in head.note and "r/u" in head.note


def test_regime_needs_both_sources_runs():
    res = results()
    with pytest.raises(ValueError, match=r"needs the runs of \['lp_medical'\]"):
        mr.run_regime("r/t", res[res.method != "lp_medical"], LABELS, 3)


def _two_convs(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_global_and_per_layer_weights_are_tied():
    a, b = _two_convs(0), _two_convs(1)
    glob = tie_merge_weights(wrap_kernel_merge(a, b, init=0.3), "global")
    names = [n for n, _ in glob.named_parameters() if n.endswith("w_raw")]
    assert names == ["0.w_raw", "0.bias_w_raw"]                          # one kernel weight, one bias weight, shared
    assert sum(p.numel() for n, p in glob.named_parameters() if "w_raw" in n) == 2
    convs = [m for m in glob.modules() if isinstance(m, KernelMergedConv2d)]
    assert convs[0].w_raw is convs[1].w_raw
    with torch.no_grad():
        convs[0].w_raw.fill_(0.25)
    expected = 0.25 * a[2].weight + 0.75 * b[2].weight                  # one weight for every kernel of every layer
    assert torch.allclose(convs[1].merged_weight(), expected)
    layer = tie_merge_weights(wrap_kernel_merge(a, b, init=0.3), "layer")
    w = kernel_weights(layer)
    assert [tuple(v.shape) for v in w.values()] == [(1, 1), (1, 1)] and all(float(v) == pytest.approx(0.3) for v in w.values())
    per_layer = [m for m in layer.modules() if isinstance(m, KernelMergedConv2d)]
    assert per_layer[0].w_raw is not per_layer[1].w_raw
    kernel = wrap_kernel_merge(a, b)
    assert tie_merge_weights(kernel, "kernel") is kernel and kernel_weights(kernel)["0"].shape == (4, 3)
    with pytest.raises(ValueError, match="unknown granularity 'channel'; valid: kernel, layer, global"):
        tie_merge_weights(kernel, "channel")


def test_output_ensemble_averages_probabilities():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    x = torch.randn(8, 5)
    out = OutputEnsemble(a, b)(x)
    expected = (a(x).softmax(1) + b(x).softmax(1)) / 2
    assert torch.allclose(out.exp(), expected, atol=1e-6) and torch.allclose(out.exp().sum(1), torch.ones(8))


def test_controls_are_chapter_methods():
    for m in ("ensemble", "interp_global", "interp_global_lp", "interp_layer", "interp_layer_lp"):
        assert m in prof.METHODS and m in prof.PROFILES["smoke"]["methods"] and m in prof.PROFILES["cpu"]["methods"]
    assert {"ensemble", "interp_global", "interp_layer"} <= set(tab.ORDER)
