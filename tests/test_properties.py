"""Property-based tests (hypothesis) over random queries, step sequences and models.

Every random input is an array of a fixed shape passed to a function compiled once, so
that each example costs a run, not a compilation. Examples are derandomised, so that
CI sees the same ones on every run.
"""

import functools as ft

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from hypothesis import given, settings, strategies as st

import diffrax_extras as dxe

from .helpers import backprop, forward_then_back, make_problem, max_relative_error


SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
NUM_POINTS = 7
BM = dxe.BrownianInterval(0.0, 1.0, 2**-10, (3,), jr.PRNGKey(3), dt=0.1)


@jax.jit
def _increments(starts, ends):
    return jax.vmap(lambda s, t: BM.evaluate(s, t))(starts, ends)


@SETTINGS
@given(
    points=st.lists(
        st.floats(0.0, 1.0, allow_nan=False), min_size=NUM_POINTS, max_size=NUM_POINTS
    ),
    order=st.permutations(range(NUM_POINTS - 1)),
)
def test_brownian_interval_additive_and_consistent_under_random_queries(points, order):
    ts = np.sort(np.asarray(points))
    starts, ends = ts[:-1], ts[1:]
    pieces = np.asarray(_increments(starts, ends))
    whole = np.asarray(_increments(ts[:1], ts[-1:]))[0]
    # W(s, u) = W(s, t) + W(t, u), to the rounding of the sums.
    np.testing.assert_allclose(pieces.sum(0), whole, rtol=0, atol=1e-12)
    # Asked in another order, or reversed in time, each answer is bitwise the same.
    order = np.asarray(order)
    permuted = np.asarray(_increments(starts[order], ends[order]))
    np.testing.assert_array_equal(permuted, pieces[order])
    reversed_ = np.asarray(_increments(ends, starts))
    np.testing.assert_array_equal(reversed_, -pieces)


REVERSIBLE = {
    "ReversibleHeun": dxe.ReversibleHeun(),
    "Reversible(Tsit5)": dxe.Reversible(dfx.Tsit5()),
    "AsynchronousLeapfrog": dxe.AsynchronousLeapfrog(0.9),
}
NUM_STEPS = 8


@ft.cache
def _round_trip(name):
    solver = REVERSIBLE[name]
    params, build = make_problem("ode")
    terms, y0, args = build(params)

    @jax.jit
    def run(ts):
        y0_back, _, _ = forward_then_back(
            solver, terms, y0, args, ts, [False] * NUM_STEPS
        )
        return y0_back

    return run, y0


@SETTINGS
@given(
    name=st.sampled_from(list(REVERSIBLE)),
    steps=st.lists(
        st.floats(0.01, 0.3, allow_nan=False), min_size=NUM_STEPS, max_size=NUM_STEPS
    ),
)
def test_reversible_solvers_reconstruct_after_random_steps(name, steps):
    run, y0 = _round_trip(name)
    ts = jnp.concatenate([jnp.zeros(1), jnp.cumsum(jnp.asarray(steps))])
    # Each inverse step rounds at 1e-16 and may amplify what came before by the
    # inverse's growth (1/(2 damping - 1) = 1.25 for the leapfrog, 1/0.999 for the
    # wrapper): after 8 steps well inside 1e-12.
    assert max_relative_error(y0, run(ts)) < 1e-12


BASES = {"Heun": dfx.Heun(), "Tsit5": dfx.Tsit5()}


@ft.cache
def _gradients(base):
    mlp = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    _, static = eqx.partition(mlp, eqx.is_array)

    def grad(solver, adjoint):
        @jax.jit
        def fn(params, y0):
            def loss(params, y0):
                sol = dfx.diffeqsolve(
                    dfx.ODETerm(lambda t, y, args: args(y)),
                    solver,
                    0.0,
                    1.0,
                    None,
                    y0,
                    args=eqx.combine(params, static),
                    saveat=dfx.SaveAt(ts=jnp.linspace(0.2, 1.0, 4)),
                    stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
                    adjoint=adjoint,
                    max_steps=256,
                )
                assert sol.ys is not None
                return jnp.sum(jnp.sin(sol.ys))

            return jax.grad(loss, argnums=(0, 1))(params, y0)

        return fn

    solver = dxe.Reversible(BASES[base])
    return (
        grad(solver, dxe.ReversibleAdjoint()),
        grad(solver, backprop(256)),
        static,
    )


@SETTINGS
@given(base=st.sampled_from(list(BASES)), seed=st.integers(0, 2**31 - 1))
def test_reversible_adjoint_matches_checkpointing_on_random_mlps(base, seed):
    ours, reference, static = _gradients(base)
    model_key, y_key = jr.split(jr.PRNGKey(seed))
    mlp = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=model_key)
    params = eqx.filter(mlp, eqx.is_array)
    y0 = jr.normal(y_key, (3,))
    assert max_relative_error(reference(params, y0), ours(params, y0)) < 1e-10
