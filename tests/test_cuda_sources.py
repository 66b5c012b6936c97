"""The CuPy kernels hand CUDA the program of the snapshot, and it compiles (no GPU needed).

The snapshot, ``tests/data/cuda_sources.json``, holds every CUDA source the
kernels can build and every launch (grid, block, arguments) they make for a
set of shapes: see ``cuda_snapshot.py``, which records them with stand-ins
for CuPy's arrays and kernels. A change to ``_cupy.py`` or ``_cuda.py`` that
is meant to leave the program alone must leave this test passing; one that
changes it on purpose rewrites the snapshot with
``python tests/cuda_snapshot.py --write`` and is checked on a GPU by
``test_cupy_kernels.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cuda_snapshot
import pytest

pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def recorded():
    # In a process of its own: the recording replaces CuPy's array functions
    # and kernel classes for good.
    done = subprocess.run(
        [sys.executable, cuda_snapshot.__file__],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def snapshot():
    return json.loads(cuda_snapshot.SNAPSHOT.read_text())


def _assert_same(now, expected, what):
    """`now` has the keys and values of `expected`; else a message naming the
    first few keys that are missing, new or different, and the first difference."""
    missing = sorted(expected.keys() - now.keys())
    new = sorted(now.keys() - expected.keys())
    differ = sorted(k for k in expected.keys() & now.keys() if now[k] != expected[k])
    if missing or new or differ:
        first = {k: {"now": now[k], "snapshot": expected[k]} for k in differ[:1]}
        msg = (
            f"{what}: {len(missing)} missing {missing[:5]}, {len(new)} new "
            f"{new[:5]}, {len(differ)} different {differ[:5]}; first: {first}"
        )
        pytest.fail(msg)


def test_every_kernel_source_is_the_snapshots(recorded, snapshot):
    _assert_same(recorded["sources"], snapshot["sources"], "sources")


def test_cupys_generated_kernels_are_defined_as_in_the_snapshot(recorded, snapshot):
    _assert_same(recorded["definitions"], snapshot["definitions"], "definitions")


def test_every_launch_is_the_snapshots(recorded, snapshot):
    _assert_same(recorded["launches"], snapshot["launches"], "launches")


def _nvrtc():
    """CuPy's NVRTC bindings, or a skip saying why they cannot compile here."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:  # no NVRTC library (pip install nvidia-cuda-nvrtc-cu12)
        pytest.skip(f"NVRTC is not usable here ({type(error).__name__}: {error})")
    return nvrtc


# As CuPy compiles a RawKernel (cupy/cuda/compiler.py), for an H100.
NVRTC_OPTIONS = ["-arch=sm_90", "-ftz=true", "--device-as-default-execution-space"]


def test_every_launchable_kernel_compiles_with_nvrtc():
    nvrtc = _nvrtc()
    failed = {}
    sources = cuda_snapshot.kernel_sources()
    for key, (code, _) in sources.items():
        if not cuda_snapshot.launchable(key):
            continue
        program = nvrtc.createProgram(code, "kernel.cu", [], [])
        try:
            nvrtc.compileProgram(program, NVRTC_OPTIONS)
        except nvrtc.NVRTCError:
            failed[key] = nvrtc.getProgramLog(program)
        finally:
            nvrtc.destroyProgram(program)
    assert not failed, next(iter(failed.items()))
