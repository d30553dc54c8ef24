"""Classify spirals with a neural CDE, a reversible solver and `ReversibleAdjoint`.

Each sample is a noisy 2-D spiral observed at 64 times on [0, 4π]; half turn clockwise,
half anticlockwise, from a random starting angle. A neural controlled differential
equation dh = f(h) dX reads the path X = (t, x, y) through its cubic Hermite
interpolation (`diffrax.backward_hermite_coefficients`, which uses only past values,
so the model could run online), solved with `diffrax_extras.ReversibleHeun` one step
per observation; a linear readout of the final h gives the probability of
"anticlockwise". Gradients come from `ReversibleAdjoint`: exact for the discretised
solve, with memory that does not grow with the path's length.

Prints the test accuracy and the relative difference between `ReversibleAdjoint`'s
gradient and `RecursiveCheckpointAdjoint`'s (same solver), and saves
`neural_cde_output/spirals.png` (test spirals coloured by the predicted class).

Run: `python examples/neural_cde.py` (under a minute on 2 CPU cores).
Set `DIFFRAX_EXTRAS_TINY=1` for a seconds-long smoke run.
"""

import math
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


TINY = os.environ.get("DIFFRAX_EXTRAS_TINY") == "1"
# Plots go next to this script unless DIFFRAX_EXTRAS_OUTPUT names another folder
# (the tests use a temporary one, so the committed plots stay those of full runs).
OUTPUT = (
    pathlib.Path(os.environ.get("DIFFRAX_EXTRAS_OUTPUT", pathlib.Path(__file__).parent))
    / "neural_cde_output"
)
NUM_TRAIN, NUM_TEST = (32, 32) if TINY else (512, 256)
LENGTH = 16 if TINY else 64
TRAIN_STEPS = 3 if TINY else 300
BATCH = 16 if TINY else 64
HIDDEN, WIDTH = 8, 32


def spirals(key, num):
    """Noisy decaying spirals x(t) = exp(-0.1 t) (cos(±t + θ), sin(±t + θ))."""
    angle_key, sign_key, noise_key = jr.split(key, 3)
    ts = jnp.linspace(0.0, 4 * math.pi, LENGTH)
    theta = jr.uniform(angle_key, (num, 1), maxval=2 * math.pi)
    labels = jr.bernoulli(sign_key, 0.5, (num,))
    sign = jnp.where(labels, 1.0, -1.0)[:, None]
    radius = jnp.exp(-0.1 * ts)
    xy = jnp.stack(
        [radius * jnp.cos(sign * ts + theta), radius * jnp.sin(sign * ts + theta)], -1
    )
    xy = xy + 0.05 * jr.normal(noise_key, xy.shape)
    path = jnp.concatenate([jnp.broadcast_to(ts[:, None], (num, LENGTH, 1)), xy], -1)
    coeffs = jax.vmap(dfx.backward_hermite_coefficients, in_axes=(None, 0))(ts, path)
    return ts, path, coeffs, labels.astype(jnp.float32)


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, h, args):
        return self.mlp(h).reshape(HIDDEN, 3)


class NeuralCDE(eqx.Module):
    initial: eqx.nn.Linear
    field: Field
    readout: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.initial = eqx.nn.Linear(3, HIDDEN, key=k1)
        self.field = Field(
            eqx.nn.MLP(HIDDEN, 3 * HIDDEN, WIDTH, 2, jax.nn.softplus, jnp.tanh, key=k2)
        )
        self.readout = eqx.nn.Linear(HIDDEN, "scalar", key=k3)

    def __call__(self, ts, coeffs, adjoint):
        control = dfx.CubicInterpolation(ts, coeffs)
        sol = dfx.diffeqsolve(
            dfx.ControlTerm(self.field, control),
            dxe.ReversibleHeun(),
            ts[0],
            ts[-1],
            None,
            self.initial(control.evaluate(ts[0])),
            stepsize_controller=dfx.StepTo(ts=ts),
            adjoint=adjoint,
            max_steps=len(ts),
        )
        ys = sol.ys
        assert ys is not None
        return self.readout(ys[-1])


def loss(model, ts, coeffs, labels, adjoint):
    logits = jax.vmap(model, in_axes=(None, 0, None))(ts, coeffs, adjoint)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels)), logits


def main():
    train_key, test_key, model_key, loop_key = jr.split(jr.key(0), 4)
    ts, _, train_coeffs, train_labels = spirals(train_key, NUM_TRAIN)
    _, test_path, test_coeffs, test_labels = spirals(test_key, NUM_TEST)
    model = NeuralCDE(key=model_key)
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, key):
        idx = jr.choice(key, NUM_TRAIN, (BATCH,), replace=False)
        (value, _), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            model,
            ts,
            jax.tree_util.tree_map(lambda c: c[idx], train_coeffs),
            train_labels[idx],
            dxe.ReversibleAdjoint(),
        )
        updates, opt_state = optim.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, value

    start = time.perf_counter()
    for i, key in enumerate(jr.split(loop_key, TRAIN_STEPS)):
        model, opt_state, value = step(model, opt_state, key)
        if i % max(1, TRAIN_STEPS // 6) == 0:
            print(f"step {i:4d} loss {float(value):.4f}", flush=True)
    print(f"trained {TRAIN_STEPS} steps in {time.perf_counter() - start:.1f} s")

    @eqx.filter_jit
    def gradient(model, adjoint):
        grad_fn = eqx.filter_grad(loss, has_aux=True)
        return grad_fn(model, ts, test_coeffs, test_labels, adjoint)

    exact, logits = gradient(model, dxe.ReversibleAdjoint())
    reference, _ = gradient(model, dfx.RecursiveCheckpointAdjoint())
    predicted = logits > 0
    accuracy = float(jnp.mean(predicted == (test_labels > 0.5)))
    print(f"test accuracy: {100 * accuracy:.1f}% on {NUM_TEST} spirals")
    leaves = lambda g: jnp.concatenate(
        [x.ravel() for x in jax.tree_util.tree_leaves(g)]
    )
    difference = jnp.linalg.norm(leaves(exact) - leaves(reference)) / jnp.linalg.norm(
        leaves(reference)
    )
    print(
        "gradient vs RecursiveCheckpointAdjoint (same solver, float32): relative "
        f"difference {float(difference):.1e}"
    )

    OUTPUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i in range(min(24, NUM_TEST)):
        colour = "tab:orange" if bool(predicted[i]) else "tab:blue"
        ax.plot(test_path[i, :, 1], test_path[i, :, 2], color=colour, lw=0.8)
    ax.plot([], [], color="tab:orange", label="predicted anticlockwise")
    ax.plot([], [], color="tab:blue", label="predicted clockwise")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    ax.set_title(f"neural CDE, test accuracy {100 * accuracy:.0f}%")
    fig.tight_layout()
    fig.savefig(OUTPUT / "spirals.png", dpi=120)
    print(f"Saved {OUTPUT / 'spirals.png'}")


if __name__ == "__main__":
    main()
