"""Tests for cmm_utils.merging.kernels: hand-computed cases, reference ports, properties, streaming."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmm_utils import merging as M
from cmm_utils.merging import registry as R
from cmm_utils.merging import streaming as MS

PROPS = settings(max_examples=25, deadline=None)
t = torch.tensor


def f32(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def assert_sd_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])


def assert_sd_close(a, b, **kw):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], **kw)


# --------------------------------------------------------------- reference ports
# Ports of the authors' code (danielm1405/magmax, src/merging/task_vectors.py and
# the TIES functions vendored in src/merging/ties.py), used as oracles.


def ref_merge_max_abs(tvs):
    out = {}
    for key in tvs[0]:
        cur = tvs[0][key]
        for tv in tvs[1:]:
            cur = torch.where(tv[key].abs() >= cur.abs(), tv[key], cur)
        out[key] = cur
    return out


def _ref_topk_values_mask(M_, K):
    n, d = M_.shape
    k = d - int(d * K)
    kth_values, _ = M_.abs().kthvalue(k, dim=1, keepdim=True)
    return M_ * (M_.abs() >= kth_values)


def _ref_resolve_sign(T_):
    sign_to_mult = torch.sign(T_.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def _ref_disjoint_mean(T_, sign_to_mult):
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, T_ > 0, T_ < 0)
    selected = T_ * rows_to_keep
    counts = (selected != 0).sum(dim=0).float()
    return selected.sum(dim=0) / torch.clamp(counts, min=1)


def ref_ties(tvs, density):
    keys = sorted(tvs[0])
    flat = torch.vstack([torch.cat([tv[k].reshape(-1) for k in keys]) for tv in tvs])
    trimmed = _ref_topk_values_mask(flat.clone(), density)
    merged = _ref_disjoint_mean(trimmed, _ref_resolve_sign(trimmed))
    out, i = {}, 0
    for k in keys:
        n = tvs[0][k].numel()
        out[k] = merged[i : i + n].view_as(tvs[0][k])
        i += n
    return {k: out[k] for k in tvs[0]}


# ------------------------------------------------------------------ strategies

SHAPES = {"w": (2, 3), "b": (4,)}


@st.composite
def task_vector_lists(draw, min_t=1, max_t=5, elements=None):
    T = draw(st.integers(min_t, max_t))
    if elements is None:
        elements = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    out = []
    for _ in range(T):
        tv = {}
        for k, shape in SHAPES.items():
            n = int(np.prod(shape))
            tv[k] = torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=torch.float32).view(shape)
        out.append(tv)
    return out


TIE_PRONE = st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])


def randn_tvs(T, shapes=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,), "fc.weight": (5, 16)}
    return [{k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()} for _ in range(T)]


# -------------------------------------------------------- task vectors / apply


def test_task_vector_and_apply_hand():
    base = {"w": f32(1, 2), "b": f32(0.5), "bn.num_batches_tracked": t(3), "mask": t([True, False])}
    ft = {"w": f32(2, 0), "b": f32(1.5), "bn.num_batches_tracked": t(7), "mask": t([False, False])}
    tv = M.task_vector(ft, base)
    assert list(tv) == ["w", "b"]  # floating keys only
    assert_sd_equal(tv, {"w": f32(1, -2), "b": f32(1.0)})
    out = M.apply(base, tv, scale=0.5)
    assert_sd_equal(out, {"w": f32(1.5, 1.0), "b": f32(1.0), "bn.num_batches_tracked": t(3), "mask": t([True, False])})
    assert out["bn.num_batches_tracked"] is not base["bn.num_batches_tracked"]  # a copy, not an alias
    assert_sd_equal(M.apply(base, tv), {**base, "w": f32(2, 0), "b": f32(1.5)})


def test_apply_half_precision_rounds_once():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    tv = {"w": torch.tensor([0.25, -0.5], dtype=torch.float16)}
    out = M.apply(base, tv, 2.0)
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.tensor([1.5, 1.0], dtype=torch.float16))


# ------------------------------------------------------------ averaging / TA


def test_average_and_task_arithmetic_hand():
    tvs = [{"w": f32(1, 2), "n": t(1)}, {"w": f32(3, 4), "n": t(2)}, {"w": f32(5, 9), "n": t(3)}]
    assert_sd_equal(M.average(tvs), {"w": f32(3, 5), "n": t(1)})  # non-float from the first
    assert_sd_equal(M.task_arithmetic(tvs, 0.5), {"w": f32(4.5, 7.5), "n": t(1)})
    assert_sd_equal(M.task_arithmetic(tvs, scale=1.0), {"w": f32(9, 15), "n": t(1)})


def test_average_accumulates_in_float32_returns_input_dtype():
    # 2048 + 1 + 1 in float16 would round to 2048 at every step; float32 keeps 2050.
    tvs = [{"w": torch.tensor([2048.0], dtype=torch.float16)}] + [{"w": torch.tensor([1.0], dtype=torch.float16)}] * 2
    out = M.task_arithmetic(tvs, 1.0)
    assert out["w"].dtype == torch.float16 and out["w"].item() == 2050.0
    d = [{"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, {"w": torch.tensor([2.0, 3.0], dtype=torch.float64)}]
    assert M.average(d)["w"].dtype == torch.float64


@PROPS
@given(task_vector_lists(), st.integers(1, 4))
def test_average_of_identical_vectors_is_the_vector(tvs, T):
    v = tvs[0]
    assert_sd_close(M.average([v] * T), v, rtol=1e-6, atol=0)


@PROPS
@given(task_vector_lists())
def test_average_matches_stack_mean(tvs):
    expect = {k: torch.stack([tv[k] for tv in tvs]).double().mean(0).float() for k in SHAPES}
    assert_sd_close(M.average(tvs), expect, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- MagMax


def test_magmax_hand_with_ties_to_later_task():
    tvs = [{"w": f32(1, -3, 2, 0.5)}, {"w": f32(-2, 3, 1, -0.5)}, {"w": f32(0, 1, -2, 0.5)}]
    # e0: |-2| wins; e1: -3 vs 3 tie -> later (3); e2: 2 vs -2 tie -> later (-2);
    # e3: 0.5, -0.5, 0.5 all tie -> last (0.5)
    assert_sd_equal(M.magmax(tvs), {"w": f32(-2, 3, -2, 0.5)})
    assert_sd_equal(M.magmax(tvs[:2]), {"w": f32(-2, 3, 2, -0.5)})


@PROPS
@given(task_vector_lists())
def test_magmax_elements_come_from_a_task_and_have_max_magnitude(tvs):
    out = M.magmax(tvs)
    for k in SHAPES:
        stack = torch.stack([tv[k] for tv in tvs])
        assert (stack == out[k]).any(0).all()
        assert torch.equal(out[k].abs(), stack.abs().amax(0))


@PROPS
@given(task_vector_lists(elements=TIE_PRONE))
def test_magmax_matches_authors_merge_max_abs(tvs):
    # tie-prone values: the `>=` tie-break must match exactly
    assert_sd_equal(M.magmax(tvs), ref_merge_max_abs(tvs))


def test_magmax_large_tensors_cross_chunks_and_packing():
    # tensors larger than one chunk, and many small packed ones, with fp16 too
    shapes = {"big": (MS.PACK_BELOW + 17,), **{f"s{i}": (i + 1,) for i in range(12)}}
    for dtype in (torch.float32, torch.float16):
        tvs = randn_tvs(4, shapes, seed=1, dtype=dtype)
        out = M.magmax(tvs)
        assert_sd_equal(out, ref_merge_max_abs(tvs))
        # packed outputs do not share storage (safetensors refuses shared tensors)
        ptrs = {v.untyped_storage().data_ptr() for v in out.values()}
        assert len(ptrs) == len(out)


# ------------------------------------------------------------------- random


def _labelled(T, shape=(64, 50)):
    """Task i is filled with the value i + 1, so the winner of each element is readable."""
    return [{"w": torch.full(shape, float(i + 1)), "n": t(i)} for i in range(T)]


def test_random_select_takes_each_element_from_one_task_and_is_seeded():
    tvs = _labelled(5)
    a = M.random_select(tvs, seed=0)
    assert set(a["w"].unique().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert a["n"].item() == 0  # carried from the first
    assert_sd_equal(a, M.random_select(iter(tvs), seed=0))
    assert not torch.equal(a["w"], M.random_select(tvs, seed=1)["w"])


@PROPS
@given(task_vector_lists(min_t=2), st.integers(0, 2**31 - 1))
def test_random_select_elements_come_from_exactly_the_tasks(tvs, seed):
    out = M.random_select(tvs, seed)
    for k in SHAPES:
        stack = torch.stack([tv[k] for tv in tvs])
        assert (stack == out[k]).any(0).all()
    assert_sd_equal(out, M.random_select(list(tvs), seed))


def test_random_select_is_uniform_over_tasks():
    T, n = 4, 40_000
    out = M.random_select(_labelled(T, (n,)), seed=3)["w"]
    freq = torch.bincount(out.long() - 1, minlength=T).double() / n
    # 1/T each; binomial sd = sqrt(p(1-p)/n) ~ 0.0022, allow ~5 sd
    assert torch.allclose(freq, torch.full((T,), 1 / T, dtype=torch.float64), atol=0.011), freq


def test_random_select_does_not_depend_on_thread_count():
    tvs = randn_tvs(4, {"big": (MS.PACK_BELOW + 17,), "small": (9,)}, seed=5)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = M.random_select(tvs, seed=2)  # 1 thread: chunks of 2**16
        torch.set_num_threads(2)
        two = M.random_select(tvs, seed=2)  # 2 threads: chunks of 2**17
    finally:
        torch.set_num_threads(saved)
    assert_sd_equal(one, two)


def test_random_select_single_vector_is_a_copy():
    tv = {"w": f32(1, 2)}
    out = M.random_select([tv], seed=0)
    assert_sd_equal(out, tv)
    assert out["w"].data_ptr() != tv["w"].data_ptr()


# ---------------------------------------------------------------------- TIES


def test_ties_hand_example():
    tvs = [
        {"w": f32(1.0, -2.0, 0.5, 3.0, -0.1)},
        {"w": f32(-1.5, 0.2, 0.4, -1.0, 2.0)},
        {"w": f32(0.3, -0.6, -0.7, 2.5, 0.0)},
    ]
    # density 0.4, d=5: k = 5 - int(2.0) = 3; keep |x| >= 3rd smallest |x| per task:
    # trimmed: [1,-2,0,3,0], [-1.5,0,0,-1,2], [0,-.6,-.7,2.5,0]; sums [-.5,-2.6,-.7,4.5,2]
    # elected signs [-,-,-,+,+]; disjoint means [-1.5, -1.3, -0.7, 2.75, 2.0]
    expect = {"w": f32(-1.5, -1.3, -0.7, 2.75, 2.0)}
    assert_sd_close(M.ties(tvs, density=0.4), expect)
    assert_sd_close(ref_ties(tvs, 0.4), expect)


def test_ties_zero_sum_takes_majority_sign():
    tvs = [{"w": f32(1, 2, 3, -1)}, {"w": f32(-1, 1, 1, 1)}]
    # density .99 keeps all; sums [0, 3, 4, 0] -> signs [0, +, +, 0]; majority + fills
    # the zeros, so only the positive entries count: [1, 1.5, 2, 1]
    assert_sd_close(M.ties(tvs, density=0.99), {"w": f32(1, 1.5, 2, 1)})
    assert_sd_close(M.ties(tvs, density=1.0), {"w": f32(1, 1.5, 2, 1)})  # density 1 keeps all


def test_ties_global_vs_per_tensor_scope():
    tv = {"a": f32(10, 20), "b": f32(0.1, 0.2)}
    # global: d=4, k=2 -> threshold 0.2 drops b's 0.1; per tensor each keeps both
    assert_sd_close(M.ties([tv], 0.5), {"a": f32(10, 20), "b": f32(0, 0.2)})
    assert_sd_close(M.ties([tv], 0.5, scope="per_tensor"), {"a": f32(10, 20), "b": f32(0.1, 0.2)})


@PROPS
@given(task_vector_lists(), st.sampled_from([0.1, 0.2, 0.5, 0.8, 0.99]))
def test_ties_global_matches_authors_flatten_and_vstack(tvs, density):
    assert_sd_close(M.ties(tvs, density), ref_ties(tvs, density), rtol=1e-5, atol=1e-6)


def test_ties_callable_two_pass_and_carried_buffers():
    tvs = randn_tvs(4, seed=2)
    for tv in tvs:
        tv["bn.num_batches_tracked"] = t(5)
    expect = M.ties(tvs, 0.2)
    assert expect["bn.num_batches_tracked"].item() == 5
    assert_sd_equal(M.ties(lambda: (tv for tv in tvs), 0.2), expect)
    with pytest.raises(TypeError, match="two passes"):
        M.ties(iter(tvs))
    with pytest.raises(ValueError, match="second pass"):
        calls = iter([tvs, tvs[:2]])
        M.ties(lambda: iter(next(calls)))
    with pytest.raises(ValueError, match="scope"):
        M.ties(tvs, scope="layer")
    with pytest.raises(ValueError, match="density"):
        M.ties(tvs, density=1.5)


# ------------------------------------------------------------------------ CMM


def test_importance_weighted_hand_with_zero_denominator_guard():
    prev = {"w": f32(1, 2, 3), "b": f32(10.0), "n": t(4)}
    new = {"w": f32(3, 4, 5), "b": f32(20.0), "n": t(9)}
    merged, imp = M.importance_weighted(prev, {"w": f32(1, 0, 0)}, new, {"w": f32(1, 2, 0)}, alpha=0.5)
    # e0: (.5*1*1 + .5*1*3)/(.5+.5) = 2; e1: (0 + .5*2*4)/(0 + 1) = 4;
    # e2: denominator 0 -> guard: .5*3 + .5*5 = 4. "b" has no importance: plain lerp.
    assert_sd_close(merged, {"w": f32(2, 4, 4), "b": f32(15.0), "n": t(4)})
    assert_sd_close(imp, {"w": f32(1, 1, 0)})
    assert not torch.isnan(merged["w"]).any()


def _importance(sd):
    # |x| with subnormals flushed to 0: at subnormal F, (1-a)F + aF loses most bits
    # in any implementation (the authors' formula too); zeros exercise the guard.
    return {k: torch.where(v.abs() < 1e-30, 0.0, v.abs()) for k, v in sd.items()}


def _cmm_inputs(tvs):
    return tvs[0], _importance(tvs[1]), tvs[2], _importance({k: v * 0.5 for k, v in tvs[2].items()})


@PROPS
@given(task_vector_lists(min_t=3, max_t=3))
def test_importance_weighted_limits(tvs):
    prev, fp, new, ft = _cmm_inputs(tvs)
    m0, i0 = M.importance_weighted(prev, fp, new, ft, 0.0)
    assert_sd_equal(m0, prev)
    assert_sd_equal(i0, fp)
    m1, i1 = M.importance_weighted(prev, fp, new, ft, 1.0)
    assert_sd_equal(m1, new)
    assert_sd_equal(i1, ft)


@PROPS
@given(task_vector_lists(min_t=3, max_t=3), st.floats(0, 1))
def test_equal_importances_reduce_to_plain_interpolation(tvs, alpha):
    prev, fp, new, _ = _cmm_inputs(tvs)
    merged, _ = M.importance_weighted(prev, fp, new, fp, alpha)
    assert_sd_close(merged, M.linear_interpolation(prev, new, alpha), rtol=1e-5, atol=1e-3)


@PROPS
@given(task_vector_lists(min_t=3, max_t=3), st.sampled_from([0.3, 0.4, 0.6]))
def test_importance_weighted_matches_formula(tvs, alpha):
    prev, fp, new, ft = _cmm_inputs(tvs)
    merged, imp = M.importance_weighted(prev, fp, new, ft, alpha)
    for k in SHAPES:
        num = (1 - alpha) * fp[k].double() * prev[k].double() + alpha * ft[k].double() * new[k].double()
        den = (1 - alpha) * fp[k].double() + alpha * ft[k].double()
        plain = (1 - alpha) * prev[k].double() + alpha * new[k].double()
        expect = torch.where(den == 0, plain, num / torch.where(den == 0, 1, den))
        torch.testing.assert_close(merged[k], expect.float(), rtol=1e-5, atol=1e-2)
        torch.testing.assert_close(imp[k], den.float())


def test_continual_importance_merge_folds_pairs():
    tvs = randn_tvs(5, seed=4)
    pairs = [(tv, {k: (v * 3).abs() for k, v in randn_tvs(1, seed=10 + i)[0].items()}) for i, tv in enumerate(tvs)]
    theta, imp = pairs[0]
    for m, f in pairs[1:]:
        theta, imp = M.importance_weighted(theta, imp, m, f, 0.4)
    got = M.continual_importance_merge(pairs, 0.4)
    assert_sd_equal(got[0], theta)
    assert_sd_equal(got[1], imp)
    got_gen = M.continual_importance_merge((p for p in pairs), 0.4)
    assert_sd_equal(got_gen[0], theta)
    one = M.continual_importance_merge(pairs[:1], 0.4)
    assert_sd_equal(one[0], pairs[0][0])
    with pytest.raises(ValueError, match="alpha"):
        M.continual_importance_merge(pairs, 1.5)
    with pytest.raises(ValueError, match="empty"):
        M.continual_importance_merge([], 0.4)
    with pytest.raises(ValueError, match="'fc.weight'"):
        bad = [pairs[0], (pairs[1][0], {**pairs[1][1], "fc.weight": torch.zeros(5, 15)})]
        M.continual_importance_merge(bad, 0.4)


def test_importance_must_be_floating_keys_of_the_model():
    prev = {"w": f32(1, 2), "n": t(1)}
    with pytest.raises(ValueError, match="'n'"):
        M.importance_weighted(prev, {"n": f32(1)}, prev, {"n": f32(1)}, 0.5)
    with pytest.raises(ValueError, match="'w'.*shape"):
        M.importance_weighted(prev, {"w": f32(1, 2, 3)}, prev, {"w": f32(1, 2, 3)}, 0.5)


def test_linear_interpolation():
    a = {"w": f32(0, 2), "n": t(1)}
    b = {"w": f32(2, 4), "n": t(2)}
    assert_sd_equal(M.linear_interpolation(a, b, 0.25), {"w": f32(0.5, 2.5), "n": t(1)})
    assert_sd_equal(M.linear_interpolation(a, b, 0.0), a)
    assert_sd_equal(M.linear_interpolation(a, b, 1.0), {"w": b["w"], "n": t(1)})
    assert_sd_equal(M.linear_interpolation(a, b, 2.0), {"w": f32(4, 6), "n": t(1)})  # extrapolation


# -------------------------------------------------------------------- DynaMMo


def _adapter(i):
    return OrderedDict(
        [
            ("conv.weight", torch.full((2, 2), float(i))),
            ("alpha", f32(0.02 * (i + 1))),
            ("bn.running_mean", torch.full((2,), float(i))),
            ("bn.running_var", torch.full((2,), float(2 * i + 1))),
            ("bn.num_batches_tracked", t(10 * (i + 1))),
        ]
    )


def test_average_adapters_bn_policies():
    ads = [_adapter(i) for i in range(3)]
    avg = M.average_adapters(ads)
    assert list(avg) == list(ads[0])
    assert_sd_close(
        avg,
        OrderedDict(
            [
                ("conv.weight", torch.full((2, 2), 1.0)),
                ("alpha", f32(0.04)),
                ("bn.running_mean", torch.full((2,), 1.0)),
                ("bn.running_var", torch.full((2,), 3.0)),
                ("bn.num_batches_tracked", t(30)),  # from the last adapter
            ]
        ),
    )
    last = M.average_adapters(iter(ads), bn_policy="last")
    assert torch.equal(last["bn.running_mean"], torch.full((2,), 2.0))
    assert torch.equal(last["bn.running_var"], torch.full((2,), 5.0))
    assert torch.equal(last["conv.weight"], torch.full((2, 2), 1.0))
    reset = M.average_adapters(ads, bn_policy="reset")
    assert torch.equal(reset["bn.running_mean"], torch.zeros(2))
    assert torch.equal(reset["bn.running_var"], torch.ones(2))
    assert reset["bn.num_batches_tracked"].item() == 30
    with pytest.raises(ValueError, match="'mean'.*'average', 'last', 'reset'"):
        M.average_adapters(ads, bn_policy="mean")
    with pytest.raises(ValueError, match="empty"):
        M.average_adapters([])


# ----------------------------------------------------------------- registry


def test_registry_dispatch_defaults_and_errors():
    assert set(R.TASK_VECTOR_RULES) == {"average", "task-arithmetic", "random", "magmax", "ties"}
    tvs = randn_tvs(3)
    assert_sd_equal(R.merge("magmax", tvs), M.magmax(tvs))
    assert_sd_equal(R.merge("task-arithmetic", tvs, scale=0.3), M.task_arithmetic(tvs, 0.3))
    assert_sd_equal(R.merge("task-arithmetic", tvs), M.task_arithmetic(tvs, 1.0))
    assert_sd_equal(R.merge("random", tvs, seed=5), M.random_select(tvs, 5))
    assert_sd_equal(R.merge("ties", tvs), M.ties(tvs, density=0.2))
    assert R.rule("ties").defaults["density"] == 0.2
    with pytest.raises(ValueError, match="'maxmag'.*average, task-arithmetic, ties, random, magmax"):
        R.merge("maxmag", tvs)
    with pytest.raises(ValueError, match=r"takes no parameter\(s\) \['k'\]; valid: density, scope"):
        R.merge("ties", tvs, k=0.2)


# --------------------------------------------------------------- validation

STREAMING = {
    "average": M.average,
    "task_arithmetic": lambda x: M.task_arithmetic(x, 0.5),
    "magmax": M.magmax,
    "random": lambda x: M.random_select(x, 0),
    "ties": lambda x: M.ties(list(x)),
    "adapters": M.average_adapters,
    "cmm": lambda x: M.continual_importance_merge(((tv, {"w": tv["w"].abs()}) for tv in x), 0.4),
}


@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"w": torch.zeros(2, 3), "v": torch.zeros(4)}, r"'b'.*missing"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(4), "x": torch.zeros(1)}, r"'x'.*not expected"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(4)}, r"'w'.*shape \(2, 3\).*\(3, 2\)"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float64)}, r"'b'.*torch.float32.*torch.float64"),
    ],
)
def test_mismatch_raises_value_error_naming_the_key(name, bad, pattern):
    good = {"w": torch.ones(2, 3), "b": torch.ones(4)}
    with pytest.raises(ValueError, match=pattern):
        STREAMING[name]([good, good, bad])


@pytest.mark.parametrize("name", STREAMING)
def test_empty_iterable_raises(name):
    with pytest.raises(ValueError, match="empty"):
        STREAMING[name](iter([]))


def test_pairwise_functions_validate():
    a = {"w": torch.ones(2), "n": t(1)}
    with pytest.raises(ValueError, match="'w'.*shape"):
        M.task_vector({"w": torch.ones(3), "n": t(1)}, a)
    with pytest.raises(ValueError, match="'n'.*dtype"):
        M.linear_interpolation(a, {"w": torch.ones(2), "n": t(1.0)}, 0.5)
    with pytest.raises(ValueError, match="'n'.*not expected"):
        M.apply(a, {"w": torch.ones(2), "n": t(1)})  # task vectors hold floating keys only
    with pytest.raises(ValueError, match="'w'.*missing"):
        M.apply(a, {})
    with pytest.raises(TypeError, match="not a Tensor"):
        M.average([{"w": [1.0]}])


# ----------------------------------------------- streaming: generators, memory


@pytest.mark.parametrize("name", [n for n in STREAMING if n != "ties"])
def test_generator_gives_same_bits_as_list(name):
    tvs = randn_tvs(6, seed=7)
    for tv in tvs:
        tv["w"] = tv.pop("fc.weight")
        tv["n"] = t(3)
    assert_sd_equal_any(STREAMING[name](tvs), STREAMING[name](tv for tv in tvs))


def assert_sd_equal_any(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            assert_sd_equal(x, y)
    else:
        assert_sd_equal(a, b)


class AliveCounter:
    """A generator of fresh task vectors that records how many of the vectors it
    already yielded are still alive each time it makes a new one.

    Tensors are numpy-backed, so a weak reference to the ndarray tracks the storage
    itself: any view or slice kept by the consumer keeps the ndarray alive too.
    """

    def __init__(self, T, shapes):
        self.T, self.shapes, self.refs, self.alive = T, shapes, [], []

    def __iter__(self):
        rng = np.random.default_rng(0)
        for _ in range(self.T):
            self.alive.append(sum(any(r() is not None for r in rs) for rs in self.refs))
            arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in self.shapes.items()}
            self.refs.append([weakref.ref(a) for a in arrays.values()])
            sd = {k: torch.from_numpy(a) for k, a in arrays.items()}
            del arrays
            yield sd
            del sd


MEM_SHAPES = {"w": (MS.PACK_BELOW + 5,), "b": (7,), "c": (4, 4)}


@pytest.mark.parametrize("name", [n for n in STREAMING if n != "ties"] + ["ties_callable"])
def test_memory_is_constant_in_T(name):
    # ties on a Sequence holds the caller's list by design; its streaming form is the callable
    T = 20
    counters = []

    def stream():
        counters.append(AliveCounter(T, MEM_SHAPES))
        return iter(counters[-1])

    if name == "ties_callable":
        M.ties(stream, 0.2)
    else:
        STREAMING[name](stream())
    for c in counters:
        assert len(c.alive) == T
        assert max(c.alive) <= 1, c.alive  # at most the previous vector, whatever T


# ------------------------------------------------------------------ benchmark


def test_benchmark_quick_run(tmp_path):
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_bench.py"
    spec = importlib.util.spec_from_file_location("merge_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.csv"
    bench.main(["--quick", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == bench.FIELDS
    assert {(r["method"], r["impl"]) for r in rows} == {("copy", "copy")} | {
        (m, impl) for m in bench.STREAMING for impl in ("streaming", "stacked")
    }
    assert all(float(r["time_s"]) > 0 and float(r["gbps"]) > 0 and float(r["ratio"]) > 0 for r in rows)
