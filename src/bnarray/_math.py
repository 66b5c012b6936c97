"""The batch-normalization math, written once against the array API standard.

The four kernels below are the only functions that touch full-size arrays; each
one is a pass (or two) over memory. ``_fast/`` holds faster versions of the same
four kernels for some namespaces; this module is the reference they are tested
against. Per-channel arrays (``mean``, ``scale``, ...) arrive in the broadcast
shape (size 1 along the reduced axes) and in the compute dtype.
"""

from __future__ import annotations

from ._compat import Array, Namespace

__all__ = [
    "batch_stats",
    "compute_dtype",
    "grad_input",
    "grad_sums",
    "normalize",
]


def compute_dtype(dtype: object, xp: Namespace) -> object:
    """The dtype statistics are accumulated in: float32 for 16-bit floats.

    cuDNN and PyTorch do the same; 16-bit sums lose the mean after ~2048 terms.
    """
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def _upcast(a: Array, xp: Namespace) -> Array:
    return xp.astype(a, compute_dtype(a.dtype, xp), copy=False)


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance, by the corrected two-pass algorithm.

    The second pass sums deviations from the first-pass mean: E[x²] − E[x]²
    would cancel catastrophically when the mean is large against the spread.
    The mean of the deviations, δ, corrects the rounding error of the first
    pass (Chan, Golub & LeVeque 1983): mean = mean₀ + δ, var = mean(c²) − δ².
    """
    xc = _upcast(x, xp)
    mean0 = xp.mean(xc, axis=reduce_axes, keepdims=True)
    centered = xc - mean0
    delta = xp.mean(centered, axis=reduce_axes, keepdims=True)
    var = xp.mean(centered * centered, axis=reduce_axes, keepdims=True) - delta * delta
    # Rounding can leave a constant channel's variance a hair below zero.
    return mean0 + delta, xp.maximum(var, xp.zeros_like(var))


def normalize(
    x: Array, mean: Array, scale: Array, shift: Array | None, *, xp: Namespace
) -> Array:
    """``(x - mean) * scale + shift`` in the compute dtype, returned in `x`'s dtype.

    Subtracting the mean first (rather than folding it into the shift) keeps
    inputs with a large mean exact to the last bits of their spread.
    """
    y = (_upcast(x, xp) - mean) * scale
    if shift is not None:
        y = y + shift
    return xp.astype(y, x.dtype, copy=False)


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``."""
    dyc = _upcast(dy, xp)
    sum_dy = xp.sum(dyc, axis=reduce_axes, keepdims=True)
    sum_dy_xc = xp.sum(dyc * (_upcast(x, xp) - mean), axis=reduce_axes, keepdims=True)
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
    """``dy * dy_scale + (x - mean) * xc_scale + shift`` in `x`'s dtype.

    With `xc_scale` and `shift` None (inference) this is ``dy * dy_scale``.
    """
    dx = _upcast(dy, xp) * dy_scale
    if xc_scale is not None:
        dx = dx + (_upcast(x, xp) - mean) * xc_scale
    if shift is not None:
        dx = dx + shift
    return xp.astype(dx, x.dtype, copy=False)
