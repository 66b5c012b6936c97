"""nox sessions: one test session per array backend, plus lint, docs, build, the
workflow checks, bench and demo."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
# Environments are reused between runs: a session that installs something in
# one step and relies on its absence in another must remove it first
# (see tests-oldest), and tools are pinned so that an old environment and a
# fresh clone run the same versions.
nox.options.reuse_venv = "yes"
nox.options.error_on_external_run = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# PyTorch 2.13.0 for Python 3.11 is the CPU build on this project's machines;
# other versions or interpreters pull multi-GB CUDA builds.
TORCH = "torch==2.13.0"
# The tests of the NumPy and Numba kernels themselves.
KERNEL_TESTS = [
    "tests/test_fast_paths.py",
    "tests/test_threads.py",
    "tests/test_kernel_choice.py",
    "tests/test_accuracy.py",
]
# The floor of the `dependencies` in pyproject.toml, tested by `tests-oldest`,
# and of the optional Numba.
OLDEST = {"numpy": "1.26.0", "array-api-compat": "1.13.0"}
OLDEST_NUMBA = {"numba": "0.60.0"}
# The other frameworks that tests/test_frameworks.py runs as oracles.
FRAMEWORKS = {"keras": "3.15.1", "flax": "0.12.8", "jax": "0.10.2"}
LINTERS = ["ruff==0.17.6", "mypy==2.4.1"]
WORKFLOW_CHECKERS = ["check-jsonschema==0.39.0", "zizmor==1.32.0", "pre-commit==4.7.0"]
PACKAGING = [
    "build==1.6.1",
    "twine==7.0.0",
    "check-wheel-contents==0.6.3",
    "validate-pyproject[all]==0.27",
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _pins(versions: dict[str, str | None]) -> list[str]:
    return [f"{name}=={v}" if v else name for name, v in versions.items()]


def _pytest(session: nox.Session, backends: str, *args: str) -> None:
    session.run("pytest", f"--backends={backends}", *args, *session.posargs)


def _require_installed(session: nox.Session, versions: dict[str, str | None]) -> None:
    """Fail unless each distribution is installed at that version (``None``: absent)."""
    check = (
        "import importlib.metadata as m, json, sys\n"
        "def have(name):\n"
        "    try: return m.version(name)\n"
        "    except m.PackageNotFoundError: return None\n"
        "want = json.loads(sys.argv[1])\n"
        "wrong = {n: have(n) for n in want if have(n) != want[n]}\n"
        "sys.exit(f'want {want}, installed: {wrong}' if wrong else 0)"
    )
    session.run("python", "-c", check, json.dumps(versions), silent=True)


@nox.session(name="tests-numpy", python=PYTHONS)
def tests_numpy(session: nox.Session) -> None:
    """The test suite on NumPy and read-only NumPy arrays, with Numba installed.

    The kernel tests (test_fast_paths, test_threads, test_kernel_choice,
    test_accuracy) also run the NumPy-only kernels.
    """
    session.install(".[test,numba]")
    _pytest(session, "numpy,numpy_readonly")


@nox.session(name="tests-strict", python="3.11")
def tests_strict(session: nox.Session) -> None:
    """The test suite on array-api-strict, including its second device; with
    CuPy and NVRTC installed (no GPU needed), also the check that the CUDA
    programs and launches of the CuPy kernels are those of the snapshot, and
    that every source compiles."""
    session.install(".[test,cupy]", "nvidia-cuda-nvrtc-cu12")
    _pytest(session, "array_api_strict")


@nox.session(name="tests-torch", python="3.11")
def tests_torch(session: nox.Session) -> None:
    """The test suite on PyTorch CPU tensors, with PyTorch's own batch norm as oracle."""
    session.install(".[test]", TORCH)
    _pytest(session, "torch")


@nox.session(name="tests-jax", python="3.11")
def tests_jax(session: nox.Session) -> None:
    """The test suite on JAX (CPU, float64 enabled, two host devices), plus jit and grad."""
    session.install(".[test]", "jax")
    # Two CPU devices, so that mixing devices can be tested without a GPU.
    session.env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    _pytest(session, "jax")


@nox.session(name="tests-dask", python="3.11")
def tests_dask(session: nox.Session) -> None:
    """The test suite on chunked Dask arrays, plus laziness and a local cluster."""
    session.install(".[test]", "dask[array]", "distributed")
    _pytest(session, "dask")


@nox.session(name="tests-keras", python="3.11")
def tests_keras(session: nox.Session) -> None:
    """Keras 3 (on PyTorch) and Flax as oracles (tests/test_frameworks.py).

    Several training steps give the outputs and running statistics of bnarray
    with the converted momentum, eps and ``unbiased=False``, and state dicts
    move both ways. Here a missing framework fails the tests instead of
    skipping them.
    """
    session.install(".[test]", TORCH, *_pins(FRAMEWORKS))
    _require_installed(session, FRAMEWORKS)
    session.env["KERAS_BACKEND"] = "torch"
    session.env["BNARRAY_REQUIRE_FRAMEWORKS"] = "1"
    _pytest(session, "numpy", "tests/test_frameworks.py")


@nox.session(name="tests-distributed", python="3.11")
def tests_distributed(session: nox.Session) -> None:
    """Synchronized batch norm over real processes on 127.0.0.1 (tests/distributed).

    torch.distributed (gloo) and MPI (mpiexec from PyPI's mpi4py and MPICH) with
    3 processes each, JAX on 4 host devices with shard_map, and
    examples/train_digits_distributed.py over 2 processes; every group and
    process has a bounded timeout.
    """
    session.install(
        ".[test]", TORCH, "jax", "dask[array]", "mpi4py", "mpich",
        "-r", "examples/requirements.txt",
    )  # fmt: skip
    session.env["BNARRAY_DISTRIBUTED_TESTS"] = "1"
    _pytest(session, "numpy", "tests/distributed")


@nox.session(name="tests-cupy", python="3.11", default=False)
def tests_cupy(session: nox.Session) -> None:
    """The test suite on CuPy arrays on a GPU; skips, with the reason, without one.

    mpi4py and MPICH let tests/test_sync_cupy.py run CuPy through MPI.
    """
    session.install(".[test]", "cupy-cuda12x", "mpi4py", "mpich")
    _pytest(session, "cupy")
    # CuPy imports without a GPU and its tests then skip: say so for the whole
    # session rather than report a success that tested nothing on a GPU.
    probe = "import cupy; print(cupy.is_available())"
    if session.run("python", "-c", probe, silent=True).strip() != "True":
        session.skip(
            "CuPy is installed but no CUDA GPU is usable here "
            "(cupy.is_available() is False); its tests were skipped"
        )


@nox.session(name="tests-oldest", python="3.11")
def tests_oldest(session: nox.Session) -> None:
    """The test suite on the oldest supported NumPy and array-api-compat.

    First without Numba (the NumPy-only kernels), then the fast-path tests on the
    oldest supported Numba.
    """
    # The reused environment still holds the Numba that the second half of the
    # previous run installed: remove it, and check, so the first half runs
    # without it on every run.
    session.run(
        "python", "-m", "pip", "uninstall", "--yes", "--quiet", "numba", "llvmlite"
    )
    session.install(".[test]", *_pins(OLDEST))
    _require_installed(session, {**OLDEST, "numba": None, "llvmlite": None})
    _pytest(session, "numpy,numpy_readonly,array_api_strict")
    session.install(*_pins(OLDEST_NUMBA), *_pins(OLDEST))
    _require_installed(session, {**OLDEST, **OLDEST_NUMBA})
    _pytest(session, "numpy", *KERNEL_TESTS)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy --strict on the library.

    The hooks of .pre-commit-config.yaml run the same checks.
    """
    session.install(*LINTERS, "numpy", "array-api-compat")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the HTML docs (warnings are errors), run their doctests, check the site.

    The site is checked offline (local assets, links) and in a headless
    Chromium-based browser. Without a browser, that check is skipped and the
    session reports itself skipped, with the reason; with CI set it fails
    instead. Install `chromium` (or Chrome), or set BNARRAY_BROWSER to a
    browser's path.
    """
    session.install("-e", ".", "-r", "docs/requirements.txt", "pytest")
    build = "docs/_build/html"
    session.run("sphinx-build", "-W", "--keep-going", "-j", "2", "docs", build)
    flags = "doctest_optionflags=NORMALIZE_WHITESPACE ELLIPSIS"
    doctest = ["pytest", "-p", "no:cacheprovider", "-o", flags]
    session.run(*doctest, "--doctest-glob=*.rst", "--ignore=docs/_build", "docs")
    # The CuPy and Numba kernels import their optional library at module level
    # and hold no examples.
    skip = [
        "--ignore=src/bnarray/_fast/_cupy.py",
        "--ignore=src/bnarray/_fast/_numba.py",
    ]
    session.run(*doctest, "--doctest-modules", *skip, "src/bnarray")
    check = ["python", "docs/check_site.py", build]
    browser = session.run("python", "docs/check_site.py", "--find-browser", silent=True)
    if browser.strip() or _in_ci():
        session.run(*check, "--require-browser")
        return
    session.run(*check, "--no-browser")
    session.skip(
        "docs built, doctests and link checks passed, but the BROWSER CHECK WAS "
        "SKIPPED: no chromium, chromium-browser, google-chrome or "
        "google-chrome-stable on PATH; install one or set BNARRAY_BROWSER to a "
        "browser's path"
    )


def _dist_problems(dist: Path) -> list[str]:
    """What the sdist and wheel in `dist` hold that they should not, or lack."""
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    problems = []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    name, version = wheel.name.split("-")[:2]
    info = f"{name}-{version}.dist-info/"
    problems += [
        f"{wheel.name}: {n} (only the package and its metadata belong in the wheel)"
        for n in names
        if not n.startswith(("bnarray/", info))
    ]
    problems += [
        f"{wheel.name}: no {n}"
        for n in (
            "bnarray/__init__.py",
            "bnarray/py.typed",
            "bnarray/_fast/__init__.py",
        )
        if n not in names
    ]
    problems += [f"{wheel.name}: {n}" for n in names if "__pycache__" in n]
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    # The sources of the tests and the docs, as they are in this tree.
    wanted = [
        p.as_posix()
        for pattern in (
            "tests/*.py",
            "docs/*.rst",
            "docs/*.md",
            "docs/*.py",
            "docs/*.txt",
        )
        for p in sorted(Path().glob(pattern))
    ]
    wanted += ["pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE"]
    wanted += [p.as_posix() for p in sorted(Path("src/bnarray").rglob("*.py"))]
    wanted += ["src/bnarray/py.typed"]
    problems += [f"{sdist.name}: no {name}" for name in wanted if name not in members]
    problems += [
        f"{sdist.name}: {name}"
        for name in sorted(members)
        if "__pycache__" in name or name.startswith(("docs/_build/", ".nox/", "dist/"))
    ]
    return problems


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """Build the sdist and the wheel, check them, run the README from the wheel.

    Builds into dist/ and checks with validate-pyproject, twine check,
    check-wheel-contents and the list of files each holds; then installs the
    wheel into a fresh virtual environment and runs the README's Python examples
    with it, from outside the source tree.
    """
    session.install(*PACKAGING)
    session.run("validate-pyproject", "pyproject.toml")
    dist = Path("dist")
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    session.run("twine", "check", "--strict", *map(str, sorted(dist.iterdir())))
    session.run("check-wheel-contents", *map(str, dist.glob("*.whl")))
    problems = _dist_problems(dist)
    if problems:
        session.error("wrong contents:\n  " + "\n  ".join(problems))
    session.log("sdist holds the tests and docs sources; the wheel only the package")

    tmp = Path(session.create_tmp()).resolve()
    venv = tmp / "wheel-venv"
    session.run("python", "-m", "venv", "--clear", str(venv))
    python = str(venv / ("Scripts" if sys.platform == "win32" else "bin") / "python")
    (wheel,) = (p.resolve() for p in dist.glob("*.whl"))
    session.run(
        python, "-m", "pip", "install", "--quiet", str(wheel), "pytest", external=True
    )
    readme_test = Path("tests/test_readme.py").resolve()
    where = (
        "import sys, pathlib, bnarray\n"
        "path = pathlib.Path(bnarray.__file__).resolve()\n"
        "assert path.is_relative_to(pathlib.Path(sys.prefix).resolve()), path\n"
        "print('bnarray', bnarray.__version__, 'imported from', path)\n"
    )
    with session.chdir(tmp):
        session.run(python, "-c", where, external=True)
        # No conftest: the README test needs only the installed wheel (and NumPy).
        session.run(
            python, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider",
            "--rootdir", str(tmp), str(readme_test), external=True,
        )  # fmt: skip


@nox.session(python="3.11")
def workflows(session: nox.Session) -> None:
    """Check the GitHub workflows and the pre-commit configuration.

    check-jsonschema (GitHub's workflow schema) and zizmor --offline (pinned
    actions, credentials, permissions, template injection) on
    .github/workflows/, and pre-commit validate-config.
    """
    session.install(*WORKFLOW_CHECKERS)
    files = sorted(str(p) for p in Path(".github/workflows").glob("*.y*ml"))
    if not files:
        session.error("no workflow files in .github/workflows/")
    session.run(
        "check-jsonschema", "--builtin-schema", "vendor.github-workflows", *files
    )
    session.run("zizmor", "--offline", ".github/workflows/")
    session.run("pre-commit", "validate-config", ".pre-commit-config.yaml")


# Not in a plain `nox` run: tests-demo runs it in --quick mode.
@nox.session(python="3.11", default=False)
def demo(session: nox.Session) -> None:
    """The main job: train an MLP on the digits with and without batch norm.

    Writes plots and results.json to results/ (`nox -s demo -- --quick` for a
    short run).
    """
    session.install(".", "-r", "examples/requirements.txt")
    session.run(
        "python", "examples/train_digits.py", "--out", "results", *session.posargs
    )


@nox.session(name="tests-demo", python="3.11")
def tests_demo(session: nox.Session) -> None:
    """The demo's own test: a --quick run gives complete, sane results and plots."""
    session.install(".[test]", "-r", "examples/requirements.txt")
    session.run("pytest", "tests/test_demo.py", "--backends=numpy", *session.posargs)


@nox.session(name="bench-gpu", python="3.11", default=False)
def bench_gpu(session: nox.Session) -> None:
    """Time the CuPy kernels against cuDNN through PyTorch CUDA (needs an NVIDIA GPU).

    Installs CuPy for CUDA 12 and PyTorch's default (CUDA) wheel: several GB.
    Writes benchmarks/results_gpu.json.
    """
    session.install(".", "cupy-cuda12x", "torch")
    out = "benchmarks/results_gpu.json"
    session.run("python", "benchmarks/bench_gpu.py", "--out", out, *session.posargs)


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """Time the NumPy kernels against PyTorch CPU and the copy roof, then one
    training step on small arrays against PyTorch and plain NumPy (`-- --quick`:
    about 1 min).

    Prints the tables and writes benchmarks/results.json and
    benchmarks/results_small.json; a full run also redraws the plot of
    docs/benchmarks.md.
    """
    session.install(".[numba]", TORCH, "matplotlib")
    session.run("python", "benchmarks/bench.py", *session.posargs)
    # One training step on small arrays (`--quick`: two of the five shapes).
    quick = ["--quick"] if "--quick" in session.posargs else []
    session.run("python", "benchmarks/bench_small.py", *quick)
    if not quick:
        session.run("python", "benchmarks/plot.py")
