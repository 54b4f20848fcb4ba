"""The book's two shared continual benchmarks, so that every chapter and the leaderboard run
methods on exactly the same tasks, splits and backbone (and can reuse each other's cached runs).

- ``ham10000-cil``: HAM10000 dermoscopy (7 classes) cut into 3 class-incremental tasks
  (2/2/3 classes) in a class order fixed by seed 1993 (PyCIL's and DynaMMo's order seed).
- ``medical-dil``: a dataset-incremental sequence retina -> skin -> pathology
  (RetinaMNIST 5 grades, HAM10000 7 classes, PathMNIST-1k 9 tissues), one dataset per task,
  disjoint label sets (21 classes in all).

Backbone: the book's ResNet-18 (``cpu``/``smoke`` scale, pretrained on natural images).
"""
from __future__ import annotations

from cmm_utils.core.data import Scenario, class_incremental, dataset_incremental, load_dataset
from cmm_utils.core.models import BOOK_IMAGE_SIZE

CLASS_ORDER_SEED = 1993
BENCHMARKS = {
    "ham10000-cil": {"kind": "class-incremental", "datasets": ("ham10000",), "n_tasks": 3},
    "medical-dil": {"kind": "dataset-incremental", "datasets": ("retinamnist", "ham10000", "pathmnist_1k"),
                    "n_tasks": 3},
}
BACKBONE = "resnet18"
SMOKE_MAX_PER_SPLIT = 300


def load_benchmark(name: str, profile: str, seed: int = 0) -> Scenario:
    """The scenario ``name`` at the profile's resolution; ``smoke`` keeps a small subset per split.

    ``seed`` fixes the made splits (val/test carved from pools); the class order is fixed by
    ``CLASS_ORDER_SEED`` so that seeds vary training, not the task definition.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    cap = SMOKE_MAX_PER_SPLIT if profile == "smoke" else None
    data = [load_dataset(d, seed=seed, size=BOOK_IMAGE_SIZE[profile], channels=3, max_per_split=cap)
            for d in spec["datasets"]]
    if spec["kind"] == "class-incremental":
        return class_incremental(data[0], spec["n_tasks"], seed=CLASS_ORDER_SEED)
    return dataset_incremental(data)
