"""Compare two result trees value for value: ``python -m tests.compare_results A B``.

Every file under ``A`` must exist under ``B`` with the same content. Wall-clock measurements
(keys or columns naming seconds, milliseconds, latency or timestamps) differ between any two runs
and are left out of the comparison; everything else must match exactly: JSON values, CSV cells as
text, npz arrays bit for bit, other files byte for byte. Prints one line per differing file and
exits 1 when any differ. Used to show that a refactor changed no result, and by the resume and grid
tests (a killed-then-resumed or parallel run must equal a clean sequential one).
"""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TIMING = re.compile(r"(seconds|(^|_)ms(_|$)|latency|elapsed|started|wall|train s|time_s|^time$)", re.I)


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not TIMING.search(str(k))}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def same_file(a: Path, b: Path) -> tuple[bool, bool]:
    """(equal up to timings, byte-identical)."""
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    if raw_a == raw_b:
        return True, True
    if a.suffix == ".json":
        return _strip(json.loads(raw_a)) == _strip(json.loads(raw_b)), False
    if a.suffix == ".csv":
        fa, fb = (pd.read_csv(io.BytesIO(r), dtype=str, keep_default_na=False) for r in (raw_a, raw_b))
        keep = [c for c in fa.columns if not TIMING.search(c)]
        return list(fa.columns) == list(fb.columns) and fa[keep].equals(fb[keep]), False
    if a.suffix == ".npz":
        with np.load(a) as za, np.load(b) as zb:
            return sorted(za.files) == sorted(zb.files) and all(
                np.array_equal(za[k], zb[k], equal_nan=True) for k in za.files if not TIMING.search(k)), False
    return False, False


def compare(a: Path, b: Path) -> dict[str, list[str]]:
    report = {"identical": [], "timings only": [], "different": [], "missing": []}
    for fa in sorted(p for p in a.rglob("*") if p.is_file()):
        rel = str(fa.relative_to(a))
        fb = b / rel
        if not fb.exists():
            report["missing"].append(rel)
            continue
        equal, identical = same_file(fa, fb)
        report["identical" if identical else "timings only" if equal else "different"].append(rel)
    return report


def main(argv: list[str]) -> int:
    a, b = Path(argv[0]), Path(argv[1])
    report = compare(a, b)
    for kind in ("different", "missing"):
        for rel in report[kind]:
            print(f"{kind}: {rel}")
    print(", ".join(f"{len(v)} {k}" for k, v in report.items()))
    return int(bool(report["different"] or report["missing"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
