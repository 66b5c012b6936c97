"""CuPy kernels: each generic kernel as one fused elementwise or reduction CUDA kernel.

Imported only for CuPy arrays (see :func:`bnarray._fast.kernels_for`), so CuPy
is never imported for other libraries. The CUDA kernels are compiled on first
use. These kernels are not yet measured on a GPU; their results are checked
against the generic kernels by ``tests/test_fast_paths.py`` where CuPy and a
GPU are available.

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


def _reduction(name: str, params: str, map_expr: str) -> Any:
    return cupy.ReductionKernel(
        params, "S total", map_expr, "a + b", "total = a", "0", f"bnarray_{name}"
    )


@cache
def _kernels() -> dict[str, Any]:
    return {
        "shifted_sum": _reduction("shifted_sum", "T x, S shift", "(S)x - shift"),
        "shifted_sumsq": _reduction(
            "shifted_sumsq", "T x, S shift", "((S)x - shift) * ((S)x - shift)"
        ),
        "sum": _reduction("sum", "T dy, S zero", "(S)dy + zero"),
        "sum_dy_xc": _reduction(
            "sum_dy_xc", "T dy, T x, S mean", "(S)dy * ((S)x - mean)"
        ),
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
    k = _kernels()
    dtype = _compute_dtype(x.dtype)
    first = tuple(
        slice(0, 1) if a in reduce_axes else slice(None) for a in range(x.ndim)
    )
    shift = x[first].astype(dtype)
    s1 = k["shifted_sum"](x, shift, axis=reduce_axes, keepdims=True)
    s2 = k["shifted_sumsq"](x, shift, axis=reduce_axes, keepdims=True)
    m = x.size // shift.size
    dmean = s1 / m
    var = cupy.maximum(s2 / m - dmean * dmean, 0)
    return shift + dmean, var


def normalize(
    x: Array, mean: Array, scale: Array, shift: Array | None, *, xp: Namespace
) -> Array:
    """``(x - mean) * scale + shift``: see :func:`bnarray._math.normalize`."""
    return _kernels()["normalize"](
        x, mean, scale, _zeros(mean) if shift is None else shift
    )


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``: see :func:`bnarray._math.grad_sums`."""
    k = _kernels()
    sum_dy = k["sum"](dy, _zeros(mean), axis=reduce_axes, keepdims=True)
    sum_dy_xc = k["sum_dy_xc"](dy, x, mean, axis=reduce_axes, keepdims=True)
    return sum_dy, sum_dy_xc


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
    k = _kernels()
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
