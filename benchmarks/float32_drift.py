"""How far float32 gradients of `ReversibleAdjoint` drift from float64 ones.

The reversible adjoint reconstructs each state from the next one, so rounding error
accumulates along the backward pass. This measures the relative error (max over
parameters of |g32 - g64| / max |g64|) of the float32 gradient, against the float64
gradient of the same solve, for a neural ODE at 100, 1,000 and 10,000 steps, with
`RecursiveCheckpointAdjoint` in float32 alongside (its error is rounding in the forward
and backward passes alone, no reconstruction).

Writes `benchmarks/results/float32_drift.{json,md}`.
"""

import json
import pathlib

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import diffrax_extras as dxe


jax.config.update("jax_enable_x64", True)
RESULTS = pathlib.Path(__file__).parent / "results"


def gradient(adjoint, dtype, num_steps):
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    # Same weights in both precisions: draw in float64, then cast.
    mlp = eqx.nn.MLP(8, 8, 32, 2, activation=jnp.tanh, key=key_mlp)
    mlp = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_array(x) else x, mlp)
    y0 = jr.normal(key_y, (16, 8)).astype(dtype)
    t1 = jnp.asarray(1.0, dtype)
    params, static = eqx.partition(mlp, eqx.is_array)

    def loss(p):
        term = dfx.ODETerm(lambda t, y, m: jax.vmap(m)(y))
        sol = dfx.diffeqsolve(
            term,
            dxe.ReversibleHeun(),
            jnp.asarray(0.0, dtype),
            t1,
            t1 / num_steps,
            y0,
            args=eqx.combine(p, static),
            adjoint=adjoint,
            max_steps=num_steps,
        )
        return jnp.mean(sol.ys**2)

    return jax.jit(jax.grad(loss))(params)


def relative_error(reference, other):
    errs = []
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errs.append(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    return float(max(errs))


def main():
    rows = []
    for n in (100, 1000, 10_000):
        g64 = gradient(dxe.ReversibleAdjoint(), jnp.float64, n)
        for name, adjoint in (
            ("ReversibleAdjoint", dxe.ReversibleAdjoint()),
            ("RecursiveCheckpointAdjoint", dfx.RecursiveCheckpointAdjoint()),
        ):
            err = relative_error(g64, gradient(adjoint, jnp.float32, n))
            rows.append(dict(steps=n, adjoint=name, relative_error=err))
            print(f"N={n:6d} {name:28s} float32 vs float64: {err:.2e}", flush=True)
    lines = [
        "Relative error of float32 gradients against float64 (neural ODE, state 8, "
        "MLP width 32, batch 16, `ReversibleHeun`, t in [0, 1]).",
        "",
        "| N steps | adjoint | max relative error |",
        "| ---: | --- | ---: |",
    ] + [f"| {r['steps']} | {r['adjoint']} | {r['relative_error']:.1e} |" for r in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "float32_drift.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "float32_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
