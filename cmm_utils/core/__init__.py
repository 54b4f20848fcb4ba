"""The paper-agnostic core: data, models (backbones, pretraining, heads), the training loop, io and
caches, profiles, metrics, plots, the evaluation protocol, per-task checkpoints, seeds and verdicts.

Nothing in ``core`` imports a paper (``tests/test_structure.py`` fails when it does).
"""
