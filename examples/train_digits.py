"""Train a small batch-normalized network on scikit-learn's digits and plot three claims.

The network is plain NumPy (dense layers, sigmoid, softmax cross-entropy, SGD, the
dense backward pass written by hand); every batch-normalization forward and backward
pass goes through bnarray. Three experiments, each printed as a table and saved as a
PNG:

1. ``lr_sweep``: a 3x100 sigmoid MLP with batch 60, with and without batch norm, at
   several learning rates (the analogue of Ioffe & Szegedy 2015, Figure 1).
2. ``batch_size_sweep``: batch sizes 2 to 128 for the same number of epochs with the
   learning rate scaled linearly with the batch size (the protocol of Wu & He 2018),
   with batch norm, with batch renormalization (Ioffe 2017) and without either.
3. ``eval_modes``: one trained network evaluated with running averages, with the
   test batch's own statistics, and one sample at a time.

Run ``python examples/train_digits.py --out results`` (add ``--quick`` for a run of
well under a minute). Results go to ``results/results.json`` and ``results/*.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import bnarray as bn

__all__ = ["main"]

HIDDEN = (100, 100, 100)
"""Three hidden layers of 100 sigmoid units, as in Ioffe & Szegedy (2015), Sec. 4.1."""

REFERENCE_BATCH = 60
"""The batch size of the learning-rate sweep and the reference of the linear scaling rule."""

EPS = 1e-5
MOMENTUM = 0.1

RENORM_WARMUP = 0.05
"""Fraction of the steps trained with plain batch norm before renorm's bounds open."""
RENORM_DMAX_AT = 0.25
"""Fraction of the steps at which dmax reaches RENORM_DMAX (linearly from 0)."""
RENORM_RMAX_AT = 0.40
"""Fraction of the steps at which rmax reaches RENORM_RMAX (linearly from 1)."""
RENORM_RMAX = 3.0
RENORM_DMAX = 5.0


@dataclass(frozen=True)
class Budget:
    """How long each experiment trains."""

    lr_steps: int
    eval_every: int
    epochs: int
    seeds: int
    learning_rates: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    base_lr: float
    eval_lr: float


FULL = Budget(
    lr_steps=3000,
    eval_every=50,
    epochs=30,
    seeds=3,
    learning_rates=(0.01, 0.1, 1.0, 10.0, 100.0),
    batch_sizes=(2, 4, 8, 16, 32, 64, 128),
    base_lr=1.0,
    eval_lr=1.0,
)
QUICK = Budget(
    lr_steps=500,
    eval_every=50,
    epochs=4,
    seeds=1,
    learning_rates=FULL.learning_rates,
    batch_sizes=FULL.batch_sizes,
    base_lr=FULL.base_lr,
    eval_lr=FULL.eval_lr,
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits, scaled to [0, 1], split once with a fixed seed."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(*, seed: int) -> Digits:
    """scikit-learn's bundled digits (1797 images), 70 % train / 30 % test, stratified."""
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    return Digits(x_train, y_train, x_test, y_test)


# ------------------------------------------------------------------------ network


@dataclass
class Dense:
    """``z = h @ w (+ b)``; the bias is dropped before batch norm, whose beta replaces it."""

    w: np.ndarray
    b: np.ndarray | None
    grad_w: np.ndarray | None = None
    grad_b: np.ndarray | None = None


@dataclass
class MLP:
    """Dense -> [BatchNorm] -> sigmoid, repeated, then a dense softmax layer."""

    dense: list[Dense]
    norms: list[bn.BatchNorm | None]
    # Saved by `forward` for `backward`: each hidden layer's input and output...
    cache: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # ...and, for plotting, the input of the last hidden layer's sigmoids.
    last_sigmoid_input: np.ndarray | None = None

    @classmethod
    def create(cls, *, batch_norm: bool, rng: np.random.Generator) -> MLP:
        sizes = (64, *HIDDEN, 10)
        dense = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            # LeCun-normal initialization, identical for both networks (same rng seed).
            w = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=(fan_in, fan_out))
            is_output = i == len(sizes) - 2
            b = np.zeros(fan_out) if (is_output or not batch_norm) else None
            dense.append(Dense(w, b))
        norms = [
            bn.BatchNorm(
                n, axis=-1, eps=EPS, momentum=MOMENTUM, xp=np, dtype=np.float64
            )
            if batch_norm
            else None
            for n in HIDDEN
        ]
        return cls(dense, norms)

    def set_training(self, training: bool) -> None:
        for norm in self.norms:
            if norm is not None:
                norm.train() if training else norm.eval()

    def forward(self, x: np.ndarray, *, mode: str = "train") -> np.ndarray:
        """Logits. `mode`: "train" (batch statistics, running averages updated),
        "running" (running averages) or "batch" (the batch's own statistics, no update).
        """
        self.cache = []
        h = x
        for layer, norm in zip(self.dense[:-1], self.norms, strict=True):
            z = h @ layer.w
            if layer.b is not None:
                z = z + layer.b
            if norm is not None:
                if mode == "batch":
                    z, _ = bn.batch_norm_forward(
                        z, norm.weight, norm.bias, axis=-1, eps=EPS, training=True
                    )
                else:
                    z = norm(z)
            a = sigmoid(z)
            self.cache.append((h, a))
            h = a
        self.last_sigmoid_input = z
        out = self.dense[-1]
        return h @ out.w + out.b

    def backward(self, dlogits: np.ndarray) -> None:
        """Gradients of the loss whose gradient w.r.t. the logits is `dlogits`."""
        _, h = self.cache[-1]
        out = self.dense[-1]
        out.grad_w = h.T @ dlogits
        out.grad_b = dlogits.sum(axis=0)
        dh = dlogits @ out.w.T
        for i in reversed(range(len(self.norms))):
            layer, norm = self.dense[i], self.norms[i]
            h_in, a = self.cache[i]
            dz = dh * a * (1.0 - a)
            if norm is not None:
                dz = norm.backward(dz)
            layer.grad_w = h_in.T @ dz
            if layer.b is not None:
                layer.grad_b = dz.sum(axis=0)
            dh = dz @ layer.w.T

    def sgd_step(self, lr: float) -> None:
        for layer in self.dense:
            layer.w = layer.w - lr * layer.grad_w
            if layer.b is not None:
                layer.b = layer.b - lr * layer.grad_b
        for norm in self.norms:
            if norm is not None:
                norm.weight = norm.weight - lr * norm.grad_weight
                norm.bias = norm.bias - lr * norm.grad_bias


def renorm_bounds(step: int, steps: int) -> bn.Renorm | None:
    """The clipping bounds of batch renormalization at `step` of `steps`.

    Ioffe (2017, Sec. 4) trains with plain batch norm for 5k steps, then relaxes
    the bounds until dmax = 5 at 25k steps and rmax = 3 at 40k. Here those step
    counts are read as percent of the run: plain batch norm for the first 5 %
    (None: ``Renorm(rmax=1, dmax=0)`` would compute the same), then dmax rises
    linearly from 0 to 5 by 25 % and rmax from 1 to 3 by 40 %, and both stay.
    """
    done = step / steps
    if done <= RENORM_WARMUP:
        return None

    def ramp(end: float) -> float:
        return min(1.0, (done - RENORM_WARMUP) / (end - RENORM_WARMUP))

    return bn.Renorm(
        rmax=1.0 + (RENORM_RMAX - 1.0) * ramp(RENORM_RMAX_AT),
        dmax=RENORM_DMAX * ramp(RENORM_DMAX_AT),
    )


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, in its tanh form (no overflow for large ``|z|``)."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def softmax_cross_entropy(
    logits: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over the batch and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_p[np.arange(n), y].mean()
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), y] -= 1.0
    return float(loss), dlogits / n


def accuracy(
    model: MLP, x: np.ndarray, y: np.ndarray, *, mode: str = "running"
) -> float:
    model.set_training(False)
    predictions = model.forward(x, mode=mode).argmax(axis=1)
    model.set_training(True)
    return float((predictions == y).mean())


# ----------------------------------------------------------------------- training


@dataclass
class Run:
    """One training run: its final test accuracy and the curve that led there."""

    steps: list[int]
    test_accuracy: list[float]
    sigmoid_input_percentiles: list[list[float]]
    diverged: bool
    model: MLP


def batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless mini-batch indices: reshuffle every epoch, drop the incomplete last batch."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(
    data: Digits,
    *,
    batch_norm: bool,
    lr: float,
    batch_size: int,
    steps: int,
    eval_every: int,
    seed: int,
    progress: tqdm,
    renorm: bool = False,
) -> Run:
    """SGD for `steps` steps, evaluating on the test set every `eval_every` steps.

    With `renorm`, the batch-norm layers follow :func:`renorm_bounds`.
    """
    model = MLP.create(batch_norm=batch_norm, rng=np.random.default_rng([seed, 0]))
    order = batches(len(data.x_train), batch_size, np.random.default_rng([seed, 1]))
    run = Run([], [], [], diverged=False, model=model)

    def record(step: int) -> None:
        run.steps.append(step)
        run.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        # Input to one sigmoid of the last hidden layer, over the test set
        # (Ioffe & Szegedy 2015, Figure 1 b, c).
        unit = model.last_sigmoid_input[:, 0]
        run.sigmoid_input_percentiles.append(
            [float(v) for v in np.percentile(unit, [15, 50, 85])]
        )

    record(0)
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(1, steps + 1):
            idx = next(order)
            if renorm:
                bounds = renorm_bounds(step, steps)
                for norm in model.norms:
                    norm.renorm = bounds
            logits = model.forward(data.x_train[idx])
            loss, dlogits = softmax_cross_entropy(logits, data.y_train[idx])
            if not np.isfinite(loss):
                run.diverged = True
                progress.update(steps - step + 1)
                break
            model.backward(dlogits)
            model.sgd_step(lr)
            progress.update(1)
            if step % eval_every == 0 or step == steps:
                record(step)
    if run.diverged:
        # A network with non-finite weights predicts class 0 for every image
        # (argmax of NaN); draw that as a flat line to the end of the budget.
        flat = chance_prediction_accuracy(data)
        for step in range(run.steps[-1] + eval_every, steps + eval_every, eval_every):
            run.steps.append(min(step, steps))
            run.test_accuracy.append(flat)
            run.sigmoid_input_percentiles.append([float("nan")] * 3)
    return run


def chance_prediction_accuracy(data: Digits) -> float:
    """Accuracy of a network that predicts one class (0) for every test image."""
    return float((data.y_test == 0).mean())


# -------------------------------------------------------------------- experiments


def _progress(total: int, desc: str) -> tqdm:
    """A progress bar on a terminal; one line per experiment in a log file."""
    # disable=None turns the bar off when stderr is not a terminal, where its
    # carriage returns would fill a log with thousands of partial lines.
    bar = tqdm(total=total, desc=desc, unit="step", disable=None, mininterval=0.5)
    if bar.disable:
        print(f"{desc}: {total} training steps", file=sys.stderr, flush=True)
    return bar


def lr_sweep(data: Digits, budget: Budget, seed: int) -> tuple[list[dict], dict]:
    """With and without batch norm at several learning rates, batch 60."""
    configs = [(lr, bn_) for lr in budget.learning_rates for bn_ in (False, True)]
    total = len(configs) * budget.seeds * budget.lr_steps
    rows, curves = [], {}
    with _progress(total, "1/3 learning rates") as progress:
        for lr, batch_norm in configs:
            progress.set_postfix(lr=lr, batch_norm=batch_norm)
            runs = [
                train(
                    data,
                    batch_norm=batch_norm,
                    lr=lr,
                    batch_size=REFERENCE_BATCH,
                    steps=budget.lr_steps,
                    eval_every=budget.eval_every,
                    seed=seed + s,
                    progress=progress,
                )
                for s in range(budget.seeds)
            ]
            finals = [r.test_accuracy[-1] for r in runs]
            rows.append(
                {
                    "lr": lr,
                    "batch_norm": batch_norm,
                    "test_accuracy": float(np.mean(finals)),
                    "test_accuracy_per_seed": finals,
                    "diverged_seeds": sum(r.diverged for r in runs),
                    "steps_to_90_percent": steps_to(0.9, runs),
                    "curve_steps": runs[0].steps,
                    "curve_test_accuracy": [
                        float(v)
                        for v in np.mean([r.test_accuracy for r in runs], axis=0)
                    ],
                }
            )
            curves[(lr, batch_norm)] = runs
    return rows, curves


def steps_to(target: float, runs: list[Run]) -> int | None:
    """First evaluated step at which the seed-averaged test accuracy reaches `target`."""
    mean = np.mean([r.test_accuracy for r in runs], axis=0)
    reached = np.flatnonzero(mean >= target)
    return int(runs[0].steps[reached[0]]) if reached.size else None


def batch_size_sweep(
    data: Digits, budget: Budget, seed: int
) -> tuple[list, list, list]:
    """Same number of epochs for every batch size, learning rate scaled linearly.

    Rows with batch norm, with batch renormalization, and without either.
    """
    n = len(data.x_train)
    steps_for = {b: budget.epochs * (n // b) for b in budget.batch_sizes}
    norms = ("batch norm", "renorm", "none")
    total = len(norms) * budget.seeds * sum(steps_for.values())
    rows: dict[str, list[dict]] = {norm: [] for norm in norms}
    with _progress(total, "2/3 batch sizes") as progress:
        for batch_size in budget.batch_sizes:
            lr = budget.base_lr * batch_size / REFERENCE_BATCH
            for norm in norms:
                batch_norm = norm != "none"
                progress.set_postfix(batch_size=batch_size, norm=norm)
                finals, finals_batch_stats = [], []
                for s in range(budget.seeds):
                    run = train(
                        data,
                        batch_norm=batch_norm,
                        lr=lr,
                        batch_size=batch_size,
                        steps=steps_for[batch_size],
                        eval_every=steps_for[batch_size],
                        seed=seed + s,
                        progress=progress,
                        renorm=norm == "renorm",
                    )
                    finals.append(run.test_accuracy[-1])
                    finals_batch_stats.append(
                        accuracy(run.model, data.x_test, data.y_test, mode="batch")
                        if batch_norm and not run.diverged
                        else None
                    )
                row = {
                    "batch_size": batch_size,
                    "lr": lr,
                    "steps": steps_for[batch_size],
                    "test_accuracy": float(np.mean(finals)),
                    "test_accuracy_per_seed": finals,
                }
                if batch_norm:
                    row["test_accuracy_batch_stats"] = float(
                        np.mean([a for a in finals_batch_stats if a is not None] or [0])
                    )
                rows[norm].append(row)
    return rows["batch norm"], rows["renorm"], rows["none"]


def eval_modes(data: Digits, budget: Budget, seed: int) -> dict:
    """One network trained with batch 60, evaluated several ways."""
    with _progress(budget.lr_steps, "3/3 test-time modes") as progress:
        run = train(
            data,
            batch_norm=True,
            lr=budget.eval_lr,
            batch_size=REFERENCE_BATCH,
            steps=budget.lr_steps,
            eval_every=budget.eval_every,
            seed=seed,
            progress=progress,
        )
    model, x, y = run.model, data.x_test, data.y_test
    model.set_training(False)
    one_at_a_time = np.array(
        [model.forward(x[i : i + 1], mode="running").argmax() for i in range(len(x))]
    )
    try:
        model.forward(x[:1], mode="batch")
        single_sample_error = None
    except ValueError as error:
        single_sample_error = str(error)
    model.set_training(True)

    # Batch statistics on random test batches of several sizes...
    rng = np.random.default_rng([seed, 2])
    by_size = {}
    for size in (*budget.batch_sizes, len(x)):
        chunks = np.array_split(rng.permutation(len(x)), len(x) // size)
        correct = sum(
            int((model.forward(x[c], mode="batch").argmax(axis=1) == y[c]).sum())
            for c in chunks
        )
        by_size[size] = correct / len(x)
    # ...and on batches that hold one class each: a prediction that depends on the
    # other images in the batch.
    correct = sum(
        int((model.forward(x[y == k], mode="batch").argmax(axis=1) == k).sum())
        for k in range(10)
    )
    results = {
        "running_stats": accuracy(model, x, y, mode="running"),
        "batch_stats": accuracy(model, x, y, mode="batch"),
        "single_sample_running_stats": float((one_at_a_time == y).mean()),
        "single_sample_batch_stats_error": single_sample_error,
        "batch_stats_single_class_batches": correct / len(x),
        "batch_stats_by_test_batch_size": [
            {"batch_size": s, "test_accuracy": a} for s, a in by_size.items()
        ],
        "train_lr": budget.eval_lr,
        "train_steps": budget.lr_steps,
    }
    return results


# -------------------------------------------------------------------------- plots


def plot_lr_sweep(curves: dict, budget: Budget, path: Path) -> None:
    lrs = budget.learning_rates
    fig, axes = plt.subplots(
        2, len(lrs), figsize=(3.2 * len(lrs), 6.6), squeeze=False, layout="constrained"
    )
    styles = ((False, "tab:gray", "without batch norm"), (True, "tab:blue", "with"))
    n = budget.seeds
    for col, lr in enumerate(lrs):
        ax = axes[0, col]
        for batch_norm, color, label in styles:
            runs = curves[(lr, batch_norm)]
            if n > 1:
                for r in runs:
                    ax.plot(r.steps, r.test_accuracy, color=color, alpha=0.3, lw=0.8)
            mean = np.mean([r.test_accuracy for r in runs], axis=0)
            ax.plot(runs[0].steps, mean, color=color, lw=2, label=label)
        ax.set_title(f"learning rate {lr:g}")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        if col == 0:
            what = f"mean of {n} seeds" if n > 1 else "one seed"
            ax.set_ylabel(f"test accuracy\n({what})")
        ax = axes[1, col]
        for batch_norm, color, _ in styles:
            r = curves[(lr, batch_norm)][0]
            p = np.array(r.sigmoid_input_percentiles)
            ax.plot(r.steps, p[:, 1], color=color, lw=1.5)
            ax.fill_between(r.steps, p[:, 0], p[:, 2], color=color, alpha=0.25)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel(
                "input to one last-layer sigmoid\n(median, 15-85 % band; first seed)"
            )
    handles = [
        plt.Line2D([], [], color="tab:blue", lw=2, label="with batch norm"),
        plt.Line2D([], [], color="tab:gray", lw=2, label="without batch norm"),
    ]
    if n > 1:
        handles.append(
            plt.Line2D(
                [], [], color="k", lw=0.8, alpha=0.3, label="single seeds (top row)"
            )
        )
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    fig.suptitle(
        "3x100 sigmoid MLP, batch 60, digits: test accuracy (top) and the input"
        " to one sigmoid (bottom)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_batch_sizes(with_bn: list, renorm: list, without: list, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    sizes = [r["batch_size"] for r in with_bn]
    for rows, key, style, color, label in (
        (with_bn, "test_accuracy", "o-", "tab:blue", "batch norm (running averages)"),
        (
            with_bn,
            "test_accuracy_batch_stats",
            "s--",
            "tab:cyan",
            "batch norm (whole test set's statistics)",
        ),
        (
            renorm,
            "test_accuracy",
            "^-",
            "tab:orange",
            "batch renorm (running averages)",
        ),
        (without, "test_accuracy", "o-", "tab:gray", "no batch norm"),
    ):
        ax.plot(sizes, [r[key] for r in rows], style, color=color, label=label)
        if key == "test_accuracy":
            for r in rows:  # one dot per seed
                seeds = r["test_accuracy_per_seed"]
                ax.plot([r["batch_size"]] * len(seeds), seeds, ".", color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        sizes, [f"{r['batch_size']}\n{r['steps']} steps" for r in with_bn], fontsize=8
    )
    ax.set_xlabel("training batch size (same epochs; learning rate proportional to it)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("3x100 sigmoid MLP, digits: mean of seeds (line), each seed (dots)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_eval_modes(results: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    bars = {
        "running averages\n(whole test set)": results["running_stats"],
        "running averages\n(one image at a time)": results[
            "single_sample_running_stats"
        ],
        "test set's own\nstatistics": results["batch_stats"],
        "batch statistics,\none class per batch": results[
            "batch_stats_single_class_batches"
        ],
    }
    left.bar(
        range(len(bars)),
        list(bars.values()),
        color=["tab:blue", "tab:blue", "tab:cyan", "tab:red"],
    )
    left.set_xticks(range(len(bars)), list(bars.keys()), fontsize=8)
    for i, v in enumerate(bars.values()):
        left.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    left.set_ylim(0, 1.08)
    left.set_ylabel("test accuracy")
    left.set_title(
        "one trained network, four ways to normalize at test time", fontsize=10
    )
    rows = results["batch_stats_by_test_batch_size"]
    sizes = [r["batch_size"] for r in rows]
    right.plot(
        sizes,
        [r["test_accuracy"] for r in rows],
        "s-",
        color="tab:cyan",
        label="statistics of random test batches",
    )
    right.axhline(
        results["running_stats"],
        color="tab:blue",
        label="running averages (any batch, even 1)",
    )
    right.set_xscale("log", base=2)
    right.set_xticks(sizes, [str(s) for s in sizes])
    right.set_xlabel("test batch size")
    right.set_ylabel("test accuracy")
    right.set_title("batch statistics need a batch; size 1 is an error", fontsize=10)
    right.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def print_tables(results: dict) -> None:
    """The three tables, as Markdown."""

    def table(header: list[str], rows: list[list[str]]) -> None:
        print("| " + " | ".join(header) + " |")
        print("|:---|" + "---:|" * (len(header) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")

    n = results["config"]["seeds"]
    seeds = f"{n} seed" if n == 1 else f"{n} seeds"
    print(f"\n1. Learning rates (3x100 sigmoid MLP, batch 60; mean of {seeds})\n")
    by_lr: dict[float, dict[bool, dict]] = {}
    for row in results["lr_sweep"]:
        by_lr.setdefault(row["lr"], {})[row["batch_norm"]] = row
    rows = []
    for lr, pair in by_lr.items():
        cells = [f"{lr:g}"]
        for b in (False, True):
            r = pair[b]
            mark = f" ({r['diverged_seeds']} diverged)" if r["diverged_seeds"] else ""
            cells.append(f"{r['test_accuracy']:.3f}{mark}")
        for b in (False, True):
            steps = pair[b]["steps_to_90_percent"]
            cells.append("never" if steps is None else str(steps))
        rows.append(cells)
    table(
        [
            "learning rate",
            "test acc. without BN",
            "test acc. with BN",
            "steps to 90 % without BN",
            "steps to 90 % with BN",
        ],
        rows,
    )

    print(
        f"\n2. Batch sizes ({results['config']['epochs']} epochs each, learning rate"
        f" proportional to the batch size; mean of {seeds})\n"
    )
    rows = [
        [
            str(a["batch_size"]),
            f"{a['lr']:.3g}",
            str(a["steps"]),
            f"{a['test_accuracy']:.3f}",
            f"{a['test_accuracy_batch_stats']:.3f}",
            f"{r['test_accuracy']:.3f}",
            f"{b['test_accuracy']:.3f}",
        ]
        for a, r, b in zip(
            results["batch_size_sweep"],
            results["batch_size_sweep_renorm"],
            results["batch_size_sweep_no_batch_norm"],
            strict=True,
        )
    ]
    table(
        [
            "batch size",
            "learning rate",
            "steps",
            "BN, running averages",
            "BN, test set's statistics",
            "renorm, running averages",
            "no BN",
        ],
        rows,
    )

    e = results["eval_modes"]
    print("\n3. Test-time normalization of one network (BN, batch 60)\n")
    rows = [
        ["running averages, whole test set", f"{e['running_stats']:.3f}"],
        [
            "running averages, one image at a time",
            f"{e['single_sample_running_stats']:.3f}",
        ],
        ["the whole test set's own statistics", f"{e['batch_stats']:.3f}"],
        *(
            [
                f"statistics of random test batches of {r['batch_size']}",
                f"{r['test_accuracy']:.3f}",
            ]
            for r in e["batch_stats_by_test_batch_size"]
        ),
        [
            "statistics of test batches of one class each",
            f"{e['batch_stats_single_class_batches']:.3f}",
        ],
        ["statistics of one image", "ValueError"],
    ]
    table(["normalized with", "test accuracy"], rows)
    print(f"\nBatch statistics of one image: {e['single_sample_batch_stats_error']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="output folder"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps (under a minute)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, inits and batch order"
    )
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = load_data(seed=args.seed)
    # The matrices are tiny (at most 128 x 100): BLAS threads cost more than they save.
    with threadpool_limits(limits=1):
        lr_rows, curves = lr_sweep(data, budget, args.seed)
        bs_rows, bs_rows_renorm, bs_rows_plain = batch_size_sweep(
            data, budget, args.seed
        )
        modes = eval_modes(data, budget, args.seed)
    results = {
        "lr_sweep": lr_rows,
        "batch_size_sweep": bs_rows,
        "batch_size_sweep_renorm": bs_rows_renorm,
        "batch_size_sweep_no_batch_norm": bs_rows_plain,
        "eval_modes": modes,
        "config": {
            "quick": args.quick,
            "seed": args.seed,
            "hidden": list(HIDDEN),
            "activation": "sigmoid",
            "reference_batch_size": REFERENCE_BATCH,
            "momentum": MOMENTUM,
            "renorm_schedule": {
                "warmup": RENORM_WARMUP,
                "rmax": RENORM_RMAX,
                "rmax_at": RENORM_RMAX_AT,
                "dmax": RENORM_DMAX,
                "dmax_at": RENORM_DMAX_AT,
            },
            "n_train": len(data.x_train),
            "n_test": len(data.x_test),
            **{k: v for k, v in budget.__dict__.items()},
            "bnarray_version": bn.__version__,
            "BNARRAY_GENERIC": os.environ.get("BNARRAY_GENERIC"),
            "numpy_version": np.__version__,
            "python": platform.python_version(),
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
    plot_lr_sweep(curves, budget, args.out / "lr_sweep.png")
    plot_batch_sizes(
        bs_rows, bs_rows_renorm, bs_rows_plain, args.out / "batch_size_sweep.png"
    )
    plot_eval_modes(modes, args.out / "eval_modes.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(
        f"\nwrote {args.out}/results.json and 3 plots in {results['config']['seconds']} s"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
