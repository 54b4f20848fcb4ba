"""What every continual method in the book reports, measured the same way.

A method is run on a :class:`~cmm_utils.core.data.Scenario` and returns a :class:`ContinualResult`:
the accuracy matrix ``R[t, i]``, the pooled accuracy on all classes seen after each task, the
bytes it keeps across tasks, its inference GFLOPs per image and its training time. Results are
cached as JSON keyed by the full configuration, so the leaderboard reads what a chapter already
computed instead of retraining.

Evaluation protocol (pinned): after task ``t`` the model scores *all* classes of the scenario
(task-agnostic, one shared label space); predictions are restricted to the classes seen so far
(tasks ``0..t``), as in PyCIL's class-incremental evaluation. ``R[t, i]`` is the accuracy on task
``i``'s test images under that rule; ``acc_seen[t]`` is the accuracy on the pooled test images of
tasks ``0..t`` (sample-weighted). After the last task this is MagMax's "accuracy on the full test set".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cmm_utils.core.data import LabeledImages, Scenario
from cmm_utils.core.io import DamagedFile, cache_lock, config_key, read_json, results_dir, warn_damaged, write_json
from cmm_utils.core.metrics import (average_incremental_accuracy, backward_transfer, final_average_accuracy, forgetting,
                                    mean_class_recall)
from cmm_utils.core.train import predict

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # normalised float batch -> logits over all classes


@dataclass
class ContinualResult:
    method: str
    R: list[list[float]]
    acc_seen: list[float]
    bytes_stored: int = 0
    gflops: float = float("nan")
    train_seconds: float = float("nan")
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The book's standard row (see :mod:`cmm_utils.core.metrics` for each definition)."""
        R = np.asarray(self.R)
        return {"method": self.method,
                "final_acc": self.acc_seen[-1],
                "avg_incremental_acc": average_incremental_accuracy(self.acc_seen),
                "final_task_avg_acc": final_average_accuracy(R),
                "forgetting": forgetting(R), "bwt": backward_transfer(R),
                "bytes_stored": self.bytes_stored, "gflops": self.gflops,
                "train_seconds": self.train_seconds}


def task_local_loss(classes: Sequence[int], num_classes: int) -> Callable:
    """Cross-entropy over the current task's classes only: the task head of MagMax's and CMM's code
    (labels remapped to 0..|classes|-1, the logits of every other class left out). Used to
    fine-tune one task at a time; evaluation always scores every class (module docstring)."""
    idx = torch.tensor(sorted(classes), dtype=torch.long)
    lut = torch.full((num_classes,), -100, dtype=torch.long)
    lut[idx] = torch.arange(len(idx))

    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits[:, idx.to(logits.device)], lut.to(y.device)[y])
    return loss


def scenario_fingerprint(scenario: Scenario) -> dict:
    """What identifies a scenario's data cheaply, for cache and checkpoint keys: the class split
    and, per task and split, its size and label/pixel checksums. A different file under the same
    name never reuses another's results."""
    def digest(d: LabeledImages) -> list:
        if not len(d):
            return [0, 0, 0]
        step = max(1, len(d) // 64)
        return [len(d), int(d.labels.sum()), int(d.images[::step].to(torch.int64).sum())]
    return {"name": scenario.name, "kind": scenario.kind, "classes": scenario.num_classes,
            "tasks": [[list(t.classes), digest(t.train), digest(t.val), digest(t.test)] for t in scenario.tasks]}


def seen_mask(scenario: Scenario, t: int) -> torch.Tensor:
    mask = torch.zeros(scenario.num_classes, dtype=torch.bool)
    mask[list(scenario.seen_classes(t))] = True
    return mask


def predictions(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf")).argmax(1)


@dataclass(frozen=True)
class SeenTasksScore:
    """One model scored on the ``split`` images of tasks ``0..t`` under the pinned rule."""
    row: list[float]         # R[t, :]: accuracy per task, NaN for tasks after t
    accuracy: float          # pooled over tasks 0..t (sample-weighted): acc_seen[t]
    mean_class_recall: float  # balanced accuracy on the same pooled images
    predicted: torch.Tensor  # pooled predictions, tasks 0..t in order
    labels: torch.Tensor


def score_seen_tasks(task_logits: Sequence[torch.Tensor], scenario: Scenario, t: int,
                     split: str = "test") -> SeenTasksScore:
    """Score the logits of tasks ``0..t`` (``task_logits[i]``: all-class logits of task ``i``'s
    ``split`` images, in order; longer lists are cut at ``t``). Every score of the book comes from
    here, so one set of logits gives ``R[t, :]``, the pooled accuracy and the mean class recall,
    and a caller that scores several ``t`` (MagMax's rows) computes the logits once.

    Mean class recall does not reward predicting the majority class (HAM10000's naevi): that scores
    1/C here, while pooled accuracy scores the class's share."""
    mask, row, preds, truth = seen_mask(scenario, t), [], [], []
    for i, task in enumerate(scenario.tasks):
        if i > t:
            row.append(float("nan"))
            continue
        labels = getattr(task, split).labels
        pred = predictions(task_logits[i], mask) if len(labels) else labels.clone()
        row.append(int((pred == labels).sum()) / max(1, len(labels)))
        preds.append(pred)
        truth.append(labels)
    labels, predicted = torch.cat(truth), torch.cat(preds)
    accuracy = int((predicted == labels).sum()) / max(1, len(labels))
    mcr = mean_class_recall(labels.numpy(), predicted.numpy()) if len(labels) else float("nan")
    return SeenTasksScore(row, accuracy, mcr, predicted, labels)


def evaluate_seen_tasks(logits_fn: LogitsFn, scenario: Scenario, t: int, split: str = "test",
                        batch_size: int = 256) -> SeenTasksScore:
    """Run ``logits_fn`` once over the ``split`` images of tasks ``0..t`` and score them."""
    logits = [predict(logits_fn, getattr(task, split), batch_size) for task in scenario.tasks[: t + 1]]
    return score_seen_tasks(logits, scenario, t, split)


def evaluate_after_task(logits_fn: LogitsFn, scenario: Scenario, t: int, split: str = "test",
                        batch_size: int = 256) -> tuple[list[float], float]:
    """Row ``R[t, :]`` (NaN for tasks after ``t``) and the pooled accuracy on tasks ``0..t``."""
    score = evaluate_seen_tasks(logits_fn, scenario, t, split, batch_size)
    return score.row, score.accuracy


def pooled_mean_class_recall(logits_fn: LogitsFn, scenario: Scenario, t: int | None = None, split: str = "test",
                             batch_size: int = 256) -> float:
    """Mean class recall (balanced accuracy) on the pooled ``split`` images of tasks ``0..t`` (all
    tasks by default), under the same rule as :func:`evaluate_after_task`."""
    t = len(scenario.tasks) - 1 if t is None else t
    return evaluate_seen_tasks(logits_fn, scenario, t, split, batch_size).mean_class_recall


def state_bytes(*states: Mapping[str, torch.Tensor] | torch.Tensor) -> int:
    """Bytes of the tensors a method keeps (state dicts or single tensors)."""
    total = 0
    for s in states:
        tensors = s.values() if isinstance(s, Mapping) else [s]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def gflops_per_image(fn: Callable[[torch.Tensor], torch.Tensor], image_size: int, channels: int = 3) -> float:
    """Forward GFLOPs for one image, counted by ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs)."""
    x = torch.zeros(1, channels, image_size, image_size)
    if isinstance(fn, torch.nn.Module):
        fn.eval()
        x = x.to(next(fn.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops() / 1e9


def cache_path(profile: str, chapter: str, config: Mapping) -> Path:
    return results_dir(profile, chapter) / "runs" / f"{config.get('method', 'run')}-{config_key(config)}.json"


def cached_run(profile: str, chapter: str, config: Mapping, run: Callable[[], ContinualResult]) -> ContinualResult:
    """Return the cached result for ``config`` or run, save (atomically) and return it.

    One process runs a configuration: concurrent callers wait on a lock beside the JSON, then read
    it. A damaged entry (half-written, unparsable, or storing another configuration: a stale file
    or a key collision) is recomputed with a ``RuntimeWarning``; a run that raises (e.g.
    ``DivergedError``) leaves no file."""
    path = cache_path(profile, chapter, config)
    with cache_lock(path):
        found = _read_cached_run(path, config) if path.exists() else None
        if found is not None:
            return found
        result = run()
        write_json(path, {"config": dict(config), "result": asdict(result)})
        return result


def _read_cached_run(path: Path, config: Mapping) -> ContinualResult | None:
    """The result stored at ``path`` for ``config``; None, with a warning, when it is damaged."""
    try:
        stored = read_json(path)
        # compared as the key hashes them: tuples read back as lists, NaN as NaN
        if not isinstance(stored, dict) or config_key(stored.get("config"), 64) != config_key(dict(config), 64):
            raise DamagedFile(f"{path}: stores another configuration than the one asked for (stale or a key collision)")
        return ContinualResult(**stored["result"])
    except (DamagedFile, KeyError, TypeError) as err:
        warn_damaged(path, err)
        return None


def load_cached_runs(profile: str, chapter: str) -> list[dict]:
    """Every cached run of a chapter as ``{"config": ..., "result": ...}`` (the leaderboard's input);
    a damaged file is skipped with a warning, temporary files of a write in progress are ignored."""
    out = []
    for p in sorted((results_dir(profile, chapter) / "runs").glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            out.append(read_json(p))
        except DamagedFile as err:
            warn_damaged(p, err)
    return out
