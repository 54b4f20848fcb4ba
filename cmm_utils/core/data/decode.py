"""Image files decoded once per process, in DataLoader workers.

Every folder-and-CSV set (ISIC-2019, SKIN8, HAM10000, APTOS, EyePACS, PATH16) and ImageNet-R is
decoded here. A chapter that loads the same set for each seed, plane or check cell would otherwise
decode thousands of JPEGs again each time: the decoded array is kept for the life of the process,
keyed by the files (path, byte size, modification time), the target size and the resize rule, so
a changed or replaced file is decoded again. The decode itself runs in ``torch.utils.data``
workers (:func:`num_workers`, setting ``CMM_NUM_WORKERS``); the order of the images is the order
of the files whatever the number of workers.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

FITS = ("stretch", "shorter_side_crop")
PARALLEL_MIN_FILES = 256        # below this, worker start-up costs more than it saves
_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()


def num_workers() -> int:
    """Decode workers: ``$CMM_NUM_WORKERS``, else min(4, the cores this process may use)."""
    raw = os.environ.get("CMM_NUM_WORKERS", "").strip()
    if raw:
        if not raw.isdigit():
            raise ValueError(f"CMM_NUM_WORKERS={raw!r} is not a whole number >= 0 (0 decodes in this process)")
        return int(raw)
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def cache_budget() -> int:
    """Bytes the process may keep decoded: ``$CMM_DECODE_CACHE_GB`` (0 turns the cache off), else a
    quarter of the machine's memory (ISIC-2019 at 224 px is 3.8 GB)."""
    raw = os.environ.get("CMM_DECODE_CACHE_GB", "").strip()
    if raw:
        try:
            return int(float(raw) * 2**30)
        except ValueError:
            raise ValueError(f"CMM_DECODE_CACHE_GB={raw!r} is not a number of GiB (0 turns the cache off)") from None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def decode_file(path: Path, size: int | None, fit: str = "stretch") -> np.ndarray:
    """One image as uint8 ``[H, W, 3]``. ``stretch``: resized to ``size`` x ``size`` (bilinear), the
    book's rule for the medical sets; ``shorter_side_crop``: shorter side to ``size`` (bicubic), then
    the centre ``size`` x ``size`` crop (open_clip's ``val_preprocess``, MagMax's ImageNet-R)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and fit == "shorter_side_crop":
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        elif size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], size: int | None, fit: str):
        self.files, self.size, self.fit = list(files), size, fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_file(self.files[i], self.size, self.fit)   # looked up at call time (tests count calls)


def _as_list(batch: list) -> list:
    return batch            # keep arrays of different sizes apart; the size check below names the file


def _key(files: Sequence[Path], size: int | None, fit: str) -> tuple:
    stats = tuple((str(f), (s := os.stat(f)).st_size, s.st_mtime_ns) for f in files)
    return stats, size, fit


def decode_images(files: Sequence[Path], size: int | None = None, fit: str = "stretch",
                  listed_in: Path | str = "") -> np.ndarray:
    """``files`` decoded (:func:`decode_file`) into one read-only uint8 ``[N, H, W, 3]`` array, once per
    process: a second call with the same unchanged files, ``size`` and ``fit`` returns the kept array.
    Images of different sizes are an error naming ``listed_in`` unless ``size`` resizes them."""
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; valid: {', '.join(FITS)}")
    if not len(files):
        raise ValueError(f"no image files to decode (listed in {listed_in or 'nothing'})")
    key = _key(files, size, fit)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    workers = num_workers() if len(files) >= PARALLEL_MIN_FILES else 0
    loader = torch.utils.data.DataLoader(_Files(files, size, fit), batch_size=32, num_workers=workers,
                                         collate_fn=_as_list)
    images = [im for batch in tqdm(loader, desc=f"decoding {Path(str(listed_in)).name}", leave=False) for im in batch]
    shapes = sorted({im.shape[:2] for im in images})
    if len(shapes) > 1:
        raise ValueError(f"the images listed in {listed_in} differ in size ({len(shapes)} sizes (H, W), "
                         f"e.g. {shapes[:3]}); pass size= to load_dataset to resize them as they load")
    out = np.stack(images)
    out.flags.writeable = False     # shared by every caller: a caller that writes must copy
    _keep(key, out)
    return out


def _keep(key: tuple, array: np.ndarray) -> None:
    """Keep ``array`` under ``key``, dropping the least recently used arrays beyond the budget."""
    budget = cache_budget()
    if array.nbytes > budget:
        return
    _CACHE[key] = array
    while sum(a.nbytes for a in _CACHE.values()) > budget:
        _CACHE.popitem(last=False)


def clear_cache() -> None:
    _CACHE.clear()
