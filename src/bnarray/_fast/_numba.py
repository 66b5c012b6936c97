"""NumPy kernels compiled with Numba: fused loops (used when Numba is installed).

The same four full-size kernels as ``_numpy``, over the same (A, C, B) views, blocks and
threads; only the work on a block differs. Each kernel has two loops: the
blocks loops for channels-first layouts with long rows, and the rows loops
for channels-last layouts and small images (see `_layout`). Where ``_numpy``
runs three to five NumPy operations over each block, these loops read each
input element once and write each output element once, in the same order of
roundings as the generic path. Numba has no float16 on the CPU: float16 arrays
are passed as their bits and converted by the CPU's own instructions (round to
nearest even, as NumPy does). The loops release the GIL and run on
``_numpy``'s thread pool, not Numba's threading layer, so there is nothing to
set up and they work after ``os.fork``.
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .. import _math
from .._compat import Array, Namespace
from .._math import backward_scales, forward_scales
from . import _cpu

# The per-channel arithmetic of forward_scales and backward_scales has nothing
# to gain on the CPU: the generic one serves (the fused passes below do their
# own). running_update has its own loop: see there.
__all__ = [
    "backward_scales",
    "batch_stats",
    "forward_scales",
    "grad_input",
    "grad_sums",
    "normalize",
    "running_update",
]


@intrinsic
def _half_to_float(typingctx: Any, v: Any) -> Any:
    """The float32 value of float16 bits (exact)."""
    if v != types.uint16:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half(typingctx: Any, v: Any) -> Any:
    """The float16 bits of a float32, rounded to nearest even."""
    if v != types.float32:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _take(typingctx: Any, counter: Any) -> Any:
    """Add one to ``counter[0]`` atomically and return the value before.

    The threads that run a loop share the counter and take run after run from
    it, so the runs go to whichever thread is free.
    """
    if not (
        isinstance(counter, types.Array)
        and counter.dtype == types.int64
        and counter.ndim == 1
    ):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(counter)(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.IntType(64)(1), "monotonic")

    return types.int64(counter), codegen


def _hardware_half() -> bool:
    """Whether this CPU converts float16 in hardware (x86 F16C, every ARM64).

    Without it LLVM would call runtime-library functions that Numba's JIT may
    not provide: float16 arrays then take the ``_numpy`` kernels.
    """
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return bool(features.get("f16c", False))


HARDWARE_HALF = _hardware_half()


def _load(v: Any) -> Any:
    """An element as a value of the compute dtype (float16 bits become float32)."""
    raise NotImplementedError  # only called from compiled code


def _store(v: Any, like: Any) -> Any:
    """A compute-dtype value as an element of an array with elements like `like`."""
    raise NotImplementedError  # only called from compiled code


@overload(_load)
def _load_impl(v: Any) -> Any:
    def from_bits(v: Any) -> Any:
        return _half_to_float(v)

    def as_is(v: Any) -> Any:
        return v

    return from_bits if v == types.uint16 else as_is


@overload(_store)
def _store_impl(v: Any, like: Any) -> Any:
    def to_bits(v: Any, like: Any) -> Any:
        return _float_to_half(np.float32(v))

    def as_is(v: Any, like: Any) -> Any:
        return v

    return to_bits if like == types.uint16 else as_is


# Reductions may be reassociated (vectorized accumulators); the elementwise
# loops keep the generic path's order of roundings. Every inner loop runs over
# 1-D slices from index 0, so that the compiler knows the indices are in
# bounds and non-negative, and vectorizes.
_REDUCE = {"nogil": True, "cache": True, "fastmath": {"reassoc"}}
_MAP = {"nogil": True, "cache": True}

# Sums run in the compute dtype over at most this many terms, then go into
# float64 (float32 accumulators are twice as fast as float64 ones, and stay
# within a few float32 roundings over 4096 terms).
_SEGMENT = 4096


@numba.njit(nogil=True, cache=True)
def _row_block(
    bounds: Any, k: int, span: int, c: int
) -> tuple[int, int, int, int, int]:
    """Block `k` of a rows loop: its rows ``a0`` to ``a1``, its first column
    ``c0``, its width ``w`` and the rows of one stretch (`span` where the block
    has whole rows of `c` columns, else 1)."""
    a0, a1, c0, c1 = bounds[k, 0], bounds[k, 1], bounds[k, 2], bounds[k, 3]
    w = c1 - c0
    return a0, a1, c0, w, span if w == c else 1


@numba.njit(nogil=True, cache=True)
def _pairs(a0: int, a1: int, step: int, c: int) -> tuple[int, int]:
    """How the rows loops pair the stretches of rows a0..a1.

    In the reductions, stretch ``j`` (``step`` rows from ``a0 + j * step``)
    is read side by side with stretch ``pairs + j``, which starts ``apart``
    elements later: two long sequential streams, with one load and store of
    each accumulator for both (1.2-1.4x faster than one stretch at a time).
    Pairing neighbouring stretches instead makes the hardware prefetchers
    miss: 1.4-2x slower from main memory. The rest, at most one whole and
    one partial stretch, is read alone. (Pairs made the elementwise loops no
    faster, or slower.)
    """
    pairs = (a1 - a0) // step // 2
    return pairs, pairs * step * c


@numba.njit(nogil=True, cache=True)
def _fold(s1: Any, s2: Any, width: int, c0: int, out: Any) -> None:
    """Add accumulators laid out as rows of `width` channels from `c0` into
    ``out[0]`` and ``out[1]`` (float64), row after row."""
    for i in range(s1.shape[0]):
        out[0, c0 + i % width] += s1[i]
        out[1, c0 + i % width] += s2[i]


# The statistics and the gradient sums are one reduction: Σ u and Σ u·d with
# d = x − ref, where u = d for the statistics (`dy` None; ref is the value of
# ``_cpu.reference``) and u = dy for the gradient sums (ref is the mean).
# Numba compiles the two apart (a None `dy` removes its branches).


@numba.njit(**_REDUCE)
def _sums_blocks(
    x: Any, ref: Any, dy: Any, bounds: Any, runs: Any, counter: Any, sums: Any
) -> None:
    zero = np.zeros(1, ref.dtype)[0]
    run = _take(counter)
    while run < runs.shape[0] - 1:
        for k in range(runs[run], runs[run + 1]):
            a0, a1, c0, c1, b0, b1 = bounds[k]
            for a in range(a0, a1):
                for c in range(c0, c1):
                    r = ref[c]
                    for j in range(b0, b1, _SEGMENT):
                        stop = min(j + _SEGMENT, b1)
                        xr = x[a, c, j:stop]
                        g = xr if dy is None else dy[a, c, j:stop]
                        s1 = zero
                        s2 = zero
                        for i in range(xr.shape[0]):
                            d = _load(xr[i]) - r
                            u = d if dy is None else _load(g[i])
                            s1 += u
                            s2 += u * d
                        sums[run, 0, c] += s1
                        sums[run, 1, c] += s2
        run = _take(counter)


@numba.njit(**_REDUCE)
def _sums_rows(
    x: Any, ref: Any, dy: Any, bounds: Any, runs: Any, counter: Any, sums: Any
) -> None:
    # Over the (A, C·B) view (channels last, or small images; see
    # ``_cpu.row_repeat``), in stretches of whole rows (see `_STRETCH`):
    # one accumulator per element of a stretch, folded into the sums at the
    # end of each block, after at most 510 terms (a block has at most 2**17
    # elements, a stretch at least 257).
    c = x.shape[1]
    span = ref.shape[0] // c
    xf = x.reshape(-1)
    gf = xf if dy is None else dy.reshape(-1)
    run = _take(counter)
    while run < runs.shape[0] - 1:
        for k in range(runs[run], runs[run + 1]):
            a0, a1, c0, w, step = _row_block(bounds, k, span, c)
            n = step * w
            s1 = np.zeros(n, ref.dtype)
            s2 = np.zeros(n, ref.dtype)
            pairs, apart = _pairs(a0, a1, step, c)
            rr = ref[c0 : c0 + n]
            for j in range(pairs):
                p = (a0 + j * step) * c + c0
                q = p + apart
                x0, x1 = xf[p : p + n], xf[q : q + n]
                g0, g1 = gf[p : p + n], gf[q : q + n]
                for i in range(n):
                    d0 = _load(x0[i]) - rr[i]
                    d1 = _load(x1[i]) - rr[i]
                    u0 = d0 if dy is None else _load(g0[i])
                    u1 = d1 if dy is None else _load(g1[i])
                    s1[i] += u0 + u1
                    s2[i] += u0 * d0 + u1 * d1
            for a in range(a0 + 2 * pairs * step, a1, step):
                start = a * c + c0
                size = (min(a + step, a1) - a) * w
                xr, g = xf[start : start + size], gf[start : start + size]
                for i in range(size):
                    d = _load(xr[i]) - rr[i]
                    u = d if dy is None else _load(g[i])
                    s1[i] += u
                    s2[i] += u * d
            _fold(s1, s2, w, c0, sums[run])
        run = _take(counter)


@numba.njit(**_MAP)
def _normalize_blocks(
    x: Any,
    mean: Any,
    scale: Any,
    shift: Any,
    y: Any,
    bounds: Any,
    runs: Any,
    counter: Any,
) -> None:
    run = _take(counter)
    while run < runs.shape[0] - 1:
        for k in range(runs[run], runs[run + 1]):
            a0, a1, c0, c1, b0, b1 = bounds[k]
            for a in range(a0, a1):
                for c in range(c0, c1):
                    xr, yr = x[a, c, b0:b1], y[a, c, b0:b1]
                    m = mean[c]
                    s = scale[c]
                    if shift is None:
                        for i in range(xr.shape[0]):
                            yr[i] = _store((_load(xr[i]) - m) * s, yr[0])
                    else:
                        t = shift[c]
                        for i in range(xr.shape[0]):
                            yr[i] = _store((_load(xr[i]) - m) * s + t, yr[0])
        run = _take(counter)


@numba.njit(**_MAP)
def _normalize_rows(
    x: Any,
    mean: Any,
    scale: Any,
    shift: Any,
    y: Any,
    bounds: Any,
    runs: Any,
    counter: Any,
) -> None:
    c = x.shape[1]
    span = mean.shape[0] // c
    xf, yf = x.reshape(-1), y.reshape(-1)
    run = _take(counter)
    while run < runs.shape[0] - 1:
        for k in range(runs[run], runs[run + 1]):
            a0, a1, c0, w, step = _row_block(bounds, k, span, c)
            for a in range(a0, a1, step):
                start = a * c + c0
                n = (min(a + step, a1) - a) * w
                end = c0 + n
                xr, yr = xf[start : start + n], yf[start : start + n]
                m, s = mean[c0:end], scale[c0:end]
                if shift is None:
                    for i in range(n):
                        yr[i] = _store((_load(xr[i]) - m[i]) * s[i], yr[0])
                else:
                    t = shift[c0:end]
                    for i in range(n):
                        yr[i] = _store((_load(xr[i]) - m[i]) * s[i] + t[i], yr[0])
        run = _take(counter)


@numba.njit(**_MAP)
def _grad_input_blocks(
    dy: Any,
    x: Any,
    mean: Any,
    dy_scale: Any,
    xc_scale: Any,
    shift: Any,
    dx: Any,
    bounds: Any,
    runs: Any,
    counter: Any,
) -> None:
    run = _take(counter)
    while run < runs.shape[0] - 1:
        for k in range(runs[run], runs[run + 1]):
            a0, a1, c0, c1, b0, b1 = bounds[k]
            for a in range(a0, a1):
                for c in range(c0, c1):
                    g, out = dy[a, c, b0:b1], dx[a, c, b0:b1]
                    s = dy_scale[c]
                    if xc_scale is None:
                        for i in range(g.shape[0]):
                            out[i] = _store(_load(g[i]) * s, out[0])
                    else:
                        xr = x[a, c, b0:b1]
                        m = mean[c]
                        r = xc_scale[c]
                        t = shift[c]
                        for i in range(g.shape[0]):
                            v = _load(g[i]) * s + (_load(xr[i]) - m) * r + t
                            out[i] = _store(v, out[0])
        run = _take(counter)


@numba.njit(**_MAP)
def _grad_input_rows(
    dy: Any,
    x: Any,
    mean: Any,
    dy_scale: Any,
    xc_scale: Any,
    shift: Any,
    dx: Any,
    bounds: Any,
    runs: Any,
    counter: Any,
) -> None:
    c = x.shape[1]
    span = dy_scale.shape[0] // c
    dyf, xf, dxf = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    run = _take(counter)
    while run < runs.shape[0] - 1:
        for k in range(runs[run], runs[run + 1]):
            a0, a1, c0, w, step = _row_block(bounds, k, span, c)
            for a in range(a0, a1, step):
                start = a * c + c0
                n = (min(a + step, a1) - a) * w
                end = c0 + n
                g, out = dyf[start : start + n], dxf[start : start + n]
                s = dy_scale[c0:end]
                if xc_scale is None:
                    for i in range(n):
                        out[i] = _store(_load(g[i]) * s[i], out[0])
                else:
                    xr = xf[start : start + n]
                    m, r, t = mean[c0:end], xc_scale[c0:end], shift[c0:end]
                    for i in range(n):
                        v = _load(g[i]) * s[i] + (_load(xr[i]) - m[i]) * r[i] + t[i]
                        out[i] = _store(v, out[0])
        run = _take(counter)


def _layout(
    x3: np.ndarray, blocks_loop: Any, rows_loop: Any
) -> tuple[np.ndarray, int, Any]:
    """The view of an (A, C, B) array the loops run over, its columns per
    channel and the loop: the rows loops for rows of C·B values (channels last,
    small images; see ``_cpu.as_rows``), else the blocks loops."""
    xs, r = _cpu.as_rows(x3)
    return xs, r, rows_loop if xs.shape[2] == 1 else blocks_loop


def _bits(a: np.ndarray) -> np.ndarray:
    """`a` as the loops take it: float16 as its bits, (A, C, 1) views as 2-D."""
    if a.dtype == np.float16:
        a = a.view(np.uint16)
    return a.reshape(a.shape[:2]) if a.shape[2] == 1 else a


# The rows loops run over stretches of about this many elements: whole rows,
# with the per-channel operands repeated to the stretch's length, so that the
# inner loops are long however few channels there are.
_STRETCH = 512

# normalize's rows loop takes shorter stretches of float32 values. Measured
# on 16, 32 and 64 channels last (26 MB, 2 threads, inputs in main memory,
# 2026-11-26): 64 rather than 512 made normalize 15-22 % faster and
# grad_input 0-11 %; in float16, 64 was 5-15 % slower than 128 to 512, which
# did not differ; in float64, and for the reductions, the length made no
# difference.
_MAP_STRETCH_FLOAT32 = 64

# grad_input's rows loop, which reads two arrays, takes longer ones. Measured
# on 16 to 256 channels last (2026-12-03, 2 threads, each of the four passes
# of a training step timed in turn, medians of 12): on 103 MB, 8192 rather
# than 64 made grad_input 0.5-0.7 ms (5-10 %) faster, on 26 MB 0.1 ms
# (4-7 %); normalize gained nothing from it.
_GRAD_STRETCH_FLOAT32 = 8192


def _map_stretch(dtype: np.dtype, *, grad: bool = False) -> int:
    """The stretch of the elementwise rows loops over values of `dtype`:
    normalize's, or with `grad` grad_input's."""
    if dtype != np.float32:
        return _STRETCH
    return _GRAD_STRETCH_FLOAT32 if grad else _MAP_STRETCH_FLOAT32


def _stretch_rows(c: int, stretch: int = _STRETCH) -> int:
    """Rows of `c` values in a stretch of `stretch` values (see `_STRETCH`)."""
    return max(1, stretch // c)


def _channel_values(
    v: Array | None,
    xs: np.ndarray,
    r: int,
    dtype: np.dtype,
    *,
    stretch: int = _STRETCH,
) -> np.ndarray | None:
    """A per-channel array as the loops over `xs` take it (see `_layout`): 1-D,
    each value repeated `r` times; for the rows loops, repeated to a stretch
    of `stretch` values (the loops take the stretch from its length)."""
    if v is None:
        return None
    v = np.asarray(v, dtype=dtype).reshape(-1)
    rows = _stretch_rows(xs.shape[1], stretch) if xs.shape[2] == 1 else 1
    if rows == r == 1:
        return np.ascontiguousarray(v)  # the loops only read it
    # One broadcast copy (per-call overhead matters on small arrays).
    out = np.empty((rows, v.size, r), dtype=dtype)
    out[...] = v[:, None]
    return out.reshape(-1)


@functools.lru_cache(maxsize=64)
def _schedule(
    shape: tuple[int, int, int], threads: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """Threads, block bounds and runs for an (A, C, B) array (see `_in_parallel`).

    Cached: a training loop calls the kernels on the same shapes again and
    again. The arrays are read-only.
    """
    blocks = _cpu.blocks(shape)
    n = _cpu.thread_count(shape, len(blocks), threads=threads)
    lengths = [len(run) for run in _cpu.split(blocks, _cpu.RUNS_PER_THREAD * n)]
    # The first block of each run, then the end.
    runs = np.cumsum([0, *lengths], dtype=np.int64)
    bounds = np.array(
        [
            (ia.start, ia.stop, ic.start, ic.stop, ib.start, ib.stop)
            for ia, ic, ib in blocks
        ],
        dtype=np.int64,
    )
    runs.flags.writeable = False
    bounds.flags.writeable = False
    return n, bounds, runs


def _in_parallel(
    loop: Any, shape: tuple[int, int, int], *args: Any, channels: int = 0
) -> Any:
    """Run a compiled loop over the blocks of an (A, C, B) array, on threads.

    The blocks are dealt in runs of consecutive blocks, as by ``_numpy._run``,
    but each thread makes a single call of the loop, which takes run after run
    itself (see `_take`): no Python, and so no wait for the GIL, between runs.
    A reduction over `channels` channels sums each run into its own row of
    partial sums; the rows are added in the order of the runs, so the result
    does not depend on which thread took which run.
    """
    n, bounds, runs = _schedule(tuple(shape), _cpu.num_threads())
    counter = np.zeros(1, dtype=np.int64)
    sums = [np.zeros((len(runs) - 1, 2, channels))] if channels else []
    _cpu.on_threads(lambda: loop(*args, bounds, runs, counter, *sums), n)
    return sums[0].sum(axis=0) if channels else None


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance: see :func:`bnarray._math.batch_stats`.

    One pass over memory: the deviations from a per-channel reference value
    (see ``_cpu.reference``), and their squares, are summed in the
    compute dtype over runs of at most 4096 values, and the runs in float64.
    """
    channel_shape = _cpu.broadcast_shape(x, reduce_axes)
    x3 = _cpu.view3(x, channel_shape)
    dtype = _cpu.compute_dtype(x.dtype)
    ref = _cpu.reference(x3, dtype)
    xs, r, loop = _layout(x3, _sums_blocks, _sums_rows)
    refs = _channel_values(ref, xs, r, dtype)
    sums = _in_parallel(loop, xs.shape, _bits(xs), refs, None, channels=xs.shape[1])
    sums = _cpu.fold_columns(sums, r)
    return _cpu.stats_from_sums(sums, ref, x3, channel_shape)


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
    # C-contiguous, as the loops write it (and so is `out`)
    y = np.empty(x.shape, dtype=x.dtype) if out is None else out
    xs, r, loop = _layout(x3, _normalize_blocks, _normalize_rows)
    stretch = _map_stretch(x.dtype)
    values = [
        _channel_values(v, xs, r, dtype, stretch=stretch) for v in (mean, scale, shift)
    ]
    _in_parallel(loop, xs.shape, _bits(xs), *values, _bits(y.reshape(xs.shape)))
    return y


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``: see :func:`bnarray._math.grad_sums`."""
    channel_shape = _cpu.broadcast_shape(x, reduce_axes)
    x3 = _cpu.view3(x, channel_shape)
    dy3 = _cpu.view3(dy, channel_shape)
    dtype = np.dtype(mean.dtype)
    xs, r, loop = _layout(x3, _sums_blocks, _sums_rows)
    means = _channel_values(mean, xs, r, dtype)
    dyb = _bits(dy3.reshape(xs.shape))
    sums = _in_parallel(loop, xs.shape, _bits(xs), means, dyb, channels=xs.shape[1])
    sums = _cpu.fold_columns(sums, r)
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
    c = x3.shape[1]
    if (xc_scale is None) != (shift is None):  # one loop serves both: add a zero
        zero = np.zeros(c, dtype=dtype)
        xc_scale = zero if xc_scale is None else xc_scale
        shift = zero if shift is None else shift
    # C-contiguous, as the loops write it (and so is `out`)
    dx = np.empty(x.shape, dtype=x.dtype) if out is None else out
    xs, r, loop = _layout(x3, _grad_input_blocks, _grad_input_rows)
    dyb, xb, dxb = (_bits(a.reshape(xs.shape)) for a in (dy3, x3, dx))
    stretch = _map_stretch(x.dtype, grad=True)
    values = [
        _channel_values(v, xs, r, dtype, stretch=stretch)
        for v in (mean, dy_scale, xc_scale, shift)
    ]
    _in_parallel(loop, xs.shape, dyb, xb, *values, dxb)
    return dx


# Small arrays: one call for a whole training forward pass, one for a whole
# training backward pass (below ``FUSED_MAX_ELEMENTS`` elements, see
# ``bnarray._fast``). There the fixed cost of the kernels above (views,
# per-channel operands, four compiled calls and the per-channel arithmetic in
# NumPy between them) is most of a step: 64×100 float32 took 100 µs a step,
# the arithmetic 10 µs. These loops read an (A, C, B) array whole on one
# thread, and do the per-channel arithmetic in the compute dtype, in the
# generic path's order of roundings.


_AT = _cpu.SAMPLE_AT

# Terms each sum of the small loops adds in the compute dtype before float64
# takes over: within a few roundings of float32 (the vectorized loops add
# them in several interleaved partial sums).
_SMALL_TERMS = 512


@numba.njit(**_REDUCE)
def _small_sums(x: Any, ref: Any, dy: Any, s1: Any, s2: Any) -> None:
    """Σ u and Σ u·d per channel into float64 `s1`, `s2`, with d = x − ref and
    u = d (`dy` None) or dy, over a C-contiguous (A, C, B) array: in the
    compute dtype over at most `_SMALL_TERMS` terms, then in float64."""
    na, nc, nb = x.shape
    zero = np.zeros(1, ref.dtype)[0]
    if nb == 1:  # rows of channels: the channels are the inner loop
        x2 = x.reshape(na, nc)
        g2 = x2 if dy is None else dy.reshape(na, nc)
        t1 = np.zeros(nc, ref.dtype)
        t2 = np.zeros(nc, ref.dtype)
        for a0 in range(0, na, _SMALL_TERMS):
            t1[:] = zero
            t2[:] = zero
            for a in range(a0, min(a0 + _SMALL_TERMS, na)):
                xr, g = x2[a], g2[a]
                for c in range(nc):
                    d = _load(xr[c]) - ref[c]
                    u = d if dy is None else _load(g[c])
                    t1[c] += u
                    t2[c] += u * d
            for c in range(nc):
                s1[c] += t1[c]
                s2[c] += t2[c]
        return
    for a in range(na):
        for c in range(nc):
            r = ref[c]
            for j in range(0, nb, _SMALL_TERMS):
                xr = x[a, c, j : min(j + _SMALL_TERMS, nb)]
                g = xr if dy is None else dy[a, c, j : min(j + _SMALL_TERMS, nb)]
                t1 = zero
                t2 = zero
                for i in range(xr.shape[0]):
                    d = _load(xr[i]) - r
                    u = d if dy is None else _load(g[i])
                    t1 += u
                    t2 += u * d
                s1[c] += t1
                s2[c] += t2


@numba.njit(**_MAP)
def _small_map(
    x: Any, dy: Any, mean: Any, xc_scale: Any, dy_scale: Any, shift: Any, out: Any
) -> None:
    """``out = dy · dy_scale + (x − mean) · xc_scale + shift`` (`dy` None:
    ``(x − mean) · xc_scale + shift``; `shift` None: no shift) over C-contiguous
    (A, C, B) arrays, in the order of roundings of the generic kernels."""
    na, nc, nb = x.shape
    x2, o2 = x.reshape(na, nc * nb), out.reshape(na, nc * nb)
    g2 = x2 if dy is None else dy.reshape(na, nc * nb)
    if nb == 1:  # rows of channels: the channels are the inner loop
        s = xc_scale if dy is None else dy_scale
        for a in range(na):
            xr, g, o = x2[a], g2[a], o2[a]
            for c in range(nc):
                if dy is None:
                    v = (_load(xr[c]) - mean[c]) * xc_scale[c]
                else:
                    v = _load(g[c]) * s[c] + (_load(xr[c]) - mean[c]) * xc_scale[c]
                if shift is not None:
                    v = v + shift[c]
                o[c] = _store(v, o[0])
        return
    for a in range(na):
        for c in range(nc):
            xr, o = x[a, c], out[a, c]
            g = xr if dy is None else dy[a, c]
            m, r = mean[c], xc_scale[c]
            s = r if dy is None else dy_scale[c]
            t = r if shift is None else shift[c]
            for i in range(nb):
                if dy is None:
                    v = (_load(xr[i]) - m) * r
                else:
                    v = _load(g[i]) * s + (_load(xr[i]) - m) * r
                if shift is not None:
                    v = v + t
                o[i] = _store(v, o[0])


@numba.njit(nogil=True, cache=True)
def _small_forward(x: Any, gamma: Any, beta: Any, eps: Any, y: Any, stats: Any) -> None:
    """Statistics, scales and ``y = (x − mean) · scale + shift`` of an (A, C, B)
    array; `stats` gets the rows mean, var and invstd (compute dtype)."""
    na, nc, nb = x.shape
    m = na * nb
    mean, var, invstd = stats[0], stats[1], stats[2]
    ref = np.empty_like(mean)
    p0, p1, p2 = int(_AT[0] * (m - 1)), int(_AT[1] * (m - 1)), int(_AT[2] * (m - 1))
    for c in range(nc):  # as _cpu.reference: the median of three values
        first = _load(x[p0 // nb, c, p0 % nb])
        middle = _load(x[p1 // nb, c, p1 % nb])
        last = _load(x[p2 // nb, c, p2 % nb])
        low, high = np.minimum(first, middle), np.maximum(first, middle)
        ref[c] = np.maximum(low, np.minimum(high, last))
    s1 = np.zeros(nc)
    s2 = np.zeros(nc)
    _small_sums(x, ref, None, s1, s2)
    scale = np.empty_like(mean)
    one = np.ones(1, mean.dtype)[0]
    for c in range(nc):
        dmean = s1[c] / m
        mean[c] = ref[c] + dmean
        var[c] = max(s2[c] / m - dmean * dmean, 0.0)
        invstd[c] = one / np.sqrt(var[c] + eps)
        scale[c] = invstd[c] if gamma is None else invstd[c] * gamma[c]
    _small_map(x, None, mean, scale, None, beta, y)


@numba.njit(nogil=True, cache=True)
def _small_backward(
    dy: Any, x: Any, mean: Any, invstd: Any, gamma: Any, m: Any, dx: Any, grads: Any
) -> None:
    """``dx`` of a training forward pass of an (A, C, B) array; `grads` gets
    the rows dweight and Σ dy (compute dtype)."""
    nc = x.shape[1]
    s1 = np.zeros(nc)
    s2 = np.zeros(nc)
    _small_sums(x, mean, dy, s1, s2)
    dweight, sum_dy = grads[0], grads[1]
    dy_scale = np.empty_like(mean)
    xc_scale = np.empty_like(mean)
    shift = np.empty_like(mean)
    for c in range(nc):
        sum_dy[c] = s1[c]
        dweight[c] = s2[c]  # rounded to the compute dtype, as grad_sums returns it
        dweight[c] = dweight[c] * invstd[c]
        dy_scale[c] = invstd[c] if gamma is None else invstd[c] * gamma[c]
        xc_scale[c] = -dy_scale[c] * (dweight[c] / m) * invstd[c]
        shift[c] = -dy_scale[c] * (sum_dy[c] / m)
    _small_map(x, dy, mean, xc_scale, dy_scale, shift, dx)


def small_forward(
    x: np.ndarray,
    channel_shape: tuple[int, ...],
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A training forward pass of a small C-contiguous `x` whose per-channel
    arrays have the broadcast shape `channel_shape`: y (in `out` where given),
    and the mean, biased variance and invstd as (C,) arrays of the compute
    dtype (what ``batch_stats``, ``forward_scales`` and ``normalize`` give).
    `gamma` and `beta`, of the compute dtype, may have any shape of C
    values."""
    x3 = _cpu.view3(x, channel_shape)
    dtype = _cpu.compute_dtype(x.dtype)
    y = np.empty(x.shape, dtype=x.dtype) if out is None else out
    stats = np.empty((3, x3.shape[1]), dtype=dtype)
    _small_forward(
        _bits3(x3),
        _flat(gamma),
        _flat(beta),
        dtype.type(eps),
        _bits3(y.reshape(x3.shape)),
        stats,
    )
    return y, stats[0], stats[1], stats[2]


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
    """The training backward pass of small C-contiguous `x` and `dy` whose
    per-channel arrays have the broadcast shape `channel_shape`: dx (in `out`
    where given), and dweight and Σ dy as (C,) arrays of `mean`'s dtype (what
    ``grad_sums``, ``backward_scales`` and ``grad_input`` give). `mean`,
    `invstd` and `gamma` may have any shape of C values."""
    x3 = _cpu.view3(x, channel_shape)
    dtype = mean.dtype
    dx = np.empty(x.shape, dtype=x.dtype) if out is None else out
    grads = np.empty((2, x3.shape[1]), dtype=dtype)
    _small_backward(
        _bits3(dy.reshape(x3.shape)),
        _bits3(x3),
        _flat(mean),
        _flat(invstd),
        _flat(gamma),
        dtype.type(count),
        _bits3(dx.reshape(x3.shape)),
        grads,
    )
    return dx, grads[0], grads[1]


def _bits3(a: np.ndarray) -> np.ndarray:
    """`a` as the small loops take it: float16 as its bits."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _flat(v: np.ndarray | None) -> np.ndarray | None:
    """A per-channel array (or None) as the small loops take it: 1-D."""
    return v if v is None or v.ndim == 1 else v.reshape(-1)


# The running statistics: seven NumPy operations on per-channel arrays took
# 2.7 µs, a tenth of a training step on 64×100 float32; one loop takes 1 µs.
_UPDATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@numba.njit(nogil=True, cache=True)
def _running_update(
    running_mean: Any, running_var: Any, mean: Any, var: Any, factor: Any, bessel: Any
) -> tuple[Any, Any]:
    """:func:`bnarray._math.running_update` of 1-D arrays of one dtype, with
    its roundings: each Python float rounded to the dtype, no fused
    multiply-add."""
    one = running_mean.dtype.type
    keep, weight, unbias = one(1.0 - factor), one(factor), one(bessel)
    new_mean = np.empty_like(running_mean)
    new_var = np.empty_like(running_var)
    for i in range(running_mean.shape[0]):
        new_mean[i] = keep * running_mean[i] + weight * mean[i]
        new_var[i] = keep * running_var[i] + weight * (var[i] * unbias)
    return new_mean, new_var


def running_update(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    *,
    factor: float,
    bessel: float,
    xp: Namespace,
) -> tuple[Array, Array]:
    """See :func:`bnarray._math.running_update`, bit for bit: one loop where
    the four arrays are NumPy arrays of one shape and one dtype, float32 or
    float64, and `bessel` a Python float (a masked forward's is an array);
    else the generic arithmetic."""
    dtype, shape = running_mean.dtype, running_mean.shape
    if not (
        type(bessel) is float
        and dtype in _UPDATE_DTYPES
        and running_var.dtype == dtype
        and mean.dtype == dtype
        and var.dtype == dtype
        and type(running_mean) is type(running_var) is np.ndarray
        and type(mean) is type(var) is np.ndarray
        and running_var.shape == mean.shape == var.shape == shape
    ):
        return _math.running_update(
            running_mean,
            running_var,
            mean,
            var,
            factor=factor,
            bessel=bessel,
            xp=xp,
        )
    if len(shape) != 1:
        running_mean, running_var, mean, var = (
            a.reshape(-1) for a in (running_mean, running_var, mean, var)
        )
    new_mean, new_var = _running_update(
        running_mean, running_var, mean, var, factor, bessel
    )
    if len(shape) != 1:
        return new_mean.reshape(shape), new_var.reshape(shape)
    return new_mean, new_var
