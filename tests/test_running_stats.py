"""update_running_stats: PyTorch's convention, unbiased variance, cumulative average."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from cases import LAYOUTS, channel_shape, make_params
from checks import assert_close, assert_like

import bnarray as bn


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
def test_update_matches_reference(backend, shape, axis, momentum):
    x, _, _, rm, rv = make_params(shape, axis)
    _, ctx = bn.batch_norm_forward(backend.asarray(x), axis=axis)
    rmb, rvb = backend.asarray(rm), backend.asarray(rv)
    new_mean, new_var = bn.update_running_stats(rmb, rvb, ctx, momentum=momentum)
    mean_ref, var_ref = reference.update_running_stats(
        rm, rv, x, axis=axis, momentum=momentum
    )
    assert_close(backend, new_mean, mean_ref, like=rmb)
    assert_close(backend, new_var, var_ref, like=rvb)
    # the inputs are untouched and the results are new arrays
    np.testing.assert_array_equal(backend.to_numpy(rmb), rm)
    np.testing.assert_array_equal(backend.to_numpy(rvb), rv)


def test_running_var_uses_the_unbiased_estimator(backend):
    x = np.array([[1.0], [3.0]])  # biased var 1, unbiased var 2
    _, ctx = bn.batch_norm_forward(backend.asarray(x))
    _, new_var = bn.update_running_stats(
        backend.asarray(np.zeros(1)), backend.asarray(np.zeros(1)), ctx, momentum=1.0
    )
    assert_close(backend, new_var, np.array([2.0]), like=ctx.var)
    assert_close(backend, ctx.var, np.array([1.0]), like=ctx.var)


def test_momentum_none_is_the_cumulative_average(backend):
    rng = np.random.default_rng(0)
    batches = [rng.normal(i, 1.0 + i, size=(5 + i, 3)) for i in range(4)]
    mean = backend.asarray(np.zeros(3))
    var = backend.asarray(np.ones(3))
    for n, batch in enumerate(batches, start=1):
        _, ctx = bn.batch_norm_forward(backend.asarray(batch))
        mean, var = bn.update_running_stats(
            mean, var, ctx, momentum=None, num_batches_tracked=n
        )
    expected_mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    expected_var = np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0)
    assert_close(backend, mean, expected_mean, like=ctx.mean)
    assert_close(backend, var, expected_var, like=ctx.mean)


@pytest.mark.needs_float16
def test_result_has_the_running_stats_dtype(backend):
    x = np.random.default_rng(1).normal(size=(32, 2))
    _, ctx = bn.batch_norm_forward(backend.asarray(x, np.float16))
    rm = backend.asarray(np.zeros(2), np.float32)
    rv = backend.asarray(np.ones(2), np.float32)
    new_mean, new_var = bn.update_running_stats(rm, rv, ctx)
    assert_like(new_mean, rm)
    assert_like(new_var, rv)


def test_channel_shape_of_tuple_axis(backend):
    shape, axis = (4, 3, 5, 2), (3, 1)
    x, _, _, rm, rv = make_params(shape, axis)
    assert rm.shape == channel_shape(shape, axis) == (3, 2)
    _, ctx = bn.batch_norm_forward(backend.asarray(x), axis=axis)
    assert ctx.axis == (1, 3)
    new_mean, _ = bn.update_running_stats(backend.asarray(rm), backend.asarray(rv), ctx)
    assert tuple(new_mean.shape) == (3, 2)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
def test_biased_update_matches_reference(backend, shape, axis, momentum):
    x, _, _, rm, rv = make_params(shape, axis)
    _, ctx = bn.batch_norm_forward(backend.asarray(x), axis=axis)
    rmb, rvb = backend.asarray(rm), backend.asarray(rv)
    new_mean, new_var = bn.update_running_stats(
        rmb, rvb, ctx, momentum=momentum, num_batches_tracked=3, unbiased=False
    )
    mean_ref, var_ref = reference.update_running_stats(
        rm, rv, x, axis=axis, momentum=momentum, num_batches_tracked=3, unbiased=False
    )
    assert_close(backend, new_mean, mean_ref, like=rmb)
    assert_close(backend, new_var, var_ref, like=rvb)


def test_unbiased_false_keeps_the_batch_variance(backend):
    x = np.array([[1.0], [3.0]])  # biased var 1, unbiased var 2
    _, ctx = bn.batch_norm_forward(backend.asarray(x))
    _, new_var = bn.update_running_stats(
        backend.asarray(np.zeros(1)),
        backend.asarray(np.zeros(1)),
        ctx,
        momentum=1.0,
        unbiased=np.bool_(False),
    )
    assert_close(backend, new_var, np.array([1.0]), like=ctx.var)


@pytest.mark.parametrize("unbiased", [True, False])
def test_layer_passes_unbiased_to_the_update(backend, unbiased):
    rng = np.random.default_rng(3)
    batches = [rng.normal(1.0, 2.0, size=(6, 2)) for _ in range(3)]
    layer = bn.BatchNorm(
        2, momentum=0.3, unbiased=unbiased, xp=backend.lib, dtype=backend.xp.float64,
        device=backend.device,
    )  # fmt: skip
    mean, var = np.zeros(2), np.ones(2)
    for batch in batches:
        layer(backend.asarray(batch))
        mean, var = reference.update_running_stats(
            mean, var, batch, momentum=0.3, unbiased=unbiased
        )
    assert_close(backend, layer.running_mean, mean, like=layer.running_mean)
    assert_close(backend, layer.running_var, var, like=layer.running_var)
