"""The MagMax chapter's page, computed: every scenario × seed run, the artifacts the figures read,
and the tables the page shows.

:func:`run_chapter` runs every method of the profile on every scenario and seed (one
:class:`~cmm_utils.papers.magmax.experiment.MagMaxRun` each, results through the cache), adds the
λ sweep, the λ and BatchNorm tables and the task-vector analyses (cached as JSON per run), and
writes ``summary``, ``curves``, ``R``, ``sweep``, ``lambda``, ``share``, ``sign`` and ``bn`` as CSV
under the chapter's results folder, with the regime check (``regime.csv``, :mod:`.regime`) and
the final models' per-image test predictions (``predictions.json``, for the claims' paired
bootstrap). The table functions read those frames back.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pandas as pd

from cmm_utils.core.continual import ContinualResult, scenario_fingerprint
from cmm_utils.core.io import atomic_path, config_key, write_csv
from cmm_utils.core.plots import mean_std_table
from cmm_utils.papers.magmax.analysis import regime_analysis
from cmm_utils.papers.magmax.data import benchmark_name, fixed_benchmark
from cmm_utils.papers.magmax.experiment import MagMaxRun, cached_json, cached_result, load_scenario, run_config
from cmm_utils.papers.magmax.method import BN_STATS, REGIMES, SWEPT, parse_method
from cmm_utils.papers.magmax.regime import chapter_regimes, regime_frame, regime_numbers

ARTIFACTS = ("summary", "curves", "R", "sweep", "lambda", "share", "sign", "bn")
# rows of the page's tables: from no training, through the merges, to the upper bound
ORDER = ("pretrained", "seq-ft", "average", "task-arithmetic", "ties", "random", "magmax", "joint")


def experiments(settings: Mapping) -> list[tuple[str, int | None]]:
    """``(scenario, T)`` for every benchmark of ``settings``: a fixed benchmark once (``T = None``),
    a dataset once per task count of ``n_tasks``."""
    counts = settings["n_tasks"] if isinstance(settings["n_tasks"], (list, tuple)) else [settings["n_tasks"]]
    return [pair for name in settings["benchmarks"]
            for pair in ([(name, None)] if fixed_benchmark(name) else [(name, int(T)) for T in counts])]


# ----------------------------------------------------------------------------------- per run
def _merges_per_regime(regimes: Sequence[str], merges: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """``(regime, method suffix, merge)``: the main runs of the independent regime end in ``-ind``."""
    for regime in regimes:
        for merge in merges:
            yield regime, "" if regime == "sequential" else "-ind", merge


def lambda_table(run: MagMaxRun, results: Mapping[str, ContinualResult] | None = None,
                 merges: Sequence[str] | None = None, regimes: Sequence[str] = REGIMES) -> pd.DataFrame:
    """Per merge and regime: the validation sweep's choice beside the paper's λ, both scored on
    test (final merge, all classes). Test accuracies already in ``results`` (the main runs at the
    paper's λ, averaging = task arithmetic with k = 1) are reused instead of re-evaluated."""
    results = results or {}
    rows = []
    for regime, suffix, merge in _merges_per_regime(regimes, merges or run.settings.get("sweep_merges") or SWEPT):
        frame = run.sweep(merge, regime)
        paper = run.fixed(merge)
        chosen = float(frame.loc[frame["chosen"], "lambda"].iloc[0])
        known = {}
        main = "average" if merge == "task-arithmetic" else merge
        if main + suffix in results:
            known[paper] = results[main + suffix].acc_seen[-1]
        if merge == "task-arithmetic" and merge + suffix in results:
            known[chosen] = results[merge + suffix].acc_seen[-1]
        for lam in {paper, chosen} - set(known):
            known[lam] = run.evaluate(run.merged(merge, regime, run.T - 1, lam), run.T - 1)[1]
        rows.append({"merge": merge, "regime": regime, "paper_lambda": paper, "chosen_lambda": chosen,
                     "test_acc_paper_lambda": known[paper], "test_acc_chosen_lambda": known[chosen]})
    return pd.DataFrame(rows)


def bn_table(run: MagMaxRun, results: Mapping[str, ContinualResult] | None = None,
             merges: Sequence[str] = ("magmax", "ties"), regimes: Sequence[str] = REGIMES) -> pd.DataFrame:
    """Final test accuracy at the fixed λ under both BatchNorm policies (``average``: the fine-tuned
    models' mean statistics; ``merge``: statistics merged and scaled like weights, FusionBench)."""
    results = results or {}
    rows = []
    for regime, suffix, merge in _merges_per_regime(regimes, merges):
        lam, _ = run.lam(merge, regime)
        row = {"merge": merge, "regime": regime, "lambda": lam}
        for policy in BN_STATS:
            if policy == run.settings.get("bn_stats") and merge + suffix in results:
                row[f"bn_{policy}"] = results[merge + suffix].acc_seen[-1]
            else:
                row[f"bn_{policy}"] = run.evaluate(run.merged(merge, regime, run.T - 1, lam, policy), run.T - 1)[1]
        rows.append(row)
    return pd.DataFrame(rows)


def _extras(run: MagMaxRun, results: Mapping[str, ContinualResult]) -> dict:
    """The sweep, the λ and BatchNorm tables and the analyses of one run (JSON-able)."""
    return {"sweep": pd.concat([run.sweep(m, r) for r in REGIMES for m in run.settings["sweep_merges"]]).to_dict("records"),
            "lambda": lambda_table(run, results).to_dict("records"),
            "bn": bn_table(run, results, merges=[m for m in ("magmax", "ties") if m in results]).to_dict("records"),
            "analysis": regime_analysis({r: run.task_vectors(r) for r in REGIMES}),
            "regime": regime_numbers(run, results)}


def _rows(bench: str, s: int, results: Mapping[str, ContinualResult], extra: Mapping) -> dict[str, list]:
    """One run's rows of every artifact."""
    rows = {name: [] for name in ARTIFACTS}
    for m, r in results.items():
        merge, regime = parse_method(m)
        base = {"benchmark": bench, "seed": s, "method": m, "merge": merge, "regime": regime, "T": len(r.R)}
        rows["summary"].append({**base, **r.summary(), "lambda": r.extra.get("lambda"),
                                "mean_class_recall": r.extra.get("mean_class_recall")})
        rows["curves"] += [{**base, "task": t + 1, "acc_seen": a} for t, a in enumerate(r.acc_seen)]
        rows["R"] += [{**base, "after_task": t + 1, "task": i + 1, "acc": a}
                      for t, row in enumerate(r.R) for i, a in enumerate(row)]
    for name in ("sweep", "lambda", "bn"):
        rows[name] = [{"benchmark": bench, "seed": s, **row} for row in extra[name]]
    for regime, a in extra["analysis"].items():
        rows["share"] += [{"benchmark": bench, "seed": s, "regime": regime, "task": t + 1, "share": v,
                           "norm": a["norms"][t]} for t, v in enumerate(a["share"])]
        rows["sign"] += [{"benchmark": bench, "seed": s, "regime": regime, "i": i + 1, "j": j + 1, "agreement": v,
                          "all_agree": a["all_agree"]} for i, row in enumerate(a["sign_agreement"]) for j, v in enumerate(row)]
    return rows


def run_chapter(profile: str, settings: Mapping, seeds: Sequence[int], out: Path) -> MagMaxRun:
    """Every method × scenario × seed, the artifacts written to ``out``; returns the last run (the
    page's determinism check re-merges its task vectors)."""
    rows = {name: [] for name in ARTIFACTS}
    numbers, preds = {}, {}
    t_start = time.time()
    for name, T in experiments(settings):
        bench = benchmark_name(name, T)
        for s in seeds:
            t0 = time.time()
            scenario = load_scenario(name, profile, s, T, settings)
            run = MagMaxRun(scenario, profile, s, settings, benchmark=bench)
            results = {m: cached_result(m, bench, profile, s, settings, run=run) for m in settings["methods"]}
            key = config_key({**run_config("magmax", bench, profile, s, settings),
                              "data": scenario_fingerprint(scenario), "methods": sorted(results)})
            extra = cached_json(out / "analyses" / f"{Path(bench).stem}-s{s}-{key}.json", lambda: _extras(run, results))
            for artifact, new in _rows(bench, s, results, extra).items():
                rows[artifact] += new
            numbers.setdefault(bench, []).append(extra["regime"])
            preds.setdefault(bench, {})[str(s)] = {"labels": extra["regime"]["test_labels"],
                                                   **{m: r.extra["final_pred"] for m, r in results.items()}}
            print(f"{bench} seed {s}: {time.time() - t0:.1f}s")
    for artifact in ARTIFACTS:
        write_csv(out / f"{artifact}.csv", pd.DataFrame(rows[artifact]))
    write_csv(out / "regime.csv", regime_frame(chapter_regimes(numbers)))
    with atomic_path(out / "predictions.json") as tmp:  # compact: ~10^5 integers
        tmp.write_text(json.dumps(preds, separators=(",", ":")))
    print(f"all runs: {time.time() - t_start:.1f}s; artifacts in {out}")
    return run


# ----------------------------------------------------------------------------------- tables
def final_table(summary: pd.DataFrame, metric: str = "final_acc") -> pd.DataFrame:
    """``metric`` after the last task, mean ± std over seeds in %: a row per merge (:data:`ORDER`),
    a column per scenario × regime (sequential, then independent)."""
    cell = mean_std_table(summary.dropna(subset=[metric]), ["benchmark", "merge", "regime"], [metric])
    table = cell.pivot_table(index="merge", columns=["benchmark", "regime"], values=metric, aggfunc="first")
    table = table.reindex([m for m in ORDER if m in table.index]).fillna("")
    return table[[c for b in dict.fromkeys(table.columns.get_level_values(0))
                  for c in [(b, "sequential"), (b, "independent")] if c in table.columns]]


def _mean_std(values: pd.Series) -> str:
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=0):.1f}"


def lambda_summary(lambdas: pd.DataFrame) -> pd.DataFrame:
    """Per scenario, merge and regime: the paper's λ, the validation choices, test accuracy at both."""
    return (lambdas.groupby(["benchmark", "merge", "regime"], sort=False)
            .agg(paper_lambda=("paper_lambda", "first"),
                 chosen_lambda=("chosen_lambda", lambda v: ", ".join(f"{x:g}" for x in v)),
                 test_at_paper=("test_acc_paper_lambda", _mean_std),
                 test_at_chosen=("test_acc_chosen_lambda", _mean_std))
            .reset_index())


def bn_summary(bn: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy at the fixed λ, our BatchNorm policy beside FusionBench's."""
    return (bn.groupby(["benchmark", "merge", "regime"], sort=False)
            .agg(lam=("lambda", "first"), ours_average_stats=("bn_average", _mean_std),
                 fusionbench_merged_stats=("bn_merge", _mean_std))
            .reset_index())


def agreement_table(sign: pd.DataFrame) -> pd.DataFrame:
    """Mean pairwise sign agreement and the share of weights on which all task vectors agree, in %."""
    off = sign[sign["i"] != sign["j"]]
    return (off.groupby(["benchmark", "regime"])
            .agg(pairwise_agreement=("agreement", "mean"), all_tasks_agree=("all_agree", "mean")) * 100).round(1)
