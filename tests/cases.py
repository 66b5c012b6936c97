"""Shared test inputs: array layouts and random parameters."""

from __future__ import annotations

import numpy as np

import bnarray as bn

__all__ = [
    "KERNEL_DTYPES",
    "KERNEL_LAYOUTS",
    "KERNEL_TOL",
    "LAYOUTS",
    "assert_matches",
    "channel_shape",
    "kernel_inputs",
    "make_params",
    "step_outputs",
]

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


# The fast-path tests: (shape, axis): 2-D to 5-D, channels first and last, negative and tuple axes,
# sizes that are not multiples of the block size, more than one block per
# thread, a row longer than a block (channels first and last), small images
# (few values per channel in a row; few and many channels), and layouts that
# fall back to _math.
KERNEL_LAYOUTS = [
    ((1000, 7), -1),
    ((40_000, 7), -1),
    ((7, 1001), 0),
    ((300, 5), 1),
    ((5, 37, 301), 1),
    ((129, 11, 3), -1),
    ((3, 37, 41, 43), 1),
    ((3, 41, 43, 37), -1),
    ((3, 41, 43, 38), -1),
    ((3, 37, 41, 43), -3),
    ((2, 5, 7, 9, 11), 1),
    ((2, 7, 9, 11, 5), -1),
    ((2, 3, 140_001), 1),
    ((64, 9, 3, 3), 1),
    ((50, 300, 2, 2), 1),
    ((4, 2000, 2, 2), 1),
    ((8, 5, 6, 3), (1, 2)),
    ((3, 140_001), -1),
    ((4, 5, 6, 70), (1, 2)),
    ((4, 5, 6, 70), (0, 2)),
    ((4, 5, 6, 70), (-3, -1)),
]


def _kept_shape(shape, axis):
    kept = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in kept)


def kernel_inputs(shape, axis, dtype, *, seed=0):
    rng = np.random.default_rng(seed)
    cs = _kept_shape(shape, axis)
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, cs).astype(dtype)
    b = rng.standard_normal(cs).astype(dtype)
    rm = rng.standard_normal(cs).astype(dtype)
    rv = rng.uniform(0.5, 2.0, cs).astype(dtype)
    return x, dy, w, b, rm, rv


def step_outputs(x, dy, w, b, rm, rv, *, axis, training):
    kwargs = (
        {} if training else {"training": False, "running_mean": rm, "running_var": rv}
    )
    y, ctx = bn.batch_norm_forward(x, w, b, axis=axis, **kwargs)
    dx, dw, db = bn.batch_norm_backward(dy, ctx)
    out = {"y": y, "mean": ctx.mean, "var": ctx.var, "dx": dx, "dw": dw, "db": db}
    if training and rm is not None:
        out["running_mean"], out["running_var"] = bn.update_running_stats(rm, rv, ctx)
    return out


KERNEL_DTYPES = [np.float64, np.float32, np.float16]
# |fast - generic| <= TOL * max|generic| per output: a few roundings of the dtype.
KERNEL_TOL = {np.float64: 1e-11, np.float32: 1e-5, np.float16: 4e-3}


def assert_matches(fast, generic, dtype):
    for name, expected in generic.items():
        actual = fast[name]
        assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        scale = max(float(np.max(np.abs(e))), 1e-30)
        err = float(np.max(np.abs(a - e))) / scale
        assert err <= KERNEL_TOL[dtype], (name, err)
