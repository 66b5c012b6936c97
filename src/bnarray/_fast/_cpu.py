"""CPU machinery shared by the NumPy and Numba kernels: layout, blocks, threads, one-pass statistics."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import _math

__all__ = [
    "BLOCK_ELEMENTS",
    "FLOATS",
    "RUNS_PER_THREAD",
    "THREADED_MIN_ELEMENTS",
    "as_rows",
    "block_shape",
    "blocks",
    "broadcast_shape",
    "compute_dtype",
    "executor",
    "fold_columns",
    "geometry",
    "num_threads",
    "on_threads",
    "reference",
    "row_repeat",
    "serves",
    "split",
    "stats_from_sums",
    "thread_count",
    "view3",
]

# Elements per block. A block of x, its float32/float64 scratch copy and the
# matching block of dy or y stay within a 1 MiB L2 cache, so every pass after
# the first read of a block runs from cache: each kernel moves each full-size
# array through main memory once.
BLOCK_ELEMENTS = 1 << 17

# Arrays smaller than this many elements run on the calling thread only.
THREADED_MIN_ELEMENTS = 1 << 17

# Runs of consecutive blocks per thread (for load balance).
RUNS_PER_THREAD = 4

FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def num_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        # A forked child inherits the pool object but not its threads: make a new one.
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(num_threads(), thread_name_prefix="bnarray")
            _pool_pid = os.getpid()
        return _pool


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """:func:`bnarray._math.compute_dtype` as a NumPy dtype."""
    compute = COMPUTE.get(dtype)
    if compute is None:
        compute = np.dtype(_math.compute_dtype(dtype, np))  # type: ignore[call-overload]
    return compute


# The compute dtypes of `FLOATS`.
COMPUTE: dict[np.dtype, np.dtype] = {
    dtype: np.dtype(_math.compute_dtype(dtype, np))  # type: ignore[call-overload]
    for dtype in FLOATS
}


def serves(dtype: Any, size: int, kept: tuple[int, ...]) -> bool:
    """Whether the CPU loops take an `x` of `dtype` and `size` with channel axes
    `kept` (sorted): a float dtype of native byte order, at least one element,
    adjacent channel axes. Any strides: :func:`bnarray._fast.plan` makes a
    C-contiguous copy."""
    adjacent = not kept or kept[-1] + 1 - kept[0] == len(kept)
    return dtype in FLOATS and size > 0 and adjacent


def view3(x: np.ndarray, channel_shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous `x` that :func:`serves` takes, as an (A, C, B) view with the
    channels in the middle.

    `channel_shape` is the broadcast shape of a per-channel array. NCHW
    (axis=1) gives (N, C, H·W), NHWC (axis=-1) gives (N·H·W, C, 1).
    """
    if not x.flags.c_contiguous:
        msg = "the CPU kernels read C-contiguous arrays: call them through `plan`"
        raise ValueError(msg)
    return x.reshape(geometry(tuple(x.shape), channel_shape))


def geometry(
    shape: tuple[int, ...], channel_shape: tuple[int, ...]
) -> tuple[int, int, int]:
    """The (A, C, B) shape of :func:`view3` for an array of `shape`,
    remembered for the shapes of recent calls."""
    key = (shape, channel_shape)
    found = _GEOMETRY.get(key)
    if found is None:
        if len(_GEOMETRY) >= 512:
            _GEOMETRY.clear()
        found = _GEOMETRY[key] = _geometry(shape, channel_shape)
    return found


_GEOMETRY: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int, int]] = {}


def _geometry(
    shape: tuple[int, ...], channel_shape: tuple[int, ...]
) -> tuple[int, int, int]:
    kept = [a for a, n in enumerate(channel_shape) if n != 1]
    size = math.prod(shape)
    if not kept:
        return (1, 1, size)
    first, last = kept[0], kept[-1] + 1
    a = math.prod(shape[:first])
    c = math.prod(shape[first:last])
    return (a, c, size // (a * c))


def broadcast_shape(x: np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if a in reduce_axes else n for a, n in enumerate(x.shape))


def block_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Extents of the boxes of about `BLOCK_ELEMENTS` that tile an (A, C, B) array."""
    a, c, b = shape
    if b >= BLOCK_ELEMENTS:
        nb = -(-b // BLOCK_ELEMENTS)
        return 1, 1, -(-b // nb)
    cc = max(1, min(c, BLOCK_ELEMENTS // b))
    cc = -(-c // -(-c // cc))  # equal chunks: no thin last chunk
    ca = max(1, BLOCK_ELEMENTS // (cc * b)) if cc == c else 1
    return min(ca, a), cc, b


def blocks(shape: tuple[int, int, int]) -> list[tuple[slice, slice, slice]]:
    """The boxes tiling an (A, C, B) array, in memory order."""
    a, c, b = shape
    ca, cc, cb = block_shape(shape)
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
ROWS_MAX_B = 16
ROWS_MAX_WIDTH = 4096


def row_repeat(shape: tuple[int, int, int]) -> int:
    """For an (A, C, B) array read as rows of C·B values, B: 1 for channels-last
    arrays, B for small images; 0 for the other channels-first arrays."""
    _, c, b = shape
    return b if b == 1 or (b <= ROWS_MAX_B and c * b <= ROWS_MAX_WIDTH) else 0


def as_rows(x3: np.ndarray) -> tuple[np.ndarray, int]:
    """`x3` as the reductions read it, and the columns per channel (see `row_repeat`)."""
    r = row_repeat(x3.shape)
    if r <= 1:
        return x3, 1
    a, c, b = x3.shape
    return x3.reshape(a, c * b, 1), r


def fold_columns(sums: np.ndarray, r: int) -> np.ndarray:
    """Per-channel sums from the sums of (A, C·r, 1) columns."""
    if r <= 1:
        return sums
    folded: np.ndarray = sums.reshape(2, -1, r).sum(axis=2)
    return folded


def split(blocks: list[Any], n: int) -> Iterator[list[Any]]:
    size = -(-len(blocks) // n)
    for i in range(0, len(blocks), size):
        yield blocks[i : i + size]


def thread_count(
    shape: tuple[int, int, int], blocks: int, *, threads: int | None = None
) -> int:
    """Threads for an (A, C, B) array of `blocks` blocks, of `threads` (default
    `num_threads()`) at most: one for small arrays."""
    if shape[0] * shape[1] * shape[2] < THREADED_MIN_ELEMENTS:
        return 1
    return min(threads or num_threads(), blocks)


def on_threads(body: Callable[[], None], n: int) -> None:
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
        executor().submit(helper)
    try:
        body()
    finally:
        with done:
            closed = True
            done.wait_for(lambda: running == 0)
    if errors:
        raise errors[0]


# Where `reference` samples each channel: fractions of its values in memory order.
SAMPLE_AT = (1 / 6, 1 / 2, 5 / 6)


def reference(x3: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Per-channel reference values for one-pass statistics of an (A, C, B) array.

    The median of three values of each channel, a sixth, a half and five
    sixths of the way through its values: for most data within a standard
    deviation or two of the channel's mean, so that E[d²] − E[d]² of the
    deviations d = x − ref does not cancel the way E[x²] − E[x]² does. A
    median, and not the first value, so that one far sample (a first image far
    from the rest) does not become the reference. Three values cost 2 µs
    whatever the number of channels; a median of 64 cost 25-200 µs.
    """
    a, _, b = x3.shape
    first, middle, last = (
        x3[p // b, :, p % b] for p in (int(f * (a * b - 1)) for f in SAMPLE_AT)
    )
    low, high = np.minimum(first, middle), np.maximum(first, middle)
    ref: np.ndarray = np.maximum(low, np.minimum(high, last)).astype(dtype)
    return ref


def stats_from_sums(
    sums: np.ndarray,
    ref: np.ndarray,
    x3: np.ndarray,
    channel_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance from the float64 sums of d and d² (d = x − ref)."""
    a, _, b = x3.shape
    m = a * b
    dmean = sums[0] / m
    var = np.maximum(sums[1] / m - dmean * dmean, 0.0)
    mean = ref + dmean
    dtype = ref.dtype
    return mean.astype(dtype).reshape(channel_shape), var.astype(dtype).reshape(
        channel_shape
    )
