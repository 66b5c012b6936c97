"""Choice of the kernels for a namespace: a fast path where one exists, else the generic one."""

from __future__ import annotations

import os
from types import ModuleType

from .. import _math
from .._compat import Namespace

__all__ = ["FORCE_GENERIC_ENV", "kernels_for"]

FORCE_GENERIC_ENV = "BNARRAY_GENERIC"
"""Set this environment variable to ``1`` to use the generic array-API kernels everywhere."""


def kernels_for(xp: Namespace) -> ModuleType:
    """The module whose ``batch_stats``, ``normalize``, ``grad_sums`` and
    ``grad_input`` serve arrays of `xp`."""
    if os.environ.get(FORCE_GENERIC_ENV, "0") not in ("", "0"):
        return _math
    return _math
