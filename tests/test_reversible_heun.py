import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import diffrax_extras as dxe

from .helpers import make_problem, max_relative_error


SOLVER = dxe.ReversibleHeun()


def _forward_then_back(terms, y0, args, ts, made_jumps):
    """Steps forward over `ts` with `step`, then back with `backward_step`."""
    state = SOLVER.init(terms, ts[0], ts[1], y0, args)
    y = y0
    forward, backward = [], []
    for i in range(len(ts) - 1):
        y, _, dense, state, _ = SOLVER.step(
            terms, ts[i], ts[i + 1], y, args, state, made_jumps[i]
        )
        forward.append(dense)
    for i in reversed(range(len(ts) - 1)):
        jump_at_t1 = made_jumps[i + 1] if i + 1 < len(ts) - 1 else False
        y, dense, state, _ = SOLVER.backward_step(
            terms, ts[i], ts[i + 1], y, args, state, jump_at_t1
        )
        backward.append(dense)
    return y, forward, backward[::-1]


@pytest.mark.parametrize("kind", ["ode", "cde", "sde"])
def test_backward_step_inverts_step(kind):
    params, build = make_problem(kind)
    terms, y0, args = build(params)
    ts = np.linspace(0.0, 1.0, 21)
    jumps = [False] * 20
    jumps[7] = jumps[13] = True  # re-evaluations after jumps must be undone too
    y0_back, forward, backward = jax.jit(
        lambda: _forward_then_back(terms, y0, args, ts, jumps)
    )()
    assert max_relative_error(y0, y0_back) < 1e-12
    assert max_relative_error(forward, backward) < 1e-12


def test_reconstruction_after_many_steps():
    # 1,000 steps forward and back: the reconstruction error is rounding error only,
    # which grows like sqrt(steps) times the backward dynamics' amplification.
    params, build = make_problem("ode")
    terms, y0, args = build(params)
    n = 1000
    ts = jnp.linspace(0.0, 1.0, n + 1)

    @jax.jit
    def run(y0):
        state = SOLVER.init(terms, ts[0], ts[1], y0, args)

        def fwd(carry, i):
            y, state = carry
            y, _, _, state, _ = SOLVER.step(
                terms, ts[i], ts[i + 1], y, args, state, False
            )
            return (y, state), None

        def bwd(carry, i):
            y, state = carry
            y, _, state, _ = SOLVER.backward_step(
                terms, ts[i], ts[i + 1], y, args, state, False
            )
            return (y, state), None

        carry, _ = jax.lax.scan(fwd, (y0, state), jnp.arange(n))
        (y, _), _ = jax.lax.scan(bwd, carry, jnp.arange(n), reverse=True)
        return y

    assert max_relative_error(y0, run(y0)) < 1e-11


def test_same_numbers_as_diffrax_without_jumps():
    params, build = make_problem("sde")
    terms, y0, args = build(params)

    def solve(solver):
        return dfx.diffeqsolve(
            terms, solver, 0.0, 1.0, 0.01, y0, args=args, saveat=dfx.SaveAt(steps=True)
        ).ys

    ours, theirs = solve(SOLVER), solve(dfx.ReversibleHeun())
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_second_order_on_smooth_ode():
    term = dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]]) * (1 + 0.5 * t))
    y0 = jnp.array([1.0, 0.0])
    exact = dfx.diffeqsolve(
        term,
        dfx.Dopri8(),
        0.0,
        2.0,
        1e-3,
        y0,
        stepsize_controller=dfx.PIDController(rtol=1e-13, atol=1e-13),
    ).ys[-1]
    dts = [0.02, 0.01, 0.005, 0.0025]
    errors = [
        jnp.max(
            jnp.abs(
                dfx.diffeqsolve(term, SOLVER, 0.0, 2.0, dt, y0, max_steps=10_000).ys[-1]
                - exact
            )
        )
        for dt in dts
    ]
    order = np.polyfit(np.log(dts), np.log(np.asarray(errors)), 1)[0]
    assert abs(order - 2) < 0.2, (order, errors)


def test_adaptive_stepping_reaches_tolerance():
    term = dfx.ODETerm(lambda t, y, args: -y * jnp.cos(t))
    y0 = jnp.array([1.0])
    sol = dfx.diffeqsolve(
        term,
        SOLVER,
        0.0,
        3.0,
        None,
        y0,
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
    )
    exact = jnp.exp(-jnp.sin(3.0))
    assert jnp.abs(sol.ys[-1, 0] - exact) < 1e-4
    assert sol.stats["num_rejected_steps"] < sol.stats["num_accepted_steps"]


def test_pytree_state_and_solver_state_structure():
    params, build = make_problem("ode")
    terms, y0, args = build(params)
    yhat, vf = SOLVER.init(terms, 0.0, 0.1, y0, args)
    assert jtu.tree_structure(yhat) == jtu.tree_structure(y0)
    assert jtu.tree_structure(vf) == jtu.tree_structure(y0)
