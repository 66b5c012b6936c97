"""BatchNorm.freeze: running statistics in both modes, no update, the inference backward."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import reference
from checks import assert_close

import bnarray as bn


def make_layer(backend, num_features, **kwargs):
    kwargs.setdefault("dtype", backend.xp.float64)
    return bn.BatchNorm(num_features, xp=backend.lib, device=backend.device, **kwargs)


def trained(backend):
    """A layer with non-trivial parameters and statistics, in training mode."""
    rng = np.random.default_rng(0)
    layer = make_layer(backend, 3, axis=1)
    layer.load_state_dict(
        {
            "weight": rng.uniform(0.5, 1.5, 3),
            "bias": rng.normal(size=3),
            "running_mean": rng.normal(size=3),
            "running_var": rng.uniform(0.5, 2.0, 3),
            "num_batches_tracked": 7,
        }
    )
    return layer


def test_frozen_layer_in_training_mode_is_the_inference_pass(backend):
    layer = trained(backend).freeze()
    state = {k: backend.to_numpy(v).copy() for k, v in layer.state_dict().items()}
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(2, 3, 4, 5))  # channels at axis 1
    dy = rng.normal(size=x.shape)
    assert layer.training and layer.frozen
    y = layer(backend.asarray(x))
    dx = layer.backward(backend.asarray(dy))
    y_ref, _, _ = reference.forward(
        x, state["weight"], state["bias"], axis=1, training=False,
        running_mean=state["running_mean"], running_var=state["running_var"],
    )  # fmt: skip
    dx_ref, dw_ref, db_ref = reference.backward(
        dy, x, state["weight"], axis=1, training=False,
        running_mean=state["running_mean"], running_var=state["running_var"],
    )  # fmt: skip
    assert_close(backend, y, y_ref, like=y)
    assert_close(backend, dx, dx_ref, like=dx)
    assert_close(backend, layer.grad_weight, dw_ref, like=layer.weight)
    assert_close(backend, layer.grad_bias, db_ref, like=layer.weight)
    after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    for key, value in state.items():
        np.testing.assert_array_equal(after[key], value)


def test_train_and_eval_do_not_unfreeze(backend):
    layer = trained(backend).freeze()
    assert layer.eval().frozen
    assert layer.train().frozen
    assert layer.train(False).frozen
    assert not layer.unfreeze().frozen
    assert layer.training is False  # unfreeze leaves the mode alone


def test_unfrozen_layer_trains_again(backend):
    layer = trained(backend).freeze()
    x = backend.asarray(np.random.default_rng(2).normal(size=(4, 3, 2)))
    layer(x)
    assert layer.num_batches_tracked == 7
    layer.unfreeze()(x)
    assert layer.num_batches_tracked == 8


def test_frozen_survives_copies_and_pickles(backend):
    layer = trained(backend).freeze()
    for clone in (copy.copy(layer), copy.deepcopy(layer)):
        assert clone.frozen
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.frozen
    restored.unfreeze()
    assert layer.frozen  # the copy's switch is its own
    assert "unbiased" in repr(restored)


def test_frozen_layer_with_sync_does_not_communicate(backend):
    class Refuses:
        def all_gather(self, a):
            raise AssertionError("communicated")

        def all_reduce_sum(self, a):
            raise AssertionError("communicated")

    layer = trained(backend)
    layer.sync = Refuses()
    layer.freeze()
    layer(backend.asarray(np.random.default_rng(3).normal(size=(4, 3))))


def test_old_pickles_load_unfrozen_and_unbiased():
    layer = bn.BatchNorm(2)
    state = layer.__getstate__()
    del state["_frozen"], state["unbiased"]
    restored = bn.BatchNorm.__new__(bn.BatchNorm)
    restored.__setstate__(state)
    assert restored.frozen is False
    assert restored.unbiased is True
