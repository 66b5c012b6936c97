"""NumPy kernels: cache-blocked, multi-threaded versions of the four generic full-size kernels."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .._compat import Array, Namespace
from .._math import backward_scales, forward_scales, running_update
from . import _cpu

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


def _einsum_vecdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.einsum("...i,...i->...", a, b)
    return out


# np.vecdot (NumPy >= 2.0) calls BLAS dot on each contiguous row.
_vecdot: Callable[[np.ndarray, np.ndarray], np.ndarray] = getattr(
    np, "vecdot", _einsum_vecdot
)


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
    blocks = _cpu.blocks(shape)
    n = _cpu.thread_count(shape, len(blocks))
    if n == 1:
        return [work(blocks)]
    runs = list(_cpu.split(blocks, _cpu.RUNS_PER_THREAD * n))
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

    _cpu.on_threads(drain, n)
    return results


def _operand(v: Array, shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """A per-channel array, ready to combine with the blocks of an (A, C, B) array.

    Index it with :func:`_at`. Where it costs little memory, the values are
    repeated to the extent of a block: NumPy runs a binary ufunc on two
    contiguous operands about twice as fast as on a row and a per-row scalar
    (NCHW) or on short rows and a broadcast row (NHWC).
    """
    a, c, b = shape
    values = np.asarray(v, dtype=dtype).reshape(1, c, 1)
    ca, _, cb = _cpu.block_shape(shape)
    # Repeated only for use by several blocks: a copy made for one block
    # costs more than it saves (it doubled the time of a 256×512 step).
    if cb != b or ca * _REUSE > a:
        return values
    return np.ascontiguousarray(np.broadcast_to(values, (ca, c, b)))


# Blocks along A that must share a repeated operand (see `_operand`).
_REUSE = 4


def _ones(dtype: np.dtype, size: int) -> np.ndarray:
    """A read-only vector of ones for the BLAS sums, of at most a block."""
    return _ONES[np.dtype(dtype)][: min(_cpu.BLOCK_ELEMENTS, size)]


_ONES = {dtype: np.ones(_cpu.BLOCK_ELEMENTS, dtype=dtype) for dtype in _cpu.FLOATS}
for _vector in _ONES.values():
    _vector.flags.writeable = False


def _at(values: np.ndarray, ia: slice, ic: slice) -> np.ndarray:
    """The part of a :func:`_operand` array that matches block ``[ia, ic]``."""
    return values[: ia.stop - ia.start, ic]


def _scratch(dtype: np.dtype, size: int) -> np.ndarray:
    """A block buffer, no larger than the array it serves (small batches are common)."""
    return np.empty(min(_cpu.BLOCK_ELEMENTS, size), dtype=dtype)


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
    """Column sums of a float32/float64 (a, c) array, as (c,): one BLAS
    product in `d`'s dtype for fewer than 512 rows, else the products of 512
    rows at a time added in float64."""
    a, c = d.shape
    sums: np.ndarray
    if a < _SUM_ROWS:
        sums = ones[:a] @ d
        return sums
    full = a - a % _SUM_ROWS
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


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance: see :func:`bnarray._math.batch_stats`.

    One pass over memory: each block's deviations from a per-channel reference
    value (see :func:`bnarray._fast._cpu.reference`) are summed, and squared
    and summed, from cache; block sums are accumulated in float64.
    """
    channel_shape = _cpu.broadcast_shape(x, reduce_axes)
    x3 = _cpu.view3(x, channel_shape)
    dtype = _cpu.compute_dtype(x.dtype)
    ref_c = _cpu.reference(x3, dtype)
    xs, r = _cpu.as_rows(x3)
    c = xs.shape[1]
    ref = _operand(np.repeat(ref_c, r), xs.shape, dtype)

    def work(blocks: list[tuple[slice, slice, slice]]) -> np.ndarray:
        sums = np.zeros((2, c), dtype=np.float64)
        buf = _scratch(dtype, xs.size)
        ones = _ones(dtype, xs.size)
        for ia, ic, ib in blocks:
            xb = xs[ia, ic, ib]
            d = np.subtract(xb, _at(ref, ia, ic), out=_as(buf, xb), dtype=dtype)
            sums[0, ic] += _sums(d, ones)
            sums[1, ic] += _dots(d, d, ones)
        return sums

    sums = _cpu.fold_columns(sum(_run(work, xs.shape)), r)
    return _cpu.stats_from_sums(sums, ref_c, x3, channel_shape)


def normalize(
    x: Array,
    mean: Array,
    scale: Array,
    shift: Array | None,
    *,
    xp: Namespace,
    out: Array | None = None,
) -> Array:
    """``(x - mean) * scale + shift``: see :func:`bnarray._math.normalize`."""
    x3 = _cpu.view3(x, tuple(mean.shape))
    dtype = np.dtype(mean.dtype)
    mean3 = _operand(mean, x3.shape, dtype)
    scale3 = _operand(scale, x3.shape, dtype)
    shift3 = None if shift is None else _operand(shift, x3.shape, dtype)
    # C-contiguous, whatever the layout of x (and so is `out`)
    y = np.empty(x.shape, dtype=x.dtype) if out is None else out
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
    channel_shape = _cpu.broadcast_shape(x, reduce_axes)
    x3 = _cpu.view3(x, channel_shape)
    dy3 = _cpu.view3(dy, channel_shape)
    dtype = np.dtype(mean.dtype)
    (xs, r), (dys, _) = _cpu.as_rows(x3), _cpu.as_rows(dy3)
    c = xs.shape[1]
    mean3 = _operand(np.repeat(np.reshape(mean, -1), r), xs.shape, dtype)
    direct = x.dtype == dtype

    def work(blocks: list[tuple[slice, slice, slice]]) -> np.ndarray:
        sums = np.zeros((2, c), dtype=np.float64)
        buf = _scratch(dtype, xs.size)
        dy_buf = None if direct else _scratch(dtype, xs.size)
        ones = _ones(dtype, xs.size)
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

    sums = _cpu.fold_columns(sum(_run(work, xs.shape)), r)
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
    out: Array | None = None,
) -> Array:
    """``dy * dy_scale + (x - mean) * xc_scale + shift``: see
    :func:`bnarray._math.grad_input`."""
    x3 = _cpu.view3(x, tuple(mean.shape))
    dy3 = _cpu.view3(dy, tuple(mean.shape))
    dtype = np.dtype(mean.dtype)
    mean3 = _operand(mean, x3.shape, dtype)
    dy_scale3 = _operand(dy_scale, x3.shape, dtype)
    xc_scale3 = None if xc_scale is None else _operand(xc_scale, x3.shape, dtype)
    shift3 = None if shift is None else _operand(shift, x3.shape, dtype)
    # C-contiguous, whatever the layout of x (and so is `out`)
    dx = np.empty(x.shape, dtype=x.dtype) if out is None else out
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


# Smaller arrays: a whole training forward pass, and a whole training
# backward pass, in a few NumPy operations on the full array, with no blocks:
# there the blocked kernels' fixed cost (operands, block plans, per-channel
# arithmetic between four kernels, a thread pool) is most of a step. The
# statistics are the generic kernels' corrected two passes, their sums the
# BLAS products of the blocked kernels added in float64. Beyond a few MB the
# blocked kernels, which read each block from cache twice, win.
_SMALL_ELEMENTS = 1 << 21


def fuses(shape: tuple[int, ...], kept: tuple[int, ...]) -> bool:
    """Whether an array of `shape` with channel axes `kept` takes the fused
    passes: below `_SMALL_ELEMENTS` elements, and rows (the axes after the
    channel axes) of at most `_WHOLE_ROW` values."""
    size = math.prod(shape)
    if size >= _SMALL_ELEMENTS or size == 0 or not kept:
        return False
    return math.prod(shape[kept[-1] + 1 :]) <= _WHOLE_ROW


# The longest rows the fused passes sum whole: a float32 BLAS dot adds them
# in a few interleaved partial sums.
_WHOLE_ROW = 4096


def _whole_sums(d: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Per-channel sums of a float32/float64 (A, C) or (A, C, B) array, as
    (C,): BLAS matrix-vector products (see `_sums`), of whole rows of B <=
    `_WHOLE_ROW` values, then of the columns (see `_column_sums`)."""
    return _column_sums(d if d.ndim == 2 else d @ ones[: d.shape[2]], ones)


def _whole_dots(d: np.ndarray, e: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """Per-channel sums of ``d * e`` of two (A, C) or (A, C, B) arrays, as (C,)."""
    return _column_sums(np.multiply(d, e) if d.ndim == 2 else _vecdot(d, e), ones)


def small_forward(
    x: np.ndarray,
    channel_shape: tuple[int, ...],
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A training forward pass of a C-contiguous `x` that :func:`fuses` takes:
    see :func:`bnarray._fast._numba.small_forward`.

    The corrected two passes of :func:`bnarray._math.batch_stats` over the
    whole array, as (A, C) for rows of channels and (A, C, B) otherwise: the
    deviations ``d`` from the first pass's mean ``mean₀`` are summed, and
    squared and summed, by the BLAS products of `_whole_sums`; ``y`` then
    takes their buffer. The per-channel
    arithmetic is in float64 where `_column_sums` adds in float64, else in
    the compute dtype, which a single BLAS product of at most 512 rows
    carries to the end (every result is rounded to it).
    """
    a, c, b = _geometry(x.shape, channel_shape)
    dtype = _cpu.COMPUTE[x.dtype]
    v = x.reshape(a, c) if b == 1 else x.reshape(a, c, b)
    direct = x.dtype == dtype
    vc = v if direct else v.astype(dtype)  # BLAS has no float16
    m = a * b
    ones = _ONES[dtype]
    mean0 = (_whole_sums(vc, ones) / m).astype(dtype, copy=False)
    d = np.subtract(vc, _column(mean0, b), out=None if direct else vc)
    delta = _whole_sums(d, ones) / m
    var = _whole_dots(d, d, ones) / m - delta * delta
    np.maximum(var, 0.0, out=var)
    mean = (mean0 + delta).astype(dtype, copy=False)
    var = var.astype(dtype, copy=False)
    invstd, scale = forward_scales(var, _flat(gamma, c), eps, xp=np)
    # y as :func:`bnarray._math.normalize` computes it, bit for bit (renorm
    # with rmax=1, dmax=0 stays plain batch norm), in the deviations' buffer.
    into = out.reshape(d.shape) if out is not None and direct else d
    y = np.subtract(v, _column(mean, b), out=into)
    y *= _column(scale, b)
    if beta is not None:
        y += _column(_flat(beta, c), b)
    if out is not None and not direct:
        np.copyto(out.reshape(y.shape), y)
    elif not direct:
        y = y.astype(x.dtype)
    return out if out is not None else y.reshape(x.shape), mean, var, invstd


def small_backward(
    dy: np.ndarray,
    x: np.ndarray,
    channel_shape: tuple[int, ...],
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    count: int,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training backward pass of a C-contiguous `x` and `dy` that
    :func:`fuses` takes: see :func:`bnarray._fast._numba.small_backward`;
    its sums as in :func:`small_forward`."""
    a, c, b = _geometry(x.shape, channel_shape)
    dtype = mean.dtype
    ones = _ONES[dtype]
    shape = (a, c) if b == 1 else (a, c, b)
    dyc = dy.reshape(shape)
    if dy.dtype != dtype:
        dyc = dyc.astype(dtype)
    sum_dy = _whole_sums(dyc, ones).astype(dtype, copy=False)
    xc = np.subtract(x.reshape(shape), _column(_flat(mean, c), b), dtype=dtype)
    sum_dy_xc = _whole_dots(xc, dyc, ones).astype(dtype, copy=False)
    dweight, dy_scale, xc_scale, shift = backward_scales(
        sum_dy,
        sum_dy_xc,
        _flat(invstd, c),
        _flat(gamma, c),
        count,
        training=True,
        xp=np,
    )
    dx = np.multiply(dyc, _column(dy_scale, b))
    xc *= _column(xc_scale, b)
    dx += xc
    if out is not None:
        np.add(dx, _column(shift, b), out=out.reshape(shape))
        return out, dweight, sum_dy
    dx += _column(shift, b)
    return dx.astype(x.dtype, copy=False).reshape(x.shape), dweight, sum_dy


def _column(v: Any, b: int) -> Any:
    """A (C,) array as the operand of an (A, C) array (`b` 1) or an (A, C, B) one."""
    return v if b == 1 else v.reshape(-1, 1)


def _flat(v: Any, c: int) -> Any:
    """A per-channel array (or None) as (C,)."""
    return v if v is None or v.ndim == 1 else v.reshape(c)


def _geometry(
    shape: tuple[int, ...], channel_shape: tuple[int, ...]
) -> tuple[int, int, int]:
    """The (A, C, B) shape of :func:`bnarray._fast._cpu.view3`, but a single
    channel as one column, summed 512 rows at a time, rather than one row of
    any length."""
    a, c, b = _cpu.geometry(shape, channel_shape)
    return (a * b, 1, 1) if c == 1 else (a, c, b)
