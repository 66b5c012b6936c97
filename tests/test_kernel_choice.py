"""Which kernels serve a call: the namespace, the environment variables, the layout."""

from __future__ import annotations

import importlib.util

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

from bnarray import _math
from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV, _numpy, kernels_for, plan

HAVE_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.mark.skipif(not HAVE_NUMBA, reason="Numba is not installed")
def test_float16_goes_to_the_numpy_kernels_without_hardware_conversion(monkeypatch):
    from bnarray._fast import _numba

    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    x16 = np.ones((4, 3), np.float16)
    assert plan(x16, (1,), np_compat).kernels is _numba
    monkeypatch.setattr(_numba, "HARDWARE_HALF", False)
    assert plan(x16, (1,), np_compat).kernels is _numpy
    assert plan(x16.astype(np.float32), (1,), np_compat).kernels is _numba


@pytest.mark.parametrize(
    ("make", "kept"),
    [
        (lambda x: x, (1,)),
        (lambda x: x[:, :3], (1,)),
        (lambda x: x[::-1], (1,)),
        (lambda x: np.asfortranarray(x), (1,)),
        (lambda x: np.broadcast_to(x[:1], x.shape), (1,)),
    ],
    ids=["contiguous", "column slice", "reversed", "transposed", "broadcast"],
)
def test_the_plan_gives_the_cpu_kernels_one_contiguous_copy_of_any_strided_layout(
    numpy_kernels, make, kept
):
    x = make(np.arange(40.0).reshape(10, 4))
    dy = np.flip(np.ones((10, 4)))[:, : x.shape[1]]
    run = plan(x, kept, np_compat, dy)
    assert run.kernels is kernels_for(np_compat)
    assert run.x.flags.c_contiguous and run.dy.flags.c_contiguous
    np.testing.assert_array_equal(run.x, x)
    np.testing.assert_array_equal(run.dy, dy)
    assert (run.x is x) == x.flags.c_contiguous  # a copy only where needed


@pytest.mark.parametrize(
    ("x", "kept"),
    [
        (np.ones((3, 4, 5)), (0, 2)),  # channel axes not adjacent
        (np.ones((0, 4)), (1,)),  # empty
        (np.ones((5, 4), dtype=">f8"), (1,)),  # not of native byte order
    ],
)
def test_the_plan_sends_what_the_cpu_loops_cannot_take_to_the_generic_kernels(
    numpy_kernels, x, kept
):
    assert plan(x, kept, np_compat).kernels is _math


def test_numpy_arrays_get_the_numba_kernels_where_numba_is_installed(monkeypatch):
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    kernels = kernels_for(np_compat)
    assert kernels.__name__ == f"bnarray._fast.{'_numba' if HAVE_NUMBA else '_numpy'}"
    monkeypatch.setenv(FORCE_GENERIC_ENV, "0")
    assert kernels_for(np_compat) is kernels


@pytest.mark.skipif(not HAVE_NUMBA, reason="Numba is not installed")
def test_an_unusable_numba_warns_and_numpy_arrays_take_the_numpy_kernels(monkeypatch):
    import sys

    from bnarray import _fast

    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.delenv(NUMBA_ENV, raising=False)
    # As if importing the Numba kernels failed (say, Numba too old for NumPy).
    monkeypatch.setitem(sys.modules, "bnarray._fast._numba", None)
    monkeypatch.delattr(_fast, "_numba", raising=False)
    _fast._numba_kernels.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning, match="Numba is installed but bnarray cannot"
        ):
            assert kernels_for(np_compat) is _numpy
    finally:
        _fast._numba_kernels.cache_clear()


def test_environment_variable_turns_numba_off(monkeypatch):
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    monkeypatch.setenv(NUMBA_ENV, "0")
    assert kernels_for(np_compat) is _numpy


def test_environment_variable_forces_the_generic_kernels(monkeypatch):
    monkeypatch.setenv(FORCE_GENERIC_ENV, "1")
    assert kernels_for(np_compat) is _math


def test_other_namespaces_get_the_generic_kernels(monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    assert kernels_for(strict) is _math
