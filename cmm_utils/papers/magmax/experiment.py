"""One MagMax run (a scenario and a seed) and its cache: fine-tune once per regime, merge many times.

:class:`MagMaxRun` fine-tunes the tasks of both regimes (:func:`cmm_utils.papers.magmax.method.finetune`),
keeps every per-task checkpoint (each ``τ_t`` is merged, so all of them are needed, not only the
latest), merges (:func:`~cmm_utils.papers.magmax.method.merge_task_vectors`), applies λ and the
BatchNorm policy, evaluates with the book's pinned protocol and sweeps λ on validation data.
:func:`cached_result` wraps one method's result in :func:`cmm_utils.core.continual.cached_run`, so
the chapter and the leaderboard read the same runs.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils import merging
from cmm_utils.core.benchmarks import BENCHMARKS
from cmm_utils.core.continual import (ContinualResult, cached_run, evaluate_after_task, evaluate_seen_tasks, gflops_per_image,
                                      scenario_fingerprint, score_seen_tasks, state_bytes, task_local_loss)
from cmm_utils.core.data import Scenario, make_split
from cmm_utils.core.io import cache_root, config_key, read_cached_state, save_state, write_json
from cmm_utils.core.models.heads import FrozenHead, HeadedModel
from cmm_utils.core.profiles import check_profile
from cmm_utils.core.seeds import JOINT, task_seed
from cmm_utils.core.train import device, predict, seed_everything
from cmm_utils.papers.magmax import data as magmax_data
from cmm_utils.papers.magmax.data import CHAPTER
from cmm_utils.papers.magmax.method import (REGIMES, apply_merged, BN_STATS, build_backbone_and_head, check_method,
                                            finetune, fixed_lambda, lambda_grid, merge_task_vectors, parse_method,
                                            step_lambda, task_steps)
from cmm_utils.papers.magmax.profiles import FT_KEYS, PROFILES, RUN_KEYS

VERSION = 3  # 3: results keep the final model's per-image test predictions (verdict intervals)


def load_scenario(dataset: str, profile: str, seed: int = 0, n_tasks: int | None = None,
                  settings: Mapping | None = None) -> Scenario:
    """The scenario a run of this chapter uses (:func:`cmm_utils.papers.magmax.data.load_scenario`), under
    ``settings`` (default: the profile's row of :data:`~cmm_utils.papers.magmax.profiles.PROFILES`)."""
    check_profile(profile)
    return magmax_data.load_scenario(dataset, profile, seed, n_tasks,
                                     PROFILES[profile] if settings is None else settings)


def _detached(state: Mapping[str, torch.Tensor]) -> dict:
    """A CPU copy of ``state`` in the default (contiguous) memory format."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def _cap_split(scenario: Scenario, split: str, cap: int | None, seed: int) -> Scenario:
    """``scenario`` with each task's ``split`` cut to at most ``cap`` images (seeded, stratified):
    the validation subset of the λ sweep, and the ``smoke`` profile's small test sets."""
    if not cap:
        return scenario
    tasks = []
    for task in scenario.tasks:
        part = getattr(task, split)
        if len(part) > cap:
            keep, _ = make_split(part.labels.numpy(), 1 - cap / len(part), seed)
            part = part.subset(keep)
        tasks.append(replace(task, **{split: part}))
    return replace(scenario, tasks=tasks)


def run_config(method: str, benchmark: str, profile: str, seed: int, settings: Mapping) -> dict:
    """The JSON-able configuration a cached run is keyed by (the leaderboard reads it)."""
    merge, regime = parse_method(method)
    cfg = {"method": method, "benchmark": str(benchmark), "seed": int(seed), "backbone": settings["backbone"],
           "profile": profile, "chapter": CHAPTER, "version": VERSION, "regime": regime,
           "lambda": fixed_lambda(merge, settings)}
    cfg.update({k: settings[k] for k in RUN_KEYS if k in settings})
    return cfg


class MagMaxRun:
    """One scenario and seed: per-task checkpoints (fine-tuned once per regime, cached as
    safetensors and reused by every merge and λ), merges, evaluation and analyses.

    Checkpoints live under ``cache_root()/magmax/<profile>/<benchmark>-s<seed>-<key>/``, keyed by
    the scenario's fingerprint and the fine-tuning settings; task 1 is shared by both regimes
    (both start it from θ_0). An interrupted run resumes at the first missing task.
    """

    def __init__(self, scenario: Scenario, profile: str, seed: int, settings: Mapping | None = None,
                 benchmark: str | None = None, backbone: nn.Module | None = None, head: FrozenHead | None = None,
                 checkpoint_dir: Path | str | None = None):
        self.profile = check_profile(profile)
        self.settings = dict(PROFILES[profile] if settings is None else settings)
        self.seed = int(seed)
        self.scenario = _cap_split(scenario, "test", self.settings.get("eval_max_per_task"), self.seed)
        self.benchmark = benchmark or scenario.name
        seed_everything(self.seed)
        if backbone is None or head is None:
            backbone, head = build_backbone_and_head(self.settings, profile, scenario)
        self.backbone, self.head = backbone.cpu(), head.cpu()
        self.base = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        key = config_key({"scenario": scenario_fingerprint(scenario), "seed": self.seed, "profile": profile,
                          "version": VERSION, **{k: self.settings.get(k) for k in FT_KEYS},
                          "head_weight": float(self.head.weight.double().sum())})
        self.dir = Path(checkpoint_dir) if checkpoint_dir else (
            cache_root() / CHAPTER / profile / f"{Path(self.benchmark).stem}-s{self.seed}-{key}")
        self._states: dict[str, dict] = {}
        self._meta: dict[str, dict] = {}
        self._sweeps: dict[tuple, pd.DataFrame] = {}
        self._gflops: float | None = None
        self._eval_net: HeadedModel | None = None
        self._tvs: dict[str, list] = {}
        self._final: dict[tuple, dict] = {}

    # -- models and checkpoints
    @property
    def T(self) -> int:
        return len(self.scenario.tasks)

    def model(self, state: Mapping[str, torch.Tensor] | None = None) -> HeadedModel:
        """A fresh model (on the compute device) with ``state`` loaded into the backbone."""
        net = HeadedModel(copy.deepcopy(self.backbone), self.head)
        net.backbone.load_state_dict(state if state is not None else self.base)
        # channels-last convolution weights: ~1.3x faster evaluation on CPU, same results up to rounding
        return net.to(device(), memory_format=torch.channels_last)

    def eval_model(self, state: Mapping[str, torch.Tensor]) -> HeadedModel:
        """One model reused for every evaluation: ``state`` is copied into it (no re-allocation)."""
        if self._eval_net is None:
            self._eval_net = self.model()
        self._eval_net.backbone.load_state_dict(state)
        return self._eval_net.eval()

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def _load_or_train(self, name: str, train: Callable[[], tuple[dict, dict]]) -> dict:
        """The checkpoint ``name``: from memory, from disk, or trained now and saved (resume point).
        With ``keep_states=False`` (``paper``: T × ViT-B/16 would not fit) nothing is kept in memory."""
        if name in self._states:
            return self._states[name]
        path = self._path(name)
        found = read_cached_state(path, require_meta=False)  # a damaged file: warned about, retrained
        if found is not None:
            state, self._meta[name] = found
        else:
            state, meta = train()
            save_state(path, state, meta)
            self._meta[name] = meta
        if self.settings.get("keep_states", True):
            self._states[name] = state
        return state

    def _ckpt_name(self, regime: str, t: int) -> str:
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
        return "task0" if t == 0 else f"{regime[:3]}-task{t}"

    def finetuned(self, regime: str) -> list[dict]:
        """θ_1..θ_T of ``regime`` (trained once, then read from the checkpoints)."""
        states = []
        for t, task in enumerate(self.scenario.tasks):
            def train(t=t, task=task):
                init = states[t - 1] if (regime == "sequential" and t > 0) else self.base
                net = self.model(init)
                meta = finetune(net, task.train, task_local_loss(task.classes, self.scenario.num_classes),
                                self.settings, seed=task_seed(self.seed, t), desc=f"{regime[:3]} task {t + 1}/{self.T}")
                return _detached(net.backbone.state_dict()), meta
            states.append(self._load_or_train(self._ckpt_name(regime, t), train))
        return states

    def task_vectors(self, regime: str) -> list[dict]:
        if regime not in self._tvs:
            self._tvs[regime] = [merging.task_vector(s, self.base) for s in self.finetuned(regime)]
        return self._tvs[regime]

    def final_merge(self, merge: str, regime: str) -> dict:
        """merge(τ_1..τ_T), before λ (kept in memory: every λ of the sweep reuses it)."""
        if (merge, regime) not in self._final:
            self._final[(merge, regime)] = merge_task_vectors(merge, self.task_vectors(regime), seed=self.seed)
        return self._final[(merge, regime)]

    def joint(self) -> dict:
        """The upper bound: one model trained on all tasks with the full softmax, for as many steps
        as the sequential run takes in total."""
        def train():
            data = self.scenario.joint("train")
            steps = sum(task_steps(len(t.train), self.settings) for t in self.scenario.tasks)
            net = self.model()
            meta = finetune(net, data, lambda m, x, y: F.cross_entropy(m(x), y), self.settings,
                            seed=task_seed(self.seed, 0, JOINT), steps=steps, desc="joint")
            return _detached(net.backbone.state_dict()), meta
        return self._load_or_train("joint", train)

    def train_seconds(self, names: Sequence[str]) -> float:
        return float(sum(self._meta.get(n, {}).get("seconds", float("nan")) for n in names))

    # -- evaluation
    def evaluate(self, state: Mapping[str, torch.Tensor], t: int, split: str = "test",
                 scenario: Scenario | None = None) -> tuple[list[float], float]:
        """Row ``R[t, :]`` and pooled accuracy on tasks ``0..t`` (the book's pinned protocol)."""
        return evaluate_after_task(self.eval_model(state), scenario or self.scenario, t, split,
                                   batch_size=int(self.settings["eval_batch"]))

    def _logit_rows(self, state: Mapping[str, torch.Tensor], ts: Sequence[int]) -> tuple[list, list, float]:
        """Rows ``R[t, :]`` for ``t`` in ``ts`` of one model (the pretrained or joint baseline), its
        test logits computed once and scored by :func:`cmm_utils.core.continual.score_seen_tasks`. Also
        returns the mean class recall on the pooled test set of the last ``t`` (HAM10000 is 58 %
        naevi: accuracy alone flatters a model that answers "nv" to everything)."""
        net = self.eval_model(state)
        logits = [predict(net, task.test, int(self.settings["eval_batch"])) for task in self.scenario.tasks[: max(ts) + 1]]
        scores = [score_seen_tasks(logits, self.scenario, t) for t in ts]
        self._last_pred = scores[-1].predicted
        return [s.row for s in scores], [s.accuracy for s in scores], scores[-1].mean_class_recall

    def _rows(self, state_after: Callable[[int], Mapping[str, torch.Tensor]]) -> tuple[list, list, float]:
        """``R`` of a method whose model after task ``t`` is ``state_after(t)``, and the mean class
        recall of the model after the last task."""
        scores = [evaluate_seen_tasks(self.eval_model(state_after(t)), self.scenario, t,
                                      batch_size=int(self.settings["eval_batch"])) for t in range(self.T)]
        self._last_pred = scores[-1].predicted
        return [s.row for s in scores], [s.accuracy for s in scores], scores[-1].mean_class_recall

    def final_predictions(self) -> dict:
        """The last scored model's predictions on the pooled test images of every task (in the
        scenario's order): the paired bootstrap of the claims resamples them (``extra``)."""
        return {"final_pred": self._last_pred.tolist()}

    def merged(self, merge: str, regime: str, upto: int, lam: float, bn_stats: str | None = None) -> dict:
        """θ_0 + λ_t·merge(τ_1..τ_{upto+1}), BatchNorm statistics by ``bn_stats`` (default: settings)."""
        tvs = self.task_vectors(regime)[: upto + 1]
        final = upto == self.T - 1
        merged_tv = self.final_merge(merge, regime) if final else merge_task_vectors(merge, tvs, seed=self.seed)
        policy = bn_stats or self.settings.get("bn_stats", "merge")
        if policy not in BN_STATS:
            raise ValueError(f"unknown bn_stats {policy!r}; valid: {', '.join(BN_STATS)}")
        stats = None
        if policy == "average":
            stats = self.final_merge("average", regime) if final else merge_task_vectors("average", tvs)
        return apply_merged(self.base, merged_tv, step_lambda(merge, lam, upto), stats)

    def val_scenario(self) -> Scenario:
        """The scenario with each task's validation split capped at ``sweep_val_max`` (stratified)."""
        return _cap_split(self.scenario, "val", self.settings.get("sweep_val_max"), self.seed)

    def sweep(self, merge: str, regime: str) -> pd.DataFrame:
        """Validation accuracy (all tasks, all classes) of the final merge for each λ of the grid;
        ``chosen`` marks the best (ties: the one nearest the paper's λ). Never reads test data."""
        if (merge, regime) in self._sweeps:
            return self._sweeps[(merge, regime)]
        val = self.val_scenario()
        paper = self.fixed(merge)
        rows = []
        for lam in lambda_grid(merge, int(self.settings["sweep_points"]), paper):
            state = self.merged(merge, regime, self.T - 1, lam)
            _, acc = self.evaluate(state, self.T - 1, "val", val)
            rows.append({"merge": merge, "regime": regime, "lambda": lam, "val_acc": acc,
                         "paper": bool(np.isclose(lam, paper))})
        frame = pd.DataFrame(rows)
        best = frame.assign(d=(frame["lambda"] - paper).abs()).sort_values(["val_acc", "d"], ascending=[False, True])
        frame["chosen"] = frame.index == best.index[0]
        self._sweeps[(merge, regime)] = frame
        return frame

    def lam(self, merge: str, regime: str) -> tuple[float, str]:
        """``(λ, source)``: the paper's fixed λ, averaging's 1/T, or the validation choice for task arithmetic."""
        if merge == "task-arithmetic":
            frame = self.sweep(merge, regime)
            return float(frame.loc[frame["chosen"], "lambda"].iloc[0]), "validation"
        if merge == "average":
            return 1.0, "1/T"
        return self.fixed(merge), "paper"

    def fixed(self, merge: str) -> float:
        """The fixed λ of ``merge`` (task arithmetic: k = 1, i.e. averaging)."""
        lam = fixed_lambda(merge, self.settings)
        return 1.0 if lam is None else float(lam)

    def gflops(self) -> float:
        if self._gflops is None:
            size = int(self.scenario.tasks[0].test.images.shape[-1])
            self._gflops = gflops_per_image(self.model(), size)
        return self._gflops

    def result(self, method: str) -> ContinualResult:
        """The method's :class:`ContinualResult`: ``R`` from the merge of ``τ_1..τ_t`` after each task."""
        merge, regime = parse_method(method)
        model_bytes = state_bytes(self.base, self.head.weight)
        names = [self._ckpt_name(regime, t) for t in range(self.T)]
        extra = {"regime": regime, "benchmark": self.benchmark}
        if merge == "pretrained":
            R, seen, mcr = self._logit_rows(self.base, range(self.T))
            return ContinualResult(method, R, seen, model_bytes, self.gflops(), 0.0,
                                   {**extra, "mean_class_recall": mcr, **self.final_predictions()})
        if merge == "joint":
            R, seen, mcr = self._logit_rows(self.joint(), range(self.T))
            data = self.scenario.joint("train")
            stored = model_bytes + state_bytes(data.images, data.labels)
            extra.update({"mean_class_recall": mcr, "note": "rows before the last reuse the final joint model",
                          **self.final_predictions()})
            return ContinualResult(method, R, seen, stored, self.gflops(), self.train_seconds(["joint"]), extra)
        states = self.finetuned(regime)
        if merge == "seq-ft":
            R, seen, mcr = self._rows(lambda t: states[t])
            return ContinualResult(method, R, seen, model_bytes, self.gflops(), self.train_seconds(names),
                                   {**extra, "mean_class_recall": mcr, **self.final_predictions()})
        lam, source = self.lam(merge, regime)
        R, seen, mcr = self._rows(lambda t: self.merged(merge, regime, t, lam))
        # kept across tasks: θ_0, the running merge and the model being trained; TIES needs every τ (two passes)
        stored = model_bytes * ((self.T + 1) if merge == "ties" else 3)
        extra.update({"lambda": lam, "lambda_source": source, "mean_class_recall": mcr, **self.final_predictions()})
        return ContinualResult(method, R, seen, stored, self.gflops(), self.train_seconds(names), extra)

    # -- the chapter's analyses


def cached_result(method: str, benchmark: str, profile: str, seed: int, settings: Mapping | None = None,
                  n_tasks: int | None = None, scenario: Scenario | None = None,
                  run: MagMaxRun | None = None) -> ContinualResult:
    """``cached_run(profile, "magmax", config, ...)``: the result of a finished run is read back.

    ``benchmark`` is a book benchmark (``ham10000-cil``, ``medical-dil``) or a name made by
    :func:`~cmm_utils.papers.magmax.data.benchmark_name` (then ``n_tasks`` and the dataset name are
    read from it unless given); pass ``scenario``/``run`` to reuse what is already loaded. The
    configuration includes a fingerprint of the scenario's data, so a different file under the same
    name is never reused. Fine-tuned checkpoints are cached per task and shared by every method of
    the same scenario, seed and settings, so asking for all twelve methods fine-tunes each regime once.
    """
    check_method(method)
    settings = dict(PROFILES[check_profile(profile)] if settings is None else settings)
    if run is not None:
        scenario = run.scenario
    if scenario is None:
        name, tasks = benchmark, n_tasks
        if benchmark not in BENCHMARKS and "-cil" in benchmark:
            name, _, t = benchmark.rpartition("-cil")
            tasks = n_tasks or int(t)
        scenario = load_scenario(name, profile, seed, tasks, settings)
    config = run_config(method, benchmark, profile, seed, settings)
    capped = _cap_split(scenario, "test", settings.get("eval_max_per_task"), seed)  # what MagMaxRun evaluates on
    config["data"] = config_key(scenario_fingerprint(capped))

    def compute() -> ContinualResult:
        return (run or MagMaxRun(scenario, profile, seed, settings, benchmark=benchmark)).result(method)
    return cached_run(profile, CHAPTER, config, compute)


def cached_json(path: Path, compute: Callable[[], object]):
    """Read ``path`` if present, else compute, write atomically and return (analyses, sweeps)."""
    if path.exists():
        return json.loads(path.read_text())
    obj = compute()
    write_json(path, obj)
    return json.loads(path.read_text())
