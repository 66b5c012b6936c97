"""Checks of arguments: metadata only (types, shapes, dtypes, devices), never values."""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Mapping
from typing import Any

from ._compat import Array, Namespace, array_namespace, device, is_array_api_obj

__all__ = [
    "check_axis",
    "check_batch_count",
    "check_bool",
    "check_channel_array",
    "check_eps",
    "check_integer",
    "check_momentum",
    "check_num_batches_tracked",
    "check_out",
    "check_statistics_source",
    "check_x",
    "library_name",
    "namespace_of",
    "normalize_axis",
    "overlapping",
    "reduce_count",
    "writes_out",
]


def library_name(a: object) -> str:
    """The top-level module of an array's type, e.g. ``"numpy"`` or ``"torch"``."""
    return type(a).__module__.split(".", 1)[0]


def _library_label(a: object) -> str:
    name = library_name(a)
    return "jax" if name == "jaxlib" else name


def writes_out(a: Array) -> bool:
    """Whether results for `a` can be written into an `out` array: NumPy and
    CuPy arrays; JAX arrays are immutable, and the other libraries take the
    generic kernels, which have no `out`."""
    return library_name(a) in ("numpy", "cupy")


def overlapping(out: Array, arrays: Mapping[str, Array | None]) -> str | None:
    """The name of the first of `arrays` whose memory may overlap `out`'s, or
    None. NumPy or CuPy arrays; a comparison of bounds, cheap."""
    library = sys.modules[library_name(out)]
    for name, a in arrays.items():
        if a is not None and library.may_share_memory(out, a):
            return name
    return None


def check_out(
    out: object, like: Array, inputs: Mapping[str, Array | None], *, name: str = "x"
) -> None:
    """`out` must be able to receive a result of the shape and dtype of `like`
    (named `name`): an array of its library (NumPy or CuPy), dtype, shape and
    device, C-contiguous, writeable, and overlapping none of `inputs`.

    Strides, flags and memory are not metadata a plan holds: every call with
    an `out` runs this.
    """
    library = _library_label(like)
    if not writes_out(like):
        msg = (
            f"`out` is supported for NumPy and CuPy arrays only; `{name}` is a "
            f"{library} array: pass out=None"
        )
        raise TypeError(msg)
    array: Any = out
    if not isinstance(out, sys.modules[library].ndarray):
        msg = (
            f"`out` must be a {library} array like `{name}`, got "
            f"{type(out).__name__}: {out!r:.80}"
        )
        raise TypeError(msg)
    if array.dtype != like.dtype:
        msg = f"`out` must have the dtype of `{name}` ({like.dtype}), got {array.dtype}"
        raise TypeError(msg)
    if tuple(array.shape) != tuple(like.shape):
        msg = (
            f"`out` must have the shape of `{name}` {tuple(like.shape)}, got "
            f"{tuple(array.shape)}"
        )
        raise ValueError(msg)
    if library == "cupy" and device(array) != device(like):
        msg = (
            f"`out` is on device {device(array)!r} but `{name}` is on device "
            f"{device(like)!r}; pass an `out` on the device of `{name}`"
        )
        raise ValueError(msg)
    if not array.flags.c_contiguous:
        msg = (
            f"`out` must be C-contiguous, got an array with strides {array.strides} "
            f"(shape {tuple(array.shape)})"
        )
        raise ValueError(msg)
    if not getattr(array.flags, "writeable", True):  # CuPy's flags have none
        msg = (
            "`out` must be writeable, got a read-only array (flags.writeable is False)"
        )
        raise ValueError(msg)
    overlap = overlapping(array, inputs)
    if overlap is not None:
        msg = (
            f"`out` overlaps `{overlap}` in memory; pass an array that shares no "
            "memory with the inputs"
        )
        raise ValueError(msg)


def namespace_of(arrays: Mapping[str, Array | None]) -> Namespace:
    """The namespace of the first array, after checking that the others share its
    library and device.

    `arrays` maps parameter names to arrays; the first entry must be an array,
    later ``None`` entries are skipped.
    """
    (anchor_name, anchor), *others = arrays.items()
    if not is_array_api_obj(anchor):
        msg = f"`{anchor_name}` must be an array, got {type(anchor).__name__}: {anchor!r:.80}"
        raise TypeError(msg)
    xp = array_namespace(anchor)
    anchor_device = device(anchor)
    for name, other in others:
        if other is None:
            continue
        if not is_array_api_obj(other):
            msg = f"`{name}` must be an array or None, got {type(other).__name__}: {other!r:.80}"
            raise TypeError(msg)
        try:
            if type(other) is not type(anchor):  # one type, one library
                array_namespace(anchor, other)
        except TypeError:
            msg = (
                f"`{name}` is a {library_name(other)} array but `{anchor_name}` is a "
                f"{library_name(anchor)} array; pass arrays of one library"
            )
            raise TypeError(msg) from None
        other_device = device(other)
        # Traced JAX arrays (under jit or grad) report no device: nothing to compare.
        if None not in (other_device, anchor_device) and other_device != anchor_device:
            msg = (
                f"`{name}` is on device {other_device!r} but `{anchor_name}` is on "
                f"device {anchor_device!r}; move them to one device"
            )
            raise ValueError(msg)
    return xp


def check_x(x: Array, xp: Namespace, *, name: str = "x") -> None:
    """`x` must have a real floating dtype, at least one dimension and a known shape.

    An unknown size is NaN in Dask (after boolean indexing, say) and None in
    the array API standard.
    """
    if not xp.isdtype(x.dtype, "real floating"):
        msg = f"`{name}` must have a real floating dtype, got {x.dtype}"
        raise TypeError(msg)
    if x.ndim < 1:
        msg = f"`{name}` must have at least one dimension, got shape {tuple(x.shape)}"
        raise ValueError(msg)
    for size in x.shape:
        if size is None or math.isnan(size):
            msg = f"`{name}` must have a known shape, got {tuple(x.shape)}"
            raise ValueError(msg)


def check_axis(axis: object) -> tuple[int, ...]:
    """`axis` as a tuple of ints, not yet checked against an array's dimensions."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    indices = []
    for a in axes:
        if isinstance(a, bool) or not hasattr(type(a), "__index__"):
            msg = f"`axis` must be an int or a tuple of ints, got {axis!r}"
            raise TypeError(msg)
        indices.append(operator.index(a))
    return tuple(indices)


def normalize_axis(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The kept (channel) axes as sorted non-negative ints."""
    normalized = []
    for a in check_axis(axis):
        if not -ndim <= a < ndim:
            msg = f"`axis` {axis!r} is out of range for an array with {ndim} dimensions"
            raise ValueError(msg)
        normalized.append(a % ndim)
    if len(set(normalized)) != len(normalized):
        msg = f"`axis` {axis!r} names the same axis twice (for {ndim} dimensions)"
        raise ValueError(msg)
    return tuple(sorted(normalized))


def reduce_count(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> int:
    """Elements per channel: the product of the reduced axes' sizes (known, as
    `check_x` makes sure)."""
    count = 1
    for a in reduce_axes:  # a loop, not a generator: torch.compile traces it
        count *= int(shape[a])
    return count


def check_channel_array(
    a: Array | None, name: str, channel_shape: tuple[int, ...], xp: Namespace
) -> None:
    """A per-channel array (weight, bias, running statistic) of the kept axes' shape."""
    if a is None:
        return
    if not xp.isdtype(a.dtype, "real floating"):
        msg = f"`{name}` must have a real floating dtype, got {a.dtype}"
        raise TypeError(msg)
    if tuple(a.shape) != channel_shape:
        msg = (
            f"`{name}` must have shape {channel_shape} (the size of `x` along the "
            f"channel axes), got shape {tuple(a.shape)}"
        )
        raise ValueError(msg)


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = (
            f"`{name}` must be a real number, got {type(value).__name__}: {value!r:.80}"
        )
        raise TypeError(msg)
    return float(value)


def check_bool(value: object, name: str) -> bool:
    """A flag: a Python bool or a NumPy bool (``numpy.bool_``, as comparisons of
    NumPy scalars return), as a Python bool."""
    if isinstance(value, bool):
        return value
    # A NumPy bool exists only where NumPy is imported: no need to import it here.
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    msg = (
        f"`{name}` must be a bool (Python's or NumPy's), got "
        f"{type(value).__name__}: {value!r:.80}"
    )
    raise TypeError(msg)


def check_eps(eps: object) -> float:
    """`eps` must be a finite number >= 0."""
    value = _check_real(eps, "eps")
    if not math.isfinite(value) or value < 0:
        msg = f"`eps` must be finite and non-negative, got {eps!r}"
        raise ValueError(msg)
    return value


def check_momentum(momentum: object) -> float | None:
    """`momentum` must be None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return None
    value = _check_real(momentum, "momentum")
    if not 0.0 <= value <= 1.0:
        msg = f"`momentum` must be in [0, 1] or None, got {momentum!r}"
        raise ValueError(msg)
    return value


def check_num_batches_tracked(
    num_batches_tracked: object, *, required: bool
) -> int | None:
    """A count of batches: a non-negative int (>= 1 when it drives the average)."""
    if num_batches_tracked is None:
        if required:
            msg = (
                "`num_batches_tracked` is required when `momentum` is None (the "
                "cumulative average weights this batch by 1 / num_batches_tracked)"
            )
            raise ValueError(msg)
        return None
    count = check_integer(num_batches_tracked, "num_batches_tracked")
    if count < (1 if required else 0):
        msg = (
            f"`num_batches_tracked` must count this batch too (>= 1), got {count}"
            if required
            else f"`num_batches_tracked` must be >= 0, got {count}"
        )
        raise ValueError(msg)
    return count


def check_integer(value: object, name: str) -> int:
    """A Python int, a NumPy integer or a 0-d integer array of any library, as an
    int; bools and floats (even integral ones) are refused."""
    if type(value) is int:
        return value
    array: Any = value
    if is_array_api_obj(value):
        if not array_namespace(array).isdtype(array.dtype, "integral"):
            msg = (
                f"`{name}` must be an integer, got {type(value).__name__} of dtype "
                f"{array.dtype}: {value!r:.80}"
            )
            raise TypeError(msg)
        if array.ndim != 0:
            msg = f"`{name}` must be a single integer (0-d), got shape {tuple(array.shape)}"
            raise ValueError(msg)
    if not isinstance(value, bool):
        try:
            return operator.index(array)
        except TypeError:
            pass
    msg = f"`{name}` must be an integer, got {type(value).__name__}: {value!r:.80}"
    raise TypeError(msg)


def check_statistics_source(
    training: bool, running_mean: object, running_var: object
) -> None:
    """Running statistics are required in inference and refused in training."""
    for name, a in [("running_mean", running_mean), ("running_var", running_var)]:
        if training and a is not None:
            msg = (
                f"`{name}` is not used when training=True (the batch's statistics "
                "are); update running statistics with `update_running_stats`, or "
                "pass training=False to normalize with them"
            )
            raise ValueError(msg)
        if not training and a is None:
            msg = (
                f"`{name}` is required when training=False: inference normalizes "
                "with the running statistics"
            )
            raise ValueError(msg)


def check_batch_count(count: int, shape: tuple[int, ...], axis: object) -> None:
    """At least two values per channel to train with (`count` of them in `x` of
    `shape`, with channel axes `axis` as given)."""
    if count == 0:
        msg = (
            f"`x` of shape {shape} is empty along the reduced axes: an "
            "empty batch has no statistics to train with"
        )
        raise ValueError(msg)
    if count == 1:
        msg = (
            "Expected more than 1 value per channel when training, got `x` of "
            f"shape {shape} with axis={axis!r}"
        )
        raise ValueError(msg)
