"""Accuracy: float32 statistics, outputs and gradients stay within stated bounds
of a float64 reference on adversarial data, in every memory layout, on every
backend and every kernel path.

The data: a large mean against the spread (mean/std = 10⁴ and 10⁵), millions
of values per channel, and a batch whose first sample lies far from the rest.
The layouts: contiguous, a column slice, a reversed view, a transposed view,
a broadcast view and NCHW. The bounds are those the docs' numerics page
states; `_bounds` says how each one scales.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference

import bnarray as bn
from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV

EPS32 = float(np.finfo(np.float32).eps)  # 2⁻²³


def _bounds(ratio: float) -> dict[str, float]:
    """The largest errors allowed for float32 data of mean/std `ratio`.

    - ``mean``: in standard deviations, 10⁻⁴ beyond its rounding to float32
      (half an ulp of μ, up to 2⁻²⁴·|μ|/σ); ``var``: relative, 10⁻⁴. Both are
      limited by the sums, whatever their order.
    - ``y`` (absolute, y has unit spread) and ``dx`` (relative to max|dx|):
      float32 holds x, and so x − μ, only to half an ulp of x, that is
      2⁻²⁴·|μ|/σ standard deviations; a few of those, plus a few roundings.
    - ``dweight``, ``dbias``: relative to Σ|dy·x̂| and Σ|dy| (no cancellation
      can then hide behind a small sum); as ``y`` for dweight.
    - running statistics: relative, as ``mean`` and ``var``.
    """
    spread = 4 * EPS32 * (ratio + 8)
    return {
        "mean": 1e-4 + EPS32 * ratio,
        "var": 1e-4,
        "y": spread,
        "dx": spread,
        "dweight": spread,
        "dbias": 1e-5,
        "running_mean": 1e-6,
        "running_var": 1e-4,
    }


# Values per channel: large enough that a float32 sum of them, added one at a
# time, loses the mean (2²¹ ≈ 2.1 million).
COUNT = 1 << 21
CHANNELS = 2


def _data(ratio: float, *, far_first: bool, seed: int) -> np.ndarray:
    """(COUNT, CHANNELS) float32 values of mean ``ratio·σ`` and σ = 1 (rounded)."""
    rng = np.random.default_rng(seed)
    x = ratio + rng.standard_normal((COUNT, CHANNELS))
    if far_first:
        x[0] += 1e3  # a first sample a thousand standard deviations away
    return x.astype(np.float32)


# Each layout: how to build the backend array from (COUNT, CHANNELS) data, the
# same view in NumPy (the reference's input), and the channel axis.
def _contiguous(xp, backend, a):
    return backend.asarray(a)


def _column_slice(xp, backend, a):
    wide = np.concatenate([a, a[:, :1]], axis=1)  # one column more, sliced off
    return backend.asarray(wide)[:, :CHANNELS]


def _reversed(xp, backend, a):
    flipped = np.ascontiguousarray(a[::-1])
    return xp.flip(backend.asarray(flipped), axis=0)  # `a` again, as a reversed view


def _transposed(xp, backend, a):
    return xp.permute_dims(backend.asarray(np.ascontiguousarray(a.T)), (1, 0))


def _broadcast(xp, backend, a):
    # Every sample repeated 4 times along a new axis of stride 0.
    rows = backend.asarray(a[: COUNT // 4])
    return xp.broadcast_to(
        xp.reshape(rows, (COUNT // 4, 1, CHANNELS)), (COUNT // 4, 4, CHANNELS)
    )


def _nchw(xp, backend, a):
    # (N, C, H, W) with the samples of each channel in its images.
    images = a.reshape(128, 128, 128, CHANNELS).transpose(0, 3, 1, 2)
    return backend.asarray(np.ascontiguousarray(images))


LAYOUTS = {
    "contiguous": (_contiguous, -1),
    "column slice": (_column_slice, -1),
    "reversed": (_reversed, -1),
    "transposed": (_transposed, -1),
    "broadcast": (_broadcast, -1),
    "NCHW": (_nchw, 1),
}


def _reference_input(layout: str, a: np.ndarray) -> np.ndarray:
    if layout == "broadcast":
        rows = a[: COUNT // 4]
        return np.broadcast_to(rows[:, None, :], (COUNT // 4, 4, CHANNELS))
    if layout == "NCHW":
        return a.reshape(128, 128, 128, CHANNELS).transpose(0, 3, 1, 2)
    return a


def _kernel_paths(backend) -> list[str]:
    """The kernels a backend's arrays can take: NumPy has three."""
    if backend.backend.family == "numpy":
        return ["numba", "numpy", "generic"]
    return ["default"]


def _use(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    if path == "generic":
        monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    elif path == "numpy":
        monkeypatch.setenv(NUMBA_ENV, "0")


def _operands(x_ref: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """γ, β and dy for `x_ref`, and the float64 reference's results."""
    rng = np.random.default_rng(7)
    channel = x_ref.shape[axis]
    weight = rng.uniform(0.5, 1.5, channel).astype(np.float32)
    bias = rng.normal(size=channel).astype(np.float32)
    dy = rng.standard_normal(x_ref.shape).astype(np.float32)
    y, mean, var = reference.forward(x_ref, weight, bias, axis=axis)
    dx, dweight, dbias = reference.backward(dy, x_ref, weight, axis=axis)
    running_mean, running_var = reference.update_running_stats(
        np.zeros(channel), np.ones(channel), x_ref, axis=axis, momentum=0.1
    )
    reduce_axes = tuple(a for a in range(x_ref.ndim) if a != axis % x_ref.ndim)
    kept = [1] * x_ref.ndim
    kept[axis] = channel
    xhat = (x_ref - mean.reshape(kept)) / np.sqrt(var).reshape(kept)
    dy64 = dy.astype(np.float64)
    return {
        "weight": weight,
        "bias": bias,
        "dy": dy,
        "mean": mean,
        "var": var,
        "y": y,
        "dx": dx,
        "dweight": dweight,
        "dbias": dbias,
        "running_mean": running_mean,
        "running_var": running_var,
        # What the errors are measured against (see `_bounds`).
        "y scale": weight.reshape(kept).astype(np.float64),
        "dweight scale": np.sum(np.abs(dy64 * xhat), axis=reduce_axes),
        "dbias scale": np.sum(np.abs(dy64), axis=reduce_axes),
    }


def _errors(backend, x, ref: dict[str, np.ndarray], axis: int) -> dict[str, float]:
    """Every output's error against the float64 reference, as `_bounds` measures it."""
    channel = ref["mean"].size
    weight, bias = backend.asarray(ref["weight"]), backend.asarray(ref["bias"])
    y, ctx = bn.batch_norm_forward(x, weight, bias, axis=axis)
    dx, dweight, dbias = bn.batch_norm_backward(backend.asarray(ref["dy"]), ctx)
    rm, rv = bn.update_running_stats(
        backend.asarray(np.zeros(channel, np.float32)),
        backend.asarray(np.ones(channel, np.float32)),
        ctx,
        momentum=0.1,
    )
    outputs = {
        "mean": ctx.mean,
        "var": ctx.var,
        "y": y,
        "dx": dx,
        "dweight": dweight,
        "dbias": dbias,
        "running_mean": rm,
        "running_var": rv,
    }
    got = {k: backend.to_numpy(a).astype(np.float64) for k, a in outputs.items()}
    diff = {k: np.abs(got[k] - ref[k]) for k in got}
    return {
        "mean": float(np.max(diff["mean"] / np.sqrt(ref["var"]))),
        "var": float(np.max(diff["var"] / ref["var"])),
        "y": float(np.max(diff["y"] / ref["y scale"])),
        "dx": float(np.max(diff["dx"]) / np.max(np.abs(ref["dx"]))),
        "dweight": float(np.max(diff["dweight"] / ref["dweight scale"])),
        "dbias": float(np.max(diff["dbias"] / ref["dbias scale"])),
        "running_mean": float(
            np.max(diff["running_mean"] / np.abs(ref["running_mean"]))
        ),
        "running_var": float(np.max(diff["running_var"] / ref["running_var"])),
    }


def _check(errors: dict[str, float], ratio: float, what: str) -> None:
    bounds = _bounds(ratio)
    over = {
        k: f"{e:.2e} > {bounds[k]:.2e}" for k, e in errors.items() if not e <= bounds[k]
    }
    assert not over, f"{what}: {over}"


def _check_every_path(backend, monkeypatch, a: np.ndarray, layout: str, ratio: float):
    """`a` in `layout` on every kernel path of `backend`, within the bounds."""
    make, axis = LAYOUTS[layout]
    x_ref = _reference_input(layout, a)
    ref = _operands(x_ref, axis)
    for path in _kernel_paths(backend):
        _use(path, monkeypatch)
        x = make(backend.xp, backend, a)
        assert tuple(x.shape) == x_ref.shape
        _check(_errors(backend, x, ref, axis), ratio, f"{layout}, {path} kernels")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("ratio", [1e4, 1e5])
def test_float32_results_stay_within_the_bounds_for_a_large_mean(
    backend, monkeypatch, layout, ratio
):
    a = _data(ratio, far_first=False, seed=int(math.log10(ratio)))
    _check_every_path(backend, monkeypatch, a, layout, ratio)


@pytest.mark.parametrize("layout", ["contiguous", "column slice", "NCHW"])
def test_a_first_sample_far_from_the_rest_does_not_cost_accuracy(
    backend, monkeypatch, layout
):
    a = _data(1e4, far_first=True, seed=5)
    _check_every_path(backend, monkeypatch, a, layout, 1e4)


def test_the_bounds_catch_a_one_pass_variance():
    """The suite can fail: E[x²] − E[x]² in float32 misses the variance bound by far."""
    a = _data(1e4, far_first=False, seed=4).astype(np.float64)
    exact = a.var(axis=0)
    one_pass = (
        np.mean(a * a, axis=0, dtype=np.float32) - np.mean(a, axis=0) ** 2
    ).astype(np.float64)
    assert np.max(np.abs(one_pass - exact) / exact) > 100 * _bounds(1e4)["var"]


# At the edges of the float32 range.


def test_tiny_values_with_eps_zero_give_a_finite_accurate_gradient(backend):
    """var ≈ 10⁻³⁴ and eps = 0: invstd ≈ 10¹⁷, and invstd² times Σ dy·x̂ ≈ m
    would overflow float32; the true dx (≈ 10¹⁷) fits, and so does every
    intermediate. (Smaller values have subnormal squares, which some backends
    flush to zero.)"""
    rng = np.random.default_rng(11)
    z = rng.standard_normal((1 << 16, 3))
    x_np = (1e-17 * z).astype(np.float32)
    dy_np = (z + rng.standard_normal(z.shape)).astype(np.float32)  # Σ dy·x̂ ≈ m
    x, dy = backend.asarray(x_np), backend.asarray(dy_np)
    _, ctx = bn.batch_norm_forward(x, eps=0.0)
    dx, dweight, dbias = bn.batch_norm_backward(dy, ctx)
    dx_ref, dweight_ref, dbias_ref = reference.backward(dy_np, x_np, eps=0.0)
    dx_np = backend.to_numpy(dx).astype(np.float64)
    assert np.all(np.isfinite(dx_np))
    assert np.max(np.abs(dx_np - dx_ref)) <= 1e-4 * np.max(np.abs(dx_ref))
    np.testing.assert_allclose(backend.to_numpy(dweight), dweight_ref, rtol=1e-4)
    np.testing.assert_allclose(backend.to_numpy(dbias), dbias_ref, rtol=1e-5)


# NumPy warns of ∞ − ∞, as it should.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_poison_only_their_own_channel(backend):
    """A NaN or an infinity in one channel makes that channel's statistics, y and
    gradients NaN; the other channels come out as without it."""
    rng = np.random.default_rng(12)
    x_np = rng.normal(3.0, 2.0, (64, 4)).astype(np.float32)
    dy_np = rng.standard_normal((64, 4)).astype(np.float32)
    x_np[5, 1] = np.nan
    x_np[9, 2] = np.inf
    y, ctx = bn.batch_norm_forward(backend.asarray(x_np))
    dx, dweight, dbias = bn.batch_norm_backward(backend.asarray(dy_np), ctx)
    clean = [0, 3]
    y_ref, mean_ref, var_ref = reference.forward(x_np[:, clean])
    dx_ref, dweight_ref, _ = reference.backward(dy_np[:, clean], x_np[:, clean])
    y, dx = backend.to_numpy(y), backend.to_numpy(dx)
    mean, var = backend.to_numpy(ctx.mean), backend.to_numpy(ctx.var)
    dweight = backend.to_numpy(dweight)
    for bad in (1, 2):
        assert np.isnan(var[bad]) and np.all(np.isnan(y[:, bad]))
        assert np.all(np.isnan(dx[:, bad])) and np.isnan(dweight[bad])
    np.testing.assert_allclose(mean[clean], mean_ref, rtol=1e-6)
    np.testing.assert_allclose(var[clean], var_ref, rtol=1e-5)
    np.testing.assert_allclose(y[:, clean], y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx[:, clean], dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dweight[clean], dweight_ref, rtol=1e-4, atol=1e-4)
    # Σ dy does not involve x: every channel keeps it.
    np.testing.assert_allclose(backend.to_numpy(dbias), dy_np.sum(axis=0), rtol=1e-5)
