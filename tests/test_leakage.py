"""HAM10000 inside ISIC-2019: the source's images and lesions kept out of the target's evaluation
splits, on synthetic copies of the official tables (their real file and column names)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from cmm_utils.core.data import DatasetSplits, LabeledImages, get_manifest, load_dataset, remove_source_images
from cmm_utils.core.data.leakage import image_keys, source_overlap
from tests.test_data import ISIC, _jpeg

HAM_IDS = [f"ISIC_{24306 + i:07d}" for i in range(56)]
HAM_LESIONS = [f"HAM_{i // 2:07d}" for i in range(56)]


def _ham10000_full(root):
    """HAM10000_metadata.csv (56 images, lesions in pairs) and ISIC2018_Task3_Test_GroundTruth.csv (7)."""
    folder, classes = root / "ham10000_full", get_manifest("ham10000_full").classes
    meta = pd.DataFrame({"lesion_id": HAM_LESIONS, "image_id": HAM_IDS, "dx": [classes[i % 7] for i in range(56)],
                         "dx_type": "histo", "age": 60.0, "sex": "male", "localization": "back"})
    truth = pd.DataFrame(np.eye(7)[[0, 1, 2, 3, 4, 5, 6]], columns=["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"])
    truth.insert(0, "image", [f"ISIC_{34524 + i:07d}" for i in range(7)])
    for i, name in enumerate([*meta.image_id, *truth.image]):
        _jpeg(folder / "images" / f"{name}.jpg", i)
    meta.to_csv(folder / "HAM10000_metadata.csv", index=False)
    truth.to_csv(folder / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)


def _isic2019(root, ids, lesions):
    """ISIC_2019_Training_GroundTruth.csv / _Metadata.csv and the images; labels cycle over the 8 classes."""
    folder = root / "isic2019"
    labels = np.arange(len(ids)) % 8
    for i, name in enumerate(ids):
        _jpeg(folder / "ISIC_2019_Training_Input" / f"{name}.jpg", 100 + i)
    truth = pd.DataFrame(np.eye(9)[labels], columns=ISIC + ["UNK"])
    truth.insert(0, "image", ids)
    truth.to_csv(folder / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": ids, "age_approx": 55.0, "anatom_site_general": "head/neck", "lesion_id": lesions,
                  "sex": "female"}).to_csv(folder / "ISIC_2019_Training_Metadata.csv", index=False)


def _target_rows():
    """128 ISIC-2019 images: 20 HAM10000 images (same ids and lesions), 8 other images of HAM lesions,
    60 BCN images and 40 MSK images (``_downsampled``, no lesion id)."""
    ids = HAM_IDS[:20] + [f"ISIC_{30000 + i:07d}" for i in range(8)]
    lesions = HAM_LESIONS[:20] + [HAM_LESIONS[2 * i + 1] for i in range(8)]
    ids += [f"ISIC_{54000 + i:07d}" for i in range(60)] + [f"ISIC_{i:07d}_downsampled" for i in range(40)]
    lesions += [f"BCN_{i // 2:07d}" for i in range(60)] + [None] * 40
    return ids, lesions


def _no_expect(name):
    return replace(get_manifest(name), expect={})


@pytest.fixture
def target_and_source(tmp_path):
    _ham10000_full(tmp_path)
    ids, lesions = _target_rows()
    _isic2019(tmp_path, ids, lesions)
    source = load_dataset(_no_expect("ham10000_full"), root=tmp_path, seed=0, size=8)
    target = load_dataset(_no_expect("isic2019"), root=tmp_path, seed=0, size=8)
    return target, source


def test_no_source_image_or_lesion_is_left_in_the_target_test_split(target_and_source):
    target, source = target_and_source
    src_ids = {i for s in ("train", "val", "test") for i in source.split(s).ids}
    src_lesions = {g for s in ("train", "val", "test") if source.split(s).groups is not None
                   for g in source.split(s).groups} - {""}
    leaking = {s: int(sum(i in src_ids or g in src_lesions
                          for i, g in zip(target.split(s).ids, target.split(s).groups)))
               for s in ("train", "val", "test")}
    assert leaking["test"] > 0                                        # the synthetic split does leak
    clean, removed = remove_source_images(target, source)
    for s in ("val", "test"):
        assert not set(image_keys(clean.split(s).ids)) & src_ids
        assert not set(clean.split(s).groups) & src_lesions
        row = removed.set_index("split").loc[s]
        assert row["images"] - row["kept"] == leaking[s] == row["same image"] + row["same lesion"]
        assert len(clean.split(s)) == row["kept"]
    assert (removed.set_index("split")["same lesion"] > 0).any()      # other images of HAM lesions went too
    assert torch.equal(clean.train.images, target.train.images)       # training on them is not leakage
    assert clean.meta["removed_source_images"] == {"source": "ham10000_full", "val": leaking["val"],
                                                   "test": leaking["test"]}
    everywhere, table = remove_source_images(target, source, splits=("train", "val", "test"))
    assert int(table["images"].sum() - table["kept"].sum()) == sum(leaking.values())
    assert not set(image_keys(everywhere.train.ids)) & src_ids


def test_image_ids_alone_when_lesions_are_not_asked_for(target_and_source):
    target, source = target_and_source
    _, removed = remove_source_images(target, source, by_lesion=False)
    assert (removed["same lesion"] == 0).all() and removed["same image"].sum() > 0


def test_the_real_ham10000_file_carries_isic_ids_and_lesion_ids(data_root, tmp_path):
    ham = load_dataset("ham10000", seed=0)
    assert all(i.startswith("ISIC_") for i in ham.train.ids[:50]) and ham.train.groups[0].startswith("HAM_")
    ids = list(ham.train.ids[:16]) + [f"ISIC_{54000 + i:07d}" for i in range(112)]
    _isic2019(tmp_path, ids, list(ham.train.groups[:16]) + [f"BCN_{i:07d}" for i in range(112)])
    target = load_dataset(_no_expect("isic2019"), root=tmp_path, seed=0, size=8)
    clean, removed = remove_source_images(target, ham, splits=("train", "val", "test"))
    assert int(removed["images"].sum() - removed["kept"].sum()) == 16
    assert all(i.startswith("ISIC_0054") for s in ("train", "val", "test") for i in clean.split(s).ids)


def test_ids_are_compared_as_isic_ids():
    keys = image_keys(["Data/BKL/ISIC_0032168.jpg", "ISIC_0000013_downsampled", "10_left", "x/y/img.png"])
    assert list(keys) == ["ISIC_0032168", "ISIC_0000013", "10_left", "img"]
    same_image, same_lesion = source_overlap(["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"],
                                             ["HAM_1", "HAM_2", "", "BCN_1"], ["ISIC_0000001.jpg"], ["HAM_2", ""])
    assert same_image.tolist() == [True, False, False, False]
    assert same_lesion.tolist() == [False, True, False, False]      # an empty lesion id matches nothing


def test_missing_ids_and_unknown_splits_are_errors():
    part = LabeledImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    data = DatasetSplits("plain", ("a", "b"), part, part, part)
    with pytest.raises(ValueError, match="source 'plain' split train has no image ids"):
        remove_source_images(data, data)
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['valid'\]; valid: \('train', 'val', 'test'\)"):
        remove_source_images(data, data, splits=("valid",))
