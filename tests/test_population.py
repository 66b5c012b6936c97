"""population_stats and BatchNorm.recompute_running_stats: the statistics of the
concatenation of all batches, every value counted once."""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close, assert_like

import bnarray as bn


def batches_of(shapes, *, seed=0, loc=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, scale, size=s) for s in shapes]


def make_layer(backend, num_features, **kwargs):
    kwargs.setdefault("dtype", backend.xp.float64)
    return bn.BatchNorm(num_features, xp=backend.lib, device=backend.device, **kwargs)


CASES = [
    # (shapes of the batches, axis): batches of unequal sizes, other axes differing
    ([(5, 3), (17, 3), (8, 3)], -1),
    ([(2, 3, 4, 4), (3, 3, 2, 5), (1, 3, 1, 1)], 1),
    ([(4, 2, 3), (6, 2, 3)], (1, 2)),
]


@pytest.mark.parametrize(("shapes", "axis"), CASES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_statistics_of_the_concatenation(backend, shapes, axis, unbiased):
    batches = batches_of(shapes)
    mean, var = bn.population_stats(
        [backend.asarray(b) for b in batches], axis=axis, unbiased=unbiased
    )
    kept = (axis,) if isinstance(axis, int) else axis
    kept = tuple(a % batches[0].ndim for a in kept)
    reduce = tuple(a for a in range(batches[0].ndim) if a not in kept)
    rows = np.concatenate(
        [np.moveaxis(b, kept, range(-len(kept), 0)).reshape(-1, *[b.shape[a] for a in kept])
         for b in batches]
    )  # fmt: skip
    like = backend.asarray(batches[0])
    assert_close(backend, mean, rows.mean(axis=0), like=like)
    assert_close(backend, var, rows.var(axis=0, ddof=1 if unbiased else 0), like=like)
    assert reduce  # the cases reduce over some axis


def test_batches_weigh_by_their_count_not_equally(backend):
    # One batch of 2 values at 0 and one of 6 values at 8: the pooled mean is 6,
    # an average of the batch means would be 4.
    batches = [np.zeros((2, 1)), np.full((6, 1), 8.0)]
    mean, var = bn.population_stats([backend.asarray(b) for b in batches])
    everything = np.concatenate(batches)
    assert_close(backend, mean, np.array([6.0]), like=mean)
    assert_close(backend, var, everything.var(axis=0, ddof=1), like=mean)


def test_float32_is_accurate_for_a_large_offset(backend):
    # Mean 1e4, spread 1: sums of squares of raw values would cancel in float32.
    batches = batches_of([(3000, 2)] * 4 + [(17, 2)], seed=5, loc=1e4, scale=1.0)
    mean, var = bn.population_stats([backend.asarray(b, np.float32) for b in batches])
    everything = np.concatenate(
        [b.astype(np.float32).astype(np.float64) for b in batches]
    )
    assert_close(
        backend, mean, everything.mean(axis=0), like=mean, dtype=backend.xp.float32,
        rtol=2e-7, atol=0,
    )  # fmt: skip
    assert_close(
        backend, var, everything.var(axis=0, ddof=1), like=mean,
        dtype=backend.xp.float32, rtol=1e-5, atol=0,
    )  # fmt: skip


def test_a_generator_is_consumed_once(backend):
    batches = batches_of([(4, 2)] * 3)
    mean, _ = bn.population_stats(backend.asarray(b) for b in batches)
    assert_close(backend, mean, np.concatenate(batches).mean(axis=0), like=mean)


@pytest.mark.parametrize("unbiased", [True, False])
def test_recompute_sets_the_pooled_statistics(backend, unbiased):
    batches = batches_of([(2, 3, 4, 4), (3, 3, 2, 5), (1, 3, 1, 1)], seed=2)
    layer = make_layer(backend, 3, axis=1, unbiased=unbiased)
    layer.load_state_dict({"running_mean": np.full(3, 9.0), "running_var": np.full(3, 9.0),
                           "num_batches_tracked": 40}, strict=False)  # fmt: skip
    weight = backend.to_numpy(layer.weight).copy()
    layer.eval().freeze()
    layer.recompute_running_stats([backend.asarray(b) for b in batches])
    rows = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 3) for b in batches])
    assert_close(backend, layer.running_mean, rows.mean(axis=0), like=layer.weight)
    expected_var = rows.var(axis=0, ddof=1 if unbiased else 0)
    assert_close(backend, layer.running_var, expected_var, like=layer.weight)
    assert layer.num_batches_tracked == 3
    assert not layer.training and layer.frozen  # mode and switch untouched
    np.testing.assert_array_equal(backend.to_numpy(layer.weight), weight)


def test_recompute_keeps_the_layer_dtype(backend):
    layer = make_layer(backend, 2, dtype=backend.xp.float32)
    layer.recompute_running_stats([backend.asarray(np.arange(8.0).reshape(4, 2))])
    assert_like(layer.running_mean, layer.weight)
    assert_like(layer.running_var, layer.weight)


def test_recompute_then_eval_normalizes_the_pooled_data(backend):
    batches = batches_of([(50, 2), (70, 2)], seed=4, loc=-2.0, scale=5.0)
    layer = make_layer(backend, 2, eps=0.0, unbiased=False)
    layer.recompute_running_stats([backend.asarray(b) for b in batches])
    y = backend.to_numpy(layer.eval()(backend.asarray(np.concatenate(batches))))
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), 1.0, rtol=1e-12)


def test_recompute_with_torch_tensors_that_require_grad():
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    layer = bn.BatchNorm(3, xp=torch, dtype=torch.float64)
    layer.recompute_running_stats([x * 2.0])
    assert not layer.running_mean.requires_grad
    assert not layer.running_var.requires_grad


def test_recompute_with_jax_under_x64():
    jnp = pytest.importorskip("jax.numpy")
    import jax

    jax.config.update("jax_enable_x64", True)
    batches = batches_of([(6, 2), (9, 2)], seed=7)
    layer = bn.BatchNorm(2, xp=jnp, dtype=jnp.float64)
    layer.recompute_running_stats(jnp.asarray(b) for b in batches)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(np.asarray(layer.running_var), everything.var(0, ddof=1),
                               rtol=1e-12)  # fmt: skip


def test_recompute_stays_lazy_with_dask():
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")

    def refuse(*args, **kwargs):
        raise AssertionError("computed")

    batches = batches_of([(10, 3), (7, 3)], seed=8)
    layer = bn.BatchNorm(3, xp=da)
    with dask.config.set(scheduler=refuse):
        layer.recompute_running_stats(da.from_array(b, chunks=(4, 2)) for b in batches)
    mean, var = dask.compute(layer.running_mean, layer.running_var)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, everything.var(axis=0, ddof=1), rtol=1e-12)
