"""CuPy arrays on a GPU through real engines, in a group of one process: MPI
(host copies of the statistics) and torch.distributed (NCCL). Each skips, with
the reason, without a usable GPU or without the engine."""

from __future__ import annotations

import datetime
import socket

import numpy as np
import pytest

import bnarray as bn


@pytest.fixture
def cupy():
    cupy = pytest.importorskip(
        "cupy", reason="CuPy is not installed (nox -s tests-cupy installs it)"
    )
    if not cupy.is_available():
        pytest.skip(
            "CuPy is installed but no CUDA GPU is usable here (cupy.is_available() is False)"
        )
    return cupy


def check_group_of_one(cupy, sync):
    """A training step on the GPU through `sync` equals NumPy's without it."""
    rng = np.random.default_rng(0)
    x, dy = rng.normal(2.0, 3.0, size=(2, 6, 3, 4, 4))  # x, dy: NCHW
    weight, bias = rng.normal(size=(2, 3))
    y_ref, ctx_ref = bn.batch_norm_forward(x, weight, bias, axis=1)
    grads_ref = bn.batch_norm_backward(dy, ctx_ref)
    running_ref = bn.update_running_stats(np.zeros(3), np.ones(3), ctx_ref)

    gpu = cupy.asarray
    y, ctx = bn.batch_norm_forward(gpu(x), gpu(weight), gpu(bias), axis=1, sync=sync)
    grads = bn.batch_norm_backward(gpu(dy), ctx)
    running = bn.update_running_stats(gpu(np.zeros(3)), gpu(np.ones(3)), ctx)
    pairs = [(y, y_ref), *zip(grads, grads_ref, strict=True)]
    pairs += zip(running, running_ref, strict=True)
    for actual, expected in pairs:
        assert isinstance(actual, cupy.ndarray)
        np.testing.assert_allclose(
            cupy.asnumpy(actual), expected, rtol=1e-10, atol=1e-10
        )


def test_cupy_through_mpi_with_host_copies(cupy):
    mpi = pytest.importorskip(
        "mpi4py.MPI", reason="mpi4py is not installed (pip install mpi4py mpich)"
    )
    check_group_of_one(cupy, bn.sync.MPI(mpi.COMM_SELF))


def test_cupy_through_torch_distributed_nccl(cupy):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch has no usable CUDA (a CPU build, or no GPU)")
    dist = torch.distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        check_group_of_one(cupy, bn.sync.TorchDistributed())
    finally:
        dist.destroy_process_group()
