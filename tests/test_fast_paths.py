"""The NumPy fast paths (with and without Numba) give what the generic array-API path gives."""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
import warnings

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

import bnarray as bn
from bnarray import _math
from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV, _cpu, _numpy, kernels_for, plan

HAVE_NUMBA = importlib.util.find_spec("numba") is not None

# (shape, axis): 2-D to 5-D, channels first and last, negative and tuple axes,
# sizes that are not multiples of the block size, more than one block per
# thread, a row longer than a block (channels first and last), small images
# (few values per channel in a row; few and many channels), and layouts that
# fall back to _math.
LAYOUTS = [
    ((1000, 7), -1),
    ((40_000, 7), -1),
    ((7, 1001), 0),
    ((300, 5), 1),
    ((5, 37, 301), 1),
    ((129, 11, 3), -1),
    ((3, 37, 41, 43), 1),
    ((3, 41, 43, 37), -1),
    ((3, 41, 43, 38), -1),
    ((3, 37, 41, 43), -3),
    ((2, 5, 7, 9, 11), 1),
    ((2, 7, 9, 11, 5), -1),
    ((2, 3, 140_001), 1),
    ((64, 9, 3, 3), 1),
    ((50, 300, 2, 2), 1),
    ((4, 2000, 2, 2), 1),
    ((8, 5, 6, 3), (1, 2)),
    ((3, 140_001), -1),
    ((4, 5, 6, 70), (1, 2)),
    ((4, 5, 6, 70), (0, 2)),
    ((4, 5, 6, 70), (-3, -1)),
]
DTYPES = [np.float64, np.float32, np.float16]
# |fast - generic| <= TOL * max|generic| per output: a few roundings of the dtype.
TOL = {np.float64: 1e-11, np.float32: 1e-5, np.float16: 4e-3}


@pytest.fixture(params=["numba", "numpy"])
def numpy_kernels(request, monkeypatch):
    """The NumPy kernels that serve the test: the Numba loops (where Numba is
    installed) or the NumPy-only ones (``BNARRAY_NUMBA=0``)."""
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    if request.param == "numba":
        if not HAVE_NUMBA:
            pytest.skip("Numba is not installed (pip install bnarray[numba])")
        from bnarray._fast import _numba as kernels

        monkeypatch.delenv(NUMBA_ENV, raising=False)
    else:
        kernels = _numpy
        monkeypatch.setenv(NUMBA_ENV, "0")
    assert kernels_for(np_compat) is kernels
    return kernels


def _channel_shape(shape, axis):
    kept = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in kept)


def _inputs(shape, axis, dtype, *, seed=0):
    rng = np.random.default_rng(seed)
    cs = _channel_shape(shape, axis)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, cs).astype(dtype)
    b = rng.standard_normal(cs).astype(dtype)
    rm = rng.standard_normal(cs).astype(dtype)
    rv = rng.uniform(0.5, 2.0, cs).astype(dtype)
    return x, dy, w, b, rm, rv


def _run(x, dy, w, b, rm, rv, *, axis, training):
    kwargs = (
        {} if training else {"training": False, "running_mean": rm, "running_var": rv}
    )
    y, ctx = bn.batch_norm_forward(x, w, b, axis=axis, **kwargs)
    dx, dw, db = bn.batch_norm_backward(dy, ctx)
    out = {"y": y, "mean": ctx.mean, "var": ctx.var, "dx": dx, "dw": dw, "db": db}
    if training and rm is not None:
        out["running_mean"], out["running_var"] = bn.update_running_stats(rm, rv, ctx)
    return out


def _assert_matches(fast, generic, dtype):
    for name, expected in generic.items():
        actual = fast[name]
        assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        scale = max(float(np.max(np.abs(e))), 1e-30)
        err = float(np.max(np.abs(a - e))) / scale
        assert err <= TOL[dtype], (name, err)


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
    ("shape", "axis"), [((5, 37, 301), 1), ((129, 11, 3), -1), ((2, 3, 140_001), 1)]
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


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 37, 4099), 1), ((9000, 61), -1), ((1000, 16, 3, 3), 1)]
)
def test_any_number_of_threads_gives_the_same_outputs_every_time(
    numpy_kernels, monkeypatch, threads, shape, axis
):
    # The runs of blocks go to whichever thread is free: every element must be
    # written once, with the generic path's roundings, and the sums must not
    # depend on which thread took which run.
    monkeypatch.setattr(_cpu, "num_threads", lambda: threads)
    x, dy, *_ = _inputs(shape, axis, np.float32)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mean, var = _math.batch_stats(x, reduce_axes, xp=np_compat)
    scale = 1 / np.sqrt(var + 1e-5)

    def outputs():
        return [
            *numpy_kernels.batch_stats(x, reduce_axes, xp=np_compat),
            *numpy_kernels.grad_sums(dy, x, mean, reduce_axes, xp=np_compat),
            numpy_kernels.normalize(x, mean, scale, mean, xp=np_compat),
            numpy_kernels.grad_input(dy, x, mean, scale, scale, mean, xp=np_compat),
        ]

    first = outputs()
    for _ in range(4):
        for a, b in zip(outputs(), first, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        first[4], _math.normalize(x, mean, scale, mean, xp=np_compat)
    )
    np.testing.assert_array_equal(
        first[5], _math.grad_input(dy, x, mean, scale, scale, mean, xp=np_compat)
    )
    expected = [
        mean,
        var,
        *_math.grad_sums(dy, x, mean, reduce_axes, xp=np_compat),
    ]
    for a, e in zip(first[:4], expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))


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


@pytest.mark.skipif(not HAVE_NUMBA, reason="Numba is not installed")
def test_float16_goes_to_the_numpy_kernels_without_hardware_conversion(monkeypatch):
    from bnarray._fast import _numba

    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    x16 = np.ones((4, 3), np.float16)
    assert plan(x16, (1,), np_compat).kernels is _numba
    monkeypatch.setattr(_numba, "HARDWARE_HALF", False)
    assert plan(x16, (1,), np_compat).kernels is _numpy
    assert plan(x16.astype(np.float32), (1,), np_compat).kernels is _numba


@pytest.mark.parametrize(
    ("make", "kept"),
    [
        (lambda x: x, (1,)),
        (lambda x: x[:, :3], (1,)),
        (lambda x: x[::-1], (1,)),
        (lambda x: np.asfortranarray(x), (1,)),
        (lambda x: np.broadcast_to(x[:1], x.shape), (1,)),
    ],
    ids=["contiguous", "column slice", "reversed", "transposed", "broadcast"],
)
def test_the_plan_gives_the_cpu_kernels_one_contiguous_copy_of_any_strided_layout(
    numpy_kernels, make, kept
):
    x = make(np.arange(40.0).reshape(10, 4))
    dy = np.flip(np.ones((10, 4)))[:, : x.shape[1]]
    run = plan(x, kept, np_compat, dy)
    assert run.kernels is kernels_for(np_compat)
    assert run.x.flags.c_contiguous and run.dy.flags.c_contiguous
    np.testing.assert_array_equal(run.x, x)
    np.testing.assert_array_equal(run.dy, dy)
    assert (run.x is x) == x.flags.c_contiguous  # a copy only where needed


@pytest.mark.parametrize(
    ("x", "kept"),
    [
        (np.ones((3, 4, 5)), (0, 2)),  # channel axes not adjacent
        (np.ones((0, 4)), (1,)),  # empty
        (np.ones((5, 4), dtype=">f8"), (1,)),  # not of native byte order
    ],
)
def test_the_plan_sends_what_the_cpu_loops_cannot_take_to_the_generic_kernels(
    numpy_kernels, x, kept
):
    assert plan(x, kept, np_compat).kernels is _math


def test_numpy_arrays_get_the_numba_kernels_where_numba_is_installed(monkeypatch):
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    kernels = kernels_for(np_compat)
    assert kernels.__name__ == f"bnarray._fast.{'_numba' if HAVE_NUMBA else '_numpy'}"
    monkeypatch.setenv(FORCE_GENERIC_ENV, "0")
    assert kernels_for(np_compat) is kernels


@pytest.mark.skipif(not HAVE_NUMBA, reason="Numba is not installed")
def test_an_unusable_numba_warns_and_numpy_arrays_take_the_numpy_kernels(monkeypatch):
    import sys

    from bnarray import _fast

    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    # As if importing the Numba kernels failed (say, Numba too old for NumPy).
    monkeypatch.setitem(sys.modules, "bnarray._fast._numba", None)
    monkeypatch.delattr(_fast, "_numba", raising=False)
    _fast._numba_kernels.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning, match="Numba is installed but bnarray cannot"
        ):
            assert kernels_for(np_compat) is _numpy
    finally:
        _fast._numba_kernels.cache_clear()


def test_environment_variable_turns_numba_off(monkeypatch):
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.setenv(NUMBA_ENV, "0")
    assert kernels_for(np_compat) is _numpy


def test_environment_variable_forces_the_generic_kernels(monkeypatch):
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    assert kernels_for(np_compat) is _math


def test_other_namespaces_get_the_generic_kernels(monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    assert kernels_for(strict) is _math


@pytest.mark.parametrize(
    "shape",
    [(3, 37, 1763), (12_000, 37, 1), (2, 3, 140_001), (1, 1, 5), (5, 300_000, 1)],
)
def test_blocks_tile_the_array_exactly_once(shape):
    covered = np.zeros(shape, dtype=np.int8)
    for box in _cpu.blocks(shape):
        covered[box] += 1
    assert (covered == 1).all()


THREADED_SHAPE = (64, 37, 4096)  # 64 blocks: 16 runs over 4 threads


def test_threads_return_the_partial_results_in_the_order_of_the_blocks(monkeypatch):
    monkeypatch.setattr(_cpu, "num_threads", lambda: 4)
    threads = set()

    def work(blocks):
        threads.add(threading.get_ident())
        time.sleep(0.002 * (blocks[0][0].start % 3))  # finish out of order
        return blocks

    runs = _numpy._run(work, THREADED_SHAPE)
    assert len(runs) == 16
    assert [box for run in runs for box in run] == _cpu.blocks(THREADED_SHAPE)
    assert len(threads) > 1


def test_the_caller_does_not_wait_for_pool_threads_that_start_too_late(
    numpy_kernels, monkeypatch
):
    # A pool whose threads start only after the call has returned: the calling
    # thread does all the work, and the late threads then find nothing to do.
    class LatePool:
        def __init__(self):
            self.tasks = []

        def submit(self, fn):
            self.tasks.append(fn)

    pool = LatePool()
    monkeypatch.setattr(_cpu, "executor", lambda: pool)
    monkeypatch.setattr(_cpu, "num_threads", lambda: 4)
    x = _inputs((6, 37, 4099), 1, np.float32)[0]
    mean, var = _math.batch_stats(x, (0, 2), xp=np_compat)
    y = numpy_kernels.normalize(x, mean, var, mean, xp=np_compat)
    np.testing.assert_array_equal(y, _math.normalize(x, mean, var, mean, xp=np_compat))
    assert len(pool.tasks) == 3
    before = y.copy()
    for task in pool.tasks:
        task()  # returns at once, without writing anything
    np.testing.assert_array_equal(y, before)

    calls = []
    runs = _numpy._run(
        lambda blocks: calls.append(blocks) or len(blocks), (6, 37, 4099)
    )
    assert sum(runs) == len(_cpu.blocks((6, 37, 4099)))
    for task in pool.tasks[3:]:
        task()
    assert len(calls) == len(runs)


@pytest.mark.parametrize("failing_thread", ["calling", "pool"])
def test_an_error_in_any_thread_reaches_the_caller_once_every_thread_is_done(
    monkeypatch, failing_thread
):
    monkeypatch.setattr(_cpu, "num_threads", lambda: 4)
    caller = threading.get_ident()
    lock = threading.Lock()
    pool_started = threading.Event()
    failed = []
    finished = []

    def work(blocks):
        in_caller = threading.get_ident() == caller
        if in_caller:  # make sure the pool takes runs too, however busy the machine
            pool_started.wait(timeout=10)
        else:
            pool_started.set()
        with lock:
            fail = not failed and in_caller == (failing_thread == "calling")
            if fail:
                failed.append(blocks)
        if fail:
            msg = "boom"
            raise RuntimeError(msg)
        time.sleep(0.005)
        finished.append(blocks)

    with pytest.raises(RuntimeError, match="boom"):
        _numpy._run(work, THREADED_SHAPE)
    assert len(finished) == 15  # no thread still works after the error is raised


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fast_path_works_in_a_forked_child(numpy_kernels):
    x, dy, w, b, rm, rv = _inputs((3, 37, 41, 43), 1, np.float32)
    expected = _run(x, dy, w, b, rm, rv, axis=1, training=True)  # starts the threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        # JAX, when loaded in the same run, warns from its own at-fork hook;
        # the child here uses NumPy only.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = False
        try:
            out = _run(x, dy, w, b, rm, rv, axis=1, training=True)
            ok = all(np.array_equal(out[k], expected[k]) for k in expected)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish: its thread pool is stale")
    assert os.WIFEXITED(status), status
    assert os.WEXITSTATUS(status) == 0
