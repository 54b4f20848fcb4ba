"""Streaming and validation machinery behind :mod:`cmm_utils.merging.kernels`.

The merge rules in :mod:`cmm_utils.merging.kernels` are written as the papers' equations;
this module holds what makes them cheap and safe:

* **Validation** (:func:`spec_of`, :func:`check`, :func:`validated`,
  :func:`check_importance`, :func:`check_alpha`): every state dict given to one
  call must have the same keys, shapes and dtypes; a mismatch raises
  ``ValueError`` naming the first offending key and what was expected vs. found.
* **Constant-memory folds** (:func:`stream`, :class:`Running`): a rule is a
  ``step(cur_chunks, new_chunks, t)`` folded over an iterable of state dicts,
  holding one owned running state plus the current input, never all T inputs.
* **Chunking and packing** (:func:`chunk`, :class:`Layout`, :class:`Scratch`):
  elementwise kernels run over cache-sized chunks, small tensors are packed into
  one flat buffer, and chunk-sized scratch buffers are reused across steps.
* **Dtypes** (:func:`is_float`, :func:`float_keys`, :func:`acc_dtype`): only
  floating entries are merged; sums accumulate in float32 (float64 for float64).

The conventions these implement (which entries are merged, precision, error
messages) are documented in :mod:`cmm_utils.merging.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "CHUNK_PER_THREAD",
    "Layout",
    "PACK_BELOW",
    "Running",
    "Scratch",
    "StateDict",
    "acc_dtype",
    "check",
    "check_alpha",
    "check_importance",
    "chunk",
    "float_keys",
    "is_float",
    "spec_of",
    "stream",
    "validated",
]

StateDict = Mapping[str, Tensor]

# The selection and CMM kernels run their 3-5 elementwise ops chunk by chunk. A
# chunk that stays in L2 is read from DRAM once rather than once per op.
# With 2**16 elements per intra-op thread (256 KB per float32 operand), chunks fit
# the 1 MB L2 per core of the benchmark machine. Chunks from 2**15 to 2**18
# timed the same there; whole tensors were about 1.5x slower (benchmarks/README.md).
CHUNK_PER_THREAD = 1 << 16
# Tensors smaller than this are packed together (see Layout). The threshold is
# fixed, not thread-dependent, so that random_select's draws do not depend on the
# thread count: the generator is consumed element by element in layout order.
PACK_BELOW = 1 << 17


def chunk() -> int:
    """Elements per chunk: ``CHUNK_PER_THREAD`` per intra-op thread."""
    return CHUNK_PER_THREAD * max(1, torch.get_num_threads())


def is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, every other float type uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _owned(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Return a fresh contiguous copy of ``t`` (optionally cast), never an alias."""
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t)


def spec_of(sd: StateDict, what: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"{what} must be a mapping str -> Tensor, got {type(sd).__name__}")
    spec = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{what}[{k!r}] is a {type(v).__name__}, not a Tensor")
        spec[k] = (tuple(v.shape), v.dtype)
    return spec


def check(sd: StateDict, spec: Mapping, what: str, ref: str) -> None:
    """Raise ValueError naming the first key of ``sd`` that does not match ``spec``."""
    got = spec_of(sd, what)
    for k, (shape, dtype) in spec.items():
        if k not in got:
            raise ValueError(f"key {k!r}: expected (present in {ref}) but missing from {what}")
        g_shape, g_dtype = got[k]
        if g_shape != shape:
            raise ValueError(f"key {k!r}: expected shape {shape} (as in {ref}), found {g_shape} in {what}")
        if g_dtype != dtype:
            raise ValueError(f"key {k!r}: expected dtype {dtype} (as in {ref}), found {g_dtype} in {what}")
    for k in got:
        if k not in spec:
            raise ValueError(f"key {k!r}: found in {what} but not expected (absent from {ref})")


def validated(state_dicts: Iterable[StateDict], what: str = "task vector") -> Iterator[StateDict]:
    """Yield the state dicts of an iterable, checking each against the first.

    Only the first dict's key/shape/dtype spec is kept, never its tensors, and the
    current dict is released before the next is requested, so the iterator itself
    keeps at most one input alive.
    """
    it = iter(state_dicts)
    try:
        sd = next(it)
    except StopIteration:
        raise ValueError(f"expected at least one {what}, got an empty iterable") from None
    spec = spec_of(sd, f"{what} 1")
    i = 1
    while True:
        yield sd
        sd = None  # drop our reference before fetching the next one
        try:
            sd = next(it)
        except StopIteration:
            return
        i += 1
        check(sd, spec, f"{what} {i}", f"{what} 1")


def float_keys(sd: StateDict) -> list[str]:
    return [k for k, v in sd.items() if is_float(v)]


class Scratch:
    """Reusable chunk-sized buffers, one per (slot, dtype, device)."""

    def __init__(self) -> None:
        self._bufs: dict = {}
        self._views: dict = {}  # slicing costs a dispatch: cache the views too

    def get(self, slot: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (slot, n, dtype, device)
        view = self._views.get(key)
        if view is None:
            bkey = (slot, dtype, device)
            buf = self._bufs.get(bkey)
            if buf is None or buf.numel() < n:
                buf = self._bufs[bkey] = torch.empty(n, dtype=dtype, device=device)
                self._views = {k: v for k, v in self._views.items() if k[0] != slot or k[2:] != bkey[1:]}
            view = self._views[key] = buf[:n]
        return view

    def cast(self, slot: int, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x`` in ``dtype``: ``x`` itself if it already has it, else a scratch copy."""
        return x if x.dtype == dtype else self.get(slot, x.numel(), dtype, x.device).copy_(x)


class Layout:
    """Grouping of the floating keys of a state dict for the streaming kernels.

    A kernel call costs a few microseconds, whatever the tensor size. Many small
    tensors (biases, norms) therefore cost more in calls than in data: ResNet-18 has
    88 float tensors under 2**17 elements, 2 % of its parameters. Tensors smaller
    than ``PACK_BELOW`` that share dtypes and device are packed into one flat buffer in
    the running state, and the matching inputs are concatenated (``torch.cat``)
    at each step, so one chunked kernel covers them all. Larger tensors are
    processed on their own.
    """

    def __init__(self, keys: Sequence[str], refs: Sequence[StateDict]) -> None:
        packed: dict[tuple, list[str]] = {}
        single: list[list[str]] = []
        for k in keys:
            v = refs[0][k]
            if v.numel() < PACK_BELOW:
                packed.setdefault(tuple(r[k].dtype for r in refs) + (v.device,), []).append(k)
            else:
                single.append([k])
        self.groups = list(packed.values()) + single
        self.shapes = {k: refs[0][k].shape for k in keys}

    def own(self, sd: StateDict, dtypes: Mapping[str, torch.dtype]) -> list[Tensor]:
        """Owned, contiguous flat copies of ``sd`` (one per group), cast to ``dtypes``."""
        flats = []
        for g in self.groups:
            if len(g) == 1:
                flats.append(_owned(sd[g[0]], dtypes[g[0]]).view(-1))
            else:
                flats.append(torch.cat([sd[k].reshape(-1) for k in g]).to(dtypes[g[0]]))
        return flats

    def flats(self, sd: StateDict) -> list[Tensor]:
        """1-D views (single tensors) or concatenations (packed groups) of inputs."""
        return [sd[g[0]].reshape(-1) if len(g) == 1 else torch.cat([sd[k].reshape(-1) for k in g]) for g in self.groups]

    def unpack(self, flats: Sequence[Tensor], dtypes: Mapping[str, torch.dtype]) -> dict[str, Tensor]:
        """Per-key tensors in ``dtypes``; packed keys are copied out so that no two
        returned tensors share storage (``safetensors`` refuses shared storage)."""
        out = {}
        for g, flat in zip(self.groups, flats):
            if len(g) == 1:
                out[g[0]] = flat.view(self.shapes[g[0]]).to(dtypes[g[0]])
            else:
                parts = flat.split([math.prod(self.shapes[k]) for k in g])
                for k, part in zip(g, parts):
                    out[k] = part.view(self.shapes[k]).to(dtypes[k], copy=True)
        return out


class Running:
    """Running state of a streaming rule: one owned copy of the first state dict.

    ``flats`` are the floating entries laid out by a :class:`Layout` (in
    ``state_dtype`` of each input dtype); non-floating entries are kept, cloned,
    from the first state dict.
    """

    def __init__(self, sd: StateDict, state_dtype: Callable[[torch.dtype], torch.dtype]) -> None:
        keys = float_keys(sd)
        self.order = list(sd)
        self.dtypes = {k: sd[k].dtype for k in keys}
        self.layout = Layout(keys, [sd])
        self.flats = self.layout.own(sd, {k: state_dtype(d) for k, d in self.dtypes.items()})
        self.chunk = chunk()
        self.chunks = [f.split(self.chunk) for f in self.flats]  # views, made once for all steps
        self.carried = {k: v.clone() for k, v in sd.items() if not is_float(v)}

    def update(self, sd: StateDict, step, t: int) -> None:
        # A method, so that no view of ``sd`` outlives the call in a local variable.
        for cur, new in zip(self.chunks, self.layout.flats(sd)):
            step(cur, new.split(self.chunk), t)

    def result(self) -> dict[str, Tensor]:
        out = self.layout.unpack(self.flats, self.dtypes)
        out.update(self.carried)
        return {k: out[k] for k in self.order}


def _keep(dtype: torch.dtype) -> torch.dtype:
    return dtype


def stream(task_vectors: Iterable[StateDict], step, state_dtype=_keep) -> tuple[Running, int]:
    """Fold ``step(cur_chunks, new_chunks, t)`` over validated task vectors.

    ``t`` is 1-based. ``cur_chunks`` are views of the running state,
    ``new_chunks`` the matching views of the t-th vector, ``chunk()`` elements each.
    """
    run = None
    t = 0
    for tv in validated(task_vectors):
        t += 1
        if t == 1:
            run = Running(tv, state_dtype)
        else:
            run.update(tv, step, t)
        del tv
    return run, t


def check_alpha(alpha: float, lo: float = 0.0, hi: float = 1.0) -> float:
    alpha = float(alpha)
    if not lo <= alpha <= hi:
        raise ValueError(f"alpha must be in [{lo}, {hi}], got {alpha}")
    return alpha


def check_importance(importance: StateDict, model_spec: Mapping, what: str) -> dict:
    """Check CMM importances against the model's spec and return their own spec: floating
    keys of the model only (a subset is allowed), the model's shapes, floating dtypes."""
    spec = spec_of(importance, what)
    for k, (shape, dtype) in spec.items():
        if k not in model_spec or not model_spec[k][1].is_floating_point:
            raise ValueError(f"key {k!r}: found in {what} but not a floating key of the model")
        if shape != model_spec[k][0]:
            raise ValueError(f"key {k!r}: expected shape {model_spec[k][0]} (the model's), found {shape} in {what}")
        if not dtype.is_floating_point:
            raise ValueError(f"key {k!r}: expected a floating dtype in {what}, found {dtype}")
    return spec
