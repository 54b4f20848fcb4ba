"""A chapter's grid of independent runs, fanned out over SLURM or local cores through submitit.

``python -m cmm_utils.grid --profile paper --chapters magmax dynammo --executor slurm --partition gpu``

A profile asks each paper for many runs (benchmarks x seeds x methods). They are independent except
where methods share training (MagMax's merges of one regime share its fine-tuning), so the grid is
a list of :class:`GridUnit` s, each one job: ``(paper, benchmark, seed, methods)`` whose job calls
``paper(p).run(method, benchmark, profile, seed)`` for each method in order. A paper may group its
runs itself with ``grid_units(profile)``; otherwise there is one unit per (benchmark, seed) with
all the profile's methods. Each run writes its result atomically into the paper's cache, so the
notebooks read it back afterwards (and still compute a missing run themselves when run alone).

A unit is cached when the paper's optional ``is_cached(method, benchmark, profile, seed)`` says so
for every method, else when its marker ``results/<profile>/grid/<unit>.json`` exists (written only
after the job succeeded). Rerunning the command submits only what is missing. A preempted or
timed-out SLURM job is requeued by submitit (:class:`UnitJob` is checkpointable) and resumes from
the paper's per-task checkpoints; a cancelled or failed one is reported and resubmitted next time.

Executors: ``slurm`` (one job array, ``map_array``), ``local`` (single-threaded processes, N at a
time), ``debug`` (in this process, one after another).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import submitit
import torch
import yaml
from submitit.core.utils import pickle_load
from tqdm.auto import tqdm

from cmm_utils.core.io import cache_root, config_key, results_root, write_json
from cmm_utils.core.profiles import PROFILES, check_profile, seed_list, select
from cmm_utils.papers import PAPERS, paper

EXECUTORS = ("slurm", "local", "debug")
LOST_AFTER_S = 10  # a job gone from squeue this long without a result file was cancelled or killed


@dataclass(frozen=True)
class GridUnit:
    """One job: the methods of one paper that share training, on one benchmark and seed."""
    paper: str
    benchmark: str
    seed: int
    methods: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.methods:
            raise ValueError(f"grid unit {self.paper}/{self.benchmark}/seed{self.seed} runs no method")

    def label(self) -> str:
        return f"{self.paper}/{self.benchmark}/seed{self.seed}/{'+'.join(self.methods)}"

    def key(self, profile: str) -> str:
        """The unit's configuration key: the unit and the paper's profile row, so an edited profile
        (another schedule, other data caps) never counts an old marker as done."""
        row = select(load_paper(self.paper).PROFILES, profile)
        return config_key({"unit": asdict(self), "profile": profile, "settings": row})


@dataclass
class Outcome:
    """What became of one unit: ``done``, ``cached`` or ``failed`` (with the job's traceback)."""
    unit: GridUnit
    status: str
    key: str
    job_id: str = ""
    error: str = ""
    seconds: float = float("nan")


def load_paper(name: str):
    """A paper package by name (:data:`PAPERS`), or any object with the paper interface named
    ``module:attribute`` (how the tests plug in a fake paper)."""
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    return paper(name)


def check_chapters(chapters: Sequence[str] | None) -> list[str]:
    """The chapters to grid (all papers by default); an unknown one is an error naming the valid ones."""
    chosen = list(PAPERS if not chapters else chapters)
    bad = [c for c in chosen if c not in PAPERS and ":" not in c]
    if bad:
        raise ValueError(f"unknown chapter(s) {bad}; valid: {', '.join(PAPERS)} (or module:attribute)")
    return chosen


def _as_unit(chapter: str, raw: Any) -> GridUnit:
    """A paper's ``grid_units`` entry: a GridUnit, (benchmark, seed, methods) or (paper, benchmark, seed, methods)."""
    if isinstance(raw, GridUnit):
        return raw
    raw = tuple(raw)
    if len(raw) == 3:
        raw = (chapter,) + raw
    if len(raw) != 4:
        raise ValueError(f"{chapter}.grid_units gave {raw!r}; expected (benchmark, seed, methods)")
    p, benchmark, seed, methods = raw
    return GridUnit(str(p), str(benchmark), int(seed), tuple(methods))


def chapter_units(chapter: str, profile: str, first_seed: int = 0) -> list[GridUnit]:
    """The paper's own grouping (``grid_units(profile)``) or one unit per (benchmark, seed)."""
    p = load_paper(chapter)
    if hasattr(p, "grid_units"):
        return [_as_unit(chapter, u) for u in p.grid_units(profile)]
    row = select(p.PROFILES, profile)
    return [GridUnit(chapter, b, s, tuple(row["methods"]))
            for b in row["benchmarks"] for s in seed_list(first_seed, row["seeds"])]


def grid_units(profile: str, chapters: Sequence[str] | None = None, benchmarks: Sequence[str] | None = None,
               methods: Sequence[str] | None = None, first_seed: int = 0) -> list[GridUnit]:
    """Every unit the profile asks of the chapters, optionally cut to some benchmarks or methods."""
    check_profile(profile)
    units = [u for c in check_chapters(chapters) for u in chapter_units(c, profile, first_seed)]
    if benchmarks:
        units = [u for u in units if u.benchmark in benchmarks]
    if methods:
        units = [GridUnit(u.paper, u.benchmark, u.seed, tuple(m for m in u.methods if m in methods)) for u in units]
        units = [u for u in units if u.methods]
    return units


def marker_path(unit: GridUnit, profile: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{unit.paper}-{Path(unit.benchmark).stem}-seed{unit.seed}")
    return results_root() / profile / "grid" / f"{name}-{unit.key(profile)}.json"


def is_cached(unit: GridUnit, profile: str) -> bool:
    """Every run of the unit has its result, known without running anything."""
    p = load_paper(unit.paper)
    if hasattr(p, "is_cached"):
        return all(p.is_cached(m, unit.benchmark, profile, unit.seed) for m in unit.methods)
    return marker_path(unit, profile).exists()


@contextmanager
def _environ(**values: str):
    """Set environment variables for the block, then restore the whole environment (a local job's
    process inherits them at submission; an in-process job must not leave its settings behind)."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class UnitJob(submitit.helpers.Checkpointable):
    """The job of one unit, picklable and checkpointable: on preemption or timeout submitit calls
    :meth:`checkpoint`, requeues the same call, and the resumed call finds finished runs in the
    paper's cache and the interrupted one's per-task checkpoints on disk."""

    def __init__(self, profile: str, roots: dict[str, str], threads: int | None = None):
        self.profile, self.roots, self.threads = profile, dict(roots), threads

    def __call__(self, unit: GridUnit) -> dict:
        """Run the unit's methods in order (shared training is computed once), then mark it done."""
        os.environ.update(self.roots)  # the submitting process's roots, whatever the cluster exports
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        p = load_paper(unit.paper)
        summaries = {m: p.run(m, unit.benchmark, self.profile, unit.seed).summary() for m in unit.methods}
        write_json(marker_path(unit, self.profile), {"unit": asdict(unit), "profile": self.profile,
                                                    "key": unit.key(self.profile), "summaries": summaries})
        return summaries

    def checkpoint(self, unit: GridUnit) -> submitit.helpers.DelayedSubmission:
        """Requeue the same unit: resuming needs nothing but what the runs saved on disk."""
        return submitit.helpers.DelayedSubmission(self, unit)


def job_roots() -> dict[str, str]:
    """The cache, results and data roots as absolute paths, for jobs that start elsewhere."""
    roots = {"CMM_CACHE": str(cache_root().resolve()), "CMM_RESULTS": str(results_root().resolve())}
    if os.environ.get("CMM_DATA"):
        roots["CMM_DATA"] = str(Path(os.environ["CMM_DATA"]).expanduser().resolve())
    return roots


@dataclass
class Options:
    """How to execute: executor, local parallelism, SLURM resources (``sbatch``: extra KEY=VALUE)."""
    executor: str = "local"
    parallel: int = 2
    partition: str | None = None
    gpus_per_job: int = 0
    time_min: int = 120
    array_parallelism: int = 64
    sbatch: dict = field(default_factory=dict)
    folder: Path | None = None


def _job_outcome(unit: GridUnit, profile: str, job, started: float, lost: str = "") -> Outcome:
    """Read a finished job's result file: success, the job's traceback, or why there is none."""
    key, jid = unit.key(profile), str(job.job_id)
    path = job.paths.result_pickle
    if path.exists():
        status, value = pickle_load(path)
        if status == "success":
            return Outcome(unit, "done", key, jid, seconds=time.time() - started)
        return Outcome(unit, "failed", key, jid, error=str(value), seconds=time.time() - started)
    tail = job.paths.stderr.read_text(errors="replace")[-3000:] if job.paths.stderr.exists() else ""
    return Outcome(unit, "failed", key, jid, error=f"job {jid} ended without a result ({lost or 'killed'})\n{tail}")


def _run_debug(todo: list[GridUnit], profile: str, job: UnitJob, bar) -> list[Outcome]:
    """In this process, one after another (the ``debug`` executor: breakpoints and tracebacks work)."""
    out, threads = [], torch.get_num_threads()
    for unit in todo:
        start = time.time()
        try:
            with _environ():  # the job sets its roots and threads; this process gets its own back
                job(unit)
            out.append(Outcome(unit, "done", unit.key(profile), "debug", seconds=time.time() - start))
        except Exception:  # report and go on with the next unit, as the other executors do
            out.append(Outcome(unit, "failed", unit.key(profile), "debug", error=traceback.format_exc()))
        finally:
            torch.set_num_threads(threads)
        bar.update()
    return out


def _run_local(todo: list[GridUnit], profile: str, job: UnitJob, opts: Options, bar) -> list[Outcome]:
    """``opts.parallel`` single-threaded processes at a time (``LocalExecutor`` starts every job it
    is given at once, so the units are submitted as slots free up)."""
    executor = submitit.LocalExecutor(folder=opts.folder)
    executor.update_parameters(timeout_min=opts.time_min)
    pending, running, out = list(todo), {}, []
    while pending or running:
        while pending and len(running) < opts.parallel:
            unit = pending.pop(0)
            with _environ(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
                running[unit] = (executor.submit(job, unit), time.time())
        for unit, (j, started) in list(running.items()):
            if j.done():
                out.append(_job_outcome(unit, profile, j, started))
                del running[unit]
                bar.update()
        time.sleep(0.5)
    return out


def _slurm_params(opts: Options) -> dict:
    """submitit's SlurmExecutor parameters; an ``--sbatch`` key submitit does not know goes to sbatch as is."""
    params = {"time": opts.time_min, "array_parallelism": opts.array_parallelism, "cpus_per_task": 1,
              "signal_delay_s": 120 if opts.time_min > 20 else 30}
    if opts.partition:
        params["partition"] = opts.partition
    if opts.gpus_per_job:
        params["gpus_per_node"] = opts.gpus_per_job
    known, extra = submitit.SlurmExecutor._valid_parameters(), {}
    for key, value in opts.sbatch.items():
        name = key.replace("-", "_")
        if name in known:
            params[name] = value
        else:
            extra[key] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def _queued(jobs) -> set[str]:
    """Job ids squeue still lists (pending, running, requeued); works without SLURM accounting."""
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode == 0 else {str(j.job_id) for j in jobs}


def _run_slurm(todo: list[GridUnit], profile: str, job: UnitJob, opts: Options, bar) -> list[Outcome]:
    """One job array (``map_array``), at most ``array_parallelism`` running; waits for every task."""
    executor = submitit.SlurmExecutor(folder=opts.folder, max_num_timeout=3)
    executor.update_parameters(**_slurm_params(opts))
    jobs = executor.map_array(job, todo)
    print(f"submitted SLURM job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} units); logs in {opts.folder}")
    started, waiting, gone, out = time.time(), dict(zip(todo, jobs)), {}, []
    while waiting:
        queued = _queued(waiting.values())
        for unit, j in list(waiting.items()):
            if j.paths.result_pickle.exists() or (j.job_id not in queued and
                                                   time.time() - gone.setdefault(j.job_id, time.time()) > LOST_AFTER_S):
                out.append(_job_outcome(unit, profile, j, started, lost="left the queue: cancelled or killed"))
                del waiting[unit]
                bar.update()
            elif j.job_id in queued:
                gone.pop(j.job_id, None)
        time.sleep(1)
    return out


def run_grid(profile: str, chapters: Sequence[str] | None = None, opts: Options | None = None,
             units: Iterable[GridUnit] | None = None, **select_units) -> list[Outcome]:
    """List the grid, skip what is cached, execute the rest, report one :class:`Outcome` per unit."""
    opts = opts or Options()
    if opts.executor not in EXECUTORS:
        raise ValueError(f"unknown executor {opts.executor!r}; valid: {', '.join(EXECUTORS)}")
    units = list(units) if units is not None else grid_units(profile, chapters, **select_units)
    opts.folder = Path(opts.folder or cache_root() / "grid" / profile / "jobs").resolve()
    cached = [u for u in units if is_cached(u, profile)]
    todo = [u for u in units if u not in cached]
    outcomes = [Outcome(u, "cached", u.key(profile)) for u in cached]
    print(f"grid {profile}: {len(units)} units, {len(cached)} cached, {len(todo)} to run ({opts.executor})")
    if todo:
        job = UnitJob(profile, job_roots(), threads=1 if opts.executor != "slurm" else None)
        with tqdm(total=len(todo), desc=f"grid {profile}") as bar:
            if opts.executor == "debug":
                outcomes += _run_debug(todo, profile, job, bar)
            elif opts.executor == "local":
                outcomes += _run_local(todo, profile, job, opts, bar)
            else:
                outcomes += _run_slurm(todo, profile, job, opts, bar)
    return sorted(outcomes, key=lambda o: units.index(o.unit))


def report(outcomes: Sequence[Outcome]) -> str:
    """One line per unit (status, key, label), the failures' tracebacks after them."""
    lines = [f"{o.status:7} {o.key} {o.unit.label()}" + (f"  ({o.seconds:.0f}s)" if o.status == "done" else "")
             for o in outcomes]
    for o in outcomes:
        if o.status == "failed":
            lines += ["", f"FAILED {o.unit.label()} key={o.key} job={o.job_id}", o.error.rstrip()]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "cached", "failed")}
    return "\n".join(lines + ["", ", ".join(f"{n} {s}" for s, n in counts.items())])


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cmm_utils.grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=PROFILES, default="cpu")
    ap.add_argument("--chapters", nargs="+", default=None, help=f"default: all ({', '.join(PAPERS)})")
    ap.add_argument("--benchmarks", nargs="+", default=None, help="only these benchmarks")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods")
    ap.add_argument("--seed", type=int, default=0, help="the first seed (the profile runs seed, seed + 1, ...)")
    ap.add_argument("--executor", default="local", help=f"one of {', '.join(EXECUTORS)}")
    ap.add_argument("--parallel", type=int, default=2, help="local: processes at a time")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--gpus-per-job", type=int, default=0)
    ap.add_argument("--time-min", type=int, default=120, help="per job; SLURM requeues a timed-out job")
    ap.add_argument("--array-parallelism", type=int, default=64, help="SLURM: array tasks at a time")
    ap.add_argument("--sbatch", nargs="+", default=[], metavar="KEY=VALUE", help="more sbatch settings")
    ap.add_argument("--folder", default=None, help="submitit's job files and logs (default .cache/grid/<profile>/jobs)")
    ap.add_argument("--dry-run", action="store_true", help="list the grid and what is cached; run nothing")
    ap.add_argument("--config", default=None, help="a YAML file of these options (the command line wins)")
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options from ``--config`` (YAML, keys as the long options with ``_``), then the command line."""
    ap = _parser()
    first = ap.parse_args(argv)
    if first.config:
        cfg = yaml.safe_load(Path(first.config).read_text()) or {}
        known = {a.dest for a in ap._actions} - {"help", "config"}
        bad = sorted(set(cfg) - known)
        if bad:
            raise SystemExit(f"{first.config}: unknown option(s) {bad}; valid: {', '.join(sorted(known))}")
        ap.set_defaults(**cfg)
    args = ap.parse_args(argv)
    if args.executor not in EXECUTORS:
        ap.error(f"unknown executor {args.executor!r}; valid: {', '.join(EXECUTORS)}")
    try:
        check_chapters(args.chapters)
    except ValueError as err:
        ap.error(str(err))
    sbatch = args.sbatch if isinstance(args.sbatch, dict) else dict(kv.split("=", 1) for kv in args.sbatch if "=" in kv)
    bad = [kv for kv in (args.sbatch if isinstance(args.sbatch, list) else []) if "=" not in kv]
    if bad:
        ap.error(f"--sbatch expects KEY=VALUE, got {bad}")
    args.sbatch = sbatch
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    units = grid_units(args.profile, args.chapters, args.benchmarks, args.methods, args.seed)
    if args.dry_run:
        for u in units:
            print(f"{'cached' if is_cached(u, args.profile) else 'todo':7} {u.key(args.profile)} {u.label()}")
        return 0
    opts = Options(args.executor, args.parallel, args.partition, args.gpus_per_job, args.time_min,
                   args.array_parallelism, args.sbatch, Path(args.folder) if args.folder else None)
    outcomes = run_grid(args.profile, opts=opts, units=units)
    print(report(outcomes))
    return int(any(o.status == "failed" for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
