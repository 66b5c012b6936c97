"""The BatchNorm layer: parameters, modes, running statistics, state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from checks import assert_close

import bnarray as bn


def make_layer(backend, num_features, **kwargs):
    # float64 parameters, so the float64 reference applies (torch and JAX default to float32)
    kwargs.setdefault("dtype", backend.xp.float64)
    return bn.BatchNorm(num_features, xp=backend.lib, device=backend.device, **kwargs)


def snapshot(backend, layer):
    state = {k: backend.to_numpy(v).copy() for k, v in layer.state_dict().items()}
    return state, layer.training


def test_initial_state_is_identity_transform(backend):
    layer = make_layer(backend, 3, axis=1)
    for name, value in [
        ("weight", 1.0),
        ("bias", 0.0),
        ("running_mean", 0.0),
        ("running_var", 1.0),
    ]:
        assert_close(
            backend,
            getattr(layer, name),
            np.full(3, value),
            like=backend.asarray(np.zeros(1)),
        )
    assert layer.num_batches_tracked == 0
    assert layer.training is True
    assert layer.grad_weight is None and layer.grad_bias is None


def test_training_call_normalizes_and_updates_running_stats(backend):
    rng = np.random.default_rng(0)
    layer = make_layer(backend, 4, axis=1, momentum=0.2)
    batches = [rng.normal(2.0, 3.0, size=(6, 4, 3)) for _ in range(3)]
    mean_ref, var_ref = np.zeros(4), np.ones(4)
    for batch in batches:
        y = layer(backend.asarray(batch))
        y_ref, _, _ = reference.forward(batch, axis=1)
        assert_close(backend, y, y_ref, like=backend.asarray(batch))
        mean_ref, var_ref = reference.update_running_stats(
            mean_ref, var_ref, batch, axis=1, momentum=0.2
        )
    assert layer.num_batches_tracked == 3
    np.testing.assert_allclose(
        backend.to_numpy(layer.running_mean), mean_ref, rtol=1e-12
    )
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), var_ref, rtol=1e-12)


def test_momentum_none_gives_the_cumulative_average(backend):
    rng = np.random.default_rng(1)
    layer = make_layer(backend, 2, momentum=None)
    batches = [rng.normal(i, 1.0, size=(8, 2)) for i in range(5)]
    for batch in batches:
        layer(backend.asarray(batch))
    expected = np.mean([b.mean(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(
        backend.to_numpy(layer.running_mean), expected, rtol=1e-12
    )


def test_eval_uses_running_stats_and_changes_nothing(backend):
    rng = np.random.default_rng(2)
    layer = make_layer(backend, 3)
    layer(backend.asarray(rng.normal(size=(10, 3))))
    layer.eval()
    before = snapshot(backend, layer)
    x = rng.normal(5.0, 2.0, size=(4, 3))
    y = layer(backend.asarray(x))
    rm, rv = backend.to_numpy(layer.running_mean), backend.to_numpy(layer.running_var)
    y_ref, _, _ = reference.forward(x, training=False, running_mean=rm, running_var=rv)
    assert_close(backend, y, y_ref, like=backend.asarray(x))
    after = snapshot(backend, layer)
    assert before[1] == after[1] is False
    for key in before[0]:
        np.testing.assert_array_equal(before[0][key], after[0][key])


def test_eval_accepts_a_batch_of_one_and_training_refuses_it(backend):
    layer = make_layer(backend, 3)
    one = backend.asarray(np.ones((1, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(one)
    assert layer.num_batches_tracked == 0
    layer.eval()
    y = layer(one)
    assert tuple(y.shape) == (1, 3)


def test_train_and_eval_switch_modes(backend):
    layer = make_layer(backend, 2)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False).training is False


def test_without_running_stats_batch_stats_are_used_in_eval(backend):
    layer = make_layer(backend, 2, track_running_stats=False)
    assert layer.running_mean is None and layer.running_var is None
    x = np.random.default_rng(3).normal(4.0, 2.0, size=(9, 2))
    y = layer.eval()(backend.asarray(x))
    y_ref, _, _ = reference.forward(x)
    assert_close(backend, y, y_ref, like=backend.asarray(x))
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_without_affine_there_are_no_parameters(backend):
    layer = make_layer(backend, 2, affine=False)
    assert layer.weight is None and layer.bias is None
    x = backend.asarray(np.random.default_rng(4).normal(size=(5, 2)))
    y = layer(x)
    dx = layer.backward(backend.asarray(np.ones((5, 2))))
    assert tuple(dx.shape) == tuple(y.shape)
    assert layer.grad_weight is None and layer.grad_bias is None
    assert set(layer.state_dict()) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }


def test_backward_matches_the_functional_gradients(backend):
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 3, 4))
    layer = make_layer(backend, 3, axis=1)
    layer(backend.asarray(x))
    dx = layer.backward(backend.asarray(dy))
    dx_ref, dw_ref, db_ref = reference.backward(dy, x, np.ones(3), axis=1)
    like = backend.asarray(x)
    assert_close(backend, dx, dx_ref, like=like, rtol=1e-10, atol=1e-10)
    assert_close(backend, layer.grad_weight, dw_ref, like=like, rtol=1e-10, atol=1e-10)
    assert_close(backend, layer.grad_bias, db_ref, like=like, rtol=1e-10, atol=1e-10)


def test_backward_before_forward_is_an_error(backend):
    with pytest.raises(RuntimeError, match="forward"):
        make_layer(backend, 2).backward(backend.asarray(np.ones((3, 2))))


def test_state_dict_round_trip_gives_the_same_eval_outputs(backend):
    rng = np.random.default_rng(6)
    layer = make_layer(backend, 3, axis=1)
    for _ in range(3):
        layer(backend.asarray(rng.normal(1.0, 2.0, size=(8, 3, 2))))
    state = layer.state_dict()
    assert set(state) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert int(backend.to_numpy(state["num_batches_tracked"])) == 3
    clone = make_layer(backend, 3, axis=1)
    clone.load_state_dict(state)
    assert clone.num_batches_tracked == 3
    x = backend.asarray(rng.normal(size=(2, 3, 2)))
    np.testing.assert_array_equal(
        backend.to_numpy(layer.eval()(x)), backend.to_numpy(clone.eval()(x))
    )


def test_load_state_dict_converts_numpy_values(backend):
    # What a PyTorch state dict looks like after `.numpy()`: float32 arrays, int64 count.
    state = {
        "weight": np.array([2.0, 0.5], np.float32),
        "bias": np.array([1.0, -1.0], np.float32),
        "running_mean": np.array([3.0, -3.0], np.float32),
        "running_var": np.array([4.0, 0.25], np.float32),
        "num_batches_tracked": np.array(7, np.int64),
    }
    layer = make_layer(backend, 2)
    layer.load_state_dict(state)
    assert layer.num_batches_tracked == 7
    x = np.array([[3.0, -3.0], [5.0, -2.5]])
    y = layer.eval()(backend.asarray(x))
    y_ref, _, _ = reference.forward(
        x,
        state["weight"],
        state["bias"],
        training=False,
        running_mean=state["running_mean"],
        running_var=state["running_var"],
    )
    assert_close(backend, y, y_ref, like=backend.asarray(x), rtol=1e-6)
    state["weight"][0] = 100.0  # the layer holds a copy
    assert float(backend.to_numpy(layer.weight)[0]) == 2.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("running_var"), "missing keys"),
        (lambda s: s.update(extra=np.zeros(2)), "unexpected keys"),
        (lambda s: s.update(running_var=np.ones(3)), "running_var"),
    ],
)
def test_rejected_state_dict_changes_nothing(backend, change, match):
    layer = make_layer(backend, 2)
    layer(backend.asarray(np.random.default_rng(7).normal(size=(4, 2))))
    before = snapshot(backend, layer)
    state = {k: backend.to_numpy(v) * 2 for k, v in layer.state_dict().items()}
    change(state)
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    after = snapshot(backend, layer)
    for key in before[0]:
        np.testing.assert_array_equal(before[0][key], after[0][key])


def test_non_strict_load_takes_the_keys_present(backend):
    layer = make_layer(backend, 2)
    layer.load_state_dict({"running_mean": np.array([1.0, 2.0])}, strict=False)
    np.testing.assert_array_equal(backend.to_numpy(layer.running_mean), [1.0, 2.0])
    np.testing.assert_array_equal(backend.to_numpy(layer.running_var), [1.0, 1.0])


def test_failed_call_leaves_the_layer_unchanged(backend):
    layer = make_layer(backend, 3)
    layer(backend.asarray(np.random.default_rng(8).normal(size=(4, 3))))
    before = snapshot(backend, layer)
    with pytest.raises(ValueError, match="`x`"):
        layer(backend.asarray(np.ones((4, 5))))  # wrong number of features
    with pytest.raises(ValueError, match="value per channel"):
        layer(backend.asarray(np.ones((1, 3))))
    after = snapshot(backend, layer)
    assert layer.num_batches_tracked == 1
    for key in before[0]:
        np.testing.assert_array_equal(before[0][key], after[0][key])


def test_tuple_axis_layer(backend):
    layer = make_layer(backend, (3, 2), axis=(1, 3))
    x = np.random.default_rng(9).normal(size=(4, 3, 5, 2))
    y = layer(backend.asarray(x))
    y_ref, _, _ = reference.forward(x, axis=(1, 3))
    assert_close(backend, y, y_ref, like=backend.asarray(x))
    assert tuple(layer.running_mean.shape) == (3, 2)


def test_dtype_argument_sets_parameter_dtype(backend):
    layer = make_layer(backend, 2, dtype=backend.xp.float32)
    assert layer.weight.dtype == backend.xp.float32
    y = layer(backend.asarray(np.random.default_rng(1).normal(size=(3, 2))))
    assert y.dtype == backend.xp.float64  # the input's dtype wins for outputs


def test_repr_names_the_configuration():
    assert repr(bn.BatchNorm(4, axis=1, momentum=None)) == (
        "BatchNorm(4, axis=1, eps=1e-05, momentum=None, affine=True, track_running_stats=True, "
        "unbiased=True)"
    )


def trained_layer(backend, *, seed=10):
    """A layer after two training steps and a backward, switched to eval mode."""
    rng = np.random.default_rng(seed)
    layer = make_layer(backend, 3, axis=1, momentum=None)
    for _ in range(2):
        x = backend.asarray(rng.normal(1.0, 2.0, size=(5, 3, 2)))
        layer(x)
    layer.backward(backend.asarray(rng.normal(size=(5, 3, 2))))
    return layer.eval()


def assert_same_state(backend, copied, layer):
    assert type(copied) is bn.BatchNorm and copied is not layer
    assert copied.training is layer.training
    assert copied.num_batches_tracked == layer.num_batches_tracked
    assert (copied.axis, copied.eps, copied.momentum) == (
        layer.axis,
        layer.eps,
        layer.momentum,
    )
    like = layer.weight
    for name in ["weight", "bias", "running_mean", "running_var"]:
        expected = backend.to_numpy(getattr(layer, name))
        assert_close(
            backend, getattr(copied, name), expected, like=like, rtol=0, atol=0
        )
    for name in ["grad_weight", "grad_bias"]:
        expected = backend.to_numpy(getattr(layer, name))
        assert_close(
            backend, getattr(copied, name), expected, like=like, rtol=0, atol=0
        )


def test_deepcopy_keeps_the_state_and_the_forward_for_backward(backend):
    import copy

    layer = trained_layer(backend)
    clone = copy.deepcopy(layer)
    assert_same_state(backend, clone, layer)
    dy = backend.asarray(np.random.default_rng(11).normal(size=(5, 3, 2)))
    np.testing.assert_array_equal(
        backend.to_numpy(clone.backward(dy)), backend.to_numpy(layer.backward(dy))
    )
    # The copy is independent: training it leaves the original as it was.
    before = snapshot(backend, layer)
    clone.train()(backend.asarray(np.ones((4, 3, 2)) * np.arange(4)[:, None, None]))
    assert clone.num_batches_tracked == 3 and layer.num_batches_tracked == 2
    after = snapshot(backend, layer)
    assert after[1] is before[1] is False
    for key in before[0]:
        np.testing.assert_array_equal(before[0][key], after[0][key])


def test_shallow_copy_keeps_the_forward_for_backward(backend):
    import copy

    layer = trained_layer(backend)
    clone = copy.copy(layer)
    assert_same_state(backend, clone, layer)
    dy = backend.asarray(np.ones((5, 3, 2)))
    np.testing.assert_array_equal(
        backend.to_numpy(clone.backward(dy)), backend.to_numpy(layer.backward(dy))
    )
    clone.train()
    assert layer.training is False


@pytest.mark.skip_backend(
    "jax_cpu1", reason="JAX unpickles its arrays onto the default device"
)
def test_pickle_round_trip_keeps_the_state_but_not_the_last_input(backend):
    import pickle

    layer = trained_layer(backend)
    restored = pickle.loads(pickle.dumps(layer))
    assert_same_state(backend, restored, layer)
    dy = backend.asarray(np.ones((5, 3, 2)))
    with pytest.raises(RuntimeError, match="forward"):
        restored.backward(dy)
    x = np.random.default_rng(12).normal(size=(5, 3, 2))
    y, y_restored = layer(backend.asarray(x)), restored(backend.asarray(x))
    np.testing.assert_array_equal(backend.to_numpy(y_restored), backend.to_numpy(y))
    np.testing.assert_array_equal(
        backend.to_numpy(restored.backward(dy)), backend.to_numpy(layer.backward(dy))
    )
    restored.train()(backend.asarray(x))
    assert restored.num_batches_tracked == 3


def test_pickle_of_a_fresh_layer_without_arrays(backend):
    import pickle

    layer = make_layer(backend, 2, affine=False, track_running_stats=False)
    restored = pickle.loads(pickle.dumps(layer))
    x = np.random.default_rng(13).normal(size=(6, 2))
    y_ref, _, _ = reference.forward(x)
    assert_close(backend, restored(backend.asarray(x)), y_ref, like=backend.asarray(x))
    assert repr(restored) == repr(layer)


@pytest.mark.parametrize(
    "value", [np.bool_(False), np.bool_(True), False, True], ids=repr
)
def test_numpy_bools_are_flags(backend, value):
    layer = make_layer(backend, 2, affine=value, track_running_stats=value)
    assert layer.affine is bool(value) and layer.track_running_stats is bool(value)
    assert layer.train(value).training is bool(value)
    assert layer.train(not value).train(mode=value).training is bool(value)


def test_training_flag_takes_a_numpy_bool(backend):
    rng = np.random.default_rng(15)
    x = backend.asarray(rng.normal(size=(6, 2)))
    stats = {
        "running_mean": backend.asarray(rng.normal(size=2)),
        "running_var": backend.asarray(rng.uniform(0.5, 2.0, size=2)),
    }
    for flag, kwargs in [(np.bool_(True), {}), (np.bool_(False), stats)]:
        y, ctx = bn.batch_norm_forward(x, training=flag, **kwargs)
        y_ref, _ = bn.batch_norm_forward(x, training=bool(flag), **kwargs)
        assert ctx.training is bool(flag)
        np.testing.assert_array_equal(backend.to_numpy(y), backend.to_numpy(y_ref))


@pytest.mark.parametrize(
    "count",
    [7, np.int64(7), np.array(7), np.array(7, dtype=np.int32), np.uint8(7)],
    ids=repr,
)
def test_load_state_dict_takes_integer_counts_of_any_kind(backend, count):
    layer = make_layer(backend, 2)
    layer.load_state_dict({"num_batches_tracked": count}, strict=False)
    assert layer.num_batches_tracked == 7
    assert type(layer.num_batches_tracked) is int
    layer.load_state_dict({"num_batches_tracked": backend.asarray(count)}, strict=False)
    assert layer.num_batches_tracked == 7


@pytest.mark.skip_backend(
    "array_api_strict_device1",
    reason="NumPy cannot read arrays on array_api_strict's second device",
)
def test_state_dict_in_another_library(backend):
    layer = trained_layer(backend)
    own = layer.state_dict()
    as_numpy = layer.state_dict(xp=np)
    assert list(as_numpy) == list(own)
    for key, value in as_numpy.items():
        assert type(value) is np.ndarray
        np.testing.assert_array_equal(value, backend.to_numpy(own[key]))
    assert as_numpy["num_batches_tracked"].dtype == np.int64
    assert as_numpy["num_batches_tracked"].shape == ()
    assert as_numpy["weight"].dtype == np.float64
    # A NumPy state dict loads back into a layer of the backend's library.
    clone = make_layer(backend, 3, axis=1)
    clone.load_state_dict(as_numpy)
    for key in ["weight", "bias", "running_mean", "running_var"]:
        np.testing.assert_array_equal(
            backend.to_numpy(getattr(clone, key)), as_numpy[key]
        )
    assert clone.num_batches_tracked == 2


def test_state_dict_in_the_layers_own_library_is_the_layers_arrays(backend):
    layer = trained_layer(backend)
    state = layer.state_dict(xp=backend.lib)
    assert state["weight"] is layer.weight
    assert state["running_var"] is layer.running_var


@pytest.mark.parametrize(
    "layer_kwargs",
    [{}, {"affine": False, "track_running_stats": False}],
    ids=["with arrays", "without arrays"],
)
def test_wrong_feature_count_is_reported_as_such(backend, layer_kwargs):
    layer = make_layer(backend, 3, axis=1, **layer_kwargs)
    x = backend.asarray(np.random.default_rng(16).normal(size=(4, 5, 2)))
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(
            ValueError, match=r"`x` of shape \(4, 5, 2\) has \(5,\) features"
        ):
            layer(x)
    assert layer.num_batches_tracked == 0


def test_input_checks_come_before_the_layers_arrays(backend):
    xps = pytest.importorskip("array_api_strict")
    layer = make_layer(backend, 3, axis=1)
    other = np if backend.lib is not np else xps
    for x, exc, match in [
        (other.ones((4, 5), dtype=other.float64), ValueError, "features"),
        (other.ones((4, 3), dtype=other.int64), TypeError, "`x` must have a real"),
        (other.ones((4,), dtype=other.float64), ValueError, "`axis` 1 is out of range"),
        ([[1.0] * 3] * 4, TypeError, "`x` must be an array"),
    ]:
        with pytest.raises(exc, match=match):
            layer(x)
    assert layer.num_batches_tracked == 0
