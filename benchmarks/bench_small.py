"""Time one training step on the small arrays most models train with.

Run with ``nox -s bench`` (which runs this after ``bench.py``; ``-- --quick``
times two of the shapes), or directly with ``python benchmarks/bench_small.py``.

One step is what a training loop does per batch and layer: the training
forward, the running-statistics update and the backward with weight and bias.
On arrays of a few hundred KB, that step costs more in fixed work per call
(Python, argument checks, kernel dispatch) than in memory traffic. Timed, as
the median over many steps per round and the median over rounds taken in
turns:

- ``bnarray``: :func:`bnarray.batch_norm_forward`,
  :func:`bnarray.update_running_stats` and :func:`bnarray.batch_norm_backward`
  (the Numba kernels where Numba is installed);
- ``layer``: the same through :class:`bnarray.BatchNorm` (call and backward);
- ``numpy``: the functional step with the NumPy-only kernels
  (``BNARRAY_NUMBA=0``), timed where Numba is installed;
- ``numpy``'s layer step likewise (``numpy layer``);
- ``torch``: ``torch.nn.functional.batch_norm`` (running statistics updated in
  place) and autograd's backward with weight and bias, channels-last tensors
  for ``axis=-1`` on 4-D shapes;
- ``plain``: ten lines of NumPy, written for these shapes: two-pass batch
  statistics, normalize, running update, backward. No checks, no
  accuracy safeguards beyond the two passes: the cost of the arithmetic alone;
- ``corrected``: the same lines with the statistics bnarray computes, the
  corrected two passes (the mean of the deviations from the first mean
  corrects both statistics: see :func:`bnarray._math.batch_stats`), which keep
  a float32 variance exact where the mean is large against the spread and
  the first mean is off by its rounding errors. Still no checks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import bnarray as bn
from bnarray._fast import NUMBA_ENV, _cpu, kernels_for

SHAPES: list[tuple[tuple[int, ...], int]] = [
    ((64, 100), -1),
    ((256, 512), -1),
    ((32, 64, 8, 8), 1),
    ((32, 8, 8, 64), -1),
    ((8, 256, 14, 14), 1),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[2]]
DTYPES = ["float32", "float16"]
MOMENTUM = 0.1
EPS = 1e-5


def functional_step(x: np.ndarray, dy: np.ndarray, axis: int) -> Callable[[], Any]:
    channels = x.shape[axis]
    weight = np.ones(channels, dtype=np.float32)
    bias = np.zeros(channels, dtype=np.float32)
    state = [np.zeros(channels, dtype=np.float32), np.ones(channels, dtype=np.float32)]

    def step() -> Any:
        y, ctx = bn.batch_norm_forward(x, weight, bias, axis=axis, eps=EPS)
        state[:] = bn.update_running_stats(*state, ctx, momentum=MOMENTUM)
        return y, bn.batch_norm_backward(dy, ctx)

    return step


def layer_step(x: np.ndarray, dy: np.ndarray, axis: int) -> Callable[[], Any]:
    layer = bn.BatchNorm(x.shape[axis], axis=axis, eps=EPS, dtype=np.float32)

    def step() -> Any:
        return layer(x), layer.backward(dy)

    return step


class NumpyOnly:
    """A step timed with the NumPy-only kernels: ``BNARRAY_NUMBA=0`` is set
    around each of its rounds (see `step_times`), not around each step,
    whose timing would then include two updates of the environment."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __call__(self) -> Any:
        return self.fn()

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        os.environ[NUMBA_ENV] = "0"
        try:
            yield
        finally:
            del os.environ[NUMBA_ENV]


def plain_step(
    x: np.ndarray, dy: np.ndarray, axis: int, *, corrected: bool = False
) -> Callable[[], Any]:
    """Ten lines of NumPy: the step with nothing but its arithmetic; with
    `corrected`, its statistics are the corrected two passes."""
    reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = tuple(n if a == axis % x.ndim else 1 for a, n in enumerate(x.shape))
    m = x.size // x.shape[axis]
    weight = np.ones(shape, dtype=np.float32)
    bias = np.zeros(shape, dtype=np.float32)
    state = [np.zeros(shape, dtype=np.float32), np.ones(shape, dtype=np.float32)]

    def step() -> Any:
        mean = x.mean(axis=reduce, keepdims=True, dtype=np.float32)
        xc = x - mean
        var = (xc * xc).mean(axis=reduce, keepdims=True)
        if corrected:  # the deviations' mean corrects both statistics
            delta = xc.mean(axis=reduce, keepdims=True)
            var = var - delta * delta
            mean = mean + delta
            xc = x - mean
        invstd = 1 / np.sqrt(var + EPS)
        xhat = xc * invstd
        y = (xhat * weight + bias).astype(x.dtype)
        state[0] = (1 - MOMENTUM) * state[0] + MOMENTUM * mean
        state[1] = (1 - MOMENTUM) * state[1] + MOMENTUM * var * (m / (m - 1))
        dbias = dy.sum(axis=reduce, keepdims=True, dtype=np.float32)
        dweight = (dy * xhat).sum(axis=reduce, keepdims=True)
        dx = (weight * invstd / m) * (m * dy - dbias - xhat * dweight)
        return y, dx.astype(x.dtype), dweight, dbias

    return step


def torch_step(
    torch: Any, x: np.ndarray, dy: np.ndarray, axis: int
) -> Callable[[], Any]:
    import torch.nn.functional as F

    channels_last = axis == -1 and x.ndim == 4
    if axis == -1 and x.ndim > 2 and not channels_last:
        raise ValueError("torch timing takes (N, C), NCHW or NHWC")
    nchw = x.transpose(0, 3, 1, 2) if channels_last else x
    dy_nchw = dy.transpose(0, 3, 1, 2) if channels_last else dy
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xt = torch.from_numpy(np.ascontiguousarray(nchw)).contiguous(memory_format=fmt)
    dyt = torch.from_numpy(np.ascontiguousarray(dy_nchw)).contiguous(memory_format=fmt)
    xt.requires_grad_(True)
    channels = x.shape[axis]
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)

    def step() -> Any:
        y = F.batch_norm(
            xt, running_mean, running_var, weight, bias, True, MOMENTUM, EPS
        )
        return torch.autograd.grad(y, (xt, weight, bias), dyt)

    return step


def step_times(
    fns: dict[str, Callable[[], Any]], *, steps: int, rounds: int
) -> dict[str, list[float]]:
    """Per round and function, the median time of one step in seconds; the
    functions take turns round after round."""
    for fn in fns.values():
        with _environment(fn):
            for _ in range(max(3, steps // 10)):
                fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter
    for _ in range(rounds):
        for name, fn in fns.items():
            samples = []
            with _environment(fn):
                for _ in range(steps):
                    start = clock()
                    fn()
                    samples.append(clock() - start)
            times[name].append(statistics.median(samples))
    return times


def _environment(fn: Callable[[], Any]) -> contextlib.AbstractContextManager[None]:
    """The environment a step is timed in (`NumpyOnly`'s), else none."""
    return fn.environment() if isinstance(fn, NumpyOnly) else contextlib.nullcontext()


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch not installed: timing bnarray only", file=sys.stderr)
    threads = _cpu.num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    numba = kernels_for(np).__name__.endswith("_numba")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = ["float32"] if args.quick else DTYPES
    rounds = args.rounds or (3 if args.quick else 5)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    results = []
    for shape, axis in shapes:
        for dtype in dtypes:
            x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 3).astype(dtype)
            dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            fns: dict[str, Callable[[], Any]] = {
                "bnarray": functional_step(x, dy, axis),
                "layer": layer_step(x, dy, axis),
            }
            if numba:
                fns["numpy"] = NumpyOnly(functional_step(x, dy, axis))
                fns["numpy layer"] = NumpyOnly(layer_step(x, dy, axis))
            if torch is not None and (dtype == "float32" or x.ndim == 4):
                # PyTorch's CPU batch norm takes float16 in NCHW and NHWC only.
                fns["torch"] = torch_step(torch, x, dy, axis)
            fns["plain"] = plain_step(x, dy, axis)
            fns["corrected"] = plain_step(x, dy, axis, corrected=True)
            times = step_times(fns, steps=args.steps, rounds=rounds)
            row: dict[str, Any] = {"shape": list(shape), "axis": axis, "dtype": dtype}
            for name, t in times.items():
                row[f"{name}_us"] = 1e6 * statistics.median(t)
                row[f"{name}_range_us"] = [1e6 * min(t), 1e6 * max(t)]
            results.append(row)
            print_row(row, header=len(results) == 1)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": _cpu_name(),
            "threads": threads,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": None if torch is None else torch.__version__,
            "numba": numba,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "steps": args.steps,
        "rounds": rounds,
        "results": results,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


NAMES = ["bnarray", "layer", "numpy", "numpy layer", "torch", "plain", "corrected"]


def print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(
            f"{'shape':<18}{'axis':>5}{'dtype':>9}"
            + "".join(f"{n + ' µs':>15}" for n in NAMES)
            + f"{'x torch':>9}{'x plain':>9}"
        )
    cells = "".join(
        f"{row[f'{n}_us']:>15.1f}" if f"{n}_us" in row else f"{'-':>15}" for n in NAMES
    )
    vs_torch = (
        row["bnarray_us"] / row["torch_us"] if "torch_us" in row else float("nan")
    )
    vs_plain = row["bnarray_us"] / row["plain_us"]
    print(
        f"{tuple(row['shape'])!s:<18}{row['axis']:>5}{row['dtype']:>9}{cells}"
        f"{vs_torch:>9.2f}{vs_plain:>9.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, float32")
    parser.add_argument("--steps", type=int, default=200, help="steps per round")
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds (default 5, quick 3)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the results as JSON (default: benchmarks/results_small.json, "
        "not written with --quick)",
    )
    args = parser.parse_args(argv)
    data = run(args)
    output = args.output or (
        None if args.quick else Path(__file__).with_name("results_small.json")
    )
    if output is not None:
        output.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
