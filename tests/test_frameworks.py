"""Keras 3 and Flax as oracles: the same batches trained for several steps give
the same outputs and running statistics as bnarray with the converted
arguments, and state dicts move between them both ways.

Needs keras (on its PyTorch backend) and flax: `nox -s tests-keras`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import bnarray as bn

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ.get("BNARRAY_REQUIRE_FRAMEWORKS"):  # nox -s tests-keras: never skip
    import flax.nnx as nnx
    import jax
    import keras
    import torch
else:
    keras = pytest.importorskip("keras", reason="needs keras 3 (nox -s tests-keras)")
    nnx = pytest.importorskip("flax.nnx", reason="needs flax (nox -s tests-keras)")
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)

C = 4
STEPS = 5
# Units in the last place of float32 allowed for a whole training run.
ULPS32 = 8 * np.finfo(np.float32).eps


def batches(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(2.0, 3.0, size=(8, 5, C)).astype(dtype) for _ in range(STEPS)]


def start_state(seed=1):
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.uniform(0.5, 1.5, C),
        "bias": rng.normal(size=C),
        "running_mean": rng.normal(size=C),
        "running_var": rng.uniform(0.5, 2.0, C),
    }


def bnarray_layer(dtype, *, eps):
    layer = bn.BatchNorm(C, momentum=1 - 0.99, eps=eps, unbiased=False, dtype=dtype)
    layer.load_state_dict(start_state(), strict=False)
    return layer


def keras_layer(dtype):
    layer = keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, dtype=dtype)
    layer.build((None, 5, C))
    # bnarray -> Keras, by name
    state = bnarray_layer(np.float64, eps=1e-3).state_dict(convention="keras")
    for variable in layer.weights:
        variable.assign(torch.from_numpy(state[variable.name].astype(dtype)))
    return layer


def to_numpy(tensor):
    return tensor.detach().cpu().numpy()


def keras_state(layer):
    return {v.name: to_numpy(v.value) for v in layer.weights}


def test_keras_computes_in_float32_whatever_the_dtype():
    # Why the float64 comparison below has a float32 tolerance: Keras 3 promotes
    # float64 with float32 to float32, and its BatchNormalization computes in
    # result_type(input dtype, "float32").
    assert keras.backend.result_type("float64", "float32") == "float32"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keras_training_steps(dtype):
    k = keras_layer(np.dtype(dtype).name)
    # Keras computes in float32 (see above): so does the bnarray layer here,
    # on the same float32 inputs.
    layer = bnarray_layer(np.float32, eps=1e-3)
    for x in batches(dtype):
        y_keras = to_numpy(k(torch.from_numpy(x), training=True))
        y = layer(x.astype(np.float32))
        state = keras_state(k)
        np.testing.assert_allclose(y_keras, y, rtol=ULPS32, atol=ULPS32)
        np.testing.assert_allclose(
            state["moving_mean"], layer.running_mean, rtol=ULPS32, atol=ULPS32
        )
        np.testing.assert_allclose(
            state["moving_variance"], layer.running_var, rtol=ULPS32
        )
    # inference after training, and the state moved Keras -> bnarray
    x = batches(dtype, seed=9)[0]
    moved = bn.BatchNorm(C, eps=1e-3, dtype=np.float64)
    moved.load_state_dict(keras_state(k), convention="keras")
    y_keras = to_numpy(k(torch.from_numpy(x), training=False))
    np.testing.assert_allclose(
        y_keras, moved.eval()(x.astype(np.float64)), rtol=ULPS32, atol=ULPS32
    )


def flax_layer(dtype):
    layer = nnx.BatchNorm(
        C, momentum=0.99, epsilon=1e-5, use_running_average=False, dtype=dtype,
        param_dtype=dtype, use_fast_variance=False, rngs=nnx.Rngs(0),
    )  # fmt: skip
    # bnarray -> Flax. Flax creates batch_stats in float32 whatever the dtype:
    # they are replaced with arrays of `dtype`.
    state = bnarray_layer(np.float64, eps=1e-5).state_dict(convention="flax")
    layer.scale = nnx.Param(jnp.asarray(state["scale"], dtype))
    layer.bias = nnx.Param(jnp.asarray(state["bias"], dtype))
    layer.mean = nnx.BatchStat(jnp.asarray(state["mean"], dtype))
    layer.var = nnx.BatchStat(jnp.asarray(state["var"], dtype))
    return layer


def flax_state(layer):
    return {
        name: np.asarray(getattr(layer, name)[...])
        for name in ("scale", "bias", "mean", "var")
    }


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-12), (np.float32, ULPS32)])
def test_flax_training_steps(dtype, tol):
    f = flax_layer(dtype)
    layer = bnarray_layer(dtype, eps=1e-5)
    for x in batches(dtype):
        y_flax = np.asarray(f(jnp.asarray(x)))
        y = layer(x)
        state = flax_state(f)
        assert y_flax.dtype == y.dtype == state["var"].dtype == dtype
        np.testing.assert_allclose(y_flax, y, rtol=tol, atol=tol)
        np.testing.assert_allclose(
            state["mean"], layer.running_mean, rtol=tol, atol=tol
        )
        np.testing.assert_allclose(state["var"], layer.running_var, rtol=tol)
    # inference, and the state moved Flax -> bnarray
    x = batches(dtype, seed=9)[0]
    moved = bn.BatchNorm(C, dtype=dtype)
    moved.load_state_dict(flax_state(f), convention="flax")
    y_flax = np.asarray(f(jnp.asarray(x), use_running_average=True))
    np.testing.assert_allclose(y_flax, moved.eval()(x), rtol=tol, atol=tol)


def test_unbiased_default_does_not_match_flax():
    # The oracle can fail: with PyTorch's unbiased running variance the
    # statistics drift away from Flax's.
    f = flax_layer(np.float64)
    layer = bnarray_layer(np.float64, eps=1e-5)
    layer.unbiased = True
    for x in batches(np.float64):
        f(jnp.asarray(x))
        layer(x)
    assert np.max(np.abs(flax_state(f)["var"] - layer.running_var)) > 1e-4
