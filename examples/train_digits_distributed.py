"""Train the digits demo's network data-parallel over processes, with synchronized
batch statistics, and compare its loss curve with one process.

The network, the data and the SGD step are those of ``train_digits.py`` (a 3x100
sigmoid MLP with batch norm on scikit-learn's digits). Every global batch of
``--batch`` images is split over ``--processes`` processes (torch.distributed
with gloo on 127.0.0.1, NumPy arrays); each process runs the forward and
backward pass on its share, and one all-reduce sums the gradients, as
data-parallel training does. Three runs see the same global batches from the
same initial weights:

1. ``single``: one process, the whole global batch (the reference);
2. ``synchronized``: the processes with ``bn.BatchNorm(..., sync=TorchDistributed())``,
   which normalize with the statistics of the whole global batch;
3. ``local``: the processes with plain ``bn.BatchNorm``, which normalize each
   share with its own statistics (what data-parallel training without
   synchronized batch norm does), evaluated with process 0's running statistics.

Run ``python examples/train_digits_distributed.py --processes 4 --out results``
(``--quick`` for a short run). Prints the largest loss differences against
``single`` and writes ``distributed.json`` and ``distributed.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits
from train_digits import MLP, REFERENCE_BATCH, load_data, softmax_cross_entropy

import bnarray as bn

__all__ = ["main"]


def global_batches(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """The indices of every step's global batch: reshuffled each epoch, the
    incomplete last batch dropped (as train_digits.batches)."""
    rng = np.random.default_rng([seed, 1])
    per_epoch = n // batch
    epochs = -(-steps // per_epoch)
    order = np.concatenate(
        [rng.permutation(n)[: per_epoch * batch] for _ in range(epochs)]
    )
    return order.reshape(-1, batch)[:steps]


def train(
    *,
    rank: int,
    world: int,
    sync: bool,
    steps: int,
    batch: int,
    eval_every: int,
    seed: int,
    all_reduce=None,
) -> dict:
    """SGD on this process's share of each global batch; the loss curve and test
    accuracies of the whole network (the same on every process)."""
    data = load_data(seed=seed)
    model = MLP.create(batch_norm=True, rng=np.random.default_rng([seed, 0]))
    if sync:
        for norm in model.norms:
            norm.sync = bn.sync.TorchDistributed()
    lr = batch / REFERENCE_BATCH  # train_digits' learning rate 1 at batch 60, scaled
    losses, evaluated, accuracies = [], [], []
    for step, indices in enumerate(
        global_batches(len(data.x_train), batch, steps, seed)
    ):
        share = np.array_split(indices, world)[rank]
        logits = model.forward(data.x_train[share])
        mean_loss, dlogits = softmax_cross_entropy(logits, data.y_train[share])
        # The loss of the global batch is the mean over all its images.
        model.backward(dlogits * (len(share) / batch))
        params = [
            p for layer in model.dense for p in (layer.w, layer.b) if p is not None
        ]
        grads = [
            g
            for layer in model.dense
            for g in (layer.grad_w, layer.grad_b)
            if g is not None
        ]
        for norm in model.norms:
            params += [norm.weight, norm.bias]
            grads += [norm.grad_weight, norm.grad_bias]
        flat = np.concatenate(
            [g.ravel() for g in grads] + [[mean_loss * len(share) / batch]]
        )
        if all_reduce is not None:
            flat = all_reduce(flat)  # one collective: every gradient and the loss
        losses.append(float(flat[-1]))
        offset = 0
        for layer in model.dense:
            for name in ("w", "b"):
                value = getattr(layer, name)
                if value is None:
                    continue
                grad = flat[offset : offset + value.size].reshape(value.shape)
                setattr(layer, name, value - lr * grad)
                offset += value.size
        for norm in model.norms:
            for name in ("weight", "bias"):
                value = getattr(norm, name)
                setattr(norm, name, value - lr * flat[offset : offset + value.size])
                offset += value.size
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.set_training(False)
            predicted = model.forward(data.x_test).argmax(axis=1)
            model.set_training(True)
            evaluated.append(step + 1)
            accuracies.append(float((predicted == data.y_test).mean()))
    return {"loss": losses, "steps_evaluated": evaluated, "test_accuracy": accuracies}


def worker(rank: int, world: int, port: int, out: str, options: dict) -> None:
    """One process of a data-parallel run; process 0 writes the curves to `out`."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )

    def all_reduce(flat: np.ndarray) -> np.ndarray:
        dist.all_reduce(torch.from_numpy(flat))  # in place, in the NumPy buffer
        return flat

    with threadpool_limits(limits=1):
        curves = train(rank=rank, world=world, all_reduce=all_reduce, **options)
    if rank == 0:
        Path(out).write_text(json.dumps(curves))
    dist.destroy_process_group()


def run_processes(world: int, options: dict, timeout: float = 600.0) -> dict:
    """A data-parallel run over `world` spawned processes; process 0's curves."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "curves.json")
        processes = [
            context.Process(target=worker, args=(rank, world, port, out, options))
            for rank in range(world)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
        hung = [p for p in processes if p.is_alive()]
        for process in hung:
            process.kill()
        failed = [p.exitcode for p in processes]
        if hung or any(failed):
            msg = (
                f"a data-parallel run failed (exit codes {failed}, {len(hung)} killed)"
            )
            raise RuntimeError(msg)
        return json.loads(Path(out).read_text())


def plot(results: dict, path: Path) -> None:
    single = np.array(results["single"]["loss"])
    steps = np.arange(1, len(single) + 1)
    config = results["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    window = max(1, len(single) // 50)

    def smooth(a: np.ndarray) -> np.ndarray:
        return np.convolve(a, np.ones(window) / window, mode="valid")

    styles = {
        "single": ("-", "tab:gray", 3.0, "one process"),
        "synchronized": ("--", "tab:blue", 1.5, "synchronized"),
        "local": ("-", "tab:red", 1.0, "local statistics"),
    }
    for name, (style, color, width, label) in styles.items():
        loss = np.array(results[name]["loss"])
        accuracy = results[name]["test_accuracy"][-1]
        left.plot(
            steps[window - 1 :],
            smooth(loss),
            style,
            color=color,
            lw=width,
            label=f"{label}: test accuracy {accuracy:.3f}",
        )
        if name != "single":
            right.semilogy(
                steps, np.maximum(np.abs(loss - single), 1e-18), color=color, lw=0.8
            )
    left.set_xlabel("training step")
    left.set_ylabel(f"training loss (mean of {window} steps)")
    left.set_yscale("log")
    shares = "/".join(str(n) for n in config["shares"])
    left.set_title(
        f"global batch {config['batch']} over {config['processes']} processes "
        f"(shares {shares})",
        fontsize=10,
    )
    left.legend(fontsize="small")
    right.set_xlabel("training step")
    right.set_ylabel("| loss − one process's loss |")
    right.set_title("difference from one process at each step", fontsize=10)
    right.set_ylim(1e-18, 10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="200 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps
    options = {"steps": steps, "batch": args.batch, "eval_every": 50, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    with threadpool_limits(limits=1):
        single = train(rank=0, world=1, sync=False, **options)
    results = {
        "single": single,
        "synchronized": run_processes(args.processes, {**options, "sync": True}),
        "local": run_processes(args.processes, {**options, "sync": False}),
    }
    reference = np.array(single["loss"])
    shares = [len(s) for s in np.array_split(np.arange(args.batch), args.processes)]
    summary = {}
    for name in ("synchronized", "local"):
        loss = np.array(results[name]["loss"])
        summary[name] = {
            "largest_loss_difference": float(np.abs(loss - reference).max()),
            "largest_relative_loss_difference": float(
                (np.abs(loss - reference) / reference).max()
            ),
            "final_test_accuracy": results[name]["test_accuracy"][-1],
        }
    results["summary"] = summary
    results["config"] = {
        **options,
        "processes": args.processes,
        "shares": shares,
        "bnarray_version": bn.__version__,
        "numpy_version": np.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "distributed.json").write_text(json.dumps(results) + "\n")
    plot(results, args.out / "distributed.png")
    print(
        f"{steps} steps, global batch {args.batch} over {args.processes} processes "
        f"(shares {shares}); one process's final test accuracy "
        f"{single['test_accuracy'][-1]:.3f}"
    )
    for name, row in summary.items():
        print(
            f"{name:>12}: largest |loss - one process's loss| "
            f"{row['largest_loss_difference']:.2e} (relative "
            f"{row['largest_relative_loss_difference']:.2e}), final test accuracy "
            f"{row['final_test_accuracy']:.3f}"
        )
    print(
        f"wrote {args.out}/distributed.json and distributed.png in {results['config']['seconds']} s"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
