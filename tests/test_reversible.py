import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest
import scipy.stats

import diffrax_extras as dxe

from .helpers import (
    backprop,
    CONTROLLERS,
    EXACT,
    grad_of,
    inversion_errors,
    max_relative_error,
    measured_order,
    SAVEATS,
)


ODE_SOLVERS = [
    dfx.Euler(),
    dfx.Heun(),
    dfx.Midpoint(),
    dfx.Ralston(),
    dfx.Bosh3(),
    dfx.Tsit5(),
    dfx.Dopri5(),
    dfx.Dopri8(),
]
SDE_SOLVERS = [
    (dfx.EulerHeun(), "sde"),
    (dfx.Heun(), "sde"),
    (dfx.Midpoint(), "sde"),
    (dfx.SPaRK(), "sde_levy"),
    (dfx.ShARK(), "sde_additive"),
    (dfx.GeneralShARK(), "sde_levy"),
    (dfx.SRA1(), "sde_additive"),
]


def _configurations(solvers):
    """Cycles through the controllers and SaveAt forms, so that every one meets the
    wrapped solvers without compiling the full product. Euler and EulerHeun, which
    have no error estimate, take constant steps or steps to given times instead.
    SDE solvers, whose compiles are the slowest, save at fixed times only: the
    wrapper handles every SaveAt form alike, and the ODE solvers cover them all."""
    controllers, saveats = list(CONTROLLERS), list(SAVEATS)
    out = []
    for i, (solver, kind) in enumerate(solvers):
        controller = controllers[i % len(controllers)]
        has_estimate = not isinstance(solver, dfx.Euler | dfx.EulerHeun)
        if not has_estimate and controller in ("pid", "clip"):
            controller = "step_to"
        saveat = saveats[i % len(saveats)]
        if kind.startswith("sde"):
            saveat = ("t1", "t0_t1_ts")[i % 2]
        out.append((solver, kind, controller, saveat))
    return out


# The SDE solvers' gradients compile slowest; those of the three problem classes
# (general, space-time Lévy area, additive noise) stand for the rest, whose inversion
# and interface are tested below and in tests/test_solver_interface.py.
# Midpoint and Ralston (two-stage explicit RK, as Heun) are left to the order tests
# below: the gradient takes the same path for every explicit tableau. Tsit5, on
# ODEs, CDEs and SDEs, is in the contract tests (tests/test_reversible_contract.py).
_GRADIENT_ODE_SOLVERS = [
    s for s in ODE_SOLVERS if not isinstance(s, dfx.Midpoint | dfx.Ralston | dfx.Tsit5)
]
GRADIENT_CASES = _configurations(
    [(s, "ode") for s in _GRADIENT_ODE_SOLVERS]
    # General noise is in the contract tests (Reversible(Tsit5) on an SDE), and
    # space-time Lévy areas in the drop-in tests (Reversible(SPaRK), against
    # backpropagation, in tests/test_dropin.py); here the solver that needs
    # additive noise.
    + [SDE_SOLVERS[4]]
)


@pytest.mark.parametrize(
    "solver, kind, controller, saveat",
    GRADIENT_CASES,
    ids=[f"{type(c[0]).__name__}-{c[1]}-{c[2]}-{c[3]}" for c in GRADIENT_CASES],
)
def test_gradient_matches_recursive_checkpoint(solver, kind, controller, saveat):
    solver = dxe.Reversible(solver)
    grad_ref, params = grad_of(kind, solver, backprop(), controller, saveat)
    grad_rev, _ = grad_of(kind, solver, dxe.ReversibleAdjoint(), controller, saveat)
    assert max_relative_error(grad_ref(params), grad_rev(params)) < EXACT


def test_gradient_with_small_coupling():
    solver = dxe.Reversible(dfx.Tsit5(), coupling=0.5)
    grad_ref, params = grad_of("ode", solver, backprop(), "pid", "t0_t1_ts")
    grad_rev, _ = grad_of("ode", solver, dxe.ReversibleAdjoint(), "pid", "t0_t1_ts")
    # The reconstruction amplifies rounding by 1/coupling a step: 2^20 over 20 steps.
    assert max_relative_error(grad_ref(params), grad_rev(params)) < 1e-8


# The forward and backward base steps' leading error terms cancel in part, the more so
# the closer the coupling is to 1 (at 1 the method is symmetric, so of even order).
# Near 1 the asymptotic regime then starts at step sizes whose errors are already at
# float64 rounding for the high-order solvers, so their order is measured at a small
# coupling; the second-order solvers are measured at the default too.
_LOW = [0.02, 0.01, 0.005, 0.0025]
ORDER_CASES = [
    (dfx.Euler(), [0.02, 0.01, 0.005, 0.0025], 0.1),
    (dfx.Heun(), _LOW, 0.1),
    (dfx.Heun(), _LOW, 0.999),
    (dfx.Midpoint(), _LOW, 0.1),
    (dfx.Midpoint(), _LOW, 0.999),
    (dfx.Ralston(), _LOW, 0.1),
    (dfx.Ralston(), _LOW, 0.999),
    (dfx.Bosh3(), [0.04, 0.02, 0.01, 0.005], 0.1),
    (dfx.Tsit5(), [0.1, 0.05, 0.025, 0.0125], 0.1),
    (dfx.Dopri5(), [0.05, 0.025, 0.0125, 0.00625], 0.1),
    (dfx.Dopri8(), [0.25, 0.2, 1 / 6, 0.125], 0.1),
]


@pytest.mark.parametrize(
    "solver, dts, coupling",
    ORDER_CASES,
    ids=[f"{type(c[0]).__name__}-{c[2]}" for c in ORDER_CASES],
)
def test_keeps_order_of_base_solver(solver, dts, coupling):
    nominal = solver.order(dfx.ODETerm(lambda t, y, a: y))
    order, errors = measured_order(dxe.Reversible(solver, coupling), dts)
    assert abs(order - nominal) < 0.2, (order, errors)
    assert dxe.Reversible(solver).order(dfx.ODETerm(lambda t, y, a: y)) == nominal


def test_adaptive_steps_follow_base_error_estimate():
    term = dfx.ODETerm(lambda t, y, args: -y * jnp.cos(t))
    controller = dfx.PIDController(rtol=1e-8, atol=1e-10)
    ts = jnp.linspace(0.5, 3.0, 6)

    def solve(solver):
        return dfx.diffeqsolve(
            term,
            solver,
            0.0,
            3.0,
            None,
            jnp.array([1.0]),
            stepsize_controller=controller,
            saveat=dfx.SaveAt(ts=ts),
        )

    base, wrapped = solve(dfx.Tsit5()), solve(dxe.Reversible(dfx.Tsit5()))
    exact = jnp.exp(-jnp.sin(ts))
    # Same error estimate, so about the same steps; and the dense output (Tsit5's
    # interpolation shifted onto y) is as accurate as Tsit5's own.
    assert abs(
        int(wrapped.stats["num_steps"]) - int(base.stats["num_steps"])
    ) <= 0.2 * int(base.stats["num_steps"])
    assert wrapped.ys is not None
    assert jnp.max(jnp.abs(wrapped.ys[:, 0] - exact)) < 1e-7
    assert base.ys is not None
    assert jnp.max(jnp.abs(base.ys[:, 0] - exact)) < 1e-7


def _implicit(solver_cls):
    # Tolerances for the root find, which `diffeqsolve` sets from an adaptive
    # controller but calling `step` directly does not.
    # (diffrax's default chord method diverges on the order test's rotation.)
    return solver_cls(root_finder=optx.Newton(rtol=1e-12, atol=1e-12))


def test_implicit_base_solver_is_exactly_reversible():
    # The coupled inverse evaluates the base step only forwards, at the same points
    # as the forward step (each Psi solves its own implicit equations afresh), so an
    # implicit base solver inverts exactly too.
    solver = dxe.Reversible(_implicit(dfx.Kvaerno5))
    y0_error, dense_error = inversion_errors(solver, "ode", [False] * 3)
    assert y0_error < 1e-12 and dense_error < 1e-12
    # With an adaptive controller `diffeqsolve` sets the root find's tolerances
    # (Kvaerno3: the same mechanism, a smaller tableau to compile).
    solver = dxe.Reversible(dfx.Kvaerno3())
    grad_ref, params = grad_of("ode", solver, backprop(), "pid", "t1")
    grad_rev, _ = grad_of("ode", solver, dxe.ReversibleAdjoint(), "pid", "t1")
    assert max_relative_error(grad_ref(params), grad_rev(params)) < EXACT


def test_implicit_base_solver_keeps_its_order():
    order, errors = measured_order(
        dxe.Reversible(_implicit(dfx.Kvaerno3), 0.1), [0.04, 0.02, 0.01, 0.005]
    )
    assert abs(order - 3) < 0.2, (order, errors)


@pytest.mark.slow
@pytest.mark.parametrize(
    "base", [dfx.QUICSORT(100.0), dfx.Heun()], ids=["QUICSORT", "Heun"]
)
def test_underdamped_langevin_stationary_law(base):
    # diffrax's underdamped Langevin example with the potential x^2 / 2 and
    # gamma = u = 1: the stationary law is x ~ N(0, 1), v ~ N(0, 1). The friction
    # makes the dynamics dissipative, so the coupling must be well below 1 (the
    # default 0.999 diverges here; see the warning). 512 paths from x = v = 0 run to
    # t = 30, about 15 relaxation times; the KS test against N(0, 1) uses a
    # threshold of 1e-3 on its p-value.
    solver = dxe.Reversible(base, coupling=0.9)
    gamma, u = jnp.array(1.0), jnp.array(1.0)

    def final(key):
        bm = dxe.BrownianInterval(
            0.0, 30.0, 0.025, (1,), key, levy_area=dfx.SpaceTimeTimeLevyArea, dt=0.1
        )
        terms = dfx.MultiTerm(
            dfx.UnderdampedLangevinDriftTerm(gamma, u, lambda x, args: x),
            dfx.UnderdampedLangevinDiffusionTerm(gamma, u, bm),
        )
        sol = dfx.diffeqsolve(
            terms, solver, 0.0, 30.0, 0.1, (jnp.zeros(1), jnp.zeros(1)), max_steps=300
        )
        assert sol.ys is not None
        return sol.ys[0][-1, 0], sol.ys[1][-1, 0]

    x, v = jax.jit(jax.vmap(final))(jr.split(jr.PRNGKey(0), 512))
    for sample in (x, v):
        assert scipy.stats.kstest(np.asarray(sample), "norm").pvalue > 1e-3
