"""Train a neural SDE as a GAN: the SDE-GAN recipe of Kidger et al. 2021.

Data: a time-dependent Ornstein–Uhlenbeck process, dy = (0.02 t - 0.1 y) dt + 0.4 dW,
y0 ~ U(-1, 1), observed at 64 times on [0, 63] (as in torchsde's SDE-GAN example),
generated here.

- Generator: a neural SDE with a 16-dimensional hidden state driven by 3-dimensional
  Brownian motion, solved with `ReversibleHeun`, `BrownianInterval` (pieces equal to
  the step, so the path costs one normal draw per step) and `ReversibleAdjoint`,
  in float64: in float32, running it backwards amplifies rounding into gradients
  up to 1% off, which `ReversibleAdjoint` refuses (see the comment at
  `jax_enable_x64`).
- Discriminator: a neural CDE over the linear interpolation of (t, y), solved with
  `ReversibleHeun`.
- Wasserstein loss. The discriminator is kept Lipschitz by LipSwish activations and
  `clip_weights` after every update (the recipe). `--gradient-penalty` replaces the
  clipping with the WGAN-GP penalty 10 E[(|grad_x D(x)| - 1)^2] at random
  interpolates of real and generated paths. The penalty needs second derivatives of
  the discriminator's solve, which only `diffrax.DirectAdjoint` gives (our
  `ReversibleAdjoint` and diffrax's `RecursiveCheckpointAdjoint` differentiate once),
  so that variant's discriminator uses it; the generator is the same in both.
  `--both` trains both variants in the same run, from the same initialisation and
  batches, and prints them side by side.

After training, prints for each variant the time per training step (compilation
excluded), a maximum mean discrepancy (MMD, Gaussian kernel on whole paths) between
generated and held-out real paths, and the test accuracy of a small classifier
trained to tell generated from real paths (50% means it cannot tell them apart);
both metrics also for the untrained generator and, for the MMD, for two independent
real sets (the noise floor). Saves `sde_gan_output/paths.png` and
`sde_gan_output/loss.png`.

Run: `python examples/sde_gan.py` (a few minutes on 2 CPU cores), `--full` for the
paper-sized configuration on a GPU. Set `DIFFRAX_EXTRAS_TINY=1` for a smoke run.
"""

import argparse
import os
import pathlib
import time
from collections.abc import Callable
from typing import NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402

import diffrax_extras as dxe  # noqa: E402


# Float64, because running this generator backwards in float32 amplifies rounding too
# much for exact gradients. `benchmarks/sde_gan_gradients.py` measures it on 64 paths
# of each of 4 initialisations (per-path gradient with respect to the generator,
# against `RecursiveCheckpointAdjoint` on the same solve): in float32 the error is
# 2e-4 at the median and up to 1.2e-2, and `ReversibleAdjoint`'s reconstruction
# check refuses 48 of the 256 paths (20 of the 64 at this example's initialisation),
# so training stops with its error in the first steps; in float64 the error is 2e-13
# at the median and at most 7e-12, and no path is refused. Float64 costs about 1.4x
# per training step on 2 CPU cores.
jax.config.update("jax_enable_x64", True)

TINY = os.environ.get("DIFFRAX_EXTRAS_TINY") == "1"
# Plots go next to this script unless DIFFRAX_EXTRAS_OUTPUT names another folder
# (the tests use a temporary one, so the committed plots stay those of full runs).
OUTPUT = (
    pathlib.Path(os.environ.get("DIFFRAX_EXTRAS_OUTPUT", pathlib.Path(__file__).parent))
    / "sde_gan_output"
)


class Config(NamedTuple):
    t_size: int  # observation times 0, 1, ..., t_size - 1; also the solver's grid
    num_data: int  # training paths
    batch: int
    steps: int
    generator_lr: float
    discriminator_lr: float
    hidden: int
    width: int
    num_eval: int  # held-out real paths, and generated paths, for the metrics
    classifier_steps: int


SMALL = Config(64, 8192, 128, 1500, 2e-4, 1e-3, 16, 16, 1024, 500)
FULL = Config(64, 8192 * 4, 1024, 10_000, 2e-5, 1e-4, 16, 16, 4096, 2000)
# The smoke run (`DIFFRAX_EXTRAS_TINY=1`, as in the tests) is tiny in its data, batch
# and steps, but keeps the solves of the real configuration (64 steps, hidden state
# 16), so that it meets the reconstruction check where training does.
SMOKE = Config(64, 64, 8, 3, 2e-4, 1e-3, 16, 16, 32, 3)
INITIAL_NOISE, NOISE = 5, 3
PENALTY = 10.0


def ou_data(key, num, t_size):
    """Sample paths of dy = (0.02 t - 0.1 y) dt + 0.4 dW (additive noise, so Itô and
    Stratonovich agree), by Heun at a tenth of the observation spacing."""
    ts = jnp.arange(t_size, dtype=jnp.float64)
    t1 = float(t_size - 1)
    terms = lambda bm: dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: 0.02 * t - 0.1 * y),
        dfx.ControlTerm(lambda t, y, args: jnp.full((1, 1), 0.4), bm),
    )

    def one(key):
        y0_key, bm_key = jr.split(key)
        y0 = jr.uniform(y0_key, (1,), minval=-1.0, maxval=1.0)
        bm = dxe.BrownianInterval(0.0, t1, 0.05, (1,), bm_key, dt=0.1)
        sol = dfx.diffeqsolve(
            terms(bm), dfx.Heun(), 0.0, t1, 0.1, y0, saveat=dfx.SaveAt(ts=ts)
        )
        return sol.ys

    ys = jax.jit(jax.vmap(one))(jr.split(key, num))
    return with_time(ts, ys)


def with_time(ts, ys):
    """Paths as the discriminator sees them: channels (t, y)."""
    ts = jnp.broadcast_to(ts[:, None], ys.shape[:-1] + (1,))
    return jnp.concatenate([ts, ys], axis=-1)


class Field(eqx.Module):
    """A vector field (t, h) -> `shape`: an MLP with LipSwish and a final tanh."""

    mlp: eqx.nn.MLP
    shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, hidden, width, shape, *, dtype=None, key):
        self.shape = shape
        self.mlp = eqx.nn.MLP(
            1 + hidden,
            int(np.prod(shape)),
            width,
            depth=1,
            activation=dxe.lipswish,
            final_activation=jnp.tanh,
            dtype=dtype,
            key=key,
        )

    def __call__(self, t, h, args):
        t = jnp.broadcast_to(jnp.asarray(t, h.dtype), (1,))
        return self.mlp(jnp.concatenate([t, h])).reshape(self.shape)


class Generator(eqx.Module):
    """The neural SDE, solved in `dtype` (by default float64 here), with `adjoint`
    (default `ReversibleAdjoint()`) for its gradient."""

    initial: eqx.nn.MLP
    drift: Field
    diffusion: Field
    readout: eqx.nn.Linear
    adjoint: dfx.AbstractAdjoint
    t_size: int = eqx.field(static=True)

    def __init__(self, config, adjoint=None, dtype=None, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        h, w = config.hidden, config.width
        self.initial = eqx.nn.MLP(
            INITIAL_NOISE, h, w, 1, dxe.lipswish, dtype=dtype, key=k1
        )
        self.drift = Field(h, w, (h,), dtype=dtype, key=k2)
        self.diffusion = Field(h, w, (h, NOISE), dtype=dtype, key=k3)
        self.readout = eqx.nn.Linear(h, 1, dtype=dtype, key=k4)
        self.adjoint = dxe.ReversibleAdjoint() if adjoint is None else adjoint
        self.t_size = config.t_size

    def problem(self, key):
        """One path's SDE: its terms (with its own Brownian path), initial state and
        observation times."""
        dtype = self.readout.weight.dtype
        init_key, bm_key = jr.split(key)
        ts = jnp.arange(self.t_size, dtype=dtype)
        h0 = self.initial(jr.normal(init_key, (INITIAL_NOISE,), dtype))
        # Pieces equal to the step: each step's increment is one normal draw.
        noise = jax.ShapeDtypeStruct((NOISE,), dtype)
        bm = dxe.BrownianInterval(ts[0], ts[-1], 0.5, noise, bm_key, dt=1.0)
        terms = dfx.MultiTerm(
            dfx.ODETerm(self.drift), dfx.ControlTerm(self.diffusion, bm)
        )
        return terms, h0, ts

    def solve(self, key, saveat):
        terms, h0, ts = self.problem(key)
        return dfx.diffeqsolve(
            terms,
            dxe.ReversibleHeun(),
            ts[0],
            ts[-1],
            1.0,
            h0,
            saveat=saveat,
            adjoint=self.adjoint,
            max_steps=self.t_size,
        )

    def __call__(self, key):
        ts = jnp.arange(self.t_size, dtype=self.readout.weight.dtype)
        ys = self.solve(key, dfx.SaveAt(ts=ts)).ys
        assert ys is not None
        return with_time(ts, jax.vmap(self.readout)(ys))


class Discriminator(eqx.Module):
    initial: eqx.nn.MLP
    field: Field
    readout: eqx.nn.Linear
    adjoint: dfx.AbstractAdjoint
    t_size: int = eqx.field(static=True)

    def __init__(self, config, adjoint, *, key):
        k1, k2, k3 = jr.split(key, 3)
        h, w = config.hidden, config.width
        self.initial = eqx.nn.MLP(2, h, w, 1, dxe.lipswish, key=k1)
        self.field = Field(h, w, (h, 2), key=k2)
        self.readout = eqx.nn.Linear(h, "scalar", key=k3)
        self.adjoint = adjoint
        self.t_size = config.t_size

    def __call__(self, path):
        # The knots are the fixed observation times, not the path's t channel, so
        # that no gradient asks for d/dt0 of the solve.
        ts = jnp.arange(self.t_size, dtype=path.dtype)
        control = dfx.LinearInterpolation(ts, path)
        sol = dfx.diffeqsolve(
            dfx.ControlTerm(self.field, control),
            dxe.ReversibleHeun(),
            ts[0],
            ts[-1],
            1.0,
            self.initial(path[0]),
            saveat=dfx.SaveAt(t1=True),
            adjoint=self.adjoint,
            max_steps=len(ts),
        )
        ys = sol.ys
        assert ys is not None
        return self.readout(ys[-1])


class Variant(NamedTuple):
    name: str
    gradient_penalty: bool


CLIP = Variant("weight clipping + LipSwish", False)
GP = Variant("gradient penalty", True)


def penalty(discriminator, real, fake, key):
    """WGAN-GP: 10 E[(|grad D(x)| - 1)^2] at random interpolates of real and fake
    paths (their y channel; t is the same in both)."""
    alpha = jr.uniform(key, (real.shape[0], 1, 1), dtype=real.dtype)
    mixed = alpha * real + (1 - alpha) * jax.lax.stop_gradient(fake)

    def score_y(y, t):
        return discriminator(jnp.concatenate([t, y], axis=-1))

    grads = jax.vmap(jax.grad(score_y))(mixed[..., 1:], mixed[..., :1])
    norms = jnp.sqrt(jnp.sum(grads**2, axis=(1, 2)) + 1e-12)
    return PENALTY * jnp.mean((norms - 1) ** 2)


def make_step(variant: Variant, g_optim, d_optim, batch: int) -> Callable:
    @eqx.filter_jit
    def step(generator, discriminator, g_state, d_state, data, key):
        batch_key, gen_key, pen_key = jr.split(key, 3)
        # Drawing the batch inside the compiled step keeps the training loop free of
        # eager per-step work.
        real = data[jr.choice(batch_key, data.shape[0], (batch,), replace=False)]
        keys = jr.split(gen_key, batch)

        # Generator and discriminator updated together from one gradient (as in
        # Kidger et al.): the generator descends the Wasserstein estimate, the
        # discriminator ascends it.
        @eqx.filter_value_and_grad(has_aux=True)
        def wasserstein(models):
            generator, discriminator = models
            fake = jax.vmap(generator)(keys)
            # One batched discriminator solve for both halves: one trace, one compile.
            scores = jax.vmap(discriminator)(jnp.concatenate([real, fake]))
            real_score, fake_score = jnp.split(scores, 2)
            return jnp.mean(real_score) - jnp.mean(fake_score), fake

        (distance, fake), (g_grad, d_grad) = wasserstein((generator, discriminator))
        d_grad = jax.tree_util.tree_map(jnp.negative, d_grad)
        if variant.gradient_penalty:
            d_grad = eqx.apply_updates(
                d_grad,
                eqx.filter_grad(penalty)(discriminator, real, fake, pen_key),
            )
        g_updates, g_state = g_optim.update(g_grad, g_state, generator)
        d_updates, d_state = d_optim.update(d_grad, d_state, discriminator)
        generator = eqx.apply_updates(generator, g_updates)
        discriminator = eqx.apply_updates(discriminator, d_updates)
        if not variant.gradient_penalty:
            discriminator = dxe.clip_weights(discriminator)
        return generator, discriminator, g_state, d_state, distance

    return step


def setup(variant, config, key):
    """The training step of `variant` and its initial (generator, discriminator,
    generator optimiser state, discriminator optimiser state)."""
    g_key, d_key = jr.split(key)
    generator = Generator(config, key=g_key)
    adjoint = (
        dfx.DirectAdjoint() if variant.gradient_penalty else dxe.ReversibleAdjoint()
    )
    discriminator = Discriminator(config, adjoint, key=d_key)
    if not variant.gradient_penalty:
        discriminator = dxe.clip_weights(discriminator)
    g_optim = optax.rmsprop(config.generator_lr)
    d_optim = optax.rmsprop(config.discriminator_lr)
    g_state = g_optim.init(eqx.filter(generator, eqx.is_inexact_array))
    d_state = d_optim.init(eqx.filter(discriminator, eqx.is_inexact_array))
    step = make_step(variant, g_optim, d_optim, config.batch)
    return step, (generator, discriminator, g_state, d_state)


def train(variant, config, data, key):
    init_key, loop_key = jr.split(key)
    step, (generator, discriminator, g_state, d_state) = setup(
        variant, config, init_key
    )
    distances, times, compile_s = [], [], float("nan")
    compile_start = time.perf_counter()
    for i, step_key in enumerate(jr.split(loop_key, config.steps)):
        start = time.perf_counter()
        generator, discriminator, g_state, d_state, distance = step(
            generator, discriminator, g_state, d_state, data, step_key
        )
        distance = float(distance)
        if i == 0:
            compile_s = time.perf_counter() - compile_start
        else:
            times.append(time.perf_counter() - start)
        distances.append(distance)
        if i % max(1, config.steps // 10) == 0:
            print(
                f"[{variant.name}] step {i:5d} Wasserstein {distance:+.4f}", flush=True
            )
    step_ms = 1e3 * float(np.median(times)) if times else float("nan")
    return generator, np.array(distances), step_ms, compile_s


@eqx.filter_jit
def sample(generator, key, num):
    return jax.vmap(generator)(jr.split(key, num))


def mmd(x, y):
    """Unbiased squared MMD between path sets, with a Gaussian kernel on the
    flattened y channel and the median pairwise distance as its bandwidth."""
    x = x[..., 1:].reshape(x.shape[0], -1)
    y = y[..., 1:].reshape(y.shape[0], -1)
    z = jnp.concatenate([x, y])
    sq = jnp.sum((z[:, None] - z[None]) ** 2, axis=-1)
    bandwidth = jnp.median(sq[jnp.triu_indices(len(z), 1)])
    k = jnp.exp(-sq / bandwidth)
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = lambda a, size: (jnp.sum(a) - jnp.trace(a)) / (size * (size - 1))
    return float(off(kxx, n) + off(kyy, m) - 2 * jnp.mean(kxy))


CLASSIFIER_OPTIM = optax.adam(1e-3)


@eqx.filter_jit
def _fit_step(model, state, x, labels, key):
    idx = jr.choice(key, x.shape[0], (min(x.shape[0], 256),), replace=False)

    @eqx.filter_grad
    def grad(model):
        logits = jax.vmap(model)(x[idx])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels[idx]))

    updates, state = CLASSIFIER_OPTIM.update(grad(model), state, model)
    return eqx.apply_updates(model, updates), state


@eqx.filter_jit
def _accuracy(model, x, labels):
    return jnp.mean((jax.vmap(model)(x) > 0) == (labels > 0.5))


def classifier_accuracy(real, fake, config, key):
    """Test accuracy of an MLP trained on half the paths to tell real from fake."""
    x = jnp.concatenate([real[..., 1:], fake[..., 1:]]).reshape(2 * len(real), -1)
    labels = jnp.concatenate([jnp.ones(len(real)), jnp.zeros(len(fake))])
    perm_key, init_key, loop_key = jr.split(key, 3)
    perm = jr.permutation(perm_key, len(x))
    x, labels = x[perm], labels[perm]
    half = len(x) // 2
    mean, std = jnp.mean(x[:half], axis=0), jnp.std(x[:half], axis=0) + 1e-6
    x = (x - mean) / std
    model = eqx.nn.MLP(x.shape[1], "scalar", 64, 2, key=init_key)
    state = CLASSIFIER_OPTIM.init(eqx.filter(model, eqx.is_inexact_array))
    for fit_key in jr.split(loop_key, config.classifier_steps):
        model, state = _fit_step(model, state, x[:half], labels[:half], fit_key)
    return float(_accuracy(model, x[half:], labels[half:]))


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gradient-penalty", action="store_true")
    parser.add_argument("--both", action="store_true")
    parser.add_argument("--full", action="store_true")
    cli = parser.parse_args()
    config = SMOKE if TINY else (FULL if cli.full else SMALL)
    if cli.both:
        variants = [CLIP, GP]
    else:
        variants = [GP] if cli.gradient_penalty else [CLIP]

    data_key, train_key, metric_key = jr.split(jr.key(5678), 3)
    paths = ou_data(data_key, config.num_data + 2 * config.num_eval, config.t_size)
    data, held_out = paths[: config.num_data], paths[config.num_data :]
    real_eval, real_floor = held_out[: config.num_eval], held_out[config.num_eval :]

    untrained = Generator(config, key=jr.split(jr.split(train_key)[0])[0])
    results: dict[str, tuple[jax.Array, tuple[float, float] | None]] = {
        "untrained generator": (sample(untrained, metric_key, config.num_eval), None)
    }
    curves = {}
    for variant in variants:
        generator, distances, step_ms, compile_s = train(
            variant, config, data, train_key
        )
        fake = sample(generator, metric_key, config.num_eval)
        results[variant.name] = (fake, (step_ms, compile_s))
        curves[variant.name] = distances

    print()
    print(
        f"{config.steps} steps, batch {config.batch}, {config.t_size} times, "
        f"metrics on {config.num_eval} held-out real and {config.num_eval} "
        f"generated paths; MMD of two real sets (noise floor): "
        f"{mmd(real_eval, real_floor):.5f}"
    )
    print(
        "| generator | ms per training step | compile s | MMD | classifier accuracy |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (fake, timing) in results.items():
        accuracy = classifier_accuracy(real_eval, fake, config, metric_key)
        ms, compile_s = (
            ("n/a", "n/a")
            if timing is None
            else (
                f"{timing[0]:.1f}",
                f"{timing[1]:.1f}",
            )
        )
        print(
            f"| {name} | {ms} | {compile_s} | {mmd(real_eval, fake):.5f} | "
            f"{100 * accuracy:.1f}% |"
        )
    gp_timing, clip_timing = (
        results.get(GP.name, (None, None))[1],
        results.get(CLIP.name, (None, None))[1],
    )
    if gp_timing is not None and clip_timing is not None:
        ratio = gp_timing[0] / clip_timing[0]
        print(f"gradient penalty / clipping, time per step: {ratio:.2f}x")

    OUTPUT.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4))
    for ax, variant in zip(np.atleast_1d(axes), variants, strict=True):
        fake = results[variant.name][0]
        for i in range(min(32, config.num_eval)):
            ax.plot(real_eval[i, :, 0], real_eval[i, :, 1], color="tab:blue", lw=0.6)
            ax.plot(fake[i, :, 0], fake[i, :, 1], color="tab:red", lw=0.6)
        ax.plot([], [], color="tab:blue", label="real")
        ax.plot([], [], color="tab:red", label="generated")
        ax.set_title(variant.name)
        ax.set_xlabel("t")
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUTPUT / "paths.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, distances in curves.items():
        ax.plot(distances, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("Wasserstein estimate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUTPUT / "loss.png", dpi=120)
    print(f"Saved {OUTPUT / 'paths.png'} and {OUTPUT / 'loss.png'}")


if __name__ == "__main__":
    main()
