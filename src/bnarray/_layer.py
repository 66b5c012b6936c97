"""The stateful layer: parameters, running statistics, train/eval mode, state dicts."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from ._compat import Array, Device, Namespace, array_namespace, device, is_array_api_obj
from ._core import (
    BatchNormContext,
    batch_norm_backward,
    batch_norm_forward,
    update_running_stats,
)
from ._validation import (
    check_eps,
    check_momentum,
    check_x,
    library_name,
    namespace_of,
    normalize_axis,
)

__all__ = ["BatchNorm"]


def _channel_shape(num_features: object, axis: object) -> tuple[int, ...]:
    features = num_features if isinstance(num_features, tuple) else (num_features,)
    sizes = []
    for n in features:
        if isinstance(n, bool):
            msg = f"`num_features` must be a positive int or tuple of ints, got {num_features!r}"
            raise TypeError(msg)
        try:
            n = operator.index(n)
        except TypeError:
            msg = f"`num_features` must be a positive int or tuple of ints, got {num_features!r}"
            raise TypeError(msg) from None
        if n < 1:
            msg = f"`num_features` must be positive, got {num_features!r}"
            raise ValueError(msg)
        sizes.append(n)
    n_axes = len(axis) if isinstance(axis, tuple) else 1
    if not isinstance(axis, (int, tuple)) or isinstance(axis, bool):
        msg = f"`axis` must be an int or a tuple of ints, got {axis!r}"
        raise TypeError(msg)
    if len(sizes) != n_axes:
        msg = (
            f"`num_features` {num_features!r} must give one size per channel axis "
            f"(`axis` is {axis!r})"
        )
        raise ValueError(msg)
    return tuple(sizes)


class BatchNorm:
    r"""Batch normalization layer with learnable γ, β and running statistics.

    In training mode (the default, see :meth:`train`), calling the layer
    normalizes with the batch's statistics and updates the running
    statistics; in inference mode (:meth:`eval`) it normalizes with the
    running statistics and leaves every attribute unchanged. :meth:`eval` is
    therefore also the switch that freezes the statistics while γ and β keep
    training.

    Parameters
    ----------
    num_features : int or tuple of int
        Size of the channel axis (one size per axis for a tuple `axis`).
    axis : int or tuple of int, default -1
        Channel axis of the inputs: ``-1`` for B×W×H×C (NHWC), ``1`` for
        PyTorch's NCHW.
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of each new batch in the running statistics (PyTorch
        convention; Keras's ``momentum=0.99`` is ``0.01`` here). None: a
        cumulative average over all batches.
    affine : bool, default True
        Whether to learn γ (``weight``, ones) and β (``bias``, zeros).
    track_running_stats : bool, default True
        Whether to keep ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked``. Without them the layer uses batch statistics
        in both modes, like PyTorch.
    xp : namespace, optional
        Array library of the parameters (a module such as ``numpy`` or
        ``torch``). Default: NumPy.
    device : device, optional
        Where to create the parameters. Default: the library's default device.
    dtype : dtype, optional
        Real floating dtype of the parameters and statistics. Default: the
        library's default floating dtype (float64 for NumPy, float32 for
        PyTorch). Inputs of another floating dtype are accepted: the
        computation runs in the input's dtype (float32 for 16-bit inputs).

    Attributes
    ----------
    weight, bias : array or None
    running_mean, running_var : array or None
    num_batches_tracked : int
    training : bool
    grad_weight, grad_bias : array or None
        Set by :meth:`backward` when `affine`.

    Examples
    --------
    >>> import numpy as np
    >>> import bnarray as bn
    >>> layer = bn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(64, 3))
    >>> y = layer(x)
    >>> bool(np.allclose(y.mean(axis=0), 0.0) and np.allclose(y.std(axis=0), 1.0, atol=1e-4))
    True
    >>> dx = layer.backward(np.ones_like(y))
    >>> layer.grad_bias
    array([64., 64., 64.])
    >>> layer.num_batches_tracked
    1
    >>> y_eval = layer.eval()(x[:1])  # a single sample works with running statistics
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        axis: int | tuple[int, ...] = -1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        xp: Any = None,
        device: Device = None,
        dtype: Any = None,
    ) -> None:
        self.channel_shape = _channel_shape(num_features, axis)
        self.axis = axis
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        for name, flag in [
            ("affine", affine),
            ("track_running_stats", track_running_stats),
        ]:
            if not isinstance(flag, bool):
                msg = f"`{name}` must be a bool, got {flag!r}"
                raise TypeError(msg)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if xp is None:
            import numpy

            xp = numpy
        try:
            self._xp: Namespace = array_namespace(xp.zeros(0))
        except (AttributeError, TypeError):
            msg = f"`xp` must be an array library such as numpy, got {xp!r:.80}"
            raise TypeError(msg) from None
        probe = self._xp.zeros(0, device=device)
        dtype = probe.dtype if dtype is None else dtype
        if not self._xp.isdtype(dtype, "real floating"):
            msg = f"`dtype` must be a real floating dtype, got {dtype!r}"
            raise TypeError(msg)

        def full(value: float) -> Array:
            return self._xp.full(self.channel_shape, value, dtype=dtype, device=device)

        self.weight: Array | None = full(1.0) if affine else None
        self.bias: Array | None = full(0.0) if affine else None
        self.running_mean: Array | None = full(0.0) if track_running_stats else None
        self.running_var: Array | None = full(1.0) if track_running_stats else None
        self.num_batches_tracked = 0
        self.training = True
        self.grad_weight: Array | None = None
        self.grad_bias: Array | None = None
        self._ctx: BatchNormContext | None = None

    def __repr__(self) -> str:
        features = (
            self.channel_shape[0]
            if len(self.channel_shape) == 1
            else self.channel_shape
        )
        return (
            f"BatchNorm({features}, axis={self.axis!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats})"
        )

    def train(self, mode: bool = True) -> BatchNorm:
        """Switch to training mode (batch statistics, running-statistics updates)."""
        if not isinstance(mode, bool):
            msg = f"`mode` must be a bool, got {mode!r}"
            raise TypeError(msg)
        self.training = mode
        return self

    def eval(self) -> BatchNorm:
        """Switch to inference mode: normalize with the running statistics,
        update nothing."""
        return self.train(False)

    def __call__(self, x: Array) -> Array:
        """Normalize `x` in the current mode; in training mode, also update the
        running statistics and ``num_batches_tracked``."""
        xp = namespace_of({"x": x})
        check_x(x, xp)
        kept = normalize_axis(self.axis, x.ndim)
        channel_shape = tuple(x.shape[a] for a in kept)
        if channel_shape != self.channel_shape:
            msg = (
                f"`x` of shape {tuple(x.shape)} has {channel_shape} features along "
                f"axis {self.axis!r}, but the layer was built for {self.channel_shape}"
            )
            raise ValueError(msg)
        use_batch_stats = self.training or not self.track_running_stats
        y, ctx = batch_norm_forward(
            x,
            self.weight,
            self.bias,
            axis=self.axis,
            eps=self.eps,
            training=use_batch_stats,
            running_mean=None if use_batch_stats else self.running_mean,
            running_var=None if use_batch_stats else self.running_var,
        )
        if self.training and self.track_running_stats:
            count = self.num_batches_tracked + 1
            new_mean, new_var = update_running_stats(
                self.running_mean,
                self.running_var,
                ctx,
                momentum=self.momentum,
                num_batches_tracked=count,
            )
            self.running_mean, self.running_var = new_mean, new_var
            self.num_batches_tracked = count
        self._ctx = ctx
        return y

    def backward(self, dy: Array) -> Array:
        """Gradient with respect to the last call's input; stores ``grad_weight``
        and ``grad_bias`` (when `affine`).

        Raises
        ------
        RuntimeError
            If the layer has not been called yet.
        """
        if self._ctx is None:
            msg = "`backward` needs a forward pass first: call the layer on an input"
            raise RuntimeError(msg)
        dx, dweight, dbias = batch_norm_backward(dy, self._ctx)
        if self.affine:
            self.grad_weight, self.grad_bias = dweight, dbias
        return dx

    def _state_keys(self) -> list[str]:
        keys = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, Array]:
        """The parameters and statistics under PyTorch's key names.

        ``num_batches_tracked`` is a 0-d int64 array, as in PyTorch.
        """
        state = {key: getattr(self, key) for key in self._state_keys()}
        if "num_batches_tracked" in state:
            like = self.running_mean
            state["num_batches_tracked"] = self._xp.asarray(
                self.num_batches_tracked, dtype=self._xp.int64, device=_device_of(like)
            )
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], *, strict: bool = True
    ) -> None:
        """Load parameters and statistics saved by :meth:`state_dict` or by a
        PyTorch ``BatchNorm*d`` (CPU tensors or NumPy arrays are converted).

        Values are copied into the layer's library, device and dtypes. Nothing
        is changed if any entry is rejected.

        Raises
        ------
        ValueError
            Missing or unexpected keys (with ``strict=True``), or an entry of
            the wrong shape.
        """
        if not isinstance(state_dict, Mapping):
            msg = f"`state_dict` must be a mapping, got {type(state_dict).__name__}"
            raise TypeError(msg)
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            msg = f"`state_dict` has missing keys {missing} and unexpected keys {unexpected}"
            raise ValueError(msg)
        new: dict[str, Any] = {}
        for key in expected:
            if key not in state_dict:
                continue
            value = state_dict[key]
            if key == "num_batches_tracked":
                count = int(value)
                if count < 0:
                    msg = (
                        f"`state_dict['num_batches_tracked']` must be >= 0, got {count}"
                    )
                    raise ValueError(msg)
                new[key] = count
                continue
            array = _convert(value, getattr(self, key), self._xp)
            if tuple(array.shape) != self.channel_shape:
                msg = (
                    f"`state_dict[{key!r}]` must have shape {self.channel_shape}, got "
                    f"{tuple(array.shape)}"
                )
                raise ValueError(msg)
            new[key] = array
        for key, value in new.items():
            setattr(self, key, value)


def _device_of(a: Array | None) -> Device:
    return None if a is None else device(a)


def _convert(value: Any, like: Array, xp: Namespace) -> Array:
    """A copy of `value` in the library, device and dtype of `like`.

    Arrays of another library (PyTorch CPU tensors, say) pass through NumPy.
    """
    if is_array_api_obj(value) and library_name(value) != library_name(like):
        import numpy

        value = numpy.asarray(value)
    return xp.asarray(value, dtype=like.dtype, device=device(like), copy=True)
