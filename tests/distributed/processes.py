"""Start worker processes on this machine and collect what they leave, with a
deadline: a test never waits longer than its timeout."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

__all__ = ["HERE", "Finished", "check_ok", "free_port", "load", "run_all"]

HERE = Path(__file__).resolve().parent
"""This folder, where the worker scripts are."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Finished:
    command: list[str]
    returncode: int
    output: str
    seconds: float


def run_all(
    commands: list[list[str]],
    *,
    logs: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> list[Finished]:
    """Run `commands` at once; fail the test, after killing what still runs, if
    they take longer than `timeout` seconds together."""
    start = time.monotonic()
    running = []
    for i, command in enumerate(commands):
        log = (logs / f"process{i}.log").open("w")
        running.append(
            (command, log, subprocess.Popen(command, stdout=log, stderr=log, env=env))
        )
    finished = []
    try:
        for command, _log, process in running:
            left = timeout - (time.monotonic() - start)
            try:
                process.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                for _, _, other in running:
                    other.kill()
                    other.wait()
                outputs = "\n".join(_read(logs, i) for i in range(len(commands)))
                pytest.fail(f"{command} still ran after {timeout} s:\n{outputs}")
            seconds = time.monotonic() - start
            finished.append((command, process.returncode, seconds))
    finally:
        for _, log, _ in running:
            log.close()
    return [
        Finished(command, code, _read(logs, i), seconds)
        for i, (command, code, seconds) in enumerate(finished)
    ]


def _read(logs: Path, i: int) -> str:
    return (logs / f"process{i}.log").read_text(errors="replace")


def check_ok(finished: list[Finished]) -> None:
    failed = [f for f in finished if f.returncode != 0]
    if failed:
        report = "\n\n".join(
            f"{f.command} exited with {f.returncode}:\n{f.output[-4000:]}"
            for f in failed
        )
        pytest.fail(report)


def load(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """What scenarios.save wrote: ``{kind/case: {name: array}}``."""
    nested: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as saved:
        for key in saved.files:
            where, name = key.rsplit("/", 1)
            nested.setdefault(where, {})[name] = saved[key]
    return nested
