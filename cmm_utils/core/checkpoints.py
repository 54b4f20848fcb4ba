"""Per-task checkpoints of one run, the resume logic every chapter shares.

A run that trains tasks ``0..T-1`` in turn saves, after task ``t``, one safetensors file
``<name>-task<t>.safetensors`` (all the tensors it needs to go on) with a JSON sidecar
``{"tasks": t + 1, ...}``; older files of the run are removed, so the folder holds the latest
only. On rerun :meth:`TaskCheckpoints.latest` returns what the last finished task left, and the
loop starts at the next task. A damaged checkpoint (truncated file, unreadable or mismatched
sidecar) is reported with a warning and ignored: the run restarts from the task before it or
from nothing, never from a half-written state.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError

from cmm_utils.core.io import load_meta, load_state, save_state


@dataclass
class Resumed:
    """What the last finished task left: ``tasks`` done (0: start afresh), its tensors and metadata."""
    tasks: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


KEEP = ("latest", "all")


class TaskCheckpoints:
    """Checkpoints named ``<name>-task<t>`` under ``directory`` (``None``: keep nothing).

    ``keep="latest"`` (the default) holds the last finished task only: enough for a run whose state
    after task ``t`` carries everything (a merged model, a memory). ``keep="all"`` holds one file per
    task, for a method that needs every task's weights at the end (MagMax merges every ``τ_t``).
    """

    def __init__(self, directory: Path | str | None, name: str, keep: str = "latest"):
        if keep not in KEEP:
            raise ValueError(f"unknown keep={keep!r}; valid: {', '.join(KEEP)}")
        self.directory = None if directory is None else Path(directory)
        self.name = name
        self.keep = keep

    def path(self, task: int) -> Path:
        return self.directory / f"{self.name}-task{task}.safetensors"

    def _saved(self) -> list[Path]:
        if self.directory is None or not self.directory.exists():
            return []
        prefix = f"{self.name}-task"
        found = [p for p in self.directory.glob(f"{prefix}*.safetensors") if p.stem[len(prefix):].isdigit()]
        return sorted(found, key=lambda p: int(p.stem[len(prefix):]))

    def load(self, task: int) -> Resumed | None:
        """Task ``task``'s checkpoint, or ``None`` when it is missing or damaged (then removed, with
        a warning, so it is recomputed)."""
        if self.directory is None:
            return None
        path = self.path(task)
        if not path.exists():
            return None
        try:
            meta = load_meta(path)
            if meta.get("tasks") != task + 1:
                raise ValueError(f"sidecar says tasks={meta.get('tasks')!r}, file is task {task}")
            return Resumed(task + 1, load_state(path), meta)
        except (OSError, ValueError, SafetensorError) as err:  # JSONDecodeError is a ValueError
            warnings.warn(f"ignoring damaged checkpoint {path} ({type(err).__name__}: {err}); recomputing",
                          RuntimeWarning, stacklevel=3)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            return None

    def latest(self) -> Resumed:
        """What the last readable checkpoint holds (``Resumed()``: start afresh)."""
        for path in reversed(self._saved()):
            found = self.load(int(path.stem[len(self.name) + 5:]))
            if found is not None:
                return found
        return Resumed()

    def clear(self) -> None:
        """Remove every checkpoint of the run (after its result is cached)."""
        for path in self._saved():
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)

    def save(self, task: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Atomically save task ``task``'s checkpoint, then (``keep="latest"``) drop the older ones."""
        if self.directory is None:
            return
        path = self.path(task)
        save_state(path, tensors, {**(meta or {}), "tasks": task + 1})
        if self.keep == "all":
            return
        for old in self._saved():
            if old != path:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
