"""What the CuPy kernels hand to CUDA, recorded without a GPU.

Two parts, compared by ``tests/test_cuda_sources.py`` with the snapshot in
``tests/data/cuda_sources.json``:

- ``sources``: the sha256 of every source the hand-written kernels can be built
  from (each kind and name, for every dtype, compute dtype and index type) and
  the name of the function it holds;
- ``launches``: what each of the seven kernels of the contract does for a set of
  shapes, dtypes, layouts and options: every raw kernel launch (source, grid,
  block and arguments), every call of CuPy's generated elementwise and reduction
  kernels (with their definitions under ``definitions``), every array it
  allocates, copies or broadcasts, and what it returns.

CuPy's array functions and kernel classes are replaced by recorders working on
stand-in arrays that carry only metadata, and the device by one with 132
multiprocessors (an H100), so no GPU is needed. Run this file to print the
record as JSON, or with ``--write`` to replace the snapshot (only when a change
of the generated program is intended).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = ["SNAPSHOT", "kernel_sources", "launchable", "record"]

SNAPSHOT = Path(__file__).parent / "data" / "cuda_sources.json"

ELEMENTWISE_NAMES = ["normalize", "normalize_scale", "grad_input", "scale"]
ELEMENTWISE_KINDS = [
    "elementwise",
    "elementwise_rows",
    "elementwise_columns",
    "elementwise_columns2",
]
PAIR_NAMES = ["stats", "grad"]
PAIR_KINDS = ["rows", "columns", "columns2", "finish"]
CHANNEL_NAMES = ["forward_scales", "backward_scales", "running_update"]
DTYPE_CHARS = "efd"
INDEX_TYPES = ["unsigned int", "unsigned long long"]


def launchable(key: str) -> bool:
    """Whether the kernels can launch the source of `key`: the full-size
    kernels with x in float16, float32 or float64 and its compute dtype, the
    per-channel ones in float32 and float64 (float16 running statistics take
    the generic path)."""
    kind, _, dtype, compute, _ = key.split(" ", 4)
    if kind == "channel":
        return dtype in "fd" and compute in "fd"
    return compute == ("d" if dtype == "d" else "f")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def kernel_sources() -> dict[str, tuple[str, str]]:
    """``"kind name dtype compute index"`` -> (source, function name) of every
    raw kernel, for every combination of dtype and compute dtype."""
    from bnarray._fast import _cupy

    kinds = [
        *((k, n) for k in ELEMENTWISE_KINDS for n in ELEMENTWISE_NAMES),
        *((k, n) for k in PAIR_KINDS for n in PAIR_NAMES),
        *(("channel", n) for n in CHANNEL_NAMES),
    ]
    out = {}
    for (kind, name), dtype, compute, index in itertools.product(
        kinds, DTYPE_CHARS, DTYPE_CHARS, INDEX_TYPES
    ):
        kernel = _cupy._raw_kernel(kind, name, dtype, compute, index)
        out[f"{kind} {name} {dtype} {compute} {index}"] = (kernel.code, kernel.name)
    return out


# Stand-ins for CuPy arrays and kernels. Each array has a label that says where
# it came from (an input's name, `new3` for the case's third allocation, and
# what was done to it), so the record shows which buffer each launch reads.


class FakeArray:
    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: Any,
        label: str,
        *,
        contiguous: bool = True,
        ptr: int = 0,
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.label = label
        self.size = math.prod(self.shape)
        self.ndim = len(self.shape)
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.data = SimpleNamespace(ptr=ptr)
        self.device = SimpleNamespace(id=0)

    def describe(self) -> str:
        """``label dtype(shape)``, and ``strided`` if not C-contiguous."""
        strided = "" if self.flags.c_contiguous else " strided"
        return f"{self.label} {self.dtype.name}{list(self.shape)}{strided}"

    def _view(self, shape: tuple[int, ...], label: str, **kw: Any) -> FakeArray:
        kw.setdefault("contiguous", self.flags.c_contiguous)
        kw.setdefault("ptr", self.data.ptr)
        return FakeArray(shape, kw.pop("dtype", self.dtype), label, **kw)

    def reshape(self, *shape: Any) -> FakeArray:
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape = tuple(self.size // known if n == -1 else n for n in shape)
        assert math.prod(shape) == self.size, (self.shape, shape)
        if not self.flags.c_contiguous and shape != self.shape:
            _record({"copy": self.label, "reshape": list(shape)})
            return FakeArray(shape, self.dtype, _new(), ptr=_ptr(self.size))
        return self._view(tuple(shape), f"{self.label}.reshape{list(shape)}")

    def astype(self, dtype: Any) -> FakeArray:
        _record({"astype": self.label, "dtype": np.dtype(dtype).char})
        return FakeArray(self.shape, dtype, _new(), ptr=_ptr(self.size))

    def __getitem__(self, key: Any) -> FakeArray:
        if isinstance(key, int):
            offset = key * math.prod(self.shape[1:]) * self.dtype.itemsize
            return self._view(
                self.shape[1:], f"{self.label}[{key}]", ptr=self.data.ptr + offset
            )
        shape = []
        for n, k in zip(self.shape, key, strict=True):
            start, stop, step = k.indices(n)
            shape.append(len(range(start, stop, step)))
        text = ",".join(f"{k.start}:{k.stop}" for k in key)
        return self._view(tuple(shape), f"{self.label}[{text}]", contiguous=False)

    def __iter__(self) -> Any:
        return (self[i] for i in range(self.shape[0]))

    @property
    def real(self) -> FakeArray:
        return self._part("real")

    @property
    def imag(self) -> FakeArray:
        return self._part("imag")

    def _part(self, part: str) -> FakeArray:
        dtype = np.empty(0, self.dtype).real.dtype
        return self._view(
            self.shape, f"{self.label}.{part}", dtype=dtype, contiguous=False
        )

    def sum(self, *, axis: tuple[int, ...], keepdims: bool) -> FakeArray:
        assert keepdims
        _record({"sum": self.label, "axis": list(axis)})
        shape = tuple(1 if a in axis else n for a, n in enumerate(self.shape))
        return FakeArray(shape, self.dtype, _new(), ptr=_ptr(self.size))


_state: dict[str, Any] = {}


def _record(event: dict[str, Any]) -> None:
    _state["events"].append(event)


def _new() -> str:
    _state["allocations"] += 1
    return f"new{_state['allocations']}"


def _ptr(size: int) -> int:
    # CuPy's memory pool hands out blocks aligned to 256 bytes.
    _state["ptr"] += 256 * (1 + 16 * size // 256)
    return int(_state["ptr"])


def _arg(a: Any) -> Any:
    if isinstance(a, FakeArray):
        return a.describe()
    if isinstance(a, np.generic):
        return f"{type(a).__name__}({a.item()!r})"
    msg = f"unexpected kernel argument {a!r}"
    raise TypeError(msg)


def _empty(shape: Any, dtype: Any) -> FakeArray:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    _record({"empty": list(shape), "dtype": np.dtype(dtype).char})
    return FakeArray(shape, dtype, _new(), ptr=_ptr(math.prod(shape)))


def _empty_like(a: FakeArray) -> FakeArray:
    _record({"empty_like": a.label})
    return FakeArray(a.shape, a.dtype, _new(), ptr=_ptr(a.size))


def _zeros(shape: Any, dtype: Any) -> FakeArray:
    shape = tuple(shape)
    _record({"zeros": list(shape), "dtype": np.dtype(dtype).char})
    return FakeArray(shape, dtype, _new(), ptr=_ptr(math.prod(shape)))


def _ascontiguousarray(a: FakeArray, dtype: Any = None) -> FakeArray:
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    _record({"ascontiguousarray": a.label, "dtype": dtype.char})
    return FakeArray(a.shape, dtype, _new(), ptr=_ptr(a.size))


def _broadcast_to(a: FakeArray, shape: tuple[int, ...]) -> FakeArray:
    _record({"broadcast_to": a.label, "shape": list(shape)})
    return a._view(tuple(shape), f"{a.label}.broadcast", contiguous=False)


class FakeRawKernel:
    def __init__(self, code: str, name: str, **options: Any) -> None:
        assert not options, options
        self.code, self.name = code, name

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: Any):
        _record(
            {
                "raw": self.name,
                "source": _state["source_keys"][_sha(self.code), self.name],
                "grid": [int(g) for g in grid],
                "block": [int(b) for b in block],
                "args": [_arg(a) for a in args],
            }
        )


def _define(definition: dict[str, Any]) -> None:
    """Keep a generated kernel's definition under its name (one per name)."""
    known = _state["definitions"].setdefault(definition["name"], definition)
    assert known == definition, f"two kernels named {definition['name']}"


def _params(text: str) -> list[tuple[str, str]]:
    return [tuple(p.split()) for p in text.split(",")]  # type: ignore[misc]


class FakeElementwiseKernel:
    def __init__(
        self, in_params: str, out_params: str, operation: str, name: str, **kw: Any
    ) -> None:
        self.definition = {
            "class": "ElementwiseKernel",
            "in_params": in_params,
            "out_params": out_params,
            "operation": operation,
            "name": name,
            **kw,
        }
        if type(self) is FakeElementwiseKernel:
            _define(self.definition)
        self.inputs, self.outputs = _params(in_params), _params(out_params)

    def _types(self, args: tuple[Any, ...]) -> dict[str, np.dtype]:
        types = {}
        for (ctype, _), a in zip(self.inputs, args, strict=True):
            types.setdefault(ctype, a.dtype)
        return types

    def __call__(self, *args: Any, **kw: Any) -> Any:
        _record(
            {
                "kernel": self.definition["name"],
                "args": [_arg(a) for a in args],
                **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
            }
        )
        shape = np.broadcast_shapes(*(a.shape for a in args if hasattr(a, "shape")))
        types = self._types(args)
        outs = [
            FakeArray(shape, types[t], _new(), ptr=_ptr(math.prod(shape)))
            for t, _ in self.outputs
        ]
        return outs[0] if len(outs) == 1 else tuple(outs)


class FakeReductionKernel(FakeElementwiseKernel):
    def __init__(
        self,
        in_params: str,
        out_params: str,
        map_expr: str,
        reduce_expr: str,
        post_map_expr: str,
        identity: str,
        name: str,
        **kw: Any,
    ) -> None:
        super().__init__(in_params, out_params, map_expr, name, **kw)
        self.definition.update(
            {
                "class": "ReductionKernel",
                "reduce_expr": reduce_expr,
                "post_map_expr": post_map_expr,
                "identity": identity,
            }
        )
        _define(self.definition)

    def __call__(self, *args: Any, axis: tuple[int, ...], keepdims: bool) -> Any:
        _record(
            {
                "kernel": self.definition["name"],
                "args": [_arg(a) for a in args],
                "axis": list(axis),
                "keepdims": keepdims,
            }
        )
        assert keepdims
        shape = np.broadcast_shapes(*(a.shape for a in args if hasattr(a, "shape")))
        shape = tuple(1 if a in axis else n for a, n in enumerate(shape))
        ((ctype, _),) = self.outputs
        return FakeArray(shape, ctype, _new(), ptr=_ptr(math.prod(shape)))


class FakeDevice:
    def __init__(self, device_id: int) -> None:
        self.attributes = {"MultiProcessorCount": 132}


# The cases. Full-size arrays: NCHW and NHWC and their kin from small to large
# (one of over 2**31 values), 2-D, tuple axes; contiguous, not contiguous, and
# float16 starting 2 bytes into 4-byte words.

SHAPES = [
    ((1000, 7), (1,)),
    ((40_000, 7), (1,)),
    ((7, 1001), (0,)),
    ((300, 5), (1,)),
    ((5, 37, 301), (1,)),
    ((129, 11, 3), (2,)),
    ((3, 37, 41, 43), (1,)),
    ((3, 41, 43, 37), (3,)),
    ((3, 41, 43, 38), (3,)),
    ((2, 5, 7, 9, 11), (1,)),
    ((2, 7, 9, 11, 5), (4,)),
    ((2, 3, 140_001), (1,)),
    ((64, 9, 3, 3), (1,)),
    ((50, 300, 2, 2), (1,)),
    ((4, 2000, 2, 2), (1,)),
    ((3, 140_001), (1,)),
    ((8, 5, 6, 3), (1, 2)),
    ((4, 5, 6, 70), (0, 2)),
    ((256, 64, 56, 56), (1,)),
    ((256, 56, 56, 64), (3,)),
    ((32, 2048), (1,)),
    ((8, 3, 224, 224), (1,)),
    ((1, 1, 5), (1,)),
    ((100_000, 1), (1,)),
    ((4, 1, 1000), (1,)),
    ((16, 1024, 1024, 130), (3,)),  # over 2**31 values
    ((2, 2**30 + 3), (0,)),
]
# Not contiguous (CuPy's generated kernels serve them, whatever the shape)...
STRIDED = [
    ((300, 5), (1,)),
    ((3, 37, 41, 43), (1,)),
    ((3, 41, 43, 38), (3,)),
    ((8, 5, 6, 3), (1, 2)),
    ((2, 7, 9, 11, 5), (4,)),
]
# ... and float16 two bytes into a 4-byte word (no two values per thread).
OFFSET = [
    ((3, 41, 43, 38), (3,)),
    ((3, 41, 43, 37), (3,)),
    ((256, 56, 56, 64), (3,)),
    ((5, 37, 301), (1,)),
]
LAYOUTS = [
    *((shape, dtype, "contiguous") for shape in SHAPES for dtype in "efd"),
    *((shape, dtype, "strided") for shape in STRIDED for dtype in "efd"),
    *((shape, "e", "offset") for shape in OFFSET),
]


def _full(shape: tuple[int, ...], dtype: str, label: str, layout: str) -> FakeArray:
    if layout == "strided":
        return FakeArray(shape, dtype, label, contiguous=False, ptr=1 << 20)
    ptr = (1 << 30) + (2 if layout == "offset" else 0)
    return FakeArray(shape, dtype, label, ptr=ptr)


def _channel(shape: tuple[int, ...], dtype: str, label: str, strided: bool) -> Any:
    return FakeArray(shape, dtype, label, contiguous=not strided, ptr=1 << 28)


def _cases() -> dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Description -> (kernel, arguments, keyword arguments)."""
    cases = {}
    for (shape, kept), dtype, layout in LAYOUTS:
        compute = "d" if dtype == "d" else "f"
        reduce_axes = tuple(a for a in range(len(shape)) if a not in kept)
        cs = tuple(1 if a in reduce_axes else n for a, n in enumerate(shape))
        where = f"{list(shape)} kept={list(kept)} {dtype} {layout}"
        x, dy = (_full(shape, dtype, label, layout) for label in ("x", "dy"))
        mean, scale, shift, dy_scale, xc_scale = (
            _channel(cs, compute, label, False)
            for label in ("mean", "scale", "shift", "dy_scale", "xc_scale")
        )
        cases.update(
            {
                f"batch_stats {where}": ("batch_stats", (x, reduce_axes), {}),
                f"normalize {where}": ("normalize", (x, mean, scale, shift), {}),
                f"normalize without shift {where}": (
                    "normalize",
                    (x, mean, scale, None),
                    {},
                ),
                f"grad_sums {where}": ("grad_sums", (dy, x, mean, reduce_axes), {}),
                f"grad_input {where}": (
                    "grad_input",
                    (dy, x, mean, dy_scale, xc_scale, shift),
                    {},
                ),
                f"grad_input eval {where}": (
                    "grad_input",
                    (dy, x, mean, dy_scale, None, None),
                    {},
                ),
            }
        )
        if layout == "contiguous" and dtype == "f":
            strided = (_channel(cs, compute, n, True) for n in ("mean", "scale"))
            ones = _channel((1,) * len(shape), compute, "shift", False)
            cases.update(
                {
                    f"normalize, strided and broadcast per-channel arrays {where}": (
                        "normalize",
                        (x, *strided, ones),
                        {},
                    ),
                    f"grad_input without shift {where}": (
                        "grad_input",
                        (dy, x, mean, dy_scale, xc_scale, None),
                        {},
                    ),
                    f"grad_input without xc_scale {where}": (
                        "grad_input",
                        (dy, x, mean, dy_scale, None, shift),
                        {},
                    ),
                }
            )
    for n, dtype, strided, affine, training in itertools.product(
        [1, 37, 100_000], "fd", [False, True], [False, True], [False, True]
    ):
        where = f"C={n} {dtype} strided={strided} affine={affine}"
        var, gamma, sum_dy, sum_dy_xc, invstd = (
            _channel((1, n, 1), dtype, label, strided)
            for label in ("var", "gamma", "sum_dy", "sum_dy_xc", "invstd")
        )
        gamma = gamma if affine else None
        if training:
            cases[f"forward_scales {where}"] = (
                "forward_scales",
                (var, gamma, 1e-5),
                {},
            )
        cases[f"backward_scales training={training} {where}"] = (
            "backward_scales",
            (sum_dy, sum_dy_xc, invstd, gamma, 1001),
            {"training": training},
        )
    for n, (running, batch), strided in itertools.product(
        [1, 37, 100_000], ["ff", "dd", "df", "fd", "ee", "ef"], [False, True]
    ):
        arrays = (
            _channel((n,), dtype, label, strided)
            for dtype, label in zip(
                (running, running, batch, batch),
                ("running_mean", "running_var", "mean", "var"),
                strict=True,
            )
        )
        where = f"C={n} running {running} batch {batch} strided={strided}"
        cases[f"running_update {where}"] = (
            "running_update",
            tuple(arrays),
            {"factor": 0.1, "bessel": 1000 / 999},
        )
    # Running statistics of two dtypes.
    cases["running_update running_mean f running_var d"] = (
        "running_update",
        tuple(
            _channel((7,), dtype, label, False)
            for dtype, label in zip(
                "fdff", ("running_mean", "running_var", "mean", "var"), strict=True
            )
        ),
        {"factor": 0.1, "bessel": 1.0},
    )
    # Per-channel arithmetic on no channels takes the generic path.
    cases["forward_scales C=0"] = (
        "forward_scales",
        (_channel((1, 0, 1), "f", "var", False), None, 1e-5),
        {},
    )
    return cases


def record() -> dict[str, Any]:
    """The record described in the module docstring (CuPy is patched for good:
    run it in a process of its own)."""
    import cupy

    from bnarray import _math
    from bnarray._fast import _cupy

    sources = {
        key: {"sha256": _sha(code), "function": name}
        for key, (code, name) in kernel_sources().items()
    }
    source_keys = {
        (s["sha256"], s["function"]): key
        for key, s in sources.items()
        if launchable(key)
    }
    assert len(source_keys) == sum(map(launchable, sources)), "two equal sources"
    _state.update(definitions={}, source_keys=source_keys)
    for attr, fake in [
        ("empty", _empty),
        ("empty_like", _empty_like),
        ("zeros", _zeros),
        ("ascontiguousarray", _ascontiguousarray),
        ("broadcast_to", _broadcast_to),
        ("RawKernel", FakeRawKernel),
        ("ElementwiseKernel", FakeElementwiseKernel),
        ("ReductionKernel", FakeReductionKernel),
    ]:
        setattr(cupy, attr, fake)
    cupy.cuda.Device = FakeDevice
    for cached in ("_raw_kernel", "_elementwise", "_reductions", "_multiprocessors"):
        if hasattr(getattr(_cupy, cached, None), "cache_clear"):
            getattr(_cupy, cached).cache_clear()

    def generic(name: str) -> Any:
        def call(*args: Any, **kw: Any) -> str:
            _record({"generic": name})
            return "generic"

        return call

    for name in ("forward_scales", "backward_scales", "running_update"):
        setattr(_math, name, generic(name))

    launches = {}
    for description, (function, args, kwargs) in _cases().items():
        _state.update(events=[], allocations=0, ptr=1 << 34)
        result = getattr(_cupy, function)(*args, **kwargs, xp=cupy)
        results = result if isinstance(result, tuple) else (result,)
        launches[description] = {
            "events": _state["events"],
            "returns": [
                a.describe() if isinstance(a, FakeArray) else a for a in results
            ],
        }
    return {
        "sources": sources,
        "definitions": _state["definitions"],
        "launches": launches,
    }


if __name__ == "__main__":
    snapshot = record()
    # One line per source, definition and case: small, and diffs show the case.
    text = (
        "{\n"
        + ",\n".join(
            f" {json.dumps(part)}: {{\n"
            + ",\n".join(
                f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}"
                for key, value in sorted(snapshot[part].items())
            )
            + "\n }"
            for part in ("sources", "definitions", "launches")
        )
        + "\n}\n"
    )
    assert json.loads(text) == snapshot
    if sys.argv[1:] == ["--write"]:
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    else:
        sys.stdout.write(text)
