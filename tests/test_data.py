"""Data registry, loaders, splits and scenarios on the real data copies."""
from __future__ import annotations

import numpy as np
import pytest

from cmm_utils.data import (DataError, class_incremental, dataset_incremental, get_manifest, load_dataset,
                            load_manifests, task_class_splits)
from cmm_utils.data.cards import shared_groups
from cmm_utils.data.manifest import FileSpec, ensure_files, verify

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
