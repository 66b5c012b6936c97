"""Plot the benchmark's JSON results: time relative to PyTorch CPU, per case."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
DEFAULT_JSON = HERE / "results.json"
DEFAULT_PNG = HERE.parent / "docs" / "_static" / "benchmarks" / "cpu.png"
OPS = ["fwd", "bwd", "fwd+bwd", "infer"]


def plot(data: dict, out: Path) -> None:
    rows = data["results"]
    cases = sorted(
        {(tuple(r["shape"]), r["layout"], r["dtype"]) for r in rows},
        key=lambda c: (c[1], c[2], c[0]),
    )
    fig, axes = plt.subplots(
        1, len(OPS), figsize=(4 * len(OPS), 0.45 * len(cases) + 1.6)
    )
    labels = ["x".join(map(str, s)) + f" {lay} {dt}" for s, lay, dt in cases]
    for ax, op in zip(axes, OPS, strict=True):
        by_case = {
            (tuple(r["shape"]), r["layout"], r["dtype"]): r
            for r in rows
            if r["op"] == op
        }
        ys = range(len(cases))
        impls = [
            (impl, color)
            for impl, color in [("bnarray", "C0"), ("numpy", "C2"), ("generic", "C7")]
            if f"{impl}_ms" in rows[0]
        ]
        height = 0.8 / len(impls)
        for i, (impl, color) in enumerate(impls):
            offset = (i - (len(impls) - 1) / 2) * height
            values = [by_case[c][f"{impl}_ms"] / by_case[c]["torch_ms"] for c in cases]
            label = {"numpy": "bnarray without Numba"}.get(impl, impl)
            ax.barh(
                [y + offset for y in ys],
                values,
                height=height,
                color=color,
                label=label,
            )
        roof = [by_case[c]["roof_ms"] / by_case[c]["torch_ms"] for c in cases]
        ax.scatter(
            roof, list(ys), marker="|", s=120, color="k", label="copy roof", zorder=3
        )
        if "floor_ms" in rows[0]:
            floor = [by_case[c]["floor_ms"] / by_case[c]["torch_ms"] for c in cases]
            ax.scatter(
                floor,
                list(ys),
                marker="x",
                s=30,
                color="C3",
                label="floor (measured)",
                zorder=3,
            )
        ax.axvline(1.0, color="C3", lw=1)
        ax.set_title(op)
        ax.set_xscale("log")
        ax.set_xlabel("time / PyTorch CPU time (log)")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels if op == OPS[0] else [])
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    machine = data["machine"]
    fig.suptitle(
        f"bnarray vs PyTorch {machine['torch']} CPU, {machine['cpu']}, "
        f"{machine['threads']} threads, {data['date']} (lower is faster)"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def markdown_table(data: dict) -> str:
    """The results as a Markdown table, for docs/benchmarks.md."""
    numpy = "numpy_ms" in data["results"][0]
    floor = "floor_ms" in data["results"][0]
    lines = [
        "| shape | layout | dtype | op | PyTorch ms | bnarray ms | × PyTorch | % of roof "
        "| extra MB |"
        + (" floor × PyTorch |" if floor else "")
        + (" without Numba ms | × PyTorch |" if numpy else "")
        + " generic ms | × PyTorch |",
        "|---|---|---|---|--:|--:|--:|--:|--:|"
        + ("--:|" if floor else "")
        + ("--:|--:|" if numpy else "")
        + "--:|--:|",
    ]
    for r in data["results"]:
        torch_ms = r["torch_ms"]
        lines.append(
            f"| {'×'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['op']} "
            f"| {torch_ms:.1f} | {r['bnarray_ms']:.1f} | {r['bnarray_ms'] / torch_ms:.2f} "
            f"| {100 * r['roof_ms'] / r['bnarray_ms']:.0f} | {r['bnarray_extra_mb']:.1f} "
            + (f"| {r['floor_ms'] / torch_ms:.2f} " if floor else "")
            + (
                f"| {r['numpy_ms']:.1f} | {r['numpy_ms'] / torch_ms:.2f} "
                if numpy
                else ""
            )
            + f"| {r['generic_ms']:.1f} | {r['generic_ms'] / torch_ms:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path, nargs="?", default=DEFAULT_JSON)
    parser.add_argument("png", type=Path, nargs="?", default=DEFAULT_PNG)
    parser.add_argument(
        "--table",
        action="store_true",
        help="also print the results as a Markdown table",
    )
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    plot(data, args.png)
    if args.table:
        print(markdown_table(data))


if __name__ == "__main__":
    main()
