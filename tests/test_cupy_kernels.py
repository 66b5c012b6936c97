"""The CuPy kernels give what the generic array-API path gives, on a GPU.

Skipped, with the reason, where CuPy or a GPU is missing; what the kernels
hand to CUDA is checked without a GPU by ``test_cuda_sources.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import KERNEL_DTYPES as DTYPES
from cases import KERNEL_LAYOUTS as LAYOUTS
from cases import assert_matches as _assert_matches
from cases import kernel_inputs as _inputs
from cases import step_outputs as _run

from bnarray import _math
from bnarray._fast import FORCE_GENERIC_ENV

cupy = pytest.importorskip("cupy")
if not cupy.is_available():
    # CuPy wheels import without a GPU; only creating an array fails.
    pytest.skip(
        "CuPy is installed but no CUDA device is available", allow_module_level=True
    )


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_cupy_fast_path_matches_generic_path(
    monkeypatch, shape, axis, dtype, training, affine
):
    arrays = [cupy.asarray(a) for a in _inputs(shape, axis, dtype)]
    if not affine:
        arrays[2] = arrays[3] = None
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    fast = _run(*arrays, axis=axis, training=training)
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    generic = _run(*arrays, axis=axis, training=training)
    _assert_matches(
        {k: cupy.asnumpy(v) for k, v in fast.items()},
        {k: cupy.asnumpy(v) for k, v in generic.items()},
        dtype,
    )


@pytest.mark.parametrize(
    "view",
    [
        # NHWC memory seen as NCHW, a strided slice, a reversed axis: the
        # generic CUDA kernels serve what the contiguous kernels cannot.
        lambda a: a.transpose(0, 3, 1, 2),
        lambda a: a[:, ::2],
        lambda a: a[::-1],
    ],
    ids=["transposed", "strided", "reversed"],
)
@pytest.mark.parametrize("training", [True, False])
def test_cupy_fast_path_matches_generic_path_on_views(monkeypatch, view, training):
    x, dy, *_ = _inputs((3, 41, 43, 37), -1, np.float32)
    x, dy = (view(cupy.asarray(a)) for a in (x, dy))
    _, _, w, b, rm, rv = (cupy.asarray(a) for a in _inputs(x.shape, 1, np.float32))
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    fast = _run(x, dy, w, b, rm, rv, axis=1, training=training)
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    generic = _run(x, dy, w, b, rm, rv, axis=1, training=training)
    _assert_matches(
        {k: cupy.asnumpy(v) for k, v in fast.items()},
        {k: cupy.asnumpy(v) for k, v in generic.items()},
        np.float32,
    )


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("training", [True, False])
def test_cupy_float16_channels_last_with_and_without_two_values_per_thread(
    monkeypatch, offset, training
):
    # An even number of channels: aligned arrays take two float16 values per
    # thread (one 32-bit access); arrays that start one value into their
    # memory (contiguous, but 2-byte aligned) take one.
    from bnarray._fast import _cupy as kernels

    x, dy, w, b, rm, rv = _inputs((5, 7, 9, 38), -1, np.float16)

    def device(a):
        memory = cupy.empty(a.size + 1, dtype=a.dtype)  # aligned
        view = memory[offset : offset + a.size].reshape(a.shape)
        view[...] = cupy.asarray(a)
        return view

    x, dy = device(x), device(dy)
    w, b, rm, rv = (cupy.asarray(a) for a in (w, b, rm, rv))
    assert x.flags.c_contiguous and dy.flags.c_contiguous
    view = (5 * 7 * 9, 38, 1)
    assert kernels._two_per_thread(view, (x, dy)) == (offset == 0)
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    fast = _run(x, dy, w, b, rm, rv, axis=-1, training=training)
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    generic = _run(x, dy, w, b, rm, rv, axis=-1, training=training)
    _assert_matches(
        {k: cupy.asnumpy(v) for k, v in fast.items()},
        {k: cupy.asnumpy(v) for k, v in generic.items()},
        np.float16,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_cupy_per_channel_kernels_match_the_generic_ones(dtype, training, affine):
    # One launch each on CuPy, one array operation per step in _math: the same
    # roundings in the same order, so equal to a rounding or two. Per-channel
    # operands arrive as strided views and in the broadcast shape.
    from bnarray._fast import _cupy as kernels

    rng = np.random.default_rng(3)
    shape = (1, 37, 1)

    def channel(low, high):
        values = rng.uniform(low, high, 2 * 37).astype(dtype)
        return cupy.asarray(values)[::2].reshape(shape)

    var, gamma = channel(0.0, 4.0), channel(-2.0, 2.0) if affine else None
    sums = channel(-50.0, 50.0), channel(-50.0, 50.0)
    rtol = 4 * np.finfo(dtype).eps
    for fast, generic in [
        (
            kernels.forward_scales(var, gamma, 1e-3, xp=cupy),
            _math.forward_scales(var, gamma, 1e-3, xp=cupy),
        ),
        (
            kernels.backward_scales(
                *sums, var, gamma, 1001, training=training, xp=cupy
            ),
            _math.backward_scales(*sums, var, gamma, 1001, training=training, xp=cupy),
        ),
    ]:
        assert len(fast) == len(generic)
        for a, e in zip(fast, generic, strict=True):
            assert (a is None) == (e is None)
            if e is not None:
                assert a.shape == e.shape and a.dtype == e.dtype
                np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(e), rtol=rtol)


@pytest.mark.parametrize(
    ("running_dtype", "var_dtype"),
    [
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.float64, np.float32),  # the fused kernel converts the batch values
        (np.float16, np.float16),  # float16 and mixed dtypes take the generic path
        (np.float64, np.float16),
    ],
)
def test_cupy_running_update_matches_the_generic_one(running_dtype, var_dtype):
    from bnarray._fast import _cupy as kernels

    rng = np.random.default_rng(4)
    mean = cupy.asarray(rng.standard_normal(2 * 29, dtype=np.float32))[::2]
    var = cupy.asarray(rng.uniform(0.5, 2.0, 29).astype(np.float32))
    running_mean = cupy.asarray(rng.standard_normal(29).astype(running_dtype))
    running_var = cupy.asarray(rng.uniform(0.5, 2.0, 29).astype(var_dtype))
    args = (running_mean, running_var, mean, var)
    kwargs = {"factor": 0.1, "bessel": 1000 / 999, "xp": cupy}
    before = [cupy.asnumpy(a) for a in args]
    fast = kernels.running_update(*args, **kwargs)
    generic = _math.running_update(*args, **kwargs)
    for a, e in zip(fast, generic, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        rtol = 2 * np.finfo(e.dtype).eps
        np.testing.assert_allclose(cupy.asnumpy(a), cupy.asnumpy(e), rtol=rtol)
    for a, b in zip(args, before, strict=True):  # the inputs are not written
        np.testing.assert_array_equal(cupy.asnumpy(a), b)
