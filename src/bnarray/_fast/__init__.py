"""Choice of the kernels for a namespace: a fast path where one exists, else the generic one."""

from __future__ import annotations

import os
from types import ModuleType

from .. import _math
from .._compat import Namespace, is_cupy_namespace, is_numpy_namespace

__all__ = ["FORCE_GENERIC_ENV", "kernels_for"]

FORCE_GENERIC_ENV = "BNARRAY_GENERIC"
"""Set this environment variable to ``1`` to use the generic array-API kernels everywhere."""


def kernels_for(xp: Namespace) -> ModuleType:
    """The module whose ``batch_stats``, ``normalize``, ``grad_sums`` and
    ``grad_input`` serve arrays of `xp`.

    NumPy gets the cache-blocked kernels of ``_numpy``, CuPy the fused CUDA
    kernels of ``_cupy`` (imported only then); every other namespace, and every
    namespace when the environment variable ``BNARRAY_GENERIC`` is set to
    anything but ``0``, gets the generic array-API kernels of ``_math``.
    """
    if os.environ.get(FORCE_GENERIC_ENV, "0") not in ("", "0"):
        return _math
    if is_numpy_namespace(xp):
        from . import _numpy

        return _numpy
    if is_cupy_namespace(xp):
        from . import _cupy

        return _cupy
    return _math
