"""One seed derivation for every chapter: a run seeded ``seed`` gives task ``t`` the seed
``1000·seed + offset + t``, so tasks, stages and seeds never share a random stream (up to 500 tasks
per stage). ``offset`` names the stage: 0 for a task's training and subsampling, :data:`HEAD_STAGE`
for a second stage on the same task (DynaMMo's balanced head fine-tuning, DER's classifier
re-training), :data:`JOINT` for a joint model trained once on every task.
"""
from __future__ import annotations

HEAD_STAGE = 500
JOINT = 999


def task_seed(seed: int, task: int = 0, offset: int = 0) -> int:
    """The seed of ``task`` (stage ``offset``) in a run seeded ``seed``."""
    if not 0 <= task < HEAD_STAGE and offset != JOINT:
        raise ValueError(f"task index {task} outside 0..{HEAD_STAGE - 1}: seeds of two stages would collide")
    return 1000 * int(seed) + int(offset) + int(task)
