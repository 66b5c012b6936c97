"""The stateful layer: parameters, running statistics, train/eval mode, state dicts."""

from __future__ import annotations

import copy
import importlib
import operator
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ._compat import (
    Array,
    Device,
    Namespace,
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_cupy_namespace,
    is_numpy_namespace,
    is_torch_array,
)
from ._core import (
    BatchNormContext,
    _checked_backward,
    _checked_forward,
    update_running_stats,
)
from ._distributed import check_sync
from ._moments import pooled_moments
from ._validation import (
    check_axis,
    check_bool,
    check_eps,
    check_integer,
    check_momentum,
    check_out,
    check_x,
    library_name,
    namespace_of,
    normalize_axis,
    writes_out,
)
from ._variants import Renorm
from .sync import Synchronizer

__all__ = ["BatchNorm"]

# The state-dict key of each attribute, per framework. Keras and Flax keep no
# count of batches.
_CONVENTIONS = {
    "torch": {
        "weight": "weight",
        "bias": "bias",
        "running_mean": "running_mean",
        "running_var": "running_var",
        "num_batches_tracked": "num_batches_tracked",
    },
    "keras": {
        "weight": "gamma",
        "bias": "beta",
        "running_mean": "moving_mean",
        "running_var": "moving_variance",
    },
    "flax": {
        "weight": "scale",
        "bias": "bias",
        "running_mean": "mean",
        "running_var": "var",
    },
}


def _check_convention(convention: object) -> str:
    choices = ", ".join(repr(c) for c in _CONVENTIONS)
    if not isinstance(convention, str):
        msg = (
            f"`convention` must be a string, one of {choices}; got "
            f"{type(convention).__name__}: {convention!r:.80}"
        )
        raise TypeError(msg)
    if convention not in _CONVENTIONS:
        msg = f"`convention` must be one of {choices}, got {convention!r:.80}"
        raise ValueError(msg)
    return convention


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
    running statistics and leaves every attribute unchanged. A frozen layer
    (:meth:`freeze`) normalizes with its running statistics and never updates
    them, in both modes: the switch for fine-tuning γ and β (or the layers
    around it) with fixed statistics, which :meth:`train` does not undo.

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
    unbiased : bool, default True
        Whether the running variance averages the unbiased batch variances
        (PyTorch, Chainer) or, with False, the biased ones (Keras 3, Flax,
        Haiku, Equinox); see :func:`update_running_stats`. Also the variance
        that :meth:`recompute_running_stats` stores.
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
    reuse_buffers : bool, default False
        NumPy and CuPy layers only: keep the array each call returns and
        write the next call's output into it (the `out` of
        :func:`batch_norm_forward`), and the same for :meth:`backward`, which
        spares large arrays the cost of fresh memory (see :doc:`/behaviour`).
        The values are bitwise those without it. **The output of a call is
        overwritten by the next call** (and the gradient by the next
        :meth:`backward`): copy it to keep it. A call whose input has
        another shape or dtype than the kept array, or shares memory with it
        (the layer's own previous output passed back in, say), gets a new
        one, which is then kept; so does a call after the caller made the
        kept array read-only. The layer checks the kept array as `out` is
        checked, once: on small arrays a call costs a few µs more than
        without it (see :doc:`/benchmarks`).

    Attributes
    ----------
    weight, bias : array or None
    running_mean, running_var : array or None
    num_batches_tracked : int
    training : bool
    frozen : bool
        Read-only; see :meth:`freeze`.
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
        floating dtype of `xp`; a `sync` that is not a synchronizer;
        `reuse_buffers` for a layer of another library than NumPy and CuPy.
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
    set ``layer.sync`` again after unpickling. Copies share `sync`. Copies and
    pickles keep `unbiased`, `reuse_buffers` and whether the layer is
    :attr:`frozen`; state dicts hold arrays only, none of them. With
    `reuse_buffers`, neither copies nor pickles carry the kept output arrays:
    a copy makes its own on its first calls, so that two layers never write
    into one array.

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
        unbiased: bool = True,
        xp: Any = None,
        device: Device = None,
        dtype: Any = None,
        sync: Synchronizer | None = None,
        renorm: Renorm | None = None,
        ghost_batch_size: int | None = None,
        batch_axis: int = 0,
        reuse_buffers: bool = False,
    ) -> None:
        self.channel_shape = _channel_shape(num_features, axis)
        self.axis = axis
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(
            track_running_stats, "track_running_stats"
        )
        self.unbiased = check_bool(unbiased, "unbiased")
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
        self.reuse_buffers = check_bool(reuse_buffers, "reuse_buffers")
        if self.reuse_buffers and not (
            is_numpy_namespace(self._xp) or is_cupy_namespace(self._xp)
        ):
            library = getattr(xp, "__name__", repr(xp))
            msg = (
                "`reuse_buffers` needs a NumPy or CuPy layer (their arrays can be "
                f"written into); got xp={library}: pass reuse_buffers=False"
            )
            raise TypeError(msg)
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
        self._frozen = False
        self.grad_weight: Array | None = None
        self.grad_bias: Array | None = None
        self._ctx: BatchNormContext | None = None
        # With `reuse_buffers`, the outputs of the last call and backward.
        self._y_buffer: Array | None = None
        self._dx_buffer: Array | None = None

    def __repr__(self) -> str:
        features = (
            self.channel_shape[0]
            if len(self.channel_shape) == 1
            else self.channel_shape
        )
        return (
            f"BatchNorm({features}, axis={self.axis!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, "
            f"unbiased={self.unbiased}"
            + ("" if self.sync is None else f", sync={self.sync!r}")
            + ("" if self.renorm is None else f", renorm={self.renorm!r}")
            + (
                ""
                if self.ghost_batch_size is None
                else f", ghost_batch_size={self.ghost_batch_size}, "
                f"batch_axis={self.batch_axis!r}"
            )
            + (", reuse_buffers=True" if self.reuse_buffers else "")
            + ")"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_xp"] = self._xp.__name__  # modules cannot be pickled
        state["_ctx"] = None  # it holds the last input: no place in a checkpoint
        state["sync"] = None  # a process group or communicator: of this run only
        state.update(_UNSHARED)  # the last outputs: the caller's to keep, or not
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Layers pickled before the variant options existed have none of them.
        defaults = {"renorm": None, "ghost_batch_size": None, "batch_axis": 0}
        self.__dict__.update(
            {
                # Pickles of layers that had no `unbiased` or `frozen` yet.
                "unbiased": True,
                "_frozen": False,
                "sync": None,
                "reuse_buffers": False,
                **_UNSHARED,
                **defaults,
                **state,
                "_xp": importlib.import_module(state["_xp"]),
            }
        )

    def __copy__(self) -> BatchNorm:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.__dict__.update(_UNSHARED)  # two layers never write into one array
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchNorm:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            # A module; a read-only record; a process group or communicator.
            shared = name in ("_xp", "_ctx", "sync")
            setattr(clone, name, value if shared else copy.deepcopy(value, memo))
        clone.__dict__.update(_UNSHARED)
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

    @property
    def frozen(self) -> bool:
        """Whether the running statistics are frozen (:meth:`freeze`)."""
        return self._frozen

    def freeze(self) -> BatchNorm:
        """Freeze the running statistics: normalize with them and never update
        them, in training mode too, until :meth:`unfreeze`.

        :meth:`train` and :meth:`eval` do not change it: a frozen layer in
        training mode is the inference forward pass, and :meth:`backward` the
        inference backward pass (the statistics are constants), while γ and β
        still get their gradients. Without `sync` communication.

        ==============================  ===========  ==========  ==============
        state                           normalizes   updates     backward
                                        with         running     through μ, σ²
                                                     statistics
        ==============================  ===========  ==========  ==============
        ``train()``                     batch        yes         yes
        ``eval()``                      running      no          no
        ``freeze()``, either mode       running      no          no
        ==============================  ===========  ==========  ==============

        Raises
        ------
        ValueError
            A layer built with ``track_running_stats=False``: it has no
            statistics to normalize with.

        Examples
        --------
        >>> import numpy as np
        >>> import bnarray as bn
        >>> layer = bn.BatchNorm(2).freeze()
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> y = layer.train()(x)  # running mean 0, variance 1: x / sqrt(1 + eps)
        >>> bool(np.allclose(y, x / np.sqrt(1.0 + 1e-5)))
        True
        >>> layer.frozen, layer.training, layer.num_batches_tracked
        (True, True, 0)
        """
        if not self.track_running_stats:
            msg = (
                "`freeze` needs running statistics to normalize with; the layer "
                "was built with track_running_stats=False"
            )
            raise ValueError(msg)
        self._frozen = True
        return self

    def unfreeze(self) -> BatchNorm:
        """Undo :meth:`freeze`: the mode (:meth:`train`, :meth:`eval`) decides
        again."""
        self._frozen = False
        return self

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalize `x` in the current mode; in training mode (and not
        :attr:`frozen`), also update the running statistics and
        ``num_batches_tracked``.

        `mask` (bool, the shape of `x` without the channel axes) restricts
        the statistics, and so the running statistics, to the positions where
        it is True; see :func:`batch_norm_forward`.
        """
        updating = self.training and not self._frozen
        use_batch_stats = updating or not self.track_running_stats
        # Renorm compares the batch's statistics with the running ones.
        pass_running = not use_batch_stats or (updating and self.renorm is not None)
        # Inference never communicates: processes may evaluate different numbers
        # of batches.
        sync = self.sync if updating else None
        if sync is not None:
            self._check_input(x)  # before the collective, not after it
        running_mean = self.running_mean if pass_running else None
        running_var = self.running_var if pass_running else None
        out = None
        if self.reuse_buffers:
            inputs = {
                "x": x,
                "weight": self.weight,
                "bias": self.bias,
                "running_mean": running_mean,
                "running_var": running_var,
                "mask": mask,
            }
            out = _buffer(self._y_buffer, x, inputs)
        try:
            # `out` is None or a checked array of `_buffer`.
            y, ctx = _checked_forward(
                x,
                self.weight,
                self.bias,
                self.axis,
                self.eps,
                use_batch_stats,
                running_mean,
                running_var,
                sync,
                self.renorm,
                self.ghost_batch_size,
                self.batch_axis,
                mask,
                out,
                False,
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
        if updating and self.track_running_stats:
            count = self.num_batches_tracked + 1
            new_mean, new_var = update_running_stats(
                self.running_mean,
                self.running_var,
                ctx,
                momentum=self.momentum,
                num_batches_tracked=count,
                unbiased=self.unbiased,
            )
            # Statistics, not parameters: like PyTorch's buffers they carry no
            # autograd graph from step to step (it would grow without end).
            self.running_mean, self.running_var = (
                _detached(new_mean),
                _detached(new_var),
            )
            self.num_batches_tracked = count
        self._ctx = ctx
        if out is not None:
            self._y_buffer = out
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
        out = None
        if self.reuse_buffers:
            ctx = self._ctx
            inputs = {
                "dy": dy,
                "ctx.x": ctx.x,
                "ctx.weight": ctx.weight,
                "ctx.mean": ctx.mean,
                "ctx.invstd": ctx.invstd,
            }
            out = _buffer(self._dx_buffer, dy, inputs)
        dx, dweight, dbias = _checked_backward(dy, self._ctx, out, False)
        if out is not None:
            self._dx_buffer = out
        if self.affine:
            self.grad_weight, self.grad_bias = dweight, dbias
        return dx

    def _state_keys(self, convention: str) -> dict[str, str]:
        """The layer's attributes in its state dicts, and their keys."""
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        keys = _CONVENTIONS[convention]
        return {name: keys[name] for name in names if name in keys}

    def state_dict(
        self, *, convention: str = "torch", xp: Any = None
    ) -> dict[str, Array]:
        """The parameters and statistics under PyTorch's, Keras's or Flax's key names.

        ============  ===========  ===========  ================  ===================  ======================
        `convention`  γ            β            running mean      running variance     count
        ============  ===========  ===========  ================  ===================  ======================
        ``"torch"``   ``weight``   ``bias``     ``running_mean``  ``running_var``      ``num_batches_tracked``
        ``"keras"``   ``gamma``    ``beta``     ``moving_mean``   ``moving_variance``  (none)
        ``"flax"``    ``scale``    ``bias``     ``mean``          ``var``              (none)
        ============  ===========  ===========  ================  ===================  ======================

        With ``"torch"``, ``num_batches_tracked`` is a 0-d int64 array, as in
        PyTorch. Flax keeps ``scale`` and ``bias`` in its ``params``
        collection and ``mean`` and ``var`` in ``batch_stats``; the flat dict
        matches the attributes of ``flax.nnx.BatchNorm``. The values are the
        same in every convention: only the names change (see
        :doc:`/conventions` for what each framework's running variance holds).

        Parameters
        ----------
        convention : {"torch", "keras", "flax"}, default "torch"
            Whose key names to use.
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
            An `xp` that is not an array library; a `convention` that is not a
            string.
        ValueError
            An unknown `convention`.

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
        >>> list(layer.state_dict(convention="keras"))
        ['gamma', 'beta', 'moving_mean', 'moving_variance']
        """
        keys = self._state_keys(_check_convention(convention))
        target = self._xp if xp is None else _namespace(xp)
        state = {}
        for name, key in keys.items():
            if name == "num_batches_tracked":
                like = self.running_mean if target is self._xp else None
                state[key] = target.asarray(
                    self.num_batches_tracked,
                    dtype=target.int64,
                    device=_device_of(like),
                )
            elif target is self._xp:
                state[key] = getattr(self, name)
            else:
                state[key] = target.asarray(_to_numpy(getattr(self, name)), copy=True)
        return state

    def load_state_dict(
        self,
        state_dict: Mapping[str, Any],
        *,
        strict: bool = True,
        convention: str = "torch",
    ) -> None:
        """Load parameters and statistics saved by :meth:`state_dict`, by a
        PyTorch ``BatchNorm*d``, or by Keras or Flax (with `convention`).

        Values are copied into the layer's library, device and dtypes. Values of
        another library pass through NumPy: NumPy arrays, PyTorch tensors
        (also those that require grad, as in
        ``dict(module.named_parameters())``), JAX arrays, sequences of numbers.
        ``num_batches_tracked`` may be a Python or NumPy integer or a 0-d
        integer array. Nothing is changed if any entry is rejected.

        The ``"keras"`` and ``"flax"`` conventions have no count of batches:
        their loads leave ``num_batches_tracked`` as it is (as PyTorch does with
        a state dict without one). It matters only with ``momentum=None``. The
        running variance is loaded as it is: for continued training to match
        the source framework, build the layer with its ``unbiased`` (False for
        Keras and Flax), ``momentum`` and ``eps`` (:doc:`/conventions`).

        Parameters
        ----------
        state_dict : mapping
            Keys as in :meth:`state_dict` for `convention`. For Flax, merge the
            collections: ``{**variables["params"], **variables["batch_stats"]}``
            (linen) or ``{"scale": bn.scale.value, ...}`` (nnx).
        strict : bool, default True
            Refuse missing and unexpected keys.
        convention : {"torch", "keras", "flax"}, default "torch"
            Whose key names `state_dict` uses.

        Raises
        ------
        TypeError
            An entry that is not an array of real numbers (complex, bool,
            strings, None) or that cannot be converted; a
            ``num_batches_tracked`` that is not an integer (floats such as
            ``2.7`` or ``2.0`` included); a `convention` that is not a string.
        ValueError
            Missing or unexpected keys (with ``strict=True``; the message names
            the convention whose keys the dict has, if another), an entry of the
            wrong shape, a negative ``num_batches_tracked``, an unknown
            `convention`.

        Examples
        --------
        >>> import numpy as np
        >>> import bnarray as bn
        >>> layer = bn.BatchNorm(2, momentum=0.01, eps=1e-3, unbiased=False)
        >>> keras_weights = {"gamma": np.ones(2), "beta": np.zeros(2),
        ...                  "moving_mean": np.array([0.5, -1.0]),
        ...                  "moving_variance": np.array([2.0, 3.0])}
        >>> layer.load_state_dict(keras_weights, convention="keras")
        >>> layer.running_var
        array([2., 3.])
        """
        convention = _check_convention(convention)
        if not isinstance(state_dict, Mapping):
            msg = f"`state_dict` must be a mapping, got {type(state_dict).__name__}"
            raise TypeError(msg)
        keys = self._state_keys(convention)
        missing = [k for k in keys.values() if k not in state_dict]
        unexpected = [k for k in state_dict if k not in keys.values()]
        if strict and (missing or unexpected):
            msg = (
                f"`state_dict` has missing keys {missing} and unexpected keys "
                f"{unexpected} for convention={convention!r}"
            )
            others = [
                c
                for c in _CONVENTIONS
                if c != convention
                and set(self._state_keys(c).values()) >= set(state_dict)
            ]
            if others:
                msg += f"; its keys are those of convention={others[0]!r}"
            raise ValueError(msg)
        new: dict[str, Any] = {}
        for name, key in keys.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if name == "num_batches_tracked":
                count = check_integer(value, f"state_dict[{key!r}]")
                if count < 0:
                    msg = f"`state_dict[{key!r}]` must be >= 0, got {count}"
                    raise ValueError(msg)
                new[name] = count
                continue
            array = _convert(value, key, getattr(self, name), self._xp)
            if tuple(array.shape) != self.channel_shape:
                msg = (
                    f"`state_dict[{key!r}]` must have shape {self.channel_shape}, got "
                    f"{tuple(array.shape)}"
                )
                raise ValueError(msg)
            new[name] = array
        for name, value in new.items():
            setattr(self, name, value)

    def recompute_running_stats(self, batches: Iterable[Array], /) -> None:
        r"""Set the running statistics to those of all values of all `batches`.

        After weight averaging or fine-tuning, the running statistics belong to
        weights the network no longer has. Pass the batches of the layer's
        *input* under the new weights (one pass over training data); the
        running mean and variance become the exact mean and variance of all
        their values, every value counting once (:func:`population_stats`;
        PyTorch's ``swa_utils.update_bn`` instead weights every batch
        equally). The variance is unbiased, or biased with ``unbiased=False``.
        ``num_batches_tracked`` becomes the number of batches (as after
        ``update_bn``), so that ``momentum=None`` would go on averaging.

        Neither the mode, :attr:`frozen`, nor what :meth:`backward` needs
        change. `batches` may be a generator: only :math:`1 + 2C` numbers per
        batch are kept. With Dask the new statistics are lazy, computed when
        used. Without `sync`: this process's batches only. Nothing is changed
        if a batch is rejected.

        Parameters
        ----------
        batches : iterable of array
            Arrays of the layer's library and device, with the layer's
            channel sizes along `axis` (other axes may differ).

        Raises
        ------
        TypeError
            `batches` not an iterable of arrays; a batch of another library or
            not floating.
        ValueError
            A layer without running statistics; no batches; fewer than 2 values
            per channel in all; a batch on another device or with other
            channel sizes.

        Examples
        --------
        >>> import numpy as np
        >>> import bnarray as bn
        >>> rng = np.random.default_rng(0)
        >>> batches = [rng.normal(2.0, 3.0, size=(n, 4)) for n in (16, 16, 5)]
        >>> layer = bn.BatchNorm(4)
        >>> layer.recompute_running_stats(batches)
        >>> everything = np.concatenate(batches)
        >>> bool(np.allclose(layer.running_var, everything.var(axis=0, ddof=1)))
        True
        >>> layer.num_batches_tracked
        3
        """
        if not self.track_running_stats:
            msg = (
                "`recompute_running_stats` needs running statistics; the layer was "
                "built with track_running_stats=False"
            )
            raise ValueError(msg)
        pooled = pooled_moments(
            batches,
            axis=self.axis,
            anchor=("running_mean", self.running_mean),
            channel_shape=self.channel_shape,
        )
        xp, n = pooled.xp, pooled.count
        var = pooled.var * (n / (n - 1)) if self.unbiased else pooled.var
        mean = xp.astype(pooled.mean, self.running_mean.dtype)  # type: ignore[union-attr]
        var = xp.astype(var, self.running_var.dtype)  # type: ignore[union-attr]
        self.running_mean, self.running_var = _detached(mean), _detached(var)
        self.num_batches_tracked = pooled.batches


_UNSHARED = {"_y_buffer": None, "_dx_buffer": None}
"""The attributes that copies and pickles of a layer do not carry."""


def _buffer(
    kept: Array | None, like: Array, inputs: dict[str, Array | None]
) -> Array | None:
    """The array for a result of `like`'s shape and dtype: `kept` where it
    still passes :func:`bnarray._validation.check_out` (the caller may have
    reshaped it in place, made it read-only or passed it back as an input),
    else a new one; None where `like` is not a NumPy or CuPy array (the call
    then says what is wrong with it). The core takes the array without
    checking it again."""
    if not (writes_out(like) and hasattr(like, "shape")):
        return None
    if kept is not None:
        try:
            check_out(kept, like, inputs)
        except (TypeError, ValueError):
            pass  # a new array takes the results
        else:
            return kept
    xp = array_namespace(like)
    return xp.empty(like.shape, dtype=like.dtype, device=device(like))


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
