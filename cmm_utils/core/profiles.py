"""The three profiles every notebook runs in, chosen by one ``profile`` parameter.

- ``smoke``: seconds per notebook, for tests and CI (tiny subsets, one epoch, one seed).
- ``cpu``: real medical data at 28x28, the papers' architecture families sized for 2 CPU cores.
- ``paper``: the papers' datasets, backbones and hyper-parameters, for a GPU box.

Profiles are data: each paper keeps a table ``{profile: {setting: value}}`` and ``select`` picks
one row, overridden by the notebook's explicit parameters. Every paper's rows share one schema
(:data:`COMMON_SETTINGS`): ``seeds`` (how many seeds; a notebook's ``seed`` is the first, the run
uses ``seed, seed + 1, …``), ``benchmarks`` (the scenarios it runs) and ``methods`` (named as in
the paper's ``METHODS``); :func:`check_table` enforces it.
"""
from __future__ import annotations

from typing import Any, Mapping

PROFILES = ("smoke", "cpu", "paper")
COMMON_SETTINGS = {"seeds": int, "benchmarks": list, "methods": list}


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    return profile


def check_table(chapter: str, table: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    """A paper's profile table has a row per profile, each with the common settings, well typed."""
    missing = [p for p in PROFILES if p not in table]
    if missing:
        raise ValueError(f"{chapter}: profile table lacks {missing}; every paper has {', '.join(PROFILES)}")
    for profile, row in table.items():
        check_profile(profile)
        for key, kind in COMMON_SETTINGS.items():
            if key not in row:
                raise ValueError(f"{chapter}: profile {profile!r} lacks the common setting {key!r}")
            if not isinstance(row[key], kind) or isinstance(row[key], bool):
                raise ValueError(f"{chapter}: profile {profile!r} setting {key!r} must be {kind.__name__}, "
                                 f"got {row[key]!r}")
        if row["seeds"] < 1:
            raise ValueError(f"{chapter}: profile {profile!r} runs seeds={row['seeds']}; at least 1")
    return table


def _check_override(key: str, value: Any, default: Any, profile: str) -> Any:
    """An override must have its setting's kind: a string where a list is expected is the classic
    papermill slip (``-p methods magmax`` instead of ``-y 'methods: [magmax]'``)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        hint = (f"; pass a list, e.g. papermill -y '{key}: [{value}]'" if isinstance(default, (list, tuple))
                and isinstance(value, str) else "")
        raise ValueError(f"setting {key!r} for profile {profile!r} expects {type(default).__name__} "
                         f"(default {default!r}), got {type(value).__name__} {value!r}{hint}")
    if key in ("seeds", "seed") and isinstance(value, int) and value < (1 if key == "seeds" else 0):
        raise ValueError(f"setting {key!r} must be {'at least 1' if key == 'seeds' else 'non-negative'}, got {value}")
    return value


def select(table: Mapping[str, Mapping[str, Any]], profile: str, **overrides: Any) -> dict[str, Any]:
    """The row of ``table`` for ``profile`` with every override that is not ``None`` applied.

    An override naming no key of the row is an error, so a misspelt notebook parameter fails
    loudly; so is one of the wrong kind (a string for a list, a float for an int, a negative seed).
    """
    row = dict(table[check_profile(profile)])
    for key, value in overrides.items():
        if key not in row:
            raise ValueError(f"unknown setting {key!r} for profile {profile!r}; valid: {', '.join(sorted(row))}")
        if value is not None:
            row[key] = _check_override(key, value, row[key], profile)
    return row


def check_seed(seed: Any) -> int:
    """A notebook's first seed: a non-negative int."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def seed_list(seed: Any, seeds: int) -> list[int]:
    """The seeds a chapter runs: ``seed, seed + 1, …`` (``seeds`` of them)."""
    return list(range(check_seed(seed), check_seed(seed) + int(seeds)))
