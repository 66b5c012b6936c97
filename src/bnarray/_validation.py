"""Checks of arguments: metadata only (types, shapes, dtypes, devices), never values."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping

from ._compat import Array, Namespace, array_namespace, device, is_array_api_obj

__all__ = [
    "check_channel_array",
    "check_eps",
    "check_momentum",
    "check_num_batches_tracked",
    "check_x",
    "library_name",
    "namespace_of",
    "normalize_axis",
    "reduce_count",
]


def library_name(a: object) -> str:
    """The top-level module of an array's type, e.g. ``"numpy"`` or ``"torch"``."""
    return type(a).__module__.split(".", 1)[0]


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
    """`x` must have a real floating dtype and at least one dimension."""
    if not xp.isdtype(x.dtype, "real floating"):
        msg = f"`{name}` must have a real floating dtype, got {x.dtype}"
        raise TypeError(msg)
    if x.ndim < 1:
        msg = f"`{name}` must have at least one dimension, got shape {tuple(x.shape)}"
        raise ValueError(msg)


def normalize_axis(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The kept (channel) axes as sorted non-negative ints."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    normalized = []
    for a in axes:
        if isinstance(a, bool):
            msg = f"`axis` must be an int or a tuple of ints, got {axis!r}"
            raise TypeError(msg)
        try:
            a = operator.index(a)
        except TypeError:
            msg = f"`axis` must be an int or a tuple of ints, got {axis!r}"
            raise TypeError(msg) from None
        if not -ndim <= a < ndim:
            msg = f"`axis` {axis!r} is out of range for an array with {ndim} dimensions"
            raise ValueError(msg)
        normalized.append(a % ndim)
    if len(set(normalized)) != len(normalized):
        msg = f"`axis` {axis!r} names the same axis twice (for {ndim} dimensions)"
        raise ValueError(msg)
    return tuple(sorted(normalized))


def reduce_count(
    shape: tuple[int | float | None, ...], reduce_axes: tuple[int, ...]
) -> int | None:
    """Elements per channel, or None when a lazy backend does not know the shape yet
    (None in the array API standard, NaN in Dask)."""
    count = 1
    for a in reduce_axes:
        size = shape[a]
        if size is None or math.isnan(size):
            return None
        count *= int(size)
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
    if isinstance(num_batches_tracked, bool):
        msg = f"`num_batches_tracked` must be an int, got {num_batches_tracked!r}"
        raise TypeError(msg)
    try:
        count = operator.index(num_batches_tracked)  # type: ignore[arg-type]
    except TypeError:
        msg = (
            f"`num_batches_tracked` must be an int, got "
            f"{type(num_batches_tracked).__name__}: {num_batches_tracked!r:.80}"
        )
        raise TypeError(msg) from None
    if count < (1 if required else 0):
        msg = (
            f"`num_batches_tracked` must count this batch too (>= 1), got {count}"
            if required
            else f"`num_batches_tracked` must be >= 0, got {count}"
        )
        raise ValueError(msg)
    return count
