"""Masks: statistics from the positions where the mask is True, every position normalized with them."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from cases import make_params
from checks import assert_close
from variant_helpers import numerical_gradients

import bnarray as bn

# (shape, channel axis): padded sequences (B, T, C), NCHW images (mask B×H×W),
# two channel axes.
MASK_CASES = [((4, 6, 3), -1), ((3, 2, 4, 5), 1), ((4, 3, 5, 2), (1, 3))]


def make_mask(shape, axis, seed=0):
    kept = {a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))}
    mask_shape = tuple(n for a, n in enumerate(shape) if a not in kept)
    mask = np.random.default_rng(seed).random(mask_shape) < 0.6
    mask.flat[:2] = True  # at least two counted positions
    return mask


def counted_rows(a, mask, axis):
    """(m, C): the counted positions' values, channels (flattened kept axes) last."""
    kept = sorted(x % a.ndim for x in (axis if isinstance(axis, tuple) else (axis,)))
    moved = np.moveaxis(a, kept, list(range(a.ndim - len(kept), a.ndim)))
    return moved[mask].reshape(int(mask.sum()), -1)


@pytest.mark.parametrize(("shape", "axis"), MASK_CASES)
def test_masked_batch_norm_equals_plain_batch_norm_of_the_counted_values(
    backend, shape, axis
):
    x, w, b, rm, rv = make_params(shape, axis, seed=1)
    mask = make_mask(shape, axis, seed=2)
    # A loss that ignores padding: dy is zero where the mask is False.
    dy = np.random.default_rng(3).normal(size=shape)
    kept = [a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))]
    mask_x = np.expand_dims(mask, kept)
    dy = dy * mask_x
    xb = backend.asarray(x)
    y, ctx = bn.batch_norm_forward(
        xb,
        backend.asarray(w),
        backend.asarray(b),
        axis=axis,
        mask=backend.asarray(mask),
    )
    dx, dw, db = bn.batch_norm_backward(backend.asarray(dy), ctx)

    rows = counted_rows(x, mask, axis)
    w_rows, b_rows = w.reshape(-1), b.reshape(-1)
    y_ref, mean_ref, var_ref = reference.forward(rows, w_rows, b_rows)
    dx_ref, dw_ref, db_ref = reference.backward(
        counted_rows(dy, mask, axis), rows, w_rows
    )
    cs = mean_ref.shape if not isinstance(axis, tuple) else w.shape
    assert_close(
        backend, ctx.mean, mean_ref.reshape(cs), like=xb, rtol=1e-12, atol=1e-12
    )
    assert_close(backend, ctx.var, var_ref.reshape(cs), like=xb, rtol=1e-12, atol=1e-12)
    y_np, dx_np = backend.to_numpy(y), backend.to_numpy(dx)
    np.testing.assert_allclose(
        counted_rows(y_np, mask, axis), y_ref, rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(
        counted_rows(dx_np, mask, axis), dx_ref, rtol=1e-10, atol=1e-10
    )
    assert_close(backend, dw, dw_ref.reshape(w.shape), like=xb, rtol=1e-10, atol=1e-10)
    assert_close(backend, db, db_ref.reshape(w.shape), like=xb, rtol=1e-10, atol=1e-10)
    # Masked-out positions: normalized with the same statistics; dy = 0 there
    # gives dx = dy·γ·invstd = 0.
    y_all = reference.forward(
        x,
        w,
        b,
        axis=axis,
        training=False,
        running_mean=mean_ref.reshape(cs),
        running_var=var_ref.reshape(cs),
        eps=1e-5,
    )[0]
    np.testing.assert_allclose(y_np, y_all, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx_np[np.broadcast_to(~mask_x, shape)], 0.0, atol=1e-12)

    new = bn.update_running_stats(backend.asarray(rm), backend.asarray(rv), ctx)
    m = rows.shape[0]
    expected = (
        0.9 * rm + 0.1 * mean_ref.reshape(cs),
        0.9 * rv + 0.1 * var_ref.reshape(cs) * m / (m - 1),
    )
    for got, want in zip(new, expected, strict=True):
        assert_close(backend, got, want, like=xb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "axis"), [((3, 4, 2), -1), ((3, 2, 2, 2), 1)])
def test_masked_gradients_match_finite_differences_for_any_dy(backend, shape, axis):
    x, w, b, _, _ = make_params(shape, axis, seed=4)
    mask = make_mask(shape, axis, seed=5)
    probe = np.random.default_rng(6).normal(size=shape)  # nonzero at padding too
    mb = backend.asarray(mask)

    def loss(x, w, b):
        y, _ = bn.batch_norm_forward(
            *(backend.asarray(a) for a in (x, w, b)), axis=axis, mask=mb
        )
        return float(np.sum(probe * backend.to_numpy(y)))

    expected = numerical_gradients(loss, [x, w, b])
    _, ctx = bn.batch_norm_forward(
        *(backend.asarray(a) for a in (x, w, b)), axis=axis, mask=mb
    )
    actual = bn.batch_norm_backward(backend.asarray(probe), ctx)
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-6, atol=1e-7)


def test_an_all_true_mask_is_plain_batch_norm(backend):
    x, w, b, _, _ = make_params((5, 4, 3), -1, seed=7)
    dy = backend.asarray(np.random.default_rng(8).normal(size=x.shape))
    args = [backend.asarray(a) for a in (x, w, b)]
    y, ctx = bn.batch_norm_forward(*args, mask=backend.asarray(np.ones((5, 4), bool)))
    y0, ctx0 = bn.batch_norm_forward(*args)
    like = args[0]
    assert_close(backend, y, backend.to_numpy(y0), like=like, rtol=1e-13, atol=1e-13)
    for got, want in zip(
        bn.batch_norm_backward(dy, ctx), bn.batch_norm_backward(dy, ctx0), strict=True
    ):
        assert_close(
            backend, got, backend.to_numpy(want), like=like, rtol=1e-12, atol=1e-12
        )


def test_inference_normalizes_every_position_with_the_running_statistics(backend):
    x, w, b, rm, rv = make_params((4, 5, 3), -1, seed=9)
    args = [backend.asarray(a) for a in (x, w, b)]
    stats = {"running_mean": backend.asarray(rm), "running_var": backend.asarray(rv)}
    mask = backend.asarray(make_mask((4, 5, 3), -1))
    y, ctx = bn.batch_norm_forward(*args, training=False, mask=mask, **stats)
    y0, _ = bn.batch_norm_forward(*args, training=False, **stats)
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y0))
    assert ctx.mask is None


def test_layer_with_a_mask_equals_the_functional_api(backend):
    x, *_ = make_params((4, 6, 3), -1, seed=10)
    mask = backend.asarray(make_mask((4, 6, 3), -1, seed=11))
    layer = bn.BatchNorm(3, xp=backend.lib, device=backend.device, dtype=None)
    rm, rv = layer.running_mean, layer.running_var
    y = layer(backend.asarray(x), mask=mask)
    y_ref, ctx = bn.batch_norm_forward(
        backend.asarray(x), layer.weight, layer.bias, mask=mask
    )
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y_ref))
    expected = bn.update_running_stats(rm, rv, ctx, num_batches_tracked=1)
    np.testing.assert_array_equal(
        backend.to_numpy(layer.running_var), backend.to_numpy(expected[1])
    )
    dy = backend.asarray(np.ones(x.shape))
    np.testing.assert_array_equal(
        backend.to_numpy(layer.backward(dy)),
        backend.to_numpy(bn.batch_norm_backward(dy, ctx)[0]),
    )


def test_masks_under_jax_jit_keep_the_count_an_array():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x, w, b, rm, rv = make_params((4, 6, 3), -1, seed=12)
    mask = make_mask((4, 6, 3), -1, seed=13)
    dy = np.random.default_rng(14).normal(size=x.shape)

    def step(x, w, b, mask, dy, rm, rv):
        y, ctx = bn.batch_norm_forward(x, w, b, mask=mask)
        grads = bn.batch_norm_backward(dy, ctx)
        return y, grads, bn.update_running_stats(rm, rv, ctx)

    args = [jnp.asarray(a) for a in (x, w, b, mask, dy, rm, rv)]
    jitted = jax.jit(step)(*args)
    eager = step(*(np.asarray(a) for a in args))
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12
        )
    # jax.grad of a loss through the masked forward equals the explicit backward
    grad = jax.grad(lambda x: jnp.sum(step(x, *args[1:])[0] * args[4]))(args[0])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jitted[1][0]), atol=1e-10)


def test_masks_stay_lazy_on_dask():
    da = pytest.importorskip("dask.array")
    import dask

    def refuse(*args, **kwargs):
        msg = "a Dask graph was computed while it should only have been built"
        raise AssertionError(msg)

    x, *_ = make_params((6, 4, 3), -1, seed=15)
    mask = make_mask((6, 4, 3), -1, seed=16)
    xd, md = da.from_array(x, chunks=(3, 2, 3)), da.from_array(mask, chunks=(3, 2))
    with dask.config.set(scheduler=refuse):
        y, ctx = bn.batch_norm_forward(xd, mask=md)
        bn.batch_norm_backward(y, ctx)
        _new_mean, new_var = bn.update_running_stats(da.zeros(3), da.ones(3), ctx)
    y_ref, _, var = reference.forward(x[mask])
    np.testing.assert_allclose(y.compute()[mask], y_ref, rtol=1e-10, atol=1e-10)
    m = mask.sum()
    np.testing.assert_allclose(
        new_var.compute(), 0.9 + 0.1 * var * m / (m - 1), rtol=1e-12
    )


def test_lazy_backends_do_not_check_the_counted_values():
    da = pytest.importorskip("dask.array")
    x = da.from_array(np.arange(12.0).reshape(4, 3))
    mask = da.from_array(np.array([True, False, False, False]))
    _y, ctx = bn.batch_norm_forward(x, mask=mask)  # one counted value: no error
    np.testing.assert_array_equal(ctx.var.compute(), 0.0)
