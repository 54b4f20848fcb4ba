"""Keep a source dataset's images out of a target's evaluation splits.

HAM10000 is a subset of ISIC-2019: its 10,015 images are in the ISIC-2019 training set under the
same ISIC ids (``ISIC_0024306`` ...), and the ISIC-2019 metadata gives them the same lesion ids
(``HAM_0000118`` ...). A model that starts from weights trained on HAM10000 and is scored on an
ISIC-2019 test split that holds those images (or other images of those lesions) is scored on what it
was trained on. :func:`remove_source_images` drops them from the target's splits and says how many.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import PurePath
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cmm_utils.core.data.datasets import DatasetSplits, LabeledImages
from cmm_utils.core.data.readers import SPLITS

ISIC_ID = re.compile(r"ISIC_\d{7}")


def image_keys(ids: Iterable[str]) -> np.ndarray:
    """The ISIC id inside each id (``Data/BKL/ISIC_0032168.jpg``, ``ISIC_0000013_downsampled`` ->
    ``ISIC_0032168``, ``ISIC_0000013``), else the file name without its extension: the same image
    under the naming of HAM10000, ISIC-2019 and SKIN8's lists."""
    out = []
    for i in ids:
        found = ISIC_ID.search(str(i))
        out.append(found.group(0) if found else PurePath(str(i)).stem)
    return np.array(out, dtype=object)


def source_overlap(target_ids: Sequence[str], target_groups: Sequence[str] | None, source_ids: Iterable[str],
                   source_groups: Iterable[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Two masks over the target's images: ``same_image`` (its ISIC id is a source image's) and
    ``same_lesion`` (not the same image, but its non-empty group, the lesion id, is a source image's)."""
    same_image = np.isin(image_keys(target_ids), image_keys(source_ids))
    lesions = {str(g) for g in source_groups} - {""}
    if target_groups is None or not lesions:
        return same_image, np.zeros_like(same_image)
    groups = np.asarray(target_groups, dtype=str)
    return same_image, ~same_image & (groups != "") & np.isin(groups, sorted(lesions))


def _require_ids(part: LabeledImages, what: str) -> np.ndarray:
    if part.ids is None:
        raise ValueError(f"{what} has no image ids; load it with load_dataset from an image folder, or from "
                         "an npz whose manifest maps keys.ids (e.g. ham10000's image_ids)")
    return part.ids


def remove_source_images(target: DatasetSplits, source: DatasetSplits, splits: Sequence[str] = ("val", "test"),
                         by_lesion: bool = True) -> tuple[DatasetSplits, pd.DataFrame]:
    """``target`` without the images of ``source`` (every split of it) in ``splits``, and a table of
    what went: per split, images before, removed as the same image, removed as another image of a
    source lesion (``by_lesion``), and images after.

    The default leaves the target's train split alone: training on images the source also saw does
    not inflate a score; scoring on them does. Call it before any ``max_per_split`` cap is taken,
    with the source loaded uncapped, so every source image is known."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid: {SPLITS}")
    src_ids, src_groups = [], []
    for name in SPLITS:
        part = source.split(name)
        src_ids += list(_require_ids(part, f"source {source.name!r} split {name}"))
        if by_lesion and part.groups is not None:
            src_groups += list(part.groups)
    rows, parts = [], {}
    for name in splits:
        part = target.split(name)
        same_image, same_lesion = source_overlap(_require_ids(part, f"target {target.name!r} split {name}"),
                                                 part.groups, src_ids, src_groups)
        parts[name] = part.subset(np.flatnonzero(~(same_image | same_lesion)))
        rows.append({"split": name, "images": len(part), "same image": int(same_image.sum()),
                     "same lesion": int(same_lesion.sum()), "kept": len(parts[name])})
    table = pd.DataFrame(rows, columns=["split", "images", "same image", "same lesion", "kept"])
    meta = {**target.meta, "removed_source_images": {"source": source.name, **{
        r["split"]: r["images"] - r["kept"] for r in rows}}}
    return replace(target, meta=meta, **parts), table
