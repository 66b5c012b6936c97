"""The generic kernels hold few full-size temporaries: they update the arrays
they create in place, rather than chaining new ones (measured on NumPy)."""

from __future__ import annotations

import tracemalloc

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

from bnarray import _math

SHAPE = (16, 16, 64, 64)  # 4 MiB in float32
REDUCE = (0, 2, 3)


def _peak_temporaries(fn, x):
    """Peak NumPy memory allocated by ``fn()`` beyond the arrays it returns, in
    units of ``x.nbytes``."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sum(a.nbytes for a in out if a.size == x.size)
    return (peak - base - kept) / x.nbytes


def _operands(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, SHAPE).astype(dtype)
    dy = rng.normal(size=SHAPE).astype(dtype)
    per_channel = [
        rng.uniform(0.5, 1.5, (1, SHAPE[1], 1, 1)).astype(dtype) for _ in range(4)
    ]
    return x, dy, per_channel


# The most full-size temporaries each kernel needs beside its output: the
# statistics square the deviations into a second array (an in-place square
# would break autograd in PyTorch), the gradient sums multiply the deviations
# by dy in place, and the input gradient adds one product into the output.
KERNELS = {
    "batch_stats": (2, lambda x, dy, p: _math.batch_stats(x, REDUCE, xp=np_compat)),
    "normalize": (
        0,
        lambda x, dy, p: (_math.normalize(x, p[0], p[1], p[2], xp=np_compat),),
    ),
    "normalize without shift": (
        0,
        lambda x, dy, p: (_math.normalize(x, p[0], p[1], None, xp=np_compat),),
    ),
    "grad_sums": (
        1,
        lambda x, dy, p: _math.grad_sums(dy, x, p[0], REDUCE, xp=np_compat),
    ),
    "grad_input": (
        1,
        lambda x, dy, p: (
            _math.grad_input(dy, x, p[0], p[1], p[2], p[3], xp=np_compat),
        ),
    ),
    "grad_input in inference": (
        0,
        lambda x, dy, p: (
            _math.grad_input(dy, x, p[0], p[1], None, None, xp=np_compat),
        ),
    ),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(KERNELS))
def test_generic_kernels_hold_few_full_size_temporaries(name, dtype):
    most, kernel = KERNELS[name]
    x, dy, per_channel = _operands(dtype)
    peak = _peak_temporaries(lambda: kernel(x, dy, per_channel), x)
    assert peak < most + 0.25, f"{name}: {peak:.2f} full-size temporaries"


def test_generic_kernels_leave_their_inputs_alone():
    x, dy, per_channel = _operands(np.float32)
    before = [a.copy() for a in (x, dy, *per_channel)]
    for _, kernel in KERNELS.values():
        kernel(x, dy, per_channel)
    for a, b in zip((x, dy, *per_channel), before, strict=True):
        np.testing.assert_array_equal(a, b)
