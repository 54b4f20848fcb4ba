"""Damaged cache entries are detected on load and recomputed with a warning; concurrent callers of
one key compute once; a run that fails leaves nothing behind."""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import torch

from cmm_utils.core.continual import ContinualResult, cache_path, cached_run, load_cached_runs
from cmm_utils.core.io import DamagedFile, cached_state, load_meta, load_state, save_state
from cmm_utils.core.train import DivergedError

CFG = {"method": "m", "seed": 0, "lr": 0.1, "tasks": (0, 1)}


@pytest.fixture(autouse=True)
def private_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("CMM_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("CMM_CACHE", str(tmp_path / "cache"))


def counted_state(calls: list):
    def compute():
        calls.append(1)
        return {"w": torch.arange(1000, dtype=torch.float32)}, {"score": 0.5}
    return compute


def counted_run(calls: list, delay: float = 0.0):
    def run():
        calls.append(1)
        time.sleep(delay)
        return ContinualResult("m", [[0.5, float("nan")], [0.4, 0.6]], [0.5, 0.5], bytes_stored=10)
    return run


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- io.cached_state / load_state ----------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated tensors", "empty tensors", "truncated sidecar", "missing sidecar"])
def test_damaged_cached_state_is_recomputed_with_a_warning(tmp_path, damage):
    path, calls = tmp_path / "cache" / "b.safetensors", []
    first, meta, _ = cached_state(path, counted_state(calls))
    side = path.with_suffix(".json")
    {"truncated tensors": lambda: cut(path), "empty tensors": lambda: path.write_bytes(b""),
     "truncated sidecar": lambda: cut(side), "missing sidecar": side.unlink}[damage]()
    with pytest.warns(RuntimeWarning, match=f"damaged cache entry {path}.*recomputing"):
        again, meta_again, cached = cached_state(path, counted_state(calls))
    assert len(calls) == 2 and not cached
    assert torch.equal(first["w"], again["w"]) and meta == meta_again
    _, _, cached = cached_state(path, counted_state(calls))  # repaired: read back, not recomputed
    assert cached and len(calls) == 2


def test_load_state_and_load_meta_name_a_damaged_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state(path, {"w": torch.ones(100)}, {"task": 1})
    cut(path)
    cut(path.with_suffix(".json"))
    with pytest.raises(DamagedFile, match=f"{path}: damaged safetensors file .*delete it to recompute"):
        load_state(path)
    with pytest.raises(DamagedFile, match=f"{path.with_suffix('.json')}: damaged JSON"):
        load_meta(path)
    assert issubclass(DamagedFile, ValueError)  # what checkpoint readers already catch


# ---- continual.cached_run --------------------------------------------------------------------

def _damage_json(path: Path, damage: str) -> None:
    stored = json.loads(path.read_text())
    if damage == "half-written":
        cut(path)
    elif damage == "empty":
        path.write_text("")
    elif damage == "not an object":
        path.write_text("[1, 2]")
    elif damage == "result fields missing":
        path.write_text(json.dumps({**stored, "result": {"method": "m"}}))
    elif damage == "stale config":
        path.write_text(json.dumps({**stored, "config": {**CFG, "lr": 0.01},
                                    "result": {**stored["result"], "acc_seen": [0.1, 0.1]}}))


@pytest.mark.parametrize("damage", ["half-written", "empty", "not an object", "result fields missing", "stale config"])
def test_damaged_cached_run_is_recomputed_with_a_warning(damage):
    calls = []
    first = cached_run("smoke", "ch", CFG, counted_run(calls))
    path = cache_path("smoke", "ch", CFG)
    _damage_json(path, damage)
    with pytest.warns(RuntimeWarning, match=f"damaged cache entry {path}"):
        again = cached_run("smoke", "ch", CFG, counted_run(calls))
    assert len(calls) == 2 and again.acc_seen == first.acc_seen == [0.5, 0.5]
    assert again.R[1] == first.R[1] and json.loads(path.read_text())["config"]["lr"] == 0.1
    cached_run("smoke", "ch", CFG, counted_run(calls))
    assert len(calls) == 2


def test_config_with_tuples_and_nan_reads_back_as_the_same_config():
    """The stale-config check must not reject a faithful entry: JSON turns tuples into lists, NaN stays NaN."""
    calls, cfg = [], {**CFG, "tolerance": float("nan"), "nested": {"ks": (1, 2)}}
    cached_run("smoke", "ch", cfg, counted_run(calls))
    cached_run("smoke", "ch", cfg, counted_run(calls))
    assert len(calls) == 1


def test_diverged_run_leaves_no_cached_file_and_reruns():
    def diverges():
        raise DivergedError("magmax task 1: loss is nan at step 3 of 10 (0-based; lr 0.05)")

    with pytest.raises(DivergedError):
        cached_run("smoke", "ch", CFG, diverges)
    path = cache_path("smoke", "ch", CFG)
    assert not path.exists() and not [p for p in path.parent.iterdir() if p.suffix == ".json"]
    calls = []
    cached_run("smoke", "ch", CFG, counted_run(calls))
    assert len(calls) == 1 and path.exists()


def test_leaderboard_listing_skips_damaged_and_temporary_files():
    cached_run("smoke", "ch", CFG, counted_run([]))
    other = {**CFG, "seed": 1}
    cached_run("smoke", "ch", other, counted_run([]))
    folder = cache_path("smoke", "ch", CFG).parent
    cut(cache_path("smoke", "ch", other))
    (folder / ".m-123.json.tmp.json").write_text("{half")  # a write in progress (atomic_path's name)
    with pytest.warns(RuntimeWarning, match="damaged cache entry"):
        runs = load_cached_runs("smoke", "ch")
    assert [r["config"]["seed"] for r in runs] == [0]


def test_concurrent_threads_compute_one_key_once():
    calls, results = [], []
    workers = [threading.Thread(target=lambda: results.append(cached_run("smoke", "ch", CFG, counted_run(calls, 0.3))))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(r.acc_seen == results[0].acc_seen and r.R[1] == results[0].R[1] for r in results)


def _worker(log: str, out: str) -> None:
    """One process: ``cached_run`` for the shared key, its result written to ``out``."""
    def run():
        with open(log, "a") as f:
            f.write("computed\n")
        time.sleep(1.0)
        return ContinualResult("m", [[0.25]], [0.25], bytes_stored=7)

    result = cached_run("smoke", "ch", {"method": "m", "seed": 0}, run)
    Path(out).write_text(json.dumps({"acc_seen": result.acc_seen, "bytes": result.bytes_stored}))


def test_two_processes_on_one_key_compute_once(tmp_path):
    """Forked (the parent's imports are reused: seconds, not a fresh torch import per process)."""
    log, outs = tmp_path / "computed.log", [tmp_path / f"out{i}.json" for i in range(2)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(log), str(out))) for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [json.loads(out.read_text()) for out in outs] == [{"acc_seen": [0.25], "bytes": 7}] * 2
    assert log.read_text().count("computed") == 1
    path = cache_path("smoke", "ch", {"method": "m", "seed": 0})
    assert json.loads(path.read_text())["result"]["bytes_stored"] == 7


def test_read_cached_state_for_direct_load_state_users(tmp_path):
    """What a chapter that loads its own checkpoints calls: None (warned) instead of a crash."""
    from cmm_utils.core.io import read_cached_state

    path = tmp_path / "ck.safetensors"
    assert read_cached_state(path) is None
    save_state(path, {"w": torch.ones(3)})
    assert torch.equal(read_cached_state(path, require_meta=False)[0]["w"], torch.ones(3))
    with pytest.warns(RuntimeWarning, match="sidecar ck.json is missing"):
        assert read_cached_state(path) is None
    cut(path)
    with pytest.warns(RuntimeWarning, match=f"damaged cache entry {path}"):
        assert read_cached_state(path, require_meta=False) is None


def test_a_damaged_magmax_checkpoint_is_retrained_not_a_crash(tmp_path, monkeypatch):
    """MagMax keeps one file per fine-tuned task; a truncated one is warned about and retrained."""
    from cmm_utils.papers.magmax.experiment import MagMaxRun

    run = MagMaxRun.__new__(MagMaxRun)  # only the checkpoint logic: no scenario, no training
    run._states, run._meta, run.settings = {}, {}, {"keep_states": False}
    run._path = lambda name: tmp_path / f"{name}.safetensors"
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.full((64,), float(len(calls)))}, {"steps": 3}

    first = run._load_or_train("task0", train)
    path = tmp_path / "task0.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match="task0.safetensors"):
        again = run._load_or_train("task0", train)
    assert len(calls) == 2 and torch.equal(again["w"], torch.full((64,), 2.0)) and not torch.equal(first["w"], again["w"])
    assert torch.equal(run._load_or_train("task0", train)["w"], again["w"]) and len(calls) == 2  # now read back
