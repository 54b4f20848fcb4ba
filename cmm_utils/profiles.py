"""The three profiles every notebook runs in, chosen by one ``profile`` parameter.

- ``smoke``: seconds per notebook, for tests and CI (tiny subsets, one epoch, one seed).
- ``cpu``: real medical data at 28x28, the papers' architecture families sized for 2 CPU cores.
- ``paper``: the papers' datasets, backbones and hyper-parameters, for a GPU box.

Profiles are data: each chapter module keeps a table ``{profile: {parameter: value}}`` and
``select`` picks one row, overridden by the notebook's explicit parameters.
"""
from __future__ import annotations

from typing import Any, Mapping

PROFILES = ("smoke", "cpu", "paper")


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    return profile


def select(table: Mapping[str, Mapping[str, Any]], profile: str, **overrides: Any) -> dict[str, Any]:
    """The row of ``table`` for ``profile`` with every override that is not ``None`` applied.

    An override naming no key of the row is an error, so a misspelt notebook parameter fails loudly.
    """
    row = dict(table[check_profile(profile)])
    for key, value in overrides.items():
        if key not in row:
            raise ValueError(f"unknown setting {key!r} for profile {profile!r}; valid: {', '.join(sorted(row))}")
        if value is not None:
            row[key] = value
    return row
