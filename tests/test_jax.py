"""JAX: jax.grad through the forward equals the explicit backward; everything runs under jit."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from cases import make_params
from checks import assert_like

import bnarray as bn

jax = pytest.importorskip("jax")
jnp = jax.numpy

# Without x64, JAX silently turns float64 into float32 and these tolerances fail.
jax.config.update("jax_enable_x64", True)

LAYOUTS = [((16, 3), -1), ((5, 3, 4, 4), 1), ((4, 5, 6, 3), -1), ((4, 3, 5, 2), (1, 3))]


def arrays(shape, axis, *, seed=0, dtype=np.float64):
    x, w, b, rm, rv = make_params(shape, axis, seed=seed)
    dy = np.random.default_rng(seed + 100).normal(size=shape)
    return [jnp.asarray(a, dtype=dtype) for a in (x, w, b, rm, rv, dy)]


def assert_jax_close(actual, expected, *, like, tol=1e-12):
    assert_like(actual, like)
    scale = max(1.0, float(np.abs(np.asarray(expected)).max()))
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol * scale
    )


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_jax_grad_through_forward_equals_explicit_backward(shape, axis, training):
    x, w, b, rm, rv, dy = arrays(shape, axis)
    kwargs = {} if training else {"running_mean": rm, "running_var": rv}

    def loss(x, w, b):
        y, _ = bn.batch_norm_forward(x, w, b, axis=axis, training=training, **kwargs)
        return jnp.sum(y * dy)

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    _, ctx = bn.batch_norm_forward(x, w, b, axis=axis, training=training, **kwargs)
    explicit = bn.batch_norm_backward(dy, ctx)
    for got, want, like in zip(explicit, grads, (x, w, b), strict=True):
        assert_jax_close(got, want, like=like, tol=1e-12)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_under_jit_equal_the_reference(shape, axis, training):
    x, w, b, rm, rv, dy = arrays(shape, axis, seed=1)
    kwargs = {} if training else {"running_mean": rm, "running_var": rv}

    @jax.jit
    def step(x, w, b, dy):
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis, training=training, **kwargs)
        return (y, ctx.mean, ctx.var, *bn.batch_norm_backward(dy, ctx))

    y, mean, var, dx, dw, db = step(x, w, b, dy)
    np_args = [np.asarray(a) for a in (x, w, b, rm, rv, dy)]
    ref_kwargs = {"running_mean": np_args[3], "running_var": np_args[4]}
    y_ref, mean_ref, var_ref = reference.forward(
        *np_args[:3], axis=axis, training=training, **ref_kwargs
    )
    grads_ref = reference.backward(
        np_args[5], np_args[0], np_args[1], axis=axis, training=training, **ref_kwargs
    )
    assert_jax_close(y, y_ref, like=x)
    assert_jax_close(mean, mean_ref, like=x)
    assert_jax_close(var, var_ref, like=x)
    for got, want in zip((dx, dw, db), grads_ref, strict=True):
        assert_jax_close(got, want, like=x, tol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_under_jit(momentum):
    rm = jnp.zeros(3, dtype=jnp.float64)
    rv = jnp.ones(3, dtype=jnp.float64)
    rm_ref, rv_ref = np.zeros(3), np.ones(3)

    @jax.jit
    def train_step(rm, rv, x, n):
        _, ctx = bn.batch_norm_forward(x, axis=1)
        # `num_batches_tracked` is a Python int: pass it as a static argument.
        return bn.update_running_stats(
            rm, rv, ctx, momentum=momentum, num_batches_tracked=n
        )

    train_step = jax.jit(train_step.__wrapped__, static_argnums=3)
    for n in range(1, 4):
        x = np.random.default_rng(n).normal(n, 2.0, size=(6, 3, 4))
        rm, rv = train_step(rm, rv, jnp.asarray(x), n)
        rm_ref, rv_ref = reference.update_running_stats(
            rm_ref, rv_ref, x, axis=1, momentum=momentum, num_batches_tracked=n
        )
    assert_jax_close(rm, rm_ref, like=rm)
    assert_jax_close(rv, rv_ref, like=rv)


def test_jit_of_grad_of_a_loss_through_batch_norm():
    x, w, b, _, _, dy = arrays((8, 4, 3), 1, seed=2)

    def loss(w, b, x):
        y, _ = bn.batch_norm_forward(x, w, b, axis=1)
        return jnp.sum(jnp.tanh(y) * dy)

    grad_w, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, b, x)
    y, ctx = bn.batch_norm_forward(x, w, b, axis=1)
    _, dw, db = bn.batch_norm_backward(dy * (1 - jnp.tanh(y) ** 2), ctx)
    assert_jax_close(grad_w, dw, like=w, tol=1e-10)
    assert_jax_close(grad_b, db, like=b, tol=1e-10)


def test_layer_with_jax_arrays_trains_like_the_numpy_layer():
    layer = bn.BatchNorm(3, axis=1, xp=jnp, momentum=0.2)
    layer_np = bn.BatchNorm(3, axis=1, xp=np, momentum=0.2)
    assert layer.weight.dtype == jnp.float64
    for step in range(3):
        x = np.random.default_rng(step).normal(step, 2.0, size=(5, 3, 4))
        dy = np.random.default_rng(step + 10).normal(size=x.shape)
        y = layer(jnp.asarray(x))
        dx = layer.backward(jnp.asarray(dy))
        y_np = layer_np(x)
        dx_np = layer_np.backward(dy)
        assert_jax_close(y, y_np, like=y)
        assert_jax_close(dx, dx_np, like=y, tol=1e-10)
    assert_jax_close(layer.running_mean, layer_np.running_mean, like=layer.weight)
    assert_jax_close(layer.running_var, layer_np.running_var, like=layer.weight)
    assert_jax_close(
        layer.grad_weight, layer_np.grad_weight, like=layer.weight, tol=1e-10
    )
    assert layer.num_batches_tracked == 3
    layer.eval()
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 3, 4)))
    assert_jax_close(layer(x), layer_np.eval()(np.asarray(x)), like=x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_lower_precision_keeps_the_input_dtype(dtype):
    x, w, b, *_ = arrays((64, 3), -1, seed=3)
    x_low = x.astype(getattr(jnp, dtype))

    @jax.jit
    def forward(x):
        y, ctx = bn.batch_norm_forward(x, w, b)
        return y, ctx.mean

    y, mean = forward(x_low)
    assert y.dtype == x_low.dtype
    assert mean.dtype == jnp.float32
    y_ref, _, _ = reference.forward(np.asarray(x_low.astype(jnp.float64)), w, b)
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(
        np.asarray(y.astype(jnp.float64)), y_ref, rtol=tol, atol=tol
    )


def test_mixing_numpy_and_jax_is_a_type_error():
    x, w, *_ = arrays((6, 3), -1)
    with pytest.raises(
        TypeError, match=r"`weight` is a numpy array but `x` is a jax(lib)? array"
    ):
        bn.batch_norm_forward(x, np.asarray(w))
    with pytest.raises(
        TypeError, match=r"`bias` is a jax(lib)? array but `x` is a numpy array"
    ):
        bn.batch_norm_forward(np.asarray(x), None, w)


def two_devices():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip(
            "JAX has one device; set XLA_FLAGS=--xla_force_host_platform_device_count=2 "
            "(as `nox -s tests-jax` does)"
        )
    return devices[:2]


def test_arrays_on_two_devices_are_a_device_error():
    dev0, dev1 = two_devices()
    x, w, _, _, _, dy = arrays((6, 3), -1)
    x0, w1 = jax.device_put(x, dev0), jax.device_put(w, dev1)
    with pytest.raises(
        ValueError, match=r"`weight` is on device .* but `x` is on device"
    ):
        bn.batch_norm_forward(x0, w1)
    _, ctx = bn.batch_norm_forward(x0)
    with pytest.raises(ValueError, match="`dy`"):
        bn.batch_norm_backward(jax.device_put(dy, dev1), ctx)


def test_results_stay_on_the_second_device_under_jit():
    _, dev1 = two_devices()
    x, w, b, _, _, dy = (jax.device_put(a, dev1) for a in arrays((6, 3), -1))

    @jax.jit
    def step(x, w, b, dy):
        _, ctx = bn.batch_norm_forward(x, w, b)
        return bn.batch_norm_backward(dy, ctx)

    for out in step(x, w, b, dy):
        assert out.devices() == {dev1}


def assert_same_context(ctx, expected, *, tol=1e-12):
    assert isinstance(ctx, bn.BatchNormContext)
    assert (ctx.count, ctx.axis, ctx.training, ctx.eps) == (
        expected.count,
        expected.axis,
        expected.training,
        expected.eps,
    )
    for name in ["x", "weight", "mean", "var", "invstd"]:
        got, want = getattr(ctx, name), getattr(expected, name)
        if want is None:
            assert got is None, name
        else:
            assert_jax_close(got, want, like=want, tol=tol)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_jit_of_a_training_step_returning_the_context_equals_eager(
    shape, axis, momentum
):
    x, w, b, rm, rv, dy = arrays(shape, axis, seed=3)

    def step(x, w, b, rm, rv, dy):
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis)
        grads = bn.batch_norm_backward(dy, ctx)
        stats = bn.update_running_stats(
            rm, rv, ctx, momentum=momentum, num_batches_tracked=2
        )
        return y, ctx, grads, stats

    y, ctx, grads, stats = jax.jit(step)(x, w, b, rm, rv, dy)
    y_eager, ctx_eager, grads_eager, stats_eager = step(x, w, b, rm, rv, dy)
    assert_jax_close(y, y_eager, like=x)
    assert_same_context(ctx, ctx_eager)
    for got, want in zip((*grads, *stats), (*grads_eager, *stats_eager), strict=True):
        assert_jax_close(got, want, like=want)


@pytest.mark.parametrize("training", [True, False])
def test_context_from_jit_feeds_backward_outside_and_inside_jit(training):
    x, w, b, rm, rv, dy = arrays((6, 3, 4), 1, seed=4)
    kwargs = {} if training else {"running_mean": rm, "running_var": rv}

    @jax.jit
    def forward(x, w, b):
        return bn.batch_norm_forward(x, w, b, axis=1, training=training, **kwargs)

    _, ctx = forward(x, w, b)
    _, ctx_eager = bn.batch_norm_forward(x, w, b, axis=1, training=training, **kwargs)
    assert_same_context(ctx, ctx_eager)
    expected = bn.batch_norm_backward(dy, ctx_eager)
    for grads in (
        bn.batch_norm_backward(dy, ctx),
        jax.jit(bn.batch_norm_backward)(dy, ctx),
    ):
        for got, want in zip(grads, expected, strict=True):
            assert_jax_close(got, want, like=want)
    if training:
        got = bn.update_running_stats(rm, rv, ctx)
        for got_stat, want in zip(
            got, bn.update_running_stats(rm, rv, ctx_eager), strict=True
        ):
            assert_jax_close(got_stat, want, like=want)


def test_context_without_weight_is_a_pytree_with_four_leaves():
    x, *_ = arrays((5, 2), -1)
    _, ctx = bn.batch_norm_forward(x)
    leaves, treedef = jax.tree_util.tree_flatten(ctx)
    assert len(leaves) == 4  # x, mean, var, invstd; weight is None
    doubled = jax.tree_util.tree_map(lambda a: 2 * a, ctx)
    assert isinstance(doubled, bn.BatchNormContext) and doubled.weight is None
    assert_jax_close(doubled.mean, 2 * ctx.mean, like=ctx.mean)
    assert jax.tree_util.tree_unflatten(treedef, leaves).count == ctx.count


@pytest.mark.parametrize(("shape", "axis"), [((6, 3), -1), ((5, 3, 4), 1)])
def test_vmap_over_independent_batches_equals_a_loop(shape, axis):
    batches = 4
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.normal(2.0, 3.0, size=(batches, *shape)))
    dys = jnp.asarray(rng.normal(size=(batches, *shape)))
    _, w, b, rm, rv, _ = arrays(shape, axis, seed=6)

    def step(x, dy):
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis)
        stats = bn.update_running_stats(rm, rv, ctx)
        return y, ctx, bn.batch_norm_backward(dy, ctx), stats

    ys, ctxs, grads, stats = jax.vmap(step)(xs, dys)
    assert isinstance(ctxs, bn.BatchNormContext)
    assert ctxs.mean.shape == (batches, 3)
    # The batched contexts feed a batched backward, too.
    grads_again = jax.vmap(bn.batch_norm_backward)(dys, ctxs)
    for i in range(batches):
        y, ctx, grads_i, stats_i = step(xs[i], dys[i])
        assert_jax_close(ys[i], y, like=y)
        assert_same_context(jax.tree_util.tree_map(lambda a, i=i: a[i], ctxs), ctx)
        for got, again, want in zip(grads, grads_again, grads_i, strict=True):
            assert_jax_close(got[i], want, like=want)
            assert_jax_close(again[i], want, like=want)
        for got, want in zip(stats, stats_i, strict=True):
            assert_jax_close(got[i], want, like=want)


def run_python(code):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_importing_bnarray_does_not_import_jax():
    code = (
        "import sys, numpy as np, bnarray as bn\n"
        "bn.batch_norm_forward(np.ones((3, 2)))\n"
        "print('jax' in sys.modules)\n"
    )
    assert run_python(code).strip() == "False"


def test_context_is_a_pytree_when_jax_comes_first():
    code = (
        "import jax, numpy as np, bnarray as bn\n"
        "_, ctx = bn.batch_norm_forward(np.ones((3, 2)), np.ones(2))\n"
        "print(len(jax.tree_util.tree_leaves(ctx)))\n"
    )
    assert run_python(code).strip() == "5"


def test_context_becomes_a_pytree_when_bnarray_first_meets_jax_arrays_in_threads():
    code = (
        "import numpy as np, bnarray as bn, jax, jax.numpy as jnp\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "_, ctx = bn.batch_norm_forward(np.ones((3, 2)), np.ones(2))\n"
        "print(len(jax.tree_util.tree_leaves(ctx)))\n"
        "x = jnp.asarray(np.arange(6.0).reshape(3, 2))\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    list(pool.map(lambda _: bn.batch_norm_forward(x), range(32)))\n"
        "print(len(jax.tree_util.tree_leaves(ctx)))\n"
    )
    assert run_python(code).split() == ["1", "5"]
