"""Train a neural SDE as an ODE driven by smooth noise, sample it as an SDE.

The Ornstein–Uhlenbeck experiment of Norcliffe & Deisenroth (TMLR 2023): data from
dy = (0.2 t - 0.1 y) dt + (0.6 + 0.15 t) o dW on [0, 10], y0 ~ U(-3, 3). A neural SDE
(drift and diffusion are small MLPs of (t, y)) is fitted to the data's marginals
at 21 times, by matching the per-time Gaussian KL divergence, in two ways:

1. Wong–Zakai: the SDE's Brownian motion replaced by a 16-mode Karhunen–Loève path,
   solved as an ODE with Tsit5, adaptive steps and `GaussLegendreAdjoint`; then the
   same drift and diffusion sampled as a Stratonovich SDE (Heun, `BrownianInterval`).
2. Directly as an SDE: `ReversibleHeun`, `BrownianInterval`, `ReversibleAdjoint`.

Prints the training time and the final per-time KL (and the mean and standard deviation
at t = 10) of samples from each, and saves `wong_zakai_ou_output/paths.png`.

Run: `python examples/wong_zakai_ou.py` (a few minutes on 2 CPU cores).
Set `DIFFRAX_EXTRAS_TINY=1` for a seconds-long smoke run.
"""

import functools as ft
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
    / "wong_zakai_ou_output"
)
T1 = 10.0
TS = jnp.linspace(0.0, T1, 21)
DT = 0.1
NUM_DATA = 64 if TINY else 2048
BATCH = 16 if TINY else 256
TRAIN_STEPS = 3 if TINY else 300
N_MODES = 4 if TINY else 16


def _brownian(key):
    return dxe.BrownianInterval(0.0, T1, DT / 4, (1,), key, dt=DT)


def _y0(key):
    return jr.uniform(key, (1,), minval=-3.0, maxval=3.0)


def data(key):
    """Sample paths of the true Ornstein–Uhlenbeck SDE, by Heun at dt = 0.01."""

    def one(k):
        k_y0, k_bm = jr.split(k)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: 0.2 * t - 0.1 * y),
            dfx.ControlTerm(
                lambda t, y, args: (0.6 + 0.15 * t) * jnp.ones((1, 1)),
                dxe.BrownianInterval(0.0, T1, 0.005, (1,), k_bm, dt=0.01),
            ),
        )
        sol = dfx.diffeqsolve(
            terms, dfx.Heun(), 0.0, T1, 0.01, _y0(k_y0), saveat=dfx.SaveAt(ts=TS)
        )
        assert sol.ys is not None
        return sol.ys[:, 0]

    return jax.jit(jax.vmap(one))(jr.split(key, NUM_DATA))


class Drift(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(jnp.concatenate([jnp.reshape(t / T1, (1,)), y]))


class Diffusion(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        out = self.mlp(jnp.concatenate([jnp.reshape(t / T1, (1,)), y]))
        return jax.nn.softplus(out).reshape(1, 1)


class Model(eqx.Module):
    drift: Drift
    diffusion: Diffusion

    def __init__(self, key):
        k1, k2 = jr.split(key)
        mlp = ft.partial(eqx.nn.MLP, 2, 1, 32, 2, activation=jnp.tanh)
        self.drift = Drift(mlp(key=k1))
        self.diffusion = Diffusion(mlp(key=k2))

    def wong_zakai(self, bm) -> dxe.WongZakai:
        terms = dfx.MultiTerm(
            dfx.ODETerm(self.drift), dfx.ControlTerm(self.diffusion, bm)
        )
        return dxe.WongZakai(terms)


def train_ode_paths(model, key):
    """Paths of the model driven by smooth noise: an ODE solve per sample."""

    def one(k):
        k_y0, k_path = jr.split(k)
        path = dxe.KarhunenLoevePath(0.0, T1, (1,), k_path, N_MODES)
        terms = model.wong_zakai(_brownian(k_path)).ode_terms(path)
        sol = dfx.diffeqsolve(
            terms,
            dfx.Tsit5(),
            0.0,
            T1,
            None,
            _y0(k_y0),
            saveat=dfx.SaveAt(ts=TS),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-4),
            adjoint=dxe.GaussLegendreAdjoint(),
        )
        assert sol.ys is not None
        return sol.ys[:, 0]

    return jax.vmap(one)(jr.split(key, BATCH))


def sde_paths(model, key, num, solver=None, adjoint=None):
    """Paths of the model as a Stratonovich SDE, with a Brownian interval: Heun and
    diffrax's default adjoint unless told otherwise."""
    solver = dfx.Heun() if solver is None else solver

    def one(k):
        k_y0, k_bm = jr.split(k)
        bm = _brownian(k_bm)
        sol = dfx.diffeqsolve(
            model.wong_zakai(bm).sde_terms(bm, solver),
            solver,
            0.0,
            T1,
            DT,
            _y0(k_y0),
            saveat=dfx.SaveAt(ts=TS),
            adjoint=dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        )
        assert sol.ys is not None
        return sol.ys[:, 0]

    return jax.vmap(one)(jr.split(key, num))


def gaussian_kl(data_paths, model_paths):
    """Mean over times of KL(N(data moments) || N(model moments))."""
    m_d, v_d = jnp.mean(data_paths, 0), jnp.var(data_paths, 0) + 1e-6
    m, v = jnp.mean(model_paths, 0), jnp.var(model_paths, 0) + 1e-6
    return jnp.mean(0.5 * (jnp.log(v / v_d) + (v_d + (m_d - m) ** 2) / v - 1))


def train(paths_fn, data_paths, key, label):
    model = Model(jr.key(0))
    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, k):
        loss, grads = eqx.filter_value_and_grad(
            lambda m: gaussian_kl(data_paths, paths_fn(m, k))
        )(model)
        updates, opt_state = optim.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, loss

    keys = jr.split(key, TRAIN_STEPS + 1)
    model, opt_state, _ = step(model, opt_state, keys[0])  # compile
    start = time.perf_counter()
    for i, k in enumerate(keys[1:]):
        model, opt_state, loss = step(model, opt_state, k)
        if i % 50 == 0 or i == TRAIN_STEPS - 1:
            print(f"[{label}] step {i:4d} loss {float(loss):.4f}", flush=True)
    seconds = time.perf_counter() - start
    return model, seconds


def main():
    OUTPUT.mkdir(parents=True, exist_ok=True)
    k_data, k_ode, k_sde, k_eval = jr.split(jr.key(2023), 4)
    data_paths = data(k_data)

    ode_model, ode_seconds = train(train_ode_paths, data_paths, k_ode, "as ODE")

    def sde_train_paths(model, key):
        return sde_paths(
            model, key, BATCH, dxe.ReversibleHeun(), dxe.ReversibleAdjoint()
        )

    sde_model, sde_seconds = train(sde_train_paths, data_paths, k_sde, "as SDE")

    sample = eqx.filter_jit(lambda m, k: sde_paths(m, k, NUM_DATA))
    rows = []
    samples = {}
    for label, model, seconds in (
        ("trained as ODE (Wong-Zakai, GaussLegendreAdjoint)", ode_model, ode_seconds),
        ("trained as SDE (ReversibleHeun, ReversibleAdjoint)", sde_model, sde_seconds),
    ):
        paths = sample(model, k_eval)
        samples[label] = paths
        kl = float(gaussian_kl(data_paths, paths))
        rows.append(
            f"| {label} | {seconds:.1f} | {seconds / TRAIN_STEPS * 1e3:.0f} | "
            f"{kl:.4f} | {float(paths[:, -1].mean()):.2f} | "
            f"{float(paths[:, -1].std()):.2f} |"
        )
    print()
    print(
        f"Data at t = 10: mean {float(data_paths[:, -1].mean()):.2f}, "
        f"std {float(data_paths[:, -1].std()):.2f}. Samples: Heun SDE solves."
    )
    print(
        "| model | training (s) | ms per step | per-time Gaussian KL | mean(10) "
        "| std(10) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    panels = [("data", data_paths)] + list(samples.items())
    for ax, (label, paths) in zip(axes, panels, strict=True):
        for p in paths[:40]:
            ax.plot(TS, p, lw=0.7, alpha=0.6)
        ax.set_title(label.split(" (")[0], fontsize=10)
        ax.set_xlabel("t")
    fig.tight_layout()
    fig.savefig(OUTPUT / "paths.png", dpi=110)
    print(f"Saved {OUTPUT / 'paths.png'}")


if __name__ == "__main__":
    main()
