"""The contract of a reversible solver, checked once for every one of them.

A solver of this package must: invert its step exactly (the state and the dense
output, through jumps too), rebuild the initial state after many steps up to rounding,
fuse its backward VJP without changing the derivative, reach a tolerance with
adaptive steps, converge at its order, and give `ReversibleAdjoint` the gradient
`RecursiveCheckpointAdjoint` gives (float64, to rounding; float32, to its drift).
What is particular to one solver (the coupling, the damping, jumps of the leapfrog,
reversible Heun against diffrax's) is tested in that solver's own file.
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import pytest

import diffrax_extras as dxe

from .helpers import (
    backprop,
    decay_loss,
    EXACT,
    fused_vjp_error,
    grad_of,
    inversion_errors,
    max_relative_error,
    measured_order,
    reconstruction_error,
)


SOLVERS = {
    "ReversibleHeun": dxe.ReversibleHeun(),
    "Reversible(Tsit5)": dxe.Reversible(dfx.Tsit5()),
    "AsynchronousLeapfrog": dxe.AsynchronousLeapfrog(),
}
# The problems each solves: the leapfrog refuses SDEs, and `Reversible(...)` needs a
# Stratonovich base for one (`Reversible(Heun())` stands in).
KINDS = {
    "ReversibleHeun": ["ode", "cde", "sde"],
    "Reversible(Tsit5)": ["ode", "cde", "sde"],
    "AsynchronousLeapfrog": ["ode", "cde"],
}


def _solver(name, kind):
    if name == "Reversible(Tsit5)" and kind.startswith("sde"):
        return dxe.Reversible(dfx.Heun())
    return SOLVERS[name]


INVERSION = [(name, kind) for name in SOLVERS for kind in KINDS[name]]


@pytest.mark.parametrize("name, kind", INVERSION)
def test_backward_step_inverts_step(name, kind):
    # Few steps, as they are unrolled; the jumps make `ReversibleHeun` re-evaluate
    # and the leapfrog shift `v`, and both must be undone exactly.
    jumps = [False, True, False, False]
    y0_error, dense_error = inversion_errors(_solver(name, kind), kind, jumps)
    assert y0_error < 1e-12 and dense_error < 1e-12


@pytest.mark.parametrize("name", SOLVERS)
def test_reconstruction_after_many_steps(name):
    # 1,000 steps forward and back: rounding error only, which grows like the square
    # root of the steps times the backward dynamics' amplification (and by at most
    # (1/0.999)^1000 ~ 2.7 for the coupling's inverse).
    assert reconstruction_error(SOLVERS[name]) < 1e-11


FUSED = [
    (name, kind)
    for name in SOLVERS
    for kind in KINDS[name]
    # `ReversibleHeun` uses the default `backward_step_vjp` that this compares with.
    if name != "ReversibleHeun" and kind != "cde"
]


@pytest.mark.parametrize("name, kind", FUSED)
def test_fused_backward_step_vjp_matches_default(name, kind):
    # The same derivative computed in another order; only rounding may differ.
    assert fused_vjp_error(_solver(name, kind), kind) < 1e-12


@pytest.mark.parametrize("name", SOLVERS)
def test_adaptive_stepping_reaches_tolerance(name):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y * jnp.cos(t)),
        SOLVERS[name],
        0.0,
        3.0,
        None,
        jnp.array([1.0]),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
    )
    assert sol.ys is not None
    assert jnp.abs(sol.ys[-1, 0] - jnp.exp(-jnp.sin(3.0))) < 1e-4
    assert sol.stats["num_rejected_steps"] < sol.stats["num_accepted_steps"]


@pytest.mark.parametrize("name", ["ReversibleHeun", "AsynchronousLeapfrog"])
def test_second_order(name):
    # (`Reversible` keeps its base solver's order: tests/test_reversible.py.)
    solver = SOLVERS[name]
    order, errors = measured_order(solver, [0.02, 0.01, 0.005, 0.0025])
    assert abs(order - 2) < 0.2, (order, errors)
    assert solver.order(dfx.ODETerm(lambda t, y, a: y)) == 2


# Every solver meets every controller and every SaveAt form, and every problem it
# solves; every SaveAt form meets every kind of problem; without compiling the full
# product (each case compiles two gradients).
GRADIENT_CASES = [
    ("ReversibleHeun", "ode", "constant", "t1"),
    ("ReversibleHeun", "ode", "clip", "t0_t1_ts"),
    ("ReversibleHeun", "cde", "step_to", "steps"),
    ("ReversibleHeun", "sde", "pid", "subs_fn"),
    ("Reversible(Tsit5)", "ode", "step_to", "subs_fn"),
    ("Reversible(Tsit5)", "ode", "pid", "steps"),
    ("Reversible(Tsit5)", "cde", "clip", "t1"),
    ("Reversible(Tsit5)", "sde", "constant", "steps"),
    ("AsynchronousLeapfrog", "ode", "pid", "t0_t1_ts"),
    ("AsynchronousLeapfrog", "ode", "step_to", "t1"),
    ("AsynchronousLeapfrog", "cde", "clip", "subs_fn"),
    ("AsynchronousLeapfrog", "cde", "constant", "t0_t1_ts"),
]
# (An SDE with `SaveAt(t0=..., t1=..., ts=...)` is in tests/test_reversible.py.)


@pytest.mark.parametrize("name, kind, controller, saveat", GRADIENT_CASES)
def test_gradient_matches_recursive_checkpoint(name, kind, controller, saveat):
    solver = _solver(name, kind)
    grad_ref, params = grad_of(kind, solver, backprop(), controller, saveat)
    grad_rev, _ = grad_of(kind, solver, dxe.ReversibleAdjoint(), controller, saveat)
    assert max_relative_error(grad_ref(params), grad_rev(params)) < EXACT


@pytest.mark.parametrize("name", SOLVERS)
def test_float32(name):
    # In float32 the reconstruction drifts by rounding (~1e-7 per step, times the
    # growth of the backward dynamics); over 100 steps of this contractive ODE the
    # gradient stays within 1e-4 of the float64 one.
    grad = jax.grad(decay_loss, argnums=(1, 2))
    y64, a64 = jnp.array([1.0, 2.0]), jnp.array(0.7)
    g64 = grad(SOLVERS[name], y64, a64)
    g32 = grad(SOLVERS[name], y64.astype(jnp.float32), a64.astype(jnp.float32))
    assert all(x.dtype == jnp.float32 for x in g32)
    assert max_relative_error(g64, [x.astype(jnp.float64) for x in g32]) < 1e-4
