"""MedMerge chapter: configuration, the kernel-weight probe, baselines, determinism, paper profile,
and the notebook on a dataset the book has never seen."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from timm.models.resnet import BasicBlock, ResNet

from cmm_utils.papers.medmerge import claims as mc, method as mm, profiles as prof, sources as src, tables as tab, training as tr
from cmm_utils.core.data import LabeledImages
from cmm_utils.papers.medmerge.kernel_merge import KernelMergedConv2d
from cmm_utils.core.models import Classifier, build_backbone

REPO = Path(__file__).resolve().parents[1]


def tiny_backbone(seed):
    torch.manual_seed(seed)
    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=0, channels=(8, 8, 16, 16), stem_type="deep", stem_width=4)


def tiny_data(n=24, size=16, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return LabeledImages((torch.rand(n, 3, size, size, generator=gen) * 255).to(torch.uint8),
                         torch.arange(n) % classes)


PROBE_CFG = {"lp_epochs": 1, "lp_lr": 1e-2, "w_lr": 0.05, "batch_size": 8, "optimizer_lp": "adam",
             "max_steps": 2, "other_params": "a"}


def test_configure_applies_parameters_and_rejects_bad_values(tmp_path):
    cfg = prof.configure("cpu", 3)
    assert cfg["seed_list"] == (3, 4, 5) and cfg["seeds"] == 3 and len(cfg["runs"]) == 3
    one = prof.configure("cpu", 0, target=str(tmp_path / "x.npz"), backbone="resnet18", source_medical="pathmnist_1k")
    assert one["runs"] == (("resnet18", "pathmnist_1k", str(tmp_path / "x.npz")),)
    paper = prof.configure("paper")
    assert {r[2] for r in paper["runs"]} == {"isic2019", "aptos2019"}
    assert {r[0] for r in paper["runs"]} == {"resnet18", "densenet121", "resnet50"}  # ResNet-18: the paper's Fig. 2
    assert dict((t, m) for _, m, t in paper["runs"]) == {"isic2019": "ham10000_full", "aptos2019": "eyepacs"}
    small = prof.configure("smoke", max_per_split=10)
    assert len(src.load_target("pathmnist_1k", 0, small).train) == 10
    assert len(src.load_target("pathmnist_1k", 0, small, max_per_split=None).train) > 500  # sources: uncapped
    with pytest.raises(ValueError, match="profile"):
        prof.configure("gpu")
    with pytest.raises(ValueError, match="backbone 'vit_tiny'"):
        prof.configure("smoke", backbone="vit_tiny")
    with pytest.raises(ValueError, match="merge baseline"):
        prof.configure("smoke", methods=[*prof.ALWAYS_RUN, "fisher"])
    with pytest.raises(ValueError, match="always run"):
        prof.configure("smoke", methods=["average"])
    with pytest.raises(ValueError, match="unknown setting"):
        prof.configure("smoke", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown merge"):
        tr.merge_models("slerp", None, None, None, {}, 0)


def test_zero_convolutions_zeroes_kernels_only():
    bb = tiny_backbone(0)
    z = src.zero_convolutions(bb)
    for (name, a), (_, b) in zip(bb.state_dict().items(), z.state_dict().items()):
        if name.endswith("weight") and a.dim() == 4:
            assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("learn_w", [True, False])
def test_kernel_merge_probe_trains_head_and_w_only_and_collapses_exactly(learn_w):
    a, b = tiny_backbone(0), tiny_backbone(1)
    data = tiny_data()
    plain, w = tr.kernel_merge_probe(a, b, 3, data, PROBE_CFG, seed=0, init=0.5, learn_w=learn_w)
    assert not any(isinstance(m, KernelMergedConv2d) for m in plain.modules())
    sa, sb, sp = a.state_dict(), b.state_dict(), plain.state_dict()
    moved = 0.0
    for layer, wl in w.items():
        key = layer.removeprefix("backbone.") + ".weight"
        expect = wl[:, :, None, None] * sa[key] + (1 - wl[:, :, None, None]) * sb[key]
        assert torch.allclose(sp["backbone." + key], expect, atol=1e-6), layer
        moved = max(moved, float((wl - 0.5).abs().max()))
    assert (moved > 0) == learn_w
    for key, va in sa.items():  # BN affine parameters: model a's, frozen (statistics are recomputed)
        if key.endswith(("bn1.weight", "bn1.bias", "bn2.bias")):
            assert torch.equal(sp["backbone." + key], va), key


def test_merge_models_give_working_networks():
    data = tiny_data(16)
    ma, mb = Classifier(tiny_backbone(0), 3), Classifier(tiny_backbone(1), 3)
    cfg = {"wm_iters": 5, "match_images": 16, "zipit_alpha": 0.3, "zipit_beta": 0.125}
    for method in prof.MERGES:
        merged = tr.merge_models(method, ma, mb, data, cfg, seed=0)
        scores = tr.evaluate(merged, data)
        assert 0 <= scores["accuracy"] <= 1 and np.isnan(scores["kappa"])
    avg = tr.merge_models("average", ma, mb, data, cfg, seed=0).state_dict()
    k = "backbone.layer1.0.conv1.weight"
    assert torch.allclose(avg[k], (ma.state_dict()[k] + mb.state_dict()[k]) / 2)


def test_paper_profile_builds_and_runs_one_probe_step_at_224px():
    """The paper profile's backbones (random init instead of ImageNet weights) and one step of the
    kernel-weight linear probe on two 224 px images; a guard against rot of the GPU path."""
    cfg = dict(prof.configure("paper"), max_steps=1, batch_size=2)
    data = tiny_data(n=2, size=cfg["image_size"], classes=2)
    for arch in sorted({r[0] for r in cfg["runs"]}):
        a = build_backbone(arch, scale="paper", image_size=224)
        b = build_backbone(arch, scale="paper", image_size=224)
        plain, w = tr.kernel_merge_probe(a, b, 8, data, cfg, seed=0)
        assert len(w) == sum(isinstance(m, torch.nn.Conv2d) for m in a.modules())
        assert plain(torch.zeros(1, 3, 224, 224)).shape == (1, 8)


def _tiny_run(monkeypatch, cache, npz):
    monkeypatch.setenv("CMM_CACHE", str(cache))
    cfg = prof.configure("smoke", 0, target="retinamnist", source_natural=str(npz), source_medical="pathmnist_1k",
                       max_per_split=32, source_max_per_split=48, match_images=16, wm_iters=3)
    cfg["max_steps"] = 2
    out = mm.run_experiment("resnet18", "pathmnist_1k", "retinamnist", 0, cfg, ablations=prof.ABLATIONS[3:], verbose=False)
    return pd.DataFrame(out["results"]), pd.DataFrame(out["weights"])


def test_same_parameters_give_identical_tables_and_a_rerun_resumes_from_cache(tmp_path, unseen_npz, monkeypatch):
    r1, w1 = _tiny_run(monkeypatch, tmp_path / "one", unseen_npz)
    r2, w2 = _tiny_run(monkeypatch, tmp_path / "two", unseen_npz)
    pd.testing.assert_frame_equal(r1, r2)
    pd.testing.assert_frame_equal(w1, w2)
    files = sorted(p.name for p in (tmp_path / "one" / "medmerge" / "runs").glob("*.safetensors"))
    r3, _ = _tiny_run(monkeypatch, tmp_path / "one", unseen_npz)  # everything loaded from the cache
    assert sorted(p.name for p in (tmp_path / "one" / "medmerge" / "runs").glob("*.safetensors")) == files
    pd.testing.assert_frame_equal(r1, r3)
    assert set(r1["method"]) >= {"ft_natural", "lpft_medical", "zipit", "medmerge", "zeros", "medmerge_lp"}
    assert r1[["accuracy", "macro_f1"]].apply(lambda c: c.between(0, 1)).all().all()
    assert r1["kappa"].notna().all()  # RetinaMNIST is graded: quadratic kappa reported


def test_gaps_name_the_best_baseline_and_count_seeds_won():
    rows = []
    for s in range(3):
        for m, f1 in (("ft_natural", 0.50), ("ft_medical", 0.55), ("medmerge", 0.58 + 0.01 * s)):
            rows.append({"arch": "r", "target": "t", "seed": s, "method": m, "macro_f1": f1})
    g = tab.gaps(pd.DataFrame(rows), "medmerge", prof.FT_BASELINES)
    assert g.loc[0, "best baseline"] == prof.METHOD_LABELS["ft_medical"]
    assert abs(g.loc[0, "gap (points)"] - 4.0) < 1e-9 and g.loc[0, "seeds won"] == 3


@pytest.mark.timeout(900)
def test_notebook_runs_on_an_unseen_dataset(tmp_path, unseen_npz, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "medmerge.ipynb"), str(out),
                               parameters=dict(profile="smoke", target=str(unseen_npz)),
                               cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
    text = out.read_text()
    assert "digits_unseen" in text and "MedMerge" in text and "macro F1" in text
    res = tmp_path / "results" / "smoke" / "medmerge"
    verdict = json.loads((res / "verdict.json").read_text())
    assert verdict["chapter"] == "medmerge" and verdict["claims"]
    table = pd.read_csv(res / "results.csv")
    assert set(table["target"]) == {"digits_unseen"}
    assert (res / "plane_medmerge.npz").exists() and (res / "kernel_weights.csv").exists()


def test_profiles_pass_the_common_schema():
    from cmm_utils.core.profiles import check_table
    check_table("medmerge", prof.PROFILES)
    for row in prof.PROFILES.values():
        assert all(prof.parse_benchmark(b) for b in row["benchmarks"]) and set(row["methods"]) <= set(prof.METHODS)
    assert prof.parse_benchmark("resnet18:ham10000->/x/y.npz") == ("resnet18", "ham10000", "/x/y.npz")
    with pytest.raises(ValueError, match="benchmark"):
        prof.parse_benchmark("resnet18-ham10000")


def test_run_returns_a_one_task_result_and_reads_the_cache_the_second_time(tmp_path, monkeypatch):
    from cmm_utils.core.continual import ContinualResult
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    calls = []

    def fake_experiment(arch, medical, target, seed, cfg, **kw):
        calls.append((arch, medical, target, seed))
        rows = [{"arch": arch, "medical": medical, "target": target, "seed": seed, "method": m, "stage": "final",
                 "accuracy": 0.5, "macro_f1": 0.4, "kappa": float("nan")} for m in ("ft_natural", "medmerge")]
        return {"results": rows, "weights": [], "states": {}, "mean_class_recall": {"ft_natural": 0.3, "medmerge": 0.35}}

    monkeypatch.setattr(mm, "run_experiment", fake_experiment)
    first = mm.run("medmerge", "resnet18:ham10000->retinamnist", "smoke", 0)
    assert isinstance(first, ContinualResult) and first.R == [[0.5]] and first.acc_seen == [0.5]
    assert first.extra["mean_class_recall"] == 0.35 and first.extra["macro_f1"] == 0.4
    again = mm.run("medmerge", "resnet18:ham10000->retinamnist", "smoke", 0)
    other = mm.run("ft_natural", "resnet18:ham10000->retinamnist", "smoke", 0)  # cached by the first call
    assert len(calls) == 1 and again.extra["mean_class_recall"] == 0.35 and other.extra["mean_class_recall"] == 0.3
    assert np.isnan(again.extra["kappa"])  # not graded: no kappa
    with pytest.raises(ValueError, match="unknown method"):
        mm.run("slerp", "resnet18:ham10000->retinamnist", "smoke", 0)


def _claim_inputs(medmerge_f1):
    rows = []
    for s in range(3):
        for m, f1 in (("ft_natural", 0.50), ("ft_medical", 0.55), ("lpft_natural", 0.5), ("lpft_medical", 0.5),
                      ("average", 0.3), ("zeros", 0.45), ("medmerge", medmerge_f1 + 0.01 * s)):
            rows.append({"arch": "r", "target": "t", "medical": "h", "seed": s, "method": m, "stage": "final",
                         "macro_f1": f1, "accuracy": f1, "kappa": float("nan")})
    results = pd.DataFrame(rows)
    weights = pd.DataFrame([{"arch": "r", "seed": s, "variant": v, "depth": d, "mean_w": 0.5 + 0.01 * d, "std_w": 0.1,
                             "target": "t"} for s in range(3) for v in ("medmerge", "zeros") for d in range(3)])
    depth = tab.depth_summary(weights)
    return mc.judge_claims(results, tab.gap_tables(results, ["average"]), depth,
                           tab.largest_layer_shift(weights, 0.5), 0.5, 2.0, 0.5)


def test_claims_supported_and_not_supported_on_hand_made_frames():
    good = {c.id: c.verdict for c in _claim_inputs(0.60)}
    assert good["macro_f1_vs_fine-tuning"] == "supported" and good["medical_source_helps"] == "supported"
    assert good["open_choices"] == "supported" and good["layer_patterns"] == "inconclusive"
    bad = {c.id: c.verdict for c in _claim_inputs(0.40)}
    assert bad["macro_f1_vs_fine-tuning"] == "not supported" and bad["macro_f1_vs_lp-ft"] == "not supported"
