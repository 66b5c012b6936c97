"""`out=` of the forward and backward passes, and the layer's `reuse_buffers`:
bitwise the results without them, written into the given array, refused
before anything is written where the array cannot take them."""

from __future__ import annotations

import copy
import importlib.util
import pickle

import numpy as np
import pytest

import bnarray as bn
from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV
from bnarray._plans import PLANS

NUMPY_FAMILIES = ("numpy", "numpy_readonly")


@pytest.fixture(params=["numba", "numpy", "generic"])
def kernel_path(request, monkeypatch):
    """Every kernel set that serves NumPy arrays: the Numba loops, the
    NumPy-only ones (``BNARRAY_NUMBA=0``), the generic ones (``BNARRAY_GENERIC=1``)."""
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    if request.param == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("Numba is not installed (pip install bnarray[numba])")
    if request.param == "numpy":
        monkeypatch.setenv(NUMBA_ENV, "0")
    if request.param == "generic":
        monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    return request.param


def bits(a: np.ndarray) -> np.ndarray:
    """`a`'s values as unsigned integers of its width: equal means bitwise equal."""
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def assert_bitwise(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(bits(got), bits(expected))


LAYOUTS = {
    "C": lambda a: a,
    "Fortran": np.asfortranarray,
    "reversed": lambda a: np.ascontiguousarray(a[::-1, ..., ::-1])[::-1, ..., ::-1],
    "strided": lambda a: np.repeat(a, 2, axis=2)[:, :, ::2],
}


def _inputs(shape, axis, dtype, layout, seed=0):
    rng = np.random.default_rng(seed)
    kept = axis if isinstance(axis, tuple) else (axis,)
    channel_shape = tuple(shape[a] for a in kept)
    x = LAYOUTS[layout](rng.normal(2.0, 3.0, size=shape).astype(dtype))
    dy = LAYOUTS[layout](rng.normal(size=shape).astype(dtype))
    weight = rng.normal(1.0, 0.5, size=channel_shape).astype(dtype)
    bias = rng.normal(size=channel_shape).astype(dtype)
    return x, dy, weight, bias


def _sentinel_like(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array of `a`'s shape and dtype, full of a value no result has."""
    return np.full(a.shape, 12345.0, dtype=a.dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("axis", [-1, 1, (1, 3)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_out_gives_bitwise_the_results_without_it(
    kernel_path, layout, axis, dtype, training
):
    x, dy, weight, bias = _inputs((6, 4, 5, 3), axis, dtype, layout)
    kept = axis if isinstance(axis, tuple) else (axis,)
    stats = {}
    if not training:
        channel_shape = tuple(x.shape[a] for a in kept)
        stats = {
            "running_mean": np.full(channel_shape, 0.5, dtype),
            "running_var": np.full(channel_shape, 2.0, dtype),
        }
    kwargs = {"axis": axis, "training": training, **stats}
    before = [a.copy() for a in (x, dy, weight, bias, *stats.values())]

    y, ctx = bn.batch_norm_forward(x, weight, bias, **kwargs)
    dx, dweight, dbias = bn.batch_norm_backward(dy, ctx)

    y_out = _sentinel_like(x)
    for _ in range(2):  # the second call with a cached plan
        got_y, got_ctx = bn.batch_norm_forward(x, weight, bias, **kwargs, out=y_out)
        assert got_y is y_out
        assert_bitwise(got_y, y)
        assert_bitwise(got_ctx.mean, ctx.mean)
        dx_out = _sentinel_like(dy)
        got_dx, got_dweight, got_dbias = bn.batch_norm_backward(dy, got_ctx, out=dx_out)
        assert got_dx is dx_out
        assert_bitwise(got_dx, dx)
        assert_bitwise(got_dweight, dweight)
        assert_bitwise(got_dbias, dbias)
    for a, b in zip(before, (x, dy, weight, bias, *stats.values()), strict=True):
        assert_bitwise(b, a)


@pytest.mark.parametrize(
    ("shape", "axis"), [((16, 32, 24, 24), 1), ((16, 24, 24, 32), -1)]
)
def test_out_on_arrays_of_many_blocks(kernel_path, shape, axis):
    """Arrays large enough for the kernels' blocks and threads."""
    x, dy, weight, bias = _inputs(shape, axis, np.float32, "C")
    y, ctx = bn.batch_norm_forward(x, weight, bias, axis=axis)
    dx, _, _ = bn.batch_norm_backward(dy, ctx)
    y_out, dx_out = _sentinel_like(x), _sentinel_like(x)
    got_y, got_ctx = bn.batch_norm_forward(x, weight, bias, axis=axis, out=y_out)
    got_dx, _, _ = bn.batch_norm_backward(dy, got_ctx, out=dx_out)
    assert got_y is y_out and got_dx is dx_out
    assert_bitwise(got_y, y)
    assert_bitwise(got_dx, dx)


@pytest.mark.parametrize(
    "variant",
    [
        {"ghost_batch_size": 2},
        {"mask": np.arange(6 * 5).reshape(6, 5) % 3 != 0},
    ],
    ids=["ghost", "mask"],
)
def test_out_with_variants(kernel_path, variant):
    x, dy, weight, bias = _inputs((6, 5, 4), -1, np.float32, "C")
    y, ctx = bn.batch_norm_forward(x, weight, bias, **variant)
    dx, _, _ = bn.batch_norm_backward(dy, ctx)
    y_out, dx_out = _sentinel_like(x), _sentinel_like(x)
    got_y, got_ctx = bn.batch_norm_forward(x, weight, bias, **variant, out=y_out)
    got_dx, _, _ = bn.batch_norm_backward(dy, got_ctx, out=dx_out)
    assert got_y is y_out and got_dx is dx_out
    assert_bitwise(got_y, y)
    assert_bitwise(got_dx, dx)


def _bad_outs(x: np.ndarray) -> dict[str, object]:
    readonly = _sentinel_like(x)
    readonly.flags.writeable = False
    return {
        "dtype": _sentinel_like(x).astype(np.float32),
        "shape": np.full(x.shape[::-1], 1.0),
        "fortran": np.asfortranarray(_sentinel_like(x)),
        "strided": np.full((x.shape[0], 2 * x.shape[1]), 1.0)[:, ::2],
        "read-only": readonly,
        "list": [[1.0] * x.shape[1]] * x.shape[0],
    }


@pytest.mark.parametrize("kind", list(_bad_outs(np.zeros((4, 3)))))
@pytest.mark.parametrize("cached", [False, True])
def test_a_bad_out_raises_before_anything_is_written(kernel_path, kind, cached):
    x, dy, weight, bias = _inputs((4, 3), -1, np.float64, "C")
    PLANS.clear()
    if cached:  # good calls with and without `out` first
        for out in (None, _sentinel_like(x)):
            _, ctx = bn.batch_norm_forward(x, weight, bias, out=out)
            bn.batch_norm_backward(dy, ctx, out=None if out is None else out.copy())
    _, ctx = bn.batch_norm_forward(x, weight, bias)
    bad = _bad_outs(x)[kind]
    kept = copy.deepcopy(bad)
    with pytest.raises((TypeError, ValueError), match="`out`"):
        bn.batch_norm_forward(x, weight, bias, out=bad)
    with pytest.raises((TypeError, ValueError), match="`out`"):
        bn.batch_norm_backward(dy, ctx, out=bad)
    if isinstance(bad, np.ndarray):
        assert_bitwise(bad, kept)
    else:
        assert bad == kept


@pytest.mark.parametrize("name", ["x", "weight", "running_mean"])
def test_out_must_not_overlap_an_input(kernel_path, name):
    x, _, weight, bias = _inputs((4, 3), -1, np.float64, "C")
    out = x.copy()
    arrays = {"x": x, "weight": weight, "running_mean": np.zeros(3)}
    arrays[name] = out if name == "x" else out[1]  # a row of `out` as a parameter
    stats = {"running_mean": arrays["running_mean"], "running_var": np.ones(3)}
    kwargs = {**stats, "training": False} if name == "running_mean" else {}
    before = out.copy()
    with pytest.raises(ValueError, match=f"`out` overlaps `{name}`"):
        bn.batch_norm_forward(arrays["x"], arrays["weight"], bias, out=out, **kwargs)
    assert_bitwise(out, before)


@pytest.mark.parametrize("name", ["dy", "ctx.x"])
def test_backward_out_must_not_overlap_an_input(kernel_path, name):
    x, dy, weight, bias = _inputs((4, 3), -1, np.float64, "C")
    _, ctx = bn.batch_norm_forward(x, weight, bias)
    out = dy if name == "dy" else ctx.x
    before = out.copy()
    with pytest.raises(ValueError, match=f"`out` overlaps `{name}`"):
        bn.batch_norm_backward(dy, ctx, out=out)
    assert_bitwise(out, before)


def test_out_for_arrays_of_other_libraries(backend):
    """NumPy (read-only inputs too) writes into `out`; the other libraries
    refuse it, naming `out` and the library."""
    x = backend.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    if backend.backend.family in NUMPY_FAMILIES:
        out = np.empty((4, 3))
        y, ctx = bn.batch_norm_forward(x, out=out)
        assert y is out
        dx_out = np.empty((4, 3))
        assert bn.batch_norm_backward(y.copy(), ctx, out=dx_out)[0] is dx_out
        return
    library = {"jax": "jax", "dask": "dask", "torch": "torch"}.get(
        backend.backend.family, backend.backend.family
    )
    with pytest.raises(TypeError, match=f"`out`.*NumPy and CuPy.*{library}"):
        bn.batch_norm_forward(x, out=backend.asarray(np.zeros((4, 3))))
    y, ctx = bn.batch_norm_forward(x)
    with pytest.raises(TypeError, match=f"`out`.*NumPy and CuPy.*{library}"):
        bn.batch_norm_backward(y, ctx, out=backend.asarray(np.zeros((4, 3))))


# The layer


def _steps(layer, batches, dys):
    """Each step's output and input gradient (copies: the layer may reuse its
    arrays), and the arrays it returned."""
    values, returned = [], []
    for x, dy in zip(batches, dys, strict=True):
        y = layer(x)
        dx = layer.backward(dy)
        returned.append((y, dx))
        values.append((y.copy(), dx.copy()))
    return values, returned


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_reuse_buffers_gives_bitwise_the_same_steps(kernel_path, axis, dtype):
    rng = np.random.default_rng(3)
    shape = (8, 4, 6, 5) if axis == 1 else (8, 6, 5, 4)
    batches = [rng.normal(1.0, 2.0, size=shape).astype(dtype) for _ in range(4)]
    dys = [rng.normal(size=shape).astype(dtype) for _ in range(4)]
    kept = [b.copy() for b in batches + dys]
    plain = bn.BatchNorm(4, axis=axis)
    reusing = bn.BatchNorm(4, axis=axis, reuse_buffers=True)
    expected, _ = _steps(plain, batches, dys)
    got, returned = _steps(reusing, batches, dys)
    for (y, dx), (y_got, dx_got) in zip(expected, got, strict=True):
        assert_bitwise(y_got, y)
        assert_bitwise(dx_got, dx)
    assert all(y is returned[0][0] for y, _ in returned)
    assert all(dx is returned[0][1] for _, dx in returned)
    assert returned[0][0] is not returned[0][1]
    for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        assert_bitwise(getattr(reusing, name), getattr(plain, name))
    for a, b in zip(kept, batches + dys, strict=True):
        assert_bitwise(b, a)
    # Inference reuses the same array.
    plain.eval()
    reusing.eval()
    y = reusing(batches[0])
    assert y is returned[0][0]
    assert_bitwise(y, plain(batches[0]))


def test_reuse_buffers_overwrites_the_previous_output():
    layer = bn.BatchNorm(3, reuse_buffers=True)
    rng = np.random.default_rng(0)
    y1 = layer(rng.normal(size=(5, 3)))
    first = y1.copy()
    y2 = layer(rng.normal(size=(5, 3)))
    assert y2 is y1
    assert not np.array_equal(y1, first)


def test_reuse_buffers_takes_new_arrays_for_new_shapes_and_overlaps():
    rng = np.random.default_rng(0)
    layer = bn.BatchNorm(3, reuse_buffers=True)
    plain = bn.BatchNorm(3)
    x = rng.normal(size=(5, 3))
    y = layer(x)
    # Its own output as input: a new array, the same values as without reuse.
    y_again = layer(y)
    assert y_again is not y
    assert_bitwise(y_again, plain(plain(x).copy()))
    assert layer(x) is y_again  # the new array is kept
    # Another shape, another dtype: new arrays.
    y_small = layer(x[:4])
    assert y_small.shape == (4, 3) and y_small is not y_again
    y_single = layer(x.astype(np.float32))
    assert y_single.dtype == np.float32
    # The kept gradient array passed back as the gradient: a new one.
    dx = layer.backward(np.ones((5, 3), np.float32))
    dx_again = layer.backward(dx)
    assert dx_again is not dx


def test_reuse_buffers_takes_new_arrays_for_kept_ones_the_caller_changed():
    # The kept arrays are the caller's too: one made read-only is left as it
    # is and a new array takes the results.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    dy = rng.normal(size=(5, 3))
    layer = bn.BatchNorm(3, reuse_buffers=True)
    plain = bn.BatchNorm(3)
    y, dx = layer(x), layer.backward(dy)
    plain(x), plain.backward(dy)
    y.flags.writeable = False
    dx.flags.writeable = False
    frozen, flat = y.copy(), dx.copy()
    y_next, dx_next = layer(x), layer.backward(dy)
    assert y_next is not y and dx_next is not dx
    assert_bitwise(y_next, plain(x))
    assert_bitwise(dx_next, plain.backward(dy))
    assert_bitwise(y, frozen)
    assert_bitwise(dx, flat)
    assert layer(x) is y_next  # the new arrays are kept


def test_the_layer_checks_its_kept_arrays_once_per_call(monkeypatch):
    # The layer checks the arrays it passes as `out` itself; the core takes
    # them without checking them again (the public functions check theirs).
    import bnarray._core

    def refuse(*args, **kwargs):
        msg = "the layer's kept array was checked twice"
        raise AssertionError(msg)

    monkeypatch.setattr(bnarray._core, "check_out", refuse)
    rng = np.random.default_rng(0)
    layer = bn.BatchNorm(3, reuse_buffers=True)
    plain = bn.BatchNorm(3)
    for _ in range(3):
        x, dy = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
        assert_bitwise(layer(x), plain(x))
        assert_bitwise(layer.backward(dy), plain.backward(dy))
    with pytest.raises(AssertionError, match="checked twice"):
        bn.batch_norm_forward(x, out=np.empty_like(x))


def test_reuse_buffers_leaves_the_state_unchanged_on_a_bad_input():
    layer = bn.BatchNorm(3, reuse_buffers=True)
    rng = np.random.default_rng(0)
    y = layer(rng.normal(size=(5, 3)))
    dx = layer.backward(np.ones((5, 3)))
    kept = {k: np.copy(v) for k, v in vars(layer).items() if isinstance(v, np.ndarray)}
    count = layer.num_batches_tracked
    with pytest.raises(ValueError, match="`x`"):
        layer(rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="`dy`"):
        layer.backward(np.ones((4, 3)))
    assert layer.num_batches_tracked == count
    for name, value in kept.items():
        assert_bitwise(getattr(layer, name), value)
    assert layer(np.ones((5, 3))) is y
    assert layer.backward(np.ones((5, 3))) is dx


def test_copies_and_pickles_carry_no_buffers():
    rng = np.random.default_rng(0)
    layer = bn.BatchNorm(3, reuse_buffers=True)
    x = rng.normal(size=(5, 3))
    y = layer(x)
    dx = layer.backward(np.ones((5, 3)))
    for clone in (
        copy.copy(layer),
        copy.deepcopy(layer),
        pickle.loads(pickle.dumps(layer)),
    ):
        assert clone.reuse_buffers
        y_clone = clone(x)
        assert not np.shares_memory(y_clone, y)
        assert not np.shares_memory(clone.backward(np.ones((5, 3))), dx)
    assert layer(x) is y


def test_reuse_buffers_is_for_numpy_and_cupy_layers():
    for name in ("torch", "array_api_strict", "jax.numpy", "dask.array"):
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        module = pytest.importorskip(name)
        with pytest.raises(TypeError, match=r"`reuse_buffers`.*NumPy or CuPy"):
            bn.BatchNorm(3, xp=module, reuse_buffers=True)
    assert "reuse_buffers=True" in repr(bn.BatchNorm(3, reuse_buffers=True))
