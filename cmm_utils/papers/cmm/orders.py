"""The authors' fixed class orders for the CMM chapter's class-incremental datasets.

CMM (Phan et al., arXiv:2509.23592) is a fork of the MagMax repository and keeps its datasets'
``default_class_order``: read in ``VietHoang1512/CMM`` at ``5d36668``, ``src/datasets/cifar100.py``
(the list below, identical to MagMax's ``danielm1405/magmax`` ``src/datasets/cifar100.py`` L32) and
``src/datasets/imagenetr.py`` (ImageNet-R; CUB200 reuses that list), which the book has no loader
for in this chapter yet. A dataset without an entry here is cut in the book's seed-1993 order
(``cmm_utils.core.benchmarks.CLASS_ORDER_SEED``). Copied, not imported: a paper never imports another.
"""
from __future__ import annotations

CIFAR100_CLASS_ORDER = (
    70, 89, 11, 13, 63, 53, 86, 57, 41, 43, 14, 98, 52, 73, 95, 96, 33, 16, 39, 74, 25, 88, 35, 28, 79,
    82, 72, 4, 30, 17, 59, 97, 36, 38, 29, 55, 83, 7, 22, 48, 19, 47, 2, 44, 67, 71, 34, 84, 6, 46,
    61, 8, 80, 10, 49, 15, 68, 9, 99, 40, 27, 45, 51, 37, 21, 64, 92, 24, 60, 31, 5, 91, 93, 90, 65,
    66, 77, 20, 58, 62, 23, 76, 75, 42, 0, 26, 87, 50, 3, 56, 81, 1, 94, 69, 18, 78, 54, 12, 85, 32)
CLASS_ORDERS = {"cifar100": CIFAR100_CLASS_ORDER}
