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


class TaskCheckpoints:
    """Checkpoints named ``<name>-task<t>`` under ``directory`` (``None``: keep nothing)."""

    def __init__(self, directory: Path | str | None, name: str):
        self.directory = None if directory is None else Path(directory)
        self.name = name

    def path(self, task: int) -> Path:
        return self.directory / f"{self.name}-task{task}.safetensors"

    def _saved(self) -> list[Path]:
        if self.directory is None or not self.directory.exists():
            return []
        prefix = f"{self.name}-task"
        found = [p for p in self.directory.glob(f"{prefix}*.safetensors") if p.stem[len(prefix):].isdigit()]
        return sorted(found, key=lambda p: int(p.stem[len(prefix):]))

    def latest(self) -> Resumed:
        for path in reversed(self._saved()):
            task = int(path.stem[len(self.name) + 5:])
            try:
                meta = load_meta(path)
                if meta.get("tasks") != task + 1:
                    raise ValueError(f"sidecar says tasks={meta.get('tasks')!r}, file is task {task}")
                return Resumed(task + 1, load_state(path), meta)
            except (OSError, ValueError, SafetensorError) as err:  # JSONDecodeError is a ValueError
                warnings.warn(f"ignoring damaged checkpoint {path} ({type(err).__name__}: {err}); recomputing",
                              RuntimeWarning, stacklevel=2)
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
        return Resumed()

    def save(self, task: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Atomically save task ``task``'s checkpoint, then drop the run's older ones."""
        if self.directory is None:
            return
        path = self.path(task)
        save_state(path, tensors, {**(meta or {}), "tasks": task + 1})
        for old in self._saved():
            if old != path:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
