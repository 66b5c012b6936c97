"""The stateful layer: parameters, running statistics, train/eval mode, state dicts."""

from __future__ import annotations

import copy
import importlib
import operator
import warnings
from collections.abc import Mapping
from typing import Any

from ._compat import (
    Array,
    Device,
    Namespace,
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_torch_array,
)
from ._core import (
    BatchNormContext,
    batch_norm_backward,
    batch_norm_forward,
    update_running_stats,
)
from ._distributed import check_sync
from ._validation import (
    check_axis,
    check_bool,
    check_eps,
    check_integer,
    check_momentum,
    check_x,
    library_name,
    namespace_of,
    normalize_axis,
)
from ._variants import Renorm
from .sync import Synchronizer

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
    if len(sizes) != len(check_axis(axis)):
        msg = (
            f"`num_features` {num_features!r} must give one size per channel axis "
            f"(`axis` is {axis!r})"
        )
        raise ValueError(msg)
    return tuple(sizes)


def _namespace(xp: object) -> Namespace:
    """The array API namespace of an array library given as a module (``numpy``,
    ``torch``, ``jax.numpy``, ...)."""
    try:
        return array_namespace(xp.zeros(0))  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        msg = f"`xp` must be an array library such as numpy, got {xp!r:.80}"
        raise TypeError(msg) from None


def _is_real_floating(dtype: object, xp: Namespace) -> bool:
    # JAX and Dask also take dtype names, the other libraries do not: refuse them all.
    if isinstance(dtype, str):
        return False
    try:
        # NumPy compares an array_api_strict dtype with its own, which warns.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(xp.isdtype(dtype, "real floating"))
    except (AttributeError, TypeError):  # a dtype of another library
        return False


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
        Whether to learn γ (``weight``, ones) and β (``bias``, zeros). A
        Python or NumPy bool, as is `track_running_stats`.
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
        Real floating dtype of the parameters and statistics, a dtype object
        of the library `xp` (``torch.float64``, not ``numpy.float64`` or
        ``"float64"``). Default: the library's default floating dtype (float64
        for NumPy, float32 for PyTorch). Inputs of another floating dtype are
        accepted: the computation runs in the input's dtype (float32 for
        16-bit inputs).
    sync : Synchronizer, optional
        In training mode, normalize with the statistics of the whole batch
        over the processes of this synchronizer (see
        :func:`batch_norm_forward` and :doc:`/distributed`); every process
        then holds the same running statistics. Inference mode never
        communicates. Default None: this process's batch.
    renorm : Renorm, optional
        Batch renormalization in training mode, against the layer's running
        statistics (which must be tracked); see :class:`Renorm`. The
        attribute may be replaced between calls (the paper raises `rmax`
        and `dmax` during training).
    ghost_batch_size : int, optional
        Ghost batch norm in training mode: chunks of this size along
        `batch_axis` each use their own statistics; the running statistics
        are updated once per call with the whole batch's.
    batch_axis : int, default 0
        The axis `ghost_batch_size` splits.

    Attributes
    ----------
    weight, bias : array or None
    running_mean, running_var : array or None
    num_batches_tracked : int
    training : bool
    grad_weight, grad_bias : array or None
        Set by :meth:`backward` when `affine`; with `sync`, this process's
        share of the gradient (sum them over the processes, as
        data-parallel training does with every gradient).
    sync : Synchronizer or None

    Raises
    ------
    TypeError
        A `num_features`, `axis`, `eps`, `momentum` or flag of the wrong type;
        an `xp` that is not an array library; a `dtype` that is not a real
        floating dtype of `xp`; a `sync` that is not a synchronizer.
    ValueError
        A `num_features` that is not positive or does not give one size per
        channel axis; `eps` or `momentum` out of range; `renorm` without
        `track_running_stats`, or with `ghost_batch_size`; a
        `ghost_batch_size` below 1.

    Notes
    -----
    ``copy.deepcopy(layer)`` and ``copy.copy(layer)`` keep everything, also
    what the last call saved for :meth:`backward` (the copy can call it). A
    deep copy shares that saved forward pass with the original rather than
    copying it: bnarray never writes it, and it holds the last input, whose
    autograd graph PyTorch would refuse to copy. ``pickle`` keeps the parameters,
    statistics, gradients, mode, ``num_batches_tracked`` and the library (by
    module name: the unpickling process must be able to import it), but not
    the saved forward pass: it holds the last input, which a checkpoint
    should not carry. An unpickled layer needs a call before :meth:`backward`;
    its arrays are where the library unpickles them (JAX: on its default
    device). Nor does it keep `sync`, which belongs to the running processes:
    set ``layer.sync`` again after unpickling. Copies share `sync`.

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
    >>> import pickle
    >>> restored = pickle.loads(pickle.dumps(layer))
    >>> restored.num_batches_tracked, restored.training
    (1, False)
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
        sync: Synchronizer | None = None,
        renorm: Renorm | None = None,
        ghost_batch_size: int | None = None,
        batch_axis: int = 0,
    ) -> None:
        self.channel_shape = _channel_shape(num_features, axis)
        self.axis = axis
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(
            track_running_stats, "track_running_stats"
        )
        self.sync = check_sync(sync)
        if renorm is not None and not isinstance(renorm, Renorm):
            msg = f"`renorm` must be a bnarray.Renorm or None, got {renorm!r:.80}"
            raise TypeError(msg)
        if renorm is not None and not self.track_running_stats:
            msg = "`renorm` needs running statistics: pass track_running_stats=True"
            raise ValueError(msg)
        if renorm is not None and ghost_batch_size is not None:
            msg = "`renorm` and `ghost_batch_size` do not combine; pass one of them"
            raise ValueError(msg)
        if ghost_batch_size is not None:
            ghost_batch_size = check_integer(ghost_batch_size, "ghost_batch_size")
            if ghost_batch_size < 1:
                msg = f"`ghost_batch_size` must be a positive int, got {ghost_batch_size!r}"
                raise ValueError(msg)
        self.renorm = renorm
        self.ghost_batch_size = ghost_batch_size
        self.batch_axis = batch_axis
        if xp is None:
            import numpy

            xp = numpy
        self._xp: Namespace = _namespace(xp)
        if dtype is None:
            dtype = self._xp.zeros(0, device=device).dtype
        elif not _is_real_floating(dtype, self._xp):
            library = getattr(xp, "__name__", "xp")
            msg = (
                f"`dtype` must be a real floating dtype of {library} (such as "
                f"{library}.float32), got {dtype!r}"
            )
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
            f"track_running_stats={self.track_running_stats}"
            + ("" if self.sync is None else f", sync={self.sync!r}")
            + ("" if self.renorm is None else f", renorm={self.renorm!r}")
            + (
                ""
                if self.ghost_batch_size is None
                else f", ghost_batch_size={self.ghost_batch_size}, "
                f"batch_axis={self.batch_axis!r}"
            )
            + ")"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_xp"] = self._xp.__name__  # modules cannot be pickled
        state["_ctx"] = None  # it holds the last input: no place in a checkpoint
        state["sync"] = None  # a process group or communicator: of this run only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Layers pickled before the variant options existed have none of them.
        defaults = {"renorm": None, "ghost_batch_size": None, "batch_axis": 0}
        self.__dict__.update(
            {
                "sync": None,
                **defaults,
                **state,
                "_xp": importlib.import_module(state["_xp"]),
            }
        )

    def __copy__(self) -> BatchNorm:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchNorm:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            # A module; a read-only record; a process group or communicator.
            shared = name in ("_xp", "_ctx", "sync")
            setattr(clone, name, value if shared else copy.deepcopy(value, memo))
        return clone

    def train(self, mode: bool = True) -> BatchNorm:
        """Switch to training mode (batch statistics, running-statistics updates),
        or with ``mode=False`` (a Python or NumPy bool) to inference mode."""
        self.training = check_bool(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Switch to inference mode: normalize with the running statistics,
        update nothing."""
        return self.train(False)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalize `x` in the current mode; in training mode, also update the
        running statistics and ``num_batches_tracked``.

        `mask` (bool, the shape of `x` without the channel axes) restricts
        the statistics, and so the running statistics, to the positions where
        it is True; see :func:`batch_norm_forward`.
        """
        use_batch_stats = self.training or not self.track_running_stats
        # Renorm compares the batch's statistics with the running ones.
        pass_running = not use_batch_stats or (
            self.training and self.renorm is not None
        )
        # Inference never communicates: processes may evaluate different numbers
        # of batches.
        sync = self.sync if self.training else None
        if sync is not None:
            self._check_input(x)  # before the collective, not after it
        try:
            y, ctx = batch_norm_forward(
                x,
                self.weight,
                self.bias,
                axis=self.axis,
                eps=self.eps,
                training=use_batch_stats,
                running_mean=self.running_mean if pass_running else None,
                running_var=self.running_var if pass_running else None,
                sync=sync,
                renorm=self.renorm,
                ghost_batch_size=self.ghost_batch_size,
                batch_axis=self.batch_axis,
                mask=mask,
            )
        except (TypeError, ValueError):
            # The forward also compares `x` with the layer's arrays; the layer's
            # own checks of `x` come first, so that a wrong feature count says so.
            try:
                self._check_input(x)
            except (TypeError, ValueError) as error:
                raise error from None
            raise
        if tuple(ctx.mean.shape) != self.channel_shape:  # no arrays compared it
            self._check_input(x)
        if self.training and self.track_running_stats:
            count = self.num_batches_tracked + 1
            new_mean, new_var = update_running_stats(
                self.running_mean,
                self.running_var,
                ctx,
                momentum=self.momentum,
                num_batches_tracked=count,
            )
            # Statistics, not parameters: like PyTorch's buffers they carry no
            # autograd graph from step to step (it would grow without end).
            self.running_mean, self.running_var = (
                _detached(new_mean),
                _detached(new_var),
            )
            self.num_batches_tracked = count
        self._ctx = ctx
        return y

    def _check_input(self, x: Array) -> None:
        """The layer's checks of an input, made only where the forward fails or
        gives statistics of another shape than the layer's."""
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

    def state_dict(self, *, xp: Any = None) -> dict[str, Array]:
        """The parameters and statistics under PyTorch's key names.

        ``num_batches_tracked`` is a 0-d int64 array, as in PyTorch.

        Parameters
        ----------
        xp : namespace, optional
            Array library of the returned arrays: ``xp=torch`` gives a state
            dict that ``torch.nn.BatchNorm2d.load_state_dict`` takes, whatever
            the layer's library. Arrays of another library than the layer's
            are copies (made through NumPy, from any device) in the layer's
            dtypes, on that library's default device. Default: the layer's own library; the
            arrays are then the layer's own, not copies (the layer never
            writes into them).

        Raises
        ------
        TypeError
            An `xp` that is not an array library.

        Examples
        --------
        For PyTorch, ``torch.nn.BatchNorm1d(2).load_state_dict(
        layer.state_dict(xp=torch))``; here a NumPy layer's state:

        >>> import numpy as np
        >>> import bnarray as bn
        >>> layer = bn.BatchNorm(2)
        >>> state = layer.state_dict(xp=np)
        >>> list(state)
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        >>> state["num_batches_tracked"]
        array(0)
        """
        target = self._xp if xp is None else _namespace(xp)
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                like = self.running_mean if target is self._xp else None
                state[key] = target.asarray(
                    self.num_batches_tracked,
                    dtype=target.int64,
                    device=_device_of(like),
                )
            elif target is self._xp:
                state[key] = getattr(self, key)
            else:
                state[key] = target.asarray(_to_numpy(getattr(self, key)), copy=True)
        return state

    def load_state_dict(
        self, state_dict: Mapping[str, Any], *, strict: bool = True
    ) -> None:
        """Load parameters and statistics saved by :meth:`state_dict` or by a
        PyTorch ``BatchNorm*d``.

        Values are copied into the layer's library, device and dtypes. Values of
        another library pass through NumPy: NumPy arrays, PyTorch tensors
        (also those that require grad, as in
        ``dict(module.named_parameters())``), sequences of numbers. ``num_batches_tracked`` may be a Python or NumPy
        integer or a 0-d integer array. Nothing is changed if any entry is
        rejected.

        Raises
        ------
        TypeError
            An entry that is not an array of real numbers (complex, bool,
            strings, None) or that cannot be converted; a
            ``num_batches_tracked`` that is not an integer (floats such as
            ``2.7`` or ``2.0`` included).
        ValueError
            Missing or unexpected keys (with ``strict=True``), an entry of the
            wrong shape, a negative ``num_batches_tracked``.
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
                count = check_integer(value, f"state_dict[{key!r}]")
                if count < 0:
                    msg = f"`state_dict[{key!r}]` must be >= 0, got {count}"
                    raise ValueError(msg)
                new[key] = count
                continue
            array = _convert(value, key, getattr(self, key), self._xp)
            if tuple(array.shape) != self.channel_shape:
                msg = (
                    f"`state_dict[{key!r}]` must have shape {self.channel_shape}, got "
                    f"{tuple(array.shape)}"
                )
                raise ValueError(msg)
            new[key] = array
        for key, value in new.items():
            setattr(self, key, value)


def _detached(a: Array) -> Array:
    """`a` without an autograd graph (PyTorch tensors); other arrays as they are."""
    return a.detach() if is_torch_array(a) else a


def _device_of(a: Array | None) -> Device:
    return None if a is None else device(a)


def _to_numpy(value: Any) -> Any:
    """`value` as a NumPy array, the way between two libraries."""
    import numpy

    # Tensors that require grad or live on a GPU refuse the conversion, and so
    # do CuPy arrays (no implicit copies to the host).
    if is_torch_array(value):
        value = value.detach().cpu()
    elif is_cupy_array(value):
        value = value.get()
    return numpy.asarray(value)


def _convert(value: Any, key: str, like: Array, xp: Namespace) -> Array:
    """A copy of the state-dict entry `value` in the library, device and dtype of
    `like`."""
    array: Any = value.detach() if is_torch_array(value) else value
    if not (is_array_api_obj(array) and library_name(array) == library_name(like)):
        try:
            array = _to_numpy(array)
        except (TypeError, ValueError, RuntimeError) as error:
            msg = (
                f"`state_dict[{key!r}]` could not be read as an array of numbers "
                f"({type(value).__name__}: {error}): {value!r:.80}"
            )
            raise TypeError(msg) from None
    try:
        real = array_namespace(array).isdtype(
            array.dtype, ("real floating", "integral")
        )
    except TypeError:  # NumPy's object and string dtypes
        real = False
    if not real:
        msg = (
            f"`state_dict[{key!r}]` must hold real numbers, got dtype {array.dtype}: "
            f"{value!r:.80}"
        )
        raise TypeError(msg)
    return xp.asarray(array, dtype=like.dtype, device=device(like), copy=True)
