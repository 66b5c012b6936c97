"""One process of the MPI tests: ``mpiexec -n 3 python -m mpi4py mpi_worker.py OUT [--fail]``.

Runs every case of scenarios.CASES with NumPy arrays and PyTorch tensors through
bnarray.sync.MPI() (COMM_WORLD), and saves the results to OUT/rank{RANK}.npz.
With ``--fail``, process 1 passes a weight of the wrong shape instead, which
raises before the collective; ``python -m mpi4py`` then aborts every process.
"""

from __future__ import annotations

import sys

import numpy as np
import scenarios
import torch
from mpi4py import MPI

import bnarray as bn


def main(out: str, fail: bool) -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    sync = bn.sync.MPI()
    if fail:
        weight = np.ones(3 if rank != 1 else 4)  # process 1's share is wrong
        bn.batch_norm_forward(np.ones((2, 3)), weight, sync=sync)
        return
    kinds = {
        "numpy": (np.asarray, np.asarray),
        "torch": (torch.tensor, lambda t: t.numpy()),
    }
    results = {}
    for kind, (asarray, to_numpy) in kinds.items():
        for name, case in scenarios.CASES.items():
            results[f"{kind}/{name}"] = scenarios.run_case(
                case, rank, sync, asarray, to_numpy
            )
    # Host copies carry no autograd graph: refused on every process alike.
    x = torch.ones((2, 3), dtype=torch.float64, requires_grad=True)
    try:
        bn.batch_norm_forward(x, sync=sync)
    except TypeError as error:
        results["torch_requires_grad"] = {"error": np.array(f"TypeError: {error}")}
    scenarios.save(f"{out}/rank{rank}.npz", results)
    comm.Barrier()


if __name__ == "__main__":
    main(sys.argv[1], fail="--fail" in sys.argv)
