"""The batches the multi-process tests split over processes, and one process's step.

Imported by the worker scripts (one per engine, each run in its own processes)
and by the tests, which compare what the workers saved with one process's
bnarray on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import bnarray as bn

__all__ = [
    "CASES",
    "JAX_CASES",
    "Case",
    "check_against_one_process",
    "run_case",
    "save",
    "whole_batch",
]


@dataclass(frozen=True)
class Case:
    """A batch of ``sum(sizes)`` samples split along axis 0 into shares of `sizes`."""

    sizes: tuple[int, ...]
    tail: tuple[int, ...]
    axis: int
    error: str | None = None  # what every process must raise, if anything

    def share(self, a: np.ndarray, rank: int) -> np.ndarray:
        bounds = np.cumsum((0, *self.sizes))
        return a[bounds[rank] : bounds[rank + 1]]


# For three processes.
CASES = {
    "uneven_nchw": Case((5, 0, 7), (3, 2, 2), 1),
    "even_nchw": Case((4, 4, 4), (3, 2, 2), 1),
    "uneven_nc": Case((5, 0, 7), (4,), -1),
    "even_nc": Case((4, 4, 4), (4,), -1),
    "shares_of_one": Case((1, 1, 0), (4,), -1),
    "global_batch_of_one": Case((1, 0, 0), (4,), -1, error="ValueError"),
    "global_batch_empty": Case((0, 0, 0), (4,), -1, error="ValueError"),
}

# For four JAX devices: shard_map gives every device a share of the same size.
JAX_CASES = {
    "even_nchw": Case((2, 2, 2, 2), (3, 2, 2), 1),
    "even_nc": Case((3, 3, 3, 3), (4,), -1),
    "shares_of_one": Case((1, 1, 1, 1), (4,), -1),
}


def whole_batch(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """float64 x, dy, weight and bias of the whole batch, the same in every process."""
    rng = np.random.default_rng(seed)
    shape = (sum(case.sizes), *case.tail)
    channels = shape[case.axis]
    return {
        "x": rng.normal(2.0, 3.0, size=shape),
        "dy": rng.normal(size=shape),
        "weight": rng.normal(1.0, 0.5, size=channels),
        "bias": rng.normal(0.0, 0.5, size=channels),
    }


def run_case(
    case: Case,
    rank: int,
    sync: Any,
    asarray: Callable[[np.ndarray], Any],
    to_numpy: Callable[[Any], np.ndarray],
    *,
    autograd: Callable[[Any, Any, Any], Any] | None = None,
) -> dict[str, np.ndarray]:
    """This process's forward, backward and running update on its share.

    Returns NumPy arrays by name, or ``{"error": ...}`` with the exception's type
    and message. `autograd(x, y, dy)`, where given, returns the gradient of
    ``Σ y·dy`` with respect to `x` by the library's own autodiff.
    """
    batch = whole_batch(case)
    x = asarray(case.share(batch["x"], rank))
    dy = asarray(case.share(batch["dy"], rank))
    weight, bias = asarray(batch["weight"]), asarray(batch["bias"])
    channels = batch["weight"].shape
    try:
        y, ctx = bn.batch_norm_forward(x, weight, bias, axis=case.axis, sync=sync)
    except (TypeError, ValueError) as error:
        return {"error": np.array(f"{type(error).__name__}: {error}")}
    dx, dweight, dbias = bn.batch_norm_backward(dy, ctx)
    running_mean, running_var = bn.update_running_stats(
        asarray(np.zeros(channels)), asarray(np.ones(channels)), ctx
    )
    results = {
        "y": y,
        "dx": dx,
        "dweight": dweight,
        "dbias": dbias,
        "mean": ctx.mean,
        "var": ctx.var,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    if autograd is not None:
        results["dx_autograd"] = autograd(x, y, dy)
    saved = {name: to_numpy(a) for name, a in results.items()}
    saved["count"] = np.array(ctx.count)
    return saved


def save(path: str, results: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``{kind/case: {name: array}}`` as one .npz with keys ``kind/case/name``."""
    flat = {
        f"{where}/{name}": value
        for where, arrays in results.items()
        for name, value in arrays.items()
    }
    np.savez(path, **flat)


def check_against_one_process(
    case: Case, ranks: list[dict[str, np.ndarray]], *, tolerance: float = 1e-12
) -> None:
    """Each process's results against one process's bnarray on the whole batch.

    `y`, `dx` (and `dx_autograd`) of every share equal the matching rows of
    one process's; the batch statistics and count are the whole batch's; the
    running statistics are identical on every process and equal one process's;
    `dweight` and `dbias` sum over the processes to one process's.
    """
    if case.error is not None:
        for rank, results in enumerate(ranks):
            assert "error" in results, f"process {rank} did not raise"
            message = str(results["error"])
            assert message.startswith(case.error), message
            assert "every process" in message or "all processes" in message, message
        return
    for rank, results in enumerate(ranks):
        assert "error" not in results, f"process {rank}: {results['error']}"
    batch = whole_batch(case)
    y, ctx = bn.batch_norm_forward(
        batch["x"], batch["weight"], batch["bias"], axis=case.axis
    )
    dx, dweight, dbias = bn.batch_norm_backward(batch["dy"], ctx)
    channels = batch["weight"].shape
    running = bn.update_running_stats(np.zeros(channels), np.ones(channels), ctx)
    close = {"rtol": tolerance, "atol": tolerance}
    for rank, results in enumerate(ranks):
        np.testing.assert_allclose(results["y"], case.share(y, rank), **close)
        np.testing.assert_allclose(results["dx"], case.share(dx, rank), **close)
        if "dx_autograd" in results:
            np.testing.assert_allclose(
                results["dx_autograd"], case.share(dx, rank), **close
            )
        np.testing.assert_allclose(results["mean"], ctx.mean, **close)
        np.testing.assert_allclose(results["var"], ctx.var, **close)
        assert int(results["count"]) == ctx.count
        for name, expected in zip(
            ("running_mean", "running_var"), running, strict=True
        ):
            np.testing.assert_array_equal(results[name], ranks[0][name])
            np.testing.assert_allclose(results[name], expected, **close)
    total = {name: sum(r[name] for r in ranks) for name in ("dweight", "dbias")}
    np.testing.assert_allclose(total["dweight"], dweight, **close)
    np.testing.assert_allclose(total["dbias"], dbias, **close)
