"""Batch renormalization, ghost batches and masks: the training passes that differ from plain batch norm."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Literal

from . import _math
from ._compat import (
    Array,
    Namespace,
    device,
    is_jax_namespace,
    is_lazy_array,
    is_torch_array,
)
from ._fast import fused, plan
from ._validation import check_integer

if TYPE_CHECKING:
    from ._core import BatchNormContext

__all__ = [
    "Renorm",
    "Variant",
    "backward",
    "check_variant",
    "forward",
    "masked_bessel",
    "variant_of",
]

Variant = Literal["renorm", "ghost", "mask"]


@dataclass(frozen=True, kw_only=True)
class Renorm:
    r"""Batch renormalization (Ioffe 2017): the clipping bounds of its corrections.

    In training, :func:`~bnarray.batch_norm_forward` with ``renorm=Renorm(...)``
    computes, per channel, from the batch's :math:`\mu_B, \sigma_B` and the
    running :math:`\mu, \sigma` (:math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`)

    .. math::

        r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\frac{\sigma_B}{\sigma},
        \qquad
        d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\frac{\mu_B - \mu}{\sigma},
        \qquad
        y = \gamma\,(\hat x\,r + d) + \beta

    with :math:`\hat x` normalized by the batch's statistics; :math:`r` and
    :math:`d` are constants for the gradient. ``Renorm(rmax=1, dmax=0)`` is
    plain batch norm. Inference ignores it.

    Parameters
    ----------
    rmax : float
        Finite, >= 1. The paper raises it from 1 to 3 during training.
    dmax : float
        Finite, >= 0. The paper raises it from 0 to 5.

    Raises
    ------
    TypeError
        A bound that is not a real number.
    ValueError
        A bound that is not finite or out of range.

    Examples
    --------
    >>> import numpy as np
    >>> import bnarray as bn
    >>> x = np.array([[0.0], [2.0]])
    >>> y, ctx = bn.batch_norm_forward(
    ...     x, eps=0.0, renorm=bn.Renorm(rmax=3.0, dmax=5.0),
    ...     running_mean=np.array([0.0]), running_var=np.array([4.0]))
    >>> y  # r = σ_B/σ = 1/2, d = (μ_B - μ)/σ = 1/2
    array([[0.],
           [1.]])
    """

    rmax: float
    dmax: float

    def __post_init__(self) -> None:
        for name, lowest in [("rmax", 1.0), ("dmax", 0.0)]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                msg = (
                    f"`{name}` must be a real number, got "
                    f"{type(value).__name__}: {value!r:.80}"
                )
                raise TypeError(msg)
            number = float(value)
            if not math.isfinite(number) or number < lowest:
                msg = f"`{name}` must be finite and >= {lowest:g}, got {value!r}"
                raise ValueError(msg)
            object.__setattr__(self, name, number)


def _broadcast_shape(shape: tuple[int, ...], kept: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n if a in kept else 1 for a, n in enumerate(shape))


def _as_stat(
    a: Array | None, shape: tuple[int, ...], dtype: object, xp: Namespace
) -> Array | None:
    if a is None:
        return None
    return xp.reshape(xp.astype(a, dtype, copy=False), shape)


def _along(axis: int, part: slice) -> tuple[slice | EllipsisType, ...]:
    return (slice(None),) * axis + (part, ...)


def _chunks(length: int, size: int) -> list[slice]:
    """Contiguous slices of `size` covering `length`; the last may be shorter."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def check_variant(
    x: Array,
    kept: tuple[int, ...],
    *,
    training: bool,
    synced: bool,
    renorm: object,
    ghost_batch_size: object,
    batch_axis: object,
    mask: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    xp: Namespace,
) -> Variant | None:
    """The variant a forward call runs, after checking its arguments' metadata.

    None where plain batch norm gives the result: nothing asked, inference
    (which uses the running statistics whatever the variant), or ghost
    batches at least as large as the batch. `mask`'s library and device were
    checked with the other arrays.
    """
    given = [
        name
        for name, value in [
            ("renorm", renorm),
            ("ghost_batch_size", ghost_batch_size),
            ("mask", mask),
        ]
        if value is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        msg = (
            f"`{given[0]}` and `{given[1]}` do not combine; pass one of `renorm`, "
            "`ghost_batch_size` and `mask`"
        )
        raise ValueError(msg)
    if renorm is not None and not isinstance(renorm, Renorm):
        msg = (
            "`renorm` must be a bnarray.Renorm (such as Renorm(rmax=3.0, dmax=5.0)) "
            f"or None, got {type(renorm).__name__}: {renorm!r:.80}"
        )
        raise TypeError(msg)
    variant: Variant = "renorm" if renorm is not None else "ghost"
    if ghost_batch_size is not None:
        size = check_integer(ghost_batch_size, "ghost_batch_size")
        if size < 1:
            msg = f"`ghost_batch_size` must be a positive int, got {ghost_batch_size!r}"
            raise ValueError(msg)
        axis = _check_batch_axis(batch_axis, x.ndim, kept)
    if mask is not None:
        variant = "mask"
        _check_mask(mask, x, kept, xp)
    if not training:
        return None
    if synced:
        msg = f"`{given[0]}` does not combine with `sync`; pass one of them"
        raise ValueError(msg)
    if variant == "renorm":
        for name, a in [("running_mean", running_mean), ("running_var", running_var)]:
            if a is None:
                msg = (
                    f"`{name}` is required with `renorm` in training: r and d "
                    "compare the batch's statistics with the running ones"
                )
                raise ValueError(msg)
    elif variant == "ghost":
        length = int(x.shape[axis])
        if size >= length:
            return None
        per_row = math.prod(int(n) for a, n in enumerate(x.shape) if a not in kept)
        per_row //= length
        smallest = length % size or size
        if smallest * per_row < 2:
            msg = (
                f"`ghost_batch_size` {size} splits axis {axis} of `x` of shape "
                f"{tuple(x.shape)} into chunks whose last has "
                f"{smallest * per_row} value per channel; training needs at least "
                "two: choose a size that leaves a larger last chunk"
            )
            raise ValueError(msg)
    elif not is_lazy_array(mask):
        # Only where the values are at hand: Dask and JAX would compute (or,
        # under jax.jit, cannot); there fewer than two values give NaN or 0.
        counted = int(xp.count_nonzero(mask))
        if counted < 2:
            msg = (
                f"`mask` selects {counted} position(s) of `x` of shape "
                f"{tuple(x.shape)}; training needs at least two values per channel"
            )
            raise ValueError(msg)
    return variant


def _check_batch_axis(batch_axis: object, ndim: int, kept: tuple[int, ...]) -> int:
    if isinstance(batch_axis, bool) or not hasattr(type(batch_axis), "__index__"):
        msg = f"`batch_axis` must be an int, got {type(batch_axis).__name__}: {batch_axis!r:.80}"
        raise TypeError(msg)
    axis = operator.index(batch_axis)  # type: ignore[arg-type]
    if not -ndim <= axis < ndim:
        msg = f"`batch_axis` {batch_axis!r} is out of range for an array with {ndim} dimensions"
        raise ValueError(msg)
    axis %= ndim
    if axis in kept:
        msg = (
            f"`batch_axis` {batch_axis!r} is a channel axis (kept axes {kept}); "
            "ghost batches split one of the reduced axes"
        )
        raise ValueError(msg)
    return axis


def _check_mask(mask: Array, x: Array, kept: tuple[int, ...], xp: Namespace) -> None:
    if mask.dtype != xp.bool:
        msg = f"`mask` must have a bool dtype, got {mask.dtype}"
        raise TypeError(msg)
    expected = tuple(int(n) for a, n in enumerate(x.shape) if a not in kept)
    if tuple(mask.shape) != expected:
        msg = (
            f"`mask` must have the shape of `x` {tuple(x.shape)} without its channel "
            f"axes, {expected}, got {tuple(mask.shape)}"
        )
        raise ValueError(msg)


def forward(
    variant: Variant,
    x: Array,
    weight: Array | None,
    bias: Array | None,
    *,
    kept: tuple[int, ...],
    eps: float,
    renorm: Renorm | None,
    ghost_batch_size: int | None,
    batch_axis: int,
    mask: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    xp: Namespace,
) -> tuple[Array, dict[str, Any]]:
    """`y` and the fields of the training context that the variant sets."""
    shape = _broadcast_shape(tuple(x.shape), kept)
    channel_shape = tuple(int(x.shape[a]) for a in kept)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in kept)
    dtype = _math.compute_dtype(x.dtype, xp)
    gamma = _as_stat(weight, shape, dtype, xp)
    beta = _as_stat(bias, shape, dtype, xp)
    count = math.prod(int(x.shape[a]) for a in reduce_axes)
    fields: dict[str, Any]

    if variant == "renorm":
        assert renorm is not None and running_mean is not None
        assert running_var is not None
        run = plan(x, kept, xp)
        kernels = run.kernels
        # The statistics of plain batch norm bit for bit, also where it takes
        # the fused passes (whose y is not needed): rmax=1, dmax=0 is plain
        # batch norm.
        passes = fused(kernels, tuple(x.shape), kept)
        if passes is not None:
            _, mean, var, _ = passes.small_forward(run.x, shape, None, None, eps)
            mean, var = mean.reshape(shape), var.reshape(shape)
        else:
            mean, var = kernels.batch_stats(run.x, reduce_axes, xp=xp)
        running_sigma = xp.sqrt(xp.reshape(xp.astype(running_var, dtype), shape) + eps)
        r = xp.sqrt(var + eps) / running_sigma
        r = xp.clip(r, 1.0 / renorm.rmax, renorm.rmax)
        d = (mean - xp.reshape(xp.astype(running_mean, dtype), shape)) / running_sigma
        d = xp.clip(d, -renorm.dmax, renorm.dmax)
        r, d = _constant(r, xp), _constant(d, xp)
        # y = γ(x̂ r + d) + β = (x - μ_B)·(invstd·γr) + (γd + β)
        invstd, scale = kernels.forward_scales(
            var, r if gamma is None else gamma * r, eps, xp=xp
        )
        shift = d if gamma is None else gamma * d
        y = kernels.normalize(
            run.x, mean, scale, shift if beta is None else shift + beta, xp=xp
        )
        fields = {
            "renorm_r": xp.reshape(r, channel_shape),
            "renorm_d": xp.reshape(d, channel_shape),
        }
    elif variant == "ghost":
        assert ghost_batch_size is not None
        axis = batch_axis % x.ndim
        parts, means, variances, invstds, counts = [], [], [], [], []
        for part in _chunks(int(x.shape[axis]), ghost_batch_size):
            run = plan(x[_along(axis, part)], kept, xp)
            kernels = run.kernels
            mean_k, var_k = kernels.batch_stats(run.x, reduce_axes, xp=xp)
            invstd_k, scale_k = kernels.forward_scales(var_k, gamma, eps, xp=xp)
            parts.append(kernels.normalize(run.x, mean_k, scale_k, beta, xp=xp))
            means.append(mean_k)
            variances.append(var_k)
            invstds.append(xp.reshape(invstd_k, channel_shape))
            counts.append(count // int(x.shape[axis]) * (part.stop - part.start))
        y = xp.concat(parts, axis=axis)
        # The whole batch's moments from the chunks' (Chan, Golub & LeVeque):
        # the within-chunk variances plus the spread of the chunk means.
        mean = sum(n * m for n, m in zip(counts, means, strict=True)) / count
        var = (
            sum(
                n * (v + (m - mean) * (m - mean))
                for n, v, m in zip(counts, variances, means, strict=True)
            )
            / count
        )
        invstd = 1.0 / xp.sqrt(var + eps)
        fields = {
            "ghost_mean": xp.stack([xp.reshape(m, channel_shape) for m in means]),
            "ghost_invstd": xp.stack(invstds),
            "ghost_batch_size": ghost_batch_size,
            "batch_axis": axis,
        }
    else:
        assert mask is not None
        weights = _mask_weights(mask, tuple(x.shape), kept, dtype, xp)
        mean, var = _masked_stats(x, weights, reduce_axes, xp)
        invstd, scale = _math.forward_scales(var, gamma, eps, xp=xp)
        y = _math.normalize(x, mean, scale, beta, xp=xp)
        fields = {"mask": mask}
    fields.update(
        mean=xp.reshape(mean, channel_shape),
        var=xp.reshape(var, channel_shape),
        invstd=xp.reshape(invstd, channel_shape),
        count=count,
    )
    return y, fields


def _constant(a: Array, xp: Namespace) -> Array:
    """`a` without a gradient for automatic differentiation through the forward
    (PyTorch autograd, ``jax.grad``): the paper's r and d are constants."""
    if is_torch_array(a):
        return a.detach()
    if is_jax_namespace(xp):
        import jax  # in use already: `a` is a JAX array

        return jax.lax.stop_gradient(a)
    return a


def _mask_weights(
    mask: Array,
    x_shape: tuple[int, ...],
    kept: tuple[int, ...],
    dtype: object,
    xp: Namespace,
) -> Array:
    """The mask as 1.0 and 0.0 in the compute dtype, in the shape of `x` with
    length 1 along the channel axes (the mask's axes are `x`'s others, in order)."""
    shape = tuple(1 if a in kept else n for a, n in enumerate(x_shape))
    return xp.astype(xp.reshape(mask, shape), dtype)


def _masked_stats(
    x: Array, weights: Array, reduce_axes: tuple[int, ...], xp: Namespace
) -> tuple[Array, Array]:
    """Mean and biased variance of the values of `x` where `weights` is 1, by
    the corrected two-pass algorithm of :func:`bnarray._math.batch_stats`.

    ``grad_sums(dy, x, mean)`` is ``(Σ dy, Σ dy·(x - mean))``, summed in blocks
    like every sum of ``_math``: with the weights as `dy` it gives the count
    and the first moment; with the weighted deviations as `dy`, their sum and
    the sum of their squares.
    """
    zero = xp.zeros((1,) * x.ndim, dtype=weights.dtype, device=device(x))
    count, total = _math.grad_sums(weights, x, zero, reduce_axes, xp=xp)
    mean0 = total / count
    deviations = (x - mean0) * weights
    delta_sum, squares = _math.grad_sums(deviations, x, mean0, reduce_axes, xp=xp)
    delta = delta_sum / count
    var = squares / count - delta * delta
    return mean0 + delta, xp.maximum(var, xp.zeros_like(var))


def masked_bessel(mask: Array, dtype: object, xp: Namespace) -> float | Array:
    """m / (m - 1) for the m positions `mask` selects: a float where the mask's
    values are at hand, else a 0-d array of `dtype` (Dask and JAX stay lazy)."""
    if not is_lazy_array(mask):
        counted = int(xp.count_nonzero(mask))
        return counted / (counted - 1)
    counted = xp.sum(xp.astype(mask, dtype))
    return counted / (counted - 1)


def variant_of(ctx: BatchNormContext) -> Variant | None:
    """The variant a training context comes from, or None for plain batch norm."""
    if ctx.renorm_r is not None:
        return "renorm"
    if ctx.ghost_mean is not None:
        return "ghost"
    if ctx.mask is not None:
        return "mask"
    return None


def backward(
    dy: Array, ctx: BatchNormContext, *, xp: Namespace
) -> tuple[Array, Array, Array]:
    """`dx`, `dweight` and `dbias` after a training forward pass of a variant
    (see :doc:`/math` for the derivations)."""
    variant = variant_of(ctx)
    x = ctx.x
    kept = ctx.axis
    reduce_axes = ctx.reduce_axes
    shape = _broadcast_shape(tuple(x.shape), kept)
    dtype = ctx.mean.dtype
    gamma = _as_stat(ctx.weight, shape, dtype, xp)

    if variant == "renorm":
        r = xp.reshape(ctx.renorm_r, shape)
        d = xp.reshape(ctx.renorm_d, shape)
        mean = xp.reshape(ctx.mean, shape)
        invstd = xp.reshape(ctx.invstd, shape)
        run = plan(x, kept, xp, dy)
        kernels = run.kernels
        # Plain batch norm's gradient with γ·r for γ (r and d are constants),
        # and dγ = Σ dy·(x̂ r + d).
        sum_dy, sum_dy_xc = kernels.grad_sums(run.dy, run.x, mean, reduce_axes, xp=xp)
        dweight_hat, dy_scale, xc_scale, shift = kernels.backward_scales(
            sum_dy,
            sum_dy_xc,
            invstd,
            r if gamma is None else gamma * r,
            ctx.count,
            training=True,
            xp=xp,
        )
        dx = kernels.grad_input(run.dy, run.x, mean, dy_scale, xc_scale, shift, xp=xp)
        dweight = dweight_hat * r + d * sum_dy
    elif variant == "ghost":
        axis = ctx.batch_axis
        chunk_means, chunk_invstds = ctx.ghost_mean, ctx.ghost_invstd
        assert axis is not None and ctx.ghost_batch_size is not None
        assert chunk_means is not None and chunk_invstds is not None
        length = int(x.shape[axis])
        parts = []
        dweight = sum_dy = None
        for i, part in enumerate(_chunks(length, ctx.ghost_batch_size)):
            index = _along(axis, part)
            run = plan(x[index], kept, xp, dy[index])
            kernels = run.kernels
            mean_k = xp.reshape(chunk_means[i, ...], shape)
            invstd_k = xp.reshape(chunk_invstds[i, ...], shape)
            sum_dy_k, sum_dy_xc_k = kernels.grad_sums(
                run.dy, run.x, mean_k, reduce_axes, xp=xp
            )
            count_k = ctx.count // length * (part.stop - part.start)
            dweight_k, dy_scale, xc_scale, shift = kernels.backward_scales(
                sum_dy_k, sum_dy_xc_k, invstd_k, gamma, count_k, training=True, xp=xp
            )
            parts.append(
                kernels.grad_input(
                    run.dy, run.x, mean_k, dy_scale, xc_scale, shift, xp=xp
                )
            )
            dweight = dweight_k if dweight is None else dweight + dweight_k
            sum_dy = sum_dy_k if sum_dy is None else sum_dy + sum_dy_k
        dx = xp.concat(parts, axis=axis)
    else:
        # y depends on every x through μ and σ, which the counted positions
        # set: the sums run over all positions, the means over the m counted.
        weights = _mask_weights(ctx.mask, tuple(x.shape), kept, dtype, xp)
        counted = xp.sum(weights, axis=reduce_axes, keepdims=True)
        mean = xp.reshape(ctx.mean, shape)
        invstd = xp.reshape(ctx.invstd, shape)
        sum_dy, sum_dy_xc = _math.grad_sums(dy, x, mean, reduce_axes, xp=xp)
        dweight = sum_dy_xc * invstd
        dy_scale = invstd if gamma is None else invstd * gamma
        xc_scale = -dy_scale * (dweight / counted) * invstd
        shift = -dy_scale * (sum_dy / counted)
        correction = x - mean
        correction *= xc_scale
        correction += shift
        correction *= weights
        dx = xp.astype(dy * dy_scale + correction, x.dtype, copy=False)

    param_dtype = dtype if ctx.weight is None else ctx.weight.dtype
    channel_shape = tuple(ctx.mean.shape)

    def as_param(a: Array) -> Array:
        return xp.astype(xp.reshape(a, channel_shape), param_dtype, copy=False)

    return dx, as_param(dweight), as_param(sum_dy)
