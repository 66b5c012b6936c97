"""The NumPy fast paths (with and without Numba) give what the generic array-API path gives."""

from __future__ import annotations

import array_api_compat.numpy as np_compat
import numpy as np
import pytest
from cases import KERNEL_DTYPES as DTYPES
from cases import KERNEL_LAYOUTS as LAYOUTS
from cases import KERNEL_TOL as TOL
from cases import assert_matches as _assert_matches
from cases import kernel_inputs as _inputs
from cases import step_outputs as _run

import bnarray as bn
from bnarray import _math
from bnarray._fast import FORCE_GENERIC_ENV


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fast_path_matches_generic_path(
    numpy_kernels, monkeypatch, shape, axis, dtype, training, affine
):
    x, dy, w, b, rm, rv = _inputs(shape, axis, dtype)
    if not affine:
        w = b = None
    fast = _run(x, dy, w, b, rm, rv, axis=axis, training=training)
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    generic = _run(x, dy, w, b, rm, rv, axis=axis, training=training)
    _assert_matches(fast, generic, dtype)


@pytest.mark.parametrize(
    ("shape", "axis"), [((3, 37, 41, 43), 1), ((3, 41, 43, 37), -1)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_matches_float64_reference(numpy_kernels, shape, axis, dtype):
    x, dy, w, b, _, _ = _inputs(shape, axis, dtype)
    out = _run(x, dy, w, b, None, None, axis=axis, training=True)
    reduce_axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=reduce_axes, keepdims=True)
    var = x64.var(axis=reduce_axes, keepdims=True)
    xhat = (x64 - mean) / np.sqrt(var + 1e-5)
    gamma = np.expand_dims(w.astype(np.float64), reduce_axes)
    m = x.size // x.shape[axis]
    sum_dy = dy64.sum(axis=reduce_axes, keepdims=True)
    sum_dy_xhat = (dy64 * xhat).sum(axis=reduce_axes, keepdims=True)
    dx = gamma / np.sqrt(var + 1e-5) / m * (m * dy64 - sum_dy - xhat * sum_dy_xhat)
    expected = {
        "mean": mean.ravel(),
        "var": var.ravel(),
        "y": xhat * gamma + np.expand_dims(b.astype(np.float64), reduce_axes),
        "dx": dx,
        "dw": sum_dy_xhat.ravel(),
        "db": sum_dy.ravel(),
    }
    for name, e in expected.items():
        err = float(
            np.max(np.abs(out[name].astype(np.float64) - e)) / np.max(np.abs(e))
        )
        assert err <= TOL[dtype], (name, err)


@pytest.mark.parametrize(("shape", "axis"), [((64, 8, 1000), 1), ((64, 1000, 8), -1)])
def test_statistics_stay_accurate_for_a_large_mean(numpy_kernels, shape, axis):
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    _, ctx = bn.batch_norm_forward(x, axis=axis)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    var = x.astype(np.float64).var(axis=reduce_axes)
    mean = x.astype(np.float64).mean(axis=reduce_axes)
    assert ctx.var.dtype == np.float32
    np.testing.assert_allclose(ctx.var, var, rtol=1e-3)
    np.testing.assert_allclose(ctx.mean, mean, rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "axis"), [((3, 37, 41, 43), 1), ((3, 41, 43, 37), -1)]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_fast_path_never_writes_inputs_nor_returns_views_of_them(
    numpy_kernels, shape, axis, dtype, training
):
    arrays = _inputs(shape, axis, dtype)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    out = _run(*arrays, axis=axis, training=training)
    for a, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, c)
    for name in ("y", "dx"):
        for a in arrays[:2]:
            assert not np.shares_memory(out[name], a), name
    assert not np.shares_memory(out["y"], out["dx"])


def test_non_contiguous_input_matches_generic_path(numpy_kernels, monkeypatch):
    x, dy, w, b, _, _ = _inputs((43, 41, 37, 3), 2, np.float32)
    xt, dyt = x.transpose(3, 2, 1, 0), dy.transpose(3, 2, 1, 0)
    fast = _run(xt, dyt, w, b, None, None, axis=1, training=True)
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    generic = _run(xt, dyt, w, b, None, None, axis=1, training=True)
    _assert_matches(fast, generic, np.float32)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((5, 37, 301), 1),
        ((129, 11, 3), -1),
        ((2, 3, 140_001), 1),
        # rows of channels over several stretches of the rows loops, the last
        # one partial
        ((3000, 7), -1),
        ((50, 6, 6, 130), -1),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels_round_exactly_like_the_generic_path(
    numpy_kernels, shape, axis, dtype
):
    # Same per-channel values in, so the same operations in the same order
    # must give the same bits: no fused multiply-add, no folded constants.
    x, dy, *_ = _inputs(shape, axis, dtype)
    cs = tuple(n if a == axis % len(shape) else 1 for a, n in enumerate(shape))
    rng = np.random.default_rng(1)
    mean, scale, shift, xc_scale = (
        rng.standard_normal(cs).astype(np.promote_types(dtype, np.float32))
        for _ in range(4)
    )
    for args in [(mean, scale, shift), (mean, scale, None)]:
        np.testing.assert_array_equal(
            numpy_kernels.normalize(x, *args, xp=np_compat),
            _math.normalize(x, *args, xp=np_compat),
        )
    for args in [(mean, scale, xc_scale, shift), (mean, scale, None, None)]:
        np.testing.assert_array_equal(
            numpy_kernels.grad_input(dy, x, *args, xp=np_compat),
            _math.grad_input(dy, x, *args, xp=np_compat),
        )


@pytest.mark.parametrize("scale", [1.0, 1 / 3, 3.7, 1e-3, 1e5])
def test_every_float16_converts_and_rounds_like_numpy(numpy_kernels, scale):
    # All 65 536 float16 bit patterns, widened, scaled and rounded back to
    # float16: overflow, subnormals, ties, infinities and NaN included.
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    zero = np.zeros((1, 1), np.float32)
    factor = np.full((1, 1), scale, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # NumPy warns on inf, NaN
        expected = (x.astype(np.float32) * factor).astype(np.float16)
        y = numpy_kernels.normalize(x, zero, factor, None, xp=np_compat)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(y), nan)
    np.testing.assert_array_equal(
        y.view(np.uint16)[~nan], expected.view(np.uint16)[~nan]
    )


@pytest.mark.parametrize("shape", [(7,), (300,), (3, 4)])
@pytest.mark.parametrize(
    ("running_dtype", "batch_dtype"),
    [
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.float16, np.float32),
        (np.float32, np.float64),
    ],
)
@pytest.mark.parametrize("factor", [0.0, 0.1, 1 / 3, 0.99, 1.0])
@pytest.mark.parametrize("bessel", [1.0, 64 / 63, 2.0])
def test_running_update_rounds_exactly_like_the_generic_path(
    numpy_kernels, shape, running_dtype, batch_dtype, factor, bessel
):
    # Every value of the running statistics is the generic expression's, bit
    # for bit: each Python float rounded to the dtype, no fused multiply-add.
    rng = np.random.default_rng(2)
    size = int(np.prod(shape))

    def values(dtype):
        v = rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30, size)
        v[:4] = [np.nan, np.inf, 5e-45, -0.0]
        with np.errstate(over="ignore"):
            a = v.astype(dtype).reshape(shape)
        a.flags.writeable = False  # read, never written
        return a

    rm, rv = values(running_dtype), np.abs(values(running_dtype))
    mean, var = values(batch_dtype), np.abs(values(batch_dtype))
    kept = [a.copy() for a in (rm, rv, mean, var)]
    with np.errstate(over="ignore", invalid="ignore"):
        got = numpy_kernels.running_update(
            rm, rv, mean, var, factor=factor, bessel=bessel, xp=np_compat
        )
        expected = _math.running_update(
            rm, rv, mean, var, factor=factor, bessel=bessel, xp=np_compat
        )
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g.view(np.uint8), e.view(np.uint8))
    for a, k in zip((rm, rv, mean, var), kept, strict=True):
        np.testing.assert_array_equal(a, k)
