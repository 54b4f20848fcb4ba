"""One package per paper: its algorithm, baselines, profiles and the computations behind its figures.

A paper imports :mod:`cmm_utils.core` and :mod:`cmm_utils.merging`, never another paper
(``tests/test_structure.py``).
"""
