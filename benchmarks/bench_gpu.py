"""Time bnarray's CuPy kernels against cuDNN (through PyTorch CUDA) and the card's copy bandwidth.

Run with ``python benchmarks/bench_gpu.py --out results_gpu.json`` on a machine
with a CUDA GPU, CuPy, PyTorch built with CUDA, NumPy and bnarray (``nox -s
bench-gpu`` installs them, PyTorch's CUDA build included).

The operations, shapes, layouts and implementations are those of
``benchmarks/bench.py``: training forward (with the running-stat update),
backward, forward+backward and inference, on bnarray's CuPy fast path
(``bnarray``), its generic array-API path on CuPy arrays (``generic``) and
``torch.nn.functional.batch_norm`` with autograd on the same GPU memory
(``torch``, which calls cuDNN; channels-last tensors for NHWC). A fourth, larger
shape shows the kernels where the launch overhead of a few microseconds no
longer matters.

Each time is the median over several trials of the mean time per call of a
run of back-to-back calls, with the device synchronized before and after the
run: the time a training loop sees, host-side overhead included. The roof is
the time the operation's memory traffic would take at the bandwidth of a large
device-to-device copy measured here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench import DTYPES, LAYOUTS, OPS, TRAFFIC, generic  # benchmarks/bench.py
from bench_small import SHAPES as SMALL_SHAPES  # benchmarks/bench_small.py

import bnarray as bn

try:
    import cupy
    import torch
except ImportError:  # --table needs neither
    cupy = torch = None

# The CPU benchmark's shapes, and one large enough that launch overhead vanishes.
SHAPES = [(32, 64, 56, 56), (256, 256, 14, 14), (64, 128, 56, 56), (128, 256, 56, 56)]
IMPLS = ["bnarray", "generic", "torch"]


def synchronize() -> None:
    cupy.cuda.Device().synchronize()
    torch.cuda.synchronize()


def time_per_call(
    fn: Callable[[], Any], *, calls: int, trials: int, warmup: int = 3
) -> float:
    """Median over `trials` of the mean seconds per call of `calls` back-to-back calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    means = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize()
        means.append((time.perf_counter() - start) / calls)
    return statistics.median(means)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy."""
    a = cupy.ones(nbytes // 4, dtype=cupy.float32)
    b = cupy.empty_like(a)

    def copy() -> None:
        b[...] = a

    return 2 * nbytes / time_per_call(copy, calls=20, trials=5)


def bnarray_case(x: Any, dy: Any, axis: int) -> dict[str, Callable[[], Any]]:
    """The four operations on bnarray's public API (CuPy arrays in, CuPy arrays out)."""
    c = x.shape[axis]
    rng = np.random.default_rng(1)
    w = cupy.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    b = cupy.asarray(rng.standard_normal(c).astype(np.float32))
    rm = cupy.zeros(c, dtype=cupy.float32)
    rv = cupy.ones(c, dtype=cupy.float32)
    _, ctx = bn.batch_norm_forward(x, w, b, axis=axis)

    def fwd() -> Any:
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis)
        bn.update_running_stats(rm, rv, ctx)
        return y

    def bwd() -> Any:
        return bn.batch_norm_backward(dy, ctx)

    def fwd_bwd() -> Any:
        y, ctx = bn.batch_norm_forward(x, w, b, axis=axis)
        bn.update_running_stats(rm, rv, ctx)
        return y, bn.batch_norm_backward(dy, ctx)

    def infer() -> Any:
        return bn.batch_norm_forward(
            x, w, b, axis=axis, training=False, running_mean=rm, running_var=rv
        )

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "infer": infer}


def torch_case(x: Any, dy: Any, axis: int) -> dict[str, Callable[[], Any]]:
    """The same operations with ``F.batch_norm`` and autograd, on the same GPU memory."""
    functional = torch.nn.functional
    c = x.shape[axis]

    def tensor(a: Any) -> Any:
        t = torch.from_dlpack(a)
        # NHWC memory seen as an NCHW tensor is PyTorch's channels_last format.
        return t.permute(0, 3, 1, 2) if axis == -1 and a.ndim == 4 else t

    xt = tensor(x).detach().requires_grad_(True)
    dyt = tensor(dy)
    rng = np.random.default_rng(1)
    w = torch.tensor(rng.uniform(0.5, 1.5, c), dtype=torch.float32, device="cuda")
    b = torch.tensor(rng.standard_normal(c), dtype=torch.float32, device="cuda")
    w.requires_grad_(True)
    b.requires_grad_(True)
    rm = torch.zeros(c, device="cuda")
    rv = torch.ones(c, device="cuda")

    def forward() -> Any:
        return functional.batch_norm(
            xt, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5
        )

    y_kept = forward()

    def fwd() -> Any:
        return forward()

    def bwd() -> Any:
        return torch.autograd.grad(y_kept, [xt, w, b], dyt, retain_graph=True)

    def fwd_bwd() -> Any:
        y = forward()
        return torch.autograd.grad(y, [xt, w, b], dyt)

    def infer() -> Any:
        with torch.no_grad():
            return functional.batch_norm(xt, rm, rv, w, b, training=False, eps=1e-5)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "infer": infer}


def layer_step(x: Any, dy: Any, axis: int) -> Callable[[], Any]:
    """One training step through :class:`bnarray.BatchNorm` on CuPy arrays."""
    layer = bn.BatchNorm(x.shape[axis], axis=axis, xp=cupy, dtype=cupy.float32)

    def step() -> Any:
        return layer(x), layer.backward(dy)

    return step


def small_steps(trials: int) -> list[dict[str, Any]]:
    """The CPU benchmark's small-arrays table (benchmarks/bench_small.py) on
    the GPU: one training step (forward, running-statistics update,
    backward), through the functions and through the layer, and PyTorch's."""
    rows = []
    rng = np.random.default_rng(0)
    print(
        f"{'shape':<18}{'axis':>5}{'dtype':>9}{'bnarray us':>11}{'layer us':>9}{'torch us':>9}"
    )
    for shape, axis in SMALL_SHAPES:
        for dtype in DTYPES:
            if dtype == "float16" and len(shape) == 2:
                continue  # PyTorch's batch norm takes float16 in NCHW and NHWC only
            x = cupy.asarray((rng.standard_normal(shape) * 2 + 3).astype(dtype))
            dy = cupy.asarray(rng.standard_normal(shape).astype(dtype))
            steps = {
                "bnarray": bnarray_case(x, dy, axis)["fwd+bwd"],
                "layer": layer_step(x, dy, axis),
                "torch": torch_case(x, dy, axis)["fwd+bwd"],
            }
            row: dict[str, Any] = {"shape": list(shape), "axis": axis, "dtype": dtype}
            for impl, fn in steps.items():
                row[f"{impl}_us"] = 1e6 * time_per_call(fn, calls=200, trials=trials)
            rows.append(row)
            print(
                f"{tuple(shape)!s:<18}{axis:>5}{dtype:>9}{row['bnarray_us']:11.0f}"
                f"{row['layer_us']:9.0f}{row['torch_us']:9.0f}",
                flush=True,
            )
    return rows


def check_agreement(x: Any, axis: int) -> float:
    """Largest difference between bnarray's and PyTorch's training output, in units of y's spread."""
    y = bnarray_case(x, x, axis)["fwd"]()
    yt = torch_case(x, x, axis)["fwd"]()
    if axis == -1:
        yt = yt.permute(0, 2, 3, 1)
    ours = cupy.asnumpy(y).astype(np.float64)
    theirs = yt.detach().cpu().numpy().astype(np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.std(theirs))


def markdown_table(data: dict[str, Any]) -> str:
    """The docs' table of a results file."""
    lines = [
        "| shape | layout | dtype | op | PyTorch µs | bnarray µs | × PyTorch "
        "| % of roof | generic µs | × PyTorch |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in data["results"]:
        torch_us = row["torch_us"]
        generic_us = row.get("generic_us")
        generic = (
            "– | –"
            if generic_us is None
            else f"{generic_us:.0f} | {generic_us / torch_us:.2f}"
        )
        lines.append(
            f"| {'×'.join(map(str, row['shape']))} | {row['layout']} | {row['dtype']} "
            f"| {row['op']} | {torch_us:.0f} | {row['bnarray_us']:.0f} "
            f"| {row['bnarray_us'] / torch_us:.2f} "
            f"| {100 * row['roof_us'] / row['bnarray_us']:.0f} | {generic} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results_gpu.json"))
    parser.add_argument(
        "--table",
        type=Path,
        metavar="RESULTS",
        help="print the Markdown table of a results file and exit (no GPU needed)",
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="first shape, float32")
    parser.add_argument(
        "--no-generic", action="store_true", help="skip the generic path (slow)"
    )
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if cupy is None or not cupy.is_available() or not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA GPU usable by both CuPy and PyTorch")
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode()
    bandwidth = copy_bandwidth()
    machine = {
        "gpu": card,
        "cupy": cupy.__version__,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "numpy": np.__version__,
        "copy_bandwidth_gbs": bandwidth / 1e9,
    }
    print(
        f"{card}; CuPy {cupy.__version__}, PyTorch {torch.__version__} "
        f"(cuDNN {machine['cudnn']}); copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    header = (
        f"{'shape':<18}{'layout':<7}{'dtype':<8}{'op':<8}{'torch us':>9}"
        f"{'bnarray us':>11}{'x torch':>8}{'% roof':>7}"
        f"{'generic us':>11}{'x torch':>8}{'roof us':>8}"
    )
    # Per-call cost when the GPU has almost nothing to do: host-side overhead
    # (Python, argument checks, kernel launches).
    tiny = cupy.asarray(np.random.default_rng(2).standard_normal((2, 64, 2, 2)))
    tiny = tiny.astype(cupy.float32)
    tiny_cases = {
        "bnarray": bnarray_case(tiny, tiny, 1),
        "torch": torch_case(tiny, tiny, 1),
    }
    overhead = {
        impl: {
            op: 1e6 * time_per_call(f, calls=200, trials=args.trials)
            for op, f in fns.items()
        }
        for impl, fns in tiny_cases.items()
    }
    machine["overhead_us_2x64x2x2"] = overhead
    for impl, ops in overhead.items():
        print(
            f"per-call floor (2x64x2x2), {impl}: "
            + ", ".join(f"{op} {t:.0f} us" for op, t in ops.items())
        )
    machine["small_arrays"] = small_steps(args.trials)
    print(header)
    shapes = SHAPES[:1] if args.quick else SHAPES
    dtypes = DTYPES[:1] if args.quick else DTYPES
    results: list[dict[str, Any]] = []
    data = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "trials": args.trials,
        "results": results,
    }
    rng = np.random.default_rng(0)
    for nchw in shapes:
        for layout, axis in LAYOUTS.items():
            shape = nchw if axis == 1 else (nchw[0], nchw[2], nchw[3], nchw[1])
            for dtype in dtypes:
                x = cupy.asarray(
                    (rng.standard_normal(shape, dtype=np.float32) * 2 + 3).astype(dtype)
                )
                dy = cupy.asarray(
                    rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                )
                fns = bnarray_case(x, dy, axis)
                cases = {
                    "bnarray": fns,
                    "generic": {k: generic(f) for k, f in fns.items()},
                    "torch": torch_case(x, dy, axis),
                }
                impls = [i for i in IMPLS if not (args.no_generic and i == "generic")]
                agreement = check_agreement(x, axis)
                calls = max(3, min(50, int(2e9 / x.nbytes)))
                for op in OPS:
                    row: dict[str, Any] = {
                        "shape": list(nchw),
                        "layout": layout,
                        "dtype": dtype,
                        "op": op,
                        "input_mb": x.nbytes / 1e6,
                        "roof_us": 1e6 * TRAFFIC[op] * x.nbytes / bandwidth,
                        "max_diff_vs_torch_fwd": agreement,
                    }
                    row["generic_us"] = None
                    for impl in impls:
                        t = time_per_call(
                            cases[impl][op], calls=calls, trials=args.trials
                        )
                        row[f"{impl}_us"] = 1e6 * t
                    results.append(row)
                    r_bn = row["bnarray_us"] / row["torch_us"]
                    roof = 100 * row["roof_us"] / row["bnarray_us"]
                    generic_us = row["generic_us"] or float("nan")
                    print(
                        f"{'x'.join(map(str, nchw)):<18}{layout:<7}{dtype:<8}{op:<8}"
                        f"{row['torch_us']:9.0f}{row['bnarray_us']:11.0f}{r_bn:8.2f}"
                        f"{roof:7.0f}{generic_us:11.0f}"
                        f"{generic_us / row['torch_us']:8.2f}{row['roof_us']:8.0f}",
                        flush=True,
                    )
                    # Written after every row: a run cut short keeps what it measured.
                    args.out.write_text(json.dumps(data, indent=1) + "\n")
                del x, dy, fns, cases
                cupy.get_default_memory_pool().free_all_blocks()
                torch.cuda.empty_cache()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
