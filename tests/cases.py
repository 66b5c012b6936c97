"""Shared test inputs: array layouts and random parameters."""

from __future__ import annotations

import numpy as np

__all__ = ["LAYOUTS", "channel_shape", "make_params"]

# (shape, axis): 2-D to 5-D, channels last / first / middle, negative and tuple axes.
LAYOUTS = [
    ((16, 3), -1),
    ((16, 3), 1),
    ((5, 4, 3), 1),
    ((5, 4, 3), -1),
    ((4, 3, 5, 6), 1),
    ((4, 5, 6, 3), -1),
    ((4, 5, 6, 3), (-1,)),
    ((4, 3, 5, 2), (1, 3)),
    ((2, 3, 4, 3, 2), -4),
    ((2, 3, 4, 3, 2), (1, 2)),
    ((6, 2), ()),
]


def channel_shape(shape, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(shape[a % len(shape)] for a in sorted(a % len(shape) for a in axes))


def make_params(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    cshape = channel_shape(shape, axis)
    x = rng.normal(2.0, 3.0, size=shape)
    weight = rng.normal(1.0, 0.5, size=cshape)
    bias = rng.normal(0.0, 0.5, size=cshape)
    running_mean = rng.normal(0.0, 1.0, size=cshape)
    running_var = rng.uniform(0.5, 2.0, size=cshape)
    return x, weight, bias, running_mean, running_var
