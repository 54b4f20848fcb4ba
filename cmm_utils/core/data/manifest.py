"""Dataset manifests: the registry of every dataset the book knows (``data_manifests/*.yaml``).

A manifest says where a dataset comes from, under which licence, which files make it (with
checksums), its classes and how its splits are made. ``data_manifests/SCHEMA.md`` defines the
fields. The manifests are the only registry: nothing else names datasets.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MANIFEST_DIR = Path(__file__).resolve().parents[3] / "data_manifests"
FORMATS = ("npz", "idx_gz", "cifar_binary_tar", "cifar_python", "image_folder_csv")
# image_folder_csv file roles: a label file per split (``labels`` = one pool), and ``metadata``
LABEL_ROLES = {"labels": "pool", "train_labels": "train", "val_labels": "val", "test_labels": "test"}
TABLE_ROLES = (*LABEL_ROLES, "metadata")
EXPECT_KEYS = ("rows", "classes", "groups", "class_folder", "top_folder")


class DataError(RuntimeError):
    """Missing, corrupt or unknown data, with what was asked, where we looked and what to do."""


@dataclass(frozen=True)
class FileSpec:
    path: str
    url: str | None = None
    md5: str | None = None
    content_md5: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class Layout:
    """Another on-disk form of the same data (torchvision's pickled CIFAR beside the binary
    release), read when the manifest's own files are missing."""
    format: str
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class Manifest:
    name: str
    title: str
    format: str
    classes: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    task: str
    licence: str
    citation: str
    homepage: str
    files: tuple[FileSpec, ...]
    splits: dict[str, Any]
    download: str = "manual"
    instructions: str = ""
    description: str = ""
    modality: str = ""
    keys: dict[str, str] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, dict[str, Any]] = field(default_factory=dict)
    images_dir: str | None = None
    extension: str = ".jpg"
    paper_usage: str = ""
    source_file: str = ""
    layouts: tuple[Layout, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _parse(raw: dict[str, Any], source_file: str) -> Manifest:
    if raw.get("format") not in FORMATS:
        raise DataError(f"{source_file}: format {raw.get('format')!r} is not one of {FORMATS}")
    layouts = tuple(Layout(str(lay.get("format")), _file_specs(lay.get("files"))) for lay in raw.get("layouts") or [])
    bad = [lay.format for lay in layouts if lay.format not in FORMATS or not lay.files]
    if bad:
        raise DataError(f"{source_file}: layouts need files and a format of {FORMATS}; got format(s) {bad}")
    known = {f for f in Manifest.__dataclass_fields__} - {"files", "classes", "image_size", "source_file", "layouts"}
    kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
    manifest = Manifest(files=_file_specs(raw.get("files")), classes=tuple(str(c) for c in raw["classes"]),
                        image_size=tuple(raw.get("image_size", (0, 0))), source_file=source_file,
                        layouts=layouts, **kwargs)
    if manifest.format == "image_folder_csv":
        _check_roles(manifest)
        _check_group_columns(manifest)
    _check_expect_spec(manifest)
    return manifest


def _file_specs(raw: list | None) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(**{k: f.get(k) for k in ("path", "url", "md5", "content_md5", "role")}) for f in raw or [])


def role_columns(columns: dict[str, Any], role: str | None) -> dict[str, Any]:
    """The ``columns`` for one file: the shared entries, overridden by the entries under ``columns[role]``."""
    shared = {k: v for k, v in columns.items() if k not in TABLE_ROLES}
    return {**shared, **(columns.get(role) or {})}


def _check_group_columns(m: Manifest) -> None:
    """``group_from_id`` is a regex with a capture group, and no file takes groups from two places."""
    for spec in m.files:
        cols = role_columns(m.columns, spec.role)
        pattern = cols.get("group_from_id")
        if pattern is None:
            continue
        try:
            groups = re.compile(pattern).groups
        except (re.error, TypeError) as err:
            raise DataError(f"{m.source_file}: columns.group_from_id {pattern!r} is not a "
                            f"regex ({err})") from err
        if groups < 1 or cols.get("group"):
            raise DataError(f"{m.source_file}: columns.group_from_id {pattern!r} needs a capture group "
                            f"(the group) and excludes columns.group (got {cols.get('group')!r})")


def _check_roles(m: Manifest) -> None:
    """Every file of an image folder has a known role (or none: one labels file), each role once."""
    roles = [f.role or "labels" for f in m.files]
    unknown = sorted(set(roles) - set(TABLE_ROLES))
    if unknown or len(roles) != len(set(roles)):
        raise DataError(f"{m.source_file}: file roles {roles}; each must be one of {TABLE_ROLES}, "
                        f"at most once")


def _check_expect_spec(m: Manifest) -> None:
    """``expect`` names file roles, known checks and known classes (typos fail at load time)."""
    roles = [f.role for f in m.files]
    for role, checks in m.expect.items():
        unknown = sorted(set(checks) - set(EXPECT_KEYS if role != "metadata" else ("rows",)))
        named = {*(checks.get("classes") or {}),
                 *(c for cs in (checks.get("top_folder") or {}).values() for c in cs)}
        classes = sorted(named - set(m.classes))
        if role not in roles or unknown or classes:
            raise DataError(f"{m.source_file}: expect.{role} is invalid: roles are {roles}, checks "
                            f"{EXPECT_KEYS} (metadata: rows), classes {list(m.classes)}; got checks {sorted(checks)}"
                            + (f", unknown classes {classes}" if classes else ""))


def load_manifests(directory: Path | str = MANIFEST_DIR) -> dict[str, Manifest]:
    """Every manifest in ``directory``, by name."""
    out = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw.get("name") != path.stem:
            raise DataError(f"{path}: name {raw.get('name')!r} differs from the file name {path.stem!r}")
        out[path.stem] = _parse(raw, str(path))
    return out


def get_manifest(name: str) -> Manifest:
    """The manifest called ``name``; an unknown name lists the valid ones."""
    manifests = load_manifests()
    if name not in manifests:
        raise DataError(f"unknown dataset {name!r}. Valid names: {', '.join(sorted(manifests))}. "
                        f"Any MedMNIST-format .npz path or a folder with labels.csv works too.")
    return manifests[name]


def data_root() -> Path:
    """The data root: ``$CMM_DATA``, else ``~/.cache/cmm_data``."""
    return Path(os.environ.get("CMM_DATA") or Path.home() / ".cache" / "cmm_data").expanduser()


def md5sum(path: Path, *, decompress: bool = False, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, spec: FileSpec) -> None:
    """Raise :class:`DataError` when ``path`` matches neither the published nor the content md5."""
    if spec.md5 is None and spec.content_md5 is None:
        return
    found = md5sum(path)
    if found == spec.md5:
        return
    if spec.content_md5 and path.suffix == ".gz" and md5sum(path, decompress=True) == spec.content_md5:
        return
    raise DataError(f"checksum mismatch for {path}: md5 {found}, expected {spec.md5}"
                    + (f" (or decompressed {spec.content_md5})" if spec.content_md5 else "")
                    + ". The file is corrupt or a different version: delete it and download it again"
                    + (f" from {spec.url}" if spec.url else "") + " (`make data` does it for the open sets).")


def _download(url: str, dest: Path, timeout: float = 60) -> None:
    """Download to a temporary file beside ``dest``, then rename: nothing is left half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_files(manifest: Manifest, root: Path | None = None, *, download: bool = True,
                 check: bool = True) -> dict[str, Path]:
    """Paths of the manifest's files under the data root, downloaded and verified as needed.

    Returns ``{role or path: absolute path}``. A missing file is downloaded from its official URL
    when the manifest allows it; offline, or for ``download: manual`` sets, the error says what was
    asked, where we looked and how to get it.
    """
    root = Path(root) if root is not None else data_root()
    out = {}
    for spec in manifest.files:
        path = root / spec.path
        if not path.exists():
            if download and manifest.download == "auto" and spec.url:
                try:
                    _download(spec.url, path)
                except OSError as err:
                    raise DataError(
                        f"dataset {manifest.name!r}: {path} is missing and the download from "
                        f"{spec.url} failed ({err}). Download it by hand to that path, or point "
                        f"CMM_DATA at a folder that has it.") from err
            else:
                how = manifest.instructions.strip() or (f"download {spec.url}" if spec.url else "see the manifest")
                raise DataError(
                    f"dataset {manifest.name!r}: {path} is missing (data root {root}, from CMM_DATA="
                    f"{os.environ.get('CMM_DATA', '<unset>')}). How to get it: {how}")
        if check:
            verify(path, spec)
        out[spec.role or spec.path] = path
    return out
