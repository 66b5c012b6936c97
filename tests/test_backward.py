"""batch_norm_backward against the chain-rule reference and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from cases import LAYOUTS, make_params
from checks import assert_close, assert_like

import bnarray as bn


def run_backward(backend, x, w, b, dy, *, axis, training, rm=None, rv=None, eps=1e-5):
    xb = backend.asarray(x)
    wb = None if w is None else backend.asarray(w)
    bb = None if b is None else backend.asarray(b)
    kwargs = {}
    if not training:
        kwargs = {
            "running_mean": backend.asarray(rm),
            "running_var": backend.asarray(rv),
        }
    _, ctx = bn.batch_norm_forward(
        xb, wb, bb, axis=axis, eps=eps, training=training, **kwargs
    )
    return xb, bn.batch_norm_backward(backend.asarray(dy), ctx)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_chain_rule_reference(backend, shape, axis, affine, training):
    x, w, b, rm, rv = make_params(shape, axis)
    w, b = (w, b) if affine else (None, None)
    dy = np.random.default_rng(7).normal(size=shape)
    xb, (dx, dw, db) = run_backward(
        backend, x, w, b, dy, axis=axis, training=training, rm=rm, rv=rv
    )
    dx_ref, dw_ref, db_ref = reference.backward(
        dy, x, w, axis=axis, training=training, running_mean=rm, running_var=rv
    )
    assert_close(backend, dx, dx_ref, like=xb, rtol=1e-10, atol=1e-10)
    assert_close(backend, dw, dw_ref, like=xb, rtol=1e-10, atol=1e-10)
    assert_close(backend, db, db_ref, like=xb, rtol=1e-10, atol=1e-10)


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


@pytest.mark.parametrize(
    ("shape", "axis"), [((5, 3), -1), ((3, 2, 4), 1), ((2, 3, 2, 2), (1, 3))]
)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(backend, shape, axis, training):
    x, w, b, rm, rv = make_params(shape, axis, seed=11)
    probe = np.random.default_rng(12).normal(size=shape)  # loss = Σ probe · y

    def loss(x, w, b):
        kwargs = {}
        if not training:
            kwargs = {
                "running_mean": backend.asarray(rm),
                "running_var": backend.asarray(rv),
            }
        y, _ = bn.batch_norm_forward(
            backend.asarray(x),
            backend.asarray(w),
            backend.asarray(b),
            axis=axis,
            training=training,
            **kwargs,
        )
        return float(np.sum(probe * backend.to_numpy(y)))

    expected = numerical_gradients(loss, [x, w, b])
    _xb, actual = run_backward(
        backend, x, w, b, probe, axis=axis, training=training, rm=rm, rv=rv
    )
    for got, want in zip(actual, expected, strict=False):
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-6, atol=1e-7)


def test_training_dx_sums_to_zero_per_channel(backend):
    x, w, b, _, _ = make_params((7, 4, 3), 1, seed=2)
    dy = np.random.default_rng(3).normal(size=x.shape)
    _, (dx, _, _) = run_backward(backend, x, w, b, dy, axis=1, training=True)
    np.testing.assert_allclose(backend.to_numpy(dx).sum(axis=(0, 2)), 0.0, atol=1e-12)


def test_float32_gradients_are_within_1e5_of_float64(backend):
    x, w, _b, _, _ = make_params((16, 4, 5), 1, seed=8)
    dy = np.random.default_rng(9).normal(size=x.shape)
    x32, dy32, w32 = (a.astype(np.float32) for a in (x, dy, w))
    xb = backend.asarray(x32)
    _, ctx = bn.batch_norm_forward(xb, backend.asarray(w32), axis=1)
    dx, dw, db = bn.batch_norm_backward(backend.asarray(dy32), ctx)
    dx_ref, dw_ref, db_ref = reference.backward(dy32, x32, w32, axis=1)
    scale = np.abs(dx_ref).max()
    assert_like(dx, xb)
    np.testing.assert_allclose(
        backend.to_numpy(dx), dx_ref, rtol=1e-5, atol=1e-5 * scale
    )
    np.testing.assert_allclose(backend.to_numpy(dw), dw_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.to_numpy(db), db_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.needs_float16
def test_float16_gradients_keep_dtypes(backend):
    x, w, _, _, _ = make_params((64, 3), -1, seed=4)
    dy = np.random.default_rng(5).normal(size=x.shape)
    xb = backend.asarray(x, np.float16)
    wb = backend.asarray(w, np.float32)
    _, ctx = bn.batch_norm_forward(xb, wb)
    dx, dw, db = bn.batch_norm_backward(backend.asarray(dy, np.float16), ctx)
    assert_like(dx, xb)
    assert_like(dw, wb)
    assert_like(db, wb)
    dx_ref, dw_ref, _ = reference.backward(
        dy.astype(np.float16), x.astype(np.float16), w
    )
    np.testing.assert_allclose(
        backend.to_numpy(dx).astype(np.float64), dx_ref, atol=2e-2, rtol=1e-2
    )
    np.testing.assert_allclose(backend.to_numpy(dw), dw_ref, rtol=1e-3, atol=1e-3)


def test_backward_without_weight_returns_all_three(backend):
    x, *_ = make_params((6, 2), -1)
    dy = np.ones_like(x)
    xb, grads = run_backward(backend, x, None, None, dy, axis=-1, training=True)
    assert len(grads) == 3
    assert_close(backend, grads[2], np.full(2, 6.0), like=xb)


def test_backward_does_not_modify_inputs(backend):
    x, w, _b, _, _ = make_params((6, 4), -1)
    dy = np.random.default_rng(1).normal(size=x.shape)
    xb, wb, dyb = backend.asarray(x), backend.asarray(w), backend.asarray(dy)
    _, ctx = bn.batch_norm_forward(xb, wb)
    bn.batch_norm_backward(dyb, ctx)
    for arr, orig in [(xb, x), (wb, w), (dyb, dy)]:
        np.testing.assert_array_equal(backend.to_numpy(arr), orig)
