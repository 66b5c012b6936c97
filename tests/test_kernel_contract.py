"""Every kernel set provides the seven functions of the contract, with the
signatures of the `Kernels` protocol (and so of the reference, `_math`)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest

from bnarray import _math
from bnarray._fast import Kernels

NAMES = sorted(
    name
    for name, member in vars(Kernels).items()
    if inspect.isfunction(member) and not name.startswith("_")
)


def _without_self(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [
        (p.name, p.kind, p.default)
        for p in signature.parameters.values()
        if p.name != "self"
    ]


def _module(name: str):
    library = {"_numba": "numba", "_cupy": "cupy"}.get(name)
    if library and importlib.util.find_spec(library) is None:
        pytest.skip(
            f"{library} is not installed: bnarray._fast.{name} cannot be imported"
        )
    return importlib.import_module(f"bnarray._fast.{name}")


def test_the_contract_names_the_seven_kernels():
    assert (
        sorted(
            [
                "backward_scales",
                "batch_stats",
                "forward_scales",
                "grad_input",
                "grad_sums",
                "normalize",
                "running_update",
            ]
        )
        == NAMES
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_kernels_have_the_contract_signatures(name):
    assert _without_self(inspect.signature(getattr(_math, name))) == _without_self(
        inspect.signature(getattr(Kernels, name))
    )


@pytest.mark.parametrize("module", ["_numpy", "_numba", "_cupy"])
def test_every_fast_kernel_set_has_the_contract_signatures(module):
    kernels = _module(module)
    assert sorted(kernels.__all__) == NAMES
    for name in NAMES:
        got = _without_self(inspect.signature(getattr(kernels, name)))
        assert got == _without_self(inspect.signature(getattr(Kernels, name))), name


def test_the_fused_passes_of_both_cpu_kernel_sets_take_the_same_arguments():
    """The core calls the fused training passes of either the NumPy-only or
    the Numba kernels with the same arguments."""
    numpy_kernels, numba_kernels = _module("_numpy"), _module("_numba")
    for name in ("small_forward", "small_backward"):
        assert _without_self(
            inspect.signature(getattr(numpy_kernels, name))
        ) == _without_self(inspect.signature(getattr(numba_kernels, name))), name
