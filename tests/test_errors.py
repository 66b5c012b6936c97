"""Bad input: a TypeError or ValueError naming the parameter and showing the bad value."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import numpy as np
import pytest

import bnarray as bn
from bnarray._plans import PLANS


def raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (in any order)."""
    pattern = "".join(f"(?=.*{re.escape(f)})" for f in fragments)
    return pytest.raises(exc, match=re.compile(pattern, re.DOTALL))


@pytest.fixture(autouse=True, params=["cold", "warm"])
def plans(request):
    """Every test runs twice: with no cached plans, and after good calls have
    cached plans for arrays of the test's library, dtypes and shapes (the
    checks a cached plan skips must still catch each bad call)."""
    PLANS.clear()
    if request.param == "warm":
        backend = (
            request.getfixturevalue("backend")
            if "backend" in request.fixturenames
            else None
        )
        warm_up(np.asarray if backend is None else backend.asarray)
    yield request.param
    PLANS.clear()


def warm_up(asarray):
    """Good calls on (4, 3) arrays and their per-channel arrays, in float64 and float32."""
    rng = np.random.default_rng(1)
    for dtype in (np.float64, np.float32):
        x = asarray(rng.normal(size=(4, 3)).astype(dtype))
        for axis, shape in [(-1, (3,)), (1, (3,)), (0, (4,)), ((1,), (3,))]:
            ones = asarray(np.ones(shape, dtype))
            zeros = asarray(np.zeros(shape, dtype))
            for eps in (1e-5, 0.0, 1):
                for weight, bias in [(None, None), (ones, zeros)]:
                    y, ctx = bn.batch_norm_forward(x, weight, bias, axis=axis, eps=eps)
                    bn.batch_norm_backward(y, ctx)
                    bn.update_running_stats(zeros, ones, ctx)
                    bn.update_running_stats(
                        zeros, ones, ctx, momentum=None, num_batches_tracked=2
                    )
                    y, ctx = bn.batch_norm_forward(
                        x,
                        weight,
                        bias,
                        axis=axis,
                        eps=eps,
                        training=False,
                        running_mean=zeros,
                        running_var=ones,
                    )
                    bn.batch_norm_backward(y, ctx)
    assert len(PLANS) > 0


@pytest.fixture
def x(backend):
    return backend.asarray(np.random.default_rng(0).normal(size=(4, 3)))


@pytest.fixture
def ones3(backend):
    return backend.asarray(np.ones(3))


@pytest.mark.parametrize("bad", [[[1.0, 2.0], [3.0, 4.0]], 3.0, "x", None])
def test_x_must_be_an_array(bad):
    with raises(TypeError, "`x`", type(bad).__name__):
        bn.batch_norm_forward(bad)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_x_must_be_floating(backend, dtype):
    with raises(TypeError, "`x`", "floating"):
        bn.batch_norm_forward(backend.asarray(np.ones((4, 3)), dtype))


def test_x_must_not_be_0d(backend):
    with raises(ValueError, "`x`", "()"):
        bn.batch_norm_forward(backend.asarray(np.float64(1.0)))


@pytest.mark.parametrize("axis", [2, -3, (0, 2), (5,)])
def test_axis_out_of_range(x, axis):
    with raises(ValueError, "`axis`", repr(axis), "out of range"):
        bn.batch_norm_forward(x, axis=axis)


@pytest.mark.parametrize("axis", [(1, 1), (1, -1), (0, -2)])
def test_axis_repeated(x, axis):
    with raises(ValueError, "`axis`", repr(axis), "twice"):
        bn.batch_norm_forward(x, axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", [1], True, None])
def test_axis_must_be_int_or_tuple(x, axis):
    with raises(TypeError, "`axis`", repr(axis)):
        bn.batch_norm_forward(x, axis=axis)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parameter_shape(backend, x, name):
    with raises(ValueError, f"`{name}`", "(3,)", "(4,)"):
        bn.batch_norm_forward(x, **{name: backend.asarray(np.ones(4))})


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stat_shape(backend, x, ones3, name):
    stats = {"running_mean": ones3, "running_var": ones3}
    stats[name] = backend.asarray(np.ones((1, 3)))
    with raises(ValueError, f"`{name}`", "(3,)", "(1, 3)"):
        bn.batch_norm_forward(x, training=False, **stats)


def test_parameter_must_be_floating(backend, x):
    with raises(TypeError, "`weight`", "floating"):
        bn.batch_norm_forward(x, backend.asarray(np.ones(3), np.int64))


def test_parameter_must_be_an_array(x):
    with raises(TypeError, "`bias`", "list"):
        bn.batch_norm_forward(x, bias=[0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("shape", "axis"), [((1, 3), -1), ((5, 3), (0, 1)), ((1, 2, 1, 1), 1)]
)
def test_one_value_per_channel_in_training(backend, shape, axis):
    with raises(
        ValueError, "Expected more than 1 value per channel when training", str(shape)
    ):
        bn.batch_norm_forward(backend.asarray(np.ones(shape)), axis=axis)


def test_empty_batch_in_training(backend):
    with raises(ValueError, "`x`", "(0, 3)", "empty"):
        bn.batch_norm_forward(backend.asarray(np.ones((0, 3))))


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_inference_needs_running_stats(x, ones3, missing):
    stats = {"running_mean": ones3, "running_var": ones3}
    del stats[missing]
    with raises(ValueError, f"`{missing}`", "training=False"):
        bn.batch_norm_forward(x, training=False, **stats)


def test_training_refuses_running_stats(x, ones3):
    with raises(ValueError, "`running_mean`", "update_running_stats"):
        bn.batch_norm_forward(x, running_mean=ones3, running_var=ones3)


def test_training_flag_must_be_bool(x):
    with raises(TypeError, "`training`", "'yes'"):
        bn.batch_norm_forward(x, training="yes")


@pytest.mark.parametrize("eps", [-1e-5, math.inf, -math.inf, math.nan])
def test_eps_must_be_finite_and_non_negative(x, eps):
    with raises(ValueError, "`eps`", repr(eps)):
        bn.batch_norm_forward(x, eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, np.ones(1)])
def test_eps_must_be_a_number(x, eps):
    with raises(TypeError, "`eps`"):
        bn.batch_norm_forward(x, eps=eps)


def test_arrays_of_different_libraries():
    xps = pytest.importorskip("array_api_strict")
    x = np.ones((4, 3))
    with raises(TypeError, "`weight`", "array_api_strict", "numpy"):
        bn.batch_norm_forward(x, xps.ones(3, dtype=xps.float64))
    with raises(TypeError, "`bias`", "numpy", "array_api_strict"):
        bn.batch_norm_forward(xps.asarray(x), bias=np.zeros(3))


def test_arrays_on_different_devices():
    xps = pytest.importorskip("array_api_strict")
    x = xps.ones((4, 3), dtype=xps.float64)
    weight = xps.ones(3, dtype=xps.float64, device=xps.Device("device1"))
    with raises(ValueError, "`weight`", "device1", "CPU_DEVICE"):
        bn.batch_norm_forward(x, weight)
    _, ctx = bn.batch_norm_forward(x)
    with raises(ValueError, "`dy`", "device1"):
        bn.batch_norm_backward(
            xps.ones((4, 3), dtype=xps.float64, device=xps.Device("device1")), ctx
        )


class TestBackward:
    def test_ctx_must_be_a_context(self, x):
        with raises(TypeError, "`ctx`", "dict"):
            bn.batch_norm_backward(x, {"mean": 0})

    def test_dy_shape(self, backend, x):
        _, ctx = bn.batch_norm_forward(x)
        with raises(ValueError, "`dy`", "(4, 3)", "(3, 4)"):
            bn.batch_norm_backward(backend.asarray(np.ones((3, 4))), ctx)

    def test_dy_dtype(self, backend, x):
        _, ctx = bn.batch_norm_forward(x)
        with raises(TypeError, "`dy`", "float32"):
            bn.batch_norm_backward(backend.asarray(np.ones((4, 3)), np.float32), ctx)

    def test_dy_must_be_an_array(self, x):
        _, ctx = bn.batch_norm_forward(x)
        with raises(TypeError, "`dy`", "list"):
            bn.batch_norm_backward([[1.0] * 3] * 4, ctx)


def _readonly(a):
    a.flags.writeable = False
    return a


class TestOut:
    """`out` of the forward and backward passes (NumPy and CuPy only)."""

    BAD: ClassVar = [
        (lambda: np.zeros((4, 3), np.float32), TypeError, ["`out`", "float32"]),
        (lambda: np.zeros((3, 4)), ValueError, ["`out`", "(4, 3)", "(3, 4)"]),
        (lambda: np.zeros((4, 3), order="F"), ValueError, ["`out`", "C-contiguous"]),
        (lambda: np.zeros((4, 6))[:, ::2], ValueError, ["`out`", "(48, 16)"]),
        (lambda: _readonly(np.zeros((4, 3))), ValueError, ["`out`", "writeable"]),
        (lambda: [[0.0] * 3] * 4, TypeError, ["`out`", "list"]),
    ]

    @pytest.fixture
    def xn(self):
        return np.random.default_rng(0).normal(size=(4, 3))

    @pytest.mark.parametrize(("make", "exc", "fragments"), BAD)
    def test_forward(self, xn, make, exc, fragments):
        with raises(exc, *fragments):
            bn.batch_norm_forward(xn, out=make())

    @pytest.mark.parametrize(("make", "exc", "fragments"), BAD)
    def test_backward(self, xn, make, exc, fragments):
        y, ctx = bn.batch_norm_forward(xn)
        with raises(exc, *fragments):
            bn.batch_norm_backward(y, ctx, out=make())

    def test_forward_overlap(self, xn):
        with raises(ValueError, "`out`", "overlaps", "`x`"):
            bn.batch_norm_forward(xn, out=xn)
        out = xn.copy()
        with raises(ValueError, "`out`", "overlaps", "`bias`"):
            bn.batch_norm_forward(xn, None, out[0], out=out)

    def test_backward_overlap(self, xn):
        y, ctx = bn.batch_norm_forward(xn)
        with raises(ValueError, "`out`", "overlaps", "`dy`"):
            bn.batch_norm_backward(y, ctx, out=y)
        with raises(ValueError, "`out`", "overlaps", "`ctx.x`"):
            bn.batch_norm_backward(y, ctx, out=xn)

    def test_out_of_another_library(self, xn):
        torch = pytest.importorskip("torch")
        with raises(TypeError, "`out`", "numpy array", "Tensor"):
            bn.batch_norm_forward(xn, out=torch.zeros(4, 3, dtype=torch.float64))

    def test_libraries_without_out(self, backend, x):
        if backend.backend.family in ("numpy", "numpy_readonly"):
            pytest.skip("NumPy arrays take `out`")
        library = "jax" if backend.backend.family == "jax" else backend.backend.family
        with raises(TypeError, "`out`", "NumPy and CuPy", library):
            bn.batch_norm_forward(x, out=backend.asarray(np.zeros((4, 3))))
        y, ctx = bn.batch_norm_forward(x)
        with raises(TypeError, "`out`", "NumPy and CuPy", library):
            bn.batch_norm_backward(y, ctx, out=backend.asarray(np.zeros((4, 3))))

    def test_layer_reuse_buffers(self):
        with raises(TypeError, "`reuse_buffers`", "1"):
            bn.BatchNorm(3, reuse_buffers=1)
        xps = pytest.importorskip("array_api_strict")
        with raises(TypeError, "`reuse_buffers`", "NumPy or CuPy", "array_api_strict"):
            bn.BatchNorm(3, xp=xps, reuse_buffers=True)


class TestUpdateRunningStats:
    @pytest.fixture
    def ctx(self, x):
        return bn.batch_norm_forward(x)[1]

    @pytest.mark.parametrize("momentum", [-0.1, 1.5, math.nan, math.inf])
    def test_momentum_range(self, ones3, ctx, momentum):
        with raises(ValueError, "`momentum`", repr(momentum)):
            bn.update_running_stats(ones3, ones3, ctx, momentum=momentum)

    def test_momentum_type(self, ones3, ctx):
        with raises(TypeError, "`momentum`", "'0.1'"):
            bn.update_running_stats(ones3, ones3, ctx, momentum="0.1")

    def test_cumulative_average_needs_batch_count(self, ones3, ctx):
        with raises(ValueError, "`num_batches_tracked`", "momentum"):
            bn.update_running_stats(ones3, ones3, ctx, momentum=None)
        with raises(ValueError, "`num_batches_tracked`", "0"):
            bn.update_running_stats(
                ones3, ones3, ctx, momentum=None, num_batches_tracked=0
            )
        with raises(TypeError, "`num_batches_tracked`", "1.0"):
            bn.update_running_stats(
                ones3, ones3, ctx, momentum=None, num_batches_tracked=1.0
            )

    def test_inference_context(self, x, ones3):
        _, ctx = bn.batch_norm_forward(
            x, training=False, running_mean=ones3, running_var=ones3
        )
        with raises(ValueError, "`ctx`", "training=False"):
            bn.update_running_stats(ones3, ones3, ctx)

    def test_shapes(self, backend, ones3, ctx):
        with raises(ValueError, "`running_var`", "(3,)", "(2,)"):
            bn.update_running_stats(ones3, backend.asarray(np.ones(2)), ctx)

    @pytest.mark.parametrize("name", ["running_mean", "running_var"])
    def test_arrays_required(self, ones3, ctx, name):
        stats = {"running_mean": ones3, "running_var": ones3, name: None}
        with raises(TypeError, f"`{name}`"):
            bn.update_running_stats(stats["running_mean"], stats["running_var"], ctx)

    def test_ctx_type(self, ones3):
        with raises(TypeError, "`ctx`"):
            bn.update_running_stats(ones3, ones3, None)


class TestLayer:
    @pytest.mark.parametrize("num_features", [0, -2, (3, 0)])
    def test_num_features_positive(self, num_features):
        with raises(ValueError, "`num_features`", repr(num_features)):
            bn.BatchNorm(
                num_features, axis=(1, 2) if isinstance(num_features, tuple) else 1
            )

    @pytest.mark.parametrize("num_features", [3.0, "3", True])
    def test_num_features_type(self, num_features):
        with raises(TypeError, "`num_features`", repr(num_features)):
            bn.BatchNorm(num_features)

    def test_num_features_matches_axes(self):
        with raises(ValueError, "`num_features`", "(1, 2)"):
            bn.BatchNorm(3, axis=(1, 2))

    def test_eps_and_momentum(self):
        with raises(ValueError, "`eps`"):
            bn.BatchNorm(3, eps=-1.0)
        with raises(ValueError, "`momentum`", "2"):
            bn.BatchNorm(3, momentum=2)

    def test_dtype_must_be_floating(self):
        with raises(TypeError, "`dtype`", "int64"):
            bn.BatchNorm(3, dtype=np.int64)

    def test_xp_must_be_an_array_library(self):
        with raises(TypeError, "`xp`", "math"):
            bn.BatchNorm(3, xp=math)

    def test_flags_must_be_bool(self):
        with raises(TypeError, "`affine`"):
            bn.BatchNorm(3, affine=1)
        with raises(TypeError, "`mode`"):
            bn.BatchNorm(3).train("no")

    def test_input_of_another_library(self):
        xps = pytest.importorskip("array_api_strict")
        layer = bn.BatchNorm(3)
        with raises(TypeError, "`weight`", "numpy", "array_api_strict"):
            layer(xps.ones((4, 3), dtype=xps.float64))
        assert layer.num_batches_tracked == 0

    def test_state_dict_must_be_a_mapping(self):
        with raises(TypeError, "`state_dict`", "list"):
            bn.BatchNorm(3).load_state_dict([])


@pytest.mark.parametrize("flag", [1, 0, np.int64(1), "True", None, np.array(True)])
def test_flags_are_python_or_numpy_bools(x, flag):
    fragments = ["bool", "NumPy", type(flag).__name__]
    with raises(TypeError, "`training`", *fragments):
        bn.batch_norm_forward(x, training=flag)
    with raises(TypeError, "`mode`", *fragments):
        bn.BatchNorm(3).train(flag)
    for name in ["affine", "track_running_stats"]:
        with raises(TypeError, f"`{name}`", *fragments):
            bn.BatchNorm(3, **{name: flag})


def test_dtype_of_another_library_is_a_type_error():
    torch = pytest.importorskip("torch")
    for xp, dtype, shown in [
        (torch, np.float32, "numpy.float32"),
        (torch, np.dtype("float64"), "float64"),
        (torch, "float32", "'float32'"),
        (np, torch.float32, "torch.float32"),
        (np, "float64", "'float64'"),
    ]:
        with raises(TypeError, "`dtype`", shown, f"{xp.__name__}.float32"):
            bn.BatchNorm(3, xp=xp, dtype=dtype)


def test_dtype_of_array_api_strict_must_be_its_own():
    xps = pytest.importorskip("array_api_strict")
    with raises(TypeError, "`dtype`", "float32", "array_api_strict"):
        bn.BatchNorm(3, xp=xps, dtype=np.float32)
    with raises(TypeError, "`dtype`", "array_api_strict.float64"):
        bn.BatchNorm(3, dtype=xps.float64)


class TestLoadStateDict:
    """Every rejected entry names its key, shows the value, and changes nothing."""

    @pytest.fixture
    def layer(self, backend):
        layer = bn.BatchNorm(3, xp=backend.lib, device=backend.device)
        layer(backend.asarray(np.random.default_rng(1).normal(size=(4, 3))))
        layer.backward(backend.asarray(np.ones((4, 3))))
        return layer

    def load_and_check_unchanged(self, backend, layer, key, value, exc, *fragments):
        state = {k: backend.to_numpy(v) * 2 for k, v in layer.state_dict().items()}
        state[key] = value
        before = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
        with raises(exc, f"`state_dict[{key!r}]`", *fragments):
            layer.load_state_dict(state)
        after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])
        assert layer.num_batches_tracked == 1

    @pytest.mark.parametrize(
        ("value", "exc", "fragments"),
        [
            pytest.param(value, exc, fragments, id=repr(value))
            for value, exc, fragments in [
                (None, TypeError, ["integer", "NoneType", "None"]),
                ("abc", TypeError, ["integer", "str", "'abc'"]),
                (2.7, TypeError, ["integer", "float", "2.7"]),
                (2.0, TypeError, ["integer", "float", "2.0"]),
                (True, TypeError, ["integer", "bool", "True"]),
                (np.float64(3.0), TypeError, ["integer", "float64", "3.0"]),
                (np.array(3.0), TypeError, ["integer", "float64", "3."]),
                (np.array([3]), ValueError, ["0-d", "(1,)"]),
                (-1, ValueError, [">= 0", "-1"]),
            ]
        ],
    )
    def test_num_batches_tracked(self, backend, layer, value, exc, fragments):
        self.load_and_check_unchanged(
            backend, layer, "num_batches_tracked", value, exc, *fragments
        )

    @pytest.mark.parametrize(
        ("key", "value", "fragments"),
        [
            pytest.param(key, value, fragments, id=f"{key}={value!r}")
            for key, value, fragments in [
                ("weight", np.array([1 + 1j, 1, 1]), ["real", "complex128", "1.+1.j"]),
                ("bias", np.array([True, False, True]), ["real", "bool", "True"]),
                ("running_mean", "abc", ["real", "'abc'"]),
                ("running_var", None, ["real", "None"]),
                ("weight", [[1.0], [1.0, 2.0]], ["list", "[[1.0], [1.0, 2.0]]"]),
                ("bias", {"a": 1.0}, ["real", "{'a': 1.0}"]),
            ]
        ],
    )
    def test_non_real_arrays(self, backend, layer, key, value, fragments):
        self.load_and_check_unchanged(backend, layer, key, value, TypeError, *fragments)

    def test_complex_array_of_the_layers_library(self, backend, layer):
        value = backend.asarray(np.array([1 + 2j, 1, 1]))
        self.load_and_check_unchanged(
            backend, layer, "weight", value, TypeError, "real", "complex128"
        )

    def test_float_count_of_the_layers_library(self, backend, layer):
        value = backend.asarray(np.float64(3.0))
        self.load_and_check_unchanged(
            backend,
            layer,
            "num_batches_tracked",
            value,
            TypeError,
            "integer",
            "float64",
        )


@pytest.mark.parametrize(
    ("flag", "exc", "fragments"),
    [(1, TypeError, ["int", "1"]), ("no", TypeError, ["'no'"])],
)
def test_unbiased_must_be_a_bool(backend, x, ones3, flag, exc, fragments):
    _, ctx = bn.batch_norm_forward(x)
    with raises(exc, "`unbiased`", *fragments):
        bn.update_running_stats(ones3, ones3, ctx, unbiased=flag)
    with raises(exc, "`unbiased`", *fragments):
        bn.BatchNorm(3, unbiased=flag)
    with raises(exc, "`unbiased`", *fragments):
        bn.population_stats([x], unbiased=flag)


@pytest.mark.parametrize(
    ("convention", "exc", "fragments"),
    [
        ("tf", ValueError, ["'tf'", "'torch', 'keras', 'flax'"]),
        ("Keras", ValueError, ["'Keras'", "'keras'"]),
        (None, TypeError, ["NoneType", "'torch', 'keras', 'flax'"]),
        (["torch"], TypeError, ["list", "['torch']"]),
    ],
)
def test_convention_must_be_known(convention, exc, fragments):
    layer = bn.BatchNorm(3)
    with raises(exc, "`convention`", *fragments):
        layer.state_dict(convention=convention)
    with raises(exc, "`convention`", *fragments):
        layer.load_state_dict(layer.state_dict(), convention=convention)


def test_convention_is_keyword_only():
    layer = bn.BatchNorm(3)
    with pytest.raises(TypeError):
        layer.state_dict("keras")
    with pytest.raises(TypeError):
        layer.load_state_dict(layer.state_dict(), True, "torch")


@pytest.mark.parametrize(
    ("saved", "loaded", "fragments"),
    [
        ("torch", "keras", ["'gamma'", "'weight'", "convention='keras'",
                            "those of convention='torch'"]),
        ("keras", "torch", ["'weight'", "'gamma'", "those of convention='keras'"]),
        ("flax", "keras", ["'moving_mean'", "'mean'", "those of convention='flax'"]),
        ("keras", "flax", ["'scale'", "'moving_variance'"]),
    ],
)  # fmt: skip
def test_keys_of_another_convention_name_it(backend, saved, loaded, fragments):
    layer = bn.BatchNorm(3, xp=backend.lib, device=backend.device)
    layer(backend.asarray(np.random.default_rng(0).normal(size=(4, 3))))
    before = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    saved_state = layer.state_dict(convention=saved)
    state = {k: backend.to_numpy(v) * 2 for k, v in saved_state.items()}
    with raises(
        ValueError, "`state_dict`", "missing keys", "unexpected keys", *fragments
    ):
        layer.load_state_dict(state, convention=loaded)
    after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_keras_entry_errors_name_the_keras_key(backend):
    layer = bn.BatchNorm(3, xp=backend.lib, device=backend.device)
    state = dict.fromkeys(["gamma", "beta", "moving_mean"], np.ones(3))
    state["moving_variance"] = np.ones((1, 3))
    with raises(ValueError, "`state_dict['moving_variance']`", "(3,)", "(1, 3)"):
        layer.load_state_dict(state, convention="keras")


def test_freeze_needs_running_statistics():
    with raises(ValueError, "`freeze`", "track_running_stats=False"):
        bn.BatchNorm(3, track_running_stats=False).freeze()


class TestRecomputeRunningStats:
    """Bad batches name the batch and what is wrong, and leave the layer unchanged."""

    @pytest.fixture
    def layer(self, backend):
        layer = bn.BatchNorm(3, xp=backend.lib, device=backend.device)
        layer(backend.asarray(np.random.default_rng(1).normal(size=(4, 3))))
        return layer

    def check_unchanged(self, backend, layer, batches, exc, *fragments):
        before = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
        with raises(exc, *fragments):
            layer.recompute_running_stats(batches)
        after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
        for k in before:
            np.testing.assert_array_equal(before[k], after[k])

    def test_empty(self, backend, layer):
        self.check_unchanged(backend, layer, [], ValueError, "`batches`", "empty")
        self.check_unchanged(backend, layer, iter(()), ValueError, "`batches`", "empty")

    def test_one_value_in_all(self, backend, layer):
        batches = [backend.asarray(np.ones((1, 3)))]
        self.check_unchanged(
            backend, layer, batches, ValueError, "`batches`", "1 value", "2"
        )

    def test_wrong_channel_shape_in_a_later_batch(self, backend, layer):
        batches = [backend.asarray(np.ones((4, 3))), backend.asarray(np.ones((4, 5)))]
        self.check_unchanged(
            backend,
            layer,
            batches,
            ValueError,
            "`batches[1]`",
            "(4, 5)",
            "(5,)",
            "(3,)",
        )

    def test_not_an_iterable(self, backend, layer):
        self.check_unchanged(
            backend, layer, 3.0, TypeError, "`batches`", "float", "3.0"
        )
        self.check_unchanged(backend, layer, "abc", TypeError, "`batches`", "'abc'")

    def test_one_array_instead_of_a_list(self, backend, layer):
        x = backend.asarray(np.ones((4, 3)))
        self.check_unchanged(backend, layer, x, TypeError, "`batches`", "(4, 3)", "[x]")

    def test_not_an_array(self, backend, layer):
        batches = [backend.asarray(np.ones((4, 3))), [[1.0, 2.0, 3.0]]]
        self.check_unchanged(backend, layer, batches, TypeError, "`batches[1]`", "list")

    def test_integer_batch(self, backend, layer):
        batches = [backend.asarray(np.ones((4, 3), dtype=np.int64))]
        self.check_unchanged(
            backend, layer, batches, TypeError, "`batches[0]`", "floating"
        )

    def test_mixed_libraries(self, backend, layer):
        torch = pytest.importorskip("torch")
        other = np.ones((4, 3)) if backend.lib is torch else torch.ones(4, 3)
        batches = [backend.asarray(np.ones((4, 3))), other]
        self.check_unchanged(
            backend,
            layer,
            batches,
            TypeError,
            "`batches[1]`",
            "`running_mean`",
            "one library",
        )

    def test_layer_without_running_statistics(self, backend):
        layer = bn.BatchNorm(3, track_running_stats=False, xp=backend.lib)
        with raises(
            ValueError, "`recompute_running_stats`", "track_running_stats=False"
        ):
            layer.recompute_running_stats([backend.asarray(np.ones((4, 3)))])


def test_population_stats_errors(backend):
    x = backend.asarray(np.ones((4, 3)))
    with raises(ValueError, "`batches`", "empty"):
        bn.population_stats([])
    with raises(ValueError, "`batches[1]`", "(4, 2)", "(3,)"):
        bn.population_stats([x, backend.asarray(np.ones((4, 2)))])
    with raises(ValueError, "`axis`", "5"):
        bn.population_stats([x], axis=5)


class TestVariants:
    """Bad inputs of batch renormalization, ghost batches and masks."""

    @pytest.mark.parametrize(
        ("kwargs", "exc", "fragments"),
        [
            ({"rmax": 0.5, "dmax": 0.0}, ValueError, ("`rmax`", "0.5", ">= 1")),
            ({"rmax": 2.0, "dmax": -1.0}, ValueError, ("`dmax`", "-1.0", ">= 0")),
            ({"rmax": math.inf, "dmax": 0.0}, ValueError, ("`rmax`", "inf")),
            ({"rmax": 2.0, "dmax": math.nan}, ValueError, ("`dmax`", "nan")),
            ({"rmax": "3", "dmax": 0.0}, TypeError, ("`rmax`", "str")),
            ({"rmax": 2.0, "dmax": True}, TypeError, ("`dmax`", "bool")),
        ],
    )
    def test_renorm_bounds(self, kwargs, exc, fragments):
        with raises(exc, *fragments):
            bn.Renorm(**kwargs)

    def test_renorm_is_keyword_only(self):
        with pytest.raises(TypeError):
            bn.Renorm(3.0, 5.0)

    def test_renorm_must_be_a_renorm(self, x, ones3):
        with raises(TypeError, "`renorm`", "dict"):
            bn.batch_norm_forward(
                x, renorm={"rmax": 3}, running_mean=ones3, running_var=ones3
            )

    @pytest.mark.parametrize("missing", ["running_mean", "running_var"])
    def test_renorm_needs_running_stats_in_training(self, x, ones3, missing):
        stats = {"running_mean": ones3, "running_var": ones3}
        del stats[missing]
        with raises(ValueError, f"`{missing}`", "renorm"):
            bn.batch_norm_forward(x, renorm=bn.Renorm(rmax=3, dmax=5), **stats)

    @pytest.mark.parametrize(
        ("size", "exc"),
        [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)],
    )
    def test_ghost_batch_size(self, x, size, exc):
        with raises(exc, "`ghost_batch_size`", repr(size)):
            bn.batch_norm_forward(x, ghost_batch_size=size)

    def test_batch_axis_must_be_a_reduced_axis(self, x):
        with raises(ValueError, "`batch_axis`", "channel axis"):
            bn.batch_norm_forward(x, ghost_batch_size=2, batch_axis=1)
        with raises(ValueError, "`batch_axis`", "out of range"):
            bn.batch_norm_forward(x, ghost_batch_size=2, batch_axis=2)
        with raises(TypeError, "`batch_axis`", "1.0"):
            bn.batch_norm_forward(x, ghost_batch_size=2, batch_axis=1.0)

    def test_a_ghost_batch_of_one_value_per_channel(self, backend):
        x = backend.asarray(np.ones((5, 3)))
        with raises(ValueError, "`ghost_batch_size`", "2", "(5, 3)", "1 value"):
            bn.batch_norm_forward(x, ghost_batch_size=2)

    def test_mask_shape(self, backend, x):
        with raises(ValueError, "`mask`", "(4,)", "(4, 3)"):
            bn.batch_norm_forward(x, mask=backend.asarray(np.ones((4, 3), bool)))

    def test_mask_dtype(self, backend, x):
        with raises(TypeError, "`mask`", "bool"):
            bn.batch_norm_forward(x, mask=backend.asarray(np.ones(4)))

    def test_mask_must_be_an_array(self, x):
        with raises(TypeError, "`mask`", "list"):
            bn.batch_norm_forward(x, mask=[True, True, False, True])

    def test_mask_of_another_library(self):
        torch = pytest.importorskip("torch")
        with raises(TypeError, "`mask`", "torch", "numpy"):
            bn.batch_norm_forward(np.ones((4, 3)), mask=torch.ones(4, dtype=torch.bool))

    @pytest.mark.skip_backend("dask", "jax", reason="lazy: the count is not checked")
    def test_mask_with_fewer_than_two_counted_values(self, backend, x):
        mask = backend.asarray(np.array([False, True, False, False]))
        with raises(ValueError, "`mask`", "1 position", "two"):
            bn.batch_norm_forward(x, mask=mask)

    def test_variants_do_not_combine(self, backend, x, ones3):
        with raises(ValueError, "`ghost_batch_size`", "`mask`", "one of"):
            bn.batch_norm_forward(
                x, ghost_batch_size=2, mask=backend.asarray(np.ones(4, bool))
            )

    def test_layer_renorm_needs_tracked_statistics(self):
        with raises(ValueError, "`renorm`", "track_running_stats"):
            bn.BatchNorm(3, renorm=bn.Renorm(rmax=3, dmax=5), track_running_stats=False)
        with raises(TypeError, "`renorm`"):
            bn.BatchNorm(3, renorm=3.0)
        with raises(ValueError, "`ghost_batch_size`", "0"):
            bn.BatchNorm(3, ghost_batch_size=0)
