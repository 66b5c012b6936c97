"""CuPy kernels: each generic kernel as one fused elementwise or reduction CUDA kernel.

Each statistics pass reads its inputs once: the two sums it needs are
accumulated together, so training forward reads `x` twice and writes `y`
once, and backward reads `x` and `dy` twice and writes `dx` once: the bytes
the generic math cannot do without.

Imported only for CuPy arrays (see :func:`bnarray._fast.kernels_for`), so CuPy
is never imported for other libraries. The CUDA source comes from
:mod:`bnarray._fast._cuda`; this module compiles it (on first use), sizes the
launches and makes them. The results are checked against the generic kernels
by ``tests/test_cupy_kernels.py`` where CuPy and a GPU are available; the
sources and launches, without a GPU, by ``tests/test_cuda_sources.py``.

Every kernel works on `x` in its own shape and strides, with the per-channel
arrays broadcast (they arrive in the keepdims shape), so any layout and any
tuple of axes is served: C-contiguous arrays with one channel axis by the
hand-written kernels, the others by kernels CuPy generates.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, NamedTuple

import cupy
import numpy

from .. import _math
from .._compat import Array, Namespace
from . import _cuda

__all__ = [
    "backward_scales",
    "batch_stats",
    "forward_scales",
    "grad_input",
    "grad_sums",
    "normalize",
    "running_update",
]


def _compute_dtype(dtype: numpy.dtype) -> numpy.dtype:
    """:func:`bnarray._math.compute_dtype` as a NumPy dtype (CuPy's dtypes are NumPy's)."""
    compute: numpy.dtype = numpy.dtype(_math.compute_dtype(dtype, numpy))  # type: ignore[call-overload]
    return compute


# CuPy's generated kernels: any layout.


@cache
def _elementwise_kernel(name: str) -> Any:
    """`_cuda.ELEMENTWISE[name]`, or the mean and variance from the sums of
    `_pair_reduction("stats", ...)` for ``"moments"``."""
    if name == "moments":
        return cupy.ElementwiseKernel(**_cuda.moments_kernel())
    return cupy.ElementwiseKernel(**_cuda.elementwise_kernel(name))


@cache
def _pair_reduction(name: str, compute: str) -> Any:
    """The two sums of `_cuda.PAIR_SUMS[name]` as one complex sum."""
    return cupy.ReductionKernel(**_cuda.pair_reduction(name, compute))


def _pair_sums(
    kernel: Any, args: tuple[Array, ...], reduce_axes: tuple[int, ...]
) -> tuple[Array, Array]:
    """Both per-channel sums of a pair reduction, in the keepdims shape.

    With several reduced axes, the first reduced axis (the batch, in every
    usual layout) is summed in a second, tiny step: one CUDA block per output
    would otherwise leave most of the GPU idle when there are few channels.
    """
    if len(reduce_axes) > 1:
        partial = kernel(*args, axis=reduce_axes[1:], keepdims=True)
        total = partial.sum(axis=reduce_axes[:1], keepdims=True)
    else:
        total = kernel(*args, axis=reduce_axes, keepdims=True)
    # Contiguous copies (one value per channel) rather than strided views.
    return cupy.ascontiguousarray(total.real), cupy.ascontiguousarray(total.imag)


# The hand-written kernels: C-contiguous arrays with one channel axis, seen as
# (outer, C, inner).


@cache
def _raw_kernel(kind: str, name: str, dtype: str, compute: str, index: str) -> Any:
    """The kernel of `kind` for formula `name`: see :func:`bnarray._fast._cuda.raw_source`."""
    return cupy.RawKernel(*_cuda.raw_source(kind, name, dtype, compute, index))


_THREADS = 256
# Runs of one channel at least this long are served one block per run.
_LONG_RUN = 1024
# Shorter runs in rows of at least this many values: one thread per column.
_COLUMNS_MIN_WIDTH = 32
# The most blocks along a grid's y axis.
_MAX_GRID_Y = 65535


@cache
def _multiprocessors(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _view(
    full: tuple[Array, ...], channel_shape: tuple[int, ...]
) -> tuple[int, int, int] | None:
    """(outer, C, inner) when the full-size arrays are C-contiguous and the
    per-channel arrays (of `channel_shape`, in the keepdims form) vary along
    at most one axis; else None (CuPy's generated kernels serve)."""
    x = full[0]
    if x.size == 0 or not all(a.flags.c_contiguous for a in full):
        return None
    varying = [a for a, n in enumerate(channel_shape) if n != 1]
    if not varying:
        return 1, 1, x.size
    if len(varying) > 1:
        return None
    (a,) = varying
    return math.prod(x.shape[:a]), x.shape[a], math.prod(x.shape[a + 1 :])


def _index_type(n: int) -> tuple[str, Any]:
    if n < 2**31:
        return "unsigned int", numpy.uint32
    return "unsigned long long", numpy.uint64


def _contiguous(a: Array, dtype: Any) -> Array:
    """`a`'s values, C-contiguous and in `dtype` (a kernel sees a pointer only)."""
    if a.dtype == dtype and a.flags.c_contiguous:
        return a
    return cupy.ascontiguousarray(a.reshape(-1), dtype=dtype)


def _channel_shaped(a: Array, mean: Array) -> Array:
    """`a` broadcast to the keepdims shape of `mean` (one value per channel)."""
    return a if a.shape == mean.shape else cupy.broadcast_to(a, mean.shape)


def _two_per_thread(view: tuple[int, int, int], full: tuple[Array, ...]) -> bool:
    """Whether the columns kernels can take two values per thread (the kinds
    ``elementwise_columns2`` and ``columns2`` of `_cuda.KINDS`): float16
    channels last with an even number of channels, every full-size array
    aligned to 4 bytes (a view can start between two values)."""
    _, channels, inner = view
    return (
        full[0].dtype.char == "e"
        and inner == 1
        and channels % 2 == 0
        and all(a.data.ptr % 4 == 0 for a in full)
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Launch(NamedTuple):
    kind: str  # of `_cuda.KINDS`
    grid: tuple[int, ...]
    block: tuple[int, ...]
    sizes: tuple[int, ...]  # the kernel's index-typed arguments, after the arrays


def _elementwise_launch(
    view: tuple[int, int, int], two_per_thread: bool, sms: int
) -> _Launch:
    """How an elementwise kernel covers the (outer, C, inner) view on a GPU of
    `sms` multiprocessors."""
    outer, channels, inner = view
    if inner >= _LONG_RUN:
        # Block (row, chunk): the chunk-th piece of a run of one channel.
        rows = outer * channels
        chunks = min(max(1, _ceil_div(8 * sms, rows)), max(1, inner // 2048))
        chunks = min(chunks, _MAX_GRID_Y)
        chunk = _ceil_div(inner, chunks)
        return _Launch(
            "elementwise_rows", (rows, chunks), (_THREADS,), (channels, inner, chunk)
        )
    width = channels * inner
    if width >= _COLUMNS_MIN_WIDTH:
        # Block (tile, chunk): `tx` neighbouring columns (or pairs of columns)
        # of the (outer, C * inner) view, over `rows` rows.
        threads = width // 2 if two_per_thread else width
        tx = min(_THREADS, 32 * _ceil_div(threads, 32))
        ty = _THREADS // tx
        tiles = _ceil_div(threads, tx)
        chunks = min(max(1, _ceil_div(32 * sms, tiles)), _ceil_div(outer, ty))
        rows = _ceil_div(outer, min(chunks, _MAX_GRID_Y))
        kind = "elementwise_columns2" if two_per_thread else "elementwise_columns"
        grid = (tiles, _ceil_div(outer, rows))
        return _Launch(kind, grid, (tx, ty), (outer, width, inner, rows))
    n = outer * width
    blocks = min(_ceil_div(n, _THREADS), 32 * sms)
    return _Launch("elementwise", (blocks,), (_THREADS,), (n, channels, inner))


def _sums_launch(
    view: tuple[int, int, int], two_per_thread: bool, sms: int
) -> tuple[_Launch, tuple[int, int]]:
    """How a pair-sums kernel covers the (outer, C, inner) view on a GPU of
    `sms` multiprocessors, and (A, B) of the partial sums it leaves, which lie
    as (2, A, C, B) for the ``finish`` kernel."""
    outer, channels, inner = view
    target = 8 * sms  # blocks enough to fill the GPU
    if inner >= _LONG_RUN:
        # Runs of `inner` contiguous values share a channel: one block per run
        # (or per piece of a long run).
        rows = outer * channels
        chunks = min(max(1, _ceil_div(target, rows)), max(1, inner // 1024))
        chunks = min(chunks, _MAX_GRID_Y)
        chunk = _ceil_div(inner, chunks)
        launch = _Launch("rows", (rows, chunks), (_THREADS,), (channels, inner, chunk))
        return launch, (outer, chunks)
    # Short runs: a warp reads 32 neighbouring values of a row of the
    # (outer, C * inner) view and each thread sums down its column (or pair
    # of columns).
    width = channels * inner
    tiles = _ceil_div(width // 2 if two_per_thread else width, 32)
    chunks = min(max(1, _ceil_div(target, tiles)), max(1, outer // 64))
    rows = _ceil_div(outer, min(chunks, _MAX_GRID_Y))
    chunks = _ceil_div(outer, rows)
    kind = "columns2" if two_per_thread else "columns"
    launch = _Launch(kind, (tiles, chunks), (32, 8), (outer, width, inner, rows))
    return launch, (chunks, inner)


def _raw_elementwise(
    name: str,
    view: tuple[int, int, int],
    full: tuple[Array, ...],
    channel: tuple[Array, ...],
    out: Array | None = None,
) -> Array:
    """``out = expr`` of `_cuda.ELEMENTWISE[name]` over the (outer, C, inner)
    view of the full-size arrays, into a new array or the C-contiguous `out`."""
    like = full[0]
    compute = _compute_dtype(like.dtype)
    index, itype = _index_type(like.size)
    out = cupy.empty_like(like) if out is None else out
    args = (*full, *(_contiguous(a, compute) for a in channel), out)
    sms = _multiprocessors(like.device.id)
    launch = _elementwise_launch(view, _two_per_thread(view, full), sms)
    kernel = _raw_kernel(launch.kind, name, like.dtype.char, compute.char, index)
    kernel(launch.grid, launch.block, (*args, *map(itype, launch.sizes)))
    return out


def _raw_pair_sums(
    name: str,
    view: tuple[int, int, int],
    full: tuple[Array, ...],
    channel: tuple[Array, ...],
) -> tuple[Array, Array]:
    """The two finished per-channel outputs, shape (C,), of `_cuda.PAIR_SUMS[name]`
    over the (outer, C, inner) view of the full-size arrays.

    Each block writes its partial sums; a second kernel adds each channel's
    and finishes them.
    """
    outer, channels, inner = view
    x = full[0]
    compute = _compute_dtype(x.dtype)
    index, itype = _index_type(x.size)
    args = (*full, *(_contiguous(a, compute) for a in channel))
    sms = _multiprocessors(x.device.id)
    launch, (parts_a, parts_b) = _sums_launch(view, _two_per_thread(view, full), sms)
    kernel = _raw_kernel(launch.kind, name, x.dtype.char, compute.char, index)
    part = cupy.empty((2, parts_a, channels, parts_b), dtype=compute)
    kernel(launch.grid, launch.block, (*args, part, *map(itype, launch.sizes)))
    out = cupy.empty((2, channels), dtype=compute)
    finish = _raw_kernel("finish", name, x.dtype.char, compute.char, index)
    sizes = (parts_a, channels, parts_b, inner)
    count = compute.type(outer * inner)
    finish(
        (channels,), (_THREADS,), (part, x, *map(itype, sizes), count, out[0], out[1])
    )
    return out[0], out[1]


def _zeros(like: Array) -> Array:
    return cupy.zeros((1,) * like.ndim, dtype=like.dtype)


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance: see :func:`bnarray._math.batch_stats`.

    Sums of deviations from a per-channel reference value (the channel's first
    value): E[d²] − E[d]² with d = x − ref does not cancel the way E[x²] − E[x]²
    does when the mean is large against the spread.
    """
    compute = _compute_dtype(x.dtype)
    shape = tuple(1 if a in reduce_axes else n for a, n in enumerate(x.shape))
    view = _view((x,), shape)
    if view is not None:
        # The kernels read each channel's reference value from x itself.
        mean, var = _raw_pair_sums("stats", view, (x,), ())
        return mean.reshape(shape), var.reshape(shape)
    first = tuple(
        slice(0, 1) if a in reduce_axes else slice(None) for a in range(x.ndim)
    )
    ref = x[first].astype(compute)
    sums = _pair_sums(_pair_reduction("stats", compute.char), (x, ref), reduce_axes)
    m = compute.type(x.size // ref.size)
    mean, var = _elementwise_kernel("moments")(*sums, ref, m)
    return mean, var


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
    view = _view((x,), mean.shape)
    if view is None:
        shift = _zeros(mean) if shift is None else shift
        return _elementwise_kernel("normalize")(x, mean, scale, shift, *_given(out))
    name = "normalize" if shift is not None else "normalize_scale"
    channel = (mean, scale) if shift is None else (mean, scale, shift)
    channel = tuple(_channel_shaped(a, mean) for a in channel)
    return _raw_elementwise(name, view, (x,), channel, out)


def _given(out: Array | None) -> tuple[Array, ...]:
    """The output argument of an ``ElementwiseKernel`` call, if there is one
    (the kernel allocates its output where it is left out)."""
    return () if out is None else (out,)


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``: see :func:`bnarray._math.grad_sums`."""
    view = _view((dy, x), mean.shape)
    if view is None:
        kernel = _pair_reduction("grad", mean.dtype.char)
        return _pair_sums(kernel, (dy, x, mean), reduce_axes)
    s1, s2 = _raw_pair_sums("grad", view, (dy, x), (mean,))
    return s1.reshape(mean.shape), s2.reshape(mean.shape)


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
    only_scale = xc_scale is None and shift is None
    view = _view((dy,) if only_scale else (dy, x), mean.shape)
    if only_scale:
        if view is None:
            return _elementwise_kernel("scale")(dy, dy_scale, *_given(out))
        return _raw_elementwise(
            "scale", view, (dy,), (_channel_shaped(dy_scale, mean),), out
        )
    zero = _zeros(mean)
    channel = (
        mean,
        dy_scale,
        zero if xc_scale is None else xc_scale,
        zero if shift is None else shift,
    )
    if view is None:
        return _elementwise_kernel("grad_input")(dy, x, *channel, *_given(out))
    channel = tuple(_channel_shaped(a, mean) for a in channel)
    return _raw_elementwise("grad_input", view, (dy, x), channel, out)


def _channel_kernel(
    name: str, dtype: Any, compute: Any, n: int, args: tuple[Any, ...]
) -> None:
    """Launch the kernel of `_cuda.CHANNEL[name]` over `n` channels."""
    index, itype = _index_type(n)
    kernel = _raw_kernel("channel", name, dtype.char, compute.char, index)
    blocks = min(_ceil_div(n, _THREADS), 65535)
    kernel((blocks,), (_THREADS,), (*args, itype(n)))


def forward_scales(
    var: Array, gamma: Array | None, eps: float, *, xp: Namespace
) -> tuple[Array, Array]:
    """``invstd`` and ``scale``, in one launch: see :func:`bnarray._math.forward_scales`."""
    if var.size == 0:
        return _math.forward_scales(var, gamma, eps, xp=xp)
    dtype = var.dtype
    flat = _contiguous(var, dtype)
    out = cupy.empty((2, var.size), dtype=dtype)
    args = (
        flat,
        flat if gamma is None else _contiguous(gamma, dtype),
        dtype.type(eps),
        numpy.int32(gamma is not None),
        out[0],
        out[1],
    )
    _channel_kernel("forward_scales", dtype, dtype, var.size, args)
    return out[0].reshape(var.shape), out[1].reshape(var.shape)


def backward_scales(
    sum_dy: Array,
    sum_dy_xc: Array,
    invstd: Array,
    gamma: Array | None,
    count: int,
    *,
    training: bool,
    xp: Namespace,
) -> tuple[Array, Array, Array | None, Array | None]:
    """The operands of the backward pass, in one launch: see
    :func:`bnarray._math.backward_scales`."""
    if invstd.size == 0:
        return _math.backward_scales(
            sum_dy, sum_dy_xc, invstd, gamma, count, training=training, xp=xp
        )
    dtype = invstd.dtype
    s = _contiguous(invstd, dtype)
    out = cupy.empty((4, invstd.size), dtype=dtype)
    args = (
        _contiguous(sum_dy, dtype),
        _contiguous(sum_dy_xc, dtype),
        s,
        s if gamma is None else _contiguous(gamma, dtype),
        dtype.type(count),
        numpy.int32(gamma is not None),
        numpy.int32(training),
        *out,
    )
    _channel_kernel("backward_scales", dtype, dtype, invstd.size, args)
    dweight, dy_scale, xc_scale, shift = (a.reshape(invstd.shape) for a in out)
    if not training:
        return dweight, dy_scale, None, None
    return dweight, dy_scale, xc_scale, shift


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
    """The new running statistics, in one launch: see
    :func:`bnarray._math.running_update`.

    float16 running statistics (rounded after every operation by the generic
    path) and running statistics of two dtypes take the generic path.
    """
    dtype = running_mean.dtype
    if running_var.dtype != dtype or dtype.char not in "fd" or mean.size == 0:
        return _math.running_update(
            running_mean, running_var, mean, var, factor=factor, bessel=bessel, xp=xp
        )
    new_mean = cupy.empty(running_mean.shape, dtype=dtype)
    new_var = cupy.empty(running_var.shape, dtype=dtype)
    args = (
        _contiguous(running_mean, dtype),
        _contiguous(running_var, dtype),
        _contiguous(mean, mean.dtype),
        _contiguous(var, var.dtype),
        dtype.type(1.0 - factor),
        dtype.type(factor),
        dtype.type(bessel),
        new_mean,
        new_var,
    )
    _channel_kernel("running_update", dtype, mean.dtype, mean.size, args)
    return new_mean, new_var
