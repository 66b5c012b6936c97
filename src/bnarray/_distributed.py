"""Statistics and gradient sums of a batch split over processes: each process's
moments, one collective, and their exact merge (see docs/distributed.rst)."""

from __future__ import annotations

from . import _math
from ._compat import Array, Namespace, is_torch_array
from ._fast import Kernels
from ._moments import merge_moments, part_moments, wide_dtype
from .sync import JaxAxis, Synchronizer

__all__ = ["check_sync", "global_grad_sums", "global_moments"]

_METHODS = ("all_gather", "all_reduce_sum")


def check_sync(sync: object) -> Synchronizer | None:
    """None, or an object with the two methods of :class:`~bnarray.sync.Synchronizer`."""
    if sync is None:
        return None
    if isinstance(sync, type):
        msg = (
            f"`sync` must be a synchronizer object, got the class {sync.__name__}; "
            f"pass an instance such as {sync.__name__}()"
        )
        raise TypeError(msg)
    missing = [name for name in _METHODS if not callable(getattr(sync, name, None))]
    if missing:
        msg = (
            "`sync` must be None or a synchronizer with methods `all_gather` and "
            "`all_reduce_sum` (bnarray.sync.TorchDistributed(group), MPI(comm), "
            f"JaxAxis(axis_name), or your own); got {type(sync).__name__} without "
            f"{' and '.join(f'`{name}`' for name in missing)}: {sync!r:.80}"
        )
        raise TypeError(msg)
    return sync  # type: ignore[return-value]


def _returned(
    result: Array, expected: tuple[int | None, ...], method: str, sync: object
) -> Array:
    """`result` of a collective, after checking its shape (a broken engine, or
    processes whose inputs have different channel shapes)."""
    shape = tuple(result.shape)
    if len(shape) != len(expected) or any(
        e is not None and s != e for s, e in zip(shape, expected, strict=True)
    ):
        msg = (
            f"`sync.{method}` of {sync!r:.80} returned shape {shape}, expected "
            f"{tuple('P' if e is None else e for e in expected)}; do all processes "
            "pass inputs with the same channel axes?"
        )
        raise RuntimeError(msg)
    return result


def _total_count(
    sync: Synchronizer, counts: Array, local_count: int, xp: Namespace
) -> int:
    if isinstance(sync, JaxAxis):
        # Every participant traces the same shapes: the total is static.
        return local_count * sync.size()
    # Read back to the host (on a GPU, one synchronization): the count decides
    # errors and the Bessel correction, which need a Python number.
    if is_torch_array(counts):
        counts = counts.detach()
    return round(float(xp.sum(counts)))


def global_moments(
    x: Array,
    reduce_axes: tuple[int, ...],
    local_count: int,
    sync: Synchronizer,
    *,
    axis: object,
    kernels: Kernels,
    xp: Namespace,
) -> tuple[Array, Array, int]:
    """Mean and biased variance over the `x` of every process (compute dtype,
    broadcast shape), and the number of values per channel they reduce.

    Each process sends its count n, mean μ and sum of squared deviations
    M = n·σ² per channel (one all_gather of ``1 + 2C`` numbers); every process
    then merges the same gathered rows in the same order (Chan's formula, see
    `merge_moments`). No invstd is inverted.
    """
    shape = tuple(1 if a in reduce_axes else n for a, n in enumerate(x.shape))
    row = part_moments(x, reduce_axes, local_count, kernels=kernels, xp=xp)
    gathered = sync.all_gather(row)
    gathered = _returned(gathered, (None, row.shape[0]), "all_gather", sync)

    total = _total_count(sync, gathered[:, 0], local_count, xp)
    if total == 0:
        msg = (
            f"`x` is empty along the reduced axes on every process (shape "
            f"{tuple(x.shape)} here): an empty global batch has no statistics to "
            "train with"
        )
        raise ValueError(msg)
    if total == 1:
        msg = (
            "Expected more than 1 value per channel when training, got 1 value per "
            f"channel over all processes of `sync` (`x` of shape {tuple(x.shape)} "
            f"here, axis={axis!r})"
        )
        raise ValueError(msg)

    mean, var = merge_moments(gathered, total, xp=xp)
    dtype = _math.compute_dtype(x.dtype, xp)

    def stat(a: Array) -> Array:
        return xp.reshape(xp.astype(a, dtype, copy=False), shape)

    return stat(mean), stat(var), total


def global_grad_sums(
    sum_dy: Array, sum_dy_xc: Array, sync: Synchronizer, *, xp: Namespace
) -> tuple[Array, Array]:
    """``Σ dy`` and ``Σ dy·(x − μ)`` over every process, from this process's
    (one all_reduce_sum of ``2C`` numbers), in their shape and dtype."""
    wide = wide_dtype(xp)
    shape = tuple(sum_dy.shape)
    channels = 1
    for n in shape:
        channels *= n
    packed = xp.concat(
        [
            xp.reshape(xp.astype(sum_dy, wide, copy=False), (channels,)),
            xp.reshape(xp.astype(sum_dy_xc, wide, copy=False), (channels,)),
        ]
    )
    total = sync.all_reduce_sum(packed)
    total = _returned(total, (2 * channels,), "all_reduce_sum", sync)

    def part(a: Array) -> Array:
        return xp.reshape(xp.astype(a, sum_dy.dtype, copy=False), shape)

    return part(total[:channels]), part(total[channels:])
