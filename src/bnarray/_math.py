"""The batch-normalization math, written once against the array API standard.

Two kinds of kernel. ``batch_stats``, ``normalize``, ``grad_sums`` and
``grad_input`` are the only functions that touch full-size arrays; each one is
a pass (or two) over memory. ``forward_scales``, ``backward_scales`` and
``running_update`` do the per-channel arithmetic between those passes.
``_fast/`` holds faster versions of these kernels for some namespaces (a
module that has nothing faster for one re-exports it from here); this module
is the reference they are tested against. Per-channel arrays (``mean``,
``scale``, ...) arrive in the broadcast shape (size 1 along the reduced axes)
and in the compute dtype, except where a docstring says otherwise.

The full-size kernels update the arrays they create in place (``y *= scale``
rather than ``y = y * scale``; where arrays are immutable, as in JAX, Python
rebinds the name instead), never their inputs: for float32 and float64 each
holds at most one full-size temporary beside its output, two in
``batch_stats``. Each new array
costs more than its pass over memory where the allocator hands back fresh
pages (NumPy's arrays of tens of MB, through glibc). The order of the roundings
is that of the plain expressions, which the fast paths match bit for bit.
A 16-bit input meets a per-channel operand in the compute dtype, so array
operations promote it value by value (``x - mean`` is float32 for float16
`x`), without a full-size float32 copy first; only the reductions take one.
"""

from __future__ import annotations

from types import EllipsisType

from ._compat import Array, Namespace

__all__ = [
    "as_dtype",
    "backward_scales",
    "batch_stats",
    "compute_dtype",
    "forward_scales",
    "grad_input",
    "grad_sums",
    "into",
    "normalize",
    "running_update",
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


# The most terms any running sum of `_sum` adds. Summed one after another, m
# float32 terms carry a rounding error of up to m·2⁻²⁴ of their magnitude, and
# backends do add some reductions one term at a time (NumPy along an axis that
# is not the innermost of the loop, Dask on such chunks): 2¹⁰ terms keep a
# sum within 2⁻¹⁴ ≈ 6·10⁻⁵ of exact per level, whatever the summation order.
_SUM_TERMS = 1024


def _sum(a: Array, reduce_axes: tuple[int, ...], *, xp: Namespace) -> Array:
    """Sum over `reduce_axes` (keepdims) with no running sum of over `_SUM_TERMS` terms.

    One axis at a time, the outermost first; an axis longer than `_SUM_TERMS`
    is summed in blocks of `_SUM_TERMS` (a reshape that splits the axis: a
    view, never a copy) whose sums are then summed the same way. Only the
    first sum reads the full-size array. The outermost first: NumPy then adds
    whole contiguous slabs, which is faster than one reduction over all the
    axes (NCHW 32×64×56×56 float32: 1.0 ms against 1.1 ms, and 2.5 ms
    innermost first; PyTorch the same either way).
    """
    for axis in sorted(reduce_axes):
        if a.shape[axis] != 1:  # summing it would copy `a`
            a = _sum_axis(a, axis, xp)
    return a


def _sum_axis(a: Array, axis: int, xp: Namespace) -> Array:
    n = a.shape[axis]
    if n <= _SUM_TERMS:
        return xp.sum(a, axis=axis, keepdims=True)
    blocks = n // _SUM_TERMS
    cut = blocks * _SUM_TERMS

    def along_axis(part: slice) -> tuple[slice | EllipsisType, ...]:
        return (slice(None),) * axis + (part, ...)

    split = (*a.shape[:axis], blocks, _SUM_TERMS, *a.shape[axis + 1 :])
    body = xp.reshape(a[along_axis(slice(0, cut))], split)
    total = _sum_axis(xp.sum(body, axis=axis + 1), axis, xp)
    if cut < n:
        tail = a[along_axis(slice(cut, n))]
        total = total + xp.sum(tail, axis=axis, keepdims=True)
    return total


def _count(x: Array, reduce_axes: tuple[int, ...]) -> float:
    count = 1
    for a in reduce_axes:  # a loop, not a generator: torch.compile(fullgraph=True)
        count *= int(x.shape[a])
    return float(count)


def batch_stats(
    x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel mean and biased variance, by the corrected two-pass algorithm.

    The second pass sums deviations from the first-pass mean: E[x²] − E[x]²
    would cancel catastrophically when the mean is large against the spread.
    The mean of the deviations, δ, corrects the rounding error of the first
    pass (Chan, Golub & LeVeque 1983): mean = mean₀ + δ, var = mean(c²) − δ².
    Every sum is blocked (see `_sum`): the correction cannot recover a first
    pass that is off by many standard deviations, as a float32 sum of a
    million values added one at a time is.
    """
    xc = _upcast(x, xp)
    m = _count(x, reduce_axes)
    mean0 = _sum(xc, reduce_axes, xp=xp) / m
    centered = xc - mean0
    del xc  # for a 16-bit x, a float32 copy no longer needed
    delta = _sum(centered, reduce_axes, xp=xp) / m
    # A new array for the squares: squaring `centered` in place would break
    # PyTorch's autograd, which keeps the factors of a product.
    var = _sum(centered * centered, reduce_axes, xp=xp) / m - delta * delta
    # Rounding can leave a constant channel's variance a hair below zero.
    return mean0 + delta, xp.maximum(var, xp.zeros_like(var))


def normalize(
    x: Array,
    mean: Array,
    scale: Array,
    shift: Array | None,
    *,
    xp: Namespace,
    out: Array | None = None,
) -> Array:
    """``(x - mean) * scale + shift`` in the compute dtype, returned in `x`'s dtype
    (copied into `out`, and `out` returned, where one is given).

    Subtracting the mean first (rather than folding it into the shift) keeps
    inputs with a large mean exact to the last bits of their spread.
    """
    y = x - mean  # a new array, in the compute dtype: the in-place updates are ours
    y *= scale
    if shift is not None:
        y += shift
    return into(out, xp.astype(y, x.dtype, copy=False))


def into(out: Array | None, result: Array) -> Array:
    """`result`, or `out` holding a copy of it. The standard has no `out=` on
    its operations: for the NumPy arrays that the fast kernels do not take
    (see :func:`bnarray._fast.choose`) and the variants' results."""
    if out is None:
        return result
    out[...] = result
    return out


def grad_sums(
    dy: Array, x: Array, mean: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
) -> tuple[Array, Array]:
    """Per-channel ``Σ dy`` and ``Σ dy · (x - mean)``."""
    dyc = _upcast(dy, xp)
    sum_dy = _sum(dyc, reduce_axes, xp=xp)
    products = x - mean
    products *= dyc
    return sum_dy, _sum(products, reduce_axes, xp=xp)


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
    """``dy * dy_scale + (x - mean) * xc_scale + shift`` in `x`'s dtype (copied
    into `out`, and `out` returned, where one is given).

    With `xc_scale` and `shift` None (inference) this is ``dy * dy_scale``.
    """
    dx = dy * dy_scale
    if xc_scale is not None:
        term = x - mean
        term *= xc_scale
        dx += term
    if shift is not None:
        dx += shift
    return into(out, xp.astype(dx, x.dtype, copy=False))


# Per-channel arithmetic. Full-size passes need a few per-channel operands; on
# an accelerator each line below is a kernel launch, which a fast path may fold
# into one.


def forward_scales(
    var: Array, gamma: Array | None, eps: float, *, xp: Namespace
) -> tuple[Array, Array]:
    """``invstd = 1 / sqrt(var + eps)`` and the normalization's ``scale = invstd · γ``.

    `gamma` None means γ = 1 (`scale` is then `invstd`).
    """
    invstd = 1.0 / xp.sqrt(var + eps)
    return invstd, (invstd if gamma is None else invstd * gamma)


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
    """The operands of :func:`grad_input`, and γ's gradient, from the sums of :func:`grad_sums`.

    Returns ``dweight = Σ dy · (x - mean) · invstd``, ``dy_scale = γ · invstd``
    and, in training (where the mean and variance depend on `x`), over
    m = `count` values per channel, ``xc_scale = -dy_scale · (dweight / m) · invstd``
    and ``shift = -dy_scale · (Σ dy / m)``; in inference those two are None.
    """
    dy_scale = invstd if gamma is None else invstd * gamma
    dweight = sum_dy_xc * invstd
    if not training:
        return dweight, dy_scale, None, None
    m = float(count)
    # Means before products: γ·invstd·(dweight/m)·invstd stays finite for every
    # variance of normal magnitude even with eps = 0, where dy_scale·invstd·dweight
    # (invstd³ times a sum) overflows float32 once var < 1e-26 or so.
    xc_scale = -dy_scale * (dweight / m) * invstd
    shift = -dy_scale * (sum_dy / m)
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
    """``(1 - factor) · running + factor · batch``, with the batch variance times `bessel`.

    All four arrays have the channel shape; the results have the running
    statistics' dtypes, and so does the arithmetic.
    """
    batch_mean = as_dtype(mean, running_mean.dtype, xp)
    batch_var = as_dtype(var, running_var.dtype, xp) * bessel
    new_mean = (1.0 - factor) * running_mean + factor * batch_mean
    new_var = (1.0 - factor) * running_var + factor * batch_var
    return new_mean, new_var


def as_dtype(a: Array, dtype: object, xp: Namespace) -> Array:
    """`a` in `dtype`: itself where it has it (no call into `xp`)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)
