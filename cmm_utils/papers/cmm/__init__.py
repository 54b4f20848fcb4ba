"""Holistic continual model merging (CMM; Phan et al. 2025, arXiv:2509.23592): the chapter's room.

``stages`` the three stages (tangent-space fine-tuning, the Adam-second-moment merge, the
representation correction) and the method's docstring; ``linearize`` the linearised network;
``networks`` the encoder with its final projection and the frozen head weights; ``encoders`` θ0;
``loop`` the authors' loop with per-task checkpoints; ``baselines`` seq-FT, averaging, MagMax;
``profiles`` the profiles and run configuration; ``runs`` the cached :func:`run`; ``figures`` the
figures' computations; ``chapter`` the notebook's tables; ``claims`` the verdicts.
"""
from cmm_utils.papers.cmm import chapter, claims, figures
from cmm_utils.papers.cmm.encoders import build_encoder, head_weights_fn, pretrained_encoder, weights_fingerprint
from cmm_utils.papers.cmm.linearize import LinearizedModel
from cmm_utils.papers.cmm.profiles import (BASELINES, CHAPTER, CMM_METHODS, METHODS, PROFILES, TITLE, CMMConfig,
                                           method_config)
from cmm_utils.papers.cmm.runs import load_scenario, majority_reference, run, run_method

__all__ = ["CHAPTER", "TITLE", "PROFILES", "METHODS", "CMM_METHODS", "BASELINES", "CMMConfig", "method_config",
           "run", "run_method", "load_scenario", "majority_reference", "build_encoder", "head_weights_fn",
           "pretrained_encoder", "weights_fingerprint", "LinearizedModel", "chapter", "claims", "figures"]
