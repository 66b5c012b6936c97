"""The CPU kernels' blocks and threads: every element once, results independent of
which thread took which block, errors and forks handled."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import array_api_compat.numpy as np_compat
import numpy as np
import pytest
from cases import kernel_inputs as _inputs
from cases import step_outputs as _run

from bnarray import _math
from bnarray._fast import _cpu, _numpy


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
