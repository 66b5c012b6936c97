"""PyTorch as the oracle: F.batch_norm, its running buffers, autograd and nn.BatchNorm2d."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from checks import assert_like

import bnarray as bn

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(16, 3), (6, 4, 7), (5, 3, 4, 6), (3, 2, 3, 4, 2)]
DTYPES = {"float64": (torch.float64, 1e-12), "float32": (torch.float32, 2e-5)}


def make(shape, *, seed=0, dtype=torch.float64):
    """x, weight, bias, running_mean, running_var for channels on axis 1."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    arrays = [
        rng.normal(2.0, 3.0, size=shape),
        rng.normal(1.0, 0.5, size=c),
        rng.normal(0.0, 0.5, size=c),
        rng.normal(0.0, 1.0, size=c),
        rng.uniform(0.5, 2.0, size=c),
    ]
    return [torch.tensor(a, dtype=dtype) for a in arrays]


def assert_torch_close(actual, expected, *, tol):
    assert isinstance(actual, torch.Tensor)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.device == expected.device
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("training", [True, False])
def test_forward_equals_torch_batch_norm(shape, dtype, training):
    torch_dtype, tol = DTYPES[dtype]
    x, w, b, rm, rv = make(shape, dtype=torch_dtype)
    expected = F.batch_norm(
        x, rm.clone(), rv.clone(), w, b, training=training, eps=1e-3
    )
    kwargs = {} if training else {"running_mean": rm, "running_var": rv}
    y, ctx = bn.batch_norm_forward(
        x, w, b, axis=1, eps=1e-3, training=training, **kwargs
    )
    assert_like(y, x)
    assert_torch_close(y, expected, tol=tol)
    if training:
        reduce = tuple(a for a in range(x.ndim) if a != 1)
        assert_torch_close(ctx.mean, x.mean(dim=reduce), tol=tol)
        assert_torch_close(ctx.var, x.var(dim=reduce, unbiased=False), tol=tol)


def test_forward_without_affine_equals_torch():
    x, *_ = make((8, 5, 3, 3))
    y, _ = bn.batch_norm_forward(x, axis=1)
    assert_torch_close(y, F.batch_norm(x, None, None, training=True), tol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_stats_equal_torch_buffers_over_batches(momentum):
    module = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    running_mean = torch.zeros(3, dtype=torch.float64)
    running_var = torch.ones(3, dtype=torch.float64)
    for step in range(1, 6):
        x, *_ = make((4 + step, 3, 5, 2), seed=step)
        module(x)
        _, ctx = bn.batch_norm_forward(x, axis=1)
        running_mean, running_var = bn.update_running_stats(
            running_mean, running_var, ctx, momentum=momentum, num_batches_tracked=step
        )
        assert_torch_close(running_mean, module.running_mean, tol=1e-12)
        assert_torch_close(running_var, module.running_var, tol=1e-12)
    assert int(module.num_batches_tracked) == step


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_equal_functional_torch_in_float32(momentum):
    rm_torch = torch.zeros(4)
    rv_torch = torch.ones(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    for step in range(1, 4):
        x, *_ = make((6, 4, 3), seed=10 + step, dtype=torch.float32)
        factor = 1.0 / step if momentum is None else momentum
        F.batch_norm(x, rm_torch, rv_torch, training=True, momentum=factor)
        _, ctx = bn.batch_norm_forward(x, axis=1)
        rm, rv = bn.update_running_stats(
            rm, rv, ctx, momentum=momentum, num_batches_tracked=step
        )
    assert_torch_close(rm, rm_torch, tol=1e-6)
    assert_torch_close(rv, rv_torch, tol=1e-6)


def torch_grads(x, w, b, dy, *, training, rm, rv):
    x, w, b = (a.detach().clone().requires_grad_(True) for a in (x, w, b))
    y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    y.backward(dy)
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("training", [True, False])
def test_backward_equals_torch_autograd(shape, dtype, training):
    torch_dtype, tol = DTYPES[dtype]
    x, w, b, rm, rv = make(shape, dtype=torch_dtype, seed=1)
    dy = torch.tensor(np.random.default_rng(2).normal(size=shape), dtype=torch_dtype)
    expected = torch_grads(x, w, b, dy, training=training, rm=rm, rv=rv)
    kwargs = {} if training else {"running_mean": rm, "running_var": rv}
    _, ctx = bn.batch_norm_forward(x, w, b, axis=1, training=training, **kwargs)
    grads = bn.batch_norm_backward(dy, ctx)
    for got, want, like in zip(grads, expected, (x, w, b), strict=True):
        assert_like(got, like)
        assert_torch_close(got, want, tol=10 * tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_autograd_through_bnarray_equals_explicit_backward(shape, training):
    x, w, b, rm, rv = make(shape, seed=3)
    dy = torch.tensor(np.random.default_rng(4).normal(size=shape))
    leaves = [a.clone().requires_grad_(True) for a in (x, w, b)]
    kwargs = {} if training else {"running_mean": rm, "running_var": rv}
    y, ctx = bn.batch_norm_forward(*leaves, axis=1, training=training, **kwargs)
    assert y.requires_grad
    autograd = torch.autograd.grad(y, leaves, dy)
    explicit = bn.batch_norm_backward(dy, ctx)
    for got, want in zip(explicit, autograd, strict=True):
        assert_torch_close(got.detach(), want, tol=1e-10)


def test_autograd_flows_into_running_stats():
    # update_running_stats is differentiable too (torch itself detaches its buffers).
    x, *_ = make((6, 3, 4), seed=5)
    x.requires_grad_(True)
    _, ctx = bn.batch_norm_forward(x, axis=1)
    new_mean, _ = bn.update_running_stats(
        torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), ctx
    )
    (gx,) = torch.autograd.grad(new_mean.sum(), [x])
    torch.testing.assert_close(gx, torch.full_like(x, 0.1 / 24))


def trained_torch_module(seed=0):
    module = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(rng.normal(1.0, 0.5, size=4)))
        module.bias.copy_(torch.tensor(rng.normal(0.0, 0.5, size=4)))
    for step in range(3):
        module(torch.tensor(rng.normal(step, 2.0, size=(8, 4, 3, 3))))
    return module.eval()


@pytest.mark.parametrize("library", ["torch", "numpy"])
def test_batchnorm2d_state_dict_gives_the_same_eval_outputs(library):
    module = trained_torch_module()
    xp = torch if library == "torch" else np
    layer = bn.BatchNorm(4, axis=1, xp=xp, dtype=xp.float64)
    layer.load_state_dict(module.state_dict())
    assert layer.num_batches_tracked == 3
    layer.eval()
    x = torch.tensor(np.random.default_rng(9).normal(1.0, 3.0, size=(5, 4, 2, 3)))
    with torch.no_grad():
        expected = module(x)
    y = layer(x if library == "torch" else x.numpy())
    if library == "numpy":
        assert isinstance(y, np.ndarray)
        y = torch.tensor(y)
    assert_torch_close(y, expected, tol=1e-12)


def test_state_dict_round_trips_into_batchnorm2d():
    layer = bn.BatchNorm(3, axis=1, xp=torch, dtype=torch.float64)
    for step in range(2):
        layer(make((4, 3, 2, 2), seed=20 + step)[0])
    module = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    module.load_state_dict(layer.state_dict())
    module.eval()
    layer.eval()
    x = make((2, 3, 2, 2), seed=30)[0]
    with torch.no_grad():
        assert_torch_close(layer(x), module(x), tol=1e-12)


def test_layer_trains_like_batchnorm2d():
    module = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    layer = bn.BatchNorm(3, axis=1, xp=torch, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64
    for step in range(4):
        x = make((5, 3, 4, 4), seed=40 + step)[0]
        dy = torch.tensor(np.random.default_rng(step).normal(size=x.shape))
        xg = x.clone().requires_grad_(True)
        module.zero_grad()
        module(xg).backward(dy)
        y = layer(x)
        dx = layer.backward(dy)
        assert_torch_close(dx, xg.grad, tol=1e-10)
        assert_torch_close(layer.grad_weight, module.weight.grad, tol=1e-10)
        assert_torch_close(layer.grad_bias, module.bias.grad, tol=1e-10)
        assert_torch_close(layer.running_mean, module.running_mean, tol=1e-12)
        assert_torch_close(layer.running_var, module.running_var, tol=1e-12)
        assert y.shape == x.shape
    assert layer.num_batches_tracked == int(module.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_keep_their_dtype_and_match_torch(dtype):
    x, w, b, _, _ = make((64, 3, 4), seed=6, dtype=torch.float32)
    x16 = x.to(dtype)
    y, ctx = bn.batch_norm_forward(x16, w, b, axis=1)
    assert y.dtype == dtype
    assert ctx.mean.dtype == torch.float32
    expected = F.batch_norm(x16.float(), None, None, w, b, training=True)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_channels_last_input_is_normalized_like_torch():
    x, w, b, _, _ = make((4, 3, 5, 5), seed=7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y, _ = bn.batch_norm_forward(x_cl, w, b, axis=1)
    assert_torch_close(y, F.batch_norm(x, None, None, w, b, training=True), tol=1e-12)


def test_nhwc_axis_minus_one_equals_torch_on_permuted_input():
    x, w, b, _, _ = make((4, 3, 5, 6), seed=8)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    y, _ = bn.batch_norm_forward(nhwc, w, b)
    expected = F.batch_norm(x, None, None, w, b, training=True).permute(0, 2, 3, 1)
    assert_torch_close(y, expected, tol=1e-12)


def test_mixing_numpy_and_torch_is_a_type_error():
    x, w, _, rm, rv = make((6, 3))
    with pytest.raises(
        TypeError, match=r"`weight` is a numpy array but `x` is a torch array"
    ):
        bn.batch_norm_forward(x, w.numpy(), axis=1)
    with pytest.raises(
        TypeError, match=r"`weight` is a torch array but `x` is a numpy array"
    ):
        bn.batch_norm_forward(x.numpy(), w, axis=1)
    with pytest.raises(TypeError, match="`running_var`"):
        bn.batch_norm_forward(
            x, training=False, running_mean=rm, running_var=rv.numpy(), axis=1
        )
    _, ctx = bn.batch_norm_forward(x, axis=1)
    with pytest.raises(TypeError, match="`dy`"):
        bn.batch_norm_backward(np.ones((6, 3)), ctx)
    with pytest.raises(TypeError, match="`running_mean`"):
        bn.update_running_stats(rm.numpy(), rv.numpy(), ctx)


def test_meta_device_tensors_are_a_device_error():
    # torch's "meta" device holds no data: the only second device on a CPU-only machine.
    x, w, *_ = make((6, 3))
    with pytest.raises(ValueError, match="device"):
        bn.batch_norm_forward(x, w.to("meta"), axis=1)


def train_both(layer, module, *, steps, shape, seed, to_layer):
    """Train the bnarray layer and the torch module on the same batches."""
    for step in range(steps):
        x = make(shape, seed=seed + step)[0]
        layer(to_layer(x))
        with torch.no_grad():
            module(x)


@pytest.mark.parametrize(
    ("module_type", "shape"),
    [
        (torch.nn.BatchNorm1d, (6, 3)),
        (torch.nn.BatchNorm1d, (5, 3, 4)),
        (torch.nn.BatchNorm2d, (4, 3, 2, 5)),
    ],
)
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_state_dict_xp_torch_loads_into_torch_modules(module_type, shape, library):
    xp = torch if library == "torch" else np

    def to_layer(t):
        return t if library == "torch" else t.numpy()

    def to_torch(a):
        return a if library == "torch" else torch.from_numpy(np.asarray(a))

    layer = bn.BatchNorm(3, axis=1, xp=xp, dtype=xp.float64, momentum=0.3)
    rng = np.random.default_rng(0)
    layer.load_state_dict(
        {"weight": rng.normal(1.0, 0.5, 3), "bias": rng.normal(0.0, 0.5, 3)},
        strict=False,
    )
    for step in range(3):
        layer(to_layer(make(shape, seed=50 + step)[0]))
    state = layer.state_dict(xp=torch)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["num_batches_tracked"].dtype == torch.int64
    assert state["num_batches_tracked"].shape == ()
    module = module_type(3, momentum=0.3, dtype=torch.float64)
    module.load_state_dict(state)
    assert int(module.num_batches_tracked) == 3

    x = make(shape, seed=60)[0]
    for train in (False, True):
        layer.train(train)
        module.train(train)
        y = to_torch(layer(to_layer(x)))
        with torch.no_grad():
            expected = module(x)
        assert_torch_close(y, expected, tol=1e-12)
        assert_torch_close(to_torch(layer.running_mean), module.running_mean, tol=1e-12)
        assert_torch_close(to_torch(layer.running_var), module.running_var, tol=1e-12)
    assert layer.num_batches_tracked == int(module.num_batches_tracked) == 4


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_torch_module_state_loads_into_the_layer_and_trains_alike(library):
    xp = torch if library == "torch" else np
    module = trained_torch_module(seed=3).train()
    layer = bn.BatchNorm(4, axis=1, xp=xp, dtype=xp.float64)
    layer.load_state_dict(module.state_dict())
    assert layer.num_batches_tracked == 3

    def to_layer(t):
        return t if library == "torch" else t.numpy()

    train_both(layer, module, steps=2, shape=(6, 4, 2, 3), seed=70, to_layer=to_layer)
    back = layer.state_dict(xp=torch)
    for key, value in module.state_dict().items():
        assert_torch_close(back[key].to(value.dtype), value, tol=1e-12)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_load_state_dict_takes_parameters_that_require_grad(library):
    module = trained_torch_module(seed=4)
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    assert state["weight"].requires_grad
    xp = torch if library == "torch" else np
    layer = bn.BatchNorm(4, axis=1, xp=xp, dtype=xp.float64)
    layer.load_state_dict(state)
    weight = layer.weight
    if library == "torch":
        assert not weight.requires_grad
        weight = weight.numpy()
    np.testing.assert_array_equal(weight, module.weight.detach().numpy())
    assert layer.num_batches_tracked == 3
    with torch.no_grad():
        module.weight.mul_(2.0)  # the layer holds a copy
    np.testing.assert_array_equal(
        np.asarray(layer.weight), module.weight.detach().numpy() / 2.0
    )


def test_load_state_dict_refuses_a_float_count_tensor_and_a_complex_weight():
    layer = bn.BatchNorm(3, axis=1, xp=torch, dtype=torch.float64)
    state = layer.state_dict()
    with pytest.raises(TypeError, match=r"`state_dict\['num_batches_tracked'\]`"):
        layer.load_state_dict({**state, "num_batches_tracked": torch.tensor(2.0)})
    with pytest.raises(TypeError, match=r"`state_dict\['weight'\]` must hold real"):
        layer.load_state_dict({**state, "weight": torch.ones(3, dtype=torch.complex64)})
    assert layer.num_batches_tracked == 0
    torch.testing.assert_close(layer.weight, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("backend_name", ["eager", "aot_eager"])
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_of_forward_and_backward_equals_eager(backend_name):
    # Dynamo splits the function into several graphs (bnarray's Python-level
    # checks run between them), so `fullgraph=True` is not supported.
    x, w, b, _, _ = make((8, 3, 4, 4), seed=80)
    dy = torch.tensor(np.random.default_rng(81).normal(size=x.shape))

    def step(x, w, b, dy):
        y, ctx = bn.batch_norm_forward(x, w, b, axis=1)
        return (y, *bn.batch_norm_backward(dy, ctx))

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend_name)
    for got, want in zip(compiled(x, w, b, dy), step(x, w, b, dy), strict=True):
        assert_torch_close(got, want, tol=1e-12)


def test_load_state_dict_refuses_a_tensor_without_data():
    layer = bn.BatchNorm(3, axis=1)
    with pytest.raises(
        TypeError, match=r"`state_dict\['bias'\]` could not be read.*meta"
    ):
        layer.load_state_dict(
            {"weight": np.full(3, 2.0), "bias": torch.ones(3, device="meta")},
            strict=False,
        )
    np.testing.assert_array_equal(layer.weight, np.ones(3))


def test_layer_running_stats_carry_no_autograd_graph_between_steps():
    """Inputs that require grad (the output of an earlier layer) leave the layer's
    running statistics without a graph, as PyTorch's buffers are: a graph kept
    from step to step would grow without end, and copies of the layer fail."""
    layer = bn.BatchNorm(3, axis=1, xp=torch, dtype=torch.float64)
    for step in range(3):
        x = make((5, 3, 4, 4), seed=50 + step)[0].requires_grad_(True)
        y = layer(x * 2.0)
        y.sum().backward()  # autograd through the forward still works
        assert x.grad is not None
    assert not layer.running_mean.requires_grad
    assert not layer.running_var.requires_grad
    assert layer.running_mean.grad_fn is None
    copy.deepcopy(layer)
