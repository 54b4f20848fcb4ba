"""The book's entry point: run notebooks headless with papermill, build the Jupyter Book, check data.

    python -m cmm_utils.runner build --profile cpu        # execute every notebook, build _build/html
    python -m cmm_utils.runner execute --profile smoke --only magmax
    python -m cmm_utils.runner data [--download]           # which datasets are present and intact

Executed notebooks, logs and a run summary (notebook, profile, parameters, seconds, status, git
commit) land in ``runs/<profile>/``; the book's chapters are the executed notebooks of the chosen
profile, copied to ``book/chapters/``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from cmm_utils.core.io import REPO_ROOT, write_csv, write_json
from cmm_utils.core.profiles import PROFILES, check_profile
from cmm_utils.core.verdicts import VERDICTS

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
CHAPTER_DIR = REPO_ROOT / "book" / "chapters"


def runs_dir(profile: str) -> Path:
    return Path(os.environ.get("CMM_RUNS") or REPO_ROOT / "runs") / check_profile(profile)


# Chapters run in book order: the leaderboard reads the artifacts of the chapters before it.
BOOK_ORDER = ("00_data", "magmax", "cmm", "dynammo", "medmerge", "leaderboard")


def notebooks(only: list[str] | None = None) -> list[Path]:
    rank = {name: i for i, name in enumerate(BOOK_ORDER)}
    found = sorted(NOTEBOOK_DIR.glob("*.ipynb"), key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    if only:
        names = {p.stem: p for p in found}
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"unknown notebook(s) {missing}; valid: {', '.join(names)}")
        found = [names[n] for n in only]
    return found


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """What a reader needs to judge a number measured on another machine."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from cmm_utils.core.device import device, precision

    dev = device()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda or "none", "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none",
            "device": str(dev), "precision": precision(),
            "threads": torch.get_num_threads(), "python": sys.version.split()[0], "platform": platform.platform()}


def hide_injected_parameters(path: Path) -> None:
    """Collapse papermill's injected-parameters cell in the executed notebook (the book shows the
    chapter's own parameters cell; the injected values are in the run log)."""
    import json

    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            cell["metadata"]["tags"] = [*tags, "hide-input"]
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def execute(profile: str, only: list[str] | None = None, parameters: dict | None = None,
            prepare_only: bool = False) -> pd.DataFrame:
    """Execute notebooks with papermill into ``runs/<profile>/notebooks``; return the run summary.

    Every notebook is attempted; failures are recorded (status, error) and raised at the end, so
    one broken chapter does not hide the state of the others.
    """
    import papermill as pm

    out_dir = runs_dir(profile)
    (out_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    commit, rows = git_commit(), []
    for nb in notebooks(only):
        params = {"profile": profile, **(parameters or {})}
        output = out_dir / "notebooks" / nb.name
        log = out_dir / "logs" / f"{nb.stem}.log"
        started, t0, status, error = dt.datetime.now(dt.timezone.utc), time.time(), "ok", ""
        print(f"[{profile}] {nb.name} ...", flush=True)
        with open(log, "w") as log_file:
            try:
                pm.execute_notebook(str(nb), str(output), parameters=params, cwd=str(NOTEBOOK_DIR),
                                    kernel_name="python3", progress_bar=False, log_output=True,
                                    stdout_file=log_file, stderr_file=log_file, prepare_only=prepare_only)
            except Exception as err:  # papermill raises PapermillExecutionError and friends
                status, error = "failed", f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        seconds = time.time() - t0
        if status == "ok" and output.exists():
            hide_injected_parameters(output)
        print(f"[{profile}] {nb.name} {status} in {seconds:.0f}s {error}", flush=True)
        rows.append({"notebook": nb.stem, "profile": profile, "parameters": repr(params), "status": status,
                     "seconds": round(seconds, 1), "started_utc": started.isoformat(timespec="seconds"),
                     "git_commit": commit, "error": error})
    summary = _merge_summary(out_dir / "summary.csv", pd.DataFrame(rows))
    write_json(out_dir / "summary.json", {"profile": profile, "git_commit": commit, "machine": machine(),
                                          "notebooks": summary.to_dict(orient="records")})
    failed = [r["notebook"] for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"notebooks failed in profile {profile!r}: {failed}; logs in {out_dir / 'logs'}")
    return summary


def _merge_summary(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """Keep the latest row per notebook, so a partial rerun updates the summary in place."""
    if path.exists():
        old = pd.read_csv(path, keep_default_na=False)
        new = pd.concat([old[~old["notebook"].isin(new["notebook"])], new], ignore_index=True)
    new = new.sort_values("notebook").reset_index(drop=True)
    write_csv(path, new)
    return new


def write_run_log_page(profile: str) -> Path:
    """``book/run_log.md``: which profile, commit and how long each chapter took in the last build."""
    summary = pd.read_csv(runs_dir(profile) / "summary.csv", keep_default_na=False)
    table = summary[["notebook", "status", "seconds", "started_utc", "git_commit", "parameters"]]
    page = REPO_ROOT / "book" / "run_log.md"
    m = machine()
    page.write_text(
        "# Run log of this build\n\n"
        f"Profile **{profile}**, built {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{m['cpu']} ({m['cores']} cores, torch {m['torch']} with {m['threads']} threads, CUDA "
        f"{'available' if m['cuda_available'] else 'not available'}), commit `{git_commit()}`, "
        f"total notebook time {summary['seconds'].sum() / 60:.1f} min. "
        "Each row is one papermill execution of a chapter; the logs are in "
        f"`runs/{profile}/logs/`.\n\n" + table.to_markdown(index=False) + "\n")
    return page




def verdict_mark(claim: dict) -> str:
    """The front page's word for one claim: the chapter's verdict (:mod:`cmm_utils.core.verdicts`)."""
    verdict = claim.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"claim {claim.get('claim')!r} has verdict {verdict!r}; valid: {', '.join(VERDICTS)}")
    return {"supported": "yes", "not supported": "**no**"}.get(verdict, verdict)


def _interval(claim: dict) -> str:
    iv = claim.get("interval")
    return "" if not iv else f"[{iv[0]:+.3g}, {iv[1]:+.3g}]"


def write_verdicts_page(profile: str) -> Path:
    """``book/verdicts.md`` (included by the front page): per paper, what reproduced and what did
    not, read from each chapter's ``results/<profile>/<chapter>/verdict.json`` of this build."""
    import json

    from cmm_utils.core.io import results_root

    lines = [f"Verdicts of this build (profile **{profile}**, commit `{git_commit()}`), written by the "
             "chapters from their own results:\n"]
    from cmm_utils.papers import PAPERS, paper

    for chapter in PAPERS:
        title = paper(chapter).TITLE
        path = results_root() / profile / chapter / "verdict.json"
        lines.append(f"### {title}\n")
        if not path.exists():
            lines.append("Not run in this build.\n")
            continue
        verdict = json.loads(path.read_text())
        lines.append(verdict.get("summary", "") + "\n")
        claims = verdict.get("claims", [])
        if claims:
            lines.append("| claim | paper | ours | 95 % interval | verdict |\n|---|---|---|---|---|")
            for c in claims:
                cells = [str(c.get(k, "")).replace("|", "/").replace("\n", " ") for k in ("claim", "paper_value", "ours")]
                lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | {_interval(c)} | {verdict_mark(c)} |")
            lines.append("")
        lines.append(f"Rerun: `{verdict.get('rerun', 'make book PROFILE=' + profile)}`\n")
    page = REPO_ROOT / "book" / "verdicts.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def build_book(profile: str, builder: str = "html") -> Path:
    """Copy the profile's executed notebooks into ``book/chapters`` and run ``jupyter-book build``."""
    src = runs_dir(profile) / "notebooks"
    CHAPTER_DIR.mkdir(parents=True, exist_ok=True)
    for old in CHAPTER_DIR.glob("*.ipynb"):
        old.unlink()
    for nb in sorted(src.glob("*.ipynb")):
        shutil.copy2(nb, CHAPTER_DIR / nb.name)
    write_run_log_page(profile)
    write_verdicts_page(profile)
    cmd = [sys.executable, "-m", "jupyter_book", "build", str(REPO_ROOT), "--builder", builder,
           "--path-output", str(REPO_ROOT), "-W", "-n", "--keep-going"]
    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jb:
        cmd = [jb] + cmd[3:]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    index = REPO_ROOT / "_build" / "html" / "index.html"
    print(f"book built: {index}")
    return index


def check_data(download: bool = False) -> pd.DataFrame:
    """One row per registered dataset: present, checksum ok, or what is missing."""
    from cmm_utils.core.data import DataError, data_root, ensure_files, load_manifests

    rows = []
    for name, manifest in load_manifests().items():
        try:
            ensure_files(manifest, download=download)
            status = "ok"
        except DataError as err:
            status = "missing" if "missing" in str(err) else "corrupt"
        rows.append({"dataset": name, "status": status, "download": manifest.download,
                     "licence": manifest.licence, "classes": manifest.num_classes})
    frame = pd.DataFrame(rows)
    print(f"data root: {data_root()}")
    print(frame.to_string(index=False))
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmm_utils.runner", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "execute"):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="cpu", choices=PROFILES)
        p.add_argument("--only", nargs="*", help="notebook names (stems) to run; default all")
        p.add_argument("--prepare-only", action="store_true", help="inject parameters without executing")
    data = sub.add_parser("data")
    data.add_argument("--download", action="store_true", help="download missing files where allowed")
    args = parser.parse_args(argv)
    if args.command == "data":
        frame = check_data(args.download)
        return int((frame["status"] == "corrupt").any())
    execute(args.profile, args.only, prepare_only=args.prepare_only)
    if args.command == "build":
        build_book(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
