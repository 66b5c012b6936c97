"""NumPy kernels: cache-blocked, multi-threaded versions of the four generic full-size kernels."""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import _math
from .._compat import Array, Namespace
from .._math import backward_scales, forward_scales, running_update

# The per-channel arithmetic (backward_scales, forward_scales, running_update)
# has nothing to gain on the CPU: the generic one serves.
__all__ = [
    "backward_scales",
    "batch_stats",
    "forward_scales",
    "grad_input",
    "grad_sums",
    "normalize",
    "running_update",
]

# Elements per block. A block of x, its float32/float64 scratch copy and the
# matching block of dy or y stay within a 1 MiB L2 cache, so every pass after
# the first read of a block runs from cache: each kernel moves each full-size
# array through main memory once.
_BLOCK_ELEMENTS = 1 << 17

# Arrays smaller than this many elements run on the calling thread only.
_THREADED_MIN_ELEMENTS = 1 << 17

# Runs of consecutive blocks per thread (for load balance).
_RUNS_PER_THREAD = 4

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _einsum_vecdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.einsum("...i,...i->...", a, b)
    return out


# np.vecdot (NumPy >= 2.0) calls BLAS dot on each contiguous row.
_vecdot: Callable[[np.ndarray, np.ndarray], np.ndarray] = getattr(
    np, "vecdot", _einsum_vecdot
)

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _num_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        # A forked child inherits the pool object but not its threads: make a new one.
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(_num_threads(), thread_name_prefix="bnarray")
            _pool_pid = os.getpid()
        return _pool


def _view3(x: np.ndarray, channel_shape: tuple[int, ...]) -> np.ndarray | None:
    """`x` as a C-contiguous (A, C, B) array with the channels in the middle, or None.

    `channel_shape` is the broadcast shape of a per-channel array. NCHW
    (axis=1) gives (N, C, H·W), NHWC (axis=-1) gives (N·H·W, C, 1): a view of a
    C-contiguous `x`, else of a C-contiguous copy (a column slice, a reversed,
    transposed or broadcast view; one more read and write of `x`, never a
    write into it). None, for the generic kernels, where the channel axes are
    not adjacent or `x` is empty or of a byte order or dtype the loops do not
    take.
    """
    if x.dtype not in _FLOATS or len(channel_shape) != x.ndim or x.size == 0:
        return None
    kept = [a for a, n in enumerate(channel_shape) if n != 1]
    if kept and kept[-1] + 1 - kept[0] != len(kept):
        return None
    x = np.ascontiguousarray(x)  # `x` itself where it is C-contiguous already
    if not kept:
        return x.reshape(1, 1, x.size)
    first, last = kept[0], kept[-1] + 1
    a = math.prod(x.shape[:first])
    c = math.prod(x.shape[first:last])
    return x.reshape(a, c, x.size // (a * c))


def _channel_shape(x: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if a in reduce_axes else n for a, n in enumerate(x.shape))


def _block_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Extents of the boxes of about `_BLOCK_ELEMENTS` that tile an (A, C, B) array."""
    a, c, b = shape
    if b >= _BLOCK_ELEMENTS:
        nb = -(-b // _BLOCK_ELEMENTS)
        return 1, 1, -(-b // nb)
    cc = max(1, min(c, _BLOCK_ELEMENTS // b))
    cc = -(-c // -(-c // cc))  # equal chunks: no thin last chunk
    ca = max(1, _BLOCK_ELEMENTS // (cc * b)) if cc == c else 1
    return min(ca, a), cc, b


def _blocks(shape: tuple[int, int, int]) -> list[tuple[slice, slice, slice]]:
    """The boxes tiling an (A, C, B) array, in memory order."""
    a, c, b = shape
    ca, cc, cb = _block_shape(shape)
    return [
        (slice(i, min(i + ca, a)), slice(j, min(j + cc, c)), slice(k, min(k + cb, b)))
        for i in range(0, a, ca)
        for j in range(0, c, cc)
        for k in range(0, b, cb)
    ]


# Channels-first arrays with few values per channel in a row (small images:
# B at most 16, C·B at most 4096) are summed as (A, C·B, 1), rows of C·B
# values with each channel's values B columns apart, and the columns of a
# channel added at the end: summing C·B rows of B values is several times
# slower (3x here for 1024×512×2×2; the Numba loops, 3-6x for 2×2 and 3×3).
_ROWS_MAX_B = 16
_ROWS_MAX_WIDTH = 4096


def _row_repeat(shape: tuple[int, int, int]) -> int:
    """For an (A, C, B) array read as rows of C·B values, B: 1 for channels-last
    arrays, B for small images; 0 for the other channels-first arrays."""
    _, c, b = shape
    return b if b == 1 or (b <= _ROWS_MAX_B and c * b <= _ROWS_MAX_WIDTH) else 0


def _as_rows(x3: np.ndarray) -> tuple[np.ndarray, int]:
    """`x3` as the reductions read it, and the columns per channel (see `_row_repeat`)."""
    r = _row_repeat(x3.shape)
    if r <= 1:
        return x3, 1
    a, c, b = x3.shape
    return x3.reshape(a, c * b, 1), r


def _fold_columns(sums: np.ndarray, r: int) -> np.ndarray:
    """Per-channel sums from the sums of (A, C·r, 1) columns."""
    if r <= 1:
        return sums
    folded: np.ndarray = sums.reshape(2, -1, r).sum(axis=2)
    return folded


def _split(blocks: list[Any], n: int) -> Iterator[list[Any]]:
    size = -(-len(blocks) // n)
    for i in range(0, len(blocks), size):
        yield blocks[i : i + size]


def _thread_count(
    shape: tuple[int, int, int], blocks: int, *, threads: int | None = None
) -> int:
    """Threads for an (A, C, B) array of `blocks` blocks, of `threads` (default
    `_num_threads()`) at most: one for small arrays."""
    if shape[0] * shape[1] * shape[2] < _THREADED_MIN_ELEMENTS:
        return 1
    return min(threads or _num_threads(), blocks)


def _on_threads(body: Callable[[], None], n: int) -> None:
    """Call `body` on the calling thread and on ``n - 1`` threads of the pool.

    `body` must take its work from a queue shared by the threads and return
    when the queue is empty. The calling thread starts at once; a pool thread
    that wakes up after the calling thread has emptied the queue returns
    without calling `body`, and the calling thread does not wait for it, only
    for the pool threads still in `body`. An error in any thread is raised
    once none of them is in `body`: none is still writing the caller's arrays.
    """
    if n == 1:
        body()
        return
    done = threading.Condition()
    closed = False
    running = 0
    errors: list[BaseException] = []

    def helper() -> None:
        nonlocal running
        with done:
            if closed:
                return
            running += 1
        try:
            body()
        except BaseException as error:  # raised in the calling thread
            errors.append(error)
        finally:
            with done:
                running -= 1
                done.notify_all()

    for _ in range(n - 1):
        _executor().submit(helper)
    try:
        body()
    finally:
        with done:
            closed = True
            done.wait_for(lambda: running == 0)
    if errors:
        raise errors[0]


def _run(
    work: Callable[[list[tuple[slice, slice, slice]]], Any],
    shape: tuple[int, int, int],
) -> list[Any]:
    """Run `work` over the blocks of an (A, C, B) array, split among threads.

    NumPy's ufuncs and BLAS release the GIL, so the threads stream their
    blocks in parallel. The blocks are dealt in a few runs of consecutive
    blocks per thread, each taken by whichever thread is free, so a thread
    slowed by other work on the machine does not hold up the rest; the partial
    results come back in the order of the runs.
    """
    blocks = _blocks(shape)
    n = _thread_count(shape, len(blocks))
    if n == 1:
        return [work(blocks)]
    runs = list(_split(blocks, _RUNS_PER_THREAD * n))
    results: list[Any] = [None] * len(runs)
    taken = itertools.count()
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                i = next(taken)
            if i >= len(runs):
                return
            results[i] = work(runs[i])

    _on_threads(drain, n)
    return results


def _per_channel(v: Array, shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """A per-channel array, ready to combine with the blocks of an (A, C, B) array.

    Index it with :func:`_at`. Where it costs little memory, the values are
    repeated to the extent of a block: NumPy runs a binary ufunc on two
    contiguous operands about twice as fast as on a row and a per-row scalar
    (NCHW) or on short rows and a broadcast row (NHWC).
    """
    a, c, b = shape
    values = np.asarray(v, dtype=dtype).reshape(1, c, 1)
    ca, _, cb = _block_shape(shape)
    if cb != b or ca * c * b > max(_BLOCK_ELEMENTS, a * c * b // 16):
        return values
    return np.ascontiguousarray(np.broadcast_to(values, (ca, c, b)))


def _at(values: np.ndarray, ia: slice, ic: slice) -> np.ndarray:
    """The part of a :func:`_per_channel` array that matches block ``[ia, ic]``."""
    return values[: ia.stop - ia.start, ic]


def _scratch(dtype: np.dtype, size: int) -> np.ndarray:
    """A block buffer, no larger than the array it serves (small batches are common)."""
    return np.empty(min(_BLOCK_ELEMENTS, size), dtype=dtype)


def _as(buf: np.ndarray, like: np.ndarray) -> np.ndarray:
    return buf[: like.size].reshape(like.shape)


# Rows per BLAS sum of a channels-last block. A float32 matrix-vector product
# adds a narrow matrix's columns nearly one value after another: Σd² over the
# 64K rows of a 2-channel block came out 3e-5 off, over 4096 rows still 1e-5
# (data of mean/std 1e5); over 512 rows, the block's sums added in float64,
# the variance is within 3e-7, at the same speed (the stacked products are one
# NumPy call).
_SUM_ROWS = 512


def _column_sums(d: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Column sums of a float32/float64 (a, c) array, as float64 (c,)."""
    a, c = d.shape
    full = a - a % _SUM_ROWS
    sums: np.ndarray
    if full == 0:
        sums = (ones[:a] @ d).astype(np.float64)
        return sums
    sums = (ones[:_SUM_ROWS] @ d[:full].reshape(-1, _SUM_ROWS, c)).sum(
        axis=0, dtype=np.float64
    )
    if full < a:
        sums += ones[: a - full] @ d[full:]
    return sums


def _sums(d: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Per-channel sums of a float32/float64 (a, c, b) block, as (c,).

    A matrix-vector product with a vector of ones: BLAS sums several times
    faster than ``np.sum`` over these strided boxes.
    """
    a, c, b = d.shape
    if b == 1:
        return _column_sums(d.reshape(a, c), ones)
    sums: np.ndarray = (d @ ones[:b]).sum(axis=0)
    return sums


def _dots(d: np.ndarray, e: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Per-channel sums of ``d * e`` of two (a, c, b) blocks, as (c,); may overwrite `d`."""
    a, c, b = d.shape
    if b == 1:
        np.multiply(d, e, out=d)
        return _column_sums(d.reshape(a, c), ones)
    sums: np.ndarray = _vecdot(d, e).sum(axis=0)
    return sums


# Where `_shift` samples each channel: fractions of its values in memory order.
_SAMPLE_AT = (1 / 6, 1 / 2, 5 / 6)


def _shift(x3: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Per-channel reference values for one-pass statistics of an (A, C, B) array.

    The median of three values of each channel, a sixth, a half and five
    sixths of the way through its values: for most data within a standard
    deviation or two of the channel's mean, so that E[d²] − E[d]² of the
    deviations d = x − shift does not cancel the way E[x²] − E[x]² does. A
    median, and not the first value, so that one far sample (a first image far
    from the rest) does not become the reference. Three values cost 2 µs
    whatever the number of channels; a median of 64 cost 25-200 µs.
    """
    a, _, b = x3.shape
    first, middle, last = (
        x3[p // b, :, p % b] for p in (int(f * (a * b - 1)) for f in _SAMPLE_AT)
    )
    low, high = np.minimum(first, middle), np.maximum(first, middle)
    shift: np.ndarray = np.maximum(low, np.minimum(high, last)).astype(dtype)
    return shift


def _stats_from_sums(
    sums: np.ndarray,
    shift: np.ndarray,
    x3: np.ndarray,
    channel_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance from the float64 sums of d and d² (d = x − shift)."""
    a, _, b = x3.shape
    m = a * b
    dmean = sums[0] / m
    var = np.maximum(sums[1] / m - dmean * dmean, 0.0)
    mean = shift + dmean
    dtype = shift.dtype
    return mean.astype(dtype).reshape(channel_shape), var.astype(dtype).reshape(
        channel_shape
    )


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance: see :func:`bnarray._math.batch_stats`.

    One pass over memory: each block's deviations from a per-channel shift
    (see :func:`_shift`) are summed, and squared and summed, from cache; block
    sums are accumulated in float64.
    """
    channel_shape = _channel_shape(x, reduce_axes)
    x3 = _view3(x, channel_shape)
    if x3 is None:
        return _math.batch_stats(x, reduce_axes, xp=xp)
    dtype = np.promote_types(x.dtype, np.float32)  # _math.compute_dtype
    shift_c = _shift(x3, dtype)
    xs, r = _as_rows(x3)
    c = xs.shape[1]
    shift = _per_channel(np.repeat(shift_c, r), xs.shape, dtype)

    def work(blocks: list[tuple[slice, slice, slice]]) -> np.ndarray:
        sums = np.zeros((2, c), dtype=np.float64)
        buf = _scratch(dtype, xs.size)
        ones = np.ones(min(_BLOCK_ELEMENTS, xs.size), dtype=dtype)
        for ia, ic, ib in blocks:
            xb = xs[ia, ic, ib]
            d = np.subtract(xb, _at(shift, ia, ic), out=_as(buf, xb), dtype=dtype)
            sums[0, ic] += _sums(d, ones)
            sums[1, ic] += _dots(d, d, ones)
        return sums

    sums = _fold_columns(sum(_run(work, xs.shape)), r)
    return _stats_from_sums(sums, shift_c, x3, channel_shape)


def normalize(
    x: Array, mean: Array, scale: Array, shift: Array | None, *, xp: Namespace
) -> Array:
    """``(x - mean) * scale + shift``: see :func:`bnarray._math.normalize`."""
    x3 = _view3(x, tuple(mean.shape))
    if x3 is None:
        return _math.normalize(x, mean, scale, shift, xp=xp)
    dtype = np.dtype(mean.dtype)
    mean3 = _per_channel(mean, x3.shape, dtype)
    scale3 = _per_channel(scale, x3.shape, dtype)
    shift3 = None if shift is None else _per_channel(shift, x3.shape, dtype)
    y = np.empty(x.shape, dtype=x.dtype)  # C-contiguous, whatever the layout of x
    y3 = y.reshape(x3.shape)
    direct = x.dtype == dtype  # else compute in a float32 scratch block

    def work(blocks: list[tuple[slice, slice, slice]]) -> None:
        buf = None if direct else _scratch(dtype, x3.size)
        for ia, ic, ib in blocks:
            xb, yb = x3[ia, ic, ib], y3[ia, ic, ib]
            t = yb if buf is None else _as(buf, xb)
            np.subtract(xb, _at(mean3, ia, ic), out=t, dtype=dtype)
            if shift3 is None:
                np.multiply(t, _at(scale3, ia, ic), out=yb)
            else:
                np.multiply(t, _at(scale3, ia, ic), out=t)
                np.add(t, _at(shift3, ia, ic), out=yb)

    _run(work, x3.shape)
    return y


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``: see :func:`bnarray._math.grad_sums`."""
    channel_shape = _channel_shape(x, reduce_axes)
    x3 = _view3(x, channel_shape)
    dy3 = _view3(dy, channel_shape)
    if x3 is None or dy3 is None or dy.dtype != x.dtype:
        return _math.grad_sums(dy, x, mean, reduce_axes, xp=xp)
    dtype = np.dtype(mean.dtype)
    (xs, r), (dys, _) = _as_rows(x3), _as_rows(dy3)
    c = xs.shape[1]
    mean3 = _per_channel(np.repeat(np.reshape(mean, -1), r), xs.shape, dtype)
    direct = x.dtype == dtype

    def work(blocks: list[tuple[slice, slice, slice]]) -> np.ndarray:
        sums = np.zeros((2, c), dtype=np.float64)
        buf = _scratch(dtype, xs.size)
        dy_buf = None if direct else _scratch(dtype, xs.size)
        ones = np.ones(min(_BLOCK_ELEMENTS, xs.size), dtype=dtype)
        for ia, ic, ib in blocks:
            xb, dyb = xs[ia, ic, ib], dys[ia, ic, ib]
            if dy_buf is not None:  # BLAS has no float16: upcast the block once
                upcast = _as(dy_buf, dyb)
                np.copyto(upcast, dyb)
                dyb = upcast
            sums[0, ic] += _sums(dyb, ones)
            t = np.subtract(xb, _at(mean3, ia, ic), out=_as(buf, xb), dtype=dtype)
            sums[1, ic] += _dots(t, dyb, ones)
        return sums

    sums = _fold_columns(sum(_run(work, xs.shape)), r)
    return (
        sums[0].astype(dtype).reshape(channel_shape),
        sums[1].astype(dtype).reshape(channel_shape),
    )


def grad_input(
    dy: Array,
    x: Array,
    mean: Array,
    dy_scale: Array,
    xc_scale: Array | None,
    shift: Array | None,
    *,
    xp: Namespace,
) -> Array:
    """``dy * dy_scale + (x - mean) * xc_scale + shift``: see
    :func:`bnarray._math.grad_input`."""
    x3 = _view3(x, tuple(mean.shape))
    dy3 = _view3(dy, tuple(mean.shape))
    if x3 is None or dy3 is None or dy.dtype != x.dtype:
        return _math.grad_input(dy, x, mean, dy_scale, xc_scale, shift, xp=xp)
    dtype = np.dtype(mean.dtype)
    mean3 = _per_channel(mean, x3.shape, dtype)
    dy_scale3 = _per_channel(dy_scale, x3.shape, dtype)
    xc_scale3 = None if xc_scale is None else _per_channel(xc_scale, x3.shape, dtype)
    shift3 = None if shift is None else _per_channel(shift, x3.shape, dtype)
    dx = np.empty(x.shape, dtype=x.dtype)  # C-contiguous, whatever the layout of x
    dx3 = dx.reshape(x3.shape)
    direct = x.dtype == dtype

    def work(blocks: list[tuple[slice, slice, slice]]) -> None:
        buf = _scratch(dtype, x3.size)
        acc_buf = None if direct else _scratch(dtype, x3.size)
        for ia, ic, ib in blocks:
            xb, dyb, dxb = x3[ia, ic, ib], dy3[ia, ic, ib], dx3[ia, ic, ib]
            acc = dxb if acc_buf is None else _as(acc_buf, xb)
            last = xc_scale3 is None and shift3 is None
            np.multiply(
                dyb, _at(dy_scale3, ia, ic), out=dxb if last else acc, dtype=dtype
            )
            if xc_scale3 is not None:
                t = np.subtract(xb, _at(mean3, ia, ic), out=_as(buf, xb), dtype=dtype)
                np.multiply(t, _at(xc_scale3, ia, ic), out=t)
                np.add(acc, t, out=dxb if shift3 is None else acc)
            if shift3 is not None:
                np.add(acc, _at(shift3, ia, ic), out=dxb)

    _run(work, x3.shape)
    return dx
