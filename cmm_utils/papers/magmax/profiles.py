"""The MagMax chapter's profiles, in the book's common schema (:func:`cmm_utils.core.profiles.check_table`):
``seeds`` (how many; a notebook's ``seed`` is the first), ``benchmarks`` (the scenarios, in the
order the page shows them: class-incremental datasets, split into ``n_tasks`` tasks unless they are
a fixed benchmark, then the dataset- or domain-incremental sequence) and ``methods`` (as in
:data:`cmm_utils.papers.magmax.method.METHODS`).

:data:`FT_KEYS` and :data:`RUN_KEYS` name the settings that change what a run computes (the cache
keys); the others (``seeds``, ``benchmarks``, ``methods``, ``sweep_merges``, ``keep_states``,
``eval_batch``) only orchestrate the page or the memory.
"""
from __future__ import annotations

from cmm_utils.core.benchmarks import BACKBONE, SMOKE_MAX_PER_SPLIT
from cmm_utils.core.profiles import check_table
from cmm_utils.papers.magmax.data import CHAPTER
from cmm_utils.papers.magmax.method import METHODS, SWEPT

_RECIPE = dict(optimizer="adamw", weight_decay=0.1, schedule="warmup_cosine", clip_grad=1.0, bn_stats="average",
               lambda_magmax=0.5, lambda_random=1.0, lambda_ties=0.55)
PROFILES = check_table(CHAPTER, {
    # the whole notebook in well under a minute: a tiny subset, a few steps per task, one seed
    "smoke": dict(benchmarks=["pathmnist_1k", "medical-dil"], n_tasks=3, seeds=1,
                  methods=["seq-ft", "joint", "pretrained", "average", "task-arithmetic", "ties", "random",
                           "magmax", "average-ind", "magmax-ind"],
                  sweep_merges=["magmax", "task-arithmetic"], backbone=BACKBONE, head="prototype", head_scale=16.0,
                  lr=1e-3, batch_size=32, epochs=1, min_steps=3, max_steps=3, warmup_steps=1, augment=True,
                  max_per_split=SMOKE_MAX_PER_SPLIT, eval_max_per_task=100, keep_states=True,
                  sweep_points=2, sweep_val_max=48, eval_batch=512, **_RECIPE),
    # real 28 px medical data, 3 seeds; θ_0's class-prototype head (CLIP zero-shot head's role: it
    # works at θ_0; head="fixed" is the random-head ablation) and the same 30 steps for every task,
    # so no task's vector is larger for having had more steps (issue 12)
    "cpu": dict(benchmarks=["ham10000-cil", "pathmnist_1k", "medical-dil"], n_tasks=3, seeds=3,
                methods=list(METHODS), sweep_merges=list(SWEPT), backbone=BACKBONE, head="prototype", head_scale=16.0,
                lr=1e-3, batch_size=64, epochs=1, min_steps=30, max_steps=30, warmup_steps=5, augment=True,
                max_per_split=None, eval_max_per_task=None, keep_states=True,
                sweep_points=4, sweep_val_max=200, eval_batch=512, **_RECIPE),
    # the authors' setting (GPU box): CLIP ViT-B/16 (OpenAI), zero-shot heads, their recipe (they ran seed 5)
    "paper": dict(benchmarks=["cifar100", "imagenet-r", "imagenet-r-dil"], n_tasks=[5, 10, 20, 50],
                  seeds=1, methods=list(METHODS), sweep_merges=list(SWEPT), backbone="ViT-B-16", head="clip",
                  head_scale=None, lr=1e-5, batch_size=128, epochs=10, min_steps=0, max_steps=None,
                  warmup_steps=500, augment=False, max_per_split=None, eval_max_per_task=None, keep_states=False,
                  sweep_points=20, sweep_val_max=None, eval_batch=256, **_RECIPE),
})
# settings that change what a run computes (cache keys); the rest only orchestrate the page
FT_KEYS = ("backbone", "head", "head_scale", "lr", "batch_size", "epochs", "min_steps", "max_steps",
           "warmup_steps", "augment", "max_per_split", "optimizer", "weight_decay", "schedule", "clip_grad")
RUN_KEYS = FT_KEYS + ("eval_max_per_task", "bn_stats", "sweep_points", "sweep_val_max",
                      "lambda_magmax", "lambda_random", "lambda_ties")
