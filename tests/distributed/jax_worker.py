"""The JAX tests' process: ``python jax_worker.py OUT`` with four CPU devices.

Sets XLA_FLAGS for four host devices before importing JAX, splits each batch of
scenarios.CASES with equal shares (and one of a row per device) over a mesh
axis with ``jax.shard_map``, runs the forward, backward and running update with
bnarray.sync.JaxAxis under ``jax.jit``, differentiates the forward with
``jax.grad``, and saves the results by device to OUT/rank{DEVICE}.npz.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # before JAX

import jax
import jax.numpy as jnp
import numpy as np
import scenarios
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnarray as bn

jax.config.update("jax_enable_x64", True)

DEVICES = len(scenarios.JAX_CASES["even_nc"].sizes)


def run(case: scenarios.Case, mesh) -> list[dict[str, np.ndarray]]:
    batch = scenarios.whole_batch(case)
    weight, bias = jnp.asarray(batch["weight"]), jnp.asarray(batch["bias"])
    channels = batch["weight"].shape
    sync = bn.sync.JaxAxis("d")
    sharded = NamedSharding(mesh, P("d"))
    x = jax.device_put(jnp.asarray(batch["x"]), sharded)
    dy = jax.device_put(jnp.asarray(batch["dy"]), sharded)

    def step(x, dy):
        y, ctx = bn.batch_norm_forward(x, weight, bias, axis=case.axis, sync=sync)
        dx, dweight, dbias = bn.batch_norm_backward(dy, ctx)
        running = bn.update_running_stats(jnp.zeros(channels), jnp.ones(channels), ctx)
        per_device = (dweight, dbias, ctx.mean, ctx.var, *running)
        count = jnp.full((1,), ctx.count)
        return y, dx, count, *(a[None] for a in per_device)

    spec = P("d")
    mapped = jax.shard_map(step, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    y, dx, count, *per_device = jax.jit(mapped)(x, dy)

    def loss(x):
        forward = jax.shard_map(
            lambda x: bn.batch_norm_forward(x, weight, bias, axis=case.axis, sync=sync)[
                0
            ],
            mesh=mesh,
            in_specs=spec,
            out_specs=spec,
        )
        return jnp.sum(forward(x) * dy)

    dx_autograd = jax.jit(jax.grad(loss))(x)
    names = ("dweight", "dbias", "mean", "var", "running_mean", "running_var")
    ranks = []
    for device in range(DEVICES):
        rows = case.share(np.arange(sum(case.sizes)), device)
        results = {
            "y": np.asarray(y)[rows],
            "dx": np.asarray(dx)[rows],
            "dx_autograd": np.asarray(dx_autograd)[rows],
            "count": np.asarray(count)[device],
        }
        results.update(
            {n: np.asarray(a)[device] for n, a in zip(names, per_device, strict=True)}
        )
        ranks.append(results)
    return ranks


def main(out: str) -> None:
    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("d",))
    by_device: list[dict] = [{} for _ in range(DEVICES)]
    for name, case in scenarios.JAX_CASES.items():
        for device, results in enumerate(run(case, mesh)):
            by_device[device][f"jax/{name}"] = results
    for device, results in enumerate(by_device):
        scenarios.save(f"{out}/rank{device}.npz", results)


if __name__ == "__main__":
    main(sys.argv[1])
