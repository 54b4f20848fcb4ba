"""Data registry, loaders, splits and scenarios on the real data copies."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cmm_utils.core.data import (DataError, class_incremental, dataset_incremental, get_manifest, load_dataset,
                                 load_manifests, task_class_splits)
from cmm_utils.core.data.cards import shared_groups
from cmm_utils.core.data.datasets import _read
from cmm_utils.core.data.manifest import MANIFEST_DIR, FileSpec, ensure_files, verify

REQUIRED = {"retinamnist", "pathmnist", "dermamnist", "bloodmnist", "ham10000", "cifar10", "cifar100",
            "fashion_mnist", "isic2019", "skin8", "aptos2019", "eyepacs", "path16"}


def test_every_required_dataset_has_a_complete_manifest():
    manifests = load_manifests()
    assert REQUIRED <= set(manifests), REQUIRED - set(manifests)
    for name, m in manifests.items():
        assert m.licence and m.citation and m.homepage, name
        assert m.num_classes >= 2 and m.channels in (1, 3), name
        assert m.files, name
        if m.download == "auto":
            assert all(f.url and f.md5 for f in m.files), name
        else:
            assert m.instructions, name


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(DataError) as err:
        load_dataset("no_such_set")
    assert "no_such_set" in str(err.value) and "retinamnist" in str(err.value)


def test_missing_file_offline_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_files(get_manifest("ham10000"), root=tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path) in msg and "ham10000" in msg and "How to get it" in msg


def test_corrupt_file_fails_the_checksum(tmp_path):
    bad = tmp_path / "retinamnist.npz"
    bad.write_bytes(b"not the real file")
    with pytest.raises(DataError, match="checksum mismatch"):
        verify(bad, FileSpec(path="retinamnist.npz", md5="bd4c0672f1bba3e3a89f0e4e876791e4"))


def test_real_files_pass_their_checksums(data_root):
    for name in ("retinamnist", "ham10000", "fashion_mnist", "pathmnist_1k", "cifar10_partial", "ham10000_jpg_sample"):
        ensure_files(get_manifest(name), root=data_root, download=False)


def test_retinamnist_official_splits(data_root):
    d = load_dataset("retinamnist", seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (1080, 120, 400)
    assert d.train.images.shape[1:] == (3, 28, 28) and d.num_classes == 5


def test_ham10000_split_is_lesion_disjoint_and_seeded(data_root):
    a, b, c = (load_dataset("ham10000", seed=s) for s in (0, 0, 1))
    assert len(a.test) == 1512  # the official ISIC 2018 Task 3 test set
    assert shared_groups(a) == 0
    assert np.array_equal(a.val.labels.numpy(), b.val.labels.numpy())
    assert not np.array_equal(a.val.groups, c.val.groups)
    assert set(np.unique(a.val.labels.numpy())) == set(range(7))  # stratified: every class in val


def test_npz_path_with_flat_labels_and_grey_images(unseen_npz):
    d = load_dataset(str(unseen_npz), seed=0, channels=3)
    assert d.num_classes == 10 and d.train.images.shape[1] == 3
    assert len(d.train) == 1200 and len(d.test) == 397


def test_npz_with_train_only_gets_stratified_val_and_test(data_root):
    d = load_dataset(str(data_root / "pathmnist_train_first1000.npz"), seed=3)
    assert len(d.train) + len(d.val) + len(d.test) == 1000
    assert set(np.unique(d.test.labels.numpy())) == set(range(9))


def test_folder_of_jpegs_with_csv(data_root):
    d = load_dataset("ham10000_jpg_sample", seed=0, size=32)
    assert d.train.images.shape[1:] == (3, 32, 32)
    assert len(d.train) + len(d.val) + len(d.test) == 700 and shared_groups(d) == 0
    by_path = load_dataset(str(data_root / "ham10000" / "jpg224_sample"), seed=0, size=32)
    assert len(by_path.train) + len(by_path.val) + len(by_path.test) == 700


def test_resize_and_smoke_cap():
    d = load_dataset("retinamnist", seed=0, size=16, max_per_split=50)
    assert d.train.images.shape == (50, 3, 16, 16) and len(d.test) == 50


def test_task_class_splits_match_magmax_cut():
    assert task_class_splits(list(range(10)), 3) == [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]
    with pytest.raises(ValueError, match="n_tasks"):
        task_class_splits([0, 1], 3)


def test_class_incremental_is_a_partition_and_deterministic():
    d = load_dataset("retinamnist", seed=0)
    s1, s2 = class_incremental(d, 2, seed=7), class_incremental(d, 2, seed=7)
    assert s1.class_order == s2.class_order
    assert sorted(c for t in s1.tasks for c in t.classes) == list(range(5))
    assert sum(len(t.test) for t in s1.tasks) == len(d.test)
    for t in s1.tasks:
        assert set(np.unique(t.train.labels.numpy())) <= set(t.classes)
    with pytest.raises(ValueError, match="permutation"):
        class_incremental(d, 2, class_order=[0, 1, 2])


def test_dataset_incremental_offsets_labels():
    a = load_dataset("retinamnist", seed=0, max_per_split=40)
    b = load_dataset("pathmnist_1k", seed=0, max_per_split=40)
    s = dataset_incremental([a, b])
    assert s.num_classes == 14 and s.tasks[1].classes == tuple(range(5, 14))
    assert int(s.tasks[1].train.labels.min()) >= 5


# --- Paper-scale image-folder layouts (ISIC 2019, SKIN8, HAM10000 + ISIC 2018), as tiny synthetic copies

ISIC = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


def _jpeg(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _isic2019(root):
    """48 images, 4 per class and 16 more NV; images 0-7 in pairs of lesions, 8-9 without lesion_id,
    10 not in the metadata."""
    folder = root / "isic2019"
    labels = np.r_[np.arange(32) % 8, np.ones(16, dtype=int)]
    ids = [f"ISIC_{i:07d}" + ("_downsampled" if i % 5 == 0 else "") for i in range(48)]
    for i, name in enumerate(ids):
        _jpeg(folder / "ISIC_2019_Training_Input" / f"{name}.jpg", i)
    truth = pd.DataFrame(np.eye(9)[labels], columns=ISIC + ["UNK"])
    truth.insert(0, "image", ids)
    truth.to_csv(folder / "ISIC_2019_Training_GroundTruth.csv", index=False)
    lesions = [f"IL_{i // 2:07d}" if i < 8 else (None if i < 10 else f"IL_{i:07d}") for i in range(48)]
    meta = pd.DataFrame({"image": ids, "age_approx": 55.0, "anatom_site_general": "anterior torso",
                         "lesion_id": lesions, "sex": "female"}).drop(index=10)
    meta.to_csv(folder / "ISIC_2019_Training_Metadata.csv", index=False)
    groups = ["" if g is None or i == 10 else g for i, g in enumerate(lesions)]
    return ids, labels, np.array(groups), truth


def _skin8(root, train=None, test=None):
    """List files of `<path> <label>` lines; default 10 train and 2 test images of BKL, MEL and VASC."""
    names = get_manifest("skin8").classes
    train = train or [(f"Data/{names[c]}/ISIC_{c}{k:06d}.jpg", c) for c in (0, 1, 7) for k in range(10)]
    test = test or [(f"Data/{names[c]}/ISIC_{c}{k:06d}.jpg", c) for c in (0, 1, 7) for k in range(10, 12)]
    for role, rows in (("train", train), ("test", test)):
        (root / "skin8").mkdir(exist_ok=True)
        (root / "skin8" / f"skin8_{role}_500.txt").write_text("".join(f"{p} {c}\n" for p, c in rows))
        for i, (path, _) in enumerate(rows):
            _jpeg(root / "skin8" / path, i)
    return train, test


def _ham10000_full(root):
    """28 HAM10000 images (3 per class, 7 more nv; lesions in pairs) and 7 ISIC 2018 test images (one per class)."""
    folder, classes = root / "ham10000_full", get_manifest("ham10000_full").classes
    dx = [classes[i % 7] for i in range(21)] + ["nv"] * 7
    meta = pd.DataFrame({"lesion_id": [f"HAM_{i // 2:07d}" for i in range(28)],
                         "image_id": [f"ISIC_{24306 + i:07d}" for i in range(28)], "dx": dx,
                         "dx_type": "histo", "age": 60.0, "sex": "male", "localization": "back"})
    file_order = [4, 5, 1, 0, 2, 3, 6]              # the file's MEL, NV, BCC, AKIEC, ... as class indices
    test_labels = np.arange(7)                      # akiec, bcc, bkl, df, mel, nv, vasc
    truth = pd.DataFrame(np.eye(7)[[file_order.index(c) for c in test_labels]],
                         columns=["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"])
    truth.insert(0, "image", [f"ISIC_{34524 + i:07d}" for i in range(7)])
    for i, name in enumerate([*meta.image_id, *truth.image]):
        _jpeg(folder / "images" / f"{name}.jpg", i)
    meta.to_csv(folder / "HAM10000_metadata.csv", index=False)
    truth.to_csv(folder / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)
    return meta, truth, test_labels


def _no_expect(name):
    return replace(get_manifest(name), expect={})


def test_isic2019_one_hot_labels_and_groups_from_metadata(tmp_path):
    ids, labels, groups, _ = _isic2019(tmp_path)
    manifest = replace(get_manifest("isic2019"), expect={
        "labels": {"rows": 48, "classes": {**{c: 4 for c in ISIC}, "NV": 20}}, "metadata": {"rows": 47}})
    images, found, extras = _read(manifest, tmp_path, 8, download=False)["pool"]
    assert images.shape == (48, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(found, labels) and found.dtype == np.int64
    assert np.array_equal(extras["groups"], groups)
    d = load_dataset(manifest, root=tmp_path, seed=0, size=8)
    assert len(d.train) + len(d.val) + len(d.test) == 48 and d.classes == tuple(ISIC)
    assert shared_groups(d) == 0 and len(d.test) > 0 and len(d.val) > 0


def test_isic2019_counts_are_checked_against_expect(tmp_path):
    _isic2019(tmp_path)
    with pytest.raises(ValueError, match="Metadata.csv: 47 rows, but the manifest expects 25331"):
        _read(get_manifest("isic2019"), tmp_path, 8, download=False)
    wrong = replace(get_manifest("isic2019"), expect={"labels": {"classes": {"MEL": 5, "DF": 4}}})
    with pytest.raises(ValueError, match=r"MEL 4 \(expected 5\)") as err:
        _read(wrong, tmp_path, 8, download=False)
    assert "DF 4" not in str(err.value)


@pytest.mark.parametrize("column, row", [("NV", 3), ("UNK", 5)])
def test_isic2019_rejects_two_ones_and_a_set_unk(tmp_path, column, row):
    ids, _, _, truth = _isic2019(tmp_path)
    truth.loc[row, column] = 1.0
    truth.to_csv(tmp_path / "isic2019" / "ISIC_2019_Training_GroundTruth.csv", index=False)
    with pytest.raises(ValueError) as err:
        _read(_no_expect("isic2019"), tmp_path, 8, download=False)
    msg = str(err.value)
    assert ids[row] in msg and f"{column}=1" in msg
    assert ("not one-hot" if column == "NV" else "must be 0") in msg


def test_skin8_official_splits_from_the_two_lists(tmp_path):
    train, test = _skin8(tmp_path)
    manifest = replace(get_manifest("skin8"), expect={
        "train_labels": {"rows": 30, "classes": {"BKL": 10, "VASC": 10}, "class_folder": True},
        "test_labels": {"rows": 6, "class_folder": True}})
    arrays = _read(manifest, tmp_path, 8, download=False)
    assert set(arrays) == {"train", "test"}
    assert np.array_equal(arrays["train"][1], [c for _, c in train])
    assert np.array_equal(arrays["test"][1], [c for _, c in test])
    d = load_dataset(manifest, root=tmp_path, seed=0, size=8)
    assert len(d.test) == 6 and len(d.train) + len(d.val) == 30
    assert sorted(d.test.labels.tolist()) == [0, 0, 1, 1, 7, 7]


def test_skin8_rejects_bad_lists(tmp_path):
    bad_label = [("Data/BKL/ISIC_0000001.jpg", 0), ("Data/VASC/ISIC_0000002.jpg", 8)]
    _skin8(tmp_path, train=bad_label)
    with pytest.raises(ValueError, match=r"label 8 of 'Data/VASC/ISIC_0000002.jpg' is not a class index; "
                                          r"valid: 0\.\.7 \(BKL, MEL"):
        _read(_no_expect("skin8"), tmp_path, 8, download=False)
    _skin8(tmp_path, train=[("Data/BKL/ISIC_0000001.jpg", 1)])
    folders = replace(get_manifest("skin8"), expect={"train_labels": {"class_folder": True}})
    with pytest.raises(ValueError, match=r"'Data/BKL/ISIC_0000001.jpg' has label 1 \(MEL\) but sits in folder 'BKL'"):
        _read(folders, tmp_path, 8, download=False)
    _skin8(tmp_path, train=[("Data/BKL/ISIC_0000010.jpg", 0)])        # also in the default test list
    with pytest.raises(ValueError, match="both the train list .* and the test list .*ISIC_0000010.jpg"):
        _read(_no_expect("skin8"), tmp_path, 8, download=False)


def test_ham10000_full_names_and_one_hot_test_split(tmp_path):
    meta, truth, test_labels = _ham10000_full(tmp_path)
    classes = get_manifest("ham10000_full").classes
    manifest = replace(get_manifest("ham10000_full"), expect={
        "train_labels": {"rows": 28, "groups": 14, "classes": {**{c: 3 for c in classes}, "nv": 10}},
        "test_labels": {"rows": 7, "classes": {c: 1 for c in classes}}})
    arrays = _read(manifest, tmp_path, 8, download=False)
    assert np.array_equal(arrays["train"][1], [classes.index(d) for d in meta.dx])
    assert np.array_equal(arrays["train"][2]["groups"], meta.lesion_id)
    assert np.array_equal(arrays["test"][1], test_labels) and "groups" not in arrays["test"][2]
    d = load_dataset(manifest, root=tmp_path, seed=0, size=8)
    assert len(d.test) == 7 and len(d.train) + len(d.val) == 28 and shared_groups(d) == 0


def test_ham10000_full_rejects_unknown_names_and_missing_images(tmp_path):
    meta, _, _ = _ham10000_full(tmp_path)
    meta.loc[4, "dx"] = "melanoma"
    meta.to_csv(tmp_path / "ham10000_full" / "HAM10000_metadata.csv", index=False)
    with pytest.raises(ValueError, match="unknown class name 'melanoma' for 'ISIC_0024310'; valid: akiec, bcc"):
        _read(_no_expect("ham10000_full"), tmp_path, 8, download=False)
    _ham10000_full(tmp_path)
    (tmp_path / "ham10000_full" / "images" / "ISIC_0034526.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_0034526.jpg is listed in .*ISIC2018_Task3_Test_GroundTruth"):
        _read(_no_expect("ham10000_full"), tmp_path, 8, download=False)


def test_manifest_expect_with_a_typo_fails_at_load(tmp_path):
    raw = yaml.safe_load((MANIFEST_DIR / "skin8.yaml").read_text())
    raw["expect"]["train_labels"]["class_count"] = 3
    (tmp_path / "skin8.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match="expect.train_labels is invalid.*class_count"):
        load_manifests(tmp_path)


# --- Fundus sets (APTOS 2019, EyePACS) and PATH16, as tiny synthetic copies

def _aptos(root, counts=(3, 2, 2, 1, 2)):
    """train.csv (id_code, diagnosis) and one PNG per row; ``counts[g]`` images of grade g."""
    grades = np.repeat(np.arange(5), counts)
    ids = [f"{i:04x}abcd{i}" for i in range(len(grades))]
    for i, name in enumerate(ids):
        _jpeg(root / "aptos2019" / "train_images" / f"{name}.png", i)
    pd.DataFrame({"id_code": ids, "diagnosis": grades}).to_csv(root / "aptos2019" / "train.csv", index=False)
    return ids, grades


def test_aptos_expect_mismatch_names_the_role_and_the_numbers(tmp_path):
    ids, grades = _aptos(tmp_path)
    with pytest.raises(ValueError, match=r"train\.csv: 10 rows, but the manifest expects 3662 \(expect\.labels\.rows\)"):
        _read(get_manifest("aptos2019"), tmp_path, 8, download=False)
    classes = get_manifest("aptos2019").classes
    wrong = replace(get_manifest("aptos2019"), expect={
        "labels": {"rows": 10, "classes": {classes[0]: 3, classes[1]: 370}}})
    with pytest.raises(ValueError, match=r"\(expect\.labels\.classes\): 1 mild 2 \(expected 370\)") as err:
        _read(wrong, tmp_path, 8, download=False)
    assert "0 no DR" not in str(err.value)
    right = replace(get_manifest("aptos2019"), expect={
        "labels": {"rows": 10, "classes": dict(zip(classes, (3, 2, 2, 1, 2)))}})
    images, labels, _ = _read(right, tmp_path, 8, download=False)["pool"]
    assert images.shape == (10, 8, 8, 3) and np.array_equal(labels, grades)


def _eyepacs(root, patients=30):
    """trainLabels.csv (image, level) for both eyes of ``patients`` patients, and their JPEGs."""
    ids = [f"{p}_{eye}" for p in range(10, 10 + patients) for eye in ("left", "right")]
    levels = [(p + (eye == "right" and p % 3 == 0)) % 5 for p in range(patients) for eye in ("left", "right")]
    for i, name in enumerate(ids):
        _jpeg(root / "eyepacs" / "train" / f"{name}.jpeg", i)
    pd.DataFrame({"image": ids, "level": levels}).to_csv(root / "eyepacs" / "trainLabels.csv", index=False)
    return ids, np.array(levels)


def test_eyepacs_keeps_both_eyes_of_a_patient_in_one_split(tmp_path):
    ids, levels = _eyepacs(tmp_path)
    classes = get_manifest("eyepacs").classes
    manifest = replace(get_manifest("eyepacs"), expect={"labels": {
        "rows": 60, "groups": 30, "classes": {c: int(n) for c, n in zip(classes, np.bincount(levels))}}})
    _, labels, extras = _read(manifest, tmp_path, 8, download=False)["pool"]
    assert np.array_equal(labels, levels)
    assert list(extras["groups"][:4]) == ["10", "10", "11", "11"]
    for seed in (0, 1):
        d = load_dataset(manifest, root=tmp_path, seed=seed, size=8)
        assert len(d.train) + len(d.val) + len(d.test) == 60 and len(d.val) and len(d.test)
        assert shared_groups(d) == 0
        for split in ("train", "val", "test"):                 # both eyes of each patient, or none
            _, per_patient = np.unique(d.split(split).groups, return_counts=True)
            assert set(per_patient) == {2}
    ungrouped = replace(manifest, splits={"make": {"val": 0.1, "test": 0.1, "stratify": True}})
    assert shared_groups(load_dataset(ungrouped, root=tmp_path, seed=0, size=8)) > 0   # the check bites


def test_eyepacs_id_without_a_patient_is_an_error(tmp_path):
    _eyepacs(tmp_path, patients=3)
    table = pd.read_csv(tmp_path / "eyepacs" / "trainLabels.csv")
    table.loc[2, "image"] = "11_center"
    table.to_csv(tmp_path / "eyepacs" / "trainLabels.csv", index=False)
    with pytest.raises(ValueError, match=r"id '11_center' does not match columns.group_from_id"):
        _read(_no_expect("eyepacs"), tmp_path, 8, download=False)


def test_path16_top_folder_must_hold_the_label(tmp_path):
    classes = get_manifest("path16").classes
    rows = [(f"{c.rsplit('_', 1)[0]}/{split}/folder{c[-1]}/img{k}.png", i, split)
            for i, c in enumerate(classes) for k, split in enumerate(("train", "train", "test"))]
    for i, (path, _, _) in enumerate(rows):
        _jpeg(tmp_path / "path16" / "Pathology16" / path, i)
    table = pd.DataFrame(rows, columns=["path", "label", "split"])
    table.to_csv(tmp_path / "path16" / "labels.csv", index=False)
    _, labels, extras = _read(get_manifest("path16"), tmp_path, 8, download=False)["pool"]
    assert np.array_equal(labels, np.repeat(np.arange(16), 3)) and set(extras["split"]) == {"train", "test"}
    table.loc[30, "label"] = 0                                  # a TCGA_STD path labelled MHIST_0
    table.to_csv(tmp_path / "path16" / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"'TCGA_STD/train/folder2/img0.png' has label 0 \(MHIST_0\) but its top "
                                          r"folder 'TCGA_STD' allows only \['TCGA_STD_0', .*expect\.labels\.top_folder"):
        _read(get_manifest("path16"), tmp_path, 8, download=False)


@pytest.mark.parametrize("name, edit, message", [
    ("eyepacs", lambda raw: raw["columns"].update(group_from_id="^\\d+_"), "needs a capture group"),
    ("eyepacs", lambda raw: raw["columns"].update(group="patient"), "excludes columns.group"),
    ("path16", lambda raw: raw["expect"]["labels"]["top_folder"]["lung"].append("lung_2"), "unknown classes"),
    ("isic2019", lambda raw: raw["expect"]["metadata"].update(groups=3), "expect.metadata is invalid"),
])
def test_manifest_group_and_folder_specs_fail_at_load(tmp_path, name, edit, message):
    raw = yaml.safe_load((MANIFEST_DIR / f"{name}.yaml").read_text())
    edit(raw)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=message):
        load_manifests(tmp_path)
