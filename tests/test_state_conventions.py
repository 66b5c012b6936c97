"""State dicts under PyTorch's, Keras's and Flax's names: same values, other keys."""

from __future__ import annotations

import numpy as np
import pytest
from checks import assert_close

import bnarray as bn

NAMES = {
    "torch": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
    "keras": ["gamma", "beta", "moving_mean", "moving_variance"],
    "flax": ["scale", "bias", "mean", "var"],
}


def make_layer(backend, **kwargs):
    kwargs.setdefault("dtype", backend.xp.float64)
    return bn.BatchNorm(3, xp=backend.lib, device=backend.device, **kwargs)


def values(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 1.5, 3), rng.normal(size=3), rng.normal(size=3),
            rng.uniform(0.5, 2.0, 3)]  # fmt: skip


@pytest.mark.parametrize("convention", ["torch", "keras", "flax"])
def test_round_trip_between_conventions(backend, convention):
    source = make_layer(backend)
    source.load_state_dict(dict(zip(NAMES["torch"], [*values(), 12], strict=True)))
    state = source.state_dict(convention=convention)
    assert list(state) == NAMES[convention]
    target = make_layer(backend)
    target.load_state_dict(state, convention=convention)
    for name, expected in zip(
        ["weight", "bias", "running_mean", "running_var"], values(), strict=False
    ):
        assert_close(backend, getattr(target, name), expected, like=target.weight)
    assert target.num_batches_tracked == (12 if convention == "torch" else 0)


def test_keras_and_flax_loads_keep_the_count(backend):
    layer = make_layer(backend)
    layer.load_state_dict({"num_batches_tracked": 5}, strict=False)
    layer.load_state_dict(
        dict(zip(NAMES["keras"], values(), strict=True)), convention="keras"
    )
    assert layer.num_batches_tracked == 5
    layer.load_state_dict(
        dict(zip(NAMES["flax"], values(1), strict=True)), convention="flax"
    )
    assert layer.num_batches_tracked == 5
    assert_close(backend, layer.running_var, values(1)[3], like=layer.weight)


@pytest.mark.skip_backend(
    "array_api_strict_device1",
    reason="NumPy cannot read arrays on array_api_strict's second device",
)
def test_state_dict_in_another_library_and_convention(backend):
    layer = make_layer(backend)
    state = layer.state_dict(convention="flax", xp=np)
    assert list(state) == NAMES["flax"]
    assert all(isinstance(v, np.ndarray) for v in state.values())


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({"affine": False}, ["moving_mean", "moving_variance"]),
        ({"track_running_stats": False}, ["gamma", "beta"]),
    ],
)
def test_keras_keys_follow_the_layer(backend, kwargs, keys):
    layer = make_layer(backend, **kwargs)
    assert list(layer.state_dict(convention="keras")) == keys


def test_failed_load_changes_nothing(backend):
    layer = make_layer(backend)
    before = {k: backend.to_numpy(v).copy() for k, v in layer.state_dict().items()}
    bad = dict(zip(NAMES["keras"], values(), strict=True))
    bad["moving_variance"] = np.ones(4)
    with pytest.raises(ValueError, match="moving_variance"):
        layer.load_state_dict(bad, convention="keras")
    after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
