"""On-disk layouts (ImageNet-R raw or processed, CIFAR-100 binary or torchvision's pickles), the
optional validation split, decoding once per process, and the registered datasets unchanged by all
of it (their tensors hashed before these changes)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cmm_utils.core.data import DataError, decode_images, get_manifest, load_dataset
from cmm_utils.core.data import decode as decode_mod
from cmm_utils.core.data.manifest import Layout, ensure_files
from cmm_utils.papers.magmax import data as magmax_data
from tests.test_data import _skin8


@pytest.fixture(autouse=True)
def fresh_decode_cache(monkeypatch):
    decode_mod.clear_cache()
    monkeypatch.setenv("CMM_NUM_WORKERS", "0")
    yield
    decode_mod.clear_cache()


# --- ImageNet-R ------------------------------------------------------------------------------------

def _imagenet_r_images(seed=0):
    rng = np.random.default_rng(seed)
    return {(cls, f"{dom}_{i}.jpg"): rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            for cls in ("ant", "zebra", "goldfish") for dom in ("art", "sketch") for i in range(5)}


def _save(images, folder, test=()):
    """The images as a raw tree (``folder/<class>/<file>``), or, with ``test`` (file names), as the
    authors' processed tree (``folder/{train,test}/<class>/<file>``, every class folder in both)."""
    for (cls, name), arr in images.items():
        sub = folder / ("" if not test else ("test" if name in test else "train")) / cls
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(sub / name, quality=95)
    for split in ("train", "test") if test else ():
        for cls, _ in images:
            (folder / split / cls).mkdir(parents=True, exist_ok=True)


def test_imagenet_r_processed_layout_reads_the_authors_split(tmp_path):
    images = _imagenet_r_images()
    test = {"art_0.jpg", "sketch_4.jpg"}
    _save(images, tmp_path / "processed" / "imagenet-r", test)
    _save(images, tmp_path / "raw" / "imagenet-r")
    (tmp_path / "processed" / "imagenet-r" / "README.txt").write_text("n01443537 goldfish\n")
    data, domains = magmax_data.load_imagenet_r(tmp_path / "processed", seed=0, size=32,
                                                split_file=tmp_path / "unused.json")
    assert data.classes == ("ant", "goldfish", "zebra")          # not ("test", "train")
    assert len(data.test) == 6 and len(data.train) + len(data.val) == 24
    assert sorted(domains["test"]) == ["art"] * 3 + ["sketch"] * 3
    assert not (tmp_path / "unused.json").exists()               # the tree's split is used, none drawn
    raw, _ = magmax_data.load_imagenet_r(tmp_path / "raw", seed=0, size=32, split_file=tmp_path / "raw.json")
    assert raw.classes == data.classes
    pooled = lambda d: sorted(  # noqa: E731  the same images under the same labels, whatever the split
        (int(y), hashlib.md5(x.numpy().tobytes()).hexdigest())
        for s in ("train", "val", "test") for x, y in zip(d.split(s).images, d.split(s).labels))
    assert pooled(raw) == pooled(data)


def test_imagenet_r_without_val_keeps_all_train(tmp_path):
    _save(_imagenet_r_images(), tmp_path / "imagenet-r", {"art_0.jpg"})
    data, _ = magmax_data.load_imagenet_r(tmp_path, size=16, val_fraction=0)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 0, 3)


@pytest.mark.parametrize("make", ["missing", "empty", "empty_processed"])
def test_imagenet_r_in_neither_layout_names_the_folder_and_both_layouts(tmp_path, make):
    folder = tmp_path / "imagenet-r"
    if make != "missing":
        folder.mkdir()
    if make == "empty_processed":
        (folder / "train" / "ant").mkdir(parents=True)
        (folder / "test" / "ant").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        magmax_data.load_imagenet_r(tmp_path, size=16)
    msg = str(err.value)
    assert str(folder) in msg and "imagenet-r/{train,test}/<class>" in msg
    if make != "empty_processed":
        assert "imagenet-r/<class folder>" in msg


# --- CIFAR-100: binary release and torchvision's pickles -------------------------------------------

def _cifar_arrays(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n), rng.integers(0, 20, n)


def _write_binary(path, splits):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, (data, fine, coarse) in splits.items():
            blob = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8), data], 1).tobytes()
            info = tarfile.TarInfo(f"cifar-100-binary/{name}.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _write_python(folder, splits, protocol=2, python2_names=False):
    """torchvision's files: a pickled dict per split. ``python2_names`` writes numpy's module as the
    real (Python 2) files name it, ``numpy.core.multiarray``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, fine, coarse) in splits.items():
        blob = pickle.dumps({"filenames": [f"img_{i}.png" for i in range(len(fine))], "batch_label": name,
                             "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(), "data": data},
                            protocol=protocol)
        if python2_names:
            assert b"numpy._core.multiarray" in blob
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(blob)


def _cifar100_unchecked():
    """The registered manifest without md5s (the tiny files are not the published ones)."""
    m = get_manifest("cifar100")
    return replace(m, files=tuple(replace(f, md5=None) for f in m.files),
                   layouts=tuple(Layout(lay.format, tuple(replace(f, md5=None) for f in lay.files))
                                 for lay in m.layouts))


@pytest.mark.parametrize("protocol, python2_names", [(2, True), (2, False), (4, False)])
def test_cifar100_python_layout_equals_the_binary_release(tmp_path, protocol, python2_names):
    splits = {"train": _cifar_arrays(60, 0), "test": _cifar_arrays(20, 1)}
    _write_binary(tmp_path / "bin" / "cifar100" / "cifar-100-binary.tar.gz", splits)
    _write_python(tmp_path / "py" / "cifar100" / "cifar-100-python", splits, protocol, python2_names)
    manifest = _cifar100_unchecked()
    a = load_dataset(manifest, root=tmp_path / "bin", download=False)
    b = load_dataset(manifest, root=tmp_path / "py", download=False)
    assert b.meta["format"] == "cifar_python" and a.meta["format"] == "cifar_binary_tar"
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s).images, b.split(s).images) and torch.equal(a.split(s).labels, b.split(s).labels)
    assert len(b.test) == 20 and len(b.train) + len(b.val) == 60 and b.test.images.shape[1:] == (3, 32, 32)
    assert b.test.labels.tolist() == splits["test"][1].tolist()


def test_cifar100_python_at_a_torchvision_root(tmp_path):
    _write_python(tmp_path / "cifar-100-python", {"train": _cifar_arrays(30), "test": _cifar_arrays(10, 1)})
    d = load_dataset(_cifar100_unchecked(), root=tmp_path, download=False, val_fraction=0)
    assert (len(d.train), len(d.val), len(d.test)) == (30, 0, 10)


def test_cifar100_python_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "cifar100" / "cifar-100-python"
    _write_python(folder, {"train": _cifar_arrays(10), "test": _cifar_arrays(5)})
    (folder / "test").write_bytes(pickle.dumps({"data": Exploit(), "fine_labels": [0]}))
    with pytest.raises(DataError, match=r"cifar-100-python/test: refused to load the global posix\.system"):
        load_dataset(_cifar100_unchecked(), root=tmp_path, download=False)
    assert not marker.exists()


def test_cifar100_missing_names_every_layout(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", root=tmp_path, download=False)
    msg = str(err.value)
    assert "cifar-100-binary.tar.gz" in msg and str(tmp_path / "cifar100" / "cifar-100-python" / "train") in msg
    assert str(tmp_path / "cifar-100-python" / "test") in msg


def test_torchvision_md5s_are_checked(tmp_path):
    _write_python(tmp_path / "cifar100" / "cifar-100-python", {"train": _cifar_arrays(10), "test": _cifar_arrays(5)})
    with pytest.raises(DataError, match="checksum mismatch .*cifar-100-python/train.*expected 16019d7e"):
        load_dataset("cifar100", root=tmp_path, download=False)


# --- the validation split, made only when a chapter reads it ---------------------------------------

def test_val_fraction_zero_leaves_the_whole_train_list_in_train(tmp_path):
    train, test = _skin8(tmp_path)
    manifest = replace(get_manifest("skin8"), expect={})
    today = load_dataset(manifest, root=tmp_path, size=8)
    assert len(today.val) == 3 and len(today.train) == 27                  # the default is unchanged
    full = load_dataset(manifest, root=tmp_path, size=8, val_fraction=0)
    assert (len(full.train), len(full.val), len(full.test)) == (30, 0, 6)
    assert full.val.images.shape == (0, 3, 8, 8)
    assert sorted(full.train.ids) == sorted(p for p, _ in train)             # every listed train image
    assert torch.equal(full.test.images, today.test.images)


def test_val_fraction_overrides_the_manifest_and_is_checked(data_root):
    d = load_dataset("cifar10_partial", val_fraction=0.25)
    assert (len(d.train), len(d.val)) == (615, 205)
    assert len(load_dataset("retinamnist", val_fraction=0).val) == 120     # an official val split stays
    for bad in (1, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"val_fraction={bad!r}; valid: None .* or 0 <= val_fraction < 1"):
            load_dataset("cifar10_partial", val_fraction=bad)


def test_manifests_say_which_chapters_read_val():
    assert get_manifest("cifar100").splits["val_read_by"] == ["magmax"]
    assert get_manifest("skin8").splits["val_read_by"] == [] == get_manifest("path16").splits["val_read_by"]


# --- decoding once ---------------------------------------------------------------------------------

def _folder(tmp_path, n=40):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.jpg")
        rows.append(f"im{i},{i % 3},L{i // 2}")
    (tmp_path / "labels.csv").write_text("image_id,label,lesion_id\n" + "\n".join(rows) + "\n")
    return tmp_path


def _count_decodes(monkeypatch):
    calls = []
    real = decode_mod.decode_file
    monkeypatch.setattr(decode_mod, "decode_file", lambda path, *a: calls.append(path.name) or real(path, *a))
    return calls


def test_a_folder_dataset_is_decoded_once_per_process(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    calls = _count_decodes(monkeypatch)
    first = load_dataset(str(folder), seed=0, size=16)
    assert sorted(calls) == sorted(f"im{i}.jpg" for i in range(40))
    again = load_dataset(str(folder), seed=1, size=16)                       # another seed: other splits, no decode
    assert len(calls) == 40
    pooled = lambda d: sorted(  # noqa: E731
        x.numpy().tobytes() for s in ("train", "val", "test") for x in d.split(s).images)
    assert pooled(first) == pooled(again)
    load_dataset(str(folder), seed=0, size=8)                                # another size is decoded
    assert len(calls) == 80
    Image.new("RGB", (24, 20), (9, 9, 9)).save(folder / "im3.jpg")           # a replaced file is decoded again
    os.utime(folder / "im3.jpg", ns=(1, 1))
    changed = load_dataset(str(folder), seed=0, size=16)
    assert len(calls) == 120 and pooled(changed) != pooled(first)


def test_decode_workers_keep_the_file_order(tmp_path, monkeypatch):
    files = sorted(_folder(tmp_path, n=10).glob("*.jpg"))
    single = np.array(decode_images(files, 8))
    decode_mod.clear_cache()
    monkeypatch.setenv("CMM_NUM_WORKERS", "2")
    monkeypatch.setattr(decode_mod, "PARALLEL_MIN_FILES", 1)
    assert np.array_equal(decode_images(files, 8), single)
    with pytest.raises(ValueError, match="read-only"):
        decode_images(files, 8)[0, 0, 0, 0] = 1


def test_decode_settings_are_checked(monkeypatch):
    monkeypatch.setenv("CMM_NUM_WORKERS", "four")
    with pytest.raises(ValueError, match="CMM_NUM_WORKERS='four' is not a whole number"):
        decode_mod.num_workers()
    monkeypatch.delenv("CMM_NUM_WORKERS")
    assert decode_mod.num_workers() == min(4, len(os.sched_getaffinity(0)))
    with pytest.raises(ValueError, match="unknown fit 'squash'; valid: stretch, shorter_side_crop"):
        decode_images([], 8, fit="squash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_on_cuda():
    from cmm_utils.core.data import LabeledImages
    from cmm_utils.core.train import batches
    data = LabeledImages(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10))
    images, labels = next(batches(data, 4, shuffle=False))
    assert images.is_pinned() and labels.is_pinned()


# --- the registered datasets are the same tensors as before these changes -------------------------

def _digest(d) -> str:
    h = hashlib.sha256()
    for s in ("train", "val", "test"):
        part = d.split(s)
        h.update(repr((s, tuple(part.images.shape), str(part.images.dtype))).encode())
        h.update(part.images.numpy().tobytes())
        h.update(part.labels.numpy().tobytes())
        if part.groups is not None:
            h.update("\0".join(map(str, part.groups)).encode())
    h.update("\0".join(d.classes).encode())
    return h.hexdigest()[:16]


CONFIGS = {"default": {}, "smoke": dict(seed=1, size=28, channels=3, max_per_split=300),
           "grey16": dict(seed=2, size=16, channels=1)}
# Recorded at dbae117+db5b782 (before layouts, val_fraction, ids and the decode cache) with this _digest.
BEFORE = {
    "cifar10_partial/default": "5ada4200a35a7b45", "cifar10_partial/smoke": "133a9e82e9338929",
    "cifar10_partial/grey16": "93cca03cee25deb1", "fashion_mnist/default": "af88c2300e96b6e5",
    "fashion_mnist/smoke": "05df165a326a5062", "fashion_mnist/grey16": "5116f370c0feda9f",
    "ham10000/default": "d6dd999dc50025e3", "ham10000/smoke": "3e0b899da6919794", "ham10000/grey16": "ac148c7a5ca1cbc1",
    "ham10000_jpg_sample/default": "ef62c8fd7c292d91", "ham10000_jpg_sample/smoke": "d48623d01f9e5356",
    "ham10000_jpg_sample/grey16": "7cd96c7c570e9ae5", "pathmnist_1k/default": "5c9faed159d5b776",
    "pathmnist_1k/smoke": "b8acd9b97a6fd937", "pathmnist_1k/grey16": "4ce70a921a7abee7",
    "retinamnist/default": "3e678bc671e7ee2e", "retinamnist/smoke": "ca1283cf3d3e9452",
    "retinamnist/grey16": "735fccb6d87fc6df"}


@pytest.mark.parametrize("name", sorted({k.split("/")[0] for k in BEFORE}))
def test_registered_datasets_load_the_same_tensors_as_before(data_root, name, monkeypatch):
    ensure_files(get_manifest(name), root=data_root, download=False)
    monkeypatch.setenv("CMM_NUM_WORKERS", "2")      # the parallel decode too, for the JPEG sample
    found = {f"{name}/{c}": _digest(load_dataset(name, download=False, **kw)) for c, kw in CONFIGS.items()}
    assert found == {k: v for k, v in BEFORE.items() if k.startswith(name + "/")}
