"""The CUDA C source of the CuPy kernels: each formula once, and the templates that make kernels of it.

The formulas are C expressions over named placeholders (``$x``, ``$mean``,
...); :func:`raw_source` fills them into the hand-written kernels of each kind,
and :func:`elementwise_kernel`, :func:`pair_reduction` and
:func:`moments_kernel` into the definitions of CuPy's generated kernels, which
serve the layouts the hand-written ones do not take. Every placeholder is
filled by :func:`_fill` (``string.Template``: a name left unfilled is an
error). Nothing here imports CuPy: ``_cupy`` compiles and launches what this
module writes.

In every kernel ``T`` is the dtype of `x`, ``S`` the compute dtype (float32 for
float16 `x`) and ``I`` the index type.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template

__all__ = [
    "CHANNEL",
    "ELEMENTWISE",
    "KINDS",
    "MOMENTS",
    "PAIR_SUMS",
    "Elementwise",
    "PairSums",
    "PerChannel",
    "elementwise_kernel",
    "moments_kernel",
    "pair_reduction",
    "raw_source",
]


def _fill(template: str, **values: str) -> str:
    """`template` with each ``$name`` replaced by ``values[name]``."""
    return Template(template).substitute(values)


# The formulas. In an expression, a full-size array's name (``$x``, ``$dy``)
# stands for its value at the element, converted to S; a per-channel array's
# name (``$mean``, ``$scale``) for the element's channel's value; ``$ref`` for
# the channel's reference value of a sum. Each kind of kernel fills them in
# its own way (see `_raw_values` and `_generic_values`).


@dataclass(frozen=True)
class Elementwise:
    """``out = expr`` for every element, computed in S and stored in T."""

    full: tuple[str, ...]  # full-size inputs, of dtype T
    channel: tuple[str, ...]  # per-channel inputs, of dtype S
    out: str  # the output's name in CuPy's generated kernel
    expr: str

    def raw_values(self, kind: _Kind) -> dict[str, str]:
        """The values of the placeholders of `kind`'s template."""
        return {
            "args": _pointer_args(self.full, self.channel),
            "expr": _fill(self.expr, **_raw_values(self.full, self.channel)),
            "loads": _two_column_loads(self.full),
            "expr0": _fill(self.expr, **_raw_values(self.full, self.channel, 0)),
            "expr1": _fill(self.expr, **_raw_values(self.full, self.channel, 1)),
        }


ELEMENTWISE = {
    "normalize": Elementwise(
        ("x",), ("mean", "scale", "shift"), "y", "($x - $mean) * $scale + $shift"
    ),
    # normalize without a shift (no bias), rounded as the generic path rounds it.
    "normalize_scale": Elementwise(
        ("x",), ("mean", "scale"), "y", "($x - $mean) * $scale"
    ),
    "grad_input": Elementwise(
        ("dy", "x"),
        ("mean", "dy_scale", "xc_scale", "shift"),
        "dx",
        "$dy * $dy_scale + ($x - $mean) * $xc_scale + $shift",
    ),
    "scale": Elementwise(("dy",), ("dy_scale",), "dx", "$dy * $dy_scale"),
}


@dataclass(frozen=True)
class PairSums:
    """Two per-channel sums in one pass over the full-size arrays: each value
    sets the local ``name = value`` (`local`) and adds `sums` to the totals
    ``$p`` and ``$q``; the statements of `finish` turn the totals into the two
    outputs ``$out_p`` and ``$out_q`` (``$local`` declares a local of type S)."""

    full: tuple[str, ...]
    channel: tuple[str, ...]
    ref: str  # the channel's reference value, in the hand-written kernels
    generic: tuple[str, str]  # CuPy's ReductionKernel: its name, its input for $ref
    local: tuple[str, str]
    sums: tuple[str, str]
    finish: tuple[str, ...]

    def _map(self, column: int | None) -> str:
        """What one value adds to the totals, as a block of C statements."""
        values = _raw_values(self.full, self.channel, column)
        name, value = self.local
        p, q = (_fill(s, **values, **{name: name}) for s in self.sums)
        value = _fill(value, **values)
        return f"{{ const S {name} = {value}; {values['p']} += {p}; {values['q']} += {q}; }}"

    def raw_values(self, kind: _Kind) -> dict[str, str]:
        """The values of the placeholders of `kind`'s template."""
        if kind.columns == 2:
            parts = [_two_column_loads(self.full), self._map(0), self._map(1)]
            body = " ".join(parts)
        else:
            body = self._map(None)
        refs = {
            f"ref{k}": _fill(self.ref, **_raw_values(self.full, self.channel, column))
            for k, column in [("", None), ("0", 0), ("1", 1)]
        }
        finish = {
            "local": "const S",
            "p": "p",
            "q": "q",
            "ref": refs["ref"],
            "out_p": "out_p[c]",
            "out_q": "out_q[c]",
        }
        return {
            "args": _pointer_args(self.full, self.channel),
            **refs,
            "map": body,
            "unrolled": _unrolled(kind.unrolled, body) if kind.unrolled else "",
            "finish": " ".join(_fill(s, **finish) + ";" for s in self.finish),
        }


# Mean and biased variance from the sums p = Σ d and q = Σ d² of d = x - ref
# over m values. `v < 0 ? 0 : v` rather than max(): a NaN variance stays NaN.
MOMENTS = (
    "$local d = $p / m",
    "$local v = $q / m - d * d",
    "$out_p = $ref + d",
    "$out_q = v < (S)0 ? (S)0 : v",
)

PAIR_SUMS = {
    # d = x - ref, with the channel's first value as ref: Σ d and Σ d²,
    # finished into the mean and the biased variance. (CuPy's generated kernels
    # take ref as an input named `shift`.)
    "stats": PairSums(
        full=("x",),
        channel=(),
        ref="(S)load(x[(size_t)$c * inner])",
        generic=("shifted_sums", "shift"),
        local=("d", "$x - $ref"),
        sums=("$d", "$d * $d"),
        finish=MOMENTS,
    ),
    # Σ dy and Σ dy · (x - mean).
    "grad": PairSums(
        full=("dy", "x"),
        channel=("mean",),
        ref="$mean",
        generic=("grad_sums", "mean"),
        local=("g", "$dy"),
        sums=("$g", "$g * ($x - $ref)"),
        finish=("$out_p = $p", "$out_q = $q"),
    ),
}


@dataclass(frozen=True)
class PerChannel:
    """The statements `body` for channel ``c``, with the parameters `args`."""

    args: str
    body: str

    def raw_values(self, kind: _Kind) -> dict[str, str]:
        """The values of the placeholders of `kind`'s template."""
        return {"args": self.args, "body": self.body}


# The per-channel arithmetic of `_math`, one thread per channel, in one launch
# where the generic path makes one per operation; the same roundings in the
# same order (T is the running statistics' dtype in running_update).
CHANNEL = {
    "forward_scales": PerChannel(
        "const S* __restrict__ var, const S* __restrict__ gamma, S eps, int affine, "
        "S* __restrict__ invstd, S* __restrict__ scale",
        "const S s = (S)1 / sqrt(var[c] + eps);"
        " invstd[c] = s; scale[c] = affine ? s * gamma[c] : s;",
    ),
    "backward_scales": PerChannel(
        "const S* __restrict__ sum_dy, const S* __restrict__ sum_dy_xc, "
        "const S* __restrict__ invstd, const S* __restrict__ gamma, S m, int affine, "
        "int training, S* __restrict__ dweight, S* __restrict__ dy_scale, "
        "S* __restrict__ xc_scale, S* __restrict__ shift",
        "const S s = invstd[c]; const S g = affine ? s * gamma[c] : s;"
        " const S dw = sum_dy_xc[c] * s; dweight[c] = dw; dy_scale[c] = g;"
        " if (training) { xc_scale[c] = -g * (dw / m) * s; shift[c] = -g * (sum_dy[c] / m); }",
    ),
    "running_update": PerChannel(
        "const T* __restrict__ running_mean, const T* __restrict__ running_var, "
        "const S* __restrict__ mean, const S* __restrict__ var, T keep, T factor, "
        "T bessel, T* __restrict__ new_mean, T* __restrict__ new_var",
        "new_mean[c] = add_rn(mul_rn(keep, running_mean[c]), mul_rn(factor, (T)mean[c]));"
        " new_var[c] = add_rn(mul_rn(keep, running_var[c]),"
        " mul_rn(factor, mul_rn((T)var[c], bessel)));",
    ),
}


# How the formulas read their operands.


def _raw_values(
    full: tuple[str, ...], channel: tuple[str, ...], column: int | None = None
) -> dict[str, str]:
    """The placeholders' values in the hand-written kernels: ``load(x[i])``
    and ``mean[c]``, the totals ``p`` and ``q``, the reference ``ref``. In the
    two-column kernels, those of column ``c + column`` (0 or 1): its value of
    the 32-bit word loaded by `_two_column_loads`, its channel, and its own
    totals and reference (``p0``, ``q0``, ``ref0``)."""
    if column is None:
        c, at, suffix = "c", "[i]", ""
    else:
        c, at, suffix = f"(c + {column})", f"2.h[{column}]", str(column)
    return {
        **{name: f"(S)load({name}{at})" for name in full},
        **{name: f"{name}[{c}]" for name in channel},
        "c": c,
        "ref": f"ref{suffix}",
        "p": f"p{suffix}",
        "q": f"q{suffix}",
    }


def _generic_values(full: tuple[str, ...], channel: tuple[str, ...]) -> dict[str, str]:
    """The placeholders' values in CuPy's generated kernels, which see one
    element of each (broadcast) input by its name."""
    return {**{name: f"(S){name}" for name in full}, **{name: name for name in channel}}


def _pointer_args(full: tuple[str, ...], channel: tuple[str, ...]) -> str:
    pointers = [f"const T* __restrict__ {name}" for name in full]
    return ", ".join(pointers + [f"const S* __restrict__ {name}" for name in channel])


def _two_column_loads(full: tuple[str, ...]) -> str:
    """One 32-bit load of the two float16 values of each full-size array."""
    return " ".join(
        f"const bits2 {name}2 = *(const bits2*)({name} + i);" for name in full
    )


def _unrolled(index: str, body: str) -> str:
    """`body` for eight values in a row, the k-th at `index` (``$k`` in it), so
    that each thread has eight loads in flight and still adds the values in
    the order of a plain loop."""
    return " ".join(
        f"{{ const size_t i = {_fill(index, k=str(k))}; {body} }}" for k in range(8)
    )


def _operand(expr: str) -> str:
    """`expr` where it replaces a local's name: in parentheses unless it is one term."""
    return f"({expr})" if " " in expr else expr


# CuPy's generated kernels.


def elementwise_kernel(name: str) -> dict[str, str]:
    """The arguments of ``cupy.ElementwiseKernel`` for `ELEMENTWISE[name]`."""
    spec = ELEMENTWISE[name]
    inputs = [f"T {n}" for n in spec.full] + [f"S {n}" for n in spec.channel]
    expr = _fill(spec.expr, **_generic_values(spec.full, spec.channel))
    return {
        "in_params": ", ".join(inputs),
        "out_params": f"T {spec.out}",
        "operation": f"{spec.out} = (T)({expr})",
        "name": f"bnarray_{name}",
    }


def moments_kernel() -> dict[str, str]:
    """The arguments of ``cupy.ElementwiseKernel`` for `MOMENTS` over the sums
    of a ``pair_reduction("stats", ...)``."""
    values = {
        "local": "S",
        "p": "sum_d",
        "q": "sum_d2",
        "ref": "shift",
        "out_p": "mean",
        "out_q": "var",
    }
    return {
        "in_params": "S sum_d, S sum_d2, S shift, S m",
        "out_params": "S mean, S var",
        "operation": "; ".join(_fill(s, **values) for s in MOMENTS),
        "name": "bnarray_moments",
    }


# Keyed by the compute dtype's `dtype.char`: the two sums travel as the real
# and imaginary parts of one complex accumulator, so one kernel reads its
# inputs once.
_COMPLEX = {"f": ("float", "complex64"), "d": ("double", "complex128")}


def pair_reduction(name: str, compute: str) -> dict[str, str]:
    """The arguments of ``cupy.ReductionKernel`` for `PAIR_SUMS[name]`'s two
    sums (without `finish`), in the compute dtype of char `compute`."""
    spec = PAIR_SUMS[name]
    ctype, out = _COMPLEX[compute]
    kernel, ref = spec.generic
    values = {**_generic_values(spec.full, spec.channel), "ref": ref}
    local, value = spec.local
    values[local] = _operand(_fill(value, **values))
    first, second = (_fill(s, **values) for s in spec.sums)
    pair = f"complex<{ctype}>"
    return {
        "in_params": ", ".join([f"T {n}" for n in spec.full] + [f"S {ref}"]),
        "out_params": f"{out} total",
        "map_expr": f"{pair}({first}, {second})",
        "reduce_expr": "a + b",
        "post_map_expr": "total = a",
        "identity": "0",
        "name": f"bnarray_{kernel}_{ctype}",
        "reduce_type": pair,
    }


# The hand-written kernels, for C-contiguous arrays with one channel axis
# (NCHW, NHWC and their kin), seen as (outer, C, inner): CuPy's generated
# kernels compute every operand's offset from the element's multi-index,
# which costs more than the memory traffic on large arrays.

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
extern "C" __global__ void $func($args, T* __restrict__ out, I n, I channels, I inner) {
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (I)blockDim.x * gridDim.x) {
        const I c = inner == 1 ? i % channels : (i / inner) % channels;
        store(out + i, (S)($expr));
    }
}
"""

# Long runs of one channel: block (row, chunk) writes the chunk-th piece of
# row `row` = (o, c) of the (outer, C, inner) view, with no division per value.
_ELEMENTWISE_ROWS_SOURCE = r"""
extern "C" __global__ void $func($args, T* __restrict__ out, I channels, I inner,
                                   I chunk) {
    const I row = blockIdx.x;
    const I c = row % channels;
    const I start = (I)blockIdx.y * chunk;
    const I stop = min(start + chunk, inner);
    for (I j = start + threadIdx.x; j < stop; j += blockDim.x) {
        const size_t i = (size_t)row * inner + j;
        store(out + i, (S)($expr));
    }
}
"""

# Short runs (inner < `_cupy._LONG_RUN`) in rows of at least 32 values: block (tile,
# chunk) writes its tile of neighbouring columns of the (outer, C * inner) view
# over rows [chunk * rows, (chunk + 1) * rows); each thread finds its channel
# once, and its per-channel operands stay in registers.
_ELEMENTWISE_COLUMNS_SOURCE = r"""
extern "C" __global__ void $func($args, T* __restrict__ out, I outer, I width,
                                      I inner, I rows) {
    const I col = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= width) return;
    const I c = col / inner;
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    #pragma unroll 4
    for (I r = first + threadIdx.y; r < last; r += blockDim.y) {
        const size_t i = (size_t)r * width + col;
        store(out + i, (S)($expr));
    }
}
"""

# The same for float16 channels last (inner 1, an even number of channels),
# two neighbouring columns per thread: the loads and stores of both are one
# 32-bit access ($loads; $expr0 and $expr1 are $expr for columns c and c + 1).
_ELEMENTWISE_COLUMNS2_SOURCE = r"""
extern "C" __global__ void $func($args, T* __restrict__ out, I outer, I width,
                                       I inner, I rows) {
    const I col = 2 * ((I)blockIdx.x * blockDim.x + threadIdx.x);
    if (col >= width) return;
    const I c = col;
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    #pragma unroll 4
    for (I r = first + threadIdx.y; r < last; r += blockDim.y) {
        const size_t i = (size_t)r * width + col;
        $loads
        bits2 v;
        v.h[0] = half_bits((S)($expr0));
        v.h[1] = half_bits((S)($expr1));
        *(bits2*)(out + i) = v;
    }
}
"""

# Σ p and Σ q over one channel's contiguous runs (inner > 1): block (row, chunk)
# sums the chunk-th piece of row `row` = (o, c) of the (outer, C, inner) view
# and writes them to out[k] and out[half + k], k = (o, c, chunk).
_ROWS_SOURCE = r"""
extern "C" __global__ void $func($args, S* __restrict__ out, I channels, I inner,
                                   I chunk) {
    const I row = blockIdx.x;
    const I c = row % channels;
    const I start = (I)blockIdx.y * chunk;
    const I stop = min(start + chunk, inner);
    const S ref = $ref;
    const size_t base = (size_t)row * inner;
    const I step = blockDim.x;
    S p = 0, q = 0;
    I j = start + threadIdx.x;
    for (; j + 7 * step < stop; j += 8 * step) {
        $unrolled
    }
    for (; j < stop; j += step) {
        const size_t i = base + j;
        $map
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
extern "C" __global__ void $func($args, S* __restrict__ out, I outer, I width,
                                      I inner, I rows) {
    const I col = (I)blockIdx.x * 32 + threadIdx.x;
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    S p = 0, q = 0;
    if (col < width) {
        const I c = col / inner;
        const S ref = $ref;
        const I step = blockDim.y;
        I r = first + threadIdx.y;
        for (; r + 7 * step < last; r += 8 * step) {
            $unrolled
        }
        for (; r < last; r += step) {
            const size_t i = (size_t)r * width + col;
            $map
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
extern "C" __global__ void $func($args, S* __restrict__ out, I outer, I width,
                                       I inner, I rows) {
    const I col = 2 * ((I)blockIdx.x * 32 + threadIdx.x);
    const I first = (I)blockIdx.y * rows;
    const I last = min(first + rows, outer);
    S p0 = 0, q0 = 0, p1 = 0, q1 = 0;
    if (col < width) {
        const I c = col;
        const S ref0 = $ref0, ref1 = $ref1;
        const I step = blockDim.y;
        I r = first + threadIdx.y;
        for (; r + 7 * step < last; r += 8 * step) {
            $unrolled
        }
        for (; r < last; r += step) {
            const size_t i = (size_t)r * width + col;
            $map
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
# channel c's A * B partials of p and of q, then finishes them ($finish).
_FINISH_SOURCE = r"""
extern "C" __global__ void $func(const S* __restrict__ part,
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
        $finish
    }
}
"""


# One thread per channel (see `CHANNEL`).
_CHANNEL_SOURCE = r"""
extern "C" __global__ void $func($args, I n) {
    for (I c = (I)blockIdx.x * blockDim.x + threadIdx.x; c < n;
         c += (I)blockDim.x * gridDim.x) {
        $body
    }
}
"""


@dataclass(frozen=True)
class _Kind:
    """A kind of hand-written kernel: its template, the suffix of its name,
    for the sum kernels the index of the k-th of eight values in a row
    (see `_unrolled`), and the columns each thread takes."""

    template: str
    suffix: str = ""
    unrolled: str = ""
    columns: int = 1


_ROWS_INDEX = "base + j + $k * step"
_COLUMNS_INDEX = "(size_t)(r + $k * step) * width + col"

KINDS = {
    "elementwise": _Kind(_ELEMENTWISE_SOURCE),
    "elementwise_rows": _Kind(_ELEMENTWISE_ROWS_SOURCE, "_rows"),
    "elementwise_columns": _Kind(_ELEMENTWISE_COLUMNS_SOURCE, "_columns"),
    "elementwise_columns2": _Kind(_ELEMENTWISE_COLUMNS2_SOURCE, "_columns2", columns=2),
    "rows": _Kind(_ROWS_SOURCE, "_rows", _ROWS_INDEX),
    "columns": _Kind(_COLUMNS_SOURCE, "_columns", _COLUMNS_INDEX),
    "columns2": _Kind(_COLUMNS2_SOURCE, "_columns2", _COLUMNS_INDEX, columns=2),
    "finish": _Kind(_FINISH_SOURCE, "_finish"),
    "channel": _Kind(_CHANNEL_SOURCE),
}

_FORMULAS: dict[str, Elementwise | PairSums | PerChannel] = {
    **ELEMENTWISE,
    **PAIR_SUMS,
    **CHANNEL,
}


def raw_source(
    kind: str, name: str, dtype: str, compute: str, index: str
) -> tuple[str, str]:
    """The CUDA source of the hand-written kernel of `kind` for formula `name`
    (of `ELEMENTWISE`, `PAIR_SUMS` or `CHANNEL`), with T, S and I the types of
    chars `dtype` and `compute` and the C type `index`; and its function's name."""
    spec = KINDS[kind]
    func = f"bnarray_{name}{spec.suffix}"
    code = _fill(spec.template, func=func, **_FORMULAS[name].raw_values(spec))
    types = (
        f"typedef {_CTYPES[dtype]} T;\ntypedef {_CTYPES[compute]} S;\n"
        f"typedef {index} I;\n"
    )
    return types + _PRELUDE + code, func
