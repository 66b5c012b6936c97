"""Shared by the tests of the variants: finite differences and a slice along one axis."""

from __future__ import annotations

import numpy as np

__all__ = ["along", "numerical_gradients"]


def along(axis, part):
    """The index that takes `part` (a slice) of axis `axis`."""
    return (slice(None),) * axis + (part, ...)


def numerical_gradients(loss, arrays, h=1e-6):
    """Central differences of the scalar `loss(*arrays)` with respect to each array."""
    grads = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [b.copy() for b in arrays]
            minus = [b.copy() for b in arrays]
            plus[i][idx] += h
            minus[i][idx] -= h
            g[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        grads.append(g)
    return grads
