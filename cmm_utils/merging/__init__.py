"""Pure merge kernels over state dicts (the four papers' equations and their baselines), the
streaming folds beneath them, and the registry through which every chapter chooses a merge.

``from cmm_utils import merging``: ``merging.merge("ties", task_vectors)`` (registry, defaults
filled), ``merging.RULES``, and every kernel by name (``merging.magmax``, ``merging.apply``, …).
Nothing here knows models, data or papers (``tests/test_structure.py``).
"""
from cmm_utils.merging.kernels import *  # noqa: F401,F403  (task-vector rules, listed in kernels.__all__)
from cmm_utils.merging.kernels import __all__ as _task_vector_rules
from cmm_utils.merging.pairwise import *  # noqa: F401,F403  (CMM's fold, interpolation, adapters)
from cmm_utils.merging.pairwise import __all__ as _pairwise
from cmm_utils.merging.registry import RULES, TASK_VECTOR_RULES, MergeRule, merge, rule

__all__ = [*_task_vector_rules, *_pairwise, "RULES", "TASK_VECTOR_RULES", "MergeRule", "merge", "rule"]
