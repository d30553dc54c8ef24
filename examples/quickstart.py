"""Quickstart: train a neural ODE with reversible Heun and exact, constant-memory
gradients.

Fits a neural ODE to a damped spiral, then checks the gradient of
`ReversibleAdjoint` against diffrax's `RecursiveCheckpointAdjoint` (same solver) and
compares the compiled memory of the two. Saves `quickstart_output/fit.png`.

Run: `python examples/quickstart.py` (about a minute on 2 CPU cores).
Set `DIFFRAX_EXTRAS_TINY=1` for a seconds-long smoke run.
"""

import os
import pathlib
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import diffrax_extras as dxe  # noqa: E402


jax.config.update("jax_enable_x64", True)

TINY = os.environ.get("DIFFRAX_EXTRAS_TINY") == "1"
# Plots go next to this script unless DIFFRAX_EXTRAS_OUTPUT names another folder
# (the tests use a temporary one, so the committed plots stay those of full runs).
OUTPUT = (
    pathlib.Path(os.environ.get("DIFFRAX_EXTRAS_OUTPUT", pathlib.Path(__file__).parent))
    / "quickstart_output"
)
TRAIN_STEPS = 20 if TINY else 2000
NUM_STEPS = 100  # solver steps over [0, 5]
TS = jnp.linspace(0.0, 5.0, 40)


def data():
    """A damped spiral: the solution of dy/dt = A y with a fixed A."""
    A = jnp.array([[-0.3, 1.5], [-1.5, -0.3]])
    term = dfx.ODETerm(lambda t, y, args: A @ y)
    sol = dfx.diffeqsolve(
        term,
        dfx.Tsit5(),
        0.0,
        5.0,
        0.01,
        jnp.array([2.0, 0.0]),
        saveat=dfx.SaveAt(ts=TS),
    )
    assert sol.ys is not None
    return sol.ys


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def solve(model, y0, adjoint, num_steps=NUM_STEPS):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(model),
        dxe.ReversibleHeun(),
        0.0,
        5.0,
        5.0 / num_steps,
        y0,
        saveat=dfx.SaveAt(ts=TS),
        adjoint=adjoint,
        max_steps=num_steps,
    )
    assert sol.ys is not None
    return sol.ys


def loss(model, ys, adjoint=None):
    adjoint = dxe.ReversibleAdjoint() if adjoint is None else adjoint
    return jnp.mean((solve(model, ys[0], adjoint) - ys) ** 2)


def compiled_temp_bytes(model, ys, adjoint, num_steps):
    params, static = eqx.partition(model, eqx.is_array)

    def f(p):
        m = eqx.combine(p, static)
        return jnp.mean((solve(m, ys[0], adjoint, num_steps) - ys) ** 2)

    analysis = jax.jit(jax.grad(f)).lower(params).compile().memory_analysis()
    assert analysis is not None, "this backend reports no memory analysis"
    return analysis.temp_size_in_bytes


def main():
    ys = data()
    model = Field(eqx.nn.MLP(2, 2, 32, 2, activation=jnp.tanh, key=jr.PRNGKey(0)))
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state):
        value, grads = eqx.filter_value_and_grad(loss)(model, ys)
        updates, opt_state = optim.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, value

    start = time.perf_counter()
    for step in range(TRAIN_STEPS):
        model, opt_state, value = train_step(model, opt_state)
        if step % 250 == 0 or step == TRAIN_STEPS - 1:
            print(f"step {step:4d}  loss {float(value):.5f}")
    print(f"trained in {time.perf_counter() - start:.1f} s")

    grad_rev = eqx.filter_jit(eqx.filter_grad(loss))(model, ys)
    grad_ref = eqx.filter_jit(eqx.filter_grad(loss))(
        model, ys, dfx.RecursiveCheckpointAdjoint()
    )
    leaves = zip(jax.tree.leaves(grad_ref), jax.tree.leaves(grad_rev), strict=True)
    rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in leaves)
    print(f"gradient vs RecursiveCheckpointAdjoint: max relative difference {rel:.1e}")

    n = 2000 if TINY else 10_000
    rev = compiled_temp_bytes(model, ys, dxe.ReversibleAdjoint(), n)
    ref = compiled_temp_bytes(
        model, ys, dfx.RecursiveCheckpointAdjoint(checkpoints=n), n
    )
    print(
        f"compiled temporary memory at {n} steps: "
        f"ReversibleAdjoint {rev / 1e6:.2f} MB, "
        f"store-every-step {ref / 1e6:.2f} MB ({ref / rev:.0f}x more)"
    )

    OUTPUT.mkdir(parents=True, exist_ok=True)
    fit = solve(model, ys[0], dxe.ReversibleAdjoint())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(ys[:, 0], ys[:, 1], "o", label="data")
    ax.plot(fit[:, 0], fit[:, 1], "-", label="neural ODE (ReversibleHeun)")
    ax.legend()
    ax.set_title("Neural ODE fit with ReversibleAdjoint")
    fig.savefig(OUTPUT / "fit.png", dpi=100)
    print(f"saved {OUTPUT / 'fit.png'}")


if __name__ == "__main__":
    main()
