"""Synchronizers: the collectives that let batch normalization use the statistics
of a batch split over processes."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._compat import (
    Array,
    array_namespace,
    device,
    is_cupy_array,
    is_numpy_namespace,
    is_torch_array,
)
from ._validation import check_bool

__all__ = ["MPI", "JaxAxis", "Synchronizer", "TorchDistributed"]


def _optional(name: str) -> Any:
    """An optional library, imported when a synchronizer first needs it (typed as
    Any: none of them is a dependency)."""
    return importlib.import_module(name)


@runtime_checkable
class Synchronizer(Protocol):
    """The two collectives synchronized batch normalization needs from a
    distributed engine.

    Pass an object with these two methods as `sync` to
    :func:`~bnarray.batch_norm_forward` or :class:`~bnarray.BatchNorm`.
    bnarray calls :meth:`all_gather` once in each training forward pass and
    :meth:`all_reduce_sum` once in each training backward pass, on every
    process of the group in the same order, and nothing else. Each call
    receives a new 1-D array that bnarray made for it and does not use again
    (an engine may reduce into it in place): float64 (float32 for JAX without
    ``jax_enable_x64``), of the library and on the device of the input `x`.
    Each method must return an array of that library, dtype and device.

    :class:`TorchDistributed`, :class:`MPI` and :class:`JaxAxis` implement it;
    for another engine (Ray, Horovod, ...) write a class with the two methods,
    as :doc:`/distributed` shows.

    Examples
    --------
    A group of one process, the smallest synchronizer:

    >>> import numpy as np
    >>> import bnarray as bn
    >>> class Alone:
    ...     def all_gather(self, a):
    ...         return a[np.newaxis]
    ...     def all_reduce_sum(self, a):
    ...         return a
    >>> x = np.array([[1.0], [2.0], [6.0]])
    >>> y, ctx = bn.batch_norm_forward(x, sync=Alone())
    >>> ctx.mean, ctx.var
    (array([3.]), array([4.66666667]))
    >>> isinstance(Alone(), bn.sync.Synchronizer)
    True
    """

    def all_gather(self, a: Array, /) -> Array:
        """Every process's `a`, stacked along a new first axis in rank order:
        shape ``(P, *a.shape)`` for P processes, the same on every process."""
        ...

    def all_reduce_sum(self, a: Array, /) -> Array:
        """The element-wise sum of every process's `a`, on every process."""
        ...


# ---------------------------------------------------------------- torch.distributed


@functools.cache
def _torch_collectives() -> tuple[
    Callable[[Any, Any], Any], Callable[[Any, Any, bool], Any]
]:
    """``all_gather(tensor, group)`` and ``all_reduce_sum(tensor, group, in_place)``
    of torch.distributed, differentiable for tensors that require grad."""
    torch = _optional("torch")
    dist = _optional("torch.distributed")
    function: Any = torch.autograd.Function

    def gather(tensor: Any, group: Any) -> Any:
        out = tensor.new_empty((dist.get_world_size(group), *tensor.shape))
        # A list of views of one buffer: the gather writes the result in place.
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
        return out

    def reduce_sum(tensor: Any, group: Any) -> Any:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    class Gather(function):  # type: ignore[misc]
        @staticmethod
        def forward(ctx: Any, tensor: Any, group: Any) -> Any:
            ctx.group = group
            return gather(tensor, group)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            # Every process's output holds this process's input in row `rank`:
            # its gradient is that row's gradient summed over processes.
            total = reduce_sum(
                grad.clone(memory_format=torch.contiguous_format), ctx.group
            )
            return total[dist.get_rank(ctx.group)], None

    class ReduceSum(function):  # type: ignore[misc]
        @staticmethod
        def forward(ctx: Any, tensor: Any, group: Any) -> Any:
            ctx.group = group
            return reduce_sum(tensor.clone(), group)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            total = reduce_sum(
                grad.clone(memory_format=torch.contiguous_format), ctx.group
            )
            return total, None

    def all_gather(tensor: Any, group: Any) -> Any:
        if tensor.requires_grad:
            return Gather.apply(tensor, group)
        return gather(tensor, group)

    def all_reduce_sum(tensor: Any, group: Any, in_place: bool) -> Any:
        if tensor.requires_grad:
            return ReduceSum.apply(tensor, group)
        return reduce_sum(tensor if in_place else tensor.clone(), group)

    return all_gather, all_reduce_sum


def _as_tensor(a: Array) -> tuple[Any, Callable[[Any], Array], bool]:
    """`a` as a PyTorch tensor, the way back to `a`'s library and device, and
    whether the tensor may be written (it is `a` itself, or shares the memory
    of a NumPy array)."""
    torch = _optional("torch")

    if is_torch_array(a):
        return a, lambda t: t, True
    xp = array_namespace(a)
    if is_numpy_namespace(xp):
        return torch.from_numpy(a), lambda t: t.numpy(), a.flags.writeable
    if hasattr(a, "__dlpack__"):  # CuPy, JAX, array-api-strict: shared memory
        tensor = torch.from_dlpack(a)
    else:  # Dask: the statistics are computed here
        numpy = _optional("numpy")
        tensor = torch.from_numpy(numpy.array(a))

    def back(t: Any) -> Array:
        result = (
            xp.from_dlpack(t) if hasattr(a, "__dlpack__") else xp.asarray(t.numpy())
        )
        return xp.asarray(result, device=device(a))

    return tensor, back, False


class TorchDistributed:
    """The collectives of ``torch.distributed``, over `group`.

    For arrays of every library bnarray accepts, on any backend of
    ``torch.distributed`` that has ``all_gather`` and ``all_reduce``: gloo for
    CPU tensors and NumPy arrays, NCCL for CUDA tensors and CuPy arrays.
    NumPy arrays and CPU tensors share their memory with the tensors the
    collective reads and writes; CuPy, JAX and array-api-strict arrays travel
    through DLPack (no copy where the library allows), Dask arrays are
    computed (the statistics only: a few numbers per channel).

    The collectives are differentiable: for tensors that require grad,
    ``loss.backward()`` through :func:`~bnarray.batch_norm_forward` gives each
    process the gradient of the sum of every process's loss, as
    :func:`~bnarray.batch_norm_backward` does.

    Parameters
    ----------
    group : ProcessGroup, optional
        A group from ``torch.distributed.new_group``; None (default) is the
        whole world. ``torch.distributed.init_process_group`` must have been
        called before the first collective (not before this constructor).

    Examples
    --------
    In each process (see :doc:`/distributed`)::

        torch.distributed.init_process_group("gloo", ...)
        layer = bn.BatchNorm(64, axis=1, sync=bn.sync.TorchDistributed())
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __repr__(self) -> str:
        return f"TorchDistributed(group={self.group!r})"

    def all_gather(self, a: Array, /) -> Array:
        """Every process's `a` stacked along a new first axis, in rank order."""
        tensor, back, _ = _as_tensor(a)
        gather, _ = _torch_collectives()
        return back(gather(tensor, self.group))

    def all_reduce_sum(self, a: Array, /) -> Array:
        """The element-wise sum of every process's `a` (into `a` itself for
        NumPy arrays and tensors)."""
        tensor, back, writable = _as_tensor(a)
        _, reduce_sum = _torch_collectives()
        return back(reduce_sum(tensor, self.group, writable))


# ---------------------------------------------------------------------------- MPI


class MPI:
    """The collectives of an ``mpi4py`` communicator.

    The buffers are NumPy arrays: arrays of other libraries are copied to the
    host and back (a few numbers per channel), except CuPy arrays with
    ``cuda_aware=True``, which go to MPI as they are. Run the processes with
    ``mpiexec -n N python -m mpi4py script.py``: then an uncaught exception in
    one process aborts all of them (see :doc:`/distributed`).

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default: ``mpi4py.MPI.COMM_WORLD`` (mpi4py is imported then).
    cuda_aware : bool, default False
        Pass CuPy arrays to MPI without host copies. Only for an MPI library
        built with CUDA support (PyPI's MPICH and Open MPI wheels are not).

    Raises
    ------
    TypeError
        From a collective: a PyTorch tensor that requires grad (host copies
        carry no autograd graph; use :class:`TorchDistributed`, or call
        :func:`~bnarray.batch_norm_backward` on detached tensors).

    Examples
    --------
    In each process::

        layer = bn.BatchNorm(64, axis=1, sync=bn.sync.MPI())
    """

    def __init__(self, comm: Any = None, *, cuda_aware: bool = False) -> None:
        if comm is None:
            comm = _optional("mpi4py.MPI").COMM_WORLD
        self.comm = comm
        self.cuda_aware = check_bool(cuda_aware, "cuda_aware")

    def __repr__(self) -> str:
        return f"MPI(comm={self.comm!r}, cuda_aware={self.cuda_aware})"

    def _buffer(self, a: Array) -> tuple[Any, Callable[[Any], Array]]:
        """A contiguous, writable buffer for MPI, and the way back to `a`'s kind."""
        if is_cupy_array(a) and self.cuda_aware:
            cupy = _optional("cupy")
            # MPI reads device memory directly: the kernels that wrote `a` must be done.
            cupy.cuda.get_current_stream().synchronize()
            return cupy.ascontiguousarray(a), lambda out: out
        xp = array_namespace(a)
        if is_numpy_namespace(xp):
            host = a if a.flags.writeable and a.flags.c_contiguous else a.copy()
            return host, lambda out: out
        if is_torch_array(a):
            if a.requires_grad:
                msg = (
                    "`MPI` exchanges host copies of the statistics, which carry no "
                    "autograd graph; use bnarray.sync.TorchDistributed for tensors "
                    "that require grad, or detach them and call batch_norm_backward"
                )
                raise TypeError(msg)
            host = a.detach().cpu().contiguous().numpy()
        elif is_cupy_array(a):
            host = a.get()
        else:
            host = _optional("numpy").array(a)  # JAX, array-api-strict, Dask (computed)
        return host, lambda out: xp.asarray(out, device=device(a))

    def all_gather(self, a: Array, /) -> Array:
        """Every process's `a` stacked along a new first axis, in rank order."""
        send, back = self._buffer(a)
        receive = _empty_like_stacked(send, self.comm.Get_size())
        self.comm.Allgather(send, receive)
        return back(receive)

    def all_reduce_sum(self, a: Array, /) -> Array:
        """The element-wise sum of every process's `a`."""
        mpi = _optional("mpi4py.MPI")
        buffer, back = self._buffer(a)
        self.comm.Allreduce(mpi.IN_PLACE, buffer, op=mpi.SUM)
        return back(buffer)


def _empty_like_stacked(a: Any, count: int) -> Any:
    """An uninitialized ``(count, *a.shape)`` array of `a`'s kind (NumPy or CuPy)."""
    library = _optional("cupy" if is_cupy_array(a) else "numpy")
    return library.empty((count, *a.shape), dtype=a.dtype)


# ---------------------------------------------------------------------------- JAX


@dataclass(frozen=True)
class JaxAxis:
    """The collectives of ``jax.lax`` over a named mapped axis.

    For JAX arrays inside ``jax.shard_map``, ``jax.pmap`` or ``jax.vmap`` with
    an ``axis_name``: every slice along that axis is one participant. The
    collectives are ``jax.lax.all_gather`` and ``jax.lax.psum``, so the
    forward and backward passes compose with ``jax.jit`` and ``jax.grad``
    (which differentiates through them). Every participant holds a share of
    the same shape, as these transformations require.

    Parameters
    ----------
    axis_name : hashable
        The name given to ``shard_map``'s mesh axis, or the ``axis_name`` of
        ``pmap`` or ``vmap`` (a tuple of names for several axes).

    Raises
    ------
    TypeError
        An `axis_name` that is not hashable.

    Examples
    --------
    Four participants of two rows each, mapped by ``jax.vmap`` (with JAX
    installed; ``tests/test_sync.py`` runs this)::

        x = jnp.arange(8.0).reshape(4, 2, 1)            # participant, row, channel

        def batch_mean(share):
            _, ctx = bn.batch_norm_forward(share, sync=bn.sync.JaxAxis("p"))
            return ctx.mean

        jax.vmap(batch_mean, axis_name="p")(x)          # 3.5 (all 8 rows), on each
    """

    axis_name: Hashable

    def __post_init__(self) -> None:
        try:
            hash(self.axis_name)
        except TypeError:
            msg = (
                "`axis_name` must be hashable (a name such as 'batch', or a tuple "
                f"of names), got {type(self.axis_name).__name__}: {self.axis_name!r:.80}"
            )
            raise TypeError(msg) from None

    def all_gather(self, a: Array, /) -> Array:
        """Every participant's `a` stacked along a new first axis (``jax.lax.all_gather``)."""
        return _optional("jax").lax.all_gather(a, self.axis_name)

    def all_reduce_sum(self, a: Array, /) -> Array:
        """The element-wise sum over the participants (``jax.lax.psum``)."""
        return _optional("jax").lax.psum(a, self.axis_name)

    def size(self) -> int:
        """The number of participants (known while tracing)."""
        return int(_optional("jax").lax.axis_size(self.axis_name))
