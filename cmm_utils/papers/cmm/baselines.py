"""The baselines of the CMM chapter: sequential fine-tuning and the MagMax paper's merges of its
checkpoints (averaging, MagMax), with CMM's heads, splits and training recipe.

Paper: H. Phan, S. Cha, T. Tran, Q. Lei, "Toward a Holistic Approach to Continual Model Merging",
arXiv:2509.23592 (2025), the baselines of its tables; MagMax (Marczak et al. 2024) for the merge.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Mapping

import torch
from torch import nn

from cmm_utils import merging
from cmm_utils.core.checkpoints import TaskCheckpoints
from cmm_utils.core.continual import ContinualResult, evaluate_seen_tasks, gflops_per_image, state_bytes
from cmm_utils.core.data import Scenario, Task
from cmm_utils.core.io import strip_prefix, with_prefix
from cmm_utils.core.models.heads import FrozenHead, HeadedModel
from cmm_utils.core.seeds import task_seed
from cmm_utils.core.train import device, seed_everything
from cmm_utils.papers.cmm.loop import NOT_IN_CHAIN, checkpoint_dir, checkpoint_name
from cmm_utils.papers.cmm.networks import encoder_dim, get_state, make_encoder, set_state
from cmm_utils.papers.cmm.profiles import BASELINES, MAGMAX_SCALE, CMMConfig
from cmm_utils.papers.cmm.stages import subsample, train_task


def merged_model(merge: str, seq: Mapping, theta0: Mapping, running: Mapping, t: int) -> tuple[dict, list]:
    """The model evaluated after task ``t`` and what it keeps: ``last`` θ_t; ``average``
    θ0 + mean_i τ_i; ``magmax`` θ0 + 0.5·magmax(τ_1..τ_t), from the running sum / running max."""
    if merge == "last":
        return seq, [seq]
    if merge == "average":
        return merging.apply(theta0, running["sum"], 1.0 / (t + 1)), [seq, theta0, running["sum"]]
    return merging.apply(theta0, running["max"], MAGMAX_SCALE), [seq, theta0, running["max"]]


def run_seq_baseline(scenario: Scenario, encoder0: nn.Module, head_fn: Callable[[Task], torch.Tensor], cfg: CMMConfig,
                     seed: int, identity: Mapping, *, resume: bool = True, image_size: int = 28,
                     channels: int = 3) -> ContinualResult:
    """Sequential fine-tuning and the MagMax paper's merges of its checkpoints, same heads and recipe.

    One chain θ_1, θ_2, … (standard fine-tuning, each task from the previous model, MagMax's
    "seq-FT"); task vectors τ_i = θ_i − θ0. After task t the evaluated model is
    ``seq-ft``: θ_t; ``average``: θ0 + mean_i τ_i (``merge.average`` as a running sum);
    ``magmax``: θ0 + 0.5·magmax(τ_1..τ_t) (``merge.magmax`` as a running max-|τ| fold, which is
    exactly the T-vector rule since ties go to the later task). The chain's checkpoints are shared
    by the three methods, so the chain is trained once: its run scores all three after every task
    and keeps their scores in the checkpoint, which holds the latest task only. Bytes carried: θ_t,
    plus θ0 and the running merge for the merges; ``extra['bytes_all_checkpoints']`` is what the
    authors' merge script keeps (θ0 and every θ_i).
    """
    seed_everything(seed)
    dev = device()
    C = scenario.num_classes
    enc = make_encoder(encoder0, False).to(dev)
    theta0 = get_state(encoder0)
    head = FrozenHead.unset(C, encoder_dim(encoder0), cfg.logit_scale).to(dev)
    net = HeadedModel(enc, head)
    chain = TaskCheckpoints(checkpoint_dir(), checkpoint_name(identity, cfg, "seq-ft-chain", NOT_IN_CHAIN))
    found = chain.latest() if resume else None
    running, seconds, start = None, 0.0, 0
    scores = {m: {"R": [], "acc_seen": [], "bytes_per_task": [], "bytes_all_checkpoints": [], "mean_class_recall": None}
              for m in BASELINES}
    if found is not None and found.tasks:
        seq = strip_prefix(found.tensors, "theta.")
        running = {"sum": strip_prefix(found.tensors, "sum."), "max": strip_prefix(found.tensors, "max.")}
        set_state(enc, seq)
        seconds, scores, start = found.meta["seconds"], found.meta["scores"], found.tasks
    for t, task in enumerate(scenario.tasks):
        head.set_rows(task.classes, head_fn(task))
        if t < start:
            continue
        train = subsample(task.train, cfg.max_train_per_task, task_seed(seed, t))
        tic = time.time()
        train_task(net, train, task.classes, C, cfg.fit_config(), task_seed(seed, t), desc=f"seq-ft task {t + 1}")
        seq = get_state(enc)
        tau = merging.task_vector(seq, theta0)
        running = ({"sum": tau, "max": {k: v.clone() for k, v in tau.items()}} if running is None else
                   {"sum": merging.task_arithmetic([running["sum"], tau], 1.0), "max": merging.magmax([running["max"], tau])})
        seconds += time.time() - tic
        for method in BASELINES:
            merge = {"seq-ft": "last", "average": "average", "magmax": "magmax"}[method]
            model, keep = merged_model(merge, seq, theta0, running, t)
            eval_enc = copy.deepcopy(enc)
            set_state(eval_enc, model)
            score = evaluate_seen_tasks(HeadedModel(eval_enc, head), scenario, t)
            s = scores[method]
            s["R"].append(score.row)
            s["acc_seen"].append(score.accuracy)
            s["bytes_per_task"].append(state_bytes(*keep))
            s["bytes_all_checkpoints"].append(state_bytes(theta0, *([seq] * (t + 1))) if merge != "last"
                                              else state_bytes(seq))
            s["mean_class_recall"] = score.mean_class_recall  # of the model after the last task
            s["final_pred"] = score.predicted.tolist()  # per-image, for the claims' paired bootstrap
        chain.save(t, {**with_prefix("theta.", seq), **with_prefix("sum.", running["sum"]),
                       **with_prefix("max.", running["max"])}, {"seconds": seconds, "scores": scores})
    own = scores[cfg.method]
    gflops = gflops_per_image(net, image_size, channels)
    return ContinualResult(cfg.method, own["R"], own["acc_seen"], bytes_stored=own["bytes_per_task"][-1], gflops=gflops,
                           train_seconds=seconds,
                           extra={"bytes_per_task": own["bytes_per_task"],
                                  "bytes_all_checkpoints": own["bytes_all_checkpoints"],
                                  "mean_class_recall": own["mean_class_recall"], "final_pred": own.get("final_pred")})
