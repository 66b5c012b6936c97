"""CuPy on a GPU: results stay on the input's device and nothing is copied to the host."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

import bnarray as bn

cupy = pytest.importorskip("cupy")
if not cupy.is_available():
    # CuPy wheels import without a GPU; only creating an array fails.
    pytest.skip(
        "CuPy is installed but no CUDA GPU is usable here (cupy.is_available() is False)",
        allow_module_level=True,
    )
cupyx = pytest.importorskip("cupyx")


def params(shape=(16, 4, 5, 5), seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (
        rng.normal(2.0, 3.0, size=shape),
        rng.normal(1.0, 0.5, size=c),
        rng.normal(0.0, 0.5, size=c),
        rng.normal(size=shape),
    )


def run_all(x, w, b, dy, rm, rv):
    y, ctx = bn.batch_norm_forward(x, w, b, axis=1)
    grads = bn.batch_norm_backward(dy, ctx)
    stats = bn.update_running_stats(rm, rv, ctx, momentum=0.1)
    y_eval, _ = bn.batch_norm_forward(
        x, w, b, axis=1, training=False, running_mean=stats[0], running_var=stats[1]
    )
    return (y, ctx.mean, ctx.var, *grads, *stats, y_eval)


@pytest.mark.parametrize(
    ("dtype", "tol"), [("float64", 1e-12), ("float32", 1e-5), ("float16", 2e-2)]
)
def test_results_are_on_the_gpu_and_equal_numpy(dtype, tol):
    x, w, b, dy = params()
    x, dy = x.astype(dtype), dy.astype(dtype)
    rm, rv = np.zeros(4), np.ones(4)
    expected = run_all(x, w, b, dy, rm, rv)
    on_gpu = [cupy.asarray(a) for a in (x, w, b, dy, rm, rv)]
    results = run_all(*on_gpu)
    for got, want in zip(results, expected, strict=True):
        assert isinstance(got, cupy.ndarray)
        assert got.device == on_gpu[0].device
        assert got.dtype == want.dtype
        np.testing.assert_allclose(
            cupy.asnumpy(got).astype(np.float64),
            want.astype(np.float64),
            rtol=tol,
            atol=tol,
        )


@contextlib.contextmanager
def no_host_sync():
    # cupyx.allow_synchronize is deprecated, with a warning, because it cannot
    # see every synchronization; it still sees the device-to-host copies.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "cupyx.allow_synchronize", UserWarning)
        with cupyx.allow_synchronize(False):
            yield


def test_nothing_synchronizes_with_the_host():
    # A device-to-host copy (``.get()``, ``float()``, ``bool()`` on an array)
    # synchronizes; cupyx.allow_synchronize(False) turns that into an error.
    arrays = [cupy.asarray(a, dtype=cupy.float32) for a in params()]
    rm, rv = cupy.zeros(4, dtype=cupy.float32), cupy.ones(4, dtype=cupy.float32)
    run_all(*arrays, rm, rv)  # compile the kernels first
    cupy.cuda.Device().synchronize()
    with no_host_sync():
        run_all(*arrays, rm, rv)
        layer = bn.BatchNorm(4, axis=1, xp=cupy, dtype=cupy.float32)
        layer(arrays[0])
        layer.backward(arrays[3])
        layer.eval()(arrays[0])
    with pytest.raises(cupyx.DeviceSynchronized), no_host_sync():
        arrays[0].get()


def test_layer_on_the_gpu_trains_like_the_numpy_layer():
    layer = bn.BatchNorm(4, axis=1, xp=cupy, dtype=cupy.float64)
    layer_np = bn.BatchNorm(4, axis=1, xp=np, dtype=np.float64)
    for step in range(3):
        x, _, _, dy = params(seed=step)
        layer(cupy.asarray(x))
        layer.backward(cupy.asarray(dy))
        layer_np(x)
        layer_np.backward(dy)
    for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        got = getattr(layer, name)
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_allclose(
            cupy.asnumpy(got), getattr(layer_np, name), rtol=1e-10
        )


def test_mixing_numpy_and_cupy_is_a_type_error():
    x, w, _, _ = params()
    with pytest.raises(
        TypeError, match=r"`weight` is a numpy array but `x` is a cupy array"
    ):
        bn.batch_norm_forward(cupy.asarray(x), w, axis=1)


def two_gpus():
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")


def test_arrays_on_two_gpus_are_a_device_error():
    two_gpus()
    x, w, _, _ = params()
    with cupy.cuda.Device(0):
        x0 = cupy.asarray(x)
    with cupy.cuda.Device(1):
        w1 = cupy.asarray(w)
    with pytest.raises(ValueError, match="device"):
        bn.batch_norm_forward(x0, w1, axis=1)


def test_results_stay_on_the_second_gpu():
    two_gpus()
    x, w, b, dy = params()
    with cupy.cuda.Device(1):
        arrays = [cupy.asarray(a) for a in (x, w, b, dy, np.zeros(4), np.ones(4))]
        # CuPy launches kernels on the current device: compute where the data is.
        results = run_all(*arrays)
    for got in results:
        assert got.device.id == 1
