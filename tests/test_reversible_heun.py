import diffrax as dfx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import diffrax_extras as dxe

from .helpers import (
    inversion_errors,
    make_problem,
    measured_order,
    reconstruction_error,
)


SOLVER = dxe.ReversibleHeun()


@pytest.mark.parametrize("kind", ["ode", "cde", "sde"])
def test_backward_step_inverts_step(kind):
    # Few steps, as they are unrolled; re-evaluations after jumps must be undone too.
    jumps = [False, False, True, False, False, True, True, False]
    y0_error, dense_error = inversion_errors(SOLVER, kind, jumps)
    assert y0_error < 1e-12 and dense_error < 1e-12


def test_reconstruction_after_many_steps():
    # 1,000 steps forward and back: the reconstruction error is rounding error only,
    # which grows like sqrt(steps) times the backward dynamics' amplification.
    assert reconstruction_error(SOLVER) < 1e-11


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
    order, errors = measured_order(SOLVER, [0.02, 0.01, 0.005, 0.0025])
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
    assert sol.ys is not None
    assert jnp.abs(sol.ys[-1, 0] - exact) < 1e-4
    assert sol.stats["num_rejected_steps"] < sol.stats["num_accepted_steps"]


def test_pytree_state_and_solver_state_structure():
    params, build = make_problem("ode")
    terms, y0, args = build(params)
    yhat, vf = SOLVER.init(terms, 0.0, 0.1, y0, args)
    assert jtu.tree_structure(yhat) == jtu.tree_structure(y0)
    assert jtu.tree_structure(vf) == jtu.tree_structure(y0)
