"""The multi-process tests run only where asked: ``nox -s tests-distributed`` sets
BNARRAY_DISTRIBUTED_TESTS=1 and installs the engines (PyTorch, mpi4py with
MPICH, JAX)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "BNARRAY_DISTRIBUTED_TESTS"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    if os.environ.get(ENV) == "1":
        return
    skip = pytest.mark.skip(
        reason=f"starts processes: run `nox -s tests-distributed` (or set {ENV}=1)"
    )
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)
