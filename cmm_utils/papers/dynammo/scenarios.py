"""The DynaMMo chapter's scenarios (Qazi et al., MIUA 2024, arXiv:2404.14099): the 28 px stand-ins
for SKIN8 and PATH16, the book's benchmarks, the paper's datasets with PyCIL's class order and
PATH16's uneven task sizes, any dataset path, and the exemplar budget of each."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cmm_utils.core.benchmarks import CLASS_ORDER_SEED, SMOKE_MAX_PER_SPLIT, load_benchmark
from cmm_utils.core.data import Scenario, Task, class_incremental, load_dataset
from cmm_utils.core.models import BOOK_IMAGE_SIZE
from cmm_utils.core.profiles import check_profile

# ``stands_in_for``: the paper dataset a 28 px scenario replaces. ``memory``: exemplar budget;
# None = 5 per class of the scenario, which is exactly the paper's budget for SKIN8 (40 / 8
# classes) and PATH16 (80 / 16).
SCENARIOS = {
    "ham10000-cil": {"kind": "benchmark", "stands_in_for": "SKIN8", "metric": "mcr", "memory": None},
    "pathmnist_1k": {"kind": "class-incremental", "dataset": "pathmnist_1k", "n_tasks": 4,
                     "stands_in_for": "PATH16", "metric": "acc", "memory": None},
    "medical-dil": {"kind": "benchmark", "stands_in_for": None, "metric": "acc", "memory": None},
    "cifar100": {"kind": "class-incremental", "dataset": "cifar100", "n_tasks": 10, "order": "np1993",
                 "stands_in_for": "CIFAR100", "metric": "acc", "memory": 2000},
    "skin8": {"kind": "groups", "dataset": "skin8", "task_sizes": (2, 2, 2, 2), "stands_in_for": "SKIN8",
              "metric": "mcr", "memory": 40},
    "path16": {"kind": "groups", "dataset": "path16", "task_sizes": (2, 2, 2, 2, 4, 2, 2),
               "stands_in_for": "PATH16", "metric": "acc", "memory": 80},
}
MEMORY_PER_CLASS = 5
SMOKE_PATH_CAP = 100  # images per split of a user's dataset in ``smoke`` (5 methods x T tasks in seconds)


def pycil_class_order(num_classes: int, seed: int = 1993) -> list[int]:
    """PyCIL's / DynaMMo's class order: ``np.random.seed(seed); np.random.permutation(C)``."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return [int(c) for c in np.random.permutation(num_classes)]
    finally:
        np.random.set_state(state)


def grouped_scenario(data, task_sizes: Sequence[int], class_order: Sequence[int] | None = None) -> Scenario:
    """Tasks of the given sizes over ``class_order`` (default 0..C-1), e.g. PATH16's [2,2,2,2,4,2,2]."""
    order = list(class_order) if class_order is not None else list(range(data.num_classes))
    if sum(task_sizes) != len(order) or sorted(order) != list(range(data.num_classes)):
        raise ValueError(f"task_sizes {list(task_sizes)} must cover the {data.num_classes} classes once")
    tasks, start = [], 0
    for i, n in enumerate(task_sizes):
        classes = tuple(sorted(order[start:start + n]))
        start += n
        pick = {s: data.split(s).subset(np.flatnonzero(np.isin(data.split(s).labels.numpy(), classes)))
                for s in ("train", "val", "test")}
        tasks.append(Task(i, classes, pick["train"], pick["val"], pick["test"],
                          name=f"task {i + 1}: " + ", ".join(data.classes[c] for c in classes)))
    return Scenario(data.name, "class-incremental", tasks, data.classes, tuple(order))


def load_scenario(name: str, profile: str, seed: int = 0, n_tasks: int | None = None) -> Scenario:
    """A scenario of :data:`SCENARIOS` or a dataset path (class-incremental over ``n_tasks`` tasks,
    class order from seed 1993) at the profile's resolution; ``smoke`` keeps a small subset."""
    check_profile(profile)
    size = BOOK_IMAGE_SIZE[profile]
    cap = SMOKE_MAX_PER_SPLIT if profile == "smoke" else None
    spec = SCENARIOS.get(name)
    if spec is None:
        if not (str(name).endswith(".npz") or "/" in str(name) or Path(str(name)).exists()):
            raise ValueError(f"unknown scenario {name!r}; valid: {', '.join(SCENARIOS)} or a dataset path")
        cap = SMOKE_PATH_CAP if profile == "smoke" else None
        data = load_dataset(name, seed=seed, size=size, channels=3, max_per_split=cap)
        return class_incremental(data, n_tasks or 5, seed=CLASS_ORDER_SEED)
    if spec["kind"] == "benchmark":
        return load_benchmark(name, profile, seed)
    # SKIN8, PATH16 and CIFAR-100 (paper) keep their whole training sets: DynaMMo reads no validation split
    data = load_dataset(spec["dataset"], seed=seed, size=size, channels=3, max_per_split=cap,
                        val_fraction=0 if profile == "paper" else None)
    if spec["kind"] == "groups":
        return grouped_scenario(data, spec["task_sizes"])
    order = pycil_class_order(data.num_classes) if spec.get("order") == "np1993" else None
    return class_incremental(data, n_tasks or spec["n_tasks"], seed=CLASS_ORDER_SEED, class_order=order)


def memory_budget(name: str, scenario: Scenario) -> int:
    spec = SCENARIOS.get(name, {})
    return spec.get("memory") or MEMORY_PER_CLASS * scenario.num_classes


def scenario_label(name: str) -> str:
    """How the page names a scenario: its key, or a dataset path's file stem."""
    return name if name in SCENARIOS else Path(name).stem


def headline_metric(name: str) -> str:
    """The authors' metric for a scenario, as a column of the page's summary: mean class recall
    for skin lesions (``avg_mcr``), average incremental accuracy otherwise."""
    return "avg_mcr" if SCENARIOS.get(name, {}).get("metric") == "mcr" else "avg_incremental_acc"
