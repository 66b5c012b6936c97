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

from functools import cache
from typing import Any

import cupy

from .._compat import Array, Namespace

__all__ = ["batch_stats", "grad_input", "grad_sums", "normalize"]


# The two per-channel sums each reduction needs travel as the real and imaginary
# parts of one complex accumulator, so one kernel reads its inputs once.
_PAIR = {
    "float32": ("float", "complex64"),
    "float64": ("double", "complex128"),
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
    }


def _compute_dtype(dtype: Any) -> Any:
    return cupy.promote_types(dtype, cupy.float32)


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
    first = tuple(
        slice(0, 1) if a in reduce_axes else slice(None) for a in range(x.ndim)
    )
    shift = x[first].astype(dtype)
    kernel = _reductions(dtype.name)["shifted_sums"]
    s1, s2 = _pair_sums(kernel, (x, shift), reduce_axes)
    m = x.size // shift.size
    dmean = s1 / m
    var = cupy.maximum(s2 / m - dmean * dmean, 0)
    return shift + dmean, var


def normalize(
    x: Array, mean: Array, scale: Array, shift: Array | None, *, xp: Namespace
) -> Array:
    """``(x - mean) * scale + shift``: see :func:`bnarray._math.normalize`."""
    return _elementwise()["normalize"](
        x, mean, scale, _zeros(mean) if shift is None else shift
    )


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``: see :func:`bnarray._math.grad_sums`."""
    kernel = _reductions(mean.dtype.name)["grad_sums"]
    return _pair_sums(kernel, (dy, x, mean), reduce_axes)


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
    k = _elementwise()
    if xc_scale is None and shift is None:
        return k["scale"](dy, dy_scale)
    zero = _zeros(mean)
    return k["grad_input"](
        dy,
        x,
        mean,
        dy_scale,
        zero if xc_scale is None else xc_scale,
        zero if shift is None else shift,
    )
