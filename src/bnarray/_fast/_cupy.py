"""CuPy kernels: each generic kernel as one fused elementwise or reduction CUDA kernel.

Each statistics pass reads its inputs once: the two sums it needs are
accumulated together (as one complex number), so training forward reads `x`
twice and writes `y` once, and backward reads `x` and `dy` twice and writes
`dx` once: the bytes the generic math cannot do without.

Imported only for CuPy arrays (see :func:`bnarray._fast.kernels_for`), so CuPy
is never imported for other libraries. The CUDA kernels are compiled on first
use. Their results are checked against the generic kernels by
``tests/test_fast_paths.py`` where CuPy and a GPU are available.

Every kernel works on `x` in its own shape and strides, with the per-channel
arrays broadcast (they arrive in the keepdims shape), so any layout and any
tuple of axes is served. ``T`` is the dtype of `x`, ``S`` the compute dtype
(float32 for float16 `x`).
"""

from __future__ import annotations

import math
import re
from functools import cache
from typing import Any

import cupy
import numpy

from .. import _math
from .._compat import Array, Namespace

__all__ = [
    "backward_scales",
    "batch_stats",
    "forward_scales",
    "grad_input",
    "grad_sums",
    "normalize",
    "running_update",
]


# The two per-channel sums each reduction needs travel as the real and imaginary
# parts of one complex accumulator, so one kernel reads its inputs once.
_PAIR = {
    "f": ("float", "complex64"),
    "d": ("double", "complex128"),
}


def _pair_reduction(
    name: str, params: str, first: str, second: str, ctype: str, out: str
) -> Any:
    pair = f"complex<{ctype}>"
    return cupy.ReductionKernel(
        params,
        f"{out} total",
        f"{pair}({first}, {second})",
        "a + b",
        "total = a",
        "0",
        f"bnarray_{name}_{ctype}",
        reduce_type=pair,
    )


@cache
def _reductions(compute: str) -> dict[str, Any]:
    ctype, out = _PAIR[compute]
    d = "((S)x - shift)"
    return {
        # Σ d and Σ d² with d = x - shift, in one pass over x.
        "shifted_sums": _pair_reduction(
            "shifted_sums", "T x, S shift", d, f"{d} * {d}", ctype, out
        ),
        # Σ dy and Σ dy · (x - mean), in one pass over dy and x.
        "grad_sums": _pair_reduction(
            "grad_sums",
            "T dy, T x, S mean",
            "(S)dy",
            "(S)dy * ((S)x - mean)",
            ctype,
            out,
        ),
    }


@cache
def _elementwise() -> dict[str, Any]:
    return {
        "normalize": cupy.ElementwiseKernel(
            "T x, S mean, S scale, S shift",
            "T y",
            "y = (T)(((S)x - mean) * scale + shift)",
            "bnarray_normalize",
        ),
        "grad_input": cupy.ElementwiseKernel(
            "T dy, T x, S mean, S dy_scale, S xc_scale, S shift",
            "T dx",
            "dx = (T)((S)dy * dy_scale + ((S)x - mean) * xc_scale + shift)",
            "bnarray_grad_input",
        ),
        "scale": cupy.ElementwiseKernel(
            "T dy, S dy_scale", "T dx", "dx = (T)((S)dy * dy_scale)", "bnarray_scale"
        ),
        # Mean and biased variance from the sums of d = x - shift over m values.
        "moments": cupy.ElementwiseKernel(
            "S sum_d, S sum_d2, S shift, S m",
            "S mean, S var",
            # `v < 0 ? 0 : v` rather than max(): a NaN variance stays NaN.
            "S d = sum_d / m; S v = sum_d2 / m - d * d;"
            " mean = shift + d; var = v < (S)0 ? (S)0 : v",
            "bnarray_moments",
        ),
    }


_COMPUTE = {
    "e": numpy.dtype("float32"),
    "f": numpy.dtype("float32"),
    "d": numpy.dtype("float64"),
}


def _compute_dtype(dtype: Any) -> Any:
    """float32 for 16-bit and 32-bit `dtype`, float64 for float64."""
    return _COMPUTE[dtype.char]


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


# Contiguous arrays with one channel axis (NCHW, NHWC and their kin) get
# hand-written CUDA kernels: the generic kernels above compute every operand's
# offset from the element's multi-index, which costs more than the memory
# traffic on large arrays. Such an `x` is seen as (outer, C, inner).

# Keyed by `dtype.char` (a cheap attribute, unlike `dtype.name`).
_CTYPES = {"e": "unsigned short", "f": "float", "d": "double"}

# float16 travels as its bits, converted in registers (no CUDA headers needed).
_PRELUDE = r"""
__device__ __forceinline__ float load(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ double load(double v) { return v; }
__device__ __forceinline__ unsigned short half_bits(float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
}
__device__ __forceinline__ void store(unsigned short* p, float v) { *p = half_bits(v); }
// Two neighbouring float16 values, loaded and stored as one 32-bit word.
struct __align__(4) bits2 { unsigned short h[2]; };
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// Products and sums rounded one at a time (never fused into an FMA), as the
// generic path's array operations round them.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// p and q summed over a one-dimensional block of a multiple of 32 threads;
// the totals are those of thread 0.
__device__ __forceinline__ void block_sums(S& p, S& q) {
    for (int o = 16; o > 0; o >>= 1) {
        p += __shfl_down_sync(0xffffffffu, p, o);
        q += __shfl_down_sync(0xffffffffu, q, o);
    }
    __shared__ S shared_p[32], shared_q[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { shared_p[warp] = p; shared_q[warp] = q; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        p = lane < warps ? shared_p[lane] : (S)0;
        q = lane < warps ? shared_q[lane] : (S)0;
        for (int o = 16; o > 0; o >>= 1) {
            p += __shfl_down_sync(0xffffffffu, p, o);
            q += __shfl_down_sync(0xffffffffu, q, o);
        }
    }
}
"""

_ELEMENTWISE_SOURCE = r"""
extern "C" __global__ void bnarray_NAME(ARGS, T* __restrict__ out, I n, I channels, I inner) {
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (I)blockDim.x * gridDim.x) {
        const I c = inner == 1 ? i % channels : (i / inner) % channels;
        store(out + i, (S)(EXPR));
    }
}
"""

# Long runs of one channel: block (row, chunk) writes the chunk-th piece of
# row `row` = (o, c) of the (outer, C, inner) view, with no division per value.
_ELEMENTWISE_ROWS_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_rows(ARGS, T* __restrict__ out, I channels, I inner,
                                   I chunk) {
    const I row = blockIdx.x;
    const I c = row % channels;
    const I start = (I)blockIdx.y * chunk;
    const I stop = min(start + chunk, inner);
    for (I j = start + threadIdx.x; j < stop; j += blockDim.x) {
        const size_t i = (size_t)row * inner + j;
        store(out + i, (S)(EXPR));
    }
}
"""

# Short runs (inner < _LONG_RUN) in rows of at least 32 values: block (tile,
# chunk) writes its tile of neighbouring columns of the (outer, C * inner) view
# over rows [chunk * rows, (chunk + 1) * rows); each thread finds its channel
# once, and its per-channel operands stay in registers.
_ELEMENTWISE_COLUMNS_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_columns(ARGS, T* __restrict__ out, I outer, I width,
                                      I inner, I rows) {
    const I col = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= width) return;
    const I c = col / inner;
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    #pragma unroll 4
    for (I r = first + threadIdx.y; r < last; r += blockDim.y) {
        const size_t i = (size_t)r * width + col;
        store(out + i, (S)(EXPR));
    }
}
"""

# The same for float16 channels last (inner 1, an even number of channels),
# two neighbouring columns per thread: the loads and stores of both are one
# 32-bit access (LOADS; EXPR0 and EXPR1 are EXPR for columns c and c + 1).
_ELEMENTWISE_COLUMNS2_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_columns2(ARGS, T* __restrict__ out, I outer, I width,
                                       I inner, I rows) {
    const I col = 2 * ((I)blockIdx.x * blockDim.x + threadIdx.x);
    if (col >= width) return;
    const I c = col;
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    #pragma unroll 4
    for (I r = first + threadIdx.y; r < last; r += blockDim.y) {
        const size_t i = (size_t)r * width + col;
        LOADS
        bits2 v;
        v.h[0] = half_bits((S)(EXPR0));
        v.h[1] = half_bits((S)(EXPR1));
        *(bits2*)(out + i) = v;
    }
}
"""

# Σ p and Σ q over one channel's contiguous runs (inner > 1): block (row, chunk)
# sums the chunk-th piece of row `row` = (o, c) of the (outer, C, inner) view
# and writes them to out[k] and out[half + k], k = (o, c, chunk).
_ROWS_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_rows(ARGS, S* __restrict__ out, I channels, I inner,
                                   I chunk) {
    const I row = blockIdx.x;
    const I c = row % channels;
    const I start = (I)blockIdx.y * chunk;
    const I stop = min(start + chunk, inner);
    const S ref = REF;
    const size_t base = (size_t)row * inner;
    const I step = blockDim.x;
    S p = 0, q = 0;
    I j = start + threadIdx.x;
    for (; j + 7 * step < stop; j += 8 * step) {
        EIGHT(base + j + K * step)
    }
    for (; j < stop; j += step) {
        const size_t i = base + j;
        MAP
    }
    block_sums(p, q);
    if (threadIdx.x == 0) {
        const size_t k = (size_t)row * gridDim.y + blockIdx.y;
        const size_t half = (size_t)gridDim.x * gridDim.y;
        out[k] = p;
        out[half + k] = q;
    }
}
"""

# Σ p and Σ q down the columns of the (outer, C * inner) view (inner small):
# a warp reads 32 neighbouring columns of a row; block (tile, chunk) sums rows
# [chunk * rows, (chunk + 1) * rows) of its 32 columns and writes them to
# out[k] and out[half + k], k = (chunk, column).
_COLUMNS_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_columns(ARGS, S* __restrict__ out, I outer, I width,
                                      I inner, I rows) {
    const I col = (I)blockIdx.x * 32 + threadIdx.x;
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    S p = 0, q = 0;
    if (col < width) {
        const I c = col / inner;
        const S ref = REF;
        const I step = blockDim.y;
        I r = first + threadIdx.y;
        for (; r + 7 * step < last; r += 8 * step) {
            EIGHT((size_t)(r + K * step) * width + col)
        }
        for (; r < last; r += step) {
            const size_t i = (size_t)r * width + col;
            MAP
        }
    }
    __shared__ S shared_p[8][33], shared_q[8][33];
    shared_p[threadIdx.y][threadIdx.x] = p;
    shared_q[threadIdx.y][threadIdx.x] = q;
    __syncthreads();
    if (threadIdx.y == 0 && col < width) {
        for (int t = 1; t < blockDim.y; ++t) {
            p += shared_p[t][threadIdx.x];
            q += shared_q[t][threadIdx.x];
        }
        const size_t k = (size_t)blockIdx.y * width + col;
        const size_t half = (size_t)gridDim.y * width;
        out[k] = p;
        out[half + k] = q;
    }
}
"""

# The same for float16 channels last (inner 1, an even number of channels),
# two neighbouring columns per thread (see _ELEMENTWISE_COLUMNS2_SOURCE): a
# thread sums each of its columns as a thread above sums its one.
_COLUMNS2_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_columns2(ARGS, S* __restrict__ out, I outer, I width,
                                       I inner, I rows) {
    const I col = 2 * ((I)blockIdx.x * 32 + threadIdx.x);
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    S p0 = 0, q0 = 0, p1 = 0, q1 = 0;
    if (col < width) {
        const I c = col;
        const S ref0 = REF0, ref1 = REF1;
        const I step = blockDim.y;
        I r = first + threadIdx.y;
        for (; r + 7 * step < last; r += 8 * step) {
            EIGHT((size_t)(r + K * step) * width + col)
        }
        for (; r < last; r += step) {
            const size_t i = (size_t)r * width + col;
            MAP
        }
    }
    __shared__ S shared[4][8][33];
    shared[0][threadIdx.y][threadIdx.x] = p0;
    shared[1][threadIdx.y][threadIdx.x] = q0;
    shared[2][threadIdx.y][threadIdx.x] = p1;
    shared[3][threadIdx.y][threadIdx.x] = q1;
    __syncthreads();
    if (threadIdx.y == 0 && col < width) {
        for (int t = 1; t < blockDim.y; ++t) {
            p0 += shared[0][t][threadIdx.x];
            q0 += shared[1][t][threadIdx.x];
            p1 += shared[2][t][threadIdx.x];
            q1 += shared[3][t][threadIdx.x];
        }
        const size_t k = (size_t)blockIdx.y * width + col;
        const size_t half = (size_t)gridDim.y * width;
        out[k] = p0;
        out[k + 1] = p1;
        out[half + k] = q0;
        out[half + k + 1] = q1;
    }
}
"""

# The per-channel totals of the partial sums above, which lie as (2, A, C, B)
# (rows: A = outer, B = chunks; columns: A = chunks, B = inner): block c adds
# channel c's A * B partials of p and of q, then finishes them (FINISH).
_FINISH_SOURCE = r"""
extern "C" __global__ void bnarray_NAME_finish(const S* __restrict__ part,
        const T* __restrict__ x, I parts_a, I channels, I parts_b, I inner, S m,
        S* __restrict__ out_p, S* __restrict__ out_q) {
    const I c = blockIdx.x;
    const I per_channel = parts_a * parts_b;
    const size_t half = (size_t)parts_a * channels * parts_b;
    S p = 0, q = 0;
    for (I k = threadIdx.x; k < per_channel; k += blockDim.x) {
        const size_t j = ((size_t)(k / parts_b) * channels + c) * parts_b + k % parts_b;
        p += part[j];
        q += part[half + j];
    }
    block_sums(p, q);
    if (threadIdx.x == 0) {
        FINISH
    }
}
"""

# (args, the per-channel reference `ref`, what each value adds to p and q,
# how the totals become the outputs).
_PAIR_MAPS = {
    # d = x - shift, with the channel's first value as shift: Σ d and Σ d²,
    # finished into the mean and the biased variance over m values.
    "stats": (
        "const T* __restrict__ x",
        "(S)load(x[(size_t)c * inner])",
        "{ const S d = (S)load(x[i]) - ref; p += d; q += d * d; }",
        # `v < 0 ? 0 : v` rather than max(): a NaN variance stays NaN.
        "const S d = p / m; const S v = q / m - d * d;"
        " out_p[c] = (S)load(x[(size_t)c * inner]) + d;"
        " out_q[c] = v < (S)0 ? (S)0 : v;",
    ),
    # Σ dy and Σ dy · (x - mean).
    "grad": (
        "const T* __restrict__ dy, const T* __restrict__ x, const S* __restrict__ mean",
        "mean[c]",
        "{ const S g = (S)load(dy[i]); p += g; q += g * ((S)load(x[i]) - ref); }",
        "out_p[c] = p; out_q[c] = q;",
    ),
}

_ELEMENTWISE_EXPRS = {
    "normalize": (
        "const T* __restrict__ x, const S* __restrict__ mean, "
        "const S* __restrict__ scale, const S* __restrict__ shift",
        "((S)load(x[i]) - mean[c]) * scale[c] + shift[c]",
    ),
    # normalize without a shift (no bias), rounded as the generic path rounds it.
    "normalize_scale": (
        "const T* __restrict__ x, const S* __restrict__ mean, const S* __restrict__ scale",
        "((S)load(x[i]) - mean[c]) * scale[c]",
    ),
    "grad_input": (
        "const T* __restrict__ dy, const T* __restrict__ x, const S* __restrict__ mean, "
        "const S* __restrict__ dy_scale, const S* __restrict__ xc_scale, "
        "const S* __restrict__ shift",
        "(S)load(dy[i]) * dy_scale[c] + ((S)load(x[i]) - mean[c]) * xc_scale[c]"
        " + shift[c]",
    ),
    "scale": (
        "const T* __restrict__ dy, const S* __restrict__ dy_scale",
        "(S)load(dy[i]) * dy_scale[c]",
    ),
}

# The per-channel arithmetic of `_math`, one thread per channel, in one launch
# where the generic path makes one per operation; the same roundings in the
# same order (T is the running statistics' dtype in running_update).
_CHANNEL_SOURCE = r"""
extern "C" __global__ void bnarray_NAME(ARGS, I n) {
    for (I c = (I)blockIdx.x * blockDim.x + threadIdx.x; c < n;
         c += (I)blockDim.x * gridDim.x) {
        BODY
    }
}
"""

_CHANNEL_BODIES = {
    "forward_scales": (
        "const S* __restrict__ var, const S* __restrict__ gamma, S eps, int affine, "
        "S* __restrict__ invstd, S* __restrict__ scale",
        "const S s = (S)1 / sqrt(var[c] + eps);"
        " invstd[c] = s; scale[c] = affine ? s * gamma[c] : s;",
    ),
    "backward_scales": (
        "const S* __restrict__ sum_dy, const S* __restrict__ sum_dy_xc, "
        "const S* __restrict__ invstd, const S* __restrict__ gamma, S m, int affine, "
        "int training, S* __restrict__ dweight, S* __restrict__ dy_scale, "
        "S* __restrict__ xc_scale, S* __restrict__ shift",
        "const S s = invstd[c]; const S g = affine ? s * gamma[c] : s;"
        " const S dw = sum_dy_xc[c] * s; dweight[c] = dw; dy_scale[c] = g;"
        " if (training) { xc_scale[c] = -g * (dw / m) * s; shift[c] = -g * (sum_dy[c] / m); }",
    ),
    "running_update": (
        "const T* __restrict__ running_mean, const T* __restrict__ running_var, "
        "const S* __restrict__ mean, const S* __restrict__ var, T keep, T factor, "
        "T bessel, T* __restrict__ new_mean, T* __restrict__ new_var",
        "new_mean[c] = add_rn(mul_rn(keep, running_mean[c]), mul_rn(factor, (T)mean[c]));"
        " new_var[c] = add_rn(mul_rn(keep, running_var[c]),"
        " mul_rn(factor, mul_rn((T)var[c], bessel)));",
    ),
}

_THREADS = 256
# Runs of one channel at least this long are served one block per run.
_LONG_RUN = 1024
# Shorter runs in rows of at least this many values: one thread per column.
_COLUMNS_MIN_WIDTH = 32


# EIGHT(index of the K-th value) in the sum kernels: MAP for K = 0, ..., 7 in a
# row, so that each thread has eight loads in flight and still adds the values
# in the order of a plain loop.
_EIGHT = re.compile(r"EIGHT\((.*)\)")


def _eight(index: str, expr: str) -> str:
    return " ".join(
        f"{{ const size_t i = {index.replace('K', str(k))}; {expr} }}" for k in range(8)
    )


# A full-size array's value in an expression: load(NAME[i]).
_FULL_LOAD = re.compile(r"load\((\w+)\[i\]\)")


def _two_columns(expr: str) -> tuple[str, str, str]:
    """`expr` for columns ``c`` and ``c + 1`` of the two-column kernels: one
    32-bit load of each full-size array, then `expr` once per column, with
    its own channel, reference and sums."""
    names = dict.fromkeys(_FULL_LOAD.findall(expr))
    loads = " ".join(f"const bits2 {n}2 = *(const bits2*)({n} + i);" for n in names)
    lanes = []
    for k in (0, 1):
        lane = _FULL_LOAD.sub(rf"load(\g<1>2.h[{k}])", expr)
        lane = re.sub(r"\bc\b", f"(c + {k})", lane)
        lanes.append(re.sub(r"\b(p|q|ref)\b", rf"\g<1>{k}", lane))
    return loads, lanes[0], lanes[1]


def _source(kind: str, name: str) -> tuple[str, str]:
    """The CUDA source of a kernel, with ARGS still to fill in, and its name."""
    if kind == "elementwise_columns2":
        args, expr = _ELEMENTWISE_EXPRS[name]
        loads, expr0, expr1 = _two_columns(expr)
        body = (
            _ELEMENTWISE_COLUMNS2_SOURCE.replace("LOADS", loads)
            .replace("EXPR0", expr0)
            .replace("EXPR1", expr1)
        )
        func = "bnarray_NAME_columns2"
    elif kind.startswith("elementwise"):
        args, expr = _ELEMENTWISE_EXPRS[name]
        template = {
            "elementwise": _ELEMENTWISE_SOURCE,
            "elementwise_rows": _ELEMENTWISE_ROWS_SOURCE,
            "elementwise_columns": _ELEMENTWISE_COLUMNS_SOURCE,
        }[kind]
        body = template.replace("EXPR", expr)
        func = "bnarray_NAME" + kind.removeprefix("elementwise")
    elif kind == "channel":
        args, expr = _CHANNEL_BODIES[name]
        body = _CHANNEL_SOURCE.replace("BODY", expr)
        func = "bnarray_NAME"
    else:
        args, ref, expr, finish = _PAIR_MAPS[name]
        template = {
            "rows": _ROWS_SOURCE,
            "columns": _COLUMNS_SOURCE,
            "columns2": _COLUMNS2_SOURCE,
            "finish": _FINISH_SOURCE,
        }[kind]
        if kind == "columns2":
            loads, expr0, expr1 = _two_columns(expr)
            expr = f"{loads} {expr0} {expr1}"
            _, ref0, ref1 = _two_columns(ref)
            template = template.replace("REF0", ref0).replace("REF1", ref1)
        body = template.replace("REF", ref).replace("FINISH", finish)
        body = _EIGHT.sub(lambda m: _eight(m[1], expr), body).replace("MAP", expr)
        if kind == "finish":
            args = ""
        func = f"bnarray_NAME_{kind}"
    code = body.replace("NAME", name).replace("ARGS", args)
    return code, func.replace("NAME", name)


@cache
def _raw_kernel(kind: str, name: str, dtype: str, compute: str, index: str) -> Any:
    code, func = _source(kind, name)
    types = (
        f"typedef {_CTYPES[dtype]} T;\ntypedef {_CTYPES[compute]} S;\n"
        f"typedef {index} I;\n"
    )
    return cupy.RawKernel(types + _PRELUDE + code, func)


@cache
def _multiprocessors(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _view(
    full: tuple[Array, ...], channel_shape: tuple[int, ...]
) -> tuple[int, int, int] | None:
    """(outer, C, inner) when the full-size arrays are C-contiguous and the
    per-channel arrays (of `channel_shape`, in the keepdims form) vary along
    at most one axis; else None (the generic CUDA kernels serve)."""
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


def _per_channel(a: Array, dtype: Any) -> Array:
    """`a`'s values, contiguous and in `dtype` (kernels see a pointer only)."""
    if a.dtype == dtype and a.flags.c_contiguous:
        return a
    return cupy.ascontiguousarray(a.reshape(-1), dtype=dtype)


def _full(a: Array, like: Array) -> Array:
    """`a` broadcast to the per-channel shape of `like`."""
    return a if a.shape == like.shape else cupy.broadcast_to(a, like.shape)


def _two_per_thread(view: tuple[int, int, int], full: tuple[Array, ...]) -> bool:
    """Whether the columns kernels can take two values per thread (see
    `_ELEMENTWISE_COLUMNS2_SOURCE`): float16 channels last with an even number
    of channels, every full-size array aligned to 4 bytes (a view can start
    between two values)."""
    _, channels, inner = view
    return (
        full[0].dtype.char == "e"
        and inner == 1
        and channels % 2 == 0
        and all(a.data.ptr % 4 == 0 for a in full)
    )


def _raw_elementwise(
    name: str,
    view: tuple[int, int, int],
    full: tuple[Array, ...],
    channel: tuple[Array, ...],
) -> Array:
    """``out[i] = EXPR`` over the (outer, C, inner) view of the full-size arrays."""
    outer, channels, inner = view
    like = full[0]
    n = like.size
    index, itype = _index_type(n)
    compute = _compute_dtype(like.dtype)
    out = cupy.empty_like(like)
    args = (*full, *(_per_channel(a, compute) for a in channel), out)
    sms = _multiprocessors(like.device.id)
    if inner >= _LONG_RUN:
        rows = outer * channels
        chunks = min(max(1, -(-8 * sms // rows)), max(1, inner // 2048), 65535)
        chunk = -(-inner // chunks)
        kernel = _raw_kernel(
            "elementwise_rows", name, like.dtype.char, compute.char, index
        )
        kernel(
            (rows, chunks),
            (_THREADS,),
            (*args, itype(channels), itype(inner), itype(chunk)),
        )
    elif channels * inner >= _COLUMNS_MIN_WIDTH:
        width = channels * inner
        two = _two_per_thread(view, full)
        threads = width // 2 if two else width  # one per column or pair of columns
        tx = min(_THREADS, 32 * -(-threads // 32))
        ty = _THREADS // tx
        tiles = -(-threads // tx)
        chunks = min(max(1, -(-32 * sms // tiles)), -(-outer // ty), 65535)
        rows = -(-outer // chunks)
        chunks = -(-outer // rows)
        kind = "elementwise_columns2" if two else "elementwise_columns"
        kernel = _raw_kernel(kind, name, like.dtype.char, compute.char, index)
        kernel(
            (tiles, chunks),
            (tx, ty),
            (*args, itype(outer), itype(width), itype(inner), itype(rows)),
        )
    else:
        kernel = _raw_kernel("elementwise", name, like.dtype.char, compute.char, index)
        blocks = min(-(-n // _THREADS), 32 * sms)
        kernel((blocks,), (_THREADS,), (*args, itype(n), itype(channels), itype(inner)))
    return out


def _raw_pair_sums(
    name: str,
    view: tuple[int, int, int],
    full: tuple[Array, ...],
    channel: tuple[Array, ...],
) -> tuple[Array, Array]:
    """The two finished per-channel totals, shape (C,), of a pair map over the
    (outer, C, inner) view (see `_PAIR_MAPS`).

    Each block writes its partial sums; a second kernel adds each channel's
    and finishes them.
    """
    outer, channels, inner = view
    x = full[0]
    compute = _compute_dtype(x.dtype)
    index, itype = _index_type(x.size)
    args = (*full, *(_per_channel(a, compute) for a in channel))
    target = 8 * _multiprocessors(x.device.id)  # blocks enough to fill the GPU
    if inner >= _LONG_RUN:
        # Runs of `inner` contiguous values share a channel: one block per run
        # (or per piece of a long run).
        rows = outer * channels
        chunks = min(max(1, -(-target // rows)), max(1, inner // 1024), 65535)
        chunk = -(-inner // chunks)
        kernel = _raw_kernel("rows", name, x.dtype.char, compute.char, index)
        part = cupy.empty((2, outer, channels, chunks), dtype=compute)
        kernel(
            (rows, chunks),
            (_THREADS,),
            (*args, part, itype(channels), itype(inner), itype(chunk)),
        )
        parts_a, parts_b = outer, chunks
    else:
        # Short runs: a warp reads 32 neighbouring values of a row of the
        # (outer, C * inner) view and each thread sums down its column.
        # Two columns per thread for float16 channels last (see
        # `_two_per_thread`).
        width = channels * inner
        two = _two_per_thread(view, full)
        tiles = -(-(width // 2 if two else width) // 32)
        chunks = min(max(1, -(-target // tiles)), max(1, outer // 64), 65535)
        rows_per_chunk = -(-outer // chunks)
        chunks = -(-outer // rows_per_chunk)
        kind = "columns2" if two else "columns"
        kernel = _raw_kernel(kind, name, x.dtype.char, compute.char, index)
        part = cupy.empty((2, chunks, channels, inner), dtype=compute)
        kernel(
            (tiles, chunks),
            (32, 8),
            (
                *args,
                part,
                itype(outer),
                itype(width),
                itype(inner),
                itype(rows_per_chunk),
            ),
        )
        parts_a, parts_b = chunks, inner
    out = cupy.empty((2, channels), dtype=compute)
    finish = _raw_kernel("finish", name, x.dtype.char, compute.char, index)
    finish(
        (channels,),
        (_THREADS,),
        (
            part,
            x,
            itype(parts_a),
            itype(channels),
            itype(parts_b),
            itype(inner),
            compute.type(outer * inner),
            out[0],
            out[1],
        ),
    )
    return out[0], out[1]


def _zeros(like: Array) -> Array:
    return cupy.zeros((1,) * like.ndim, dtype=like.dtype)


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance: see :func:`bnarray._math.batch_stats`.

    Sums of deviations from a per-channel shift (the channel's first value):
    E[d²] − E[d]² with d = x − shift does not cancel the way E[x²] − E[x]²
    does when the mean is large against the spread.
    """
    dtype = _compute_dtype(x.dtype)
    shape = tuple(1 if a in reduce_axes else n for a, n in enumerate(x.shape))
    view = _view((x,), shape)
    if view is not None:
        # The kernels read each channel's shift from x itself.
        mean, var = _raw_pair_sums("stats", view, (x,), ())
        return mean.reshape(shape), var.reshape(shape)
    first = tuple(
        slice(0, 1) if a in reduce_axes else slice(None) for a in range(x.ndim)
    )
    shift = x[first].astype(dtype)
    kernel = _reductions(dtype.char)["shifted_sums"]
    s1, s2 = _pair_sums(kernel, (x, shift), reduce_axes)
    m = dtype.type(x.size // shift.size)
    mean, var = _elementwise()["moments"](s1, s2, shift, m)
    return mean, var


def normalize(
    x: Array, mean: Array, scale: Array, shift: Array | None, *, xp: Namespace
) -> Array:
    """``(x - mean) * scale + shift``: see :func:`bnarray._math.normalize`."""
    view = _view((x,), mean.shape)
    if view is None:
        shift = _zeros(mean) if shift is None else shift
        return _elementwise()["normalize"](x, mean, scale, shift)
    name = "normalize" if shift is not None else "normalize_scale"
    channel = (mean, scale) if shift is None else (mean, scale, shift)
    return _raw_elementwise(name, view, (x,), tuple(_full(a, mean) for a in channel))


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``: see :func:`bnarray._math.grad_sums`."""
    view = _view((dy, x), mean.shape)
    if view is None:
        kernel = _reductions(mean.dtype.char)["grad_sums"]
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
) -> Array:
    """``dy * dy_scale + (x - mean) * xc_scale + shift``: see
    :func:`bnarray._math.grad_input`."""
    only_scale = xc_scale is None and shift is None
    view = _view((dy,) if only_scale else (dy, x), mean.shape)
    if only_scale:
        if view is None:
            return _elementwise()["scale"](dy, dy_scale)
        return _raw_elementwise("scale", view, (dy,), (_full(dy_scale, mean),))
    zero = _zeros(mean)
    channel = (
        mean,
        dy_scale,
        zero if xc_scale is None else xc_scale,
        zero if shift is None else shift,
    )
    if view is None:
        return _elementwise()["grad_input"](dy, x, *channel)
    return _raw_elementwise(
        "grad_input", view, (dy, x), tuple(_full(a, mean) for a in channel)
    )


def _channel_kernel(
    name: str, dtype: Any, compute: Any, n: int, args: tuple[Any, ...]
) -> None:
    """Launch a `_CHANNEL_BODIES` kernel over `n` channels."""
    index, itype = _index_type(n)
    kernel = _raw_kernel("channel", name, dtype.char, compute.char, index)
    blocks = min(-(-n // _THREADS), 65535)
    kernel((blocks,), (_THREADS,), (*args, itype(n)))


def forward_scales(
    var: Array, gamma: Array | None, eps: float, *, xp: Namespace
) -> tuple[Array, Array]:
    """``invstd`` and ``scale``, in one launch: see :func:`bnarray._math.forward_scales`."""
    if var.size == 0:
        return _math.forward_scales(var, gamma, eps, xp=xp)
    dtype = var.dtype
    flat = _per_channel(var, dtype)
    out = cupy.empty((2, var.size), dtype=dtype)
    args = (
        flat,
        flat if gamma is None else _per_channel(gamma, dtype),
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
    s = _per_channel(invstd, dtype)
    out = cupy.empty((4, invstd.size), dtype=dtype)
    args = (
        _per_channel(sum_dy, dtype),
        _per_channel(sum_dy_xc, dtype),
        s,
        s if gamma is None else _per_channel(gamma, dtype),
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
        _per_channel(running_mean, dtype),
        _per_channel(running_var, dtype),
        _per_channel(mean, mean.dtype),
        _per_channel(var, var.dtype),
        dtype.type(1.0 - factor),
        dtype.type(factor),
        dtype.type(bessel),
        new_mean,
        new_var,
    )
    _channel_kernel("running_update", dtype, mean.dtype, mean.size, args)
    return new_mean, new_var
