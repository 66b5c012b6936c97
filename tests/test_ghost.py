"""Ghost batch norm: contiguous chunks along the batch axis, each with its own statistics."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from cases import make_params
from checks import assert_close
from variant_helpers import along

import bnarray as bn

# (shape, channel axis, batch axis, ghost batch size): sizes that divide and
# sizes that leave a smaller last chunk (of one row, where rows hold several
# values per channel), NHWC and NCHW, a batch axis that is not the first.
GHOST_CASES = [
    ((12, 3), -1, 0, 4),
    ((8, 3), -1, 0, 3),
    ((7, 2, 3), -1, 0, 3),
    ((5, 3, 2, 2), 1, 0, 2),
    ((4, 5, 3), -1, 1, 2),
    ((6, 2, 3, 2), (1, 3), 0, 4),
]


def chunk_slices(length, size):
    return [slice(s, min(s + size, length)) for s in range(0, length, size)]


@pytest.mark.parametrize(("shape", "axis", "batch_axis", "size"), GHOST_CASES)
def test_ghost_batches_equal_a_loop_of_plain_batch_norm_over_the_chunks(
    backend, shape, axis, batch_axis, size
):
    x, w, b, _, _ = make_params(shape, axis, seed=3)
    dy = np.random.default_rng(4).normal(size=shape)
    xb = backend.asarray(x)
    y, ctx = bn.batch_norm_forward(
        xb,
        backend.asarray(w),
        backend.asarray(b),
        axis=axis,
        ghost_batch_size=size,
        batch_axis=batch_axis,
    )
    dx, dw, db = bn.batch_norm_backward(backend.asarray(dy), ctx)

    y_ref, dx_ref = np.empty(shape), np.empty(shape)
    dw_ref, db_ref = np.zeros_like(w), np.zeros_like(b)
    for part in chunk_slices(shape[batch_axis], size):
        index = along(batch_axis, part)
        y_ref[index] = reference.forward(x[index], w, b, axis=axis)[0]
        dx_k, dw_k, db_k = reference.backward(dy[index], x[index], w, axis=axis)
        dx_ref[index] = dx_k
        dw_ref += dw_k
        db_ref += db_k
    for got, want in [(y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)]:
        assert_close(backend, got, want, like=xb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("shape", "axis", "batch_axis", "size"), GHOST_CASES)
def test_running_statistics_are_updated_once_with_the_whole_batch(
    backend, shape, axis, batch_axis, size
):
    x, _w, _b, rm, rv = make_params(shape, axis, seed=5)
    xb = backend.asarray(x)
    _, ctx = bn.batch_norm_forward(
        xb, axis=axis, ghost_batch_size=size, batch_axis=batch_axis
    )
    _, mean, var = reference.forward(x, axis=axis)
    assert_close(backend, ctx.mean, mean, like=xb, rtol=1e-12, atol=1e-12)
    assert_close(backend, ctx.var, var, like=xb, rtol=1e-12, atol=1e-12)
    assert ctx.count == x.size // mean.size
    new = bn.update_running_stats(backend.asarray(rm), backend.asarray(rv), ctx)
    expected = reference.update_running_stats(rm, rv, x, axis=axis)
    for got, want in zip(new, expected, strict=True):
        assert_close(backend, got, want, like=xb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [8, 9, 100])
def test_a_ghost_batch_at_least_the_batch_is_plain_batch_norm_exactly(backend, size):
    x, w, b, _, _ = make_params((8, 4, 3), -1, seed=6)
    dy = backend.asarray(np.random.default_rng(7).normal(size=x.shape))
    xb, wb, bb = backend.asarray(x), backend.asarray(w), backend.asarray(b)
    y, ctx = bn.batch_norm_forward(xb, wb, bb, ghost_batch_size=size)
    y0, ctx0 = bn.batch_norm_forward(xb, wb, bb)
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y0))
    for got, want in zip(
        bn.batch_norm_backward(dy, ctx), bn.batch_norm_backward(dy, ctx0), strict=True
    ):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))


def test_a_ghost_batch_of_one_row_is_per_row_normalization(backend):
    x, *_ = make_params((3, 5, 2), -1, seed=8)
    y, _ = bn.batch_norm_forward(backend.asarray(x), ghost_batch_size=1)
    expected = np.concatenate([reference.forward(x[i : i + 1])[0] for i in range(3)])
    assert_close(backend, y, expected, like=backend.asarray(x), rtol=1e-10, atol=1e-10)


def test_inference_ignores_ghost_batches(backend):
    x, w, b, rm, rv = make_params((6, 3), -1, seed=9)
    args = [backend.asarray(a) for a in (x, w, b)]
    stats = {"running_mean": backend.asarray(rm), "running_var": backend.asarray(rv)}
    y, ctx = bn.batch_norm_forward(*args, training=False, ghost_batch_size=2, **stats)
    y0, _ = bn.batch_norm_forward(*args, training=False, **stats)
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y0))
    assert ctx.ghost_mean is None


def test_layer_with_ghost_batches_equals_the_functional_api(backend):
    x, w, b, _, _ = make_params((10, 3), -1, seed=10)
    dy = np.random.default_rng(11).normal(size=x.shape)
    layer = bn.BatchNorm(3, ghost_batch_size=4, xp=backend.lib, device=backend.device)
    layer.weight, layer.bias = backend.asarray(w), backend.asarray(b)
    rm, rv = layer.running_mean, layer.running_var
    y = layer(backend.asarray(x))
    dx = layer.backward(backend.asarray(dy))
    y_ref, ctx = bn.batch_norm_forward(
        backend.asarray(x), backend.asarray(w), backend.asarray(b), ghost_batch_size=4
    )
    dx_ref, dw_ref, _ = bn.batch_norm_backward(backend.asarray(dy), ctx)
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y_ref))
    np.testing.assert_array_equal(backend.to_numpy(dx), backend.to_numpy(dx_ref))
    np.testing.assert_array_equal(
        backend.to_numpy(layer.grad_weight), backend.to_numpy(dw_ref)
    )
    new_mean, _ = bn.update_running_stats(rm, rv, ctx, num_batches_tracked=1)
    np.testing.assert_array_equal(
        backend.to_numpy(layer.running_mean), backend.to_numpy(new_mean)
    )
    assert "ghost_batch_size=4" in repr(layer)
    layer.eval()
    assert_close(
        backend,
        layer(backend.asarray(x[:1])),
        reference.forward(
            x[:1],
            w,
            b,
            training=False,
            running_mean=backend.to_numpy(layer.running_mean),
            running_var=backend.to_numpy(layer.running_var),
        )[0],
        like=backend.asarray(x),
        rtol=1e-12,
        atol=1e-12,
    )


def test_ghost_batches_under_jax_jit_equal_eager():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x, w, b, _, _ = make_params((7, 4, 3), -1, seed=12)
    dy = np.random.default_rng(13).normal(size=x.shape)

    def step(x, w, b, dy):
        y, ctx = bn.batch_norm_forward(x, w, b, ghost_batch_size=3)
        return y, bn.batch_norm_backward(dy, ctx), ctx

    args = [jnp.asarray(a) for a in (x, w, b, dy)]
    eager = step(*args)
    jitted = jax.jit(step)(*args)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12
        )
    # jax.grad of the forward agrees with the explicit backward
    grad = jax.grad(lambda x: jnp.sum(step(x, *args[1:])[0] * args[3]))(args[0])
    np.testing.assert_allclose(np.asarray(grad), np.asarray(eager[1][0]), atol=1e-10)


def test_ghost_batches_stay_lazy_on_dask():
    da = pytest.importorskip("dask.array")
    import dask

    def refuse(*args, **kwargs):
        msg = "a Dask graph was computed while it should only have been built"
        raise AssertionError(msg)

    x, *_ = make_params((10, 3), -1, seed=14)
    xd = da.from_array(x, chunks=(4, 3))
    with dask.config.set(scheduler=refuse):
        y, ctx = bn.batch_norm_forward(xd, ghost_batch_size=4)
        _dx, _, _ = bn.batch_norm_backward(y, ctx)
        bn.update_running_stats(da.zeros(3), da.ones(3), ctx)
    np.testing.assert_allclose(
        y.compute()[:4], reference.forward(x[:4])[0], rtol=1e-10, atol=1e-10
    )
