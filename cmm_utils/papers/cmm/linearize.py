"""First-order linearisation of a network around its pretrained weights (tangent-space fine-tuning).

CMM's pre-merging stage (Phan et al. 2025, "Toward a Holistic Approach to Continual Model
Merging", arXiv:2509.23592, Sec. "pre-merging") fine-tunes the model in its tangent space:

.. math::
    f_{lin}(x;\\theta) = f(x;\\theta_0) + J_\\theta f(x;\\theta_0)\\,(\\theta-\\theta_0)

The authors' ``src/linearize.py`` is gortizji/tangent_task_arithmetic's ``LinearizedModel``
(functorch ``make_functional_with_buffers`` + ``jvp``). Here the same function is built with its
modern equivalent, ``torch.func.functional_call`` + ``torch.func.jvp``: one forward-mode pass gives
the primal ``f(x;θ0)`` and the tangent ``J·(θ−θ0)``, and reverse mode differentiates the tangent
with respect to θ. The linearisation point θ0 stays the pretrained weights for every task, as in
the authors' code.

Deviation (documented): the authors linearise CLIP's ViT, which has no BatchNorm. Our ResNet-18
has BatchNorm, and a linearisation is only a fixed function of θ if the statistics are fixed too:
the wrapped network is always evaluated in ``eval`` mode with the running statistics (and every
other buffer) of θ0. They are not trained, not updated and not merged.
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

# The first forward-mode AD call imports torch's jvp decompositions, which torch itself registers
# with the deprecated ``torch.jit.script`` (torch 2.14 warns on every fresh process). The warning
# is torch's own, not ours to act on; importing the module here, with that one warning silenced,
# keeps it out of every notebook's output.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401,E402


class LinearizedModel(nn.Module):
    """``f(x;θ0) + J f(x;θ0)(θ−θ0)`` for any ``nn.Module`` ``f``.

    - ``params`` (trainable, one ``nn.Parameter`` per parameter of ``f``, in ``named_parameters``
      order) is θ; it starts at θ0.
    - θ0 and ``f``'s buffers are stored as (non-trainable) buffers; ``f`` itself is kept on the
      ``meta`` device (no memory) and only used through ``functional_call``.
    - ``theta()`` / ``load_theta()`` read and write θ keyed by ``f``'s parameter names, so θ is a
      plain state dict for ``cmm_utils.merging.kernels``; ``theta0()`` is the linearisation point.
    - ``train()``/``eval()`` change nothing inside: ``f`` is always run in eval mode (see the
      module docstring on BatchNorm).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        base = copy.deepcopy(module).eval()
        self.names = [n for n, _ in base.named_parameters()]
        self.buffer_names = [n for n, _ in base.named_buffers()]
        self.params = nn.ParameterList([nn.Parameter(p.detach().clone()) for _, p in base.named_parameters()])
        for i, (_, p) in enumerate(base.named_parameters()):
            self.register_buffer(f"_theta0_{i}", p.detach().clone())
        for i, (_, b) in enumerate(base.named_buffers()):
            self.register_buffer(f"_buffer0_{i}", b.detach().clone())
        for attr in ("num_features", "embed_dim", "output_dim"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        # Not a submodule: its parameters must not appear in self.parameters(). Meta = no storage.
        object.__setattr__(self, "_func", base.to("meta"))

    # ---------------------------------------------------------------- the function
    def _theta0_list(self) -> list[torch.Tensor]:
        return [getattr(self, f"_theta0_{i}") for i in range(len(self.names))]

    def _buffers0(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"_buffer0_{i}") for i, n in enumerate(self.buffer_names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta0 = self._theta0_list()
        primals = dict(zip(self.names, theta0))
        tangents = {n: p - p0 for n, p, p0 in zip(self.names, self.params, theta0)}
        buffers = self._buffers0()

        def f(params):
            return functional_call(self._func, (params, buffers), (x,))

        # Fused attention kernels (nn.MultiheadAttention's eval-mode fast path, flash/efficient
        # scaled-dot-product attention) have no forward-mode AD formula; the composite "math"
        # path computes the same function and supports jvp.
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                out, dout = jvp(f, (primals,), (tangents,))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return out + dout

    def train(self, mode: bool = True) -> "LinearizedModel":
        self.training = mode  # the wrapped network stays in eval mode (fixed BN statistics of θ0)
        return self

    # ---------------------------------------------------------------- θ as a state dict
    def named_theta(self) -> Iterator[tuple[str, nn.Parameter]]:
        return zip(self.names, self.params)

    def theta(self) -> dict[str, torch.Tensor]:
        """θ as a state dict (detached copies), keyed by the wrapped network's parameter names."""
        return {n: p.detach().clone() for n, p in self.named_theta()}

    def theta0(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self._theta0_list())}

    @torch.no_grad()
    def load_theta(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"load_theta: state lacks {len(missing)} parameter(s), e.g. {missing[0]!r}")
        for n, p in self.named_theta():
            p.copy_(state[n])

    def function_at(self, theta: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The *non-linearised* network ``f(·;θ)`` (θ0 if ``theta`` is None), with θ0's buffers."""
        net = copy.deepcopy(self._func).to_empty(device=self.params[0].device)
        state = {**(theta or self.theta0()), **self._buffers0()}
        with torch.no_grad():
            for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
                tensor.copy_(state[name])
        return net.eval()
