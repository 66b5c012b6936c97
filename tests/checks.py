"""Closeness assertion that also checks library, device, dtype and shape."""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

__all__ = ["assert_close", "assert_like"]


def assert_like(actual: Any, like: Any, *, dtype: Any = None) -> None:
    """`actual` is an array of `like`'s library and device (and `dtype`, default `like`'s)."""
    assert array_namespace(actual) is array_namespace(like), (type(actual), type(like))
    assert device(actual) == device(like), (device(actual), device(like))
    expected_dtype = like.dtype if dtype is None else dtype
    assert actual.dtype == expected_dtype, (actual.dtype, expected_dtype)


def assert_close(
    backend: Any,
    actual: Any,
    expected: np.ndarray,
    *,
    like: Any,
    dtype: Any = None,
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> None:
    """`actual` (a `backend` array) equals the NumPy `expected` and is like `like`."""
    assert_like(actual, like, dtype=dtype)
    assert tuple(actual.shape) == expected.shape, (tuple(actual.shape), expected.shape)
    np.testing.assert_allclose(backend.to_numpy(actual), expected, rtol=rtol, atol=atol)
