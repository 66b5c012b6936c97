"""Synchronized batch norm (`sync=`) on every backend, with processes played by threads.

A `ThreadGroup` runs one thread per process; its members implement the
synchronizer protocol with a barrier, so every backend's arrays go through
the real forward, backward and running-statistics code of a group. The
engines themselves (torch.distributed, MPI, JAX shard_map) run in separate
processes in tests/distributed/ (``nox -s tests-distributed``).
"""

from __future__ import annotations

import copy
import inspect
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import reference
from cases import channel_shape
from checks import assert_close, assert_like

import bnarray as bn
from bnarray.sync import MPI, JaxAxis, Synchronizer, TorchDistributed


class ThreadGroup:
    """`size` processes played by threads that meet at a barrier."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[Any] = [None] * size
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def member(self, rank: int) -> Member:
        return Member(self, rank)

    def run(self, work) -> list[Any]:
        """`work(rank, member)` in one thread per process; the results or the
        exceptions, by rank."""

        def guarded(rank: int) -> Any:
            try:
                return work(rank, self.member(rank))
            except Exception as error:  # returned: the tests compare them
                return error

        with ThreadPoolExecutor(self.size) as pool:
            return list(pool.map(guarded, range(self.size)))


class Member:
    """One process of a `ThreadGroup`: the two collectives of the protocol."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_gather(self, a: Any) -> Any:
        from array_api_compat import array_namespace

        if self.rank == 0:
            self.group.calls.append(("all_gather", tuple(a.shape)))
        return self._gather(a, array_namespace(a))

    def all_reduce_sum(self, a: Any) -> Any:
        from array_api_compat import array_namespace

        if self.rank == 0:
            self.group.calls.append(("all_reduce_sum", tuple(a.shape)))
        xp = array_namespace(a)
        return xp.sum(self._gather(a, xp), axis=0)

    def _gather(self, a: Any, xp: Any) -> Any:
        self.group.slots[self.rank] = a
        self.group.barrier.wait()
        stacked = xp.stack(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before all have read
        return stacked


class Recorder:
    """A group of one process that records what each collective receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def all_gather(self, a: Any) -> Any:
        self.calls.append(("all_gather", a))
        return a[None, ...]

    def all_reduce_sum(self, a: Any) -> Any:
        self.calls.append(("all_reduce_sum", a))
        return a


# (shape of the whole batch without its first axis, axis): shares split axis 0.
SYNC_LAYOUTS = [((3,), -1), ((3, 2, 2), 1), ((2, 3), (1, 2))]
SPLITS = [(5, 0, 7), (4, 4, 4), (1, 1, 0), (2, 3)]


def split(a: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1])


def whole_batch(sizes, tail, axis, seed=0):
    rng = np.random.default_rng(seed)
    shape = (sum(sizes), *tail)
    cshape = channel_shape(shape, axis)
    x = rng.normal(2.0, 3.0, size=shape)
    dy = rng.normal(size=shape)
    weight = rng.normal(1.0, 0.5, size=cshape)
    bias = rng.normal(0.0, 0.5, size=cshape)
    return x, dy, weight, bias


def synced_step(backend, sizes, tail, axis, *, affine=True):
    """Every share's forward, backward and running update, by rank."""
    x, dy, weight, bias = whole_batch(sizes, tail, axis)
    cshape = weight.shape
    w = backend.asarray(weight) if affine else None
    b = backend.asarray(bias) if affine else None

    def step(rank, sync):
        xs = backend.asarray(split(x, sizes)[rank])
        y, ctx = bn.batch_norm_forward(xs, w, b, axis=axis, sync=sync)
        grads = bn.batch_norm_backward(backend.asarray(split(dy, sizes)[rank]), ctx)
        running = bn.update_running_stats(
            backend.asarray(np.zeros(cshape)), backend.asarray(np.ones(cshape)), ctx
        )
        return xs, y, ctx, grads, running

    results = ThreadGroup(len(sizes)).run(step)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return (x, dy, weight if affine else None, bias if affine else None), results


@pytest.mark.parametrize("sizes", SPLITS, ids=str)
@pytest.mark.parametrize(("tail", "axis"), SYNC_LAYOUTS, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_every_share_gets_the_whole_batch_forward_and_backward(
    backend, sizes, tail, axis, affine
):
    (x, dy, weight, bias), results = synced_step(
        backend, sizes, tail, axis, affine=affine
    )
    y_ref, mean_ref, var_ref = reference.forward(x, weight, bias, axis=axis)
    dx_ref, dw_ref, db_ref = reference.backward(dy, x, weight, axis=axis)
    y_shares, dx_shares = split(y_ref, sizes), split(dx_ref, sizes)
    for rank, (xs, y, ctx, (dx, dw, db), _) in enumerate(results):
        assert_close(backend, y, y_shares[rank], like=xs)
        assert_close(backend, dx, dx_shares[rank], like=xs)
        assert_close(backend, ctx.mean, mean_ref, like=xs)
        assert_close(backend, ctx.var, var_ref, like=xs)
        assert ctx.count == x.size // mean_ref.size
        assert_like(dw, xs)
        assert_like(db, xs)
    dw_total = sum(backend.to_numpy(grads[1]) for *_, grads, _ in results)
    db_total = sum(backend.to_numpy(grads[2]) for *_, grads, _ in results)
    np.testing.assert_allclose(dw_total, dw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db_total, db_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", SPLITS, ids=str)
def test_running_statistics_are_identical_on_every_share(backend, sizes):
    tail, axis = (3, 2, 2), 1
    (x, *_), results = synced_step(backend, sizes, tail, axis)
    mean_ref, var_ref = reference.update_running_stats(
        np.zeros(3), np.ones(3), x, axis=axis, momentum=0.1
    )
    first_mean, first_var = (backend.to_numpy(a) for a in results[0][-1])
    for xs, *_, (mean, var) in results:
        assert_close(backend, mean, mean_ref, like=xs)
        assert_close(backend, var, var_ref, like=xs)
        # Every process merges the same gathered numbers in the same order.
        np.testing.assert_array_equal(backend.to_numpy(mean), first_mean)
        np.testing.assert_array_equal(backend.to_numpy(var), first_var)


def test_empty_share_gets_empty_y_and_dx(backend):
    _, results = synced_step(backend, (5, 0, 7), (3, 2, 2), 1)
    xs, y, ctx, (dx, dw, db), _ = results[1]
    assert tuple(y.shape) == tuple(dx.shape) == (0, 3, 2, 2)
    assert_like(y, xs)
    assert_close(backend, dw, np.zeros(3), like=xs)
    assert_close(backend, db, np.zeros(3), like=xs)
    assert ctx.count == 12 * 4


def _forward_on_shares(backend, sizes, channels=2):
    x = np.random.default_rng(3).normal(size=(sum(sizes), channels))

    def forward(rank, sync):
        xs = backend.asarray(split(x, sizes)[rank])
        return bn.batch_norm_forward(xs, sync=sync)[1].count

    return ThreadGroup(len(sizes)).run(forward)


@pytest.mark.parametrize("sizes", [(1, 0, 0), (0, 1), (1,)], ids=str)
def test_batch_of_one_over_all_processes_raises_on_every_process(backend, sizes):
    for outcome in _forward_on_shares(backend, sizes):
        assert isinstance(outcome, ValueError)
        assert "got 1 value per channel over all processes of `sync`" in str(outcome)


@pytest.mark.parametrize("sizes", [(1, 1), (1, 0, 2), (1, 1, 1, 1)], ids=str)
def test_shares_of_one_train_when_the_whole_batch_has_more(backend, sizes):
    assert _forward_on_shares(backend, sizes) == [sum(sizes)] * len(sizes)


def test_single_process_batch_of_one_still_raises(backend):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.batch_norm_forward(backend.asarray(np.ones((1, 3))))


@pytest.mark.parametrize("sizes", [(0, 0), (0,)], ids=str)
def test_empty_batch_on_every_process_raises_on_every_process(backend, sizes):
    for outcome in _forward_on_shares(backend, sizes):
        assert isinstance(outcome, ValueError)
        assert "empty along the reduced axes on every process" in str(outcome)


def test_one_collective_per_training_pass_and_none_otherwise(backend):
    channels = 3
    x = backend.asarray(np.random.default_rng(0).normal(size=(6, channels)))
    recorder = Recorder()
    y, ctx = bn.batch_norm_forward(x, sync=recorder)
    [(name, packed)] = recorder.calls
    # count, mean and M2: 8 + 16 bytes per channel in float64, of x's library and device
    assert name == "all_gather"
    assert tuple(packed.shape) == (1 + 2 * channels,)
    assert_like(packed, x, dtype=backend.xp.float64)

    bn.update_running_stats(
        backend.asarray(np.zeros(channels)), backend.asarray(np.ones(channels)), ctx
    )
    assert len(recorder.calls) == 1
    bn.batch_norm_backward(y, ctx)
    name, packed = recorder.calls[1]
    assert name == "all_reduce_sum"
    assert tuple(packed.shape) == (2 * channels,)  # Σdy and Σdy·(x − μ)
    assert_like(packed, x, dtype=backend.xp.float64)
    assert len(recorder.calls) == 2

    stats = backend.asarray(np.ones(channels))
    y, ctx = bn.batch_norm_forward(
        x, training=False, running_mean=stats, running_var=stats, sync=recorder
    )
    bn.batch_norm_backward(y, ctx)
    assert len(recorder.calls) == 2


def test_float32_input_is_exchanged_and_merged_in_float64(backend):
    x = backend.asarray(np.random.default_rng(0).normal(size=(6, 2)), dtype=np.float32)
    recorder = Recorder()
    _, ctx = bn.batch_norm_forward(x, sync=recorder)
    assert_like(recorder.calls[0][1], x, dtype=backend.xp.float64)
    assert_like(ctx.mean, x)  # float32 statistics, as without sync


def test_float32_accuracy_at_mean_over_std_1e4_matches_one_process(backend):
    # Four shares of different sizes, mean/std = 1e4: the merged statistics are
    # as accurate as the two-pass statistics of the whole batch in one process.
    rng = np.random.default_rng(1)
    sizes = (40_000, 3, 25_000, 60_000)
    x32 = (1e4 + rng.normal(size=(sum(sizes), 2))).astype(np.float32)
    exact = x32.astype(np.float64)
    mean_exact, var_exact = exact.mean(axis=0), exact.var(axis=0)

    def forward(rank, sync):
        share = backend.asarray(split(x32, sizes)[rank])
        return bn.batch_norm_forward(share, sync=sync)[1]

    contexts = ThreadGroup(len(sizes)).run(forward)
    _, single = bn.batch_norm_forward(backend.asarray(x32))
    var_error = {
        name: np.abs(backend.to_numpy(ctx.var) - var_exact).max() / var_exact.max()
        for name, ctx in [("sync", contexts[0]), ("single", single)]
    }
    assert var_error["sync"] < 1e-4  # the bound of docs/numerics.rst
    assert var_error["sync"] <= max(2 * var_error["single"], 2e-6), var_error
    # The mean: within its float32 rounding (2^-24 of 1e4 is 6e-4 standard deviations).
    mean = backend.to_numpy(contexts[0].mean)
    np.testing.assert_allclose(mean, mean_exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("sync", "message"),
    [
        (3, "got int without `all_gather` and `all_reduce_sum`"),
        (TorchDistributed, "got the class TorchDistributed; pass an instance"),
        (threading.Lock(), "`sync` must be None or a synchronizer"),
    ],
    ids=["int", "class", "lock"],
)
def test_sync_that_is_not_a_synchronizer_is_a_type_error(sync, message):
    x = np.ones((4, 2))
    with pytest.raises(TypeError, match=message):
        bn.batch_norm_forward(x, sync=sync)
    with pytest.raises(TypeError, match=message):
        bn.BatchNorm(2, sync=sync)


def test_sync_with_only_one_method_names_the_other():
    class GatherOnly:
        def all_gather(self, a):
            return a[None]

    with pytest.raises(TypeError, match="without `all_reduce_sum`: "):
        bn.batch_norm_forward(np.ones((4, 2)), sync=GatherOnly())


@pytest.mark.parametrize(
    "bad_call",
    [
        lambda s: bn.batch_norm_forward(np.ones((4, 2)), np.ones(3), sync=s),
        lambda s: bn.batch_norm_forward(np.ones((4, 2), dtype=np.int64), sync=s),
        lambda s: bn.batch_norm_forward(np.ones((4, 2)), axis=2, sync=s),
        lambda s: bn.batch_norm_forward(np.ones((4, 2)), eps=-1.0, sync=s),
        lambda s: bn.BatchNorm(3, sync=s)(np.ones((4, 2))),
        lambda s: bn.BatchNorm(2, affine=False, track_running_stats=False, sync=s)(
            np.ones((4, 3))
        ),
    ],
    ids=[
        "weight_shape",
        "int_dtype",
        "axis",
        "eps",
        "layer_features",
        "layer_without_arrays",
    ],
)
def test_bad_input_raises_before_the_collective(bad_call):
    recorder = Recorder()
    with pytest.raises((TypeError, ValueError)):
        bad_call(recorder)
    assert recorder.calls == []


def test_bad_dy_raises_before_the_backward_collective():
    recorder = Recorder()
    _, ctx = bn.batch_norm_forward(np.ones((4, 2)), sync=recorder)
    for bad_dy in (np.ones((4, 3)), np.ones((4, 2), dtype=np.float32)):
        with pytest.raises((TypeError, ValueError), match="`dy` must have the"):
            bn.batch_norm_backward(bad_dy, ctx)
    assert [name for name, _ in recorder.calls] == ["all_gather"]


def test_collective_of_the_wrong_shape_is_a_runtime_error():
    class Mismatched(Recorder):
        def all_gather(self, a):
            return np.zeros((2, a.shape[0] + 2))

    with pytest.raises(
        RuntimeError, match=r"returned shape \(2, 9\), expected \('P', 7\)"
    ):
        bn.batch_norm_forward(np.ones((4, 3)), sync=Mismatched())


def _signature(method) -> list[tuple[str, Any]]:
    parameters = inspect.signature(method).parameters.values()
    return [(p.name, p.kind) for p in parameters]


@pytest.mark.parametrize(
    "engine",
    [TorchDistributed(), MPI(comm=object()), JaxAxis("batch")],
    ids=["TorchDistributed", "MPI", "JaxAxis"],
)
def test_engines_implement_the_protocol(engine):
    assert isinstance(engine, Synchronizer)
    for name in ("all_gather", "all_reduce_sum"):
        expected = _signature(getattr(Synchronizer, name))[1:]  # without self
        assert _signature(getattr(engine, name)) == expected, name
    assert type(engine).__name__ in repr(engine)


def test_engine_arguments_are_checked():
    with pytest.raises(TypeError, match="`axis_name` must be hashable"):
        JaxAxis(["batch"])
    with pytest.raises(TypeError, match="`cuda_aware` must be a bool"):
        MPI(comm=object(), cuda_aware="yes")


def test_layer_trains_on_the_whole_batch_and_evaluates_alone(backend):
    sizes, channels = (3, 0, 6), 2
    x = np.random.default_rng(5).normal(1.0, 2.0, size=(sum(sizes), channels))
    group = ThreadGroup(len(sizes))

    def train_then_eval(rank, sync):
        layer = bn.BatchNorm(
            channels, xp=backend.lib, device=backend.device, dtype=backend.xp.float64
        )
        layer.sync = sync
        xs = backend.asarray(split(x, sizes)[rank])
        y = layer(xs)
        dx = layer.backward(backend.asarray(np.ones(tuple(xs.shape))))
        calls = len(group.calls)
        layer.eval()(backend.asarray(x[:1]))  # one process alone: no collective
        return layer, y, dx, calls

    results = group.run(train_then_eval)
    single = bn.BatchNorm(channels)
    y_ref = single(x)
    for rank, outcome in enumerate(results):
        assert not isinstance(outcome, Exception), outcome
        layer, y, _, calls = outcome
        assert calls == 2
        assert_close(backend, y, split(y_ref, sizes)[rank], like=y)
        assert_close(backend, layer.running_mean, single.running_mean, like=y)
        assert_close(backend, layer.running_var, single.running_var, like=y)
        assert layer.num_batches_tracked == 1
    assert len(group.calls) == 2
    grad_bias = sum(backend.to_numpy(r[0].grad_bias) for r in results)
    np.testing.assert_allclose(grad_bias, np.full(channels, sum(sizes)))


def test_layer_copies_share_sync_and_pickles_drop_it():
    recorder = Recorder()
    layer = bn.BatchNorm(2, sync=recorder)
    assert f"sync={recorder!r}" in repr(layer)
    layer(np.random.default_rng(0).normal(size=(4, 2)))
    assert copy.deepcopy(layer).sync is recorder
    assert copy.copy(layer).sync is recorder
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.sync is None
    assert layer.sync is recorder


def test_layer_pickled_before_sync_existed_loads():
    layer = bn.BatchNorm(2)
    state = layer.__getstate__()
    del state["sync"]
    restored = bn.BatchNorm.__new__(bn.BatchNorm)
    restored.__setstate__(state)
    assert restored.sync is None
    restored(np.ones((2, 2)))


def test_context_repr_names_the_synchronizer():
    recorder = Recorder()
    _, ctx = bn.batch_norm_forward(np.ones((4, 2)), sync=recorder)
    assert ctx.sync is recorder
    assert f"sync={recorder!r}" in repr(ctx)


# ----------------------------------------------------------------- JAX, in one process


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        yield jax


@pytest.mark.parametrize(("tail", "axis"), SYNC_LAYOUTS, ids=str)
def test_jax_axis_under_vmap_jit_and_grad(jax_x64, tail, axis):
    jax, jnp = jax_x64, jax_x64.numpy
    sizes = (3, 3, 3, 3)
    x, dy, weight, bias = whole_batch(sizes, tail, axis)
    shares = jnp.asarray(x).reshape(len(sizes), 3, *tail)
    dys = jnp.asarray(dy).reshape(shares.shape)
    w, b = jnp.asarray(weight), jnp.asarray(bias)
    sync = JaxAxis("p")

    def step(xs, dys):
        y, ctx = bn.batch_norm_forward(xs, w, b, axis=axis, sync=sync)
        dx, dw, db = bn.batch_norm_backward(dys, ctx)
        rm, rv = bn.update_running_stats(
            jnp.zeros(weight.shape), jnp.ones(weight.shape), ctx
        )
        return y, dx, dw, db, rm, rv

    y, dx, dw, db, rm, rv = jax.jit(jax.vmap(step, axis_name="p"))(shares, dys)
    y_ref, _, _ = reference.forward(x, weight, bias, axis=axis)
    dx_ref, dw_ref, db_ref = reference.backward(dy, x, weight, axis=axis)
    rm_ref, rv_ref = reference.update_running_stats(
        np.zeros(weight.shape), np.ones(weight.shape), x, axis=axis
    )
    close = {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(np.asarray(y).reshape(x.shape), y_ref, **close)
    np.testing.assert_allclose(np.asarray(dx).reshape(x.shape), dx_ref, **close)
    np.testing.assert_allclose(np.asarray(dw).sum(axis=0), dw_ref, **close)
    np.testing.assert_allclose(np.asarray(db).sum(axis=0), db_ref, **close)
    for running, ref in [(rm, rm_ref), (rv, rv_ref)]:
        np.testing.assert_allclose(np.asarray(running[0]), ref, **close)
        assert bool(jnp.all(running == running[0]))

    # jax.grad differentiates through the collectives: each share's gradient of
    # the loss summed over all shares is the dx of batch_norm_backward.
    def loss(xs, probe):
        y, _ = bn.batch_norm_forward(xs, w, b, axis=axis, sync=sync)
        return jnp.sum(y * probe)

    def total_loss(all_shares):
        return jnp.sum(jax.vmap(loss, axis_name="p")(all_shares, dys))

    grad = jax.jit(jax.grad(total_loss))(shares)
    np.testing.assert_allclose(np.asarray(grad).reshape(x.shape), dx_ref, **close)


def test_jax_axis_docstring_example(jax_x64):
    jnp = jax_x64.numpy
    x = jnp.arange(8.0).reshape(4, 2, 1)

    def batch_mean(share):
        _, ctx = bn.batch_norm_forward(share, sync=JaxAxis("p"))
        return ctx.mean

    mean = jax_x64.vmap(batch_mean, axis_name="p")(x)
    assert np.asarray(mean).ravel().tolist() == [3.5, 3.5, 3.5, 3.5]


def test_jax_axis_batch_of_one_raises_while_tracing(jax_x64):
    jnp = jax_x64.numpy
    one = jnp.ones((1, 1, 2))  # one participant holding one row

    def forward(xs):
        return bn.batch_norm_forward(xs, sync=JaxAxis("p"))[0]

    with pytest.raises(ValueError, match="1 value per channel over all processes"):
        jax_x64.vmap(forward, axis_name="p")(one)
    shares_of_one = jnp.asarray([[[0.0]], [[2.0]]])  # two participants, one row each
    y = jax_x64.vmap(forward, axis_name="p")(shares_of_one)
    np.testing.assert_allclose(np.asarray(y).ravel(), [-1.0, 1.0], atol=1e-5)
