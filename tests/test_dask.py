"""Dask: graphs stay lazy, results equal NumPy, a local cluster and many chunks on disk."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import reference
from cases import make_params

import bnarray as bn

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

EXAMPLE = Path(__file__).parents[1] / "examples" / "dask_out_of_core.py"


def _refuse_to_compute(*args, **kwargs):
    msg = "a Dask graph was computed while it should only have been built"
    raise AssertionError(msg)


def lazy_only():
    """Within this context any compute() (hidden or not) fails the test."""
    return dask.config.set(scheduler=_refuse_to_compute)


def chunked(a, chunks):
    return da.from_array(a, chunks=chunks)


def test_lazy_only_does_catch_a_compute():
    with lazy_only(), pytest.raises(AssertionError, match="computed"):
        da.ones(3).sum().compute()


@pytest.mark.parametrize(
    ("shape", "axis", "chunks"),
    [
        ((40, 3), -1, (7, 2)),
        ((8, 3, 6, 5), 1, (3, 2, 6, 2)),
        ((6, 5, 4, 3), -1, (2, 5, 2, 3)),
        # A reduced axis longer than the blocks of the generic sums (1024).
        ((3001, 3), -1, (700, 2)),
    ],
)
def test_forward_backward_update_build_graphs_without_computing(shape, axis, chunks):
    x, w, b, rm, rv = make_params(shape, axis, seed=1)
    dy = np.random.default_rng(2).normal(size=shape)
    cchunks = tuple(c for i, c in enumerate(chunks) if i == axis % len(shape))
    with lazy_only():
        xd, dyd = chunked(x, chunks), chunked(dy, chunks)
        wd, bd, rmd, rvd = (chunked(a, cchunks) for a in (w, b, rm, rv))
        y, ctx = bn.batch_norm_forward(xd, wd, bd, axis=axis)
        dx, dw, db = bn.batch_norm_backward(dyd, ctx)
        new_mean, new_var = bn.update_running_stats(rmd, rvd, ctx, momentum=0.1)
        y_eval, ctx_eval = bn.batch_norm_forward(
            xd,
            wd,
            bd,
            axis=axis,
            training=False,
            running_mean=new_mean,
            running_var=new_var,
        )
        dx_eval, _, _ = bn.batch_norm_backward(dyd, ctx_eval)
        outputs = [y, ctx.mean, ctx.var, dx, dw, db, new_mean, new_var, y_eval, dx_eval]
        for out in outputs:
            assert isinstance(out, da.Array)
    assert y.chunks == xd.chunks
    assert dx.chunks == xd.chunks

    (y, mean, var, dx, dw, db, new_mean, new_var, y_eval, dx_eval) = dask.compute(
        *outputs
    )
    y_ref, mean_ref, var_ref = reference.forward(x, w, b, axis=axis)
    grads_ref = reference.backward(dy, x, w, axis=axis)
    rm_ref, rv_ref = reference.update_running_stats(rm, rv, x, axis=axis, momentum=0.1)
    y_eval_ref, _, _ = reference.forward(
        x, w, b, axis=axis, training=False, running_mean=rm_ref, running_var=rv_ref
    )
    dx_eval_ref, _, _ = reference.backward(
        dy, x, w, axis=axis, training=False, running_mean=rm_ref, running_var=rv_ref
    )
    expected = [
        y_ref,
        mean_ref,
        var_ref,
        *grads_ref,
        rm_ref,
        rv_ref,
        y_eval_ref,
        dx_eval_ref,
    ]
    for got, want in zip(
        (y, mean, var, dx, dw, db, new_mean, new_var, y_eval, dx_eval),
        expected,
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_results_equal_the_numpy_backend_bit_for_bit_in_shape_and_dtype():
    x, w, b, _, _ = make_params((12, 4, 3), 1, seed=3)
    x32 = x.astype(np.float32)
    y_np, ctx_np = bn.batch_norm_forward(x32, w, b, axis=1)
    with lazy_only():
        y_da, ctx_da = bn.batch_norm_forward(
            chunked(x32, (5, 2, 3)), chunked(w, 2), chunked(b, 2), axis=1
        )
    assert y_da.dtype == np.float32
    assert y_da.shape == y_np.shape
    np.testing.assert_allclose(y_da.compute(), y_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ctx_da.var.compute(), ctx_np.var, rtol=1e-6)


def test_layer_training_stays_lazy_over_several_batches():
    layer = bn.BatchNorm(3, axis=1, xp=da)
    layer_np = bn.BatchNorm(3, axis=1, xp=np)
    with lazy_only():
        for step in range(3):
            x = np.random.default_rng(step).normal(step, 2.0, size=(10, 3, 4))
            y = layer(chunked(x, (4, 3, 2)))
            dx = layer.backward(chunked(np.ones_like(x), (4, 3, 2)))
            layer_np(x)
            layer_np.backward(np.ones_like(x))
        assert isinstance(layer.running_var, da.Array)
    assert layer.num_batches_tracked == 3
    np.testing.assert_allclose(
        layer.running_mean.compute(), layer_np.running_mean, rtol=1e-12
    )
    np.testing.assert_allclose(
        layer.running_var.compute(), layer_np.running_var, rtol=1e-12
    )
    np.testing.assert_allclose(
        layer.grad_weight.compute(), layer_np.grad_weight, atol=1e-10
    )
    assert y.shape == dx.shape == (10, 3, 4)


def test_unknown_chunk_sizes_are_a_clear_error():
    x = chunked(np.random.default_rng(4).normal(size=(20, 3)), (5, 3))
    filtered = x[x[:, 0] > 0]  # rows unknown until computed
    with lazy_only(), pytest.raises(ValueError, match="known shape"):
        bn.batch_norm_forward(filtered)
    filtered = filtered.compute_chunk_sizes()
    y, _ = bn.batch_norm_forward(filtered)
    y_ref, _, _ = reference.forward(filtered.compute())
    np.testing.assert_allclose(y.compute(), y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("transpose", "axis"), [(False, 0), (True, 1), (True, -1)], ids=str
)
def test_unknown_size_along_the_channel_axis_is_a_clear_error(transpose, axis):
    x = chunked(np.random.default_rng(5).normal(size=(20, 3)), (5, 3))
    filtered = x[x[:, 0] > 0]  # shape (nan, 3)
    filtered = filtered.T if transpose else filtered
    shape = "(3, nan)" if transpose else "(nan, 3)"
    with (
        lazy_only(),
        pytest.raises(
            ValueError, match=rf"`x` must have a known shape, got {re.escape(shape)}"
        ),
    ):
        bn.batch_norm_forward(filtered, axis=axis)
    with lazy_only(), pytest.raises(ValueError, match="`x` must have a known shape"):
        bn.batch_norm_forward(
            filtered,
            axis=axis,
            training=False,
            running_mean=chunked(np.zeros(3), 3),
            running_var=chunked(np.ones(3), 3),
        )


@pytest.mark.parametrize(
    "layer_kwargs",
    [{}, {"affine": False, "track_running_stats": False}],
    ids=["with arrays", "without arrays"],
)
def test_layer_refuses_unknown_sizes_and_changes_nothing(layer_kwargs):
    layer = bn.BatchNorm(3, axis=0, xp=da, **layer_kwargs)
    x = chunked(np.random.default_rng(6).normal(size=(3, 20)), (3, 5))
    layer(x)
    filtered = x[:, x[0] > 0]  # shape (3, nan): the channels are known, the batch not
    channels_unknown = x.T[x[0] > 0]  # shape (nan, 20)
    before = [layer.running_mean, layer.running_var, layer.weight, layer.bias]
    for mode in (True, False):
        layer.train(mode)
        for bad in (filtered, channels_unknown):
            with (
                lazy_only(),
                pytest.raises(ValueError, match="`x` must have a known shape"),
            ):
                layer(bad)
    assert layer.num_batches_tracked == (1 if layer.track_running_stats else 0)
    after = [layer.running_mean, layer.running_var, layer.weight, layer.bias]
    assert all(a is b for a, b in zip(before, after, strict=True))


def test_backward_refuses_a_gradient_of_unknown_shape():
    x = chunked(np.random.default_rng(7).normal(size=(20, 3)), (5, 3))
    _, ctx = bn.batch_norm_forward(x)
    dy = x[x[:, 0] > 0]
    with lazy_only(), pytest.raises(ValueError, match="`dy` must have a known shape"):
        bn.batch_norm_backward(dy, ctx)


def test_mixing_numpy_and_dask_is_a_type_error():
    x = chunked(np.ones((4, 2)), 2)
    with pytest.raises(
        TypeError, match=r"`weight` is a numpy array but `x` is a dask array"
    ):
        bn.batch_norm_forward(x, np.ones(2))
    with pytest.raises(
        TypeError, match=r"`bias` is a dask array but `x` is a numpy array"
    ):
        bn.batch_norm_forward(np.ones((4, 2)), None, chunked(np.ones(2), 1))


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_statistics_on_a_local_cluster_of_two_processes(client):
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(64, 4, 8, 8))
    w, b = rng.normal(size=4), rng.normal(size=4)
    xd = chunked(x, (8, 4, 8, 8))  # 8 chunks along the batch
    start = time.perf_counter()
    y, ctx = bn.batch_norm_forward(xd, chunked(w, 4), chunked(b, 4), axis=1)
    new_mean, new_var = bn.update_running_stats(
        da.zeros(4, chunks=4),
        da.ones(4, chunks=4),
        ctx,
        momentum=None,
        num_batches_tracked=1,
    )
    futures = client.compute([y, ctx.mean, ctx.var, new_mean, new_var])
    y, mean, var, new_mean, new_var = client.gather(futures)
    assert time.perf_counter() - start < 30
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2
    y_ref, mean_ref, var_ref = reference.forward(x, w, b, axis=1)
    rm_ref, rv_ref = reference.update_running_stats(
        np.zeros(4), np.ones(4), x, axis=1, momentum=None, num_batches_tracked=1
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    np.testing.assert_allclose(new_mean, rm_ref, rtol=1e-12)
    np.testing.assert_allclose(new_var, rv_ref, rtol=1e-12)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dask_out_of_core", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_many_chunks_example_equals_normalizing_in_memory(example, tmp_path):
    x = example.make_dataset(tmp_path / "x", samples=6000, features=5, chunk=250)
    assert x.npartitions == 24
    mean, var = example.channel_statistics(x)
    y = example.normalize_dataset(x, tmp_path / "y", mean, var)
    assert sorted(p.name for p in (tmp_path / "y").iterdir())[:2] == ["0.npy", "1.npy"]
    x_np = np.asarray(x).astype(np.float64)
    y_ref, mean_ref, var_ref = reference.forward(x_np)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    assert y.dtype == np.float32
    np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-4)


def test_many_chunks_example_runs_as_a_script(example, capsys):
    example.main(["--samples", "4000", "--features", "3", "--chunk", "500"])
    out = capsys.readouterr().out
    assert "in 8 chunks" in out
    assert "normalized:" in out
