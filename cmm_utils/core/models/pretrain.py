"""The book's own pretrained backbones, for machines that cannot download ImageNet or CLIP weights.

The ``cpu`` and ``smoke`` profiles pretrain each backbone once on natural images (Fashion-MNIST
plus the CIFAR-10 subset, as one 20-class problem), cache the weights as safetensors keyed by the
whole configuration, and every chapter reuses them. The ``paper`` profile loads published weights.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch import nn

from cmm_utils.core.data import dataset_incremental, load_dataset
from cmm_utils.core.io import cache_root, cached_state, config_key
from cmm_utils.core.train import FitConfig, accuracy, device, fit, predict, seed_everything
from cmm_utils.core.models.backbones import Classifier, build_backbone

PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    sources: tuple[str, ...] = ("fashion_mnist", "cifar10_partial")
    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    max_per_split: int | None = None  # cap per source split (smoke)


def pretrained_backbone(arch: str, *, scale: str, image_size: int, cfg: PretrainConfig = PretrainConfig(),
                        seed: int = 0, verbose: bool = True) -> nn.Module:
    """A backbone with pretrained weights: published ones (``paper``) or the book's cached ones."""
    if scale == "paper":
        return build_backbone(arch, scale=scale, image_size=image_size, pretrained=True)
    key = {"arch": arch, "scale": scale, "image_size": image_size, "seed": seed,
           "version": PRETRAIN_VERSION, **asdict(cfg)}
    path = cache_root() / "backbones" / f"{arch}-{scale}-{image_size}px-{config_key(key)}.safetensors"
    state, meta, cached = cached_state(path, lambda: _pretrain(key, arch, scale, image_size, cfg, seed))
    backbone = build_backbone(arch, scale=scale, image_size=image_size)
    backbone.load_state_dict(state)
    if verbose and cached:
        print(f"pretrained {arch} loaded from cache {path.name} "
              f"(source test accuracy {meta.get('source_test_accuracy', float('nan')):.3f})")
    elif verbose:
        print(f"pretrained {arch} on {'+'.join(cfg.sources)} in {meta['seconds']:.0f}s, "
              f"source test accuracy {meta['source_test_accuracy']:.3f}; cached at {path}")
    return backbone


def _pretrain(key, arch, scale, image_size, cfg, seed) -> tuple[dict, dict]:
    seed_everything(seed)
    backbone = build_backbone(arch, scale=scale, image_size=image_size)
    sources = [load_dataset(name, seed=seed, size=image_size, channels=3, max_per_split=cfg.max_per_split)
               for name in cfg.sources]
    scenario = dataset_incremental(sources)
    model = Classifier(backbone, scenario.num_classes).to(device())
    start = time.time()
    fit(model, scenario.joint("train"),
        FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, optimizer="adamw",
                  weight_decay=cfg.weight_decay, schedule="cosine"),
        seed=seed, desc=f"pretrain {arch}")
    test = scenario.joint("test")
    acc = accuracy(predict(model, test), test.labels)
    return backbone.cpu().state_dict(), {**key, "source_test_accuracy": acc, "seconds": time.time() - start,
                                         "classes": list(scenario.class_names)}


# The book's pretraining per profile: every chapter calls ``book_backbone`` so they share one cache.
PRETRAIN = {
    "smoke": PretrainConfig(epochs=1, max_per_split=512),
    "cpu": PretrainConfig(epochs=2, max_per_split=15000),
}
BOOK_IMAGE_SIZE = {"smoke": 28, "cpu": 28, "paper": 224}


def book_backbone(arch: str, profile: str, seed: int = 0, verbose: bool = True) -> nn.Module:
    """The pretrained backbone a chapter starts from in ``profile``: the book's cached one at 28 px
    (``smoke``, ``cpu``; pretraining seed fixed so all chapters and seeds share it) or the published
    weights at 224 px (``paper``)."""
    from cmm_utils.core.profiles import check_profile

    check_profile(profile)
    if profile == "paper":
        return pretrained_backbone(arch, scale="paper", image_size=BOOK_IMAGE_SIZE[profile])
    return pretrained_backbone(arch, scale="cpu", image_size=BOOK_IMAGE_SIZE[profile],
                               cfg=PRETRAIN[profile], seed=seed, verbose=verbose)
