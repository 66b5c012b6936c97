"""Time a synchronized training step against a local one, over 2 and 4 processes.

One training step is what ``bn.BatchNorm`` does for one batch: forward,
running-statistics update, backward. Each process holds its own share (the
shapes below, float32 NumPy arrays) and runs the step with
``sync=bnarray.sync.TorchDistributed()`` (gloo on 127.0.0.1: one all_gather in
the forward pass, one all_reduce in the backward pass) and with ``sync=None``.
Every repetition starts at a barrier; a step's time is that of the slowest
process (the others wait for it in the collectives); the table gives the median
over the repetitions. Each process uses one thread. The last column times
torch.distributed's all_gather and all_reduce of the same sizes alone (the
engine's part of the difference), the last the step synchronized through a
group of one process without an engine (bnarray's part: packing and merging).

Run ``python benchmarks/bench_sync.py`` (needs PyTorch); ``--quick`` for fewer
repetitions. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (shape of one process's share, channel axis)
CASES = [((64, 100), -1), ((32, 8, 8, 64), -1), ((32, 64, 8, 8), 1)]


def _time_steps(sync, x, dy, axis, reps: int, barrier) -> list[float]:
    import bnarray as bn

    channels = x.shape[axis]
    weight = np.ones(channels, dtype=np.float32)
    bias = np.zeros(channels, dtype=np.float32)
    running_mean, running_var = np.zeros_like(weight), np.ones_like(weight)
    times = []
    for i in range(reps + 10):  # ten untimed steps first
        barrier()
        start = time.perf_counter()
        _, ctx = bn.batch_norm_forward(x, weight, bias, axis=axis, sync=sync)
        bn.update_running_stats(running_mean, running_var, ctx)
        bn.batch_norm_backward(dy, ctx)
        if i >= 10:
            times.append(time.perf_counter() - start)
    return times


class Alone:
    """A group of one process, with no engine: what synchronizing costs bnarray
    itself (packing, merging, unpacking)."""

    def all_gather(self, a):
        return a[np.newaxis]

    def all_reduce_sum(self, a):
        return a


def _time_collectives(channels: int, reps: int, world: int) -> list[float]:
    """The two collectives alone: torch.distributed's all_gather and all_reduce
    of the sizes a synchronized step exchanges (float64)."""
    import torch
    import torch.distributed as dist

    gathered = torch.zeros((world, 1 + 2 * channels), dtype=torch.float64)
    sums = torch.zeros(2 * channels, dtype=torch.float64)
    times = []
    for i in range(reps + 10):
        dist.barrier()
        start = time.perf_counter()
        dist.all_gather(list(gathered.unbind(0)), gathered[0].clone())
        dist.all_reduce(sums)
        if i >= 10:
            times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, port: int, reps: int, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    import bnarray as bn

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    sync = bn.sync.TorchDistributed()
    rng = np.random.default_rng(rank)
    rows = []
    for shape, axis in CASES:
        x = rng.normal(3.0, 2.0, size=shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        row = {"shape": list(shape), "axis": axis}
        for name, chosen in [
            ("local", None),
            ("alone", Alone()),
            ("synchronized", sync),
            ("collectives", None),
        ]:
            if name == "collectives":
                mine = np.array(_time_collectives(shape[axis], reps, world))
            else:
                mine = np.array(_time_steps(chosen, x, dy, axis, reps, dist.barrier))
            every = [None] * world
            dist.all_gather_object(every, mine)
            row[name] = float(np.median(np.max(every, axis=0)))
        rows.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run(world: int, reps: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        processes = [
            context.Process(target=worker, args=(rank, world, port, reps, out))
            for rank in range(world)
        ]
        for p in processes:
            p.start()
        deadline = time.monotonic() + 600
        for p in processes:
            p.join(max(deadline - time.monotonic(), 0.1))
        for p in processes:
            if p.is_alive():
                p.kill()
        if any(p.exitcode for p in processes):
            msg = f"benchmark processes failed: {[p.exitcode for p in processes]}"
            raise RuntimeError(msg)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 repetitions, not 300")
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    reps = 50 if args.quick else 300
    import torch

    import bnarray as bn

    print(
        f"bnarray {bn.__version__}, NumPy {np.__version__}, PyTorch {torch.__version__} "
        f"(gloo), Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"median of {reps} steps, one thread per process\n"
    )
    print(
        "| processes | share (float32) | axis | local step | synchronized step "
        "| difference | the two collectives alone | step with a group of one |"
    )
    print("|---:|:---|---:|---:|---:|---:|---:|---:|")
    for world in args.processes:
        for row in run(world, reps):
            local, synced = row["local"] * 1e6, row["synchronized"] * 1e6
            shape = "×".join(map(str, row["shape"]))
            print(
                f"| {world} | {shape} | {row['axis']} | {local:.0f} µs | "
                f"{synced:.0f} µs | +{synced - local:.0f} µs | "
                f"{row['collectives'] * 1e6:.0f} µs | {row['alone'] * 1e6:.0f} µs |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
