"""Plans: what the checks of a call decide, kept for the next call with the same metadata.

A training loop calls bnarray with arrays of the same library, dtype and
shape step after step. The checks of a call, and the choices that follow from
them (the normalized axes, the count, the kernels), depend only on such
metadata, never on values: a plan records them under a key made of exactly
what they read. A call whose key is found skips them; any other call runs
them all, so it raises the same error, and a call that passes them stores its
plan. What a key cannot hold is checked on every call: the devices of arrays
of libraries with several (anything but NumPy's own ``ndarray``), and the
values of arguments that change from call to call (``num_batches_tracked``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["PLANS", "PlanCache", "exact", "meta", "plan_for"]

MAX_PLANS = 512
"""The most plans kept; the oldest goes first when a new one needs room."""


class PlanCache:
    """A bounded, thread-safe mapping from keys to plans.

    Lookups take no lock (a dict read is atomic in CPython); insertions do, so
    that two threads never both evict. A key that cannot be hashed (an
    argument such as a list) finds nothing and stores nothing: its call runs
    every check, which then names the bad argument.
    """

    def __init__(self, maxsize: int = MAX_PLANS) -> None:
        self.maxsize = maxsize
        self._plans: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable | None) -> Any:
        if key is None:
            return None
        try:
            return self._plans.get(key)
        except TypeError:  # unhashable
            return None

    def put(self, key: Hashable | None, plan: Any) -> None:
        if key is None:
            return
        with self._lock:
            try:
                if key not in self._plans and len(self._plans) >= self.maxsize:
                    del self._plans[next(iter(self._plans))]
                self._plans[key] = plan
            except TypeError:  # unhashable
                pass

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


PLANS = PlanCache()


def meta(a: Any) -> Hashable:
    """What the checks read of an array argument: its type, dtype and shape.

    Raises AttributeError for what is not an array (its call then runs the
    checks, which say so).
    """
    if a is None:
        return None
    return (type(a), a.dtype, a.shape)


def exact(value: Any) -> Hashable:
    """A scalar argument with its type: ``1``, ``1.0`` and ``True`` compare
    equal in Python, but the checks accept one and refuse another."""
    if type(value) is tuple:
        return (tuple, tuple(exact(v) for v in value))
    return (type(value), value)


def plan_for(
    key: Callable[[], Hashable] | None, make: Callable[[], Any]
) -> tuple[Any, bool]:
    """The plan stored under ``key()``, and True; else ``make()`` (every check
    of the call, which raises for a bad argument), stored under that key, and
    False. `key` None, or a key that reads an attribute an argument lacks (it
    is not an array: the checks say so), stores nothing."""
    try:
        wanted = None if key is None else key()
    except AttributeError:
        wanted = None
    plan = PLANS.get(wanted)
    if plan is not None:
        return plan, True
    plan = make()
    PLANS.put(wanted, plan)
    return plan, False
