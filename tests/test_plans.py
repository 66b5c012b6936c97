"""Cached plans: a call that finds the plan of an earlier call gives the results
and the errors of a call that does not."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cases import assert_matches
from reference import forward as reference_forward

import bnarray as bn
from bnarray import _fast
from bnarray._plans import PLANS, PlanCache


def _step(x, dy, w, b, rm, rv, axis):
    y, ctx = bn.batch_norm_forward(x, w, b, axis=axis)
    dx, dw, db = bn.batch_norm_backward(dy, ctx)
    new_rm, new_rv = bn.update_running_stats(rm, rv, ctx, momentum=0.3)
    y_eval, ctx_eval = bn.batch_norm_forward(
        x, w, b, axis=axis, training=False, running_mean=new_rm, running_var=new_rv
    )
    dx_eval = bn.batch_norm_backward(dy, ctx_eval)[0]
    return [
        y,
        ctx.mean,
        ctx.var,
        ctx.invstd,
        dx,
        dw,
        db,
        new_rm,
        new_rv,
        y_eval,
        dx_eval,
    ]


def _inputs(backend, make, dtype, seed):
    """Arrays of the backend from `make`, a function of a NumPy array that
    returns a (possibly strided) view of it, and per-channel arrays."""
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 2.0, size=(6, 5, 4)).astype(dtype)
    x = make(base)
    axis = 1
    c = x.shape[axis]
    dy = rng.normal(size=x.shape).astype(dtype)
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    if backend.name.startswith("numpy"):
        # A NumPy backend: keep the strides of `make` (asarray would copy).
        return [x, dy, w, b, rm, rv], axis
    return [
        backend.asarray(np.ascontiguousarray(a)) for a in (x, dy, w, b, rm, rv)
    ], axis


LAYOUTS = {
    "contiguous": lambda a: a,
    "reversed": lambda a: a[::-1],
    "column slice": lambda a: a[:, :3],
    "fortran": np.asfortranarray,
    "transposed": lambda a: a.transpose(2, 1, 0),
}


def test_cached_and_uncached_calls_agree_as_shapes_dtypes_and_strides_change(
    backend,
):
    """A sequence of calls whose shapes, dtypes and strides change from call to
    call, each with the cache as the earlier calls left it, gives bit for bit
    the results of the same call with an empty cache."""
    dtypes = [np.float64, np.float32] + (
        [np.float16] if backend.backend.has_float16 else []
    )
    calls = [
        (make, dtype, seed)
        for seed, (make, dtype) in enumerate(
            [(m, d) for d in dtypes for m in LAYOUTS.values()] * 2
        )
    ]
    PLANS.clear()
    for make, dtype, seed in calls:
        arrays, axis = _inputs(backend, make, dtype, seed)
        hit = len(PLANS) > 0
        cached = _step(*arrays, axis)
        PLANS.clear()
        uncached = _step(*arrays, axis)
        assert hit or len(PLANS) > 0
        for a, e in zip(cached, uncached, strict=True):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(e))
        # Leave the cache as a sequence of cached calls would.
        _step(*arrays, axis)


def test_a_cached_plan_is_used(backend):
    x = backend.asarray(np.random.default_rng(0).normal(size=(8, 3)))
    PLANS.clear()
    bn.batch_norm_forward(x)
    assert len(PLANS) == 1
    bn.batch_norm_forward(x)
    assert len(PLANS) == 1  # the second call found the first one's plan


@pytest.mark.parametrize(
    ("good", "bad", "exc", "fragment"),
    [
        ({"axis": 1}, {"axis": True}, TypeError, "`axis`"),
        ({"axis": (1,)}, {"axis": (True,)}, TypeError, "`axis`"),
        ({"eps": 1.0}, {"eps": True}, TypeError, "`eps`"),
        ({"training": True}, {"training": 1}, TypeError, "`training`"),
        ({"training": False}, {"training": 0}, TypeError, "`training`"),
    ],
    ids=["axis True", "axis (True,)", "eps True", "training 1", "training 0"],
)
def test_values_equal_in_python_but_refused_miss_the_cache(good, bad, exc, fragment):
    """``True == 1 == 1.0`` in Python: a key that forgot the type would let a
    refused value through on the plan of an accepted one."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    stats = {}
    if good.get("training") is False:
        stats = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    bn.batch_norm_forward(x, **good, **stats)
    with pytest.raises(exc, match=fragment):
        bn.batch_norm_forward(x, **bad, **stats)


def test_devices_are_compared_on_every_call():
    xps = pytest.importorskip("array_api_strict")
    x = xps.ones((4, 3), dtype=xps.float64)
    weight = xps.ones(3, dtype=xps.float64)
    other = xps.ones(3, dtype=xps.float64, device=xps.Device("device1"))
    bn.batch_norm_forward(x, weight)  # caches the plan of these metadata
    with pytest.raises(ValueError, match=r"`weight`.*device1"):
        bn.batch_norm_forward(x, other)
    y, ctx = bn.batch_norm_forward(x, weight)
    bn.batch_norm_backward(y, ctx)
    with pytest.raises(ValueError, match=r"`dy`.*device1"):
        bn.batch_norm_backward(
            xps.ones((4, 3), dtype=xps.float64, device=other.device), ctx
        )


def test_num_batches_tracked_is_checked_on_every_call():
    x = np.random.default_rng(0).normal(size=(4, 3))
    _, ctx = bn.batch_norm_forward(x)
    bn.update_running_stats(
        np.zeros(3), np.ones(3), ctx, momentum=None, num_batches_tracked=1
    )
    with pytest.raises(ValueError, match="`num_batches_tracked`"):
        bn.update_running_stats(
            np.zeros(3), np.ones(3), ctx, momentum=None, num_batches_tracked=0
        )


def test_the_kernel_environment_is_part_of_the_key(monkeypatch):
    x = np.random.default_rng(0).normal(size=(64, 3))
    monkeypatch.delenv(_fast.FORCE_GENERIC_ENV, raising=False)
    fast = bn.batch_norm_forward(x)[0]
    monkeypatch.setenv(_fast.FORCE_GENERIC_ENV, "1")
    generic = bn.batch_norm_forward(x)[0]
    PLANS.clear()
    np.testing.assert_array_equal(generic, bn.batch_norm_forward(x)[0])
    assert not np.array_equal(fast, generic) or fast is not generic


def test_the_cache_is_bounded():
    cache = PlanCache(maxsize=4)
    for i in range(10):
        cache.put(("key", i), i)
    assert len(cache) == 4
    assert cache.get(("key", 9)) == 9
    assert cache.get(("key", 0)) is None
    cache.put(["unhashable"], 1)  # stores nothing, raises nothing
    assert cache.get(["unhashable"]) is None
    assert len(cache) == 4


def test_calls_from_threads_get_their_own_results():
    rng = np.random.default_rng(0)
    inputs = [
        rng.normal(float(i), 1.0 + i, size=(16 + i, 3 + i % 4)) for i in range(12)
    ]
    expected = [bn.batch_norm_forward(x)[0] for x in inputs]
    PLANS.clear()
    errors = []

    def work(k):
        try:
            for _ in range(20):
                for i in range(k % 3, len(inputs), 3):
                    np.testing.assert_array_equal(
                        bn.batch_norm_forward(inputs[i])[0], expected[i]
                    )
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((524_287, 2), -1),
        ((3, 2, 4_095), 1),
        ((2, 3, 87_381), -1),
        ((1_023, 2), -1),
        ((511, 3), -1),
        ((200, 3, 9), 1),
        ((1_000_000, 1), -1),
    ],
    ids=[
        "rows",
        "planes",
        "long rows",
        "short rows",
        "one product of rows",
        "one product of planes",
        "one channel",
    ],
)
def test_the_fused_small_array_path_is_accurate(numpy_kernels, shape, axis, dtype):
    """Arrays just below the fused loops' size limit, a mean 10⁴ standard
    deviations from zero, a strided view: the float64 reference's statistics
    to the accuracy page's bounds."""
    kept = (len(shape) - 1,) if axis == -1 else (axis,)
    assert _fast.fused(numpy_kernels, shape, kept) is not None
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((shape[0] * 2, *shape[1:]))).astype(dtype)[::-2]
    y, ctx = bn.batch_norm_forward(x, axis=axis)
    ref_y, ref_mean, ref_var = reference_forward(x.astype(np.float64), axis=axis)
    np.testing.assert_allclose(ctx.var, ref_var, rtol=1e-4)
    # float32 holds x − μ to 2⁻²⁴·|μ|: the bounds of the numerics page.
    unit = float(np.finfo(dtype).eps) / 2 * float(np.abs(ref_mean).max())
    spread = float(np.sqrt(ref_var.min()))
    np.testing.assert_allclose(
        ctx.mean, ref_mean, rtol=0, atol=2 * unit + 1e-3 * spread
    )
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=8 * unit / spread + 1e-5)


@pytest.mark.parametrize("module", ["_numba", "_numpy"])
def test_the_fused_path_serves_small_arrays_only(module):
    if module == "_numba":
        pytest.importorskip("numba")
    import importlib

    kernels = importlib.import_module(f"bnarray._fast.{module}")
    limit = getattr(kernels, "_SMALL_ELEMENTS", _fast.FUSED_MAX_ELEMENTS)
    assert _fast.fused(kernels, (limit // 64 - 1, 16, 4), (1,)) is kernels
    assert _fast.fused(kernels, (limit // 64, 16, 4), (1,)) is None
    assert _fast.fused(importlib.import_module("bnarray._math"), (2, 5), (1,)) is None
    if module == "_numpy":  # rows after the channels of over 4096 values: blocked
        assert _fast.fused(kernels, (2, 3, 4096), (1,)) is kernels
        assert _fast.fused(kernels, (2, 3, 4097), (1,)) is None
        assert _fast.fused(kernels, (50_000, 3), (1,)) is kernels
    # The fused and the blocked kernels agree on the same array.
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(50, 7)).astype(np.float32)
    fused = kernels.small_forward(x, (1, 7), None, None, 1e-5)
    assert fused[1].shape == fused[2].shape == fused[3].shape == (7,)
    mean, var = kernels.batch_stats(x, (0,), xp=np)
    _, scale = kernels.forward_scales(var, None, 1e-5, xp=np)
    y = kernels.normalize(x, mean, scale, None, xp=np)
    assert_matches(
        {"y": fused[0], "mean": fused[1], "var": fused[2]},
        {"y": y, "mean": mean.reshape(7), "var": var.reshape(7)},
        np.float32,
    )


def test_a_context_is_the_one_its_constructor_makes(backend):
    """The forward pass builds its context without the dataclass's __init__:
    every field is what the constructor sets, and it stays frozen."""
    import dataclasses

    rng = np.random.default_rng(5)
    x = backend.asarray(rng.normal(size=(8, 3)).astype(np.float32))
    _, ctx = bn.batch_norm_forward(x)
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    assert fields == vars(ctx)
    again = bn.BatchNormContext(**fields)
    assert vars(again) == vars(ctx)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.eps = 1.0
    assert dataclasses.replace(ctx, eps=0.5).eps == 0.5
