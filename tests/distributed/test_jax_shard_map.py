"""JAX with four host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4):
``jax.shard_map`` over a mesh axis, under ``jax.jit`` and ``jax.grad``."""

from __future__ import annotations

import sys

import pytest
import scenarios
from processes import HERE, check_ok, load, run_all

CASES = scenarios.JAX_CASES
DEVICES = len(CASES["even_nc"].sizes)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # A process of its own: XLA reads the device count once, at start.
    out = tmp_path_factory.mktemp("jax")
    command = [sys.executable, str(HERE / "jax_worker.py"), str(out)]
    check_ok(run_all([command], logs=out, timeout=180))
    return [load(out / f"rank{device}.npz") for device in range(DEVICES)]


@pytest.mark.parametrize("case", list(CASES))
def test_shards_match_one_process_on_the_whole_batch(results, case):
    ranks = [r[f"jax/{case}"] for r in results]
    scenarios.check_against_one_process(CASES[case], ranks)
