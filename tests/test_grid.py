"""The grid (``cmm_utils.grid``): units from profiles, cached units skipped, the local and SLURM
executors give the same bytes as a sequential run, a cancelled job resumes from its checkpoint,
a failing run is reported with its key and traceback and leaves nothing in the cache.

A small fake paper (:class:`FakePaper`, addressed as ``tests.test_grid:FakePaper``) stands in
where the test needs control (slow tasks to cancel, a method that raises); one real smoke unit
(DynaMMo's fine-tuning baseline on HAM10000) checks the real papers' caches come back the same.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from cmm_utils import grid
from cmm_utils.core.checkpoints import TaskCheckpoints
from cmm_utils.core.continual import ContinualResult, cache_path, cached_run
from cmm_utils.core.io import cache_root, results_root
from cmm_utils.core.profiles import PROFILES, check_table
from tests.compare_results import compare
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

REPO = Path(__file__).resolve().parents[1]
FAKE = "tests.test_grid:FakePaper"
FAKE_CACHED = "tests.test_grid:FakePaperWithIsCached"
REAL = grid.GridUnit("dynammo", "ham10000-cil", 0, ("finetune",))


class FakePaper:
    """The paper interface in a few lines: ``tasks`` tasks per run, each checkpointed (``FAKE_TASK_S``
    seconds each), every process start logged under the cache root; ``boom`` fails after task 0."""
    CHAPTER, TITLE = "fake", "A fake paper for the grid tests"
    METHODS = ("slow", "fast", "boom")
    PROFILES = check_table("fake", {p: {"seeds": 2, "benchmarks": ["b1"], "methods": ["slow", "fast"], "tasks": 3}
                                    for p in PROFILES})

    @staticmethod
    def config(method, benchmark, profile, seed):
        return {"method": method, "benchmark": benchmark, "profile": profile, "seed": seed, "chapter": "fake"}

    @classmethod
    def run(cls, method, benchmark, profile, seed, **overrides):
        if method not in cls.METHODS:
            raise ValueError(f"unknown fake method {method!r}; valid: {cls.METHODS}")
        return cached_run(profile, "fake", cls.config(method, benchmark, profile, seed),
                          lambda: cls._train(method, benchmark, seed, cls.PROFILES[profile]["tasks"]))

    @staticmethod
    def _train(method, benchmark, seed, tasks):
        ck = TaskCheckpoints(cache_root() / "fake" / f"{method}-{benchmark}-{seed}", "run")
        resumed = ck.latest()
        cache_root().mkdir(parents=True, exist_ok=True)
        with open(cache_root() / "fake-starts.log", "a") as log:
            log.write(f"{method} {benchmark} {seed} start={resumed.tasks}\n")
        w = resumed.tensors.get("w", torch.full((4,), float(seed)))
        for t in range(resumed.tasks, tasks):
            time.sleep(float(os.environ.get("FAKE_TASK_S", "0")))
            w = w * 0.5 + t + len(method)
            ck.save(t, {"w": w})
            if method == "boom":
                raise RuntimeError(f"boom after task {t}")
        acc = [float(torch.sigmoid(w).mean())] * tasks
        return ContinualResult(method, [acc] * tasks, acc, train_seconds=time.time() % 7)


class FakePaperWithIsCached(FakePaper):
    """The same paper, answering ``is_cached`` from its own cache instead of the grid's markers."""

    @classmethod
    def is_cached(cls, method, benchmark, profile, seed):
        return cache_path(profile, "fake", cls.config(method, benchmark, profile, seed)).exists()


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """Own cache and results roots in ``tmp_path`` (never another agent's); returns a switcher."""
    def use(name: str) -> Path:
        root = tmp_path / name
        (root / "cache").mkdir(parents=True, exist_ok=True)
        if (REPO / ".cache" / "backbones").is_dir():  # read only: the book's pretrained backbones
            shutil.copytree(REPO / ".cache" / "backbones", root / "cache" / "backbones", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.lock"))
        monkeypatch.setenv("CMM_CACHE", str(root / "cache"))
        monkeypatch.setenv("CMM_RESULTS", str(root / "results"))
        return root
    monkeypatch.setenv("CMM_DATA", os.environ.get("CMM_DATA", str(REPO.parent / "shared" / "data")))
    monkeypatch.setenv("FAKE_TASK_S", "0")
    return use


def sequential(units, profile="smoke"):
    """The reference: every run of the units in this process, one after another, single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for u in units:
            for m in u.methods:
                grid.load_paper(u.paper).run(m, u.benchmark, profile, u.seed)
    finally:
        torch.set_num_threads(threads)


def same_results(a: Path, b: Path) -> dict:
    """compare() on the result trees without the grid's markers; nothing may differ or be missing."""
    for root in (a, b):
        shutil.rmtree(root / "smoke" / "grid", ignore_errors=True)
    report = compare(a, b)
    assert report["identical"] or report["timings only"], report
    assert not report["different"] and not report["missing"], report
    assert not compare(b, a)["missing"], "the grid wrote results the sequential run did not"
    return report


def statuses(outcomes):
    return [o.status for o in outcomes]


def test_grid_lists_units_from_profiles_and_skips_cached(roots):
    roots("a")
    units = grid.grid_units("smoke", [FAKE])
    assert units == [grid.GridUnit(FAKE, "b1", s, ("slow", "fast")) for s in (0, 1)]
    assert grid.grid_units("smoke", [FAKE], methods=["fast"])[0].methods == ("fast",)
    assert len({u.key("smoke") for u in units}) == 2
    opts = grid.Options(executor="debug")
    assert statuses(grid.run_grid("smoke", [FAKE], opts)) == ["done", "done"]
    assert statuses(grid.run_grid("smoke", [FAKE], opts)) == ["cached", "cached"]
    assert all(grid.marker_path(u, "smoke").exists() for u in units)
    # a paper's own is_cached counts without markers
    roots("b")
    assert statuses(grid.run_grid("smoke", [FAKE_CACHED], opts)) == ["done", "done"]
    shutil.rmtree(results_root() / "smoke" / "grid")
    assert statuses(grid.run_grid("smoke", [FAKE_CACHED], opts)) == ["cached", "cached"]
    # the real papers' smoke grid lists without running anything
    real = grid.grid_units("smoke")
    assert {u.paper for u in real} <= set(grid.PAPERS) and all(u.methods for u in real)


@pytest.mark.parametrize("call, message", [
    (lambda: grid.run_grid("smoke", [FAKE], grid.Options(executor="pbs")), "unknown executor 'pbs'; valid: slurm"),
    (lambda: grid.grid_units("smoke", ["nope"]), "unknown chapter(s) ['nope']; valid: magmax"),
    (lambda: grid.grid_units("huge", [FAKE]), "unknown profile 'huge'; valid: smoke"),
])
def test_bad_values_are_named_with_the_valid_ones(roots, call, message):
    roots("a")
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_cli_parses_options_and_config(tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("executor: slurm\npartition: gpu\ngpus_per_job: 1\nsbatch: {account: lab, reservation: course}\n")
    args = grid.parse_args(["--config", str(cfg), "--profile", "paper", "--time-min", "30"])
    assert (args.executor, args.partition, args.gpus_per_job, args.time_min) == ("slurm", "gpu", 1, 30)
    params = grid._slurm_params(grid.Options("slurm", partition="gpu", gpus_per_job=1, time_min=30, sbatch=args.sbatch))
    assert params["account"] == "lab" and params["additional_parameters"] == {"reservation": "course"}
    assert params["gpus_per_node"] == 1 and params["partition"] == "gpu" and params["time"] == 30
    with pytest.raises(SystemExit):
        grid.parse_args(["--executor", "pbs"])


def test_local_executor_matches_a_sequential_run(roots):
    units = [*grid.grid_units("smoke", [FAKE]), REAL]
    a = roots("seq")
    sequential(units)
    b = roots("local")
    _share_backbones(a, b)
    outcomes = grid.run_grid("smoke", opts=grid.Options(executor="local", parallel=2), units=units)
    assert statuses(outcomes) == ["done"] * 3, grid.report(outcomes)
    assert statuses(grid.run_grid("smoke", opts=grid.Options(executor="local"), units=units)) == ["cached"] * 3
    same_results(a / "results", b / "results")


def _share_backbones(src: Path, dest: Path) -> None:
    """The pretrained backbone is the same file for every run; copying it saves pretraining twice."""
    if (src / "cache" / "backbones").exists():
        shutil.copytree(src / "cache" / "backbones", dest / "cache" / "backbones", dirs_exist_ok=True)


def test_slurm_job_array_matches_a_sequential_run(roots, slurm_cluster):  # noqa: F811
    units = [*grid.grid_units("smoke", [FAKE]), REAL]
    a = roots("seq")
    sequential(units)
    b = roots("slurm")
    _share_backbones(a, b)
    opts = grid.Options(executor="slurm", partition=slurm_cluster.partition, time_min=10)
    outcomes = grid.run_grid("smoke", opts=opts, units=units)
    assert statuses(outcomes) == ["done"] * 3, grid.report(outcomes)
    assert len({o.job_id.split("_")[0] for o in outcomes}) == 1, "one job array"
    same_results(a / "results", b / "results")


def _slurm_job_past_its_first_checkpoint(unit, roots, slurm_cluster, monkeypatch):
    """A sequential reference run of ``unit`` (folder ``a``), then the same unit submitted to SLURM
    (folder ``b``) in a background thread, returned once the job has checkpointed a task: (a, b,
    options, the list the grid's outcomes land in, the thread)."""
    a = roots("seq")
    sequential([unit])
    b = roots("slurm")
    monkeypatch.setenv("FAKE_TASK_S", "3")
    opts = grid.Options(executor="slurm", partition=slurm_cluster.partition, time_min=10)
    outcomes: list = []
    thread = threading.Thread(target=lambda: outcomes.extend(grid.run_grid("smoke", opts=opts, units=[unit])))
    thread.start()
    ck = b / "cache" / "fake" / f"{unit.methods[0]}-{unit.benchmark}-{unit.seed}"
    deadline = time.time() + 120
    while not list(ck.glob("run-task*.safetensors")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(ck.glob("run-task*.safetensors")), "the job never checkpointed a task"
    return a, b, opts, outcomes, thread


def test_cancelled_slurm_job_resumes_from_its_checkpoint(roots, slurm_cluster, monkeypatch):  # noqa: F811
    unit = grid.GridUnit(FAKE, "b1", 0, ("slow",))
    a, b, opts, first, thread = _slurm_job_past_its_first_checkpoint(unit, roots, slurm_cluster, monkeypatch)
    subprocess.run(["scancel", "-p", slurm_cluster.partition], check=True, env=slurm_cluster.env)
    thread.join(timeout=120)
    assert statuses(first) == ["failed"] and "cancelled" in first[0].error, grid.report(first)
    assert not grid.marker_path(unit, "smoke").exists()
    monkeypatch.setenv("FAKE_TASK_S", "0")
    second = grid.run_grid("smoke", opts=opts, units=[unit])
    assert statuses(second) == ["done"], grid.report(second)
    starts = (b / "cache" / "fake-starts.log").read_text().split()
    assert starts[3] == "start=0" and starts[-1] != "start=0", f"the rerun did not resume: {starts}"
    same_results(a / "results", b / "results")


def test_failing_runs_are_reported_and_leave_nothing_cached(roots):
    roots("fail")
    units = [grid.GridUnit(FAKE, "b1", 0, ("boom",)), grid.GridUnit("dynammo", "ham10000-cil", 0, ("no-such-method",)),
             grid.GridUnit(FAKE, "b1", 1, ("fast",))]
    outcomes = grid.run_grid("smoke", opts=grid.Options(executor="local"), units=units)
    assert statuses(outcomes) == ["failed", "failed", "done"], grid.report(outcomes)
    text = grid.report(outcomes)
    assert f"key={units[0].key('smoke')}" in text and "RuntimeError: boom after task 0" in text
    assert f"key={units[1].key('smoke')}" in text and "no-such-method" in text and "Traceback" in text
    for u in units[:2]:
        assert not grid.marker_path(u, "smoke").exists()
    runs = sorted(p.name for p in results_root().rglob("runs/*.json"))
    assert len(runs) == 1 and runs[0].startswith("fast-"), runs
    # the next grid command resubmits the failures only
    again = grid.run_grid("smoke", opts=grid.Options(executor="debug"), units=units)
    assert statuses(again) == ["failed", "failed", "cached"]


def test_preempted_slurm_job_is_requeued_and_resumes(roots, slurm_cluster, monkeypatch):  # noqa: F811
    """Preemption as SLURM signals it (SIGTERM, then submitit's USR2): the job checkpoints, requeues
    itself (``scontrol requeue``) and the same grid command sees it finish from its per-task checkpoint."""
    unit = grid.GridUnit(FAKE, "b1", 1, ("slow",))
    a, b, _, done, thread = _slurm_job_past_its_first_checkpoint(unit, roots, slurm_cluster, monkeypatch)
    job_id = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-p", slurm_cluster.partition], env=slurm_cluster.env,
                            capture_output=True, text=True, check=True).stdout.split()[0]
    for sig in ("TERM", "USR2"):
        subprocess.run(["scancel", "--signal", sig, job_id], check=True, env=slurm_cluster.env)
    _start_requeued_now(job_id, slurm_cluster.env)
    thread.join(timeout=300)
    assert statuses(done) == ["done"], grid.report(done)
    starts = (b / "cache" / "fake-starts.log").read_text().split()
    assert len(starts) == 8 and starts[3] == "start=0" and starts[-1] != "start=0", f"not resumed: {starts}"
    same_results(a / "results", b / "results")


def _start_requeued_now(job_id: str, env: dict) -> None:
    """SLURM holds a requeued job back (BeginTime about two minutes on); the test lets it start at once."""
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
        if state.stdout.strip() == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
            return
        time.sleep(0.3)
