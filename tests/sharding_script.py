"""Run by `tests/test_sharding.py` in its own process (`python -m
tests.sharding_script`), with 4 CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`, which must be set before JAX
starts): a batch of neural SDE solves with `ReversibleHeun`, `BrownianInterval` and
`ReversibleAdjoint`, its loss and gradients computed unsharded and with the batch
sharded over the 4 devices. Prints one JSON line with the comparison."""

import json
import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from tests.helpers import neural_sde_ys as solve  # noqa: E402


jax.config.update("jax_enable_x64", True)


def main():
    mlp = eqx.nn.MLP(2, 2, 16, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = jr.normal(jr.PRNGKey(1), (16, 2))
    keys = jr.split(jr.PRNGKey(2), 16)

    @jax.jit
    def loss_and_grad(params, y0, keys):
        def loss(params):
            ys = jax.vmap(solve, in_axes=(None, None, 0, 0))(params, static, y0, keys)
            return jnp.mean(ys**2)

        return jax.value_and_grad(loss)(params)

    reference = loss_and_grad(params, y0, keys)

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded_y0 = jax.device_put(y0, batch)
    sharded_keys = jax.device_put(keys, batch)
    params_everywhere = jax.device_put(params, replicated)
    sharded = loss_and_grad(params_everywhere, sharded_y0, sharded_keys)

    diffs = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(a)))
        for a, b in zip(
            jax.tree.leaves(reference), jax.tree.leaves(sharded), strict=True
        )
    ]
    print(
        json.dumps(
            dict(
                devices=len(jax.devices()),
                input_devices=len(sharded_y0.sharding.device_set),
                loss=float(reference[0]),
                max_relative_difference=max(diffs),
            )
        )
    )


if __name__ == "__main__":
    main()
