"""A float64 NumPy batch normalization written for clarity, not speed: the test oracle.

Every function moves the kept (channel) axes to the end and flattens the rest
into one axis of m samples, so the formulas read as in Ioffe & Szegedy (2015).
The backward pass follows the paper's step-by-step chain rule (through μ and σ²),
not the compact formula the library uses.
"""

from __future__ import annotations

import numpy as np

__all__ = ["backward", "forward", "update_running_stats"]


def _kept_axes(axis: int | tuple[int, ...], ndim: int) -> list[int]:
    axes = axis if isinstance(axis, tuple) else (axis,)
    return sorted(a % ndim for a in axes)


def _to_rows(a: np.ndarray, kept: list[int]) -> np.ndarray:
    """(m, C) view: samples along axis 0, channels (flattened kept axes) along axis 1."""
    reduced = [i for i in range(a.ndim) if i not in kept]
    moved = np.transpose(a, reduced + kept)
    channels = int(np.prod([a.shape[i] for i in kept]))
    return moved.reshape(-1, channels)


def _from_rows(rows: np.ndarray, like: np.ndarray, kept: list[int]) -> np.ndarray:
    reduced = [i for i in range(like.ndim) if i not in kept]
    order = reduced + kept
    moved_shape = [like.shape[i] for i in order]
    return np.transpose(rows.reshape(moved_shape), np.argsort(order))


def forward(
    x,
    weight=None,
    bias=None,
    *,
    axis=-1,
    eps=1e-5,
    training=True,
    running_mean=None,
    running_var=None,
):
    """Returns y and (mean, biased var) with the kept axes' shape."""
    x = np.asarray(x, dtype=np.float64)
    kept = _kept_axes(axis, x.ndim)
    channel_shape = tuple(x.shape[i] for i in kept)
    rows = _to_rows(x, kept)
    m = rows.shape[0]
    if training:
        mean = rows.sum(axis=0) / m
        var = ((rows - mean) ** 2).sum(axis=0) / m
    else:
        mean = np.asarray(running_mean, dtype=np.float64).reshape(-1)
        var = np.asarray(running_var, dtype=np.float64).reshape(-1)
    xhat = (rows - mean) / np.sqrt(var + eps)
    gamma = 1.0 if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
    beta = 0.0 if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    y = _from_rows(xhat * gamma + beta, x, kept)
    return y, mean.reshape(channel_shape), var.reshape(channel_shape)


def backward(
    dy,
    x,
    weight=None,
    *,
    axis=-1,
    eps=1e-5,
    training=True,
    running_mean=None,
    running_var=None,
):
    """Returns dx, dweight, dbias by the chain rule through μ and σ²."""
    x = np.asarray(x, dtype=np.float64)
    kept = _kept_axes(axis, x.ndim)
    channel_shape = tuple(x.shape[i] for i in kept)
    rows = _to_rows(x, kept)
    drows = _to_rows(np.asarray(dy, dtype=np.float64), kept)
    m = rows.shape[0]
    gamma = 1.0 if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
    if training:
        mu = rows.sum(axis=0) / m
        var = ((rows - mu) ** 2).sum(axis=0) / m
    else:
        mu = np.asarray(running_mean, dtype=np.float64).reshape(-1)
        var = np.asarray(running_var, dtype=np.float64).reshape(-1)
    xmu = rows - mu
    std = np.sqrt(var + eps)
    xhat = xmu / std
    dbias = drows.sum(axis=0)
    dweight = (drows * xhat).sum(axis=0)
    dxhat = drows * gamma
    if training:
        dvar = (dxhat * xmu).sum(axis=0) * -0.5 * (var + eps) ** -1.5
        dmu = (-dxhat / std).sum(axis=0) + dvar * (-2.0 * xmu).sum(axis=0) / m
        dx_rows = dxhat / std + dvar * 2.0 * xmu / m + dmu / m
    else:
        dx_rows = dxhat / std
    dx = _from_rows(dx_rows, x, kept)
    return dx, dweight.reshape(channel_shape), dbias.reshape(channel_shape)


def update_running_stats(
    running_mean,
    running_var,
    x,
    *,
    axis=-1,
    momentum=0.1,
    num_batches_tracked=None,
    unbiased=True,
):
    """PyTorch's update: unbiased batch variance (biased with `unbiased` False, as
    Keras and Flax); momentum None = cumulative average."""
    _, mean, var = forward(x, axis=axis)
    kept = _kept_axes(axis, np.ndim(x))
    m = np.prod([np.shape(x)[i] for i in range(np.ndim(x)) if i not in kept])
    batch_var = var * m / (m - 1) if unbiased else var
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    new_mean = (1 - factor) * np.asarray(running_mean, np.float64) + factor * mean
    new_var = (1 - factor) * np.asarray(running_var, np.float64) + factor * batch_var
    return new_mean, new_var
