"""Batch-normalize a data set stored on disk in many chunks, never holding it in memory.

The data set is a Dask array read from a folder of ``.npy`` chunk files (the
layout of :func:`dask.array.to_npy_stack`): N samples by C features, channels
last. bnarray works on it in two streaming passes, as a user with more data than
memory needs:

1. ``bn.batch_norm_forward`` builds the graph of the per-channel mean and
   variance; computing only those two small arrays reads each chunk and keeps
   just its partial sums.
2. The same function with ``training=False`` and those statistics as
   ``running_mean``/``running_var`` normalizes chunk by chunk into a new folder
   of chunk files. The result equals the training-mode output of the whole data
   set, which no single chunk could compute alone.

Run ``python examples/dask_out_of_core.py --samples 2000000 --chunk 50000`` (about
256 MB of float32 in 40 chunks, written to a temporary folder), or add
``--workers 2`` to run both passes on a local ``dask.distributed`` cluster of two
processes. Requires ``dask[array]`` (and ``distributed`` for ``--workers``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

import bnarray as bn

__all__ = ["channel_statistics", "make_dataset", "normalize_dataset"]


def make_dataset(
    folder: Path, *, samples: int, features: int, chunk: int, seed: int = 0
) -> da.Array:
    """Write a random float32 data set as a stack of ``.npy`` chunks; return it lazily.

    Each feature has its own mean (up to 100) and spread, so that normalizing
    matters and a one-pass E[x²] − E[x]² variance in float32 would lose digits.
    """
    rng = da.random.default_rng(seed)
    means = np.linspace(-100.0, 100.0, features)
    scales = np.geomspace(0.1, 10.0, features)
    x = rng.standard_normal((samples, features), chunks=(chunk, features))
    x = (x * scales + means).astype(np.float32)
    da.to_npy_stack(folder, x, axis=0)
    return da.from_npy_stack(folder, mmap_mode="r")


def channel_statistics(x: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: the per-channel mean and biased variance, computed chunk by chunk."""
    _, ctx = bn.batch_norm_forward(x, axis=-1)  # only builds the graph
    mean, var = dask.compute(ctx.mean, ctx.var)
    return mean, var


def normalize_dataset(
    x: da.Array, folder: Path, mean: np.ndarray, var: np.ndarray, *, eps: float = 1e-5
) -> da.Array:
    """Pass 2: write ``(x - mean) / sqrt(var + eps)`` chunk by chunk; return it lazily."""
    # bnarray refuses to mix libraries: the statistics go in as (one-chunk) Dask arrays.
    y, _ = bn.batch_norm_forward(
        x,
        axis=-1,
        eps=eps,
        training=False,
        running_mean=da.from_array(mean),
        running_var=da.from_array(var),
    )
    da.to_npy_stack(folder, y, axis=0)
    return da.from_npy_stack(folder, mmap_mode="r")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=20_000, help="samples per chunk")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run on a local cluster of this many processes",
    )
    args = parser.parse_args(argv)

    client = None
    if args.workers:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        client = Client(cluster)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        x = make_dataset(
            Path(tmp) / "x",
            samples=args.samples,
            features=args.features,
            chunk=args.chunk,
        )
        print(
            f"data set: {x.shape} {x.dtype}, {x.nbytes / 1e6:.0f} MB in "
            f"{x.npartitions} chunks ({time.perf_counter() - start:.1f} s to write)"
        )

        start = time.perf_counter()
        mean, var = channel_statistics(x)
        print(f"pass 1, statistics: {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        y = normalize_dataset(x, Path(tmp) / "y", mean, var)
        print(f"pass 2, normalize and write: {time.perf_counter() - start:.1f} s")

        # A third streaming pass, only to show the result: mean 0 and variance
        # var / (var + eps), which is 1 up to eps.
        y_mean, y_var = dask.compute(y.mean(axis=0), y.var(axis=0))
        expected_var = var / (var + 1e-5)
        print(
            f"normalized: |mean| <= {np.abs(y_mean).max():.1e}, "
            f"|var - var/(var+eps)| <= {np.abs(y_var - expected_var).max():.1e} "
            f"over {y.shape[1]} channels"
        )

    if client is not None:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
