"""Artifacts, caches and checkpoints: keyed by configuration, written atomically, never pickled.

- ``config_key(cfg)``: a short hash of a JSON-able configuration; caches are named by it, so a
  changed parameter never reuses a stale result and an unchanged one is never recomputed.
- ``save_state``/``load_state``: safetensors files (plus a JSON sidecar of metadata), written to a
  temporary file and renamed, so an interrupted run leaves no half-written checkpoint; a damaged
  file (truncated by a full disk, edited by hand) is a :class:`DamagedFile` naming it, and the
  caches (``cached_state``, ``continual.cached_run``) recompute it with a warning.
- ``results_dir(profile, chapter)``: where a chapter's CSV/npz artifacts live.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """``$CMM_CACHE``, else ``<repo>/.cache`` (pretrained backbones, per-task checkpoints)."""
    return Path(os.environ.get("CMM_CACHE") or REPO_ROOT / ".cache").expanduser()


def results_root() -> Path:
    """``$CMM_RESULTS``, else ``<repo>/results`` (artifacts the book's figures read)."""
    return Path(os.environ.get("CMM_RESULTS") or REPO_ROOT / "results").expanduser()


def results_dir(profile: str, chapter: str) -> Path:
    path = results_root() / profile / chapter
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_key(cfg: Any, length: int = 12) -> str:
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextmanager
def atomic_path(dest: Path | str):
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=dest.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: Path | str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_csv(path: Path | str, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


class DamagedFile(ValueError):
    """A cache or checkpoint file that exists but cannot be read back (truncated, corrupt)."""


def save_state(path: Path | str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
    """Tensors to safetensors (contiguous CPU copies), ``meta`` to a ``.json`` sidecar. The sidecar is
    written first, so a tensors file that exists always has its metadata beside it."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if meta is not None:
        write_json(path.with_suffix(".json"), dict(meta))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def with_prefix(prefix: str, state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``state`` with every key prefixed: several state dicts packed into one safetensors file."""
    return {} if state is None else {prefix + k: v for k, v in state.items()}


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, prefix removed (the inverse of :func:`with_prefix`)."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def load_state(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors saved at ``path``; a damaged file is a :class:`DamagedFile` naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DamagedFile(f"{path}: damaged safetensors file ({type(err).__name__}: {err}); delete it to "
                          "recompute it (`make clean-cache` clears every cache)") from err


def load_meta(path: Path | str) -> dict[str, Any]:
    """The JSON sidecar of ``path`` (``{}`` when there is none); unparsable is a :class:`DamagedFile`."""
    side = Path(path).with_suffix(".json")
    if not side.exists():
        return {}
    return read_json(side)


def read_json(path: Path | str) -> Any:
    """A JSON file; half-written or unparsable is a :class:`DamagedFile` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise DamagedFile(f"{path}: damaged JSON ({err}); delete it to recompute it") from err


def warn_damaged(path: Path | str, err: Exception) -> None:
    """The one warning every cache gives before recomputing a damaged entry."""
    warnings.warn(f"damaged cache entry {path} ({err}); recomputing it", RuntimeWarning, stacklevel=3)


@contextmanager
def cache_lock(path: Path | str):
    """An exclusive lock on ``<path>.lock``: one process computes an entry, the others wait, then read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_cached_state(path: Path | str, require_meta: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors at ``path`` and their sidecar; None when absent, or (with a ``RuntimeWarning``
    naming the file) damaged, so the caller recomputes instead of crashing or using a half file.
    ``require_meta``: a missing sidecar counts as damage (``save_state`` writes it first)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if require_meta and not path.with_suffix(".json").exists():
            raise DamagedFile(f"{path}: its metadata sidecar {path.with_suffix('.json').name} is missing")
        return load_state(path), load_meta(path)
    except DamagedFile as err:
        warn_damaged(path, err)
        return None


def cached_state(path: Path | str, compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """The state at ``path`` and its metadata, else ``compute()`` them, save atomically and return
    them; the flag says whether they came from the cache (resume on rerun). One process computes:
    concurrent callers (parallel notebooks, test workers) wait on a lock file beside ``path``, then
    load what it saved instead of training the same thing again. A damaged entry (truncated
    tensors, unparsable or missing sidecar) is recomputed with a ``RuntimeWarning`` naming it."""
    path = Path(path)
    with cache_lock(path):
        found = read_cached_state(path)
        if found is not None:
            return found[0], found[1], True
        state, meta = compute()  # an exception (e.g. a diverged fit) propagates: nothing is saved
        save_state(path, state, meta)
        return dict(state), dict(meta), False
