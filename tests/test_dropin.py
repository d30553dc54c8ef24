"""diffrax's own examples, shrunk, with our reversible solvers swapped in.

Each problem follows one of diffrax's documentation examples (neural ODE, latent ODE,
neural CDE over linear and cubic interpolation, an SDE with `SPaRK` and space-time
Lévy area, a continuous normalising flow solved backwards in time), batched with
`jax.vmap` so that the members take different numbers of steps, with only the solver
constructor changed. For each pairing of an example and a solver (`CASES`): the
loss is finite, the gradient of `ReversibleAdjoint` equals that of
`RecursiveCheckpointAdjoint` with the same solver (float64, 1e-10), and a few steps
of gradient descent lower the loss.
"""

import functools as ft
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.nn as jnn
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import diffrax_extras as dxe

from .helpers import backprop, EXACT, max_relative_error


F64 = jnp.float64
MAX_STEPS = 4096
SOLVERS: dict[str, Callable[[], dfx.AbstractSolver]] = {
    "ReversibleHeun": dxe.ReversibleHeun,
    "Reversible(Tsit5)": lambda: dxe.Reversible(dfx.Tsit5()),
    "AsynchronousLeapfrog": dxe.AsynchronousLeapfrog,
    "Reversible(SPaRK)": lambda: dxe.Reversible(dfx.SPaRK()),
}


def _mlp(n_in, n_out, key, final=lambda x: x):
    return eqx.nn.MLP(
        n_in,
        n_out,
        16,
        1,
        activation=jnn.softplus,
        final_activation=final,
        key=key,
        dtype=F64,
    )


class _Func(eqx.Module):
    """The vector field of diffrax's neural and latent ODE examples."""

    scale: jax.Array
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.scale * self.mlp(y)


def neural_ode(solver, adjoint):
    """diffrax's neural ODE example: a batch of initial values, `SaveAt(ts=...)`,
    adaptive steps (each member takes its own number)."""
    key = jr.PRNGKey(0)
    params = _Func(jnp.ones((), F64), _mlp(2, 2, key, jnn.tanh))
    y0s = jr.normal(jr.PRNGKey(1), (3, 2), F64) * jnp.array([[0.5], [1.5], [3.0]])
    ts = jnp.linspace(0.0, 2.0, 6, dtype=F64)
    targets = jnp.stack([jnp.cos(ts), jnp.sin(ts)], axis=-1)

    def loss(func):
        def solve(y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(func),
                solver,
                ts[0],
                ts[-1],
                0.1,
                y0,
                saveat=dfx.SaveAt(ts=ts),
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
                adjoint=adjoint,
                max_steps=MAX_STEPS,
            )
            assert sol.ys is not None
            return sol.ys

        return jnp.mean((jax.vmap(solve)(y0s) - targets[None]) ** 2)

    return loss, params


class _LatentODE(eqx.Module):
    func: _Func
    hidden_to_data: eqx.nn.Linear


def latent_ode(solver, adjoint):
    """The decoder of diffrax's latent ODE example: per-sample times (different
    spans, so different step counts) saved at, from per-sample latents."""
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(2), 4)
    params = _LatentODE(
        _Func(jnp.ones((), F64), _mlp(3, 3, k1, jnn.tanh)),
        eqx.nn.Linear(3, 2, key=k2, dtype=F64),
    )
    t1 = 1.0 + jr.uniform(k3, (3,), F64)
    ts = jnp.sort(jr.uniform(k4, (3, 5), F64) * t1[:, None], axis=1)
    latents = jr.normal(k1, (3, 3), F64)

    def loss(model):
        def decode(ts_i, latent):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(model.func),
                solver,
                ts_i[0],
                ts_i[-1],
                0.1,
                latent,
                saveat=dfx.SaveAt(ts=ts_i),
                stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-7),
                adjoint=adjoint,
                max_steps=MAX_STEPS,
            )
            assert sol.ys is not None
            return jax.vmap(model.hidden_to_data)(sol.ys)

        out = jax.vmap(decode)(ts, latents)
        return jnp.mean((out - jnp.sin(ts)[..., None]) ** 2)

    return loss, params


class _CDEFunc(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y).reshape(3, 2)


class _NeuralCDE(eqx.Module):
    initial: eqx.nn.MLP
    func: _CDEFunc
    linear: eqx.nn.Linear


def _neural_cde(solver, adjoint, interpolation):
    """diffrax's neural CDE example: spirals whose time is a channel, a control over
    linear or cubic Hermite interpolation, `ControlTerm(...).to_ode()`, adaptive
    steps, a classifier on the final state. Linear interpolation has kinks at its
    knots, given to the controller as `jump_ts` (as diffrax advises)."""
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(3), 4)
    params = _NeuralCDE(
        _mlp(2, 3, k1),
        _CDEFunc(_mlp(3, 6, k2, jnn.tanh)),
        eqx.nn.Linear(3, 1, key=k3, dtype=F64),
    )
    ts = jnp.linspace(0.0, 4.0, 9, dtype=F64)
    sign = jnp.array([1.0, -1.0, 1.0, -1.0], F64)
    theta = jr.uniform(k4, (4,), F64, 0, 6.28)
    ys = jnp.stack(
        [
            jnp.broadcast_to(ts, (4, 9)),
            jnp.cos(sign[:, None] * ts[None] + theta[:, None])
            * jnp.exp(-0.1 * ts[None]),
        ],
        axis=-1,
    )
    labels = (sign > 0).astype(F64)
    if interpolation == "linear":
        controls = ys
        controller = dfx.ClipStepSizeController(
            dfx.PIDController(rtol=1e-4, atol=1e-6), jump_ts=ts
        )
    else:
        controls = jax.vmap(lambda y: dfx.backward_hermite_coefficients(ts, y))(ys)
        controller = dfx.PIDController(rtol=1e-4, atol=1e-6)

    def loss(model):
        def predict(control_data):
            if interpolation == "linear":
                control = dfx.LinearInterpolation(ts, control_data)
            else:
                control = dfx.CubicInterpolation(ts, control_data)
            sol = dfx.diffeqsolve(
                dfx.ControlTerm(model.func, control).to_ode(),
                solver,
                ts[0],
                ts[-1],
                None,
                model.initial(control.evaluate(ts[0])),
                stepsize_controller=controller,
                adjoint=adjoint,
                max_steps=MAX_STEPS,
            )
            assert sol.ys is not None
            return jnn.sigmoid(model.linear(sol.ys[-1]))[0]

        pred = jax.vmap(predict)(controls)
        return -jnp.mean(labels * jnp.log(pred) + (1 - labels) * jnp.log(1 - pred))

    return loss, params


class _SDE(eqx.Module):
    drift: eqx.nn.MLP
    diffusion: jax.Array


def sde_spark(solver, adjoint):
    """diffrax's SDE example: `SPaRK`'s problem class (space-time Lévy area),
    adaptive steps with a PID controller, vmapped over Brownian keys (so over step
    counts)."""
    k1, k2 = jr.split(jr.PRNGKey(4))
    params = _SDE(_mlp(3, 3, k1, jnn.tanh), 0.3 * jnp.eye(3, dtype=F64))
    keys = jr.split(k2, 3)

    def loss(model):
        def solve(key):
            bm = dxe.BrownianInterval(
                0.0, 1.0, 2**-10, (3,), key, levy_area=dfx.SpaceTimeLevyArea, dt=0.05
            )
            terms = dfx.MultiTerm(
                dfx.ODETerm(lambda t, y, args: model.drift(y)),
                dfx.ControlTerm(
                    lambda t, y, args: model.diffusion * jnp.cos(y)[:, None], bm
                ),
            )
            sol = dfx.diffeqsolve(
                terms,
                solver,
                0.0,
                1.0,
                0.05,
                jnp.array([1.0, 0.5, -0.5], F64),
                stepsize_controller=dfx.PIDController(
                    rtol=0, atol=2e-3, dtmin=2**-10, dtmax=0.25
                ),
                adjoint=adjoint,
                max_steps=MAX_STEPS,
            )
            assert sol.ys is not None
            return sol.ys[-1]

        return jnp.mean(jnp.sin(jax.vmap(solve)(keys)) ** 2)

    return loss, params


def cnf_backwards(solver, adjoint):
    """diffrax's continuous normalising flow: the log-density of data points by
    solving the flow and its divergence (exact, by `jax.jacfwd`) backwards in time,
    from t = 1 to t = 0."""
    params = _Func(jnp.ones((), F64), _mlp(3, 2, jr.PRNGKey(5), jnn.tanh))
    data = jr.normal(jr.PRNGKey(6), (3, 2), F64) * jnp.array([[0.5], [1.0], [2.0]])

    def loss(func):
        def vector_field(t, state, args):
            y, _ = state

            def f(_y):
                return func(t, jnp.concatenate([_y, jnp.asarray(t)[None]]), args)

            return f(y), jnp.trace(jax.jacfwd(f)(y))

        def log_prob(y1):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(vector_field),
                solver,
                1.0,
                0.0,
                -0.1,
                (y1, jnp.zeros((), F64)),
                stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-7),
                adjoint=adjoint,
                max_steps=MAX_STEPS,
            )
            assert sol.ys is not None
            (y0,), (delta,) = sol.ys
            return -0.5 * jnp.sum(y0**2) - delta

        return -jnp.mean(jax.vmap(log_prob)(data))

    return loss, params


PROBLEMS = {
    "neural_ode": neural_ode,
    "latent_ode": latent_ode,
    "neural_cde_linear": ft.partial(_neural_cde, interpolation="linear"),
    "neural_cde_cubic": ft.partial(_neural_cde, interpolation="cubic"),
    "sde_spark": sde_spark,
    "cnf_backwards": cnf_backwards,
}
# Each example meets one solver (the neural ODE, the cheapest, two), and each ODE
# solver two examples, without compiling the full product (two gradients per case,
# about 10 s): every solver's gradient on every kind of problem and controller is
# compared with `RecursiveCheckpointAdjoint`'s in tests/test_reversible_contract.py;
# here the examples' own constructions (vmapped ragged batches, a latent encoder,
# interpolated controls, Lévy area, a Jacobian trace solved backwards in time).
CASES = [
    ("neural_ode", "ReversibleHeun"),
    ("neural_ode", "AsynchronousLeapfrog"),
    ("latent_ode", "Reversible(Tsit5)"),
    ("neural_cde_linear", "AsynchronousLeapfrog"),
    ("neural_cde_cubic", "Reversible(Tsit5)"),
    ("sde_spark", "Reversible(SPaRK)"),
    ("cnf_backwards", "ReversibleHeun"),
]


@pytest.mark.parametrize("problem, solver", CASES)
def test_gradient_exact_and_training_lowers_the_loss(problem, solver):
    loss_ra, params = PROBLEMS[problem](SOLVERS[solver](), dxe.ReversibleAdjoint())
    loss_rcp, _ = PROBLEMS[problem](SOLVERS[solver](), backprop(MAX_STEPS))
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_ra))
    value, grads = value_and_grad(params)
    reference = eqx.filter_jit(eqx.filter_grad(loss_rcp))(params)
    assert jnp.isfinite(value)
    assert max_relative_error(reference, grads) < EXACT

    # Plain gradient descent, through the compiled gradient.
    values = [float(value)]
    for _ in range(3):
        params = eqx.apply_updates(params, jtu.tree_map(lambda g: -0.1 * g, grads))
        value, grads = value_and_grad(params)
        values.append(float(value))
    assert all(jnp.isfinite(jnp.array(values)))
    assert values[-1] < values[0], values
