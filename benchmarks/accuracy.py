"""The largest errors of bnarray and of PyTorch against the float64 reference on
the accuracy suite's data (tests/test_accuracy.py), as reStructuredText tables.

One table per mean/std ratio. Each row is one backend and kernel path; each
column the largest error of one output over every layout of the suite,
measured as the suite measures it (see ``_bounds`` there), and the first row
is the suite's bound. The last row is PyTorch's own ``F.batch_norm`` with
autograd, on the same values (the NCHW layout as NCHW, the others as (m, C)
tensors with the channels on PyTorch's axis 1).

    python benchmarks/accuracy.py            # every backend that is installed
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import BACKENDS, BackendCase
from test_accuracy import (
    LAYOUTS,
    _bounds,
    _data,
    _errors,
    _operands,
    _reference_input,
)

from bnarray._fast import FORCE_GENERIC_ENV, NUMBA_ENV

RATIOS = (1e4, 1e5)
QUANTITIES = ("mean", "var", "y", "dx", "dweight", "dbias", "running_var")


def _cases():
    for ratio in RATIOS:
        a = _data(ratio, far_first=False, seed=int(np.log10(ratio)))
        for layout, (make, axis) in LAYOUTS.items():
            x_ref = _reference_input(layout, a)
            yield ratio, layout, make, axis, a, x_ref, _operands(x_ref, axis)


def _backend(name: str) -> BackendCase | None:
    spec = next(b for b in BACKENDS if b.name == name)
    if importlib.util.find_spec(spec.module.split(".")[0]) is None:
        return None
    lib = importlib.import_module(spec.module)
    if spec.skip_reason(lib) is not None:
        return None
    spec.setup(lib)
    from array_api_compat import array_namespace

    return BackendCase(spec, lib, array_namespace(spec.from_numpy(lib, np.zeros(1))))


def _torch_errors(x_ref: np.ndarray, axis: int, ref: dict) -> dict:
    import torch
    import torch.nn.functional as F

    x = torch.tensor(np.ascontiguousarray(x_ref))
    if axis != 1:  # (m, C) or (k, r, C): channels to axis 1
        x = torch.movedim(x, -1, 1)
    x.requires_grad_(True)
    w = torch.tensor(ref["weight"], requires_grad=True)
    b = torch.tensor(ref["bias"], requires_grad=True)
    rm, rv = torch.zeros(w.shape), torch.ones(w.shape)
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    dy = torch.tensor(np.ascontiguousarray(ref["dy"]))
    if axis != 1:
        dy = torch.movedim(dy, -1, 1)
    y.backward(dy)

    def back(t):
        t = t.detach()
        return (torch.movedim(t, 1, -1) if axis != 1 else t).numpy().astype(np.float64)

    # PyTorch returns no batch statistics: its running update (momentum 0.1
    # from 0 and 1) gives them back, mean = 10·running_mean.
    mean = rm.numpy().astype(np.float64) * 10.0
    got = {
        "mean": mean,
        "running_var": rv.numpy().astype(np.float64),
        "y": back(y),
        "dx": back(x.grad),
        "dweight": w.grad.numpy().astype(np.float64),
        "dbias": b.grad.numpy().astype(np.float64),
    }
    diff = {k: np.abs(v - ref[k]) for k, v in got.items()}
    return {
        "mean": float(np.max(diff["mean"] / np.sqrt(ref["var"]))),
        "y": float(np.max(diff["y"] / ref["y scale"])),
        "dx": float(np.max(diff["dx"]) / np.max(np.abs(ref["dx"]))),
        "dweight": float(np.max(diff["dweight"] / ref["dweight scale"])),
        "dbias": float(np.max(diff["dbias"] / ref["dbias scale"])),
        "running_var": float(np.max(diff["running_var"] / ref["running_var"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    rows: dict[float, dict[str, dict[str, float]]] = {r: {} for r in RATIOS}
    for ratio in RATIOS:
        rows[ratio]["bound"] = _bounds(ratio)

    def record(row: str, errors: dict, ratio: float) -> None:
        worst = rows[ratio].setdefault(row, {})
        for k, e in errors.items():
            worst[k] = max(worst.get(k, 0.0), e)

    paths = [("numpy", "numba"), ("numpy", "numpy"), ("numpy", "generic")]
    paths += [(b, "default") for b in ("array_api_strict", "torch", "jax", "dask")]
    have_torch = importlib.util.find_spec("torch") is not None
    for ratio, layout, make, axis, a, x_ref, ref in _cases():
        for name, path in paths:
            backend = _backend(name)
            if backend is None:
                continue
            os.environ.pop(FORCE_GENERIC_ENV, None)
            os.environ.pop(NUMBA_ENV, None)
            if path == "generic":
                os.environ[FORCE_GENERIC_ENV] = "1"
            elif path == "numpy":
                os.environ[NUMBA_ENV] = "0"
            x = make(backend.xp, backend, a)
            label = name if path == "default" else f"numpy, {path} kernels"
            record(f"bnarray ({label})", _errors(backend, x, ref, axis), ratio)
        if have_torch:
            record("PyTorch F.batch_norm", _torch_errors(x_ref, axis, ref), ratio)
        print(f"done: mean/std {ratio:g}, {layout}", file=sys.stderr)

    for ratio in RATIOS:  # as docs/numerics.rst shows them
        print(f".. csv-table:: Largest errors at mean/std = {ratio:.0e}")
        print("   :header-rows: 1\n   :stub-columns: 1\n")
        print("   " + ", ".join(f'"{c}"' for c in ("path", *QUANTITIES)))
        for row, worst in rows[ratio].items():
            cells = [f"{worst[q]:.1e}" if q in worst else "–" for q in QUANTITIES]
            print("   " + ", ".join(f'"{c}"' for c in (row, *cells)))
        print()


if __name__ == "__main__":
    main()
