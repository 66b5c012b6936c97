"""Time bnarray's NumPy kernels against PyTorch CPU and the machine's copy bandwidth.

Run with ``nox -s bench`` (``nox -s bench -- --quick`` for a short run), or
directly with ``python benchmarks/bench.py`` in an environment that has
bnarray, NumPy and PyTorch.

For every shape, layout (NCHW with ``axis=1``, NHWC with ``axis=-1``) and dtype
it times, as the median over repeated runs after a warm-up:

- ``fwd``: training forward (batch statistics, normalize, running-stat update);
- ``bwd``: training backward (dx, dweight, dbias) given the forward's context;
- ``fwd+bwd``: both;
- ``infer``: inference forward with running statistics;

for bnarray's NumPy fast path (``bnarray``: the Numba loops where Numba is
installed), the same writing into arrays of earlier calls (``out``: the
``out=`` of forward and backward; its best round is reported too, since fresh
pages are what makes rounds differ), the same without Numba (``numpy``, with ``BNARRAY_NUMBA=0``; only
timed when Numba is installed), bnarray's generic array-API path (``generic``,
with ``BNARRAY_GENERIC=1``) and PyTorch's ``F.batch_norm`` with autograd
(``torch``, with as many threads as bnarray uses; channels-last tensors for
NHWC). The roof is the time the memory traffic of an
operation would take at the bandwidth of a large NumPy copy: the training
forward reads x twice and writes y, the backward reads x and dy twice and
writes dx, inference reads x and writes y. The floor is measured: the
fastest round of the same calls made of the least any implementation must do
(each input read once, each output written once into a new array; see
`floor_case`). "Extra memory" is the peak of
NumPy allocations during the call beyond its outputs (traced with
:mod:`tracemalloc`; not available for PyTorch).

A full run (or ``--mask`` alone) also times a masked training forward+backward
(``mask=``, True on 90 % of the positions, chosen at random) against the
unmasked one on the fast path and on the generic path, for one image shape and
one sequence shape (`MASK_SHAPES`): masked calls run the generic kernels.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import bnarray as bn
from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV, _cpu, kernels_for

SHAPES = [(32, 64, 56, 56), (256, 256, 14, 14), (64, 128, 56, 56)]
QUICK_SHAPES = [(32, 64, 56, 56)]
LAYOUTS = {"NCHW": 1, "NHWC": -1}
DTYPES = ["float32", "float16"]
OPS = ["fwd", "bwd", "fwd+bwd", "infer"]
# Full-size arrays each operation must move: reads + writes, in units of x.nbytes.
TRAFFIC = {"fwd": 3, "bwd": 5, "fwd+bwd": 8, "infer": 2}
# (shape, channel axis) of the masked-call table: an NCHW image batch and a
# (batch, time, channels) sequence batch.
MASK_SHAPES = [((32, 64, 56, 56), 1), ((64, 128, 256), -1)]
MASK_KEPT = 0.9


# Pause before each timed call. PyTorch's OpenMP threads keep spinning for
# several milliseconds after a call (libgomp's default GOMP_SPINCOUNT; pause
# instructions are slow on AMD Zen): without the pause they compete for the
# cores with whatever is timed next. Measured here: bnarray's 32×64×56×56
# float16 fwd+bwd took 4.5 ms after another bnarray call, 6.7 ms right after
# a PyTorch call.
SETTLE_SECONDS = 0.02


def round_times(
    fns: dict[str, Callable[[], Any]], *, repeat: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times of each function in seconds, one per round.

    The functions take turns, round after round, so that a change in the
    machine's load during the run affects all of them alike; each timed call
    starts after a pause of `SETTLE_SECONDS` (untimed).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc.disable()  # a collection takes ~0.1 s once PyTorch is imported
    try:
        for _ in range(repeat):
            for name, fn in fns.items():
                time.sleep(SETTLE_SECONDS)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def median_times(
    fns: dict[str, Callable[[], Any]], *, repeat: int, warmup: int
) -> dict[str, float]:
    """Median wall time of each function in seconds (see `round_times`)."""
    times = round_times(fns, repeat=repeat, warmup=warmup)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(*, nbytes: int = 1 << 28, repeat: int = 7) -> float:
    """Bytes per second (read + write) of a large NumPy copy."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    t = median_times({"copy": lambda: np.copyto(dst, src)}, repeat=repeat, warmup=2)
    return 2 * nbytes / t["copy"]


def extra_memory(fn: Callable[[], Any]) -> int:
    """Peak NumPy memory allocated by `fn` beyond the arrays it returns, in bytes."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sum(a.nbytes for a in out if isinstance(a, np.ndarray))
    return max(0, peak - base - kept)


def numpy_case(
    x: np.ndarray, dy: np.ndarray, axis: int, *, buffers: bool = False
) -> dict[str, Callable[[], Any]]:
    """The four operations on bnarray's public API, returning their full-size
    outputs: new arrays, or with `buffers` the same two arrays every call
    (``out=``)."""
    y_out = np.empty_like(x, order="C") if buffers else None
    dx_out = np.empty_like(x, order="C") if buffers else None
    c = x.shape[axis]
    rng = np.random.default_rng(1)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, ctx = bn.batch_norm_forward(x, w, b, axis=axis)

    def fwd() -> tuple[Any, ...]:
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis, out=y_out)
        bn.update_running_stats(rm, rv, ctx)
        return (y,)

    def bwd() -> tuple[Any, ...]:
        dx, _, _ = bn.batch_norm_backward(dy, ctx, out=dx_out)
        return (dx,)

    def fwd_bwd() -> tuple[Any, ...]:
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis, out=y_out)
        bn.update_running_stats(rm, rv, ctx)
        dx, _, _ = bn.batch_norm_backward(dy, ctx, out=dx_out)
        return (y, dx)

    def infer() -> tuple[Any, ...]:
        y, _ = bn.batch_norm_forward(
            x,
            w,
            b,
            axis=axis,
            training=False,
            running_mean=rm,
            running_var=rv,
            out=y_out,
        )
        return (y,)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "infer": infer}


def masked_case(
    x: np.ndarray, dy: np.ndarray, axis: int, mask: np.ndarray
) -> dict[str, Callable[[], Any]]:
    """Training forward+backward with and without `mask`, on bnarray's public API."""
    c = x.shape[axis]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    def fwd_bwd(mask: np.ndarray | None) -> tuple[Any, ...]:
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis, mask=mask)
        bn.update_running_stats(rm, rv, ctx)
        dx, _, _ = bn.batch_norm_backward(dy, ctx)
        return (y, dx)

    def unmasked() -> tuple[Any, ...]:
        return fwd_bwd(None)

    def masked() -> tuple[Any, ...]:
        return fwd_bwd(mask)

    return {"unmasked": unmasked, "generic": generic(unmasked), "masked": masked}


def run_masked(repeat: int) -> list[dict[str, Any]]:
    """The masked-call table: fwd+bwd times in ms and the masked/unmasked ratios."""
    print(
        f"\nMasked training fwd+bwd, float32, mask True on {MASK_KEPT:.0%} of the "
        f"positions; median of {repeat}"
    )
    header = (
        f"{'shape':<16}{'axis':>5}{'unmasked ms':>12}{'generic ms':>11}"
        f"{'masked ms':>10}{'x unmasked':>11}{'x generic':>10}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(2)
    rows = []
    for shape, axis in MASK_SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32) * 2 + 3
        dy = rng.standard_normal(shape, dtype=np.float32)
        mask_shape = tuple(n for a, n in enumerate(shape) if a != axis % len(shape))
        mask = rng.random(mask_shape) < MASK_KEPT
        ms = {
            impl: 1e3 * t
            for impl, t in median_times(
                masked_case(x, dy, axis, mask), repeat=repeat, warmup=1
            ).items()
        }
        row = {
            "shape": list(shape),
            "axis": axis,
            "dtype": "float32",
            "mask_true_fraction": float(mask.mean()),
            **{f"{impl}_ms": t for impl, t in ms.items()},
        }
        rows.append(row)
        print(
            f"{'x'.join(map(str, shape)):<16}{axis:>5}{ms['unmasked']:>12.2f}"
            f"{ms['generic']:>11.2f}{ms['masked']:>10.2f}"
            f"{ms['masked'] / ms['unmasked']:>11.2f}"
            f"{ms['masked'] / ms['generic']:>10.2f}",
            flush=True,
        )
    return rows


def torch_case(
    torch: Any, x: np.ndarray, dy: np.ndarray, axis: int
) -> dict[str, Callable[[], Any]]:
    """The same operations with ``torch.nn.functional.batch_norm`` and autograd."""
    functional = torch.nn.functional
    c = x.shape[axis]

    def tensor(a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
        # NHWC memory seen as an NCHW tensor is PyTorch's channels_last format.
        return t.permute(0, 3, 1, 2) if axis == -1 else t

    xt = tensor(x).requires_grad_(True)
    dyt = tensor(dy)
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)).requires_grad_(
        True
    )
    b = torch.from_numpy(rng.standard_normal(c).astype(np.float32)).requires_grad_(True)
    rm, rv = torch.zeros(c), torch.ones(c)

    def forward() -> Any:
        return functional.batch_norm(
            xt, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5
        )

    y_kept = forward()

    def fwd() -> tuple[Any, ...]:
        return (forward(),)

    def bwd() -> tuple[Any, ...]:
        return torch.autograd.grad(y_kept, [xt, w, b], dyt, retain_graph=True)

    def fwd_bwd() -> tuple[Any, ...]:
        y = forward()
        return (y, *torch.autograd.grad(y, [xt, w, b], dyt))

    def infer() -> tuple[Any, ...]:
        with torch.no_grad():
            return (functional.batch_norm(xt, rm, rv, w, b, training=False, eps=1e-5),)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "infer": infer}


def floor_case(
    x: np.ndarray, dy: np.ndarray, pool: ThreadPoolExecutor, threads: int
) -> dict[str, Callable[[], Any]]:
    """The least any implementation must do: each input read once, each output
    written once into a new array, no arithmetic.

    The forward copies `x` into a new `y`; the backward writes a new `dx`
    from one read of `x` and `dy` (their bits or-ed, an integer ufunc that
    runs at memory speed in every dtype). The arrays are split into as many
    parts as there are threads, each part on its own thread (NumPy releases
    the GIL for both ufuncs). A batch normalization that keeps nothing between
    calls must read `x` again between its statistics and its normalization
    (and `x` and `dy` in the backward), so it can approach this time only
    where the second read finds the data in a cache.
    """
    bits = np.dtype(f"u{x.itemsize}")

    def parts(*arrays: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        flat = [a.reshape(-1).view(bits) for a in arrays]
        edges = np.linspace(0, flat[0].size, threads + 1).astype(int)
        return [tuple(a[i:j] for a in flat) for i, j in itertools.pairwise(edges)]

    def forward() -> np.ndarray:
        y = np.empty_like(x)
        list(pool.map(lambda p: np.copyto(p[1], p[0]), parts(x, y)))
        return y

    def backward() -> np.ndarray:
        dx = np.empty_like(dy)
        list(pool.map(lambda p: np.bitwise_or(p[0], p[1], out=p[2]), parts(x, dy, dx)))
        return dx

    # Every byte of the outputs is written, from the inputs (checked once).
    xb, dyb = x.view(bits), dy.view(bits)
    if not (
        np.array_equal(forward().view(bits), xb)
        and np.array_equal(backward().view(bits), xb | dyb)
    ):
        msg = "the floor's copies are wrong"
        raise RuntimeError(msg)

    return {
        "fwd": lambda: (forward(),),
        "bwd": lambda: (backward(),),
        "fwd+bwd": lambda: (forward(), backward()),
        "infer": lambda: (forward(),),
    }


def with_env(fn: Callable[[], Any], name: str, value: str) -> Callable[[], Any]:
    """`fn` run with the environment variable `name` set to `value`."""

    def wrapped() -> Any:
        os.environ[name] = value
        try:
            return fn()
        finally:
            del os.environ[name]

    return wrapped


def generic(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with bnarray's generic array-API kernels instead of the NumPy ones."""
    return with_env(fn, FORCE_GENERIC_ENV, "1")


def numpy_only(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with the NumPy-only kernels where Numba is installed."""
    return with_env(fn, NUMBA_ENV, "0")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numba_version() -> str:
    import numba

    return str(numba.__version__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch not installed: timing bnarray only", file=sys.stderr)
    threads = _cpu.num_threads()
    numba = kernels_for(np).__name__.endswith("_numba")
    if not numba:
        print("Numba not installed: timing the NumPy-only kernels", file=sys.stderr)
    if torch is not None:
        torch.set_num_threads(threads)
    shapes = [] if args.mask else QUICK_SHAPES if args.quick else SHAPES
    if args.shape and not args.mask:
        shapes = [tuple(int(n) for n in args.shape.split(","))]
    dtypes = ["float32"] if args.quick else DTYPES
    repeat = args.repeat or (3 if args.quick else 7)
    load_before = os.getloadavg()[0]
    bandwidth = copy_bandwidth()
    print(
        f"{cpu_name()}, {threads} threads, NumPy {np.__version__}"
        + (f", Numba {numba_version()}" if numba else "")
        + (f", PyTorch {torch.__version__}" if torch is not None else "")
        + f"; copy bandwidth {bandwidth / 1e9:.1f} GB/s; median of {repeat}"
    )
    results = []
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(threads)
    for nchw in shapes:
        for layout, axis in LAYOUTS.items():
            shape = nchw if axis == 1 else (nchw[0], nchw[2], nchw[3], nchw[1])
            for dtype in dtypes:
                x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 3).astype(dtype)
                dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                fns = numpy_case(x, dy, axis)
                cases = {"bnarray": fns, "out": numpy_case(x, dy, axis, buffers=True)}
                if numba:
                    cases["numpy"] = {k: numpy_only(f) for k, f in fns.items()}
                if not args.no_generic:
                    cases["generic"] = {k: generic(f) for k, f in fns.items()}
                if torch is not None:
                    cases["torch"] = torch_case(torch, x, dy, axis)
                cases["floor"] = floor_case(x, dy, pool, threads)
                for op in OPS:
                    row: dict[str, Any] = {
                        "shape": list(nchw),
                        "layout": layout,
                        "dtype": dtype,
                        "op": op,
                        "input_mb": x.nbytes / 1e6,
                        "roof_ms": 1e3 * TRAFFIC[op] * x.nbytes / bandwidth,
                    }
                    ops = {impl: fns[op] for impl, fns in cases.items()}
                    warmup = 1 if x.nbytes > 50e6 else 2
                    for impl, t in round_times(
                        ops, repeat=repeat, warmup=warmup
                    ).items():
                        # The floor is a bound: its fastest round, the others'
                        # medians.
                        best = min(t) if impl == "floor" else statistics.median(t)
                        row[f"{impl}_ms"] = 1e3 * best
                        row[f"{impl}_best_ms"] = 1e3 * min(t)
                    for impl in ("bnarray", "numpy", "generic"):
                        if impl in ops:
                            row[f"{impl}_extra_mb"] = extra_memory(ops[impl]) / 1e6
                    results.append(row)
                    print_row(row, header=len(results) == 1)
    pool.shutdown()
    masked = None if args.quick else run_masked(repeat)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": cpu_name(),
            "threads": threads,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba_version() if numba else None,
            "torch": None if torch is None else torch.__version__,
            "copy_bandwidth_gbs": bandwidth / 1e9,
            # Other work on the machine slows every implementation; they take
            # turns, so the ratios suffer less than the times.
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "repeat": repeat,
        "results": results,
        "masked": masked,
    }


COLUMNS = (
    f"{'shape':<16}{'layout':<7}{'dtype':<8}{'op':<8}{'torch ms':>9}"
    f"{'bnarray ms':>11}{'x torch':>8}{'% roof':>7}{'extra MB':>9}"
    f"{'numpy ms':>10}{'x torch':>8}"
    f"{'generic ms':>11}{'x torch':>8}{'extra MB':>9}{'roof ms':>8}"
    f"{'floor ms':>9}{'x torch':>8}"
    f"{'out ms':>8}{'x torch':>8}{'best':>7}{'med/best':>9}"
)


def ratio(row: dict[str, Any], impl: str) -> float | None:
    if "torch_ms" not in row:
        return None
    return row[f"{impl}_ms"] / row["torch_ms"]


def print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(COLUMNS)
        print("-" * len(COLUMNS))

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    shape = "x".join(map(str, row["shape"]))
    print(
        f"{shape:<16}{row['layout']:<7}{row['dtype']:<8}{row['op']:<8}"
        f"{fmt(row.get('torch_ms'), '.2f'):>9}{row['bnarray_ms']:>11.2f}"
        f"{fmt(ratio(row, 'bnarray'), '.2f'):>8}"
        f"{100 * row['roof_ms'] / row['bnarray_ms']:>7.0f}{row['bnarray_extra_mb']:>9.1f}"
        f"{fmt(row.get('numpy_ms'), '.2f'):>10}"
        f"{fmt(ratio(row, 'numpy') if 'numpy_ms' in row else None, '.2f'):>8}"
        f"{fmt(row.get('generic_ms'), '.2f'):>11}"
        f"{fmt(ratio(row, 'generic') if 'generic_ms' in row else None, '.2f'):>8}"
        f"{fmt(row.get('generic_extra_mb'), '.1f'):>9}{row['roof_ms']:>8.2f}"
        f"{row['floor_ms']:>9.2f}{fmt(ratio(row, 'floor'), '.2f'):>8}"
        f"{row['out_ms']:>8.2f}{fmt(ratio(row, 'out'), '.2f'):>8}"
        f"{row['out_best_ms']:>7.2f}{row['out_ms'] / row['out_best_ms']:>9.2f}",
        flush=True,
    )


def summarize(data: dict[str, Any]) -> None:
    """Print the NumPy targets, per dtype: fwd+bwd against PyTorch, roof, memory."""
    if not data["results"]:
        return
    print("\nTargets (NumPy fast path), worst case over the shapes:")
    for dtype in sorted({r["dtype"] for r in data["results"]}, reverse=True):
        rows = [r for r in data["results"] if r["dtype"] == dtype]
        checks = []
        unreachable: list[tuple[dict[str, Any], float]] = []
        for impl in ("bnarray", "numpy"):
            if f"{impl}_ms" not in rows[0]:
                continue
            name = "" if impl == "bnarray" else " (without Numba)"
            for layout, limit in [("NCHW", 0.6), ("NHWC", 1.0)]:
                ratios = [
                    ratio(r, impl) or 0.0
                    for r in rows
                    if r["layout"] == layout and r["op"] == "fwd+bwd"
                ]
                if ratios:
                    worst = max(ratios)
                    checks.append(
                        (
                            f"fwd+bwd {layout} <= {limit}x torch{name}",
                            worst,
                            worst <= limit,
                        )
                    )
                    if impl == "bnarray":
                        unreachable.extend(
                            (r, limit)
                            for r in rows
                            if r["layout"] == layout
                            and r["op"] == "fwd+bwd"
                            and (ratio(r, "floor") or 0.0) > limit
                            # A floor above bnarray's own time was disturbed.
                            and r["floor_ms"] <= r["bnarray_ms"]
                        )
            big = [r for r in rows if r["input_mb"] > 100 and r["op"] == "fwd+bwd"]
            if big:
                roof = min(100 * r["roof_ms"] / r[f"{impl}_ms"] for r in big)
                checks.append(
                    (f"fwd+bwd % of roof, >100 MB, >= 60{name}", roof, roof >= 60)
                )
            memory = max(r[f"{impl}_extra_mb"] / r["input_mb"] for r in rows)
            checks.append((f"extra memory / input <= 1{name}", memory, memory <= 1))
        if "generic_ms" in rows[0]:
            generic = max((ratio(r, "generic") or 0.0 for r in rows), default=0.0)
            checks.append(("generic path <= 2.5x torch", generic, generic <= 2.5))
        for name, value, ok in checks:
            print(f"  {dtype:<8} {name:<50} {value:7.2f}  {'met' if ok else 'NOT met'}")
        for r, limit in unreachable:
            shape = "x".join(map(str, r["shape"]))
            print(
                f"  {dtype:<8} {shape} {r['layout']}: {limit}x torch is "
                f"{limit * r['torch_ms']:.2f} ms, below the floor "
                f"({r['floor_ms']:.2f} ms, {ratio(r, 'floor'):.2f}x torch)"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one shape, float32, 3 repeats"
    )
    parser.add_argument("--repeat", type=int, default=0, help="timed runs per case")
    parser.add_argument(
        "--shape", help="one NCHW shape instead of the list, e.g. 64,128,56,56"
    )
    parser.add_argument(
        "--no-generic",
        action="store_true",
        help="leave out the generic array-API path (the slowest part of a run)",
    )
    parser.add_argument(
        "--mask",
        action="store_true",
        help="only the masked-call table (a full run ends with it)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default: benchmarks/results.json; "
        "results-quick.json with --quick, results-shape.json with --shape)",
    )
    args = parser.parse_args(argv)
    if args.json is None:
        name = (
            "results-mask.json"
            if args.mask
            else "results-quick.json"
            if args.quick
            else "results-shape.json"
            if args.shape
            else "results.json"
        )
        args.json = Path(__file__).with_name(name)
    data = run(args)
    summarize(data)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
