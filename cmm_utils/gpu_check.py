"""``make gpu-check``: each chapter's paper-profile network trained, merged and evaluated on one device.

``python -m cmm_utils.gpu_check [--device cuda|cpu] [--tiny] [--steps N] [--chapters ...]``

For MagMax and CMM (CLIP ViT-B/16, QuickGELU, zero-shot head from the text tower; CMM linearised),
DynaMMo (ResNet-18 with residual adapters) and MedMerge (DenseNet-121 and ResNet-50, kernel-level
merge) it runs the paper profile's architecture at 224 px for a few optimiser steps per task with
the chapter's own code (``cmm_utils.core.train.fit``, the papers' modules), a merge through
``cmm_utils.merging`` and an evaluation pass, all on the requested device (``CMM_DEVICE`` is set to
it, so every ``device()`` of the chapters answers the same). It asserts that every parameter,
buffer, optimiser state and merged tensor involved sits on that device, prints training and
evaluation images per second and the peak GPU memory per chapter, and exits non-zero on any failure.

It needs no network and no paper dataset: weights are random (the timing and memory of a network
do not depend on its values) and images are the 224 px HAM10000 JPEGs in
``$CMM_DATA/ham10000/jpg224_sample`` (random images when that folder is absent, which it says).
``--tiny`` (64 px, batch 4, 1 step per task, 24 images, 1 prompt template, and the same network classes
at the ``cpu`` profile's width: a 2-layer CLIP ViT, the book's small ResNets and DenseNet) is the CPU
dry run that ``tests/test_gpu_check.py`` runs: the same code path in seconds, not the papers' cost;
``--tiny --scale paper`` keeps the papers' networks at tiny sizes.
Sized for at most 8 minutes on one GPU; the total is printed and a longer run is flagged.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHAPTERS = ("magmax", "cmm", "dynammo", "medmerge")
CLASS_NAMES = ("actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
               "melanoma", "melanocytic nevus", "vascular lesion")  # DermaMNIST order, labels 0..6
TASKS = ((0, 1, 2), (3, 4, 5, 6))  # two class-incremental tasks
BUDGET_S = 480


@dataclass
class Size:
    image: int
    batch: dict          # per chapter: the paper profile's batch size
    steps: int           # optimiser steps per task / stage
    images: int | None   # images read (None: all)
    templates: int | None
    scale: str           # "paper": the papers' networks; "cpu": the same classes at the cpu profile's width


FULL = Size(224, {"magmax": 128, "cmm": 128, "dynammo": 32, "medmerge": 32}, 10, None, None, "paper")
TINY = Size(64, {c: 4 for c in CHAPTERS}, 1, 24, 1, "cpu")


# ------------------------------------------------------------------------------------ data
def load_images(size: int, limit: int | None):
    """``LabeledImages`` from ``jpg224_sample`` resized to ``size`` (random images if absent)."""
    import pandas as pd
    from PIL import Image

    from cmm_utils.core.data import LabeledImages
    from cmm_utils.core.data.manifest import data_root

    folder = data_root() / "ham10000" / "jpg224_sample"
    if not (folder / "labels.csv").is_file():
        n = limit or 700
        print(f"gpu-check: {folder} not found: random images ({n}) instead")
        gen = torch.Generator().manual_seed(0)
        return (LabeledImages(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen),
                              torch.arange(n) % len(CLASS_NAMES)), "random")
    table = pd.read_csv(folder / "labels.csv")
    table = table.sample(frac=1.0, random_state=0) if limit else table  # a mix of classes in a small subset
    rows = table.head(limit) if limit else table
    arrays = []
    for image_id in rows["image_id"]:
        with Image.open(folder / f"{image_id}.jpg") as im:
            im = im.convert("RGB")
            arrays.append(np.asarray(im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return LabeledImages(images, torch.tensor(rows["label"].to_numpy(), dtype=torch.long)), str(folder)


def task_data(data, classes):
    """The images of ``classes``, labels kept global (the heads cover all classes)."""
    keep = torch.isin(data.labels, torch.tensor(classes)).nonzero().flatten()
    return data.subset(keep.numpy())


# ------------------------------------------------------------------------------------ measuring
class Meter:
    """Images and seconds of training and evaluation, synchronised on CUDA."""

    def __init__(self, dev):
        self.dev, self.train, self.eval = dev, [0, 0.0], [0, 0.0]

    def _sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def run(self, kind: str, images: int, fn):
        self._sync()
        start = time.perf_counter()
        out = fn()
        self._sync()
        slot = self.train if kind == "train" else self.eval
        slot[0] += images
        slot[1] += time.perf_counter() - start
        return out

    @staticmethod
    def rate(slot) -> str:
        return f"{slot[0] / slot[1]:8.1f}" if slot[1] > 0 else "     n/a"


def fit_steps(meter, model, data, size: Size, chapter: str, **kw):
    from cmm_utils.core.train import FitConfig, fit

    batch = size.batch[chapter]
    per_epoch = -(-len(data) // batch)
    epochs = -(-size.steps // per_epoch)  # enough passes for the steps (fit stops at max_steps)
    cfg = FitConfig(**{**dict(epochs=epochs, batch_size=batch, max_steps=size.steps, augment=False), **kw.pop("cfg", {})})
    full, rest = divmod(size.steps, per_epoch)
    images = full * len(data) + min(rest * batch, len(data))
    return meter.run("train", images, lambda: fit(model, data, cfg, desc=f"gpu-check {chapter}", **kw))


def evaluate(meter, model, data, batch):
    from cmm_utils.core.train import predict

    logits = meter.run("eval", len(data), lambda: predict(model, data, batch_size=batch))
    if not torch.isfinite(logits).all():
        raise RuntimeError("non-finite logits at evaluation")
    return logits


def optimizer_tensors(label, opt):
    return [(f"{label}.state[{i}].{k}", v) for i, s in enumerate(opt.state.values())
            for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0]


# ------------------------------------------------------------------------------------ chapters
_CLIP: dict = {}


def clip_parts(size: Size):
    """One random-weight OpenAI-architecture CLIP (QuickGELU) shared by MagMax and CMM (built once):
    ViT-B/16 through the book's loader, or at ``scale="cpu"`` the same open_clip classes two layers deep."""
    import open_clip

    from cmm_utils.core.models.clip import clip_model

    if "model" not in _CLIP:
        image = None if size.image == 224 else size.image
        if size.scale == "paper":
            _CLIP["model"], _CLIP["tok"] = clip_model("ViT-B-16", pretrained=None, image_size=image)
        else:
            vision = open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16,
                                                   image_size=size.image)
            text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
            _CLIP["model"] = open_clip.CLIP(64, vision, text, quick_gelu=True)
            _CLIP["tok"] = open_clip.get_tokenizer("ViT-B-16")
    return _CLIP["model"], _CLIP["tok"]


def zero_shot(dev, size: Size):
    """The zero-shot head's rows from the text tower, run on ``dev`` once (MagMax and CMM share it)."""
    from cmm_utils.core.models.clip import IMAGENET_TEMPLATES, zeroshot_weight

    if "head" not in _CLIP:
        model, tok = clip_parts(size)
        model.to(dev)
        try:
            _CLIP["head"] = zeroshot_weight(model, tok, CLASS_NAMES, IMAGENET_TEMPLATES[:size.templates])
        finally:
            model.cpu()
    return _CLIP["head"]


def _clip_name(size: Size) -> str:
    return "CLIP ViT-B/16 (QuickGELU)" if size.scale == "paper" else "CLIP, 2-layer ViT (QuickGELU, cpu scale)"


def _scale(size: Size) -> str:
    return "" if size.scale == "paper" else " (cpu scale)"


def chapter_magmax(dev, data, size: Size, meter):
    """Sequential fine-tuning of CLIP's image tower per task (the authors' AdamW recipe), MagMax merge."""
    from cmm_utils import merging
    from cmm_utils.core.device import check_on_device
    from cmm_utils.core.models.clip import ClipImageEncoder
    from cmm_utils.core.models.heads import FrozenHead, HeadedModel

    head = FrozenHead(zero_shot(dev, size)).to(dev)
    encoder = ClipImageEncoder(copy.deepcopy(clip_parts(size)[0].visual), image_size=size.image).to(dev)
    net = HeadedModel(encoder, head)
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    tvs, tensors = [], []
    for t, classes in enumerate(TASKS):
        res = fit_steps(meter, net, task_data(data, classes), size, "magmax", params=list(encoder.parameters()),
                        cfg=dict(lr=1e-5, optimizer="adamw", weight_decay=0.1, schedule="warmup_cosine",
                                 warmup_steps=500, clip_grad=1.0))
        tensors += optimizer_tensors(f"adamw[{t}]", res.optimizer)
        tvs.append(merging.task_vector(encoder.state_dict(), theta0))
    merged = merging.apply(theta0, merging.merge("magmax", tvs), 0.5)
    tensors += [(f"merged.{k}", v) for k, v in merged.items()]
    encoder.load_state_dict(merged)
    evaluate(meter, net, data, size.batch["magmax"] * 2)
    return _clip_name(size), check_on_device(dev, {"net": net}, tensors)


def chapter_cmm(dev, data, size: Size, meter):
    """Linearised fine-tuning per task, CMM's Adam-second-moment-weighted merge, post-merge correction step."""
    from cmm_utils import merging
    from cmm_utils.core.device import check_on_device
    from cmm_utils.core.models.clip import ClipImageEncoder
    from cmm_utils.core.models.heads import FrozenHead, HeadedModel
    from cmm_utils.papers.cmm.linearize import LinearizedModel
    from cmm_utils.papers.cmm.stages import adam_importance

    table = zero_shot(dev, size)
    enc0 = ClipImageEncoder(copy.deepcopy(clip_parts(size)[0].visual), image_size=size.image)
    enc = LinearizedModel(enc0).to(dev)
    del enc0
    head = FrozenHead.unset(len(CLASS_NAMES), table.shape[1], 100.0).to(dev)
    net = HeadedModel(enc, head)
    prev = prev_imp = None
    tensors = []
    recipe = dict(lr=1e-5, optimizer="adamw", weight_decay=0.1, schedule="warmup_cosine", warmup_steps=500,
                  clip_grad=1.0)
    for t, classes in enumerate(TASKS):
        head.set_rows(classes, table[list(classes)])
        res = fit_steps(meter, net, task_data(data, classes), size, "cmm", params=list(enc.params), cfg=recipe)
        tensors += optimizer_tensors(f"adamw[{t}]", res.optimizer)
        theta = enc.theta()
        imp = {k: v.to(dev) for k, v in adam_importance(res.optimizer, list(enc.named_theta())).items()}
        if prev is None:
            prev, prev_imp = theta, imp
        else:
            prev, prev_imp = merging.merge("importance-weighted", prev, prev_imp, theta, imp, 0.4)
        enc.load_theta(prev)
    tensors += [(f"merged.{k}", v) for k, v in {**prev, **prev_imp}.items()]
    fit_steps(meter, net, data, size, "cmm", params=list(enc.params),
              cfg=dict(lr=1e-7, optimizer="adamw", weight_decay=0.01, schedule="constant", clip_grad=1.0))
    evaluate(meter, net, data, size.batch["cmm"] * 2)
    return _clip_name(size) + ", linearised", check_on_device(dev, {"net": net}, tensors)


def chapter_dynammo(dev, data, size: Size, meter):
    """Stage 1 (a new adapter set + auxiliary head per task), adapter averaging, stage 2 (heads)."""
    from cmm_utils.core.device import check_on_device
    from cmm_utils.core.models import build_backbone
    from cmm_utils.papers.dynammo.adapters import AdapterNet

    backbone = build_backbone("resnet18", scale=size.scale, image_size=size.image).to(dev).eval()
    net = AdapterNet(backbone)
    tensors, offsets = [], []
    sgd = dict(lr=0.01, optimizer="sgd", weight_decay=5e-4, schedule="constant")
    for t, classes in enumerate(TASKS):
        net.add_task(len(classes))
        offsets.append(sum(n + 1 for n in net.task_sizes[:-1]))
        local = {c: i for i, c in enumerate(classes)}

        def stage1(m, x, y, t=t, local=local):
            target = torch.tensor([local.get(int(c), len(local)) for c in y], device=y.device)  # others
            return F.cross_entropy(m.aux_head(m.features(x, t)), target)

        params = list(net.adapters[t].parameters()) + list(net.aux_head.parameters())
        res = fit_steps(meter, net, task_data(data, classes), size, "dynammo", params=params, loss_fn=stage1,
                        cfg=sgd)
        tensors += optimizer_tensors(f"sgd[{t}]", res.optimizer)
    net.merge()  # merging.average_adapters over the task adapter sets
    column = {c: offsets[t] + i for t, cl in enumerate(TASKS) for i, c in enumerate(cl)}

    def stage2(m, x, y):
        return F.cross_entropy(m(x), torch.tensor([column[int(c)] for c in y], device=y.device))

    fit_steps(meter, net, data, size, "dynammo", params=list(net.heads.parameters()), loss_fn=stage2,
              train_mode=lambda m: m.eval(), cfg=dict(sgd, lr=1e-3))
    net.inference = "merged"
    evaluate(meter, net, data, size.batch["dynammo"] * 2)
    return "ResNet-18 + adapters" + _scale(size), check_on_device(dev, {"net": net}, tensors)


def chapter_medmerge(dev, data, size: Size, meter):
    """Two sources per backbone, kernel-level weights learned with the convolutions frozen (LP),
    collapse to one network, fine-tune; the sources' average through ``cmm_utils.merging``."""
    from cmm_utils import merging
    from cmm_utils.core.device import check_on_device
    from cmm_utils.core.models import Classifier, build_backbone
    from cmm_utils.papers.medmerge.kernel_merge import collapse_kernel_merge, wrap_kernel_merge

    checked, C = 0, len(CLASS_NAMES)
    for arch in ("densenet121", "resnet50"):
        torch.manual_seed(1)
        a = Classifier(build_backbone(arch, scale=size.scale, image_size=size.image), C).to(dev)
        b = Classifier(build_backbone(arch, scale=size.scale, image_size=size.image), C).to(dev)
        res_a = fit_steps(meter, a, data, size, "medmerge", cfg=dict(lr=1e-4, optimizer="adamw", weight_decay=1e-4))
        kernel = wrap_kernel_merge(a, b, init=0.5)
        learn = [p for n, p in kernel.named_parameters() if n.endswith((".w", ".bias_w")) or n.startswith("head.")]
        for p in kernel.parameters():
            p.requires_grad_(any(p is q for q in learn))
        res_w = fit_steps(meter, kernel, data, size, "medmerge", params=learn, train_mode=lambda m: m.eval(),
                          cfg=dict(lr=0.05, optimizer="adam", schedule="constant"))
        merged = collapse_kernel_merge(kernel).requires_grad_(True)
        fit_steps(meter, merged, data, size, "medmerge", cfg=dict(lr=1e-4, optimizer="adamw", weight_decay=1e-4))
        average = merging.merge("interpolation", a.state_dict(), b.state_dict(), 0.5)
        evaluate(meter, merged, data, size.batch["medmerge"] * 2)
        checked += check_on_device(dev, {f"{arch}.a": a, f"{arch}.b": b, f"{arch}.kernel": kernel,
                                         f"{arch}.merged": merged},
                                   optimizer_tensors("ft", res_a.optimizer) + optimizer_tensors("w", res_w.optimizer)
                                   + [(f"average.{k}", v) for k, v in average.items()])
    return "DenseNet-121, ResNet-50" + _scale(size), checked


RUNNERS = {"magmax": chapter_magmax, "cmm": chapter_cmm, "dynammo": chapter_dynammo, "medmerge": chapter_medmerge}


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cmm_utils.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:<index> or cpu")
    p.add_argument("--tiny", action="store_true", help="64 px, batch 4, 1 step, cpu-scale networks: the CPU dry run of make test")
    p.add_argument("--scale", choices=("paper", "cpu"), default=None,
                   help="networks: the papers' (default) or the cpu profile's widths (default with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per task/stage (default 10; tiny 1)")
    p.add_argument("--chapters", nargs="+", default=list(CHAPTERS), help=f"subset of {', '.join(CHAPTERS)}")
    p.add_argument("--precision", default=None, help="sets CMM_PRECISION: fp32, amp-bf16, amp-fp16")
    args = p.parse_args(argv)
    bad = [c for c in args.chapters if c not in CHAPTERS]
    if bad:
        p.error(f"unknown chapter(s) {bad}; valid: {', '.join(CHAPTERS)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["CMM_DEVICE"] = args.device  # every chapter's device() now answers this
    if args.precision:
        os.environ["CMM_PRECISION"] = args.precision
    from cmm_utils.core.device import device, effective_precision

    dev = device()  # validates: a clear error when CUDA is asked for and absent
    size = copy.deepcopy(TINY if args.tiny else FULL)
    size.steps = args.steps or size.steps
    size.scale = args.scale or size.scale
    data, source = load_images(size.image, size.images)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"gpu-check: device {dev} ({name}), precision {effective_precision(dev)}, torch {torch.__version__}, "
          f"{len(data)} images at {size.image} px from {source}, {size.steps} steps per task, random weights")
    start, failures = time.perf_counter(), []
    for chapter in args.chapters:
        meter = Meter(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        try:
            arch, n = RUNNERS[chapter](dev, data, size, meter)
        except Exception:
            failures.append(chapter)
            print(f"gpu-check {chapter:<9} FAILED\n{traceback.format_exc()}", flush=True)
            continue
        peak = f"{torch.cuda.max_memory_allocated(dev) / 2**30:6.2f} GiB" if dev.type == "cuda" else "n/a"
        print(f"gpu-check {chapter:<9} OK  {arch}: train {Meter.rate(meter.train)} img/s, "
              f"eval {Meter.rate(meter.eval)} img/s, peak GPU memory {peak}, {n} tensors on {dev}, "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    total = time.perf_counter() - start
    over = "" if args.tiny or total <= BUDGET_S else f" (over the {BUDGET_S}s budget: lower --steps)"
    print(f"gpu-check: {len(args.chapters) - len(failures)}/{len(args.chapters)} chapters passed in {total:.0f}s{over}"
          + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
