"""The CMM chapter's regime check (issue 12): can these runs tell CMM, its ablations and the
merges apart at all?

Per scenario and seed, :func:`regime_numbers` measures what the chapter's method runs do not: the
floors (pooled test labels), θ_0 with the chapter's frozen head over every class (how far the
head alone goes: the prototype head, like CLIP's zero-shot head, already classifies at θ_0) and
joint training (standard fine-tuning of θ_0 on the union of the tasks' training subsets, full
softmax, the same recipe: as many steps as the sequential run takes in total). Sequential
fine-tuning's ``R`` (task-agnostic diagonal, forgetting) comes from the ``seq-ft`` result.
:func:`scenario_regime` applies :func:`cmm_utils.core.regime.continual_regime` to the seed means
with the default thresholds. Not measured here: the task-aware diagonal and the task vectors'
geometry (the seq-FT chain keeps only its latest checkpoint; the MagMax chapter reports both for
the same benchmarks). The numbers are cached as JSON under the chapter's results.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from cmm_utils.core.benchmarks import BACKBONE, BENCHMARKS, load_benchmark
from cmm_utils.core.continual import evaluate_seen_tasks, scenario_fingerprint
from cmm_utils.core.data import LabeledImages, Scenario
from cmm_utils.core.io import atomic_path, config_key, read_json, write_csv, write_json
from cmm_utils.core.models.heads import FrozenHead, HeadedModel
from cmm_utils.core.regime import Regime, continual_regime, regime_table
from cmm_utils.core.seeds import JOINT, task_seed
from cmm_utils.core.train import device, seed_everything
from cmm_utils.papers.cmm.encoders import head_weights_fn
from cmm_utils.papers.cmm.networks import encoder_dim, make_encoder
from cmm_utils.papers.cmm.runs import run, run_parts
from cmm_utils.papers.cmm.stages import subsample, train_task

VERSION = 1


def full_head(scenario: Scenario, encoder0, head_fn, scale: float) -> FrozenHead:
    """The chapter's frozen head with the rows of every task set (the head after the last task)."""
    head = FrozenHead.unset(scenario.num_classes, encoder_dim(encoder0), scale)
    for task in scenario.tasks:
        head.set_rows(task.classes, head_fn(task))
    return head


def joint_training_set(scenario: Scenario, cap: int | None, seed: int) -> LabeledImages:
    """The union of the training subsets the sequential run sees (same per-task caps and seeds)."""
    parts = [subsample(t.train, cap, task_seed(seed, t.index)) for t in scenario.tasks]
    return LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def measure(scenario: Scenario, parts, seed: int) -> dict:
    """θ_0's and joint training's final scores on ``scenario`` (see the module docstring)."""
    seed_everything(seed)
    cfg, encoder0 = parts.cfg, parts.encoder0
    head = full_head(scenario, encoder0, head_weights_fn(cfg, encoder0, parts.clip, scenario), cfg.logit_scale).to(device())
    theta0 = evaluate_seen_tasks(HeadedModel(encoder0, head), scenario, len(scenario.tasks) - 1)
    net = HeadedModel(make_encoder(encoder0, False).to(device()), head)
    train_task(net, joint_training_set(scenario, cfg.max_train_per_task, seed), tuple(range(scenario.num_classes)),
               scenario.num_classes, cfg.fit_config(), task_seed(seed, 0, JOINT), desc="joint")
    joint = evaluate_seen_tasks(net, scenario, len(scenario.tasks) - 1)
    labels = torch.cat([t.test.labels for t in scenario.tasks])
    return {"num_classes": scenario.num_classes, "task_classes": [list(t.classes) for t in scenario.tasks],
            "test_labels": labels.tolist(), "theta0_recall": theta0.mean_class_recall,
            "theta0_accuracy": theta0.accuracy, "joint_recall": joint.mean_class_recall,
            "joint_accuracy": joint.accuracy, "joint_pred": joint.predicted.tolist()}


def regime_numbers(scenario: Scenario, parts, seed: int, seq_R: Sequence[Sequence[float]], folder: Path) -> dict:
    """:func:`measure` cached under ``folder`` (keyed by the run's identity and configuration),
    with sequential fine-tuning's ``R`` added."""
    key = config_key({"version": VERSION, "identity": parts.identity, "cfg": repr(parts.cfg),
                      "data": scenario_fingerprint(scenario)})
    path = Path(folder) / f"regime-{key}.json"
    if path.exists():
        numbers = read_json(path)
    else:
        numbers = measure(scenario, parts, seed)
        write_json(path, numbers)
    return {**numbers, "seqft_R": [list(r) for r in seq_R]}


def scenario_regime(name: str, per_seed: Sequence[Mapping]) -> Regime:
    """The checks of one scenario on the seed means of :func:`regime_numbers`."""
    if not per_seed:
        raise ValueError(f"no regime numbers for scenario {name!r}")
    first = per_seed[0]
    return continual_regime(
        name, num_classes=first["num_classes"], test_labels=np.asarray(first["test_labels"]),
        joint_recall=float(np.mean([s["joint_recall"] for s in per_seed])),
        seqft_R=np.mean([s["seqft_R"] for s in per_seed], axis=0), task_classes=first["task_classes"],
        theta0_recall=float(np.mean([s["theta0_recall"] for s in per_seed])))


def chapter_regimes(ch) -> tuple[dict, dict]:
    """``({scenario: Regime}, predictions)`` for every scenario the page ran (its own and the book
    benchmarks not skipped): the runs are read from the cache (:func:`cmm_utils.papers.cmm.run`),
    θ_0 and joint measured once per seed (cached). ``predictions``: scenario → seed → method →
    the final model's per-image test predictions, and ``labels`` (the claims' paired bootstrap).
    Writes ``regime.csv`` and ``predictions.json`` under the chapter's results."""
    names = [ch.name] + [b for b in ch.settings["benchmarks"] if b != ch.name and b not in ch.skipped]
    regimes, preds = {}, {}
    for name in names:
        per_seed = []
        for s in ch.seeds:
            sc = ch.scenarios[s] if name == ch.name else load_benchmark(name, ch.profile, s)
            results = {m: run(m, name, ch.profile, s, scenario=sc, **ch.overrides) for m in ch.settings["methods"]}
            backbone = BACKBONE if name in BENCHMARKS else ch.settings["backbone"]
            parts = run_parts("seq-ft", sc, ch.profile, s, backbone, ch.overrides)
            numbers = regime_numbers(sc, parts, s, results["seq-ft"].R, ch.out / "regime")
            per_seed.append(numbers)
            preds.setdefault(name, {})[str(s)] = {"labels": numbers["test_labels"], "joint": numbers["joint_pred"],
                                                  **{m: r.extra.get("final_pred") for m, r in results.items()}}
        regimes[name] = scenario_regime(name, per_seed)
    table = regime_table(list(regimes.values()))
    table["scenario_passes"] = table["scenario"].map({n: r.passed for n, r in regimes.items()})
    write_csv(ch.out / "regime.csv", table)
    with atomic_path(ch.out / "predictions.json") as tmp:  # compact: ~10^5 integers
        tmp.write_text(json.dumps(preds, separators=(",", ":")))
    return regimes, preds
