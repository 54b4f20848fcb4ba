"""Label tables of the ``image_folder_csv`` format, checked as they are read.

A label file is a CSV with a header, or (suffix ``.txt``) a header-less list of ``<id> <label>``
lines. Labels are class indices, class names (from the manifest's ``classes``), or one-hot columns
(``columns.label`` a list of column names in label-index order). A ``metadata`` file can supply
the group column, joined on the id, or ``columns.group_from_id`` (a regex) derives the group from
the id. Every error names the file, the offending row and value, and the valid values.
``check_expect`` compares a table with the manifest's ``expect`` counts and layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cmm_utils.core.data.manifest import TABLE_ROLES, role_columns


@dataclass
class LabelTable:
    path: Path
    ids: np.ndarray                 # Python str (object array), one per row
    labels: np.ndarray              # int64 class indices
    extras: dict[str, np.ndarray]   # per-row strings: ``groups``, ``split``


def read_table(path: Path, cols: dict[str, Any]) -> pd.DataFrame:
    """A CSV with a header, or (``.txt``) a header-less list of ``<id> <label>`` lines."""
    id_col, label_col = cols.get("id", "image_id"), cols.get("label", "label")
    if path.suffix != ".txt":
        return pd.read_csv(path, dtype={id_col: str})
    if not isinstance(label_col, str):
        raise ValueError(f"{path}: a .txt list has one label per line, but columns.label is {label_col!r}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            rows.append(line.rsplit(None, 1))
            if len(rows[-1]) != 2:
                raise ValueError(f"{path}, line {number}: {line!r} is not '<path> <label>'")
    return pd.DataFrame(rows, columns=[id_col, label_col])


def find_column(table: pd.DataFrame, name: str | None) -> str | None:
    """The header equal to ``name``, else the one equal ignoring case, else None."""
    if name is None or name in table.columns:
        return name
    matches = [c for c in table.columns if str(c).lower() == str(name).lower()]
    return matches[0] if len(matches) == 1 else None


def column(table: pd.DataFrame, name: str, path: Path) -> pd.Series:
    found = find_column(table, name)
    if found is None:
        raise ValueError(f"{path}: column {name!r} missing; columns are {list(table.columns)}")
    return table[found]


def read_ids(table: pd.DataFrame, cols: dict[str, Any], path: Path) -> np.ndarray:
    ids = column(table, cols.get("id", "image_id"), path)
    if not len(ids):
        raise ValueError(f"{path}: no rows")
    if ids.isna().any():
        raise ValueError(f"{path}: row {int(np.flatnonzero(ids.isna())[0]) + 1} has no id")
    return np.array([str(i).strip() for i in ids], dtype=object)


def decode_labels(table: pd.DataFrame, cols: dict[str, Any], classes: Sequence[str], ids: np.ndarray,
                  path: Path) -> np.ndarray:
    """Class indices from an index column, a class-name column or one-hot columns."""
    label = cols.get("label", "label")
    if isinstance(label, (list, tuple)):
        return _one_hot(table, [str(c) for c in label], cols.get("ignore") or [], classes, ids, path)
    values = column(table, label, path)
    blank = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy(dtype=bool)
    if blank.any():
        raise ValueError(f"{path}: {ids[blank][0]!r} has no label (column {label!r})")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return _indices(numbers.to_numpy(dtype=float), classes, ids, path)
    return _names(values.astype(str).str.strip(), classes, ids, path)


def _indices(values: np.ndarray, classes: Sequence[str], ids: np.ndarray, path: Path) -> np.ndarray:
    bad = values != np.round(values)
    if classes:
        bad |= (values < 0) | (values >= len(classes))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        valid = f"0..{len(classes) - 1} ({', '.join(classes)})" if classes else "whole numbers"
        raise ValueError(f"{path}: label {values[i]:g} of {ids[i]!r} is not a class index; valid: {valid}")
    return values.astype(np.int64)


def _names(values: pd.Series, classes: Sequence[str], ids: np.ndarray, path: Path) -> np.ndarray:
    index = values.map({c: i for i, c in enumerate(classes)})
    if index.isna().any():
        i = int(np.flatnonzero(index.isna())[0])
        raise ValueError(f"{path}: unknown class name {values.iloc[i]!r} for {ids[i]!r}; valid: "
                         f"{', '.join(classes) or 'none (the manifest lists no classes)'}")
    return index.to_numpy(dtype=np.int64)


def _numeric(table: pd.DataFrame, names: list[str], path: Path) -> np.ndarray:
    return np.stack([pd.to_numeric(column(table, n, path), errors="coerce").to_numpy(dtype=float)
                     for n in names], axis=1)


def _one_hot(table: pd.DataFrame, names: list[str], ignore: list[str], classes: Sequence[str],
             ids: np.ndarray, path: Path) -> np.ndarray:
    """The index of the one listed column holding 1 (the others 0); ``ignore`` columns must be 0."""
    if classes and len(names) != len(classes):
        raise ValueError(f"{path}: columns.label lists {len(names)} one-hot columns {names} but there "
                         f"are {len(classes)} classes {list(classes)}")
    values = _numeric(table, names, path)
    bad = ~(np.isin(values, (0.0, 1.0)).all(axis=1) & ((values == 1).sum(axis=1) == 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = ", ".join(f"{n}={v:g}" for n, v in zip(names, values[i]))
        raise ValueError(f"{path}: {ids[i]!r} is not one-hot ({row}); each row needs exactly one 1 "
                         f"among {names}, the rest 0 ({int(bad.sum())} bad rows)")
    if ignore:
        extra = _numeric(table, [str(c) for c in ignore], path)
        bad_rows, bad_cols = np.nonzero(~(extra == 0))
        if bad_rows.size:
            i, j = int(bad_rows[0]), int(bad_cols[0])
            raise ValueError(f"{path}: {ids[i]!r} has {ignore[j]}={extra[i, j]:g}, but {ignore[j]} is not "
                             f"a class here and must be 0; classes: {names}")
    return values.argmax(axis=1).astype(np.int64)


def metadata_groups(path: Path, columns: dict[str, Any], expect: dict[str, Any]) -> pd.Series:
    """The ``metadata`` file as a map id -> group (empty where the group is missing)."""
    cols = role_columns(columns, "metadata")
    if not cols.get("group"):
        raise ValueError(f"{path}: a metadata file is given but columns.group does not name its group column")
    table = read_table(path, cols)
    ids = read_ids(table, cols, path)
    _check_rows(path, len(ids), expect, "metadata")
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        raise ValueError(f"{path}: id {ids[dup][0]!r} appears more than once")
    groups = column(table, cols["group"], path).fillna("").astype(str).to_numpy(dtype=str)
    return pd.Series(groups, index=ids)


def groups_from_ids(ids: np.ndarray, pattern: str, path: Path) -> np.ndarray:
    """The first capture group of ``pattern`` (``re.search``) in each id, e.g. ``10_left`` -> ``10``."""
    regex, groups = re.compile(pattern), []
    for i in ids:
        match = regex.search(i)
        if match is None or match.group(1) is None:
            raise ValueError(f"{path}: id {i!r} does not match columns.group_from_id {pattern!r}, "
                             "so it has no group")
        groups.append(match.group(1))
    return np.array(groups, dtype=str)


def _extras(table: pd.DataFrame, cols: dict[str, Any], ids: np.ndarray,
            groups_by_id: pd.Series | None, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for name, key in (("groups", "group"), ("split", "split")):
        found = find_column(table, cols.get(key))
        if found is not None:
            out[name] = table[found].fillna("").astype(str).to_numpy(dtype=str)
    if "groups" not in out and cols.get("group") and groups_by_id is not None:
        out["groups"] = groups_by_id.reindex(ids).fillna("").to_numpy(dtype=str)  # absent: own group
    if cols.get("group_from_id"):
        out["groups"] = groups_from_ids(ids, cols["group_from_id"], path)
    return out


def load_table(path: Path, role: str | None, columns: dict[str, Any], classes: Sequence[str],
               groups_by_id: pd.Series | None = None, expect: dict[str, Any] | None = None) -> LabelTable:
    """One label file, read with its role's ``columns``, decoded and checked against ``expect``."""
    cols = role_columns(columns, role)
    table = read_table(path, cols)
    ids = read_ids(table, cols, path)
    out = LabelTable(path, ids, decode_labels(table, cols, classes, ids, path),
                     _extras(table, cols, ids, groups_by_id, path))
    check_expect(out, expect or {}, classes, role if role in TABLE_ROLES else "labels")
    return out


def _check_rows(path: Path, rows: int, expect: dict[str, Any], role: str) -> None:
    if "rows" in expect and rows != expect["rows"]:
        raise ValueError(f"{path}: {rows} rows, but the manifest expects {expect['rows']} "
                         f"(expect.{role}.rows): the file is incomplete or a different version")


def check_expect(table: LabelTable, expect: dict[str, Any], classes: Sequence[str],
                 role: str = "labels") -> None:
    """Rows, distinct non-empty groups, per-class counts, class folder = class name, and top folder ->
    allowed classes (``expect``, for the file of ``role``); errors name the file, the check and the numbers."""
    path = table.path
    _check_rows(path, len(table.ids), expect, role)
    if "groups" in expect:
        found = len(set(table.extras.get("groups", ())) - {""})
        if found != expect["groups"]:
            raise ValueError(f"{path}: {found} distinct groups, but the manifest expects {expect['groups']} "
                             f"(expect.{role}.groups)")
    if "classes" in expect:
        counts = np.bincount(table.labels, minlength=len(classes))
        wrong = [f"{c} {counts[classes.index(c)]} (expected {n})" for c, n in expect["classes"].items()
                 if counts[classes.index(c)] != n]
        if wrong:
            raise ValueError(f"{path}: class counts differ from the manifest's (expect.{role}.classes): "
                             f"{', '.join(wrong)}")
    if expect.get("class_folder"):
        folders = [Path(i).parent.name for i in table.ids]
        bad = np.flatnonzero(np.array(folders, dtype=object) != np.array(classes, dtype=object)[table.labels])
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{path}: {table.ids[i]!r} has label {table.labels[i]} "
                             f"({classes[table.labels[i]]}) but sits in folder {folders[i]!r} "
                             f"(expect.{role}.class_folder)")
    if expect.get("top_folder"):
        allowed = expect["top_folder"]
        for i, label in zip(table.ids, table.labels):
            parts = Path(i).parts
            top = parts[0] if len(parts) > 1 else ""
            if classes[label] not in allowed.get(top, ()):
                raise ValueError(f"{path}: {i!r} has label {label} ({classes[label]}) but its top "
                                 f"folder {top!r} allows only {list(allowed.get(top, ()))} "
                                 f"(expect.{role}.top_folder; folders: {list(allowed)})")
