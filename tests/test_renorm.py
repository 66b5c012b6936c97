"""Batch renormalization against the paper's equations, finite differences and jax.grad."""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close
from variant_helpers import numerical_gradients

import bnarray as bn

EPS = 1e-5
RENORM = bn.Renorm(rmax=2.0, dmax=1.0)
# x ~ N(2, 3) per channel; channel 0 needs no clipping, channel 1 clips r and
# d from above, channel 2 clips r from below.
RUNNING_MEAN = np.array([2.0, 0.0, 10.0])
RUNNING_VAR = np.array([9.0, 1.0, 100.0])


def make_x(shape=(16, 3), seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=shape)


def make_params(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 0.5, 3), rng.normal(0.0, 0.5, 3)


def corrections(x, renorm=RENORM, rm=RUNNING_MEAN, rv=RUNNING_VAR, eps=EPS):
    """Ioffe (2017), Algorithm 1: r and d from the batch of `x` (channels last)."""
    rows = x.reshape(-1, x.shape[-1])
    mu_b, sigma_b = rows.mean(axis=0), np.sqrt(rows.var(axis=0) + eps)
    sigma = np.sqrt(rv + eps)
    r = np.clip(sigma_b / sigma, 1 / renorm.rmax, renorm.rmax)
    d = np.clip((mu_b - rm) / sigma, -renorm.dmax, renorm.dmax)
    return r, d


def renorm_forward(x, w, b, r, d, eps=EPS):
    """The paper's forward pass with r and d given (constants of the gradient)."""
    rows = x.reshape(-1, x.shape[-1])
    mu_b, sigma_b = rows.mean(axis=0), np.sqrt(rows.var(axis=0) + eps)
    xhat = (rows - mu_b) / sigma_b * r + d
    return (w * xhat + b).reshape(x.shape)


def run(backend, x, w, b, renorm=RENORM, rm=RUNNING_MEAN, rv=RUNNING_VAR):
    return bn.batch_norm_forward(
        *(backend.asarray(a) for a in (x, w, b)),
        renorm=renorm,
        running_mean=backend.asarray(rm),
        running_var=backend.asarray(rv),
    )


@pytest.mark.parametrize("shape", [(16, 3), (4, 5, 3)])
def test_forward_follows_the_papers_equations(backend, shape):
    x = make_x(shape)
    w, b = make_params()
    y, ctx = run(backend, x, w, b)
    r, d = corrections(x)
    assert 1 / RENORM.rmax < r[0] < RENORM.rmax and abs(d[0]) < RENORM.dmax
    assert r[1] == RENORM.rmax and d[1] == RENORM.dmax and r[2] == 1 / RENORM.rmax
    xb = backend.asarray(x)
    assert_close(
        backend, y, renorm_forward(x, w, b, r, d), like=xb, rtol=1e-12, atol=1e-12
    )
    assert_close(backend, ctx.renorm_r, r, like=xb, rtol=1e-14, atol=0)
    assert_close(backend, ctx.renorm_d, d, like=xb, rtol=1e-14, atol=1e-15)
    rows = x.reshape(-1, 3)  # the context holds the batch's statistics
    assert_close(backend, ctx.mean, rows.mean(axis=0), like=xb, rtol=1e-12, atol=1e-12)
    assert_close(backend, ctx.var, rows.var(axis=0), like=xb, rtol=1e-12, atol=1e-12)


def test_backward_matches_finite_differences_with_r_and_d_held_fixed(backend):
    x = make_x((6, 3), seed=2)
    w, b = make_params(seed=3)
    probe = np.random.default_rng(4).normal(size=x.shape)
    r, d = corrections(x)

    def loss(x, w, b):
        return float(np.sum(probe * renorm_forward(x, w, b, r, d)))

    expected = numerical_gradients(loss, [x, w, b])
    _, ctx = run(backend, x, w, b)
    actual = bn.batch_norm_backward(backend.asarray(probe), ctx)
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-6, atol=1e-7)


def test_rmax_1_and_dmax_0_is_plain_batch_norm_exactly(backend):
    x = make_x((8, 4, 3), seed=5)
    w, b = make_params(seed=6)
    dy = backend.asarray(np.random.default_rng(7).normal(size=x.shape))
    y, ctx = run(backend, x, w, b, renorm=bn.Renorm(rmax=1, dmax=0))
    y0, ctx0 = bn.batch_norm_forward(*(backend.asarray(a) for a in (x, w, b)))
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y0))
    for got, want in zip(
        bn.batch_norm_backward(dy, ctx), bn.batch_norm_backward(dy, ctx0), strict=True
    ):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))


def test_inference_ignores_renorm(backend):
    x = make_x(seed=8)
    w, b = make_params()
    args = [backend.asarray(a) for a in (x, w, b)]
    stats = {
        "running_mean": backend.asarray(RUNNING_MEAN),
        "running_var": backend.asarray(RUNNING_VAR),
    }
    y, ctx = bn.batch_norm_forward(*args, training=False, renorm=RENORM, **stats)
    y0, _ = bn.batch_norm_forward(*args, training=False, **stats)
    np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y0))
    assert ctx.renorm_r is None


def test_layer_renormalizes_against_its_running_statistics(backend):
    x = make_x(seed=9)
    layer = bn.BatchNorm(3, renorm=RENORM, xp=backend.lib, device=backend.device)
    layer.running_mean = backend.asarray(RUNNING_MEAN)
    layer.running_var = backend.asarray(RUNNING_VAR)
    y = layer(backend.asarray(x))
    r, d = corrections(x)
    xb = backend.asarray(x)
    assert_close(
        backend,
        y,
        renorm_forward(x, np.ones(3), np.zeros(3), r, d),
        like=xb,
        rtol=1e-12,
        atol=1e-12,
    )
    # The usual update, with the batch's statistics.
    rows = x.reshape(-1, 3)
    expected = 0.9 * RUNNING_VAR + 0.1 * rows.var(axis=0, ddof=1)
    assert_close(backend, layer.running_var, expected, like=xb, rtol=1e-12, atol=1e-12)
    dx = layer.backward(backend.asarray(np.ones_like(x)))
    assert_close(backend, dx, np.zeros_like(x), like=xb, atol=1e-12)
    assert "renorm=Renorm(rmax=2.0, dmax=1.0)" in repr(layer)


def test_jax_grad_with_stop_gradient_equals_the_backward():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x = make_x((12, 3), seed=10)
    w, b = make_params(seed=11)
    probe = np.random.default_rng(12).normal(size=x.shape)
    rm, rv = jnp.asarray(RUNNING_MEAN), jnp.asarray(RUNNING_VAR)

    def paper(x, w, b):
        mu_b = jnp.mean(x, axis=0)
        sigma_b = jnp.sqrt(jnp.var(x, axis=0) + EPS)
        sigma = jnp.sqrt(rv + EPS)
        stop = jax.lax.stop_gradient
        r = stop(jnp.clip(sigma_b / sigma, 1 / RENORM.rmax, RENORM.rmax))
        d = stop(jnp.clip((mu_b - rm) / sigma, -RENORM.dmax, RENORM.dmax))
        return jnp.sum(probe * (w * ((x - mu_b) / sigma_b * r + d) + b))

    expected = jax.grad(paper, argnums=(0, 1, 2))(*(jnp.asarray(a) for a in (x, w, b)))
    args = [jnp.asarray(a) for a in (x, w, b)]
    _, ctx = bn.batch_norm_forward(
        *args, renorm=RENORM, running_mean=rm, running_var=rv
    )
    actual = bn.batch_norm_backward(jnp.asarray(probe), ctx)
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12
        )

    # and the same through jax.grad of bnarray's own forward, under jit
    def loss(x):
        y, _ = bn.batch_norm_forward(
            x, *args[1:], renorm=RENORM, running_mean=rm, running_var=rv
        )
        return jnp.sum(probe * y)

    grad = jax.jit(jax.grad(loss))(args[0])
    # jax.grad through bnarray's forward holds r and d constant too.
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected[0]), atol=1e-12)


def test_torch_autograd_through_the_forward_holds_r_and_d_constant():
    torch = pytest.importorskip("torch")
    x = make_x((10, 3), seed=14)
    w, b = make_params(seed=15)
    probe = np.random.default_rng(16).normal(size=x.shape)
    xt = torch.tensor(x, requires_grad=True)
    y, ctx = bn.batch_norm_forward(
        xt,
        torch.tensor(w),
        torch.tensor(b),
        renorm=RENORM,
        running_mean=torch.tensor(RUNNING_MEAN),
        running_var=torch.tensor(RUNNING_VAR),
    )
    (y * torch.tensor(probe)).sum().backward()
    dx, _, _ = bn.batch_norm_backward(torch.tensor(probe), ctx)
    np.testing.assert_allclose(
        xt.grad.numpy(), dx.detach().numpy(), rtol=1e-10, atol=1e-12
    )


def test_renorm_stays_lazy_on_dask():
    da = pytest.importorskip("dask.array")
    import dask

    def refuse(*args, **kwargs):
        msg = "a Dask graph was computed while it should only have been built"
        raise AssertionError(msg)

    x = make_x(seed=13)
    w, b = make_params()
    xd = da.from_array(x, chunks=(8, 3))
    with dask.config.set(scheduler=refuse):
        y, ctx = bn.batch_norm_forward(
            xd,
            da.from_array(w),
            da.from_array(b),
            renorm=RENORM,
            running_mean=da.from_array(RUNNING_MEAN),
            running_var=da.from_array(RUNNING_VAR),
        )
        bn.batch_norm_backward(y, ctx)
    r, d = corrections(x)
    np.testing.assert_allclose(
        y.compute(), renorm_forward(x, w, b, r, d), rtol=1e-12, atol=1e-12
    )
