"""One process of the torch.distributed tests (gloo on 127.0.0.1).

``python torch_worker.py RANK WORLD PORT OUT [--fail]``: joins the group, runs every
case of scenarios.CASES with NumPy, PyTorch (with and without autograd),
array-api-strict, Dask and JAX arrays, and saves the results to OUT/rank{RANK}.npz.
With ``--fail``, process 1 passes a weight of the wrong shape instead, which
raises before the collective.
"""

from __future__ import annotations

import datetime
import sys

import numpy as np
import scenarios
import torch
import torch.distributed as dist

import bnarray as bn


def kinds() -> dict:
    """``{kind: (asarray, to_numpy, autograd)}`` for each library under test."""
    import array_api_strict
    import dask.array as da
    import jax

    jax.config.update("jax_enable_x64", True)

    def tensor_grad(a):
        return torch.tensor(a, requires_grad=True)

    def torch_numpy(t):
        return t.detach().numpy()

    def autograd(x, y, dy):
        (grad,) = torch.autograd.grad((y * dy).sum(), x)
        return grad

    return {
        "numpy": (np.asarray, np.asarray, None),
        "torch": (torch.tensor, torch_numpy, None),
        "torch_autograd": (tensor_grad, torch_numpy, autograd),
        "array_api_strict": (array_api_strict.asarray, np.asarray, None),
        "dask": (lambda a: da.from_array(a, chunks=2), lambda a: np.asarray(a), None),
        "jax": (jax.numpy.asarray, np.asarray, None),
    }


def main(rank: int, world: int, port: int, out: str, fail: bool) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    sync = bn.sync.TorchDistributed()
    if fail:
        weight = np.ones(3 if rank != 1 else 4)  # process 1's share is wrong
        bn.batch_norm_forward(np.ones((2, 3)), weight, sync=sync)
        return
    results = {}
    for kind, (asarray, to_numpy, autograd) in kinds().items():
        for name, case in scenarios.CASES.items():
            results[f"{kind}/{name}"] = scenarios.run_case(
                case, rank, sync, asarray, to_numpy, autograd=autograd
            )
    scenarios.save(f"{out}/rank{rank}.npz", results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port, out = sys.argv[1:5]
    main(int(rank), int(world), int(port), out, fail="--fail" in sys.argv)
