import diffrax as dfx
import jax.numpy as jnp
import pytest

import diffrax_extras as dxe

from .helpers import (
    CONTROLLERS,
    fused_vjp_error,
    grad_of,
    inversion_errors,
    max_relative_error,
    measured_order,
    reconstruction_error,
    SAVEATS,
)


SOLVER = dxe.AsynchronousLeapfrog()
EXACT = 1e-10  # float64; the adjoint reconstructs states to rounding error only

GRADIENT_CASES = [("ode", c, s) for c, s in zip(CONTROLLERS, SAVEATS, strict=True)] + [
    ("cde", "pid", "t0_t1_ts")
]


@pytest.mark.parametrize("kind, controller, saveat", GRADIENT_CASES)
def test_gradient_matches_recursive_checkpoint(kind, controller, saveat):
    grad_ref, params = grad_of(
        kind, SOLVER, dfx.RecursiveCheckpointAdjoint(), controller, saveat
    )
    grad_rev, _ = grad_of(kind, SOLVER, dxe.ReversibleAdjoint(), controller, saveat)
    assert max_relative_error(grad_ref(params), grad_rev(params)) < EXACT


def test_gradient_with_damping():
    solver = dxe.AsynchronousLeapfrog(damping=0.9)
    grad_ref, params = grad_of("ode", solver, dfx.RecursiveCheckpointAdjoint())
    grad_rev, _ = grad_of("ode", solver, dxe.ReversibleAdjoint())
    # The inverse step divides the error of v by 2 * 0.9 - 1 = 0.8: over these 20
    # steps rounding grows by 1.25^20 ~ 90.
    assert max_relative_error(grad_ref(params), grad_rev(params)) < 1e-8


@pytest.mark.parametrize("damping, expected", [(1.0, 2), (0.9, 1)])
def test_order(damping, expected):
    solver = dxe.AsynchronousLeapfrog(damping)
    order, errors = measured_order(solver, [0.02, 0.01, 0.005, 0.0025])
    assert abs(order - expected) < 0.2, (order, errors)
    assert solver.order(dfx.ODETerm(lambda t, y, a: y)) == expected


@pytest.mark.parametrize("kind", ["ode", "cde"])
def test_backward_step_inverts_step(kind):
    # Jumps are ignored (v is carried across them), so the inverse holds through them.
    jumps = [False, False, True, False, False, True, False, False]
    y0_error, dense_error = inversion_errors(SOLVER, kind, jumps)
    assert y0_error < 1e-12 and dense_error < 1e-12


def test_reconstruction_after_many_steps():
    assert reconstruction_error(SOLVER) < 1e-11


@pytest.mark.parametrize("kind", ["ode", "cde"])
def test_fused_backward_step_vjp_matches_default(kind):
    # The same derivative computed in another order; only rounding may differ.
    assert fused_vjp_error(SOLVER, kind) < 1e-12


def test_adaptive_stepping_reaches_tolerance():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y * jnp.cos(t)),
        SOLVER,
        0.0,
        3.0,
        None,
        jnp.array([1.0]),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
    )
    assert sol.ys is not None
    assert jnp.abs(sol.ys[-1, 0] - jnp.exp(-jnp.sin(3.0))) < 1e-4
    assert sol.stats["num_rejected_steps"] < sol.stats["num_accepted_steps"]
