"""The CMM chapter's tables and artifacts (``notebooks/cmm.ipynb`` calls these; the plots stay in
the notebook and read the artifacts written here under ``results/<profile>/cmm/``).

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). Every run is :func:`cmm_utils.papers.cmm.run`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cmm_utils.core.benchmarks import BACKBONE, BENCHMARKS, load_benchmark
from cmm_utils.core.continual import gflops_per_image, load_cached_runs
from cmm_utils.core.data import DataError, Scenario
from cmm_utils.core.io import atomic_path, results_dir, write_csv
from cmm_utils.core.plots import mean_std_table
from cmm_utils.core.profiles import select, seed_list
from cmm_utils.core.train import to_float
from cmm_utils.papers.cmm import figures
from cmm_utils.papers.cmm.encoders import pretrained_encoder
from cmm_utils.papers.cmm.linearize import LinearizedModel
from cmm_utils.papers.cmm.profiles import CHAPTER, IMAGE_SIZE, PROFILES
from cmm_utils.papers.cmm.runs import load_scenario, majority_reference, run

LABELS = {"cmm": "CMM (full)", "cmm-no-linear": "− linearisation (standard FT)",
          "cmm-no-fisher": "− optimizer-state weighting (plain interpolation)",
          "cmm-no-correction": "− post-merging correction", "seq-ft": "sequential fine-tuning",
          "average": "averaging (seq-FT task vectors)", "magmax": "MagMax (seq-FT task vectors)"}
METRICS = ["final_acc", "mean_class_recall", "avg_incremental_acc", "final_task_avg_acc", "forgetting"]
# What a benchmark may lack on a machine: a dataset file under CMM_DATA (DataError names it and how
# to get it) or a weights file (core.models.weights.WeightsNotFound, a FileNotFoundError, names it)
MISSING_INPUTS = (DataError, FileNotFoundError)


@dataclass
class Chapter:
    """One execution of the chapter: its settings, seeds, scenario name and the loaded scenarios."""
    profile: str
    settings: dict
    overrides: dict
    seeds: list
    name: str
    out: Path
    scenarios: dict
    skipped: dict = field(default_factory=dict)  # benchmark -> "skipped: <what is missing>"

    @property
    def first(self) -> Scenario:
        return self.scenarios[self.seeds[0]]


def open_chapter(profile: str, seed: int, dataset=None, n_tasks=None, alpha=None, correction_loss=None,
                 representation_lr=None) -> Chapter:
    """The notebook's parameters as a :class:`Chapter` (profile row, overrides, scenarios per seed)."""
    S = select(PROFILES, profile, dataset=dataset, n_tasks=n_tasks, alpha=alpha,
               correction_loss=correction_loss, representation_lr=representation_lr)
    overrides = {k: v for k, v in dict(alpha=alpha, correction_loss=correction_loss,
                                       representation_lr=representation_lr).items() if v is not None}
    seeds = seed_list(seed, S["seeds"])
    name = S["dataset"] if S["dataset"] in BENCHMARKS else f"{Path(str(S['dataset'])).stem}-cil{S['n_tasks']}"
    scenarios = {s: load_scenario(S["dataset"], profile, s, S["n_tasks"], S["max_per_split"], S["image_size"])
                 for s in seeds}
    return Chapter(profile, S, overrides, seeds, name, results_dir(profile, CHAPTER), scenarios)


def describe(ch: Chapter) -> pd.DataFrame:
    """Prints the run's settings; returns the first seed's tasks."""
    S, sc0 = ch.settings, ch.first
    print(f"profile={ch.profile} seeds={ch.seeds} scenario={ch.name} ({sc0.kind}, {len(sc0.tasks)} tasks, "
          f"{sc0.num_classes} classes) backbone={S['backbone']} head={S['head']}")
    print({k: S[k] for k in ("alpha", "correction_loss", "representation_lr", "lr", "epochs", "batch_size",
                             "max_train_per_task", "max_steps")})
    return pd.DataFrame([{"task": t.index + 1, "classes": ", ".join(sc0.class_names[c] for c in t.classes),
                          "train": len(t.train), "test": len(t.test)} for t in sc0.tasks])


def linearisation(ch: Chapter) -> tuple[dict, dict, pd.DataFrame]:
    """``(check, flops, table)``: the linearisation's numerical checks on 8 test images and the
    GFLOPs per image of the network and of its linearisation."""
    encoder0 = pretrained_encoder(ch.settings["backbone"], ch.profile)[0]
    x = to_float(ch.first.tasks[0].test.images[:8])
    check = figures.linearization_check(encoder0, x)
    flops = {"standard": gflops_per_image(encoder0, IMAGE_SIZE[ch.profile]),
             "linearised": gflops_per_image(LinearizedModel(encoder0), IMAGE_SIZE[ch.profile])}
    table = pd.DataFrame([
        {"check": "max |f_lin(θ0) − f(θ0)|", "value": check["at_theta0"]},
        {"check": "max deviation of f_lin(θ0 + aΔ) from a line in a", "value": check["affine"]},
        {"check": "  (size of the change J·Δ, for scale)", "value": check["affine_scale"]},
        {"check": "relative error of finite differences vs J·Δ", "value": check["fd_rel"]},
        {"check": "GFLOPs per image, standard network", "value": flops["standard"]},
        {"check": "GFLOPs per image, linearised network", "value": flops["linearised"]},
    ])
    return check, flops, table


def _row(result, **keys) -> dict:
    return {**keys, **{k: v for k, v in result.summary().items() if k != "method"},
            "mean_class_recall": result.extra.get("mean_class_recall", float("nan"))}


def run_methods(ch: Chapter) -> tuple[dict, pd.DataFrame]:
    """Every method of the profile on the chapter's scenario for every seed (``runs_<name>.csv``,
    ``R_<name>.npz``); the first seed's CMM and CMM-without-linearisation keep the figures' states."""
    results, rows = {}, []
    for s in ch.seeds:
        for m in ch.settings["methods"]:
            res = run(m, ch.name, ch.profile, s, scenario=ch.scenarios[s],
                      debug=(s == ch.seeds[0] and m in ("cmm", "cmm-no-linear")), **ch.overrides)
            results[(m, s)] = res
            rows.append(_row(res, method=m, seed=s))
    runs = pd.DataFrame(rows)
    write_csv(ch.out / f"runs_{ch.name}.csv", runs)
    with atomic_path(ch.out / f"R_{ch.name}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{f"{m}_seed{s}": np.asarray(r.R) for (m, s), r in results.items()})
    return results, runs


def majority(ch: Chapter) -> dict:
    return {s: majority_reference(ch.scenarios[s]) for s in ch.seeds}


def results_table(runs: pd.DataFrame, floor: dict) -> pd.DataFrame:
    """Mean ± std per method, GFLOPs and MB carried, and the majority-class reference row."""
    table = mean_std_table(runs, ["method"], METRICS)
    table.insert(1, "what", table["method"].map(LABELS))
    table["GFLOPs/img"] = runs.groupby("method", sort=False)["gflops"].mean().round(3).values
    table["MB carried"] = (runs.groupby("method", sort=False)["bytes_stored"].mean() / 2**20).round(1).values
    ref = pd.DataFrame([{"method": "majority class", "final_acc": m[-1], "avg_incremental_acc": np.mean(m)}
                        for m in floor.values()])
    ref_row = mean_std_table(ref, ["method"], ["final_acc", "avg_incremental_acc"])
    ref_row["what"] = "reference: always the most frequent seen class"
    return pd.concat([table.astype(object), ref_row.astype(object)], ignore_index=True).fillna("")


def memory_table(ch: Chapter, results: dict) -> pd.DataFrame:
    """MB carried after every task per method (first seed), and MagMax as released (``memory_<name>.csv``)."""
    s = ch.seeds[0]
    mem = {LABELS[m]: results[(m, s)].extra["bytes_per_task"] for m in ch.settings["methods"]}
    mem["MagMax as released (θ0 + every checkpoint)"] = results[("magmax", s)].extra["bytes_all_checkpoints"]
    memory = pd.DataFrame(mem, index=[f"after task {t + 1}" for t in range(len(ch.first.tasks))]).T / 2**20
    write_csv(ch.out / f"memory_{ch.name}.csv", memory.reset_index(names="method"))
    return memory


def ablation_table(ch: Chapter, results: dict, table: pd.DataFrame) -> pd.DataFrame:
    """CMM − each ablation, paired by seed, ± the standard error (``ablation_<name>.csv``)."""
    def paired(metric, a, b):
        d = np.array([results[(a, s)].summary()[metric] - results[(b, s)].summary()[metric] for s in ch.seeds])
        return d.mean(), d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0

    abl = []
    for m in ["cmm-no-linear", "cmm-no-fisher", "cmm-no-correction"]:
        d, se = paired("final_acc", "cmm", m)
        di, sei = paired("avg_incremental_acc", "cmm", m)
        abl.append({"ablation": LABELS[m], "final acc (%)": table.set_index("method").loc[m, "final_acc"],
                    "CMM − ablation, final acc (pts)": f"{100 * d:+.1f} ± {100 * se:.1f}",
                    "CMM − ablation, avg. incremental acc (pts)": f"{100 * di:+.1f} ± {100 * sei:.1f}"})
    ablation = pd.DataFrame(abl)
    write_csv(ch.out / f"ablation_{ch.name}.csv", ablation)
    return ablation


def run_benchmark(ch: Chapter, bench: str) -> list[dict] | str:
    """Every method on one book benchmark for every seed (result rows), or ``"skipped: <message>"``
    when its data (a file under ``CMM_DATA``) or its backbone's weights are missing here: both are
    loaded before anything runs, so a user with only the chapter's own dataset and weights (e.g.
    CLIP and CIFAR-100 in ``paper``) gets the rest of the page."""
    try:
        loaded = {s: ch.scenarios[s] if bench == ch.settings["dataset"] else load_benchmark(bench, ch.profile, s)
                  for s in ch.seeds}
        pretrained_encoder(BACKBONE, ch.profile)  # the benchmarks' backbone (``run`` picks it for them)
    except MISSING_INPUTS as err:
        return f"skipped: {bench}: {err}"
    return [_row(run(m, bench, ch.profile, s, scenario=loaded[s], **ch.overrides), benchmark=bench, method=m, seed=s)
            for s in ch.seeds for m in ch.settings["methods"]]


def benchmark_runs(ch: Chapter) -> pd.DataFrame:
    """Every method on the profile's book benchmarks for every seed (``benchmarks.csv``); a benchmark
    whose inputs are missing is skipped, its message kept in ``ch.skipped`` (the page lists them)."""
    rows = []
    for bench in ch.settings["benchmarks"]:
        got = run_benchmark(ch, bench)
        if isinstance(got, str):
            ch.skipped[bench] = got
            print(got)
            continue
        rows += got
    frame = pd.DataFrame(rows)
    if len(frame):
        write_csv(ch.out / "benchmarks.csv", frame)
    return frame


def magmax_chapter_runs(ch: Chapter) -> pd.DataFrame:
    """The MagMax chapter's cached runs on these benchmarks (read, never recomputed)."""
    return pd.DataFrame([{"benchmark": r["config"]["benchmark"], "method": r["config"]["method"],
                          "seed": r["config"]["seed"], "final_acc": r["result"]["acc_seen"][-1]}
                         for r in load_cached_runs(ch.profile, "magmax")
                         if r["config"].get("method") in ("magmax", "seq-ft", "average")
                         and r["config"].get("benchmark") in ch.settings["benchmarks"]])


def figure_artifacts(ch: Chapter, results: dict) -> None:
    """``interpolation_<name>.csv``, ``mismatch_<name>.csv`` and ``tsne_<name>.npz``, which the
    plotting cells read (``cmm_utils.papers.cmm.figures``)."""
    S, s0 = ch.settings, ch.seeds[0]
    grid = np.linspace(0, 1, S["alpha_grid"])
    curves = figures.interpolation_curves(ch.first, ch.profile, s0, grid, images=S["path_images"], **ch.overrides)
    write_csv(ch.out / f"interpolation_{ch.name}.csv", curves)
    mismatch = pd.DataFrame([{"seed": s, **rec} for s in ch.seeds for rec in results[("cmm", s)].extra["mismatch"]])
    write_csv(ch.out / f"mismatch_{ch.name}.csv", mismatch)
    emb = figures.tsne_embedding(ch.first, ch.profile, s0, images=S["tsne_images"], **ch.overrides)
    with atomic_path(ch.out / f"tsne_{ch.name}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **emb)
    print("artifacts:", sorted(p.name for p in ch.out.glob(f"*{ch.name}*")))


def claim_inputs(ch: Chapter, runs: pd.DataFrame, bench_runs: pd.DataFrame, floor: dict):
    """``(allruns, floors)`` for :func:`cmm_utils.papers.cmm.claims.judge_claims`: every run on
    every scenario, and the majority-class final accuracy of each scenario (mean over seeds)."""
    allruns = pd.concat([runs.assign(benchmark=ch.name),
                         bench_runs if len(bench_runs) else pd.DataFrame(columns=runs.columns.tolist() + ["benchmark"])],
                        ignore_index=True).drop_duplicates(["benchmark", "method", "seed"])
    floors = {ch.name: float(np.mean([m[-1] for m in floor.values()]))}
    for bench in ch.settings["benchmarks"]:
        if bench != ch.name and bench not in ch.skipped:
            floors[bench] = float(np.mean([majority_reference(load_benchmark(bench, ch.profile, s))[-1]
                                           for s in ch.seeds]))
    return allruns, floors


def earlier_task_accuracy(ch: Chapter, results: dict) -> list[float]:
    """CMM's accuracy on each earlier task after the last task, mean over seeds."""
    if len(ch.first.tasks) < 2:
        return []
    return list(np.mean([np.asarray(results[("cmm", s)].R)[-1, :-1] for s in ch.seeds], axis=0))
