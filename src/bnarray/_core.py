"""Functional batch normalization: forward, backward and the running-statistics update."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from . import _jax, _math, _variants
from ._compat import Array, Namespace, fast_namespace, is_jax_namespace
from ._distributed import check_sync, global_grad_sums, global_moments
from ._fast import Kernels, choose, fused, kernel_env, kernels_for
from ._plans import exact, meta, plan_for
from ._validation import (
    check_batch_count,
    check_bool,
    check_channel_array,
    check_eps,
    check_momentum,
    check_num_batches_tracked,
    check_out,
    check_statistics_source,
    check_x,
    namespace_of,
    normalize_axis,
    reduce_count,
)
from ._variants import Renorm
from .sync import Synchronizer

__all__ = [
    "BatchNormContext",
    "batch_norm_backward",
    "batch_norm_forward",
    "update_running_stats",
]


@dataclass(frozen=True, eq=False)
class BatchNormContext:
    """What :func:`batch_norm_backward` and :func:`update_running_stats` need
    from a forward pass.

    Returned by :func:`batch_norm_forward`; treat it as opaque to pass along,
    but its attributes are public and stable.

    Once JAX is imported (before or after bnarray), the context is a JAX
    pytree: the arrays `x`, `weight`, `mean`, `var`, `invstd`, `renorm_r`,
    `renorm_d`, `ghost_mean`, `ghost_invstd` and `mask` are its leaves,
    `count`, `axis`, `training`, `eps`, `sync`, `ghost_batch_size` and
    `batch_axis` its static structure. A
    function under ``jax.jit`` or ``jax.vmap`` can then take and return
    contexts, and :func:`batch_norm_backward` accepts a context that crossed
    such a boundary.

    Attributes
    ----------
    x : array
        The forward input (a reference, not a copy).
    weight : array or None
        The scale γ used, or None for no affine transform.
    mean, var : array
        Per-channel statistics used to normalize, with the shape of the kept
        axes: in training the batch mean and the *biased* batch variance, in
        inference the running statistics. Float32 for 16-bit `x`. With
        `sync` in training, those of the whole batch over all processes; with
        ghost batches, those of the whole batch (each chunk was normalized
        with its own, `ghost_mean` and `ghost_invstd`); with a `mask`, those
        of the counted positions.
    invstd : array
        ``1 / sqrt(var + eps)``.
    count : int
        Number of elements per channel that were reduced over (m); with
        `sync` in training, over all processes. With a `mask`, the number of
        positions, counted or not: ``sum(mask)`` of them were counted.
    axis : tuple of int
        The kept (channel) axes, non-negative and sorted.
    training : bool
        Whether batch statistics were used.
    eps : float
        The ε added to the variance.
    sync : Synchronizer or None
        The `sync` of the forward pass; after a training forward pass,
        :func:`batch_norm_backward` uses it too.
    renorm_r, renorm_d : array or None
        Batch renormalization's r and d (channel shape), or None.
    ghost_mean, ghost_invstd : array or None
        With ghost batches, each chunk's mean and ``1 / sqrt(var + eps)``,
        stacked along a first axis (one row per chunk); else None.
    mask : array or None
        The `mask` of a training forward pass, or None.
    ghost_batch_size, batch_axis : int or None
        The chunk size and the (non-negative) axis split into chunks, with
        ghost batches; else None.
    """

    x: Array
    weight: Array | None
    mean: Array
    var: Array
    invstd: Array
    count: int
    axis: tuple[int, ...]
    training: bool
    eps: float
    sync: Synchronizer | None = None
    renorm_r: Array | None = None
    renorm_d: Array | None = None
    ghost_mean: Array | None = None
    ghost_invstd: Array | None = None
    mask: Array | None = None
    ghost_batch_size: int | None = None
    batch_axis: int | None = None

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """The axes the statistics are reduced over."""
        return tuple(a for a in range(self.x.ndim) if a not in self.axis)

    def __repr__(self) -> str:
        shape = tuple(self.mean.shape)
        return (
            f"BatchNormContext(x_shape={tuple(self.x.shape)}, axis={self.axis}, "
            f"channel_shape={shape}, count={self.count}, training={self.training}, "
            f"eps={self.eps}"
            + ("" if self.sync is None else f", sync={self.sync!r}")
            + ")"
        )


def _register_context_pytree() -> None:
    _jax.register_dataclass(
        BatchNormContext,
        data_fields=(
            "x",
            "weight",
            "mean",
            "var",
            "invstd",
            "renorm_r",
            "renorm_d",
            "ghost_mean",
            "ghost_invstd",
            "mask",
        ),
        meta_fields=(
            "count",
            "axis",
            "training",
            "eps",
            "sync",
            "ghost_batch_size",
            "batch_axis",
        ),
    )


# JAX imported before bnarray; otherwise batch_norm_forward registers the context
# when it first meets JAX arrays.
if "jax" in sys.modules:
    _register_context_pytree()


def _broadcast_shape(shape: tuple[int, ...], kept: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n if a in kept else 1 for a, n in enumerate(shape))


def _as_stat(
    a: Array | None, shape: tuple[int, ...], dtype: object, xp: Namespace
) -> Array | None:
    """A per-channel array in the broadcast shape and the compute dtype."""
    if a is None:
        return None
    if type(a) is np.ndarray:  # the methods: NumPy's functions wrap them
        if a.dtype != dtype:
            a = a.astype(cast(Any, dtype))
        return a if a.shape == shape else a.reshape(shape)
    return xp.reshape(xp.astype(a, dtype, copy=False), shape)


def _reshape(a: Array, shape: tuple[int, ...], xp: Namespace) -> Array:
    if type(a) is np.ndarray:
        return a if a.shape == shape else a.reshape(shape)
    return xp.reshape(a, shape)


def _as_param(a: np.ndarray | None, dtype: object) -> np.ndarray | None:
    """A per-channel NumPy array in the compute dtype, in any shape (for the
    fused passes)."""
    return a if a is None or a.dtype == dtype else a.astype(cast(Any, dtype))


def batch_norm_forward(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    eps: float = 1e-5,
    training: bool = True,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    sync: Synchronizer | None = None,
    renorm: Renorm | None = None,
    ghost_batch_size: int | None = None,
    batch_axis: int = 0,
    mask: Array | None = None,
    out: Array | None = None,
) -> tuple[Array, BatchNormContext]:
    r"""Normalize `x` per channel, then scale and shift.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with, per channel, :math:`\mu` and the biased :math:`\sigma^2` of the batch
    when `training` is True (of the whole batch over all processes with
    `sync`), and `running_mean`, `running_var` otherwise.

    Parameters
    ----------
    x : array
        Real floating array, at least 1-D.
    weight, bias : array, optional
        γ and β, with the shape of `x` along the kept axes (``x.shape[axis]``
        for an int `axis`). None means γ = 1, β = 0.
    axis : int or tuple of int, default -1
        The channel axis (or axes) that keep their own statistics; the
        statistics are reduced over all other axes. ``-1`` is the
        B×W×H×C (NHWC) layout, ``1`` PyTorch's NCHW.
    eps : float, default 1e-5
        Added to the variance, as in PyTorch, cuDNN and Flax.
    training : bool, default True
        A Python or NumPy bool. True: normalize with the batch's statistics (``running_*`` must be
        None; update them with :func:`update_running_stats`). False: normalize
        with `running_mean` and `running_var`, which are then required.
    running_mean, running_var : array, optional
        The running statistics for inference.
    sync : Synchronizer, optional
        None (default): the statistics of this `x`. A synchronizer
        (:class:`bnarray.sync.TorchDistributed`, :class:`~bnarray.sync.MPI`,
        :class:`~bnarray.sync.JaxAxis`, or any object with the methods of
        :class:`~bnarray.sync.Synchronizer`): in training, `x` is this
        process's share of a batch split over the processes of its group
        along the reduced axes, and the statistics are those of the whole
        batch. Every process of the group must make the same calls in the
        same order; shares may differ in size, and be empty. One collective
        per call; none with ``training=False``. See :doc:`/distributed`.
    renorm : Renorm, optional
        Batch renormalization (Ioffe 2017) in training: ``y = γ(x̂ r + d) + β``
        with r and d comparing the batch's statistics with `running_mean`
        and `running_var`, which are then required (see :class:`Renorm`).
        Inference ignores it.
    ghost_batch_size : int, optional
        Ghost batch norm (Hoffer et al. 2017) in training: `x` is split along
        `batch_axis` into contiguous chunks of this size (the last one
        smaller where it does not divide), each normalized with its own
        statistics. ``ctx.mean`` and ``ctx.var`` are those of the whole batch
        (merged exactly from the chunks'), so :func:`update_running_stats`
        makes one update per call. A size of at least the batch's is plain
        batch norm. Inference ignores it.
    batch_axis : int, default 0
        The axis that `ghost_batch_size` splits: one of the reduced axes.
    mask : array of bool, optional
        In training, the statistics (and so the running statistics) come
        only from the positions where `mask` is True; every position is
        normalized with them. Its shape is that of `x` without the channel
        axes ((B, T) for `x` of shape (B, T, C) and ``axis=-1``, as in
        Keras). Inference normalizes every position with the running
        statistics and only checks the mask's metadata.
    out : array, optional
        NumPy and CuPy only: an array that receives `y`, which is then `out`
        itself. It must have the shape, dtype and device of `x`, be
        C-contiguous and writeable, and share no memory with `x`, `weight`,
        `bias`, the running statistics or `mask`. Writing into an array of
        earlier calls spares the fresh memory a new `y` costs (see
        :doc:`/behaviour`); the results are bitwise those without `out`.
        Checked on every call, before anything is computed.

    Returns
    -------
    y : array
        Same shape, dtype, namespace and device as `x`; `out` where given.
    ctx : BatchNormContext
        For :func:`batch_norm_backward` and :func:`update_running_stats`.

    Raises
    ------
    TypeError
        A non-array or non-floating `x` or parameter; arrays of different
        libraries; a `training` that is not a bool; a `sync` without the
        synchronizer's methods; a `renorm` that is not a :class:`Renorm`; a
        non-integer `ghost_batch_size` or `batch_axis`; a `mask` that is not
        a bool array; an `out` with an `x` of another library than NumPy and
        CuPy, or not an array of `x`'s library and dtype.
    ValueError
        A bad `axis`, `eps` or parameter shape; an `x` of unknown shape (Dask
        after boolean indexing); arrays on different devices;
        fewer than two values per channel in training (over all processes
        with `sync`: then every process raises; in a ghost batch; where
        `mask` is True, checked only where the mask's values are at hand,
        not for Dask and JAX arrays, whose statistics are then NaN or of a
        zero variance); running statistics missing in inference or with
        `renorm`, or given in training without it; a `ghost_batch_size`
        below 1; a `batch_axis` that is a channel axis; a `mask` of the
        wrong shape; two of `renorm`, `ghost_batch_size` and `mask`, or one
        of them with `sync`, in training; an `out` of another shape or
        device than `x`, not C-contiguous, read-only, or overlapping an
        input.
    RuntimeError
        A collective of `sync` that returned an array of the wrong shape
        (processes whose `x` differ in channel shape), or the engine's own
        error when another process failed (see :doc:`/distributed`).

    Notes
    -----
    Statistics of 16-bit floating inputs are accumulated in float32; the
    variance is computed from deviations from the mean (two passes), never as
    E[x²] − E[x]². With `sync`, each process's count, mean and sum of squared
    deviations are merged exactly (Chan, Golub & LeVeque), in float64. Every
    argument is checked before the collective: a bad input raises in its own
    process without entering it.

    Examples
    --------
    >>> import numpy as np
    >>> import bnarray as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, ctx = bn.batch_norm_forward(x, eps=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> ctx.mean, ctx.var
    (array([ 2., 20.]), array([  1., 100.]))
    >>> buffer = np.empty_like(x)
    >>> y, ctx = bn.batch_norm_forward(x, eps=0.0, out=buffer)
    >>> y is buffer
    True
    """
    return _checked_forward(
        x,
        weight,
        bias,
        axis,
        eps,
        training,
        running_mean,
        running_var,
        sync,
        renorm,
        ghost_batch_size,
        batch_axis,
        mask,
        out,
        True,
    )


def _checked_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    axis: int | tuple[int, ...],
    eps: float,
    training: bool,
    running_mean: Array | None,
    running_var: Array | None,
    sync: Synchronizer | None,
    renorm: Renorm | None,
    ghost_batch_size: int | None,
    batch_axis: int,
    mask: Array | None,
    out: Array | None,
    check_out_array: bool,
) -> tuple[Array, BatchNormContext]:
    """:func:`batch_norm_forward`; without `check_out_array`, `out` is an
    array its caller has checked as :func:`check_out` does (the layer's
    kept outputs: see :func:`bnarray._layer._buffer`)."""
    # A synchronizer, and a mask's count of True values, are checked on every
    # call: such calls keep no plan.
    call, cached = plan_for(
        None
        if sync is not None or mask is not None
        else lambda: (
            _FORWARD,
            kernel_env(),
            meta(x),
            exact(axis),
            exact(eps),
            exact(training),
            meta(weight),
            meta(bias),
            meta(running_mean),
            meta(running_var),
            exact(renorm),
            exact(ghost_batch_size),
            exact(batch_axis),
            meta(out),
        ),
        lambda: _forward_plan(
            x,
            weight,
            bias,
            axis,
            eps,
            training,
            running_mean,
            running_var,
            sync,
            renorm,
            ghost_batch_size,
            batch_axis,
            mask,
        ),
    )
    if cached and not call.one_device:
        _same_device(x, weight, bias, running_mean, running_var, None)
    if out is not None and check_out_array:
        inputs = {
            "x": x,
            "weight": weight,
            "bias": bias,
            "running_mean": running_mean,
            "running_var": running_var,
            "mask": mask,
        }
        check_out(out, x, inputs)
    if call.variant is not None:
        y, fields = _variants.forward(
            call.variant,
            x,
            weight,
            bias,
            kept=call.kept,
            eps=call.eps,
            renorm=renorm,
            ghost_batch_size=ghost_batch_size,
            batch_axis=batch_axis,
            mask=mask,
            running_mean=running_mean,
            running_var=running_var,
            xp=call.api,
        )
        return _math.into(out, y), BatchNormContext(
            x=x, weight=weight, axis=call.kept, training=True, eps=call.eps, **fields
        )
    return _forward(call, x, weight, bias, running_mean, running_var, axis, sync, out)


@dataclass(frozen=True)
class _ForwardPlan:
    """What the checks of a forward call decide (see :mod:`bnarray._plans`)."""

    xp: Namespace
    kernels: Kernels
    contiguous: bool  # the kernels read C-contiguous arrays
    one_device: bool  # NumPy arrays: no devices to compare on later calls
    kept: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    channel_shape: tuple[int, ...]
    shape: tuple[int, ...]  # the broadcast shape of per-channel arrays
    dtype: object  # the compute dtype
    count: int
    eps: float
    training: bool
    api: Namespace  # array-api-compat's namespace (`xp` may be NumPy itself)
    variant: _variants.Variant | None = None
    fused: Any = None  # the module of a fused training pass (small NumPy arrays)


_FORWARD, _BACKWARD, _UPDATE = "forward", "backward", "update"


def _same_device(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    mask: Array | None,
) -> Namespace:
    return namespace_of(
        {
            "x": x,
            "weight": weight,
            "bias": bias,
            "running_mean": running_mean,
            "running_var": running_var,
            "mask": mask,
        }
    )


def _forward_plan(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    axis: object,
    eps: object,
    training: object,
    running_mean: Array | None,
    running_var: Array | None,
    sync: object,
    renorm: object,
    ghost_batch_size: object,
    batch_axis: object,
    mask: Array | None,
) -> _ForwardPlan:
    """Every check of :func:`batch_norm_forward`, in order, and what they decide."""
    xp = _same_device(x, weight, bias, running_mean, running_var, mask)
    if is_jax_namespace(xp):
        _register_context_pytree()
    check_x(x, xp)
    kept = normalize_axis(axis, x.ndim)  # type: ignore[arg-type]
    eps = check_eps(eps)
    training = check_bool(training, "training")
    synced = training and check_sync(sync) is not None
    channel_shape = tuple(x.shape[a] for a in kept)
    for name, a in [
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ]:
        check_channel_array(a, name, channel_shape, xp)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in kept)
    count = reduce_count(tuple(x.shape), reduce_axes)

    variant = _variants.check_variant(
        x,
        kept,
        training=training,
        synced=synced,
        renorm=renorm,
        ghost_batch_size=ghost_batch_size,
        batch_axis=batch_axis,
        mask=mask,
        running_mean=running_mean,
        running_var=running_var,
        xp=xp,
    )
    if variant != "renorm":  # renorm compares the batch with the running statistics
        check_statistics_source(training, running_mean, running_var)
    if training and not synced:  # with `sync`, the count over all processes decides
        check_batch_count(count, tuple(x.shape), axis)
    kernels, contiguous = choose(x.dtype, x.size, kept, xp)
    arrays = (x, weight, bias, running_mean, running_var)
    return _ForwardPlan(
        xp=fast_namespace(xp),
        kernels=kernels,
        contiguous=contiguous,
        one_device=all(a is None or type(a) is np.ndarray for a in arrays),
        kept=kept,
        reduce_axes=reduce_axes,
        channel_shape=channel_shape,
        shape=_broadcast_shape(tuple(x.shape), kept),
        dtype=_math.compute_dtype(x.dtype, xp),
        count=count,
        eps=eps,
        training=training,
        api=xp,
        variant=variant,
        fused=fused(kernels, tuple(x.shape), kept) if training and not synced else None,
    )


def _forward(
    call: _ForwardPlan,
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    axis: object,
    sync: Synchronizer | None,
    out: Array | None,
) -> tuple[Array, BatchNormContext]:
    xp, kernels, shape, dtype = call.xp, call.kernels, call.shape, call.dtype
    xs = np.ascontiguousarray(x) if call.contiguous else x
    count = call.count
    if call.fused is not None:  # NumPy arrays: (C,) statistics
        y, mean, var, invstd = call.fused.small_forward(
            xs,
            shape,
            _as_param(weight, dtype),
            _as_param(bias, dtype),
            call.eps,
            out=out,
        )
        return y, _context(call, x, weight, mean, var, invstd, count, None)
    if call.training and sync is not None:
        mean, var, count = global_moments(
            xs, call.reduce_axes, count, sync, axis=axis, kernels=kernels, xp=xp
        )
    elif call.training:
        mean, var = kernels.batch_stats(xs, call.reduce_axes, xp=xp)
    else:
        mean = _as_stat(running_mean, shape, dtype, xp)
        var = _as_stat(running_var, shape, dtype, xp)
    gamma = _as_stat(weight, shape, dtype, xp)
    invstd, scale = kernels.forward_scales(var, gamma, call.eps, xp=xp)
    beta = _as_stat(bias, shape, dtype, xp)
    y = kernels.normalize(xs, mean, scale, beta, xp=xp, out=out)
    return y, _context(call, x, weight, mean, var, invstd, count, sync)


def _context(
    call: _ForwardPlan,
    x: Array,
    weight: Array | None,
    mean: Array,
    var: Array,
    invstd: Array,
    count: int,
    sync: Synchronizer | None,
) -> BatchNormContext:
    xp, channel_shape = call.xp, call.channel_shape
    # The fields of BatchNormContext(...) set directly: a frozen dataclass's
    # __init__ sets each through object.__setattr__, a tenth of a small step.
    ctx: BatchNormContext = object.__new__(BatchNormContext)
    ctx.__dict__.update(
        _NO_VARIANT,
        x=x,
        weight=weight,
        mean=_reshape(mean, channel_shape, xp),
        var=_reshape(var, channel_shape, xp),
        invstd=_reshape(invstd, channel_shape, xp),
        count=count,
        axis=call.kept,
        training=call.training,
        eps=call.eps,
        sync=sync,
    )
    return ctx


# The fields of BatchNormContext that only the variants set, at their defaults.
_NO_VARIANT = {
    f.name: f.default
    for f in dataclasses.fields(BatchNormContext)
    if f.default is not dataclasses.MISSING
}


def _check_ctx(ctx: object) -> BatchNormContext:
    if not isinstance(ctx, BatchNormContext):
        msg = (
            "`ctx` must be the BatchNormContext returned by batch_norm_forward, got "
            f"{type(ctx).__name__}: {ctx!r:.80}"
        )
        raise TypeError(msg)
    return ctx


def batch_norm_backward(
    dy: Array, ctx: BatchNormContext, *, out: Array | None = None
) -> tuple[Array, Array, Array]:
    r"""Gradients of a loss with respect to `x`, γ and β, given its gradient `dy`.

    In training mode (batch statistics, which depend on `x`), with
    :math:`s = 1/\sqrt{\sigma^2+\epsilon}`, :math:`\hat x = (x-\mu)s` and
    :math:`m` values per channel:

    .. math::

        \frac{\partial L}{\partial x} = \frac{\gamma s}{m}\Bigl(m\,dy
            - \sum dy - \hat x \sum dy\,\hat x\Bigr), \quad
        \frac{\partial L}{\partial \gamma} = \sum dy\,\hat x, \quad
        \frac{\partial L}{\partial \beta} = \sum dy

    In inference mode the running statistics are constants and
    :math:`\partial L/\partial x = dy\,\gamma\,s`.

    After a training forward pass with `sync`, :math:`m` and the two sums
    in the gradient of `x` are those of all processes (one collective sums
    them), so `dx` is the gradient of the sum of every process's loss with
    respect to this process's share; `dweight` and `dbias` are this process's
    shares of γ's and β's gradients, which sum over the processes to the
    gradient (what PyTorch's DistributedDataParallel all-reduces).

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to the forward output `y`: same
        shape, dtype, namespace and device as the forward `x`.
    ctx : BatchNormContext
        The context returned by :func:`batch_norm_forward`.
    out : array, optional
        NumPy and CuPy only: an array that receives `dx`, which is then `out`
        itself. It must have the shape, dtype and device of `dy`, be
        C-contiguous and writeable, and share no memory with `dy` or the
        arrays of `ctx` (its `x` among them). Checked on every call, before
        anything is computed.

    Returns
    -------
    dx : array
        Like `x`; `out` where given.
    dweight, dbias : array
        With the shape of the kept axes, in the weight's dtype (the compute
        dtype when the forward had no weight). Returned also without affine
        parameters: they are then the gradients for γ = 1, β = 0. With
        `sync`, this process's share.

    Raises
    ------
    TypeError
        `ctx` is not a BatchNormContext; `dy` is not an array of `x`'s library
        and dtype; an `out` with arrays of another library than NumPy and
        CuPy, or not an array of `dy`'s library and dtype.
    ValueError
        `dy` has another shape or device than `x`; an `out` of another shape
        or device than `dy`, not C-contiguous, read-only, or overlapping
        `dy` or an array of `ctx`.
    RuntimeError
        From the collective of a synchronized context (see
        :func:`batch_norm_forward`).

    Examples
    --------
    >>> import numpy as np
    >>> import bnarray as bn
    >>> x = np.array([[1.0], [2.0], [4.0]])
    >>> y, ctx = bn.batch_norm_forward(x)
    >>> dx, dweight, dbias = bn.batch_norm_backward(np.ones_like(y), ctx)
    >>> np.abs(dx).max() < 1e-12  # y's per-channel mean is fixed, so Σy has no x-gradient
    np.True_
    >>> dbias
    array([3.])
    """
    return _checked_backward(dy, ctx, out, True)


def _checked_backward(
    dy: Array, ctx: BatchNormContext, out: Array | None, check_out_array: bool
) -> tuple[Array, Array, Array]:
    """:func:`batch_norm_backward`; without `check_out_array`, as
    :func:`_checked_forward`."""
    ctx = _check_ctx(ctx)
    x = ctx.x
    variant = _variants.variant_of(ctx) if ctx.training else None
    call, cached = plan_for(
        None
        if variant is not None
        else lambda: (
            _BACKWARD,
            kernel_env(),
            meta(dy),
            meta(x),
            ctx.axis,
            ctx.training,
            meta(ctx.weight),
            meta(ctx.mean),
            meta(out),
        ),
        lambda: _backward_plan(dy, ctx),
    )
    if cached and not call.one_device:
        namespace_of({"dy": dy, "x": x})
    if out is not None and check_out_array:
        inputs = {
            "dy": dy,
            "ctx.x": x,
            "ctx.weight": ctx.weight,
            "ctx.mean": ctx.mean,
            "ctx.invstd": ctx.invstd,
        }
        check_out(out, dy, inputs, name="dy")
    if variant is not None:
        dx, dweight, dbias = _variants.backward(dy, ctx, xp=call.api)
        return _math.into(out, dx), dweight, dbias
    xp, kernels, shape, dtype = call.xp, call.kernels, call.shape, call.dtype
    if call.contiguous:
        x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    channel_shape, param_dtype = call.channel_shape, call.param_dtype
    if call.fused is not None and ctx.sync is None:  # NumPy arrays: (C,) results
        dx, dweight, sum_dy = call.fused.small_backward(
            dy,
            x,
            shape,
            ctx.mean,
            ctx.invstd,
            _as_param(ctx.weight, dtype),
            ctx.count,
            out=out,
        )
        return (
            dx,
            _as_stat(dweight, channel_shape, param_dtype, xp),
            _as_stat(sum_dy, channel_shape, param_dtype, xp),
        )
    reduce_axes = call.reduce_axes
    mean = _reshape(ctx.mean, shape, xp)
    invstd = _reshape(ctx.invstd, shape, xp)
    gamma = _as_stat(ctx.weight, shape, dtype, xp)
    sum_dy, sum_dy_xc = kernels.grad_sums(dy, x, mean, reduce_axes, xp=xp)
    if ctx.training and ctx.sync is not None:
        total_dy, total_dy_xc = global_grad_sums(sum_dy, sum_dy_xc, ctx.sync, xp=xp)
        _, dy_scale, xc_scale, shift = kernels.backward_scales(
            total_dy, total_dy_xc, invstd, gamma, ctx.count, training=True, xp=xp
        )
        dweight = sum_dy_xc * invstd  # this process's share
    else:
        dweight, dy_scale, xc_scale, shift = kernels.backward_scales(
            sum_dy, sum_dy_xc, invstd, gamma, ctx.count, training=ctx.training, xp=xp
        )
    dx = kernels.grad_input(dy, x, mean, dy_scale, xc_scale, shift, xp=xp, out=out)
    return (
        dx,
        _as_stat(dweight, channel_shape, param_dtype, xp),
        _as_stat(sum_dy, channel_shape, param_dtype, xp),
    )


@dataclass(frozen=True)
class _BackwardPlan:
    """What the checks of a backward call decide (see :mod:`bnarray._plans`)."""

    xp: Namespace
    api: Namespace  # array-api-compat's namespace (`xp` may be NumPy itself)
    kernels: Kernels
    contiguous: bool
    one_device: bool
    reduce_axes: tuple[int, ...]
    channel_shape: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: object  # the compute dtype: the statistics'
    param_dtype: object  # of dweight and dbias
    fused: Any = None  # the module of a fused training pass (small NumPy arrays)


def _backward_plan(dy: Array, ctx: BatchNormContext) -> _BackwardPlan:
    """Every check of :func:`batch_norm_backward`, in order, and what they decide."""
    x = ctx.x
    xp = namespace_of({"dy": dy, "x": x})
    check_x(dy, xp, name="dy")
    if dy.dtype != x.dtype:
        msg = f"`dy` must have the dtype of `x` ({x.dtype}), got {dy.dtype}"
        raise TypeError(msg)
    if tuple(dy.shape) != tuple(x.shape):
        msg = f"`dy` must have the shape of `x` {tuple(x.shape)}, got {tuple(dy.shape)}"
        raise ValueError(msg)
    kernels, contiguous = choose(x.dtype, x.size, ctx.axis, xp, dy.dtype)
    dtype = ctx.mean.dtype
    return _BackwardPlan(
        xp=fast_namespace(xp),
        api=xp,
        kernels=kernels,
        contiguous=contiguous,
        one_device=type(x) is np.ndarray and type(dy) is np.ndarray,
        reduce_axes=ctx.reduce_axes,
        channel_shape=tuple(ctx.mean.shape),
        shape=_broadcast_shape(tuple(x.shape), ctx.axis),
        dtype=dtype,
        param_dtype=dtype if ctx.weight is None else ctx.weight.dtype,
        fused=fused(kernels, tuple(x.shape), ctx.axis) if ctx.training else None,
    )


def update_running_stats(
    running_mean: Array,
    running_var: Array,
    ctx: BatchNormContext,
    *,
    momentum: float | None = 0.1,
    num_batches_tracked: int | None = None,
    unbiased: bool = True,
) -> tuple[Array, Array]:
    r"""New running statistics after a training batch (PyTorch and cuDNN convention).

    .. math::

        \hat\mu \leftarrow (1 - \alpha)\,\hat\mu + \alpha\,\mu_B, \qquad
        \hat\sigma^2 \leftarrow (1 - \alpha)\,\hat\sigma^2
            + \alpha\,\frac{m}{m - 1}\,\sigma_B^2

    with :math:`\alpha` = `momentum`, or :math:`\alpha = 1/n` (`momentum` None,
    a cumulative average over the :math:`n` = `num_batches_tracked` batches so
    far). The running variance uses the unbiased batch variance, or with
    ``unbiased=False`` the biased :math:`\sigma_B^2` itself (no factor
    :math:`m/(m-1)`), as Keras 3, Flax, Haiku and Equinox store it.

    The context of a synchronized forward pass holds the statistics and the
    count of the whole batch over all processes: every process computes the
    same new running statistics, without communicating.

    Keras, Flax and Chainer call :math:`1 - \alpha` the "momentum" or "decay":
    Keras ``momentum=0.99`` is ``momentum=0.01`` here. Their default ε also
    differs (Keras 1e-3, Chainer 2e-5; PyTorch and Flax 1e-5).

    Parameters
    ----------
    running_mean, running_var : array
        The current running statistics, with the shape of the kept axes.
        Not modified.
    ctx : BatchNormContext
        From a :func:`batch_norm_forward` call with ``training=True``.
    momentum : float or None, default 0.1
        Weight of the new batch, in [0, 1]; None for the cumulative average.
    num_batches_tracked : int, optional
        Number of batches seen including this one; required when `momentum`
        is None.
    unbiased : bool, default True
        Whether the running variance averages the unbiased batch variances
        (PyTorch, cuDNN, Chainer) or the biased ones (``False``: Keras, Flax,
        Haiku, Equinox). A Python or NumPy bool.

    Returns
    -------
    new_mean, new_var : array
        New arrays in the dtype of the running statistics.

    Raises
    ------
    TypeError
        Non-array statistics, a `ctx` that is not a BatchNormContext, arrays of
        different libraries, a non-number `momentum`, a non-bool `unbiased`.
    ValueError
        Shapes that do not match `ctx`, an inference `ctx`, `momentum` outside
        [0, 1], a missing `num_batches_tracked` with ``momentum=None``.

    Examples
    --------
    >>> import numpy as np
    >>> import bnarray as bn
    >>> x = np.array([[1.0], [3.0]])
    >>> _, ctx = bn.batch_norm_forward(x)
    >>> bn.update_running_stats(np.zeros(1), np.ones(1), ctx, momentum=0.5)
    (array([1.]), array([1.5]))
    >>> bn.update_running_stats(np.zeros(1), np.ones(1), ctx, momentum=0.5,
    ...                         unbiased=False)
    (array([1.]), array([1.]))
    """
    ctx = _check_ctx(ctx)
    call, cached = plan_for(
        lambda: (
            _UPDATE,
            kernel_env(),
            meta(running_mean),
            meta(running_var),
            meta(ctx.mean),
            ctx.training,
            exact(momentum),
            exact(unbiased),
        ),
        lambda: _update_plan(
            running_mean, running_var, ctx, momentum, num_batches_tracked, unbiased
        ),
    )
    if cached and not call.one_device:
        namespace_of(
            {"running_mean": running_mean, "running_var": running_var, "ctx": ctx.mean}
        )
    xp, momentum = call.xp, call.momentum
    n = check_num_batches_tracked(num_batches_tracked, required=momentum is None)

    factor = momentum if momentum is not None else 1.0 / n  # type: ignore[operator]
    bessel: float | Array = 1.0
    if call.unbiased and ctx.mask is not None:  # the counted positions' number
        bessel = _variants.masked_bessel(ctx.mask, running_var.dtype, call.api)
    elif call.unbiased:
        bessel = ctx.count / (ctx.count - 1)
    new_mean: Array
    new_var: Array
    new_mean, new_var = call.kernels.running_update(
        running_mean,
        running_var,
        ctx.mean,
        ctx.var,
        factor=factor,
        bessel=bessel,
        xp=xp,
    )
    return new_mean, new_var


@dataclass(frozen=True)
class _UpdatePlan:
    """What the checks of an update decide (see :mod:`bnarray._plans`)."""

    xp: Namespace
    api: Namespace  # array-api-compat's namespace (`xp` may be NumPy itself)
    kernels: Kernels
    one_device: bool
    momentum: float | None
    unbiased: bool


def _update_plan(
    running_mean: Array,
    running_var: Array,
    ctx: BatchNormContext,
    momentum: object,
    num_batches_tracked: object,
    unbiased: object,
) -> _UpdatePlan:
    """Every check of :func:`update_running_stats`, in order, and what they
    decide. `num_batches_tracked` changes from call to call: a cached plan
    does not stand for its check."""
    xp = namespace_of(
        {"running_mean": running_mean, "running_var": running_var, "ctx": ctx.mean}
    )
    if running_var is None:
        msg = "`running_var` must be an array, got None"
        raise TypeError(msg)
    if not ctx.training:
        msg = (
            "`ctx` comes from an inference forward pass (training=False); running "
            "statistics are updated from training batches only"
        )
        raise ValueError(msg)
    checked = check_momentum(momentum)
    check_num_batches_tracked(num_batches_tracked, required=checked is None)
    unbiased = check_bool(unbiased, "unbiased")
    channel_shape = tuple(ctx.mean.shape)
    check_channel_array(running_mean, "running_mean", channel_shape, xp)
    check_channel_array(running_var, "running_var", channel_shape, xp)
    arrays = (running_mean, running_var, ctx.mean)
    return _UpdatePlan(
        xp=fast_namespace(xp),
        api=xp,
        kernels=kernels_for(xp),
        one_device=all(type(a) is np.ndarray for a in arrays),
        momentum=checked,
        unbiased=unbiased,
    )
