"""Choice of the kernels for a namespace: a fast path where one exists, else the generic one."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from types import ModuleType

from .. import _math
from .._compat import Namespace, is_cupy_namespace, is_numpy_namespace

__all__ = ["FORCE_GENERIC_ENV", "NUMBA_ENV", "kernels_for"]

FORCE_GENERIC_ENV = "BNARRAY_GENERIC"
"""Set this environment variable to ``1`` to use the generic array-API kernels everywhere."""

NUMBA_ENV = "BNARRAY_NUMBA"
"""Set this environment variable to ``0`` to run NumPy arrays without Numba when it is installed."""


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


def kernels_for(xp: Namespace) -> ModuleType:
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
        return _math
    if is_numpy_namespace(xp):
        if os.environ.get(NUMBA_ENV) != "0" and (numba := _numba_kernels()):
            return numba
        from . import _numpy

        return _numpy
    if is_cupy_namespace(xp):
        from . import _cupy

        return _cupy
    return _math
