"""One benchmark across all four papers' continual methods (none of the papers compares the others).

Every entry runs through its paper's ``run(method, benchmark, profile, seed)`` (the common
interface, :mod:`cmm_utils.papers`) with the paper's settings for the profile, on the book's shared
benchmarks (:mod:`cmm_utils.core.benchmarks`): when the chapter already ran the same configuration,
its cached result is read back instead of retraining.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from cmm_utils.core.continual import ContinualResult
from cmm_utils.core.profiles import check_table
from cmm_utils.papers import paper


@dataclass(frozen=True)
class Entry:
    label: str
    chapter: str
    method: str
    family: str


ENTRIES = (
    Entry("Sequential fine-tuning", "magmax", "seq-ft", "baseline"),
    Entry("Joint training (upper bound)", "magmax", "joint", "baseline"),
    Entry("Averaging", "magmax", "average", "weight merging"),
    Entry("Task arithmetic", "magmax", "task-arithmetic", "weight merging"),
    Entry("TIES", "magmax", "ties", "weight merging"),
    Entry("Random selection", "magmax", "random", "weight merging"),
    Entry("MagMax", "magmax", "magmax", "weight merging"),
    Entry("CMM", "cmm", "cmm", "weight merging"),
    Entry("CMM without linearisation", "cmm", "cmm-no-linear", "CMM ablation"),
    Entry("CMM without optimizer-state weighting", "cmm", "cmm-no-fisher", "CMM ablation"),
    Entry("CMM without correction", "cmm", "cmm-no-correction", "CMM ablation"),
    Entry("DynaMMo", "dynammo", "dynammo", "adapters + replay"),
    Entry("ACL", "dynammo", "acl", "adapters + replay"),
    Entry("DER (dynamically expandable representation)", "dynammo", "der", "expansion + replay"),
    Entry("Fine-tuning with replay (DynaMMo's baseline)", "dynammo", "finetune", "baseline"),
)
ALL = [f"{e.chapter}:{e.method}" for e in ENTRIES]
BOTH = ["ham10000-cil", "medical-dil"]
PROFILES = check_table("leaderboard", {
    "smoke": {"seeds": 1, "benchmarks": ["medical-dil"],
              "methods": ["magmax:seq-ft", "magmax:magmax", "cmm:cmm", "dynammo:dynammo", "dynammo:acl"]},
    "cpu": {"seeds": 3, "benchmarks": BOTH, "methods": ALL},
    "paper": {"seeds": 3, "benchmarks": BOTH, "methods": ALL},
})
METRICS = ["final_acc", "mean_class_recall", "avg_incremental_acc", "forgetting"]


def entries(methods: list[str] | None = None) -> list[Entry]:
    """The entries named by ``chapter:method`` or label (all by default); unknown names are an error."""
    if methods is None:
        return list(ENTRIES)
    known = {f"{e.chapter}:{e.method}": e for e in ENTRIES} | {e.label: e for e in ENTRIES}
    missing = [m for m in methods if m not in known]
    if missing:
        raise ValueError(f"unknown leaderboard method(s) {missing}; valid: {', '.join(ALL)}")
    return [known[m] for m in methods]


def run_entry(entry: Entry, benchmark: str, profile: str, seed: int) -> ContinualResult:
    return paper(entry.chapter).run(entry.method, benchmark, profile, seed)


def result_row(entry: Entry, benchmark: str, seed: int, result: ContinualResult) -> dict:
    """One row of the leaderboard: the book's standard summary plus the final mean class recall,
    which every paper records as ``extra['mean_class_recall']``."""
    return {"benchmark": benchmark, "method": entry.label, "chapter": entry.chapter, "family": entry.family,
            "seed": seed, **{k: v for k, v in result.summary().items() if k != "method"},
            "mean_class_recall": float(result.extra["mean_class_recall"])}


def run_all(chosen: list[Entry], benchmarks: list[str], profile: str, seeds: list[int]) -> pd.DataFrame:
    """Every (benchmark, entry, seed), cached runs read back; one row each."""
    jobs = [(b, e, s) for b in benchmarks for e in chosen for s in seeds]
    return pd.DataFrame([result_row(e, b, s, run_entry(e, b, profile, s))
                         for b, e, s in tqdm(jobs, desc="leaderboard runs")])


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """mean ± std over seeds per benchmark and method; accuracies in %, memory in MB."""
    g = frame.groupby(["benchmark", "method"], sort=False)
    out = pd.DataFrame({m: (100 * g[m].mean()).round(1).astype(str) + " ± " + (100 * g[m].std(ddof=0)).round(1).astype(str)
                        for m in METRICS})
    out["stored MB"] = (g["bytes_stored"].mean() / 2 ** 20).round(2)
    out["GFLOPs"] = g["gflops"].mean().round(4)
    out["train s"] = g["train_seconds"].mean().round(0)
    out["seeds"] = g.size()
    return out.reset_index()


def plot_tradeoffs(runs: pd.DataFrame, benchmark: str) -> plt.Figure:
    """Final accuracy and mean class recall against stored memory and inference GFLOPs (log x);
    points are seeds, bars ±1 std over seeds around each method's mean."""
    part = runs[runs["benchmark"] == benchmark].assign(stored_mb=lambda f: f["bytes_stored"] / 2 ** 20)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.6), sharex="col")
    for r, (y, ylabel) in enumerate((("final_acc", "final accuracy"), ("mean_class_recall", "mean class recall"))):
        for c, (x, xlabel) in enumerate((("stored_mb", "stored across tasks (MB, log)"),
                                         ("gflops", "inference GFLOPs per image (log)"))):
            ax, legend = axes[r, c], r == 0 and c == 1
            sns.scatterplot(data=part, x=x, y=y, hue="family", style="family", s=40, alpha=0.35, ax=ax, legend=legend)
            means = part.groupby("method")[[x, y]].mean()
            stds = part.groupby("method")[y].std(ddof=0).fillna(0)
            ax.errorbar(means[x], means[y], yerr=stds, fmt="none", ecolor="gray", lw=1)
            for name, row in means.iterrows():
                ax.annotate(name, (row[x], row[y]), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.set_xscale("log"); ax.set_xlabel(xlabel); ax.set_ylabel(ylabel)
            if legend:
                ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(benchmark, fontsize=10)
    fig.tight_layout()
    return fig


def conclusions(runs: pd.DataFrame, n_classes: dict[str, int]) -> list[str]:
    """What the table says per benchmark: the best short of joint training by accuracy and by mean
    class recall (beside chance), and the cheapest at inference."""
    lines = []
    mean = runs.groupby(["benchmark", "method"], sort=False)[METRICS + ["bytes_stored", "gflops"]].mean()
    for benchmark in dict.fromkeys(runs["benchmark"]):
        m = mean.loc[benchmark]
        contenders = m.drop(index=[i for i in m.index if "Joint" in i], errors="ignore")
        best = contenders["final_acc"].idxmax()
        if "Sequential fine-tuning" in m.index:
            joint = m.filter(like="Joint", axis=0)["final_acc"]
            lines.append(f"- **{benchmark}**: the best final accuracy short of joint training is **{best}** "
                         f"({100 * contenders.loc[best, 'final_acc']:.1f}%)"
                         + (f"; joint training reaches {100 * joint.iloc[0]:.1f}%" if len(joint) else "")
                         + f". Sequential fine-tuning alone: {100 * m.loc['Sequential fine-tuning', 'final_acc']:.1f}%.")
        else:
            lines.append(f"- **{benchmark}**: best {best}.")
        by_recall = contenders["mean_class_recall"].idxmax()
        lines.append(f"  By mean class recall the best short of joint training is **{by_recall}** "
                     f"({100 * contenders.loc[by_recall, 'mean_class_recall']:.1f}%; chance on {benchmark} "
                     f"is {100 / n_classes[benchmark]:.1f}%).")
        cheap = contenders[contenders["gflops"] <= contenders["gflops"].min() * 1.01]
        lines.append(f"  Cheapest at inference ({contenders['gflops'].min():.4f} GFLOPs per image): "
                     + ", ".join(cheap.index) + ".")
    return lines


def check_runs(runs: pd.DataFrame, n_expected: int) -> None:
    """The leaderboard's invariants: every run present, rates in [0, 1], memory stored, and merged
    adapters cheaper at inference than per-task paths and than DER's expanded backbones."""
    assert len(runs) == n_expected, (len(runs), n_expected)
    for col in ("final_acc", "avg_incremental_acc", "mean_class_recall"):
        assert runs[col].between(0, 1).all(), col
    assert (runs["bytes_stored"] > 0).all()
    g = runs.groupby("method")["gflops"].mean()
    if {"DynaMMo", "ACL"} <= set(g.index):
        assert g["DynaMMo"] < g["ACL"], "merged adapters must cost less than per-task paths"
    if {"DynaMMo", "DER (dynamically expandable representation)"} <= set(g.index):
        assert g["DynaMMo"] < g["DER (dynamically expandable representation)"]
