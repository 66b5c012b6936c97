"""JAX's pytree registry, reached only once JAX is in use (this module never
imports JAX on its own)."""

from __future__ import annotations

import threading

__all__ = ["register_dataclass"]

_lock = threading.Lock()
_registered: set[type] = set()


def register_dataclass(
    cls: type, *, data_fields: tuple[str, ...], meta_fields: tuple[str, ...]
) -> None:
    """Register the dataclass `cls` as a JAX pytree, once (further calls, from any
    thread, do nothing).

    `data_fields` hold arrays (or None): the leaves that `jax.jit`, `jax.vmap`
    and `jax.grad` trace. `meta_fields` are hashable Python values that become
    part of the tree's static structure.
    """
    if cls in _registered:
        return
    with _lock:
        if cls in _registered:
            return
        import jax.tree_util

        jax.tree_util.register_dataclass(
            cls, data_fields=list(data_fields), meta_fields=list(meta_fields)
        )
        _registered.add(cls)
