"""MedMerge: transfer learning from two source models merged with learned kernel-level weights.

I. Almakky, S. Sanjeev, A. U. R. Hashmi, M. A. Qazi, (H. Wang,) M. Yaqub, "MedMerge: Merging
Models for Effective Transfer Learning to Medical Imaging Tasks", arXiv:2403.11646 (v1 2024, v2
2025). The authors' code (github.com/BioMedIA-MBZUAI/MedMerge) could not be read; what is known
is the merge equation, per convolution kernel ``j`` (as reported on a public review page),

    theta_hat_j = w_j theta^(a)_j + (1 - w_j) theta^(b)_j,                          (MedMerge eq.)

with the weights ``w`` learned during *linear probing* on the target (convolutions frozen, the
linear head and ``w`` trained), the merged network then fine-tuned on the target, and the
comparison with fine-tuning, LP-FT and other merges by macro F1 and accuracy.

The pipeline here, per backbone, target and seed (:func:`run_experiment`; :func:`run` gives one
method's score as the book's ``ContinualResult``, :func:`run_chapter` every run of a profile), from
the modules beside it: ``sources`` (the two sources and the data), ``training`` (probe, fine-tuning,
the merges of fine-tuned models), ``profiles``, ``tables``, ``figures`` and ``claims``:

1. sources: ``a`` = natural images (the book's ``book_backbone``: Fashion-MNIST + a CIFAR-10
   subset at 28 px; ImageNet weights in ``paper``), ``b`` = a medical source trained *from a
   different random initialisation* on HAM10000 (:func:`~cmm_utils.papers.medmerge.sources.train_source`,
   cached as safetensors);
2. MedMerge: ``kernel_merge.wrap_kernel_merge(a, b)`` + a new linear head; the head and
   ``w`` trained (linear probing), then ``collapse_kernel_merge`` gives one plain network, whose
   BatchNorm statistics are recomputed on target training data, and which is fine-tuned;
3. baselines: fine-tuning (FT) from each source, linear probing (LP) and LP-FT (Kumar et al.,
   ICLR 2022) from each source, and merges of the two target-fine-tuned models, as the authors'
   baseline scripts do (``santosh9sanjeev/zipit``: ``match_tensors_identity``, ``_permute``,
   ``_zipit``, each followed by ``reset_bn_stats``): uniform averaging, permutation alignment by
   weight matching (Git Re-Basin) or by activation matching, and ZipIt!
   (:mod:`cmm_utils.papers.medmerge.alignment`); BN statistics recomputed on target training data after merging;
4. the ablation *merging with zeros* (``theta^(b) = 0``: the natural source rescaled kernel by
   kernel), and the open choices (initial ``w``, direct vs sigmoid parametrisation, ``w`` learned
   or frozen at its initial value) on one backbone and target;
5. the regime check's controls (:mod:`cmm_utils.papers.medmerge.controls`, not the paper's): MedMerge's
   probe and fine-tuning with one global and with one per-layer interpolation weight, and the output
   ensemble of the two fine-tuned sources.

Choices where the paper is silent (each is a literal in
:data:`cmm_utils.papers.medmerge.profiles.PROFILES` or an argument):

* kernel granularity: one ``w`` per 2-D kernel (``C_out x C_in``), ``cmm_utils.papers.medmerge.kernel_merge``'s;
* ``w`` initialised at 0.5, used directly (the equation, unconstrained); the ablation varies both;
* non-convolution parameters (BatchNorm affine, frozen) from source ``a``, read as the paper's
  "anchored" extractor; during the probe BN normalises with batch statistics (train mode), since
  the running statistics of either source do not describe the merged convolutions; after the
  probe they are recomputed on the target's training images;
* plain LP: the source's BN statistics are first recomputed on the target's training images (the
  same free adaptation the merged network gets), then the head is trained with BN in eval mode;
* optimisers: Adam for probing, with its own learning rate for ``w`` (``w_lr``; at the head's rate
  the per-kernel weights barely leave their initial value in a few dozen steps), AdamW for
  fine-tuning, cosine schedules, horizontal flips; no validation-based model selection (last epoch);
* the medical source is trained on all its training images (AdamW, cosine), from random
  initialisation ``source_init_seed`` (the natural source uses seed 0).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from cmm_utils.core.continual import ContinualResult, cached_run
from cmm_utils.core.io import cache_root, config_key, read_cached_state, save_state, write_csv
from cmm_utils.core.models import PRETRAIN, Classifier, build_backbone
from cmm_utils.papers.medmerge.landscape import plane_grid
from cmm_utils.papers.medmerge.controls import INTERPOLATIONS, OutputEnsemble
from cmm_utils.papers.medmerge.profiles import CHAPTER, MERGES, METHODS, VERSION, benchmark_name, configure, \
    parse_benchmark
from cmm_utils.papers.medmerge.sources import (load_target, source_backbone, source_key, target_without_source,
                                              zero_convolutions)
from cmm_utils.papers.medmerge.training import evaluate, fine_tune, kernel_merge_probe, linear_probe, merge_models, \
    new_classifier, on_device


def _run_key(cfg: Mapping, arch: str, medical: str, target: str, seed: int, **extra) -> dict:
    keys = ("scale", "image_size", "max_per_split", "natural_source", "lp_epochs", "lp_lr", "w_lr", "ft_epochs",
            "ft_lr", "batch_size", "optimizer_lp", "optimizer_ft", "weight_decay", "other_params", "max_steps")
    key = {k: cfg.get(k) for k in keys}
    if cfg.get("w_lr_steps") is not None:  # only where set, so the other profiles' cached runs stay valid
        key["w_lr_steps"] = cfg["w_lr_steps"]
    if cfg["natural_source"] == "book":  # the book's pretraining recipe of the profile
        natural = {"book": cfg["profile"], **({k: v for k, v in vars(PRETRAIN[cfg["profile"]]).items()}
                                              if cfg["profile"] in PRETRAIN else {})}
    else:
        natural = source_key(arch, cfg["natural_source"], cfg, 0)
    key.update(chapter=CHAPTER, version=VERSION, profile=cfg["profile"], arch=arch, target=str(target), seed=seed,
               natural=natural, medical=source_key(arch, medical, cfg, cfg["source_init_seed"]))
    key.update(extra)
    return key


def _cached_model(key: Mapping, template: nn.Module, build, extra_tensors: str | None = None):
    """Load the state keyed by ``key`` into ``template`` or build, save and return it (resumable).
    ``build`` returns a model, or ``(model, tensors)`` when ``extra_tensors`` names what to keep."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", str(key["method"])).strip("-")
    path = cache_root() / CHAPTER / "runs" / f"{slug}-{config_key(dict(key))}.safetensors"
    side = path.with_name(path.stem + "-extra.safetensors")
    template = on_device(template)
    found = read_cached_state(path)  # a damaged file is warned about and rebuilt, never used
    extra = read_cached_state(side, require_meta=False) if extra_tensors else None
    if found is not None and (extra_tensors is None or extra is not None):
        template.load_state_dict(found[0])
        return (template.eval(), extra[0]) if extra_tensors else template.eval()
    built = build()
    model, tensors = built if extra_tensors else (built, None)
    model = on_device(model)
    if extra_tensors:
        save_state(side, tensors)
    save_state(path, model.state_dict(), dict(key))
    return (model.eval(), tensors) if extra_tensors else model.eval()


def _layer_rows(weights: Mapping[str, torch.Tensor], **tags) -> list[dict]:
    return [{**tags, "depth": i, "layer": name, "mean_w": float(w.mean()), "std_w": float(w.std()) if w.numel() > 1 else 0.0,
             "kernels": int(w.numel())} for i, (name, w) in enumerate(weights.items())]


def run_experiment(arch: str, medical: str, target: str, seed: int, cfg: Mapping, *,
                   ablations: Sequence[tuple] = (), keep_states: bool = False, verbose: bool = True) -> dict:
    """Every method of the chapter on one (backbone, medical source, target, seed).

    Returns ``{"results": [rows], "weights": [rows], "states": {method: model}, "mean_class_recall":
    {method: value}}``: one result row per method (accuracy, macro F1, kappa on the target's test
    split; the mean class recall of each apart, so that the result table keeps its columns), per-layer mean kernel
    weights of MedMerge, of merging with zeros and of each ablation, and (``keep_states``) the
    trained networks for the loss-surface planes. Every trained network is cached (resumable).
    """
    data = target_without_source(target, medical, seed, cfg)
    ordinal = data.meta.get("task") == "ordinal"
    n = data.num_classes
    natural = source_backbone(cfg["natural_source"], arch, cfg, 0, verbose=verbose)
    medical_bb = source_backbone(medical, arch, cfg, cfg["source_init_seed"], verbose=verbose)
    template = lambda: Classifier(build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"]), n)
    tags = {"arch": arch, "medical": str(medical), "target": data.name, "seed": seed}
    rows, wrows, states = [], [], {}

    recall = {}

    def record(method, model, stage):
        scores = evaluate(model, data.test, ordinal, recall=True)
        recall[method] = scores.pop("mean_class_recall")
        rows.append({**tags, "method": method, "stage": stage, **scores})
        if keep_states:
            states[method] = model

    key = lambda method, **kw: _run_key(cfg, arch, medical, target, seed, method=method, **kw)
    sources = {"natural": natural, "medical": medical_bb}
    ft = {}
    for name, bb in sources.items():
        ft[name] = _cached_model(key(f"ft_{name}"), template(), lambda: fine_tune(
            new_classifier(bb, n, seed), data.train, cfg, seed, desc=f"FT from {name}"))
        record(f"ft_{name}", ft[name], "final")
        lp = _cached_model(key(f"lp_{name}"), template(), lambda: linear_probe(
            new_classifier(bb, n, seed), data.train, cfg, seed, desc=f"LP on {name}"))
        record(f"lp_{name}", lp, "probe")
        lpft = _cached_model(key(f"lpft_{name}"), template(), lambda: fine_tune(
            copy.deepcopy(lp), data.train, cfg, seed, desc=f"LP-FT from {name}"))
        record(f"lpft_{name}", lpft, "final")
    for method in cfg["merges"]:
        record(method, merge_models(method, ft["natural"], ft["medical"], data.train, cfg, seed), "final")
    record("ensemble", OutputEnsemble(ft["natural"], ft["medical"]).eval(), "final")  # a control (controls.py)

    main = ("main", cfg["init"], cfg["parametrisation"], True)
    variants = [("medmerge", main, medical_bb), ("zeros", main, zero_convolutions(natural))]
    variants += [(m, main, medical_bb) for m in INTERPOLATIONS]
    variants += [(f"ablation:{v[0]}", v, medical_bb) for v in ablations]
    for method, (vname, init, param, learn), second in variants:
        grain = {"granularity": INTERPOLATIONS[method]} if method in INTERPOLATIONS else {}
        probe_key = key(f"{method}_lp", init=init, parametrisation=param, learn_w=learn, **grain)
        probed, w = _cached_model(probe_key, template(), lambda: kernel_merge_probe(
            natural, second, n, data.train, cfg, seed, init=init, parametrisation=param, learn_w=learn,
            desc=f"probe {method}", **grain), extra_tensors="w")
        final = _cached_model(key(method, init=init, parametrisation=param, learn_w=learn, **grain), template(),
                              lambda: fine_tune(copy.deepcopy(probed), data.train, cfg, seed, desc=f"FT {method}"))
        if method.startswith("ablation:"):
            for stage, model in (("probe", probed), ("final", final)):
                rows.append({**tags, "method": method, "stage": stage, "variant": vname,
                             **evaluate(model, data.test, ordinal)})
        else:
            record(f"{method}_lp", probed, "probe")
            record(method, final, "final")
        wrows += _layer_rows(w, **tags, variant=method)
    return {"results": rows, "weights": wrows, "states": states, "mean_class_recall": recall}


def plane_states(states: Mapping[str, nn.Module], merges: Iterable[str]) -> dict[str, list]:
    """The three networks of each plane: ``[w0, w1, w2]`` = [FT from the natural source, the merged
    network, FT from the medical source] (Garipov's order: w0 at the origin, w2 on the first axis)."""
    return {m: [states["ft_natural"].state_dict(), states[m].state_dict(), states["ft_medical"].state_dict()]
            for m in merges}


def compute_plane(arch: str, target: str, seed: int, cfg: Mapping, states: Mapping[str, nn.Module],
                  merge_name: str, medical: str | None = None) -> dict[str, np.ndarray]:
    """The loss surface on the plane through FT(natural), ``merge_name`` and FT(medical); BN
    recomputed at every point on ``plane_images`` training images, on which the train error is
    also measured; test error on up to ``plane_images`` test images (without the medical source's
    images, :func:`~cmm_utils.papers.medmerge.sources.target_without_source`)."""
    data = load_target(target, seed, cfg) if medical is None else target_without_source(target, medical, seed, cfg)
    k = cfg["plane_images"]
    gen = torch.Generator().manual_seed(seed)
    train = data.train.subset(torch.randperm(len(data.train), generator=gen)[:k].sort().values)
    test = data.test.subset(torch.arange(min(k, len(data.test))))
    model = on_device(Classifier(build_backbone(arch, scale=cfg["scale"], image_size=cfg["image_size"]),
                                 data.num_classes))
    three = plane_states(states, [merge_name])[merge_name]
    return plane_grid(model, three, train, train, test, grid=cfg["plane_grid"], margin=cfg["plane_margin"],
                      desc=f"plane {merge_name}")


# ------------------------------------------------------------------------------- one interface

def result_config(cfg: Mapping, arch: str, medical: str, target: str, seed: int, method: str) -> dict:
    """What identifies one method's score, for the run cache: the networks' key and, for a merge of
    fine-tuned models (not cached as a network), the merge's settings."""
    if method in MERGES:
        extra = {"merge": {k: cfg[k] for k in ("wm_iters", "match_images", "zipit_alpha", "zipit_beta")}}
    elif method.startswith(("medmerge", "zeros", "interp_")):
        extra = {"init": cfg["init"], "parametrisation": cfg["parametrisation"], "learn_w": True}
        if method.removesuffix("_lp") in INTERPOLATIONS:
            extra["granularity"] = INTERPOLATIONS[method.removesuffix("_lp")]
    else:
        extra = {}
    return {**_run_key(cfg, arch, medical, target, seed, method=method, **extra),
            "benchmark": benchmark_name(arch, medical, target)}


def as_result(row: Mapping, mean_class_recall: float) -> ContinualResult:
    """One method's test scores on one target as the book's result: one task, ``R = [[accuracy]]``."""
    extra = {k: float(row[k]) for k in ("macro_f1", "kappa")}
    extra.update(mean_class_recall=float(mean_class_recall), stage=row["stage"], seed=int(row["seed"]))
    return ContinualResult(method=row["method"], R=[[float(row["accuracy"])]], acc_seen=[float(row["accuracy"])],
                           extra=extra)


def cache_results(cfg: Mapping, arch: str, medical: str, target: str, seed: int, experiment: Mapping,
                  skip: str | None = None) -> dict:
    """Every method's result of one :func:`run_experiment` in the run cache (``results/<profile>/
    medmerge/runs``), where :func:`run` reads it; returns ``{method: ContinualResult}``. ``skip``:
    a method returned but not cached here (its caller caches it, holding that entry's lock)."""
    out = {}
    for row in experiment["results"]:
        if row["method"] in experiment["mean_class_recall"]:
            result = as_result(row, experiment["mean_class_recall"][row["method"]])
            config = result_config(cfg, arch, medical, target, seed, row["method"])
            out[row["method"]] = result if row["method"] == skip else cached_run(
                cfg["profile"], CHAPTER, config, lambda: result)
    return out


def run(method: str, benchmark: str, profile: str, seed: int = 0, **overrides) -> ContinualResult:
    """One method's score on one ``benchmark`` (``"arch:medical->target"``, as the profile's
    ``benchmarks`` spell it) and seed: read from the run cache when the chapter (or an earlier call)
    computed it, otherwise :func:`run_experiment` is run (its networks cached) and every method's
    result cached. ``overrides`` are profile settings. MedMerge is transfer, not continual: one task,
    ``extra`` holds ``macro_f1``, ``kappa`` and ``mean_class_recall``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    arch, medical, target = parse_benchmark(benchmark)
    cfg = configure(profile, seed, backbone=arch, source_medical=medical, target=target, **overrides)
    if method in MERGES and method not in cfg["merges"]:
        cfg["merges"] += (method,)
    config = result_config(cfg, arch, medical, target, seed, method)
    return cached_run(profile, CHAPTER, config, lambda: cache_results(
        cfg, arch, medical, target, seed, run_experiment(arch, medical, target, seed, cfg, verbose=False),
        skip=method)[method])


def run_chapter(cfg: Mapping, out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, nn.Module]]:
    """Every run of the profile (each benchmark and seed; the ablations on the first benchmark), each
    method's result cached for :func:`run`; writes ``results.csv`` and ``kernel_weights.csv`` to
    ``out``. Returns the results, the per-layer kernel weights and the networks of the first run
    (for the loss-surface planes)."""
    rows, wrows, plane_models = [], [], None
    jobs = [(i, r, s) for i, r in enumerate(cfg["runs"]) for s in cfg["seed_list"]]
    for i, (arch, medical, target), s in tqdm(jobs, desc="experiments"):
        first = i == 0 and s == cfg["seed_list"][0]
        res = run_experiment(arch, medical, target, s, cfg, ablations=cfg["ablations"] if i == 0 else (),
                             keep_states=first, verbose=False)
        cache_results(cfg, arch, medical, target, s, res)
        rows += res["results"]
        wrows += res["weights"]
        if first:
            plane_models = res["states"]
    results, weights = pd.DataFrame(rows), pd.DataFrame(wrows)
    write_csv(out / "results.csv", results)
    write_csv(out / "kernel_weights.csv", weights)
    print(f"{len(results)} result rows, {results['seed'].nunique()} seed(s), written to {out}")
    return results, weights, plane_models
