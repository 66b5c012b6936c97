"""Properties of batch normalization that hold for any input (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnarray as bn

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def batches(draw):
    """(x, axis): 2-D to 4-D float64 data with a spread well above rounding."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    shape = (draw(st.integers(2, 6)), *shape[1:])  # at least two samples
    axis = draw(st.integers(-ndim + 1, ndim - 1).filter(lambda a: a % ndim != 0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    loc = draw(st.floats(-1e3, 1e3))
    scale = draw(st.floats(1e-2, 1e2))
    x = rng.normal(size=shape) * scale + loc
    return x, axis


def channel_params(x, axis, seed):
    rng = np.random.default_rng(seed)
    n = x.shape[axis]
    return rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n), rng.normal(size=n)


def reduce_axes(x, axis):
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def expand(v, x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return v.reshape(shape)


@SETTINGS
@given(data=batches(), seed=st.integers(0, 1000))
def test_output_has_mean_bias_and_variance_weight_squared(backend, data, seed):
    x, axis = data
    w, b = channel_params(x, axis, seed)
    y, _ctx = bn.batch_norm_forward(
        backend.asarray(x), backend.asarray(w), backend.asarray(b), axis=axis, eps=0.0
    )
    y = backend.to_numpy(y)
    axes = reduce_axes(x, axis)
    np.testing.assert_allclose(y.mean(axis=axes), b, atol=1e-8)
    np.testing.assert_allclose(y.var(axis=axes), w**2, rtol=1e-6)


@SETTINGS
@given(data=batches(), seed=st.integers(0, 1000))
def test_input_gradient_sums_to_zero_over_the_batch(backend, data, seed):
    x, axis = data
    w, _b = channel_params(x, axis, seed)
    dy = np.random.default_rng(seed).normal(size=x.shape)
    _, ctx = bn.batch_norm_forward(backend.asarray(x), backend.asarray(w), axis=axis)
    dx, _, _ = bn.batch_norm_backward(backend.asarray(dy), ctx)
    dx = backend.to_numpy(dx)
    # dx's terms are of size |γ·s·dy|; their sum cancels to rounding of that size.
    scale = np.abs(w).max() * backend.to_numpy(ctx.invstd).max() * np.abs(dy).max()
    np.testing.assert_allclose(
        dx.sum(axis=reduce_axes(x, axis)) / scale, 0.0, atol=1e-9
    )


@SETTINGS
@given(
    data=batches(),
    shift=st.floats(-100, 100),
    factor=st.floats(0.01, 100).flatmap(lambda f: st.sampled_from([f, -f])),
)
def test_output_is_invariant_to_shifting_and_scaling_each_channel(
    backend, data, shift, factor
):
    # With eps = 0 batch norm undoes any per-channel affine map a·x + c with a > 0;
    # a < 0 flips the sign of the normalized output.
    x, axis = data
    y, _ = bn.batch_norm_forward(backend.asarray(x), axis=axis, eps=0.0)
    y2, _ = bn.batch_norm_forward(
        backend.asarray(x * factor + shift), axis=axis, eps=0.0
    )
    np.testing.assert_allclose(
        backend.to_numpy(y2),
        np.sign(factor) * backend.to_numpy(y),
        atol=1e-6,
        rtol=1e-6,
    )


@SETTINGS
@given(data=batches(), shift=st.floats(-100, 100), factor=st.floats(0.5, 2.0))
def test_per_channel_varying_transform_is_undone(backend, data, shift, factor):
    x, axis = data
    n = x.shape[axis]
    a = expand(np.linspace(factor, 2 * factor, n), x, axis)
    c = expand(np.linspace(-shift, shift, n), x, axis)
    y, _ = bn.batch_norm_forward(backend.asarray(x), axis=axis, eps=0.0)
    y2, _ = bn.batch_norm_forward(backend.asarray(x * a + c), axis=axis, eps=0.0)
    np.testing.assert_allclose(
        backend.to_numpy(y2), backend.to_numpy(y), atol=1e-6, rtol=1e-6
    )
