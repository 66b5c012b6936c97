"""Each Python example of README.md runs on its own and prints what the README shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_examples() -> list[tuple[str, str | None]]:
    """``(source, printed)`` for each ``python`` block of the README.

    `printed` is the ``text`` block that comes next, if the next block is one:
    the output the README promises.
    """
    blocks = [(m[1], m[2]) for m in _FENCE.finditer(README.read_text("utf-8"))]
    examples = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "python":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        printed = following[1] if following and following[0] == "text" else None
        examples.append((body, printed))
    return examples


def test_the_readme_has_examples() -> None:
    assert len(readme_examples()) >= 2


@pytest.mark.parametrize(
    ("source", "printed"),
    [
        pytest.param(s, p, id=f"example-{i}")
        for i, (s, p) in enumerate(readme_examples())
    ],
)
def test_readme_example_runs_alone(
    source: str, printed: str | None, tmp_path: Path
) -> None:
    # A fresh interpreter outside the source tree: the example must import
    # everything it uses, and bnarray comes from the installed package.
    done = subprocess.run(
        [sys.executable, "-c", source],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example prints nothing a reader could check"
    if printed is not None:
        lines = [line.rstrip() for line in done.stdout.strip().splitlines()]
        assert lines == [line.rstrip() for line in printed.strip().splitlines()]
