"""DynaMMo's network: a frozen backbone, one residual adapter per task before each ResNet stage,
per-task heads with an "others" output, and the merged (averaged) adapters used at inference.

Qazi et al., "DynaMMo: Dynamic Model Merging for Efficient Class Incremental Learning for
Medical Images", MIUA 2024 (arXiv:2404.14099), Sec. 2; the adapter and its placement come from
ACL (Zhang et al., MICCAI 2023), whose code DynaMMo's release forks
(``backbone/adapter_cl_net.py`` and the orphan ``backbone/dynammo_cl_net .py``).

- Adapter (``Special_Adapter_v1``): ``x + α·ReLU(BN(ConvT3x3(ReLU(BN(Conv3x3(x))))))``, both
  3x3 layers full width (c -> c), no padding (the transposed convolution restores the size),
  learnable scalar ``α`` initialised to 0.02.
- Placement: forward pre-hooks on the stages ``layer1..layer4`` of a timm ResNet, so each adapter
  transforms a stage's *input* (none after ``layer4``), as the authors' hooks do.
- A new task's adapters start as a copy of the previous task's (``load_state_dict`` warm start);
  older adapters are frozen. The backbone is frozen, BatchNorm statistics included.
- Merge (Eq. "W̄_m = 1/T Σ_t W_t^m", the figure's "Merging" stage): the uniform average of all
  tasks' adapters, computed **once per task** by :func:`cmm_utils.merging.average_adapters` with
  an explicit BatchNorm policy, and stored in ``merged``.
- Inference (``inference="merged"``): **one** pass through the merged adapters; every head reads
  the same feature vector. ``inference="paths"`` is ACL: head ``t`` reads the features of task
  ``t``'s own adapter path (T passes).

Deliberate deviations from the released code (research note §1.2, §1.10):
- the released merged forward re-averages all adapters at every forward call and every hooked
  layer, then pushes T identical copies of the batch through it; here the average is computed once
  per task and the batch goes through once (identical outputs, T times less compute);
- modules are created explicitly (``add_task``), not lazily inside the hook, and nothing is
  hard-coded to CUDA; α and BN statistics are averaged like the code's whole-``state_dict``
  average (``bn_policy="average"``), integer counters come from the newest adapter.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmm_utils import merging

STAGES = ("layer1", "layer2", "layer3", "layer4")
INFERENCE = ("merged", "paths")


class Adapter(nn.Module):
    """ACL's ``Special_Adapter_v1(c, c, 3)``: returns ``x + α·ReLU(BN2(ConvT(ReLU(BN1(Conv(x))))))``."""

    def __init__(self, channels: int, alpha: float = 0.02):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=0, bias=True)
        self.bn1 = nn.BatchNorm2d(channels)
        self.convt = nn.ConvTranspose2d(channels, channels, 3, stride=1, padding=0, bias=True)
        self.bn2 = nn.BatchNorm2d(channels)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * F.relu(self.bn2(self.convt(F.relu(self.bn1(self.conv(x))))))


def stage_channels(backbone: nn.Module, stages: Sequence[str] = STAGES) -> list[int]:
    """Input channels of each hooked stage (the first convolution's ``in_channels``)."""
    out = []
    for name in stages:
        stage = getattr(backbone, name, None)
        if stage is None:
            raise ValueError(f"backbone has no stage {name!r}; DynaMMo hooks timm ResNet stages {STAGES}")
        out.append(next(m for m in stage.modules() if isinstance(m, nn.Conv2d)).in_channels)
    return out


class AdapterNet(nn.Module):
    """Frozen backbone + per-task adapter sets + per-task heads ``Linear(d, n_t + 1)``.

    ``path`` selects what the stage hooks apply: ``None`` (plain backbone), a task index ``t``
    (that task's adapters: stage 1, herding, ACL inference) or ``"merged"``. ``forward`` returns the
    concatenation of all heads' logits, ``[B, Σ_t (n_t + 1)]``, computed as ``inference`` says.
    """

    def __init__(self, backbone: nn.Module, stages: Sequence[str] = STAGES, alpha: float = 0.02,
                 bn_policy: str = "average"):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.stages, self.alpha, self.bn_policy = tuple(stages), alpha, bn_policy
        self.channels = stage_channels(backbone, self.stages)
        self.num_features = backbone.num_features
        self.adapters = nn.ModuleList()          # adapters[t][m]: task t, stage m
        dev = next(backbone.parameters()).device
        self.merged = nn.ModuleList([Adapter(c, alpha) for c in self.channels]).to(dev)
        self.merged.requires_grad_(False)
        self.heads = nn.ModuleList()             # heads[t]: Linear(d, n_t + 1), last output "others"
        self.aux_head: nn.Linear | None = None   # stage-1 head of the newest task
        self.task_sizes: list[int] = []
        self.path: int | str | None = None
        self.inference = "merged"
        self._hooks = [getattr(backbone, name).register_forward_pre_hook(self._hook(m))
                       for m, name in enumerate(self.stages)]

    # ------------------------------------------------------------------ construction
    def add_task(self, n_classes: int) -> None:
        """New adapters (a copy of the previous task's, fresh for task 0), a new stage-1 head and a
        new kept head, both ``Linear(d, n_classes + 1)``; older adapters are frozen."""
        for old in self.adapters:
            old.requires_grad_(False)
        new = nn.ModuleList([Adapter(c, self.alpha) for c in self.channels])
        dev = next(self.backbone.parameters()).device
        if len(self.adapters) and dev.type != "meta":  # meta: shapes only (FLOP counting)
            new.load_state_dict(self.adapters[-1].state_dict())
        self.adapters.append(new.to(dev).train(self.training))  # new modules follow the net's mode
        self.aux_head = nn.Linear(self.num_features, n_classes + 1).to(dev)
        self.heads.append(nn.Linear(self.num_features, n_classes + 1).to(dev))
        self.task_sizes.append(n_classes)
        self.merge()

    @torch.no_grad()
    def merge(self) -> None:
        """``merged ← average_adapters(adapters[0..T-1], bn_policy)``: once per task, not per forward."""
        if len(self.adapters) and not self.merged[0].alpha.is_meta:  # meta: shapes only
            state = merging.average_adapters([a.state_dict() for a in self.adapters], self.bn_policy)
            self.merged.load_state_dict(state)

    # ------------------------------------------------------------------ forward
    def _hook(self, stage: int):
        def hook(module, args):
            bank = self._bank()
            return None if bank is None else (bank[stage](args[0]),) + tuple(args[1:])
        return hook

    def _bank(self) -> nn.ModuleList | None:
        if self.path is None:
            return None
        if self.path == "merged":
            return self.merged
        return self.adapters[self.path]

    def features(self, x: torch.Tensor, path: int | str | None = None) -> torch.Tensor:
        """Pooled backbone features with the adapters of ``path`` (default: the current path)."""
        previous = self.path
        if path is not None:
            self.path = path
        try:
            return self.backbone(x)
        finally:
            self.path = previous

    def _shares_stem(self) -> bool:
        return all(hasattr(self.backbone, a) for a in ("conv1", "bn1", "act1", "maxpool", "forward_head"))

    def path_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every task's own adapter path. The stem has no adapter in front of it, so it runs
        once and only the stages are repeated per task (a fair, efficient ACL; the released code pushes
        T full copies of the batch through the whole network)."""
        if not self._shares_stem():
            return [self.features(x, t) for t in range(len(self.adapters))]
        b = self.backbone
        h = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        out, previous = [], self.path
        try:
            for t in range(len(self.adapters)):
                self.path = t
                z = h
                for name in self.stages:
                    z = getattr(b, name)(z)
                out.append(b.forward_head(z))
        finally:
            self.path = previous
        return out

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each head's logits: DynaMMo (merged) one shared feature pass, ACL (paths) one per task."""
        if self.inference not in INFERENCE:
            raise ValueError(f"unknown inference {self.inference!r}; valid: {', '.join(INFERENCE)}")
        if self.inference == "merged":
            f = self.features(x, "merged")
            return [head(f) for head in self.heads]
        return [head(f) for head, f in zip(self.heads, self.path_features(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.head_logits(x), dim=1)

    def split_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(logits, [n + 1 for n in self.task_sizes], dim=1))

    # ------------------------------------------------------------------ bookkeeping
    def frozen_mode(self) -> "AdapterNet":
        """Everything in eval mode (frozen backbone BN, merged and old adapters)."""
        return self.eval()

    def inference_parameters(self) -> int:
        """Parameters an inference pass uses: backbone, one adapter set (merged) or T (paths), heads."""
        backbone = sum(p.numel() for p in self.backbone.parameters())
        per_set = sum(p.numel() for p in self.merged.parameters())
        heads = sum(p.numel() for p in self.heads.parameters())
        sets = 1 if self.inference == "merged" else len(self.adapters)
        return backbone + sets * per_set + heads


def min_others_scores(head_logits: Sequence[torch.Tensor], task_classes: Sequence[Sequence[int]],
                      num_classes: int) -> torch.Tensor:
    """DynaMMo/ACL's "min-others" rule as scores over all ``num_classes`` global classes.

    ``p_i = softmax(head_i)``, ``u_i = p_i[others]``; the predicted task is ``argmin_i u_i`` and
    the class its best real class (``min_others_test``, ``dynammo.py`` L262-306). The returned
    scores are ``p_i[k] − 2·rank_i`` for class ``k`` of task ``i`` (rank 0 = lowest "others"
    probability, ties to the earlier task) and ``-inf`` for classes of no head, so the argmax of
    the scores is exactly that prediction and the book's pinned evaluation can use them as logits.
    """
    if len(head_logits) != len(task_classes):
        raise ValueError(f"{len(head_logits)} heads but {len(task_classes)} tasks")
    probs = [F.softmax(l.float(), dim=1) for l in head_logits]
    others = torch.stack([p[:, -1] for p in probs], dim=1)
    rank = others.argsort(dim=1, stable=True).argsort(dim=1).float()
    scores = torch.full((others.shape[0], num_classes), float("-inf"), device=others.device)
    for i, (p, classes) in enumerate(zip(probs, task_classes)):
        if p.shape[1] != len(classes) + 1:
            raise ValueError(f"head {i} has {p.shape[1]} outputs, expected {len(classes)} classes + others")
        scores[:, list(classes)] = p[:, :-1] - 2.0 * rank[:, i:i + 1]
    return scores
