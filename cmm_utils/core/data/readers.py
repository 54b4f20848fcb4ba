"""Readers for the on-disk formats the manifests name, each returning plain arrays.

Every reader returns ``{split: (images uint8 [N, H, W, C], labels int64 [N], extras)}`` where
``split`` is ``train``/``val``/``test`` or ``pool`` (one pool the splitter divides), and ``extras``
holds per-sample string arrays (``groups`` for lesion ids, ``split`` for a split column).
No reader unpickles objects: CIFAR's binary release is read as bytes, torchvision's pickled
``cifar-100-python`` by an unpickler that builds numpy arrays, lists and dicts and refuses any other
global, npz with ``allow_pickle=False``.
Every reader checks what it returns (:mod:`.validate`): a truncated or corrupt file, counts that
differ, non-finite or out-of-range pixels, negative or fractional labels are a ``DataError``.
"""
from __future__ import annotations

import codecs
import gzip
import pickle
import tarfile
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from numpy._core.multiarray import _reconstruct

from cmm_utils.core.data.decode import decode_images
from cmm_utils.core.data.manifest import LABEL_ROLES, DataError
from cmm_utils.core.data.validate import check_arrays, check_images, check_labels, readable

Arrays = dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]
SPLITS = ("train", "val", "test")


def read_npz(path: Path, keys: dict[str, str] | None = None) -> Arrays:
    """MedMNIST layout (``{split}_images``/``{split}_labels``) or one pool (``images``/``labels``)."""
    with readable(path, "npz"), np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        keys = dict(keys or {})
        out: Arrays = {}
        for split in SPLITS:
            ik, lk = keys.get(f"{split}_images", f"{split}_images"), keys.get(f"{split}_labels", f"{split}_labels")
            if ik in files and lk in files:
                out[split] = (check_images(data[ik], f"{path}:{ik}"), check_labels(data[lk], f"{path}:{lk}"), {})
        pool_images, pool_labels = keys.get("images", "images"), keys.get("labels", "labels")
        if not out and pool_images in files:
            extras = {name: np.asarray(data[keys[name]]).astype(str)
                      for name in ("groups", "split", "ids") if name in keys}
            out["pool"] = (check_images(data[pool_images], f"{path}:{pool_images}"),
                           check_labels(data[pool_labels], f"{path}:{pool_labels}"), extras)
        if not out:
            raise DataError(f"{path}: no image arrays found. Keys present: {sorted(files)}; expected "
                            "MedMNIST keys train_images/train_labels (val_, test_ optional) or images/labels")
        return check_arrays(out, str(path))


def npz_class_names(path: Path) -> list[str] | None:
    with readable(path, "npz"), np.load(path, allow_pickle=False) as data:
        for key in ("class_names", "label_names"):
            if key in data.files:
                return [str(c) for c in data[key]]
    return None


def _read_idx(path: Path) -> np.ndarray:
    with readable(path, "gzipped idx"):
        with gzip.open(path, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_idx_gz(files: dict[str, Path]) -> Arrays:
    """The MNIST/Fashion-MNIST idx format, gzipped, one file per role."""
    out = {split: (check_images(_read_idx(files[f"{split}_images"]), str(files[f"{split}_images"])),
                   check_labels(_read_idx(files[f"{split}_labels"]), str(files[f"{split}_labels"])), {})
           for split in ("train", "test") if f"{split}_images" in files}
    return check_arrays(out, str(files.get("train_images", next(iter(files.values())))))


def read_cifar_binary_tar(path: Path) -> Arrays:
    """CIFAR-10/100 binary release: records of label byte(s) then 3x32x32 uint8."""
    is_100 = "100" in path.name
    label_bytes, fine = (2, 1) if is_100 else (1, 0)
    record = label_bytes + 3072
    parts: dict[str, list[bytes]] = {"train": [], "test": []}
    with readable(path, "CIFAR binary tar.gz"):
        with tarfile.open(path, "r:gz") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(member.name).name
                if not name.endswith(".bin") or "meta" in name:
                    continue
                split = "test" if "test" in name else "train"
                parts[split].append(tar.extractfile(member).read())
        out: Arrays = {}
        for split, blobs in parts.items():
            raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(-1, record)
            images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            out[split] = (np.ascontiguousarray(images), raw[:, fine].astype(np.int64), {})
    return check_arrays(out, str(path))


# The only globals a CIFAR python pickle needs (numpy arrays of a plain dtype); ``_codecs.encode``
# is how Python 3's protocol 2 writes bytes. Anything else (os.system, a class) is refused unrun.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,     # Python 2 / numpy 1 files
                   ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load the global {module}.{name}: a CIFAR python file "
                                         "holds only dicts, lists and numpy arrays")
        return _PICKLE_GLOBALS[(module, name)]


def _unpickle_arrays(path: Path) -> dict:
    with readable(path, "CIFAR python pickle"), open(path, "rb") as f:
        try:
            raw = _ArraysOnly(f, encoding="latin1").load()   # the files are Python 2 pickles, as torchvision reads them
        except pickle.UnpicklingError as err:
            raise DataError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise DataError(f"{path}: holds a {type(raw).__name__}; expected a dict with data and labels")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_cifar_python(files: dict[str, Path]) -> Arrays:
    """torchvision's CIFAR layout (``cifar-100-python/{train,test}``): per file a pickled dict of
    ``data`` uint8 ``(N, 3072)`` (R, G, B planes) and ``fine_labels`` (CIFAR-100) or ``labels``;
    ``files`` maps ``train*``/``test*`` roles to paths, concatenated in role order per split. The
    images and labels equal those of the binary release."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for role, path in sorted(files.items()):
        raw = _unpickle_arrays(path)
        label_key = next((k for k in ("fine_labels", "labels") if k in raw), None)
        data = np.asarray(raw.get("data", ()))
        if label_key is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: keys {sorted(raw)}, data {data.dtype} {data.shape}; expected data uint8 "
                            "(N, 3072) and fine_labels or labels")
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        parts["test" if role.startswith("test") else "train"].append(
            (images, check_labels(np.asarray(raw[label_key]), f"{path}:{label_key}")))
    out: Arrays = {split: (np.ascontiguousarray(np.concatenate([p[0] for p in ps])),
                           np.concatenate([p[1] for p in ps]), {})
                   for split, ps in parts.items() if ps}
    return check_arrays(out, str(next(iter(files.values()))))


def read_image_folder_csv(files: dict[str, Path], images_dir: Path, columns: dict[str, Any],
                          extension: str = ".jpg", size: int | None = None, classes: Sequence[str] = (),
                          expect: dict[str, dict[str, Any]] | None = None) -> Arrays:
    """Image files plus label tables, checked, then decoded once (resized to ``size``) into memory.

    ``files`` maps each file's role to its path: ``labels`` (or no role) is one pool,
    ``train_labels``/``val_labels``/``test_labels`` are official splits, ``metadata`` supplies the
    group column joined on the id. :mod:`.label_tables` reads and checks the labels; here every
    listed image must exist, and no image file name may be in two split lists.
    """
    from cmm_utils.core.data.label_tables import load_table, metadata_groups  # pandas, only for this format

    expect = expect or {}
    groups = (metadata_groups(files["metadata"], columns, expect.get("metadata", {}))
              if "metadata" in files else None)
    tables = {LABEL_ROLES.get(role, "pool"): load_table(path, role, columns, classes, groups, expect.get(role))
              for role, path in files.items() if role != "metadata"}
    images = {split: [_image_file(images_dir, i, extension) for i in t.ids] for split, t in tables.items()}
    _check_disjoint(images, tables)
    for split, t in tables.items():
        missing = [f for f in images[split] if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is listed in {t.path} but missing ({len(missing)} of "
                                    f"{len(t.ids)} listed images missing under {images_dir})")
    out = {split: (decode_images(images[split], size, listed_in=t.path), check_labels(t.labels, str(t.path)),
                   {**t.extras, "ids": t.ids.astype(str)})
           for split, t in tables.items()}
    return check_arrays(out, str(next(iter(files.values()))))


def _image_file(images_dir: Path, image_id: str, extension: str) -> Path:
    return images_dir / (image_id if Path(image_id).suffix else image_id + extension)


def _check_disjoint(images: dict[str, list[Path]], tables: dict) -> None:
    names = {split: {f.name for f in files} for split, files in images.items()}
    for a, b in combinations(names, 2):
        shared = sorted(names[a] & names[b])
        if shared:
            raise ValueError(f"{len(shared)} images are in both the {a} list {tables[a].path} and the {b} "
                             f"list {tables[b].path}, e.g. {shared[0]!r}")

