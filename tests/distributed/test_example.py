"""examples/train_digits_distributed.py: a short run over two processes, whose
synchronized loss curve is one process's."""

from __future__ import annotations

import json
import sys

import pytest
from processes import HERE, check_ok, run_all

SCRIPT = HERE.parents[1] / "examples" / "train_digits_distributed.py"


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    command = [sys.executable, str(SCRIPT), "--quick", "--processes", "2"]
    check_ok(run_all([[*command, "--out", str(out)]], logs=out, timeout=240))
    assert (out / "distributed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "distributed.json").read_text())["summary"]


def test_synchronized_loss_curve_is_one_process_curve(summary):
    assert summary["synchronized"]["largest_loss_difference"] < 1e-10


def test_local_statistics_drift_from_one_process(summary):
    assert summary["local"]["largest_loss_difference"] > 1e-3
