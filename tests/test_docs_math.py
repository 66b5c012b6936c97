"""The claims of the math pages (docs/math.rst, behaviour.rst, numerics.rst), checked.

Each test names the statement it pins down; comments give the equation numbers
of the built site: (1.n) math, (2.n) behaviour, (3.n) numerics. The oracles are float64
NumPy written from the equations on the pages, and central finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnarray as bn

EPS = 1e-5


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def numerical_gradient(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function `f` at every entry of `x`."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[index] = h
        grad[index] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def chain_rule_backward(x, gamma, g, *, eps=EPS):
    """The paper's node-by-node backward pass, equations (1.18)-(1.21).

    `x` and `g` are (m, C): samples along axis 0.
    """
    m = x.shape[0]
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    s = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * s
    dxhat = gamma * g  # (1.18)
    dvar = np.sum(dxhat * (x - mu), axis=0) * -0.5 * (var + eps) ** -1.5  # (1.19)
    dmu = np.sum(dxhat * -s, axis=0) + dvar * np.mean(-2.0 * (x - mu), axis=0)  # (1.20)
    dx = dxhat * s + dvar * 2.0 * (x - mu) / m + dmu / m  # (1.21)
    return dx, np.sum(g * xhat, axis=0), np.sum(g, axis=0)


# --- math.rst: forward pass ----------------------------------------------------


def test_forward_is_mean_biased_variance_normalize_scale_shift():
    x = rng().normal(5.0, 3.0, size=(8, 3, 3, 4))
    gamma, beta = rng(1).normal(size=4), rng(2).normal(size=4)
    y, ctx = bn.batch_norm_forward(x, gamma, beta, eps=EPS)
    mu = x.sum(axis=(0, 1, 2)) / (8 * 3 * 3)  # (1.2)
    var = ((x - mu) ** 2).sum(axis=(0, 1, 2)) / (8 * 3 * 3)  # (1.3), biased
    s = 1 / np.sqrt(var + EPS)  # (1.4)
    np.testing.assert_allclose(ctx.mean, mu, rtol=1e-13)
    np.testing.assert_allclose(ctx.var, var, rtol=1e-12)
    np.testing.assert_allclose(ctx.invstd, s, rtol=1e-12)
    np.testing.assert_allclose(y, gamma * (x - mu) * s + beta, rtol=1e-12, atol=1e-12)


def test_normalized_values_have_zero_sum_and_sum_of_squares_m_var_over_var_eps():
    x = rng().normal(2.0, 0.01, size=(50, 3))  # var 1e-4: the eps effect is visible
    xhat, ctx = bn.batch_norm_forward(x, eps=EPS)
    np.testing.assert_allclose(xhat.sum(axis=0), 0.0, atol=1e-11)
    expected = ctx.count * ctx.var / (ctx.var + EPS)  # (1.7)
    np.testing.assert_allclose((xhat**2).sum(axis=0), expected, rtol=1e-12)
    assert np.all(expected < ctx.count * 0.95)


# --- math.rst: running statistics ---------------------------------------------


def test_running_stats_are_the_unrolled_exponential_moving_average():
    alpha, batches = 0.1, [rng(i).normal(i, 1 + i, size=(6, 2)) for i in range(12)]
    mean, var = np.zeros(2), np.ones(2)
    for b in batches:
        _, ctx = bn.batch_norm_forward(b)
        mean, var = bn.update_running_stats(mean, var, ctx, momentum=alpha)
    t = len(batches)
    weights = [alpha * (1 - alpha) ** (t - j) for j in range(1, t + 1)]  # (1.10)
    expected_mean = (1 - alpha) ** t * 0.0 + sum(
        w * b.mean(axis=0) for w, b in zip(weights, batches, strict=True)
    )
    expected_var = (1 - alpha) ** t * 1.0 + sum(
        w * b.var(axis=0, ddof=1) for w, b in zip(weights, batches, strict=True)
    )  # (1.9): the unbiased batch variance
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(var, expected_var, rtol=1e-12)


def test_momentum_none_is_the_plain_average_of_all_batches():
    layer = bn.BatchNorm(3, momentum=None)
    batches = [rng(i).normal(3.0 * i, 1.0 + i, size=(5, 3)) for i in range(7)]
    for b in batches:
        layer(b)
    # (1.11): the initial statistics get weight zero, every batch 1/n.
    np.testing.assert_allclose(
        layer.running_mean,
        np.mean([b.mean(axis=0) for b in batches], axis=0),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        layer.running_var,
        np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0),
        rtol=1e-12,
    )


def test_biased_batch_variance_underestimates_by_m_minus_1_over_m():
    m, trials = 4, 200_000
    x = rng().normal(0.0, 2.0, size=(m, trials))  # every trial is one channel
    _, ctx = bn.batch_norm_forward(x)
    # (1.13): E[sigma^2] = (m - 1)/m * sigma*^2 = 3.0; Bessel's correction removes it.
    # Standard error of the average: sqrt(2 * 4**2 * (m-1)) / m / sqrt(trials) ~ 0.007.
    assert abs(ctx.var.mean() - 3.0) < 0.04
    assert abs(ctx.var.mean() * m / (m - 1) - 4.0) < 0.05


# --- math.rst: inference -------------------------------------------------------


def test_inference_folds_into_one_affine_map_and_into_the_previous_layer():
    r = rng()
    gamma, beta = r.normal(size=4), r.normal(size=4)
    r_mean, r_var = r.normal(size=4), r.uniform(0.1, 3.0, size=4)
    z = r.normal(size=(10, 6))
    weight, c = r.normal(size=(6, 4)), r.normal(size=4)  # previous layer x = z W + c
    x = z @ weight + c
    y, _ = bn.batch_norm_forward(
        x, gamma, beta, training=False, running_mean=r_mean, running_var=r_var
    )
    a = gamma / np.sqrt(r_var + EPS)  # (1.14)
    b = beta - a * r_mean
    np.testing.assert_allclose(y, a * x + b, rtol=1e-12, atol=1e-12)
    folded_weight, folded_bias = weight * a, a * c + b  # (1.15)
    np.testing.assert_allclose(
        y, z @ folded_weight + folded_bias, rtol=1e-11, atol=1e-12
    )


# --- math.rst: backward pass ---------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((7, 3), -1), ((4, 3, 2, 5), -1), ((3, 4, 2, 2), 1)]
)
def test_compact_backward_equals_the_full_chain_rule(shape, axis):
    r = rng()
    x = r.normal(1.0, 2.0, size=shape)
    channels = shape[axis]
    gamma, beta = r.normal(size=channels), r.normal(size=channels)
    g = r.normal(size=shape)
    _, ctx = bn.batch_norm_forward(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = bn.batch_norm_backward(g, ctx)

    as_rows = np.moveaxis(x, axis, -1).reshape(-1, channels)
    g_rows = np.moveaxis(g, axis, -1).reshape(-1, channels)
    dx_chain, dgamma_ref, dbeta_ref = chain_rule_backward(as_rows, gamma, g_rows)
    dx_chain = np.moveaxis(dx_chain.reshape(np.moveaxis(x, axis, -1).shape), -1, axis)
    np.testing.assert_allclose(dx, dx_chain, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-12)  # (1.17)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-12)  # (1.16)

    # (1.23) evaluated literally
    m, s = ctx.count, ctx.invstd
    xhat = (as_rows - ctx.mean) * s
    dx_compact = (
        gamma * s / m * (m * g_rows - g_rows.sum(0) - xhat * (g_rows * xhat).sum(0))
    )
    dx_compact = np.moveaxis(
        dx_compact.reshape(np.moveaxis(x, axis, -1).shape), -1, axis
    )
    np.testing.assert_allclose(dx, dx_compact, rtol=1e-10, atol=1e-12)


def test_backward_matches_finite_differences_for_x_gamma_and_beta():
    r = rng(3)
    x = r.normal(0.5, 1.5, size=(3, 2, 2, 2))
    gamma, beta, g = r.normal(size=2), r.normal(size=2), r.normal(size=x.shape)

    def loss(x, gamma=gamma, beta=beta):
        return float(np.sum(g * bn.batch_norm_forward(x, gamma, beta)[0]))

    _, ctx = bn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = bn.batch_norm_backward(g, ctx)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        dgamma, numerical_gradient(lambda w: loss(x, gamma=w), gamma), rtol=1e-6
    )
    np.testing.assert_allclose(
        dbeta, numerical_gradient(lambda b: loss(x, beta=b), beta), rtol=1e-6
    )


def test_eval_mode_gradient_is_the_per_channel_scale():
    r = rng(4)
    x = r.normal(size=(5, 3))
    gamma, beta, g = r.normal(size=3), r.normal(size=3), r.normal(size=(5, 3))
    r_mean, r_var = r.normal(size=3), r.uniform(0.5, 2.0, size=3)
    stats = {"running_mean": r_mean, "running_var": r_var, "training": False}

    def loss(x, gamma=gamma):
        return float(np.sum(g * bn.batch_norm_forward(x, gamma, beta, **stats)[0]))

    _, ctx = bn.batch_norm_forward(x, gamma, beta, **stats)
    dx, dgamma, dbeta = bn.batch_norm_backward(g, ctx)
    s = 1 / np.sqrt(r_var + EPS)
    np.testing.assert_allclose(dx, gamma * s * g, rtol=1e-12)  # (1.24)
    np.testing.assert_allclose(dgamma, np.sum(g * (x - r_mean) * s, axis=0), rtol=1e-12)
    np.testing.assert_allclose(dbeta, g.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        dgamma, numerical_gradient(lambda w: loss(x, gamma=w), gamma), rtol=1e-6
    )


# --- behaviour.rst: badly scaled weights --------------------------------------


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e3])
def test_output_is_invariant_to_weight_scale_and_gradient_scales_inversely(c):
    r = rng(5)
    z, weight = r.normal(size=(16, 5)), r.normal(size=(5, 3))
    g = r.normal(size=(16, 3))

    def forward_backward(weight, eps):
        y, ctx = bn.batch_norm_forward(z @ weight, eps=eps)
        dx, _, _ = bn.batch_norm_backward(g, ctx)
        return y, z.T @ dx

    y1, dw1 = forward_backward(weight, EPS)
    # (2.1): exact when eps scales with c**2 ...
    yc, dwc = forward_backward(c * weight, EPS * c**2)
    np.testing.assert_allclose(yc, y1, rtol=1e-9, atol=1e-10)
    # ... (2.2): and then the gradient scales exactly like 1/c.
    np.testing.assert_allclose(dwc, dw1 / c, rtol=1e-8, atol=1e-12 / c)
    # With a fixed eps the invariance holds as long as c**2 var >> eps.
    y_fixed, _ = forward_backward(c * weight, EPS)
    if c >= 0.5:
        np.testing.assert_allclose(y_fixed, y1, rtol=1e-4, atol=1e-4)
    else:
        assert not np.allclose(y_fixed, y1, atol=1e-2)


def test_weight_gradient_matches_finite_differences_and_is_orthogonal_to_weights():
    r = rng(6)
    z, weight = r.normal(size=(12, 4)), r.normal(size=(4, 2))
    g = r.normal(size=(12, 2))

    def loss(weight, eps=0.0):
        return float(np.sum(g * bn.batch_norm_forward(z @ weight, eps=eps)[0]))

    _, ctx = bn.batch_norm_forward(z @ weight, eps=0.0)
    dx, _, _ = bn.batch_norm_backward(g, ctx)
    dweight = z.T @ dx
    np.testing.assert_allclose(
        dweight, numerical_gradient(loss, weight), rtol=1e-6, atol=1e-8
    )
    # (2.3): <W, grad W> = 0 per channel (Euler, degree-zero homogeneity).
    np.testing.assert_allclose(np.sum(weight * dweight, axis=0), 0.0, atol=1e-12)


# --- behaviour.rst: gradient mixing between samples ---------------------------


def test_jacobian_has_cross_sample_terms_as_derived():
    r = rng(7)
    x = r.normal(size=(3, 2, 1))  # 3 samples x 2 positions, one channel: m = 6
    gamma = np.array([1.7])
    _, ctx = bn.batch_norm_forward(x, gamma)
    m = ctx.count
    jac_fd = np.zeros((m, m))
    for j in range(m):
        e = np.zeros(m)
        e[j] = 1e-6
        y_plus, _ = bn.batch_norm_forward(x + e.reshape(x.shape), gamma)
        y_minus, _ = bn.batch_norm_forward(x - e.reshape(x.shape), gamma)
        jac_fd[:, j] = (y_plus - y_minus).ravel() / 2e-6
    xhat = ((x - ctx.mean) * ctx.invstd).ravel()
    s = ctx.invstd[0]
    jac = gamma[0] * s / m * (m * np.eye(m) - 1 - np.outer(xhat, xhat))  # (2.5)
    np.testing.assert_allclose(jac_fd, jac, rtol=1e-6, atol=1e-8)

    sample = np.repeat(np.arange(3), 2)  # sample index of each flattened position
    cross = sample[:, None] != sample[None, :]
    assert np.all(np.abs(jac_fd[cross]) > 1e-3)  # other samples' inputs move y
    np.testing.assert_allclose(jac.sum(axis=1), 0.0, atol=1e-12)  # shifts are removed
    ratio = EPS / (ctx.var[0] + EPS)
    np.testing.assert_allclose(jac @ xhat, gamma[0] * s * ratio * xhat, atol=1e-12)


def test_input_gradient_has_zero_sum_and_tiny_component_along_xhat():
    r = rng(8)
    x, g = r.normal(size=(20, 3)), r.normal(size=(20, 3))
    gamma = r.normal(size=3)
    _, ctx = bn.batch_norm_forward(x, gamma)
    dx, dgamma, _ = bn.batch_norm_backward(g, ctx)
    xhat = (x - ctx.mean) * ctx.invstd
    np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-12)  # (2.7)
    expected = gamma * ctx.invstd * EPS / (ctx.var + EPS) * dgamma
    np.testing.assert_allclose((dx * xhat).sum(axis=0), expected, rtol=1e-6, atol=1e-14)


# --- behaviour.rst: batch size ------------------------------------------------


@pytest.mark.parametrize("m", [4, 16, 64])
def test_variance_of_the_batch_mean_is_sigma_squared_over_m(m):
    sigma2, trials = 2.5, 20_000
    x = rng(m).normal(1.0, np.sqrt(sigma2), size=(m, trials))
    _, ctx = bn.batch_norm_forward(x)
    # (2.8); the estimate's relative standard error is sqrt(2/trials) = 1 %.
    np.testing.assert_allclose(ctx.mean.var(), sigma2 / m, rtol=0.05)
    # (2.9) for normal data; relative standard error about 2 %.
    np.testing.assert_allclose(ctx.var.var(), 2 * (m - 1) / m**2 * sigma2**2, rtol=0.1)


def test_larger_batches_give_less_noisy_statistics():
    trials = 5_000
    spreads = []
    for m in (8, 32, 128):
        _, ctx = bn.batch_norm_forward(rng(m).normal(size=(m, trials)))
        spreads.append(ctx.mean.std())
    assert spreads[0] > 1.8 * spreads[1] > 1.8 * 1.8 * spreads[2]  # ~ 1/sqrt(m): 2x


# --- numerics.rst --------------------------------------------------------------


def test_two_pass_variance_survives_a_large_mean_where_the_naive_formula_fails():
    x = (1e4 + rng(9).normal(size=(4096, 2))).astype(np.float32)
    exact = x.astype(np.float64).var(axis=0)
    naive = np.mean(x * x, axis=0) - np.mean(x, axis=0) ** 2  # (3.1)
    assert np.all(np.abs(naive - exact) > 0.5 * exact)
    _, ctx = bn.batch_norm_forward(x)
    assert ctx.var.dtype == np.float32
    np.testing.assert_allclose(ctx.var, exact, rtol=1e-5)


def test_welford_and_chan_merge_equal_the_two_pass_variance():
    data = 1e6 + rng(10).normal(size=999)

    def welford(values):  # (3.3)
        n, mean, m2 = 0, 0.0, 0.0
        for v in values:
            n += 1
            delta = v - mean
            mean += delta / n
            m2 += delta * (v - mean)
        return n, mean, m2

    def chan(a, b):  # (3.4)
        (na, mean_a, m2_a), (nb, mean_b, m2_b) = a, b
        n = na + nb
        delta = mean_b - mean_a
        return n, mean_a + delta * nb / n, m2_a + m2_b + delta**2 * na * nb / n

    _, ctx = bn.batch_norm_forward(data[:, None])
    for n, mean, m2 in [welford(data), chan(welford(data[:123]), welford(data[123:]))]:
        assert n == ctx.count
        np.testing.assert_allclose(mean, ctx.mean[0], rtol=1e-14)
        np.testing.assert_allclose(m2 / n, ctx.var[0], rtol=1e-8)


def test_float16_statistics_are_accumulated_in_float32():
    total = np.float16(0)
    for _ in range(4096):
        total = total + np.float16(1)
    assert total == 2048  # a float16 running sum stalls
    x16 = rng(11).normal(3.0, 1.0, size=(64, 32, 32, 2)).astype(np.float16)
    y, ctx = bn.batch_norm_forward(x16)
    assert y.dtype == np.float16
    assert ctx.mean.dtype == np.float32
    exact = x16.astype(np.float64)
    np.testing.assert_allclose(ctx.mean, exact.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(ctx.var, exact.var(axis=(0, 1, 2)), rtol=1e-4)


def test_eps_keeps_a_constant_channel_finite_and_bounds_the_gain():
    y, ctx = bn.batch_norm_forward(np.full((8, 2), 3.0), eps=EPS)
    assert np.all(y == 0.0)
    np.testing.assert_allclose(ctx.invstd, 1 / np.sqrt(EPS))
    dx, _, _ = bn.batch_norm_backward(rng(12).normal(size=(8, 2)), ctx)
    assert np.all(np.isfinite(dx))
