"""Plot and tabulate the benchmark's JSON results: time relative to PyTorch, per case.

``python benchmarks/plot.py`` redraws ``docs/_static/benchmarks/cpu.png`` from
``benchmarks/results.json``; ``--table`` also prints the Markdown tables of
docs/benchmarks.md. Results of ``bench_gpu.py`` (times in µs) tabulate the
same way: ``python benchmarks/plot.py benchmarks/results_gpu.json --table
--no-plot``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_JSON = HERE / "results.json"
DEFAULT_PNG = HERE.parent / "docs" / "_static" / "benchmarks" / "cpu.png"
OPS = ["fwd", "bwd", "fwd+bwd", "infer"]
# (key prefix, label) of the implementations compared with PyTorch, where present.
IMPLS = [
    ("bnarray", "bnarray"),
    ("numpy", "bnarray without Numba"),
    ("generic", "generic array-API path"),
]
SHORT = {"numpy": "without Numba ×", "generic": "generic ×"}


def _unit(rows: list[dict]) -> str:
    return "ms" if "torch_ms" in rows[0] else "us"


def _cases(rows: list[dict]) -> list[tuple[tuple[int, ...], str, str]]:
    """Each (shape, layout, dtype) once: by dtype, layout, then size."""
    cases = {(tuple(r["shape"]), r["layout"], r["dtype"]): r["input_mb"] for r in rows}
    return sorted(cases, key=lambda c: (c[2] != "float32", c[1], cases[c]))


def _label(case: tuple[tuple[int, ...], str, str]) -> str:
    shape, layout, dtype = case
    return f"{'×'.join(map(str, shape))} {layout} {dtype}"


def _by_case(rows: list[dict], op: str) -> dict:
    return {
        (tuple(r["shape"]), r["layout"], r["dtype"]): r for r in rows if r["op"] == op
    }


def _ratio(row: dict, impl: str, unit: str) -> float | None:
    value = row.get(f"{impl}_{unit}")
    return None if value is None else value / row[f"torch_{unit}"]


def plot(data: dict, out: Path, op: str = "fwd+bwd") -> None:
    """Horizontal bars: each implementation's time for `op` over PyTorch's, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    unit = _unit(rows)
    cases = _cases(rows)
    by_case = _by_case(rows, op)
    impls = [(k, label) for k, label in IMPLS if f"{k}_{unit}" in rows[0]]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.42 * len(cases)), layout="constrained")
    height = 0.8 / len(impls)
    ys = list(range(len(cases)))
    for i, ((impl, label), color) in enumerate(
        zip(impls, ["C0", "C2", "C7"], strict=False)
    ):
        offset = (i - (len(impls) - 1) / 2) * height
        values = [_ratio(by_case[c], impl, unit) for c in cases]
        ax.barh(
            [y + offset for y, v in zip(ys, values, strict=True) if v is not None],
            [v for v in values if v is not None],
            height=height,
            color=color,
            label=label,
        )
    roof = [by_case[c][f"roof_{unit}"] / by_case[c][f"torch_{unit}"] for c in cases]
    ax.scatter(roof, ys, marker="|", s=200, color="k", label="copy roof", zorder=3)
    if f"floor_{unit}" in rows[0]:
        floor = [_ratio(by_case[c], "floor", unit) for c in cases]
        ax.scatter(
            floor, ys, marker="x", s=40, color="C3", label="measured floor", zorder=3
        )
    ax.axvline(1.0, color="C3", lw=1.5, label="PyTorch (= 1)")
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel(f"{op} time / PyTorch's time (log scale; lower is faster)")
    ax.set_yticks(ys, [_label(c) for c in cases])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    first = [labels.index(label) for _, label in impls]  # the bars, then the lines
    order = first + [i for i in range(len(labels)) if i not in first]
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside lower center",
        ncols=3,
        fontsize="small",
    )
    machine = data["machine"]
    where = machine.get("cpu") or machine.get("gpu")
    threads = f", {machine['threads']} threads" if "threads" in machine else ""
    ax.set_title(
        f"{op}: bnarray against PyTorch {machine['torch']}\n"
        f"{where}{threads}, {data['date']}",
        fontsize="medium",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def _number(value: float, unit: str) -> str:
    return f"{value:.1f}" if unit == "ms" else f"{value:.0f}"


def markdown_tables(data: dict) -> str:
    """Two Markdown tables: fwd+bwd per case, and every operation as × PyTorch."""
    rows = data["results"]
    unit = _unit(rows)
    shown = "ms" if unit == "ms" else "µs"
    cases = _cases(rows)
    main = _by_case(rows, "fwd+bwd")
    others = [(k, label) for k, label in IMPLS[1:] if f"{k}_{unit}" in rows[0]]
    header = [
        "case",
        f"PyTorch {shown}",
        f"bnarray {shown}",
        "× PyTorch",
        *(SHORT[impl] for impl, _ in others),
        "% of roof",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    for c in cases:
        r = main[c]
        cells = [
            _label(c),
            _number(r[f"torch_{unit}"], unit),
            _number(r[f"bnarray_{unit}"], unit),
            f"{_ratio(r, 'bnarray', unit):.2f}",
        ]
        for impl, _ in others:
            ratio = _ratio(r, impl, unit)
            cells.append("—" if ratio is None else f"{ratio:.2f}")
        cells.append(f"{100 * r[f'roof_{unit}'] / r[f'bnarray_{unit}']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")

    per_op = {op: _by_case(rows, op) for op in OPS}
    lines += ["", "| case | " + " | ".join(OPS) + " |", "|---|" + "--:|" * len(OPS)]
    for c in cases:
        ratios = [f"{_ratio(per_op[op][c], 'bnarray', unit):.2f}" for op in OPS]
        lines.append(f"| {_label(c)} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="?", default=DEFAULT_JSON)
    parser.add_argument("png", type=Path, nargs="?", default=DEFAULT_PNG)
    parser.add_argument(
        "--table", action="store_true", help="print the results as Markdown tables"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    if not args.no_plot:
        plot(data, args.png)
    if args.table:
        print(markdown_tables(data))


if __name__ == "__main__":
    main()
