"""torch.distributed (gloo, 127.0.0.1): three processes, shares of 5, 0 and 7 and
equal shares, for NumPy, PyTorch (also through autograd), array-api-strict, Dask
and JAX arrays."""

from __future__ import annotations

import sys

import pytest
import scenarios
from processes import HERE, check_ok, free_port, load, run_all

WORLD = 3
KINDS = ["numpy", "torch", "torch_autograd", "array_api_strict", "dask", "jax"]


def _commands(out, *extra):
    port = free_port()
    worker = str(HERE / "torch_worker.py")
    return [
        [sys.executable, worker, str(rank), str(WORLD), str(port), str(out), *extra]
        for rank in range(WORLD)
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_distributed")
    check_ok(run_all(_commands(out), logs=out, timeout=300))
    return [load(out / f"rank{rank}.npz") for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(scenarios.CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_shares_match_one_process_on_the_whole_batch(results, kind, case):
    ranks = [r[f"{kind}/{case}"] for r in results]
    scenarios.check_against_one_process(scenarios.CASES[case], ranks)


def test_failing_process_ends_the_others_instead_of_hanging(tmp_path):
    # Process 1 raises before the collective and exits; gloo then fails the
    # collective the others wait in, long before the group's 60 s timeout.
    finished = run_all(_commands(tmp_path, "--fail"), logs=tmp_path, timeout=120)
    failing = finished[1]
    assert failing.returncode != 0
    assert "ValueError: `weight` must have shape (3,)" in failing.output
    for other in (finished[0], finished[2]):
        assert other.returncode != 0
        assert "RuntimeError" in other.output, other.output[-2000:]
        assert "Timed out" not in other.output, other.output[-2000:]
