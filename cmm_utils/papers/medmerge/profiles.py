"""MedMerge's settings per profile, its method names and the notebook's parameters applied to them.

Every row has the book's common settings (:mod:`cmm_utils.core.profiles`): ``seeds`` (how many;
the notebook's ``seed`` is the first), ``benchmarks`` (one per backbone, medical source and target,
spelt ``"arch:medical->target"``, see :func:`benchmark_name`) and ``methods`` (names of
:data:`METHODS`; the merges of the two fine-tuned models are the optional ones).
"""
from __future__ import annotations

from cmm_utils.core.profiles import check_profile, check_table, seed_list, select

VERSION = 2  # in every cache key: bump it when a change alters what a cached network is
CHAPTER = "medmerge"
TITLE = "MedMerge: merging two source models for transfer learning"

# Ablation variants: (name, init, parametrisation, learn_w); the main run is init 0.5, direct, learned
ABLATIONS = (
    ("init 0.25, direct", 0.25, "direct", True),
    ("init 0.75, direct", 0.75, "direct", True),
    ("init 0.5, sigmoid", 0.5, "sigmoid", True),
    ("w frozen at 0.5 (source average + LP-FT)", 0.5, "direct", False),
)

METHOD_LABELS = {
    "ft_natural": "FT (natural source)", "ft_medical": "FT (medical source)",
    "lp_natural": "LP (natural source)", "lp_medical": "LP (medical source)",
    "lpft_natural": "LP-FT (natural source)", "lpft_medical": "LP-FT (medical source)",
    "average": "Average of FT models", "permutation": "Permutation, weight matching (FT models)",
    "permutation_act": "Permutation, activation matching (FT models)", "zipit": "ZipIt! (FT models)",
    "medmerge_lp": "MedMerge, after the probe (no FT)", "medmerge": "MedMerge",
    "zeros_lp": "Merge with zeros, after the probe", "zeros": "Merge with zeros (ablation)",
    # the regime check's controls (papers/medmerge/controls.py), not the paper's methods
    "ensemble": "control: output ensemble of the two FT models",
    "interp_global_lp": "control: one global weight, after the probe", "interp_global": "control: one global weight",
    "interp_layer_lp": "control: one weight per layer, after the probe", "interp_layer": "control: one weight per layer",
}
METHODS = tuple(METHOD_LABELS)
FT_BASELINES = ("ft_natural", "ft_medical")
LPFT_BASELINES = ("lpft_natural", "lpft_medical")
MERGES = ("average", "permutation", "permutation_act", "zipit")
# What every run trains whatever ``methods`` says: the merges and LP-FT start from these networks
ALWAYS_RUN = tuple(m for m in METHODS if m not in MERGES)
BACKBONES = ("resnet18", "resnet50", "densenet121")  # CNNs with permutation specs (permutation_specs)


def benchmark_name(arch: str, medical: str, target: str) -> str:
    """One run's name: ``"arch:medical->target"`` (backbone, medical source, target)."""
    return f"{arch}:{medical}->{target}"


def parse_benchmark(name: str) -> tuple[str, str, str]:
    """``"arch:medical->target"`` -> ``(arch, medical, target)``; a source or target may be a path."""
    arch, sep, rest = str(name).partition(":")
    medical, arrow, target = rest.partition("->")
    if not (sep and arrow and arch and medical and target):
        raise ValueError(f"benchmark {name!r} is not 'backbone:medical_source->target'")
    return arch, medical, target


def _methods(*merges: str) -> list[str]:
    """The chapter's methods in the order a run records them, with the given merge baselines."""
    first = ["ft_natural", "lp_natural", "lpft_natural", "ft_medical", "lp_medical", "lpft_medical"]
    return first + list(merges) + ["medmerge_lp", "medmerge", "zeros_lp", "zeros", "ensemble", "interp_global_lp",
                                   "interp_global", "interp_layer_lp", "interp_layer"]


_COMMON = {
    "natural_source": "book", "init": 0.5, "parametrisation": "direct", "other_params": "a", "w_lr": 0.05,
    "optimizer_lp": "adam", "optimizer_ft": "adamw", "weight_decay": 1e-4,
    "zipit_alpha": 0.3, "zipit_beta": 0.125, "wm_iters": 30, "plane_margin": 0.25,
    "source_init_seed": 1, "source_data_seed": 0, "source_lr": 1e-3, "source_weight_decay": 1e-4,
}
# smoke: plumbing only. cpu: 28 px, three seeds, <= 500 images per target split. paper: the paper's
# datasets and backbones at 224 px; its optimiser settings are not public, so epochs and learning
# rates there are ours (LP then FT, as in LP-FT), as is every hyper-parameter of the other profiles.
PROFILES = check_table(CHAPTER, {
    "smoke": {**_COMMON,
              "benchmarks": ["resnet18:ham10000->retinamnist"],
              "scale": "cpu", "image_size": 28, "seeds": 1, "max_per_split": 96,
              "source_epochs": 1, "source_max_per_split": 384, "source_batch_size": 64,
              "lp_epochs": 1, "lp_lr": 1e-2, "ft_epochs": 1, "ft_lr": 1e-3, "batch_size": 32,
              "methods": _methods("average", "permutation", "zipit"), "match_images": 32,
              "ablations": ABLATIONS[2:3], "plane_merges": ("medmerge", "permutation"),
              "plane_grid": 3, "plane_images": 32},
    "cpu": {**_COMMON,
            "benchmarks": ["resnet18:ham10000->retinamnist", "resnet18:ham10000->pathmnist_1k",
                           "densenet121:ham10000->retinamnist"],
            "scale": "cpu", "image_size": 28, "seeds": 3, "max_per_split": 500,
            "source_epochs": 6, "source_max_per_split": None, "source_batch_size": 64,
            "lp_epochs": 3, "lp_lr": 1e-2, "ft_epochs": 4, "ft_lr": 1e-3, "batch_size": 32,
            "methods": _methods(*MERGES), "match_images": 256,
            "ablations": ABLATIONS, "plane_merges": ("medmerge", "permutation", "zipit"),
            "plane_grid": 9, "plane_images": 200},
    # paper: ResNet-18 on ISIC-2019 first, since the first run gives the loss planes and the ablation
    # (the paper's Fig. 2 is ResNet-18 on ISIC-2019); ``w_lr`` is scaled for the probe's step count
    # (``training.w_learning_rate``); ``medical_init``: "random" (default) or "natural" (``sources``)
    "paper": {**_COMMON,
              "benchmarks": ["resnet18:ham10000_full->isic2019", "resnet18:eyepacs->aptos2019",
                             "densenet121:ham10000_full->isic2019", "densenet121:eyepacs->aptos2019",
                             "resnet50:ham10000_full->isic2019", "resnet50:eyepacs->aptos2019"],
              "w_lr_steps": 48, "medical_init": "random",
              "scale": "paper", "image_size": 224, "seeds": 3, "max_per_split": None,
              "source_epochs": 30, "source_max_per_split": None, "source_batch_size": 32,
              "lp_epochs": 10, "lp_lr": 1e-3, "ft_epochs": 30, "ft_lr": 1e-4, "batch_size": 32,
              "methods": _methods(*MERGES), "match_images": 1024,
              "ablations": ABLATIONS, "plane_merges": ("medmerge", "permutation", "zipit"),
              "plane_grid": 21, "plane_images": 2000},
})


def configure(profile: str, seed: int = 0, *, target: str | None = None, source_natural: str | None = None,
              source_medical: str | None = None, backbone: str | None = None, **overrides) -> dict:
    """The profile's settings with the notebook's parameters applied (``None`` = profile default).

    ``target`` (a registered name or a MedMNIST-format ``.npz`` path) replaces every run's target,
    ``source_medical`` every run's medical source, ``backbone`` every run's architecture. Adds
    ``runs`` (the benchmarks as ``(arch, medical, target)``), ``seed_list`` and ``merges`` (the
    merge baselines among ``methods``).
    """
    cfg = select(PROFILES, check_profile(profile), **overrides)
    runs = [parse_benchmark(b) for b in cfg["benchmarks"]]
    if backbone is not None:
        runs = [(backbone, m, t) for _, m, t in runs]
    if source_medical is not None:
        runs = [(a, source_medical, t) for a, _, t in runs]
    if target is not None:
        runs = [(a, m, str(target)) for a, m, _ in runs]
    cfg["runs"] = tuple(dict.fromkeys(runs))  # de-duplicated, order kept
    cfg["benchmarks"] = [benchmark_name(*r) for r in cfg["runs"]]
    if source_natural is not None:
        cfg["natural_source"] = source_natural
    cfg["profile"], cfg["seed_list"] = profile, tuple(seed_list(seed, cfg["seeds"]))
    for arch, _, _ in cfg["runs"]:
        if arch not in BACKBONES:
            raise ValueError(f"unknown backbone {arch!r} for MedMerge (a CNN is needed); valid: {', '.join(BACKBONES)}")
    for m in cfg["methods"]:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} (merge baseline or other); valid: {', '.join(METHODS)}")
    left_out = [m for m in ALWAYS_RUN if m not in cfg["methods"]]
    if left_out:
        raise ValueError(f"methods may leave out merge baselines only; {', '.join(left_out)} are always run")
    cfg["merges"] = tuple(m for m in cfg["methods"] if m in MERGES)
    for m in cfg["plane_merges"]:
        if m not in ("medmerge",) + MERGES:
            raise ValueError(f"unknown plane merge {m!r}; valid: medmerge, {', '.join(MERGES)}")
    return cfg
