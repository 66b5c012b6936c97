"""The kernel contract, and the choice of kernels: a fast path where one exists, else the generic one."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, cast

from .. import _math
from .._compat import Array, Namespace, is_cupy_namespace, is_numpy_namespace

__all__ = [
    "FORCE_GENERIC_ENV",
    "NUMBA_ENV",
    "Kernels",
    "Plan",
    "choose",
    "fused",
    "kernel_env",
    "kernels_for",
    "plan",
]


class Kernels(Protocol):
    """What a kernel set provides: the seven functions of :mod:`bnarray._math`.

    ``_math`` is the reference; ``_numpy``, ``_numba`` and ``_cupy`` are faster
    sets for some namespaces and layouts, held to the same signatures (a test
    compares them) and to the same results (the fast == generic tests). The
    four full-size kernels are the passes over memory; the other three the
    per-channel arithmetic between them. In every signature ``shift`` is the
    per-channel term added last. ``normalize`` and ``grad_input`` write their
    result into `out` where one is given (a C-contiguous, writeable array of
    the result's shape and dtype that overlaps no input) and return it.
    """

    def batch_stats(
        self, x: Array, reduce_axes: tuple[int, ...], *, xp: Namespace
    ) -> tuple[Array, Array]: ...

    def normalize(
        self,
        x: Array,
        mean: Array,
        scale: Array,
        shift: Array | None,
        *,
        xp: Namespace,
        out: Array | None = None,
    ) -> Array: ...

    def grad_sums(
        self,
        dy: Array,
        x: Array,
        mean: Array,
        reduce_axes: tuple[int, ...],
        *,
        xp: Namespace,
    ) -> tuple[Array, Array]: ...

    def grad_input(
        self,
        dy: Array,
        x: Array,
        mean: Array,
        dy_scale: Array,
        xc_scale: Array | None,
        shift: Array | None,
        *,
        xp: Namespace,
        out: Array | None = None,
    ) -> Array: ...

    def forward_scales(
        self, var: Array, gamma: Array | None, eps: float, *, xp: Namespace
    ) -> tuple[Array, Array]: ...

    def backward_scales(
        self,
        sum_dy: Array,
        sum_dy_xc: Array,
        invstd: Array,
        gamma: Array | None,
        count: int,
        *,
        training: bool,
        xp: Namespace,
    ) -> tuple[Array, Array, Array | None, Array | None]: ...

    def running_update(
        self,
        running_mean: Array,
        running_var: Array,
        mean: Array,
        var: Array,
        *,
        factor: float,
        bessel: float,
        xp: Namespace,
    ) -> tuple[Array, Array]: ...


FORCE_GENERIC_ENV = "BNARRAY_GENERIC"
"""Set this environment variable to ``1`` to use the generic array-API kernels everywhere."""

NUMBA_ENV = "BNARRAY_NUMBA"
"""Set this environment variable to ``0`` to run NumPy arrays without Numba when it is installed."""


def kernel_env() -> tuple[Any, Any]:
    """The values of the environment variables that :func:`kernels_for`
    reads, for the keys of cached plans: a plan made under other values does
    not serve. (Read from the mapping behind ``os.environ``, which its
    updates keep current: ``os.environ.get`` encodes each name first, a
    microsecond a call.)"""
    if _ENV_DATA is None:
        return os.environ.get(FORCE_GENERIC_ENV), os.environ.get(NUMBA_ENV)
    return _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1])


def _env_data() -> tuple[Any, tuple[Any, Any]]:
    try:
        data = os.environ._data  # type: ignore[attr-defined]
        encode = os.environ.encodekey
        return data, (encode(FORCE_GENERIC_ENV), encode(NUMBA_ENV))
    except AttributeError:  # not CPython's os.environ
        return None, (None, None)


_ENV_DATA, _ENV_KEYS = _env_data()


@functools.cache
def _numba_kernels() -> ModuleType | None:
    """The Numba kernels, or None where Numba is not installed or cannot be used."""
    if importlib.util.find_spec("numba") is None:
        return None  # Numba is optional
    try:
        from . import _numba
    except Exception as error:  # an incompatible or broken Numba installation
        msg = (
            f"Numba is installed but bnarray cannot use it ({type(error).__name__}: "
            f"{error}); NumPy arrays take the NumPy-only kernels"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return None
    return _numba


def kernels_for(xp: Namespace) -> Kernels:
    """The module whose kernels serve arrays of `xp`: the full-size passes
    ``batch_stats``, ``normalize``, ``grad_sums`` and ``grad_input``, and the
    per-channel arithmetic ``forward_scales``, ``backward_scales`` and
    ``running_update`` (see :mod:`bnarray._math`).

    NumPy gets the compiled loops of ``_numba`` where Numba is installed and
    usable (a RuntimeWarning says why where it is installed but not usable)
    and the environment variable ``BNARRAY_NUMBA`` is not ``0``, else the
    cache-blocked kernels of ``_numpy``; CuPy gets the fused CUDA kernels of
    ``_cupy`` (imported only then); every other namespace, and every namespace
    when ``BNARRAY_GENERIC`` is set to anything but ``0``, gets the generic
    array-API kernels of ``_math``.
    """
    if os.environ.get(FORCE_GENERIC_ENV, "0") not in ("", "0"):
        return _as_kernels(_math)
    if is_numpy_namespace(xp):
        if os.environ.get(NUMBA_ENV) != "0" and (numba := _numba_kernels()):
            return _as_kernels(numba)
        from . import _numpy

        return _as_kernels(_numpy)
    if is_cupy_namespace(xp):
        from . import _cupy

        return _as_kernels(_cupy)
    return _as_kernels(_math)


def _as_kernels(module: ModuleType) -> Kernels:
    # The fast modules import libraries mypy may not see; `_REFERENCE` below
    # has mypy check the reference module against the protocol.
    return cast(Kernels, module)


_REFERENCE: Kernels = _math


@dataclass(frozen=True)
class Plan:
    """What one call runs: the kernels, and the full-size arrays as they read them."""

    kernels: Kernels
    x: Array
    dy: Array | None = None


def choose(
    dtype: Any, size: int, kept: tuple[int, ...], xp: Namespace, dy_dtype: Any = None
) -> tuple[Kernels, bool]:
    """The kernels for an `x` of `dtype` and `size` with channel axes `kept`
    (and a `dy` of `dy_dtype`), and whether they read C-contiguous arrays.

    Metadata only, so that a cached plan can hold the choice; :func:`plan`
    applies it to arrays. The NumPy and Numba kernels take every strided
    layout through a C-contiguous copy; channel axes that are not adjacent,
    empty arrays and dtypes their loops do not take go to the generic
    kernels, and so does float16 for the Numba loops where the CPU cannot
    convert it in hardware (to the NumPy kernels). Other namespaces get
    :func:`kernels_for` as they are.
    """
    kernels = kernels_for(xp)
    module = cast(Any, kernels).__name__
    if module not in ("bnarray._fast._numpy", "bnarray._fast._numba"):
        return kernels, False
    import numpy as np

    from . import _cpu

    if not _cpu.serves(dtype, size, kept) or (
        dy_dtype is not None and dy_dtype != dtype
    ):
        return _as_kernels(_math), False
    if module == "bnarray._fast._numba" and dtype == np.float16:
        from . import _numba

        if not _numba.HARDWARE_HALF:
            from . import _numpy

            kernels = _as_kernels(_numpy)
    return kernels, True


def plan(
    x: Array, kept: tuple[int, ...], xp: Namespace, dy: Array | None = None
) -> Plan:
    """The kernels for `x` (and `dy`) with channel axes `kept` (see
    :func:`choose`), and the arrays as they read them: a C-contiguous copy,
    made here once, of an array the CPU kernels take in another layout (`x`
    itself where it is C-contiguous already)."""
    kernels, contiguous = choose(
        x.dtype, x.size, kept, xp, None if dy is None else dy.dtype
    )
    if not contiguous:
        return Plan(kernels, x, dy)
    import numpy as np

    c = np.ascontiguousarray
    return Plan(kernels, c(x), None if dy is None else c(dy))


# Arrays of fewer elements than this take the fused loops of ``_numba`` for
# training passes. On one thread they beat the blocked kernels on two up to
# 2**20 elements (a training step on 64×64×16×16 float32: 2.0 against 2.5 ms;
# 8×256×14×14: 0.40 against 0.80 ms), and lose on 32×64×56×56 (2.7 against
# 2.1 ms); measured on a 2-core Xeon, 2026-12-02.
FUSED_MAX_ELEMENTS = 1 << 20


def fused(kernels: Kernels, shape: tuple[int, ...], kept: tuple[int, ...]) -> Any:
    """The module of fused training passes (``small_forward``,
    ``small_backward``) for an array of `shape` with channel axes `kept` that
    `kernels` serve, or None: the Numba kernels have them for arrays of fewer
    than `FUSED_MAX_ELEMENTS` elements, the NumPy kernels where
    ``_numpy.fuses`` says so."""
    if not hasattr(kernels, "small_forward"):
        return None
    size = math.prod(shape)
    fuses = getattr(kernels, "fuses", None)
    if fuses is not None:
        return kernels if fuses(shape, kept) else None
    return kernels if size < FUSED_MAX_ELEMENTS else None
