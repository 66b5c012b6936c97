"""The digits demo (examples/train_digits.py) runs end to end and reports sane numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("threadpoolctl")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo")
    # A subprocess keeps the demo's own warnings (matplotlib, tqdm) out of this
    # session's warnings-as-errors filter, and runs it the way users do; its
    # output goes to pipes, as when a log is written.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        check=True,
        timeout=90,
        capture_output=True,
        text=True,
    )
    return done, out


@pytest.fixture(scope="module")
def quick_run(
    quick_process: tuple[subprocess.CompletedProcess[str], Path],
) -> tuple[dict, Path]:
    _, out = quick_process
    return json.loads((out / "results.json").read_text()), out


def _accuracies(results: dict) -> list[float]:
    modes = results["eval_modes"]
    return [
        *(row["test_accuracy"] for row in results["lr_sweep"]),
        *(row["test_accuracy"] for row in results["batch_size_sweep"]),
        *(row["test_accuracy"] for row in results["batch_size_sweep_renorm"]),
        *(row["test_accuracy"] for row in results["batch_size_sweep_no_batch_norm"]),
        modes["running_stats"],
        modes["batch_stats"],
        modes["single_sample_running_stats"],
    ]


def test_results_json_has_every_experiment(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    assert {row["batch_norm"] for row in results["lr_sweep"]} == {True, False}
    lrs = {row["lr"] for row in results["lr_sweep"]}
    assert len(lrs) >= 3
    assert len(results["lr_sweep"]) == 2 * len(lrs)
    sizes = [row["batch_size"] for row in results["batch_size_sweep"]]
    assert sizes == sorted(sizes)
    assert min(sizes) <= 2
    assert max(sizes) >= 128
    for key in ("batch_size_sweep_renorm", "batch_size_sweep_no_batch_norm"):
        assert [row["batch_size"] for row in results[key]] == sizes
    assert set(results["eval_modes"]) >= {
        "running_stats",
        "batch_stats",
        "single_sample_running_stats",
    }


def test_accuracies_are_fractions(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    for value in _accuracies(results):
        assert isinstance(value, float)
        assert math.isfinite(value)
        assert 0.0 <= value <= 1.0


def test_batch_norm_network_beats_chance(quick_run: tuple[dict, Path]) -> None:
    results, _ = quick_run
    # Ten balanced classes: chance is 0.1. A working forward/backward pass gets
    # above 0.9 even in quick mode; 0.5 leaves room for other BLAS builds.
    best = max(row["test_accuracy"] for row in results["lr_sweep"] if row["batch_norm"])
    assert best > 0.5
    assert results["eval_modes"]["running_stats"] > 0.5


def test_renorm_curve_is_sane(quick_run: tuple[dict, Path]) -> None:
    # Renorm starts as plain batch norm and only then opens its bounds: at the
    # batch sizes where batch norm trains well, so must renorm. Same learning
    # rates and steps as the batch-norm rows.
    results, _ = quick_run
    with_bn = results["batch_size_sweep"]
    renorm = results["batch_size_sweep_renorm"]
    for a, r in zip(with_bn, renorm, strict=True):
        assert (r["lr"], r["steps"]) == (a["lr"], a["steps"])
        assert len(r["test_accuracy_per_seed"]) == results["config"]["seeds"]
    assert max(r["test_accuracy"] for r in renorm) > 0.5


def test_running_stats_do_not_depend_on_the_batch(quick_run: tuple[dict, Path]) -> None:
    # In inference mode each image is normalized on its own: feeding the test set
    # one image at a time must give the same predictions (up to a near-tie that
    # BLAS rounding could flip).
    results, _ = quick_run
    modes = results["eval_modes"]
    n_test = results["config"]["n_test"]
    difference = modes["single_sample_running_stats"] - modes["running_stats"]
    assert abs(difference) <= 1 / n_test
    # Batch statistics of a single image are undefined: the demo records the error.
    assert modes["single_sample_batch_stats_error"]


def test_plots_are_written(quick_run: tuple[dict, Path]) -> None:
    _, out = quick_run
    for name in ("lr_sweep.png", "batch_size_sweep.png", "eval_modes.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def test_progress_bars_stay_out_of_a_log(
    quick_process: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    # Off a terminal the bars are off: no carriage returns, one line per experiment.
    done, _ = quick_process
    assert "\r" not in done.stderr
    assert len(done.stderr.splitlines()) <= 10
    assert "1/3 learning rates" in done.stderr
