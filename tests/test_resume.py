"""Long runs survive interruption, and two runs at once share a cache safely.

For one smoke run of every chapter (through the paper's ``run``, in a separate process, as a user
or a cluster job would run it): a clean run gives the reference results; a second run is killed
(SIGKILL, no chance to clean up) at a random moment after it has begun writing checkpoints or
results, then rerun to the end on the same cache: its results must equal the clean run's, value
for value (wall-clock fields aside, :mod:`tests.compare_results`). Two processes started at once
on one fresh cache must both finish with the clean run's results, and every file they leave must
read back.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .compare_results import compare

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # chapter: (method, benchmark): one smoke run that trains several tasks or stages
    "magmax": ("magmax", "medical-dil"),
    "cmm": ("cmm", "medical-dil"),
    "dynammo": ("dynammo", "medical-dil"),
    "medmerge": ("medmerge", "resnet18:ham10000->retinamnist"),
}
SCRIPT = ("import sys, json; from cmm_utils.papers import paper; "
          "r = paper(sys.argv[1]).run(sys.argv[2], sys.argv[3], 'smoke', 0); "
          "print(json.dumps({'final': r.acc_seen[-1], 'recall': r.extra['mean_class_recall']}))")

pytestmark = pytest.mark.timeout(1500)


def _env(root: Path) -> dict:
    env = dict(os.environ, CMM_CACHE=str(root / "cache"), CMM_RESULTS=str(root / "results"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CMM_RUNS", None)
    return env


def _start(chapter: str, root: Path) -> subprocess.Popen:
    method, benchmark = RUNS[chapter]
    return subprocess.Popen([sys.executable, "-c", SCRIPT, chapter, method, benchmark], cwd=REPO, env=_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _written(root: Path) -> int:
    """Files the run has written so far under its cache and results (the pretrained backbone aside)."""
    return sum(1 for p in root.rglob("*") if p.is_file() and "backbones" not in p.parts and p.suffix != ".lock")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> Path:
    """The book's pretrained smoke backbone, built once and copied into every fresh cache."""
    root = tmp_path_factory.mktemp("warm")
    code = "from cmm_utils.core.models import book_backbone; book_backbone('resnet18', 'smoke', verbose=False)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(root), check=True, timeout=900)
    return root / "cache" / "backbones"


def _fresh(tmp_path: Path, name: str, backbones: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(backbones, root / "cache" / "backbones")
    return root


def _all_readable(root: Path) -> None:
    from safetensors.torch import load_file

    for p in root.rglob("*"):
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            load_file(str(p))


def _until_it_writes(proc: subprocess.Popen, root: Path) -> float:
    """Seconds until the run has written its first checkpoint or result (or ended)."""
    t0 = time.time()
    while _written(root) == 0 and proc.poll() is None:
        time.sleep(0.05)
    return time.time() - t0


@pytest.mark.parametrize("chapter", list(RUNS))
def test_killed_at_a_random_point_then_rerun_equals_a_clean_run(chapter, tmp_path, backbones):
    clean = _fresh(tmp_path, "clean", backbones)
    t0 = time.time()
    proc = _start(chapter, clean)
    starting = _until_it_writes(proc, clean)
    reference = _finish(proc)
    writing = time.time() - t0 - starting  # how long the run writes checkpoints and results

    rng = random.Random(f"{chapter}-{os.environ.get('CMM_KILL_SEED', '0')}")
    killed = _fresh(tmp_path, "killed", backbones)
    for attempt in range(3):  # a kill must land while the run is writing; a later one proves nothing
        proc = _start(chapter, killed)
        _until_it_writes(proc, killed)
        time.sleep(rng.uniform(0.0, 0.8) * writing / 2 ** attempt)
        was_running = proc.poll() is None
        proc.kill()
        proc.communicate()
        if was_running:
            break
        shutil.rmtree(killed)
        killed = _fresh(tmp_path, "killed", backbones)
    assert was_running, f"{chapter}: three runs ended before the kill ({writing:.1f} s of writing)"
    resumed = _finish(_start(chapter, killed))

    assert resumed == reference, (chapter, resumed, reference)
    report = compare(clean / "results", killed / "results")
    assert not report["different"] and not report["missing"], report
    _all_readable(killed)


@pytest.mark.parametrize("chapter", list(RUNS))
def test_two_runs_at_once_on_one_cache_agree_with_one_run(chapter, tmp_path, backbones):
    clean = _fresh(tmp_path, "clean", backbones)
    reference = _finish(_start(chapter, clean))
    shared = _fresh(tmp_path, "shared", backbones)
    first, second = _start(chapter, shared), _start(chapter, shared)
    assert _finish(first) == reference and _finish(second) == reference
    report = compare(clean / "results", shared / "results")
    assert not report["different"] and not report["missing"], report
    _all_readable(shared)
