"""The CMM chapter's entry points: a scenario by name, a run's cache key, and the cached
:func:`run` the notebook and the leaderboard call (``cmm_utils.core.continual.cached_run``).

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025). The method is ``cmm_utils.papers.cmm.stages`` and ``loop``, the baselines
``baselines``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn

from cmm_utils.core.benchmarks import BACKBONE, BENCHMARKS, CLASS_ORDER_SEED, load_benchmark
from cmm_utils.core.continual import ContinualResult, cached_run, scenario_fingerprint
from cmm_utils.core.data import Scenario, class_incremental, load_dataset
from cmm_utils.core.io import config_key
from cmm_utils.core.profiles import select
from cmm_utils.papers.cmm.baselines import run_seq_baseline
from cmm_utils.papers.cmm.encoders import head_weights_fn, pretrained_encoder
from cmm_utils.papers.cmm.loop import run_cmm
from cmm_utils.papers.cmm.orders import CLASS_ORDERS
from cmm_utils.papers.cmm.profiles import BASELINES, CHAPTER, IMAGE_SIZE, PROFILES, CMMConfig, method_config


def load_scenario(dataset: str, profile: str, seed: int, n_tasks: int | None = None,
                  max_per_split: int | None = None, image_size: int | None = 28) -> Scenario:
    """A book benchmark by name (``cmm_utils.core.benchmarks``), or any dataset (registered name or a
    MedMNIST-format ``.npz``) cut into ``n_tasks`` class-incremental tasks, at ``image_size``
    (None: native; the CLIP encoder upsamples). The class order is the authors' where they fixed
    one (CIFAR-100, :data:`cmm_utils.papers.cmm.orders.CLASS_ORDERS`), else fixed by the
    benchmarks' order seed; seeds vary training and made splits, not the tasks."""
    if dataset in BENCHMARKS:
        return load_benchmark(dataset, profile, seed)
    if n_tasks is None:
        raise ValueError(f"dataset {dataset!r} is not a benchmark ({', '.join(BENCHMARKS)}): give n_tasks")
    # CMM reads no validation split: in `paper` (CIFAR-100) the whole training set is trained on
    data = load_dataset(dataset, seed=seed, size=image_size, channels=3, max_per_split=max_per_split,
                        val_fraction=0 if profile == "paper" else None)
    return class_incremental(data, n_tasks, seed=CLASS_ORDER_SEED, class_order=CLASS_ORDERS.get(str(dataset)))


def run_config(method: str, benchmark: str, profile: str, seed: int, settings: Mapping, backbone: str) -> dict:
    """The JSON-able cache key of a run: method, benchmark, seed, backbone, profile + hyper-parameters."""
    cfg = method_config(method, settings)
    unused = {"method"}
    if not cfg.correction:
        unused |= {"correction_loss", "representation_lr", "correction_weight_decay"}
    if method in BASELINES:
        unused |= {"alpha", "mismatch_images"}
    # result_version 3: results carry the final model's per-image test predictions (the claims' intervals)
    return {"method": method, "benchmark": benchmark, "seed": seed, "backbone": backbone, "profile": profile,
            "chapter": CHAPTER, "result_version": 3, **{k: v for k, v in asdict(cfg).items() if k not in unused}}


@dataclass(frozen=True)
class RunParts:
    """What a run of one method is made of: its configuration, θ0 (and CLIP's text tower, if any)
    and the identity that keys its checkpoints (scenario, backbone, profile, seed, θ0)."""
    cfg: CMMConfig
    encoder0: nn.Module
    clip: object
    identity: dict


def run_parts(method: str, scenario: Scenario, profile: str, seed: int, backbone: str | None = None,
              overrides: Mapping | None = None) -> RunParts:
    """The :class:`RunParts` of ``method`` on ``scenario`` under ``profile`` and ``overrides``."""
    settings = select(PROFILES, profile, **(overrides or {}))
    backbone = backbone or settings["backbone"]
    if backbone != "clip_vit_b16" and settings["head"] == "zeroshot":
        settings["head"] = "prototype"  # zero-shot text heads need CLIP's text tower
    cfg = method_config(method, settings)
    encoder0, clip, fingerprint = pretrained_encoder(backbone, profile)
    identity = {"scenario": scenario_fingerprint(scenario), "backbone": backbone, "profile": profile, "seed": seed,
                "theta0": fingerprint}
    return RunParts(cfg, encoder0, clip, identity)


def run_method(method: str, scenario: Scenario, profile: str, seed: int, *, backbone: str | None = None,
               debug: bool = False, stop_after: int | None = None, resume: bool = True,
               **overrides) -> ContinualResult:
    """Run one method of this chapter (``METHODS``) on a scenario in a profile, uncached (checkpoints
    still resume). ``overrides`` replace the profile's settings (e.g. ``alpha=0.5``)."""
    parts = run_parts(method, scenario, profile, seed, backbone, overrides)
    head_fn = head_weights_fn(parts.cfg, parts.encoder0, parts.clip, scenario)
    kw = dict(image_size=IMAGE_SIZE[profile], channels=3, resume=resume)
    if method in BASELINES:
        return run_seq_baseline(scenario, parts.encoder0, head_fn, parts.cfg, seed, parts.identity, **kw)
    return run_cmm(scenario, parts.encoder0, head_fn, parts.cfg, seed, parts.identity, debug=debug,
                   stop_after=stop_after, **kw)


def run(method: str, benchmark: str, profile: str, seed: int, *, scenario: Scenario | None = None,
        debug: bool = False, **overrides) -> ContinualResult:
    """The cached run of ``method`` on ``benchmark`` (the leaderboard's and the notebook's entry).

    ``benchmark``: a book benchmark (run with the benchmarks' backbone,
    ``cmm_utils.core.benchmarks.BACKBONE``), or any dataset name or ``.npz`` path, cut into the
    profile's ``n_tasks`` (run with the profile's backbone); pass ``scenario`` if it is already
    loaded. ``overrides`` are profile settings (``core.profiles.select`` checks them). Reads the
    chapter's cached result if there is one; computes and caches it otherwise. The final mean class
    recall is ``result.extra["mean_class_recall"]``.
    """
    settings = select(PROFILES, profile, **overrides)
    backbone = BACKBONE if benchmark in BENCHMARKS and "backbone" not in overrides else settings["backbone"]
    if scenario is None:
        scenario = load_scenario(benchmark, profile, seed, settings["n_tasks"], settings["max_per_split"],
                                 settings["image_size"])
    config = run_config(method, benchmark, profile, seed, settings, backbone)
    config["data"] = config_key(scenario_fingerprint(scenario))  # a different file under one name never collides
    config["theta0"] = pretrained_encoder(backbone, profile)[2]  # a re-pretrained backbone is a different run
    return cached_run(profile, CHAPTER, config,
                      lambda: run_method(method, scenario, profile, seed, backbone=backbone, debug=debug, **overrides))


def majority_reference(scenario: Scenario) -> list[float]:
    """Accuracy, after each task, of always predicting the most frequent class of the pooled test
    set seen so far: the floor a class-incremental method must beat to have learnt anything
    beyond the label prior (HAM10000's ``nv`` is ~58% of its images)."""
    out = []
    for t in range(len(scenario.tasks)):
        labels = scenario.joint("test", upto=t).labels
        out.append(float(torch.bincount(labels).max()) / max(1, len(labels)))
    return out
