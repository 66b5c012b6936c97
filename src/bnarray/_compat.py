"""The one module that imports array-api-compat."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_cupy_namespace,
    is_jax_namespace,
    is_lazy_array,
    is_numpy_namespace,
    is_torch_array,
)

__all__ = [
    "Array",
    "Device",
    "Namespace",
    "array_namespace",
    "device",
    "fast_namespace",
    "is_array_api_obj",
    "is_cupy_array",
    "is_cupy_namespace",
    "is_jax_namespace",
    "is_lazy_array",
    "is_numpy_namespace",
    "is_torch_array",
    "numpy_namespace",
]

Array = Any
"""Any array that `array_api_compat.array_namespace` accepts."""

Device = Any
"""A device object of some array library."""

Namespace = ModuleType
"""An array API namespace, as returned by `array_api_compat.array_namespace`."""


def _numpy_implements_the_standard() -> bool:
    import numpy

    return hasattr(numpy, "astype") and hasattr(numpy, "isdtype")  # NumPy >= 2.1


def fast_namespace(xp: Namespace) -> Namespace:
    """`xp`, or NumPy itself for array-api-compat's NumPy namespace where NumPy
    (2.1 and later) has every function of the standard that bnarray calls: the
    same operations without a Python wrapper around each (a few microseconds
    per call on small arrays)."""
    if is_numpy_namespace(xp) and _numpy_implements_the_standard():
        import numpy

        return numpy
    return xp


@functools.cache
def numpy_namespace() -> Namespace:
    """The namespace the NumPy kernels give the generic ones: :func:`fast_namespace`
    of NumPy's."""
    import numpy

    return fast_namespace(array_namespace(numpy.empty(0)))
