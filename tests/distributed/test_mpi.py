"""MPI (mpi4py and MPICH from PyPI, under mpiexec): three processes, shares of 5, 0
and 7 and equal shares, for NumPy arrays and PyTorch tensors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import scenarios
from processes import HERE, check_ok, load, run_all

WORLD = 3


def _mpiexec() -> str:
    # PyPI's mpich puts mpiexec beside the interpreter of the environment.
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("no mpiexec: `pip install mpi4py mpich` (nox -s tests-distributed)")
    return found


def _command():
    worker = str(HERE / "mpi_worker.py")
    return [_mpiexec(), "-n", str(WORLD), sys.executable, "-m", "mpi4py", worker]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    check_ok(run_all([[*_command(), str(out)]], logs=out, timeout=180))
    return [load(out / f"rank{rank}.npz") for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(scenarios.CASES))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_shares_match_one_process_on_the_whole_batch(results, kind, case):
    ranks = [r[f"{kind}/{case}"] for r in results]
    scenarios.check_against_one_process(scenarios.CASES[case], ranks)


def test_tensors_that_require_grad_are_refused_on_every_process(results):
    for r in results:
        message = str(r["torch_requires_grad"]["error"])
        assert "use bnarray.sync.TorchDistributed" in message


def test_failing_process_aborts_the_job_instead_of_hanging(tmp_path):
    # Process 1 raises before the collective; `python -m mpi4py` turns its
    # uncaught exception into MPI_Abort, which ends every process of the job.
    [finished] = run_all(
        [[*_command(), str(tmp_path), "--fail"]], logs=tmp_path, timeout=60
    )
    assert finished.returncode != 0
    assert "ValueError: `weight` must have shape (3,)" in finished.output
    assert "MPI_Abort" in finished.output
