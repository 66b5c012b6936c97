"""Backends under test: the `backend` and `xp` fixtures, selected with ``--backends``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import pytest

__all__ = ["BACKENDS", "Backend", "BackendCase"]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _strict_device1(lib: ModuleType, a: np.ndarray) -> Any:
    return lib.asarray(a, device=lib.Device("device1"))


def _strict_to_numpy(lib: ModuleType, a: Any) -> np.ndarray:
    # np.asarray refuses arrays on the fake second device: move them back first.
    return np.asarray(lib.asarray(a, device=lib.Device("CPU_DEVICE")))


def _torch_to_numpy(lib: ModuleType, a: Any) -> np.ndarray:
    return a.detach().cpu().numpy()


# For JAX, `lib` is jax.numpy: the module users pass as `xp`.
def _jax_setup(lib: ModuleType) -> None:
    import jax

    # Without x64, JAX silently turns every float64 request into float32.
    jax.config.update("jax_enable_x64", True)


def _jax_device1(lib: ModuleType, a: np.ndarray) -> Any:
    import jax

    return jax.device_put(lib.asarray(a), jax.devices()[1])


def _jax_device1_skip(lib: ModuleType) -> str | None:
    import jax

    if len(jax.devices()) < 2:
        return (
            "JAX has one device; set XLA_FLAGS=--xla_force_host_platform_device_count=2 "
            "(as `nox -s tests-jax` does) to test a second one"
        )
    return None


def _dask_from_numpy(lib: ModuleType, a: np.ndarray) -> Any:
    # Two chunks along every axis, so that reductions combine partial results.
    return lib.from_array(a.copy(), chunks=tuple(max(1, (n + 1) // 2) for n in a.shape))


def _dask_to_numpy(lib: ModuleType, a: Any) -> np.ndarray:
    return np.asarray(a.compute())


def _cupy_skip(lib: ModuleType) -> str | None:
    # CuPy wheels import without a GPU; only array creation fails (CUDARuntimeError).
    if not lib.is_available():
        return "CuPy is installed but no CUDA GPU is usable here (cupy.is_available() is False)"
    return None


@dataclass(frozen=True)
class Backend:
    """How to make test arrays for one library (and device).

    `family` is the name ``--backends`` selects; `module` is imported lazily so
    a session only needs the libraries it tests.
    """

    name: str
    family: str
    module: str
    from_numpy: Callable[[ModuleType, np.ndarray], Any]
    to_numpy: Callable[[ModuleType, Any], np.ndarray] = lambda lib, a: np.asarray(a)
    has_float16: bool = True
    setup: Callable[[ModuleType], None] = lambda lib: None
    skip_reason: Callable[[ModuleType], str | None] = field(default=lambda lib: None)


# One line per backend. The generic `xp` tests run on every backend selected by
# ``--backends=family1,family2``.
BACKENDS = [
    Backend("numpy", "numpy", "numpy", lambda lib, a: a.copy()),
    Backend("numpy_readonly", "numpy_readonly", "numpy", lambda lib, a: _readonly(a)),
    Backend(
        "array_api_strict",
        "array_api_strict",
        "array_api_strict",
        lambda lib, a: lib.asarray(a),
        _strict_to_numpy,
        has_float16=False,
    ),
    Backend(
        "array_api_strict_device1",
        "array_api_strict",
        "array_api_strict",
        _strict_device1,
        _strict_to_numpy,
        has_float16=False,
    ),
    Backend("torch", "torch", "torch", lambda lib, a: lib.tensor(a), _torch_to_numpy),
    Backend("jax", "jax", "jax.numpy", lambda lib, a: lib.asarray(a), setup=_jax_setup),
    Backend(
        "jax_cpu1",
        "jax",
        "jax.numpy",
        _jax_device1,
        setup=_jax_setup,
        skip_reason=_jax_device1_skip,
    ),
    Backend("dask", "dask", "dask.array", _dask_from_numpy, _dask_to_numpy),
    Backend(
        "cupy",
        "cupy",
        "cupy",
        lambda lib, a: lib.asarray(a),
        lambda lib, a: lib.asnumpy(a),
        skip_reason=_cupy_skip,
    ),
]


@dataclass
class BackendCase:
    """A selected backend, ready to make arrays: what the tests receive."""

    backend: Backend
    lib: ModuleType
    xp: Any

    @property
    def name(self) -> str:
        return self.backend.name

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """A copy of NumPy data (cast to NumPy `dtype` first) on this backend."""
        a = np.asarray(a, dtype=dtype)
        return self.backend.from_numpy(self.lib, a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self.backend.to_numpy(self.lib, a)

    @property
    def device(self) -> Any:
        """The device this backend's test arrays live on."""
        from array_api_compat import device

        return device(self.asarray(np.zeros(1)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backends",
        default="numpy,numpy_readonly,array_api_strict",
        help="comma-separated backend families for the `backend`/`xp` fixtures",
    )


def _selected(config: pytest.Config) -> list[Backend]:
    families = [
        f.strip() for f in config.getoption("--backends").split(",") if f.strip()
    ]
    known = {b.family for b in BACKENDS}
    unknown = sorted(set(families) - known)
    if unknown:
        msg = f"unknown --backends {unknown}; known: {sorted(known)}"
        raise pytest.UsageError(msg)
    return [b for b in BACKENDS if b.family in families]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        selected = _selected(metafunc.config)
        metafunc.parametrize(
            "backend", selected, ids=[b.name for b in selected], indirect=True
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "skip_backend(name, *, reason): skip the `backend` (by name or family) "
        "for which the test does not apply, saying why",
    )
    config.addinivalue_line(
        "markers", "needs_float16: skip backends that have no float16 dtype"
    )


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> BackendCase:
    spec: Backend = request.param
    for marker in request.node.iter_markers("skip_backend"):
        if spec.name in marker.args or spec.family in marker.args:
            pytest.skip(f"{spec.name}: {marker.kwargs['reason']}")
    if request.node.get_closest_marker("needs_float16") and not spec.has_float16:
        pytest.skip(f"{spec.name} has no float16")
    lib = pytest.importorskip(spec.module)
    reason = spec.skip_reason(lib)
    if reason is not None:
        pytest.skip(reason)
    spec.setup(lib)
    from array_api_compat import array_namespace

    probe = spec.from_numpy(lib, np.zeros(1))
    return BackendCase(spec, lib, array_namespace(probe))


@pytest.fixture
def xp(backend: BackendCase) -> Any:
    return backend.xp


@pytest.fixture(params=["numba", "numpy"])
def numpy_kernels(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The NumPy kernels that serve the test: the Numba loops (where Numba is
    installed) or the NumPy-only ones (``BNARRAY_NUMBA=0``)."""
    import importlib.util

    import array_api_compat.numpy as np_compat

    from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV, _numpy, kernels_for

    monkeypatch.delenv(FORCE_GENERIC_ENV, raising=False)
    kernels: Any
    if request.param == "numba":
        if importlib.util.find_spec("numba") is None:
            pytest.skip("Numba is not installed (pip install bnarray[numba])")
        from bnarray._fast import _numba as kernels

        monkeypatch.delenv(NUMBA_ENV, raising=False)
    else:
        kernels = _numpy
        monkeypatch.setenv(NUMBA_ENV, "0")
    assert kernels_for(np_compat) is kernels
    return kernels
