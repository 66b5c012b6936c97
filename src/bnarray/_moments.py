"""Moments of the parts of a batch and their exact merge (Chan): the statistics
of a batch split over processes, and of all values of many batches."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from . import _math
from ._compat import Array, Namespace, device, is_array_api_obj, is_jax_namespace
from ._fast import Kernels, plan
from ._validation import (
    check_bool,
    check_x,
    namespace_of,
    normalize_axis,
    reduce_count,
)

__all__ = [
    "Pooled",
    "merge_moments",
    "part_moments",
    "pooled_moments",
    "population_stats",
    "wide_dtype",
]


def wide_dtype(xp: Namespace) -> object:
    """float64, whatever the input's dtype (counts and sums of many parts stay
    exact), except where JAX runs without 64-bit floats."""
    if is_jax_namespace(xp):
        jax: Any = importlib.import_module("jax")  # imported already: a JAX array
        return jax.dtypes.canonicalize_dtype(xp.float64)
    return xp.float64


def part_moments(
    x: Array,
    reduce_axes: tuple[int, ...],
    count: int,
    *,
    kernels: Kernels,
    xp: Namespace,
) -> Array:
    """One row ``[n, μ, M]`` of ``1 + 2C`` numbers in the wide dtype: the count
    n, the means μ and the sums of squared deviations M = n·σ² of the C
    channels of `x`, which holds `count` values per channel."""
    wide = wide_dtype(xp)
    channels = 1
    for a, n in enumerate(x.shape):
        if a not in reduce_axes:
            channels *= n
    if count > 0:
        mean, var = kernels.batch_stats(x, reduce_axes, xp=xp)
        mean = xp.reshape(xp.astype(mean, wide, copy=False), (channels,))
        m2 = xp.reshape(xp.astype(var, wide, copy=False), (channels,)) * float(count)
    else:
        # An empty part counts with n = 0 and zeros: its sums over `x` (not new
        # arrays), so that autodiff through a collective still reaches `x`.
        mean = xp.reshape(xp.astype(xp.sum(x, axis=reduce_axes), wide), (channels,))
        m2 = mean
    n = xp.full((1,), float(count), dtype=wide, device=device(x))
    return xp.concat([n, mean, m2])


def merge_moments(rows: Array, total: int, *, xp: Namespace) -> tuple[Array, Array]:
    """Mean and biased variance, shape ``(C,)`` in the rows' dtype, of the parts
    whose :func:`part_moments` are the P rows of `rows`, ``total`` values in all.

    μ = Σ nᵢμᵢ / n and M = Σ Mᵢ + Σ nᵢ(μᵢ − μ)², with the rounding error of
    the first μ corrected as in the two-pass kernels. No sums of squares of
    raw values are subtracted.
    """
    channels = (rows.shape[1] - 1) // 2
    n = float(total)
    counts = rows[:, :1]
    means = rows[:, 1 : 1 + channels]
    m2s = rows[:, 1 + channels :]
    mean0 = xp.sum(counts * means, axis=0) / n
    deviations = means - mean0
    weighted = counts * deviations
    delta = xp.sum(weighted, axis=0) / n  # the rounding error of mean0
    m2 = xp.sum(m2s, axis=0) + xp.sum(weighted * deviations, axis=0)
    var = m2 / n - delta * delta
    return mean0 + delta, xp.maximum(var, xp.zeros_like(var))


@dataclass(frozen=True)
class Pooled:
    """The statistics of all values of several batches."""

    mean: Array  # in the wide dtype, with the channel shape
    var: Array  # biased, like `mean`
    count: int  # values per channel
    batches: int
    dtype: object  # the compute dtype of the first batch
    xp: Namespace


def pooled_moments(
    batches: Iterable[Array],
    *,
    axis: int | tuple[int, ...],
    anchor: tuple[str, Array] | None = None,
    channel_shape: tuple[int, ...] | None = None,
) -> Pooled:
    """Mean and biased variance of all values of all `batches`.

    Every batch is checked against `anchor` (a name and an array: same library
    and device), else against the first batch, and its channel shape against
    `channel_shape`, else the first batch's. Only the 1 + 2C moments of each
    batch are kept, not the batch.
    """
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        msg = (
            "`batches` must be an iterable of arrays (a list, a generator), got "
            f"{type(batches).__name__}: {batches!r:.80}"
        )
        raise TypeError(msg)
    if is_array_api_obj(batches):
        shape = tuple(cast(Any, batches).shape)
        msg = (
            f"`batches` must be an iterable of arrays, got one array of shape "
            f"{shape}; pass [x] for a single batch"
        )
        raise TypeError(msg)
    rows = []
    total = 0
    dtype: object = None
    xp: Any = None
    for i, x in enumerate(batches):
        name = f"batches[{i}]"
        arrays = {name: x} if anchor is None else {name: x, anchor[0]: anchor[1]}
        xp = namespace_of(arrays)
        check_x(x, xp, name=name)
        kept = normalize_axis(axis, x.ndim)
        shape = tuple(x.shape[a] for a in kept)
        if channel_shape is None:
            channel_shape = shape
        if shape != channel_shape:
            msg = (
                f"`{name}` of shape {tuple(x.shape)} has {shape} features along "
                f"axis {axis!r}, expected {channel_shape}"
            )
            raise ValueError(msg)
        if anchor is None:
            anchor = (name, x)
        if dtype is None:
            dtype = _math.compute_dtype(x.dtype, xp)
        reduce_axes = tuple(a for a in range(x.ndim) if a not in kept)
        count = reduce_count(tuple(x.shape), reduce_axes)
        run = plan(x, kept, xp)
        rows.append(part_moments(run.x, reduce_axes, count, kernels=run.kernels, xp=xp))
        total += count
    if not rows:
        msg = "`batches` is empty: there are no values to compute statistics of"
        raise ValueError(msg)
    if total < 2:
        msg = (
            f"`batches` hold {total} value(s) per channel in all; the statistics "
            "need at least 2"
        )
        raise ValueError(msg)
    mean, var = merge_moments(xp.stack(rows), total, xp=xp)
    assert channel_shape is not None  # set by the first batch
    return Pooled(
        xp.reshape(mean, channel_shape),
        xp.reshape(var, channel_shape),
        total,
        len(rows),
        dtype,
        xp,
    )


def population_stats(
    batches: Iterable[Array],
    /,
    *,
    axis: int | tuple[int, ...] = -1,
    unbiased: bool = True,
) -> tuple[Array, Array]:
    r"""Mean and variance per channel of all values of all `batches`.

    The statistics of the concatenation of the batches, without concatenating
    them: each batch gives its count :math:`n_b`, mean :math:`\mu_b` and sum
    of squared deviations :math:`M_b = n_b\,\sigma_b^2` (two-pass), and the
    parts merge exactly, in float64, with Chan's formula

    .. math::

        n = \sum_b n_b, \qquad
        \mu = \frac{1}{n}\sum_b n_b\,\mu_b, \qquad
        \sigma^2 = \frac{1}{n - u}\Bigl(\sum_b M_b + \sum_b n_b (\mu_b - \mu)^2\Bigr)

    with :math:`u = 1` (`unbiased`) or 0. Every value counts once: a batch
    weighs as many values as it holds, unlike an average of per-batch
    statistics. Use it to re-estimate the running statistics after training
    (:meth:`BatchNorm.recompute_running_stats`).

    Only the :math:`1 + 2C` moments of each batch are kept, so `batches` may
    be a generator of batches computed one at a time. With Dask the results
    are lazy; with JAX without 64-bit floats the merge runs in float32.

    Parameters
    ----------
    batches : iterable of array
        Batches of one library and device, each with the same sizes along
        `axis` (the other axes may differ).
    axis : int or tuple of int, default -1
        Channel axis or axes, as for :func:`batch_norm_forward`.
    unbiased : bool, default True
        Divide by :math:`n - 1` (the running-variance estimate of PyTorch) or,
        with False, by :math:`n` (that of Keras and Flax).

    Returns
    -------
    mean, var : array
        Shape of the channel axes, in the compute dtype of the first batch
        (float32 for 16-bit inputs), on its device.

    Raises
    ------
    TypeError
        `batches` not an iterable of arrays; a batch of another library, not
        an array, or not floating; a non-bool `unbiased`.
    ValueError
        No batches; fewer than 2 values per channel in all; batches on another
        device or with other channel sizes; a bad `axis`.

    Examples
    --------
    >>> import numpy as np
    >>> import bnarray as bn
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.normal(3.0, 2.0, size=(n, 2)) for n in (5, 17, 8)]
    >>> mean, var = bn.population_stats(batches)
    >>> everything = np.concatenate(batches)
    >>> bool(np.allclose(mean, everything.mean(axis=0)))
    True
    >>> bool(np.allclose(var, everything.var(axis=0, ddof=1)))
    True
    """
    unbiased = check_bool(unbiased, "unbiased")
    pooled = pooled_moments(batches, axis=axis)
    xp, n = pooled.xp, pooled.count
    var = pooled.var * (n / (n - 1)) if unbiased else pooled.var
    return xp.astype(pooled.mean, pooled.dtype), xp.astype(var, pooled.dtype)
