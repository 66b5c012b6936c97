"""batch_norm_forward against the float64 reference, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from cases import LAYOUTS, channel_shape, make_params
from checks import assert_close, assert_like

import bnarray as bn


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_training_forward_matches_reference(backend, shape, axis, affine):
    x, w, b, _, _ = make_params(shape, axis)
    w, b = (w, b) if affine else (None, None)
    xb = backend.asarray(x)
    wb = None if w is None else backend.asarray(w)
    bb = None if b is None else backend.asarray(b)
    y, ctx = bn.batch_norm_forward(xb, wb, bb, axis=axis)
    y_ref, mean_ref, var_ref = reference.forward(x, w, b, axis=axis)
    assert_close(backend, y, y_ref, like=xb)
    assert_close(backend, ctx.mean, mean_ref, like=xb)
    assert_close(backend, ctx.var, var_ref, like=xb)
    assert_close(backend, ctx.invstd, 1 / np.sqrt(var_ref + 1e-5), like=xb)
    assert ctx.training is True
    assert ctx.count == x.size // max(1, int(np.prod(channel_shape(shape, axis))))
    assert ctx.x is xb


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_inference_forward_uses_running_stats(backend, shape, axis, affine):
    x, w, b, rm, rv = make_params(shape, axis)
    w, b = (w, b) if affine else (None, None)
    xb = backend.asarray(x)
    y, ctx = bn.batch_norm_forward(
        xb,
        None if w is None else backend.asarray(w),
        None if b is None else backend.asarray(b),
        axis=axis,
        eps=1e-3,
        training=False,
        running_mean=backend.asarray(rm),
        running_var=backend.asarray(rv),
    )
    y_ref, _, _ = reference.forward(
        x, w, b, axis=axis, eps=1e-3, training=False, running_mean=rm, running_var=rv
    )
    assert_close(backend, y, y_ref, like=xb)
    assert ctx.training is False
    assert_close(backend, ctx.mean, rm, like=xb)
    assert_close(backend, ctx.var, rv, like=xb)


def test_inference_accepts_a_single_sample(backend):
    x, _w, _b, rm, rv = make_params((1, 4), -1)
    y, _ = bn.batch_norm_forward(
        backend.asarray(x),
        training=False,
        running_mean=backend.asarray(rm),
        running_var=backend.asarray(rv),
    )
    y_ref, _, _ = reference.forward(x, training=False, running_mean=rm, running_var=rv)
    assert_close(backend, y, y_ref, like=backend.asarray(x))


def test_float32_is_within_1e5_of_float64_reference(backend):
    x, w, b, _, _ = make_params((8, 6, 5, 5), 1, seed=3)
    x32 = backend.asarray(x, np.float32)
    y, ctx = bn.batch_norm_forward(
        x32, backend.asarray(w, np.float32), backend.asarray(b, np.float32), axis=1
    )
    x_seen = x.astype(np.float32).astype(np.float64)
    y_ref, _mean_ref, var_ref = reference.forward(
        x_seen, w.astype(np.float32), b.astype(np.float32), axis=1
    )
    assert_close(backend, y, y_ref, like=x32, rtol=1e-5, atol=1e-5)
    assert_close(backend, ctx.var, var_ref, like=x32, rtol=1e-5, atol=0)


def test_large_mean_variance_is_stable_in_float32(backend):
    # E[x²] - E[x]² in float32 would lose every digit of the variance here.
    rng = np.random.default_rng(4)
    x = rng.normal(1e4, 1.0, size=(4096, 3))
    x32 = backend.asarray(x, np.float32)
    y, ctx = bn.batch_norm_forward(x32)
    _, _, var_ref = reference.forward(x.astype(np.float32), axis=-1)
    var = backend.to_numpy(ctx.var)
    np.testing.assert_allclose(var, var_ref, rtol=1e-3)
    y_ref, _, _ = reference.forward(x.astype(np.float32), axis=-1)
    np.testing.assert_allclose(backend.to_numpy(y), y_ref, atol=1e-3)


@pytest.mark.needs_float16
def test_float16_input_accumulates_in_float32(backend):
    rng = np.random.default_rng(5)
    # 8192 values per channel: a float16 running sum would stall at 2048 + ... and
    # float16 squares of deviations overflow for a spread of 300.
    x = rng.normal(100.0, 300.0, size=(8192, 2)).astype(np.float16)
    xb = backend.asarray(x)
    w32 = backend.asarray(np.array([1.5, 0.5]), np.float32)
    y, ctx = bn.batch_norm_forward(xb, w32)
    assert_like(y, xb)
    assert ctx.mean.dtype == backend.xp.float32
    y_ref, mean_ref, var_ref = reference.forward(x, np.array([1.5, 0.5]))
    np.testing.assert_allclose(backend.to_numpy(ctx.mean), mean_ref, rtol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(ctx.var), var_ref, rtol=1e-5)
    np.testing.assert_allclose(
        backend.to_numpy(y).astype(np.float64), y_ref, atol=5e-3, rtol=2e-3
    )


def test_parameters_of_another_float_dtype_are_cast(backend):
    x, w, b, _, _ = make_params((10, 3), -1)
    x32 = backend.asarray(x, np.float32)
    y, _ = bn.batch_norm_forward(x32, backend.asarray(w), backend.asarray(b))
    assert_like(y, x32)
    y_ref, _, _ = reference.forward(x.astype(np.float32), w, b)
    np.testing.assert_allclose(backend.to_numpy(y), y_ref, rtol=1e-5, atol=1e-5)


def test_inputs_are_not_modified(backend):
    x, w, b, rm, rv = make_params((6, 4), -1)
    arrays = [backend.asarray(a) for a in (x, w, b, rm, rv)]
    copies = [backend.to_numpy(a).copy() for a in arrays]
    bn.batch_norm_forward(*arrays[:3])
    bn.batch_norm_forward(
        *arrays[:3], training=False, running_mean=arrays[3], running_var=arrays[4]
    )
    for a, before in zip(arrays, copies, strict=False):
        np.testing.assert_array_equal(backend.to_numpy(a), before)


def test_eps_enters_the_denominator(backend):
    x = np.array([[0.0], [2.0]])  # mean 1, biased var 1
    y, ctx = bn.batch_norm_forward(backend.asarray(x), eps=3.0)
    assert_close(backend, y, np.array([[-0.5], [0.5]]), like=backend.asarray(x))
    assert ctx.eps == 3.0
