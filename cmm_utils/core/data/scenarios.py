"""Continual-learning scenarios: a dataset cut into tasks, or a sequence of datasets as tasks.

Labels stay *global* (0..C-1 over the whole scenario); each task knows its classes, so a method
can map to task-local labels when it needs them (MagMax trains task-local heads, DynaMMo adds an
"others" output). Everything is a deterministic function of the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cmm_utils.core.data.datasets import DatasetSplits, LabeledImages


@dataclass
class Task:
    index: int
    classes: tuple[int, ...]
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    name: str = ""


@dataclass
class Scenario:
    """Tasks over ``num_classes`` global classes; ``class_names[c]`` names global class ``c``."""
    name: str
    kind: str  # "class-incremental" or "dataset-incremental"
    tasks: list[Task]
    class_names: tuple[str, ...]
    class_order: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.tasks)

    def seen_classes(self, upto: int) -> tuple[int, ...]:
        return tuple(c for task in self.tasks[: upto + 1] for c in task.classes)

    def joint(self, split: str = "train", upto: int | None = None) -> LabeledImages:
        """All tasks' data of one split (the joint-training upper bound, or a test set so far)."""
        parts = [getattr(t, split) for t in self.tasks[: None if upto is None else upto + 1]]
        return LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def task_class_splits(class_order: Sequence[int], n_tasks: int) -> list[tuple[int, ...]]:
    """Classes of each task, as MagMax's ``cl_utils`` cuts them: task i gets
    ``class_order[floor(C/T*i) : floor(C/T*(i+1))]`` (sorted)."""
    n = len(class_order)
    if not 1 <= n_tasks <= n:
        raise ValueError(f"n_tasks={n_tasks} must be between 1 and the number of classes ({n})")
    bounds = [int(np.floor(n / n_tasks * i)) for i in range(n_tasks + 1)]
    return [tuple(sorted(class_order[bounds[i]:bounds[i + 1]])) for i in range(n_tasks)]


def class_incremental(data: DatasetSplits, n_tasks: int, seed: int = 0,
                      class_order: Sequence[int] | None = None) -> Scenario:
    """Split ``data`` into ``n_tasks`` tasks of disjoint classes.

    The class order is ``class_order`` if given, else a permutation drawn from ``seed``
    (``numpy.random.default_rng(seed)``); PyCIL/DynaMMo use ``np.random.seed(1993)`` permutations,
    MagMax fixed lists: pass those explicitly to reproduce them.
    """
    order = tuple(int(c) for c in (class_order if class_order is not None
                                   else np.random.default_rng(seed).permutation(data.num_classes)))
    if sorted(order) != list(range(data.num_classes)):
        raise ValueError(f"class_order {order} is not a permutation of 0..{data.num_classes - 1}")
    tasks = []
    for i, classes in enumerate(task_class_splits(order, n_tasks)):
        pick = {split: data.split(split).subset(np.flatnonzero(np.isin(data.split(split).labels.numpy(), classes)))
                for split in ("train", "val", "test")}
        tasks.append(Task(i, classes, pick["train"], pick["val"], pick["test"],
                          name=f"task {i + 1}: " + ", ".join(data.classes[c] for c in classes)))
    return Scenario(data.name, "class-incremental", tasks, data.classes, order)


def dataset_incremental(datasets: Sequence[DatasetSplits]) -> Scenario:
    """One dataset per task; dataset k's labels are shifted past the classes of datasets < k."""
    tasks, names, offset = [], [], 0
    for i, data in enumerate(datasets):
        shift = {split: data.split(split).with_labels(data.split(split).labels + offset)
                 for split in ("train", "val", "test")}
        classes = tuple(range(offset, offset + data.num_classes))
        tasks.append(Task(i, classes, shift["train"], shift["val"], shift["test"], name=data.name))
        names += [f"{data.name}:{c}" for c in data.classes]
        offset += data.num_classes
    return Scenario("+".join(d.name for d in datasets), "dataset-incremental", tasks, tuple(names),
                    tuple(range(offset)))
