"""Whether `ReversibleAdjoint`'s reconstruction check refuses the wrong gradients only.

`ReversibleAdjoint` rebuilds each state from the next on its backward pass. Where
running the solver backwards is unstable (a small coupling or damping, a dissipative
problem for reversible Heun, a long float32 solve) the rebuilt states drift from the
true ones and the gradient taken along them is wrong; the only place where the truth
is known is the start, so the check compares the rebuilt initial state with the true
one and refuses the gradient (NaN, or an error with `throw=True`) when they differ by
more than `reconstruction_tol`. This benchmark sets the check against the gradient
errors it is meant to catch, over 106 cases chosen around the boundary between right
and wrong gradients: a neural ODE, Lotka-Volterra, states of size 1e-7, states
mixing sizes 1 and 1e-7, reversible Heun on dissipative problems; float32 and
float64; `ReversibleHeun`, `Reversible(Tsit5)` and `Reversible(Dopri5)` at several
couplings, `AsynchronousLeapfrog` at several dampings; fixed steps. For each case:

- the gradient error: max over leaves (the parameters and `y0`) of
  max|g - g_ref| / max|g_ref|, for `ReversibleAdjoint(reconstruction_tol=None)`
  against `RecursiveCheckpointAdjoint` with the same solver, dtype and steps (the
  exact gradient of the same discretised solve). In float32 cases also the error of
  that float32 reference against the same in float64 (on the same float32-rounded
  inputs): the rounding an exact float32 gradient has anyway.
- the check's metric, computed as the package computes it: a forward solve, the
  solver's backward steps (`backward_step_vjp`) from its final state to the start,
  then the larger of `reconstruction_error` of the rebuilt `y0` (against
  `reconstruction_scale` with floor power `FLOOR_POWER`) and of the rebuilt
  `solver.reconstructed_state` (floor power `STATE_FLOOR_POWER`). The default check
  passes when it is at most `RECONSTRUCTION_TOL`. That verdict is set against the
  adjoint's own: whether `jax.grad` through `ReversibleAdjoint()` (`throw=False`)
  returns NaN. The script fails, after writing its results, if any case disagrees.
- the previous check's metric, for comparison: max|y0 - y0_rebuilt| /
  max(1, max|y0|, max|y_N|), over `y` only, with its tolerance of 1e-3.

A gradient is right if its error is at most 1e-3, wrong if it is above 1e-2 or not
finite; those in between count as neither. A miss is a wrong gradient that a check
passes, a false alarm a right gradient that it refuses. No tolerance avoids both
(how wrong a gradient is for a given error in the rebuilt state depends on how
sensitive it is to the path); the tolerance sweep shows the trade-off behind the
default. Where the backward pass is unstable its errors are amplified rounding, so
those cases' numbers move with the compiler's choices (its flags, whether N is known
when compiling), and a case near the tolerance can change sides.

Full mode runs every case; quick mode a subset from every family, with the neural
ODE in its short solves only (a few minutes on 2 cores); tiny mode three cases
(seconds).

Writes `benchmarks/results/reconstruction_check{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/reconstruction_check.py [--mode full|quick|tiny]`.
"""

import dataclasses
import fractions
import functools as ft
import math
import time
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import (
    bar_chart,
    describe,
    log,
    machine,
    markdown_table,
    parse_args,
    save,
)


jax.config.update("jax_enable_x64", True)
import diffrax_extras as dxe  # noqa: E402
from diffrax_extras._adjoint.reconstruction import (  # noqa: E402
    FLOOR_POWER,
    reconstruction_error,
    reconstruction_scale,
    RECONSTRUCTION_TOL,
    STATE_FLOOR_POWER,
)


# Gradient errors of right and wrong gradients.
RIGHT, WRONG = 1e-3, 1e-2
# The previous check: y only, relative to max(1, max|y0|, max|y_N|).
OLD_TOL = 1e-3
SWEEP = (1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2)


def sci(x: float) -> str:
    """1e-4, not 0.0001 or 1e-04."""
    return f"{x:.0e}".replace("e-0", "e-")


# ----------------------------------------------------------------------- problems
@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """y' = vf(t, y, params) on [0, t1], with loss `loss(y(t1))`. `params` and `y0`
    (float64, cast to each case's dtype) are both differentiated. Problems that share
    `vf` and `loss` share compiled programs."""

    name: str
    vf: Callable
    params: Any
    y0: Any
    loss: Callable
    t1: float


@ft.cache
def neural_ode() -> Problem:
    """State 8, MLP width 32 (tanh), batch 16, t in [0, 10], as in
    `gradient_error.py`."""
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(8, 8, 32, 2, activation=jnp.tanh, key=key_mlp)
    params, static = eqx.partition(mlp, eqx.is_array)

    def vf(t, y, p):
        return jax.vmap(eqx.combine(p, static))(y)

    y0 = jr.normal(key_y, (16, 8))
    return Problem("neural ODE", vf, params, y0, lambda y: jnp.mean(y**2), 10.0)


def _sum_squares(y):
    return jnp.sum(y**2)


def _lotka_volterra_vf(t, y, p):
    x, z = y[0], y[1]
    return jnp.stack([p[0] * x - p[1] * x * z, p[3] * x * z - p[2] * z])


def lotka_volterra(t1: float, y0=(1.0, 1.0)) -> Problem:
    params = np.array([2 / 3, 4 / 3, 1.0, 1.0])
    name = f"LV(T={t1:g}, y0=({y0[0]:g}, {y0[1]:g}))"
    y0 = np.array(y0, np.float64)
    return Problem(name, _lotka_volterra_vf, params, y0, _sum_squares, t1)


@ft.cache
def _scaled_fns(vf, loss, s):
    def vf_s(t, y, p):
        return s * vf(t, y / s, p)

    return vf_s, lambda y: loss(y / s)


def tiny(problem: Problem, s: float = 1e-7) -> Problem:
    """y' = s f(y / s): the same solution, times s."""
    vf, loss = _scaled_fns(problem.vf, problem.loss, s)
    name = f"{sci(s)} * {problem.name}"
    return dataclasses.replace(problem, name=name, vf=vf, y0=s * problem.y0, loss=loss)


def _oscillator_vf(t, y, p):
    return jnp.stack([p * y[1], -p * y[0]])


def _decay_vf(t, y, p):
    return -p * y


@ft.cache
def _mixed_fns(s):
    def vf(t, y, p):
        small = s * _decay_vf(t, y[2:] / s, p["decay"])
        return jnp.concatenate([_oscillator_vf(t, y[:2], p["oscillator"]), small])

    def loss(y):
        weights = jnp.array([1.0, 0.7], y.dtype)
        return jnp.sum(jnp.sin(y[:2]) * weights) + _sum_squares(y[2:] / s)

    return vf, loss


def mixed(decay_rate: float, s: float = 1e-7) -> Problem:
    """One array: a harmonic oscillator (size 1) followed by two decaying elements
    scaled by s, on [0, 40]."""
    vf, loss = _mixed_fns(s)
    params = dict(oscillator=np.array(1.0), decay=np.array(decay_rate))
    y0 = np.array([1.0, 0.0, s, 0.5 * s])
    scale = "" if s == 1 else f"{sci(s)} * "
    name = f"osc + {scale}decay(rate={decay_rate:g})"
    return Problem(name, vf, params, y0, loss, 40.0)


def decay(t1: float) -> Problem:
    y0 = np.linspace(1.0, 0.5, 3)
    return Problem(f"decay(T={t1:g})", _decay_vf, np.array(1.0), y0, _sum_squares, t1)


def _damped_oscillator_vf(t, y, p):
    omega, zeta = p[0], p[1]
    return jnp.stack([y[1], -(omega**2) * y[0] - 2 * zeta * omega * y[1]])


def damped_oscillator(t1: float) -> Problem:
    name = f"damped osc(T={t1:g})"
    params, y0 = np.array([1.0, 0.1]), np.array([1.0, 0.0])
    return Problem(name, _damped_oscillator_vf, params, y0, _sum_squares, t1)


# ------------------------------------------------------------------------ solvers
RH = dxe.ReversibleHeun()


def rev(coupling: float = 0.999, base: Callable = dfx.Tsit5) -> dxe.Reversible:
    return dxe.Reversible(base(), coupling)


def alf(damping: float = 1.0) -> dxe.AsynchronousLeapfrog:
    return dxe.AsynchronousLeapfrog(damping)


def solver_name(solver) -> str:
    if isinstance(solver, dxe.Reversible):
        coupling = "" if solver.coupling == 0.999 else f", coupling={solver.coupling:g}"
        return f"Reversible({type(solver.solver).__name__}{coupling})"
    if isinstance(solver, dxe.AsynchronousLeapfrog) and solver.damping != 1:
        return f"AsynchronousLeapfrog(damping={solver.damping:g})"
    return type(solver).__name__


# -------------------------------------------------------------------------- cases
F32, F64 = jnp.float32, jnp.float64
# The smallest mode that runs a case (each mode runs those of the smaller ones too).
T, Q, F = "tiny", "quick", "full"
NODE = neural_ode()
LV10 = lotka_volterra(10.0)
CASES = [
    # problem, solver, dtype, number of steps, smallest mode
    # The neural ODE in float32: every solver at 100, 1,000 and 5,000 steps, then
    # around the boundary between right and wrong.
    (NODE, RH, F32, 100, F),
    (NODE, RH, F32, 1000, F),
    (NODE, RH, F32, 5000, F),
    (NODE, rev(1.0), F32, 100, F),
    (NODE, rev(1.0), F32, 1000, F),
    (NODE, rev(1.0), F32, 5000, F),
    (NODE, rev(), F32, 100, F),
    (NODE, rev(), F32, 1000, F),
    (NODE, rev(), F32, 5000, F),
    (NODE, rev(0.99), F32, 100, F),
    (NODE, rev(0.99), F32, 1000, F),
    (NODE, rev(0.99), F32, 5000, F),
    (NODE, rev(0.9), F32, 100, F),
    (NODE, rev(0.9), F32, 1000, F),
    (NODE, rev(0.9), F32, 5000, F),
    (NODE, rev(base=dfx.Dopri5), F32, 100, F),
    (NODE, rev(base=dfx.Dopri5), F32, 1000, F),
    (NODE, rev(base=dfx.Dopri5), F32, 5000, F),
    (NODE, alf(), F32, 100, F),
    (NODE, alf(), F32, 1000, F),
    (NODE, alf(), F32, 5000, F),
    (NODE, alf(0.9), F32, 100, Q),
    (NODE, alf(0.9), F32, 1000, F),
    (NODE, alf(0.9), F32, 5000, F),
    (NODE, alf(0.75), F32, 100, Q),
    (NODE, alf(0.75), F32, 1000, F),
    (NODE, alf(0.75), F32, 5000, F),
    (NODE, alf(0.9), F32, 30, Q),
    (NODE, alf(0.9), F32, 50, Q),
    (NODE, alf(0.75), F32, 10, Q),
    (NODE, alf(0.75), F32, 20, Q),
    (NODE, rev(0.9), F32, 50, F),
    (NODE, rev(0.99), F32, 300, F),
    (NODE, rev(0.99), F32, 500, F),
    # The neural ODE in float64.
    (NODE, RH, F64, 5000, F),
    (NODE, rev(), F64, 5000, F),
    (NODE, alf(), F64, 5000, F),
    (NODE, rev(0.99), F64, 1000, F),
    (NODE, rev(0.99), F64, 3000, F),
    (NODE, rev(0.9), F64, 100, F),
    (NODE, rev(0.9), F64, 300, F),
    (NODE, alf(0.9), F64, 100, F),
    (NODE, alf(0.9), F64, 150, F),
    (NODE, alf(0.9), F64, 200, F),
    (NODE, alf(0.75), F64, 40, F),
    (NODE, alf(0.75), F64, 100, F),
    # Lotka-Volterra (periodic orbits of every size), 1,400 steps over [0, T].
    (lotka_volterra(14, (3, 2)), alf(), F32, 1400, Q),
    (lotka_volterra(14, (4, 0.3)), alf(), F32, 1400, Q),
    (lotka_volterra(35, (2, 1)), alf(), F32, 1400, Q),
    (lotka_volterra(35, (3, 2)), alf(), F32, 1400, Q),
    (lotka_volterra(140, (1, 1)), alf(), F32, 1400, Q),
    (lotka_volterra(560, (0.5, 0.5)), alf(), F32, 1400, Q),
    (lotka_volterra(1120, (1.2, 0.6)), alf(), F32, 1400, Q),
    (lotka_volterra(7, (3, 2)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(10, (2, 1)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(14, (2, 1)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(20, (2, 1)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(14, (3, 2)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(35, (2, 1)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(140, (1, 1)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(1120, (1, 1)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(1120, (0.5, 0.5)), rev(base=dfx.Dopri5), F32, 1400, Q),
    (lotka_volterra(7, (4, 0.3)), rev(), F32, 1400, Q),
    (lotka_volterra(14, (2, 1)), rev(), F32, 1400, Q),
    (lotka_volterra(14, (3, 2)), rev(), F32, 1400, Q),
    (lotka_volterra(140, (1, 1)), rev(), F32, 1400, Q),
    (lotka_volterra(1120, (0.5, 0.5)), rev(), F32, 1400, Q),
    (lotka_volterra(35, (2, 1)), alf(), F64, 1400, F),
    (lotka_volterra(14, (3, 2)), rev(base=dfx.Dopri5), F64, 1400, F),
    # States of size 1e-7 (Lotka-Volterra on [0, 10], the neural ODE), with
    # unscaled twins.
    (tiny(LV10), alf(0.7), F64, 30, Q),
    (tiny(LV10), alf(0.7), F64, 36, Q),
    (tiny(LV10), alf(0.7), F64, 42, Q),
    (tiny(LV10), rev(0.5), F64, 40, Q),
    (tiny(LV10), rev(0.5), F64, 50, Q),
    (tiny(LV10), alf(), F64, 1400, F),
    (LV10, alf(0.7), F64, 42, F),
    (LV10, rev(0.5), F64, 50, F),
    (tiny(LV10), rev(0.5), F32, 15, F),
    (tiny(LV10), rev(0.5), F32, 20, F),
    (tiny(LV10), alf(), F32, 1400, F),
    (tiny(NODE), alf(0.75), F64, 100, F),
    (tiny(NODE), alf(), F64, 1000, F),
    # Sizes 1 and 1e-7 in one array, reversible Heun over 2,000 steps, with
    # unscaled twins.
    (mixed(0.5), RH, F64, 2000, Q),
    (mixed(0.6), RH, F64, 2000, Q),
    (mixed(0.75), RH, F64, 2000, Q),
    (mixed(1.0), RH, F64, 2000, Q),
    (mixed(0.3), RH, F32, 2000, Q),
    (mixed(0.35), RH, F32, 2000, Q),
    (mixed(0.4), RH, F32, 2000, Q),
    (mixed(0.6, 1.0), RH, F64, 2000, F),
    (mixed(0.35, 1.0), RH, F32, 2000, F),
    # Reversible Heun on dissipative problems (its backward step is unstable there).
    (decay(20), RH, F64, 1500, T),
    (decay(22.5), RH, F64, 1500, T),
    (decay(25), RH, F64, 1500, T),
    (decay(30), RH, F64, 1500, Q),
    (decay(8), RH, F32, 700, F),
    (decay(10), RH, F32, 700, F),
    (decay(12), RH, F32, 700, F),
    (decay(14), RH, F32, 700, F),
    (decay(16), RH, F32, 700, F),
    (damped_oscillator(200), RH, F64, 3000, F),
    (damped_oscillator(250), RH, F64, 3000, F),
    (damped_oscillator(300), RH, F64, 3000, F),
    (damped_oscillator(60), RH, F32, 1500, Q),
    (damped_oscillator(100), RH, F32, 1500, Q),
    (damped_oscillator(150), RH, F32, 1500, Q),
]
MODES = {T: (T,), Q: (T, Q), F: (T, Q, F)}


# ------------------------------------------------------------------- computations
def cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def solve(problem_fns, solver, x, t1, num_steps, adjoint, max_steps, saveat):
    vf, _ = problem_fns
    params, y0 = x
    return dfx.diffeqsolve(
        dfx.ODETerm(vf),
        solver,
        jnp.zeros_like(t1),
        t1,
        t1 / num_steps,
        y0,
        args=params,
        adjoint=adjoint,
        saveat=saveat,
        max_steps=max_steps,
        # NaN instead of an error where the gradient is refused.
        throw=False,
    )


ADJOINTS = {
    "unchecked": lambda: dxe.ReversibleAdjoint(reconstruction_tol=None),
    "checked": lambda: dxe.ReversibleAdjoint(),
    "exact": lambda: dfx.RecursiveCheckpointAdjoint(),
}


@ft.cache
def gradient(problem_fns, solver, adjoint, max_steps):
    """The compiled gradient of the loss with respect to (params, y0), for any number
    of steps up to `max_steps` (one compilation serves every case of a problem family,
    solver and dtype)."""
    _, loss_fn = problem_fns

    @jax.jit
    def grad(x, t1, num_steps):
        def loss(x):
            adjoint_ = ADJOINTS[adjoint]()
            saveat = dfx.SaveAt(t1=True)
            sol = solve(
                problem_fns, solver, x, t1, num_steps, adjoint_, max_steps, saveat
            )
            assert sol.ys is not None
            return loss_fn(sol.ys[-1])

        return jax.grad(loss)(x)

    return grad


def check_metric(solver, terms, ts, steps, y0, args, y_final, state_final):
    """The check's metric as `ReversibleAdjoint`'s backward pass computes it: the
    solver's backward steps from the final state of a forward solve (accepted steps
    at `ts[0], ..., ts[steps]`) back to the start, then the errors of the rebuilt `y0`
    and of the rebuilt `solver.reconstructed_state`. Returns those two errors and the
    rebuilt `y0`."""
    kept = solver.reconstructed_state
    state0 = solver.init(terms, ts[0], ts[1], y0, args)

    def backward(k, carry):
        i = steps - 1 - k
        y, state = carry
        y, _, state, _, _ = solver.backward_step_vjp(
            terms, ts[i], ts[i + 1], y, args, state, False, False, None, None
        )
        return y, state

    y_rebuilt, state_rebuilt = lax.fori_loop(0, steps, backward, (y_final, state_final))
    y_error = reconstruction_error(
        y0, y_rebuilt, reconstruction_scale(y0, y_final, FLOOR_POWER)
    )
    state_scale = reconstruction_scale(
        kept(state0), kept(state_final), STATE_FLOOR_POWER
    )
    state_error = reconstruction_error(kept(state0), kept(state_rebuilt), state_scale)
    return y_error, state_error, y_rebuilt


@ft.cache
def reconstruction(problem_fns, solver, max_steps):
    """The forward solve and the backward steps of `ReversibleAdjoint`, with the
    check's metric as its backward pass computes it."""
    vf, _ = problem_fns

    @jax.jit
    def run(x, t1, num_steps):
        params, y0 = x
        saveat = dfx.SaveAt(steps=True, solver_state=True)
        adjoint = dfx.RecursiveCheckpointAdjoint()
        sol = solve(problem_fns, solver, x, t1, num_steps, adjoint, max_steps, saveat)
        assert sol.ts is not None and sol.ys is not None
        steps = sol.stats["num_steps"]
        ts = jnp.concatenate([jnp.zeros_like(t1)[None], sol.ts])
        y_final = sol.ys[steps - 1]
        y_error, state_error, y_rebuilt = check_metric(
            solver, dfx.ODETerm(vf), ts, steps, y0, params, y_final, sol.solver_state
        )
        return steps, y_error, state_error, y_rebuilt, y_final

    return run


def relative_error(reference, other) -> float:
    """Max over leaves of max|other - reference| / max|reference|, in float64; inf
    where not finite."""
    errors = []
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        with np.errstate(all="ignore"):
            errors.append(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    error = float(max(errors))
    return error if math.isfinite(error) else math.inf


def old_metric(y0, y_rebuilt, y_final) -> float:
    """The previous check: max|y0 - y0_rebuilt| / max(1, max|y0|, max|y_N|)."""
    y0, y_rebuilt, y_final = (
        np.asarray(a, np.float64) for a in (y0, y_rebuilt, y_final)
    )
    with np.errstate(all="ignore"):
        error = np.max(np.abs(y0 - y_rebuilt)) / max(
            1.0, np.max(np.abs(y0)), np.max(np.abs(y_final))
        )
    return float(error) if np.isfinite(error) else math.inf


def passes(metric: float, tol: float) -> bool:
    """A check's verdict, compared in float32 as the package compares (NaN fails)."""
    return bool(np.float32(metric) <= np.float32(tol))


def gradient_kind(error: float) -> str:
    if error <= RIGHT:
        return "right"
    return "wrong" if error > WRONG else "in between"


def measure(number, case, max_steps) -> dict:
    problem, solver, dtype, num_steps, _ = case
    start = time.perf_counter()
    fns = (problem.vf, problem.loss)
    x = cast((problem.params, problem.y0), dtype)
    t1, n = jnp.asarray(problem.t1, dtype), jnp.asarray(num_steps, dtype)

    steps, y_error, state_error, y_rebuilt, y_final = reconstruction(
        fns, solver, max_steps
    )(x, t1, n)
    assert int(steps) == num_steps, (number, int(steps), num_steps)
    unchecked = gradient(fns, solver, "unchecked", max_steps)(x, t1, n)
    checked = gradient(fns, solver, "checked", max_steps)(x, t1, n)
    exact = gradient(fns, solver, "exact", max_steps)(x, t1, n)
    rcp32_error = None
    if dtype == F32:
        x64, t1_64 = cast(x, F64), jnp.asarray(t1, F64)
        exact64 = gradient(fns, solver, "exact", max_steps)(x64, t1_64, cast(n, F64))
        rcp32_error = relative_error(exact64, exact)

    metric = float(max(y_error, state_error))
    metric = metric if math.isfinite(metric) else math.inf
    old = old_metric(x[1], y_rebuilt, y_final)
    grad_error = relative_error(exact, unchecked)
    refuses = any(bool(jnp.any(jnp.isnan(g))) for g in jax.tree.leaves(checked))
    row = dict(
        number=number,
        problem=problem.name,
        solver=solver_name(solver),
        dtype=jnp.dtype(dtype).name,
        steps=num_steps,
        grad_error=grad_error,
        rcp32_error=rcp32_error,
        gradient=gradient_kind(grad_error),
        metric_y=float(y_error),
        metric_state=float(state_error),
        metric=metric,
        passes=passes(metric, RECONSTRUCTION_TOL),
        adjoint_refuses=refuses,
        old_metric=old,
        old_passes=passes(old, OLD_TOL),
        seconds=round(time.perf_counter() - start, 2),
    )
    row["agrees"] = row["passes"] != refuses
    log(**row)
    return row


# ------------------------------------------------------------------------ summary
def misses_and_false_alarms(rows, metric, tol):
    misses = [r for r in rows if r["gradient"] == "wrong" and passes(r[metric], tol)]
    alarms = [
        r for r in rows if r["gradient"] == "right" and not passes(r[metric], tol)
    ]
    return misses, alarms


def numbers(rows) -> list[int]:
    return [r["number"] for r in rows]


def summarise(rows) -> dict:
    kinds = [r["gradient"] for r in rows]
    out: dict[str, Any] = dict(
        cases=len(rows),
        right=kinds.count("right"),
        wrong=kinds.count("wrong"),
        in_between=kinds.count("in between"),
        disagreements=numbers(r for r in rows if not r["agrees"]),
    )
    for check, metric, tol in (
        ("default", "metric", RECONSTRUCTION_TOL),
        ("previous", "old_metric", OLD_TOL),
    ):
        misses, alarms = misses_and_false_alarms(rows, metric, tol)
        out[check] = dict(
            tolerance=tol, misses=numbers(misses), false_alarms=numbers(alarms)
        )
    out["sweep"] = []
    for tol in SWEEP:
        misses, alarms = misses_and_false_alarms(rows, "metric", tol)
        old_misses, old_alarms = misses_and_false_alarms(rows, "old_metric", tol)
        out["sweep"].append(
            dict(
                tolerance=tol,
                misses=len(misses),
                false_alarms=len(alarms),
                old_misses=len(old_misses),
                old_false_alarms=len(old_alarms),
            )
        )
    return out


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" if math.isfinite(value) else "inf"


def verdict(ok: bool) -> str:
    return "passes" if ok else "refuses"


def markdown(rows, summary, info, seconds) -> str:
    by_number = {r["number"]: r for r in rows}
    power = fractions.Fraction(FLOOR_POWER).limit_denominator(10)
    intro = (
        f"{describe(info)} {summary['cases']} cases, fixed steps; the run took "
        f"{seconds / 60:.1f} min. Gradient error: max over leaves (parameters and "
        "`y0`) of max|g - g_ref| / max|g_ref| of `ReversibleAdjoint"
        "(reconstruction_tol=None)` against `RecursiveCheckpointAdjoint` with the same "
        f"solver, dtype and steps; right if at most {sci(RIGHT)} "
        f"({summary['right']} cases), wrong if above {sci(WRONG)} or not finite "
        f"({summary['wrong']}), neither in between ({summary['in_between']}). The "
        "default check refuses when the larger relative error of the rebuilt `y0` "
        f"(elements floored at eps^({power}) of their array's largest) and solver "
        f"state (against its array's largest) exceeds {sci(RECONSTRUCTION_TOL)}; the "
        "previous check when max|y0 - y0_rebuilt| / max(1, max|y0|, max|y_N|) exceeds "
        f"{sci(OLD_TOL)}. A miss: a wrong gradient passed; a false alarm: a right one "
        "refused."
    )
    disagreements = summary["disagreements"]
    if disagreements:
        agreement = (
            "The adjoint's own verdict (NaN from `jax.grad` through "
            "`ReversibleAdjoint()`) disagreed with the computed metric in cases "
            + ", ".join(f"#{n}" for n in disagreements)
            + "."
        )
    else:
        agreement = (
            "The adjoint's own verdict (NaN from `jax.grad` through "
            "`ReversibleAdjoint()`) agreed with the computed metric in every case."
        )
    counts = []
    listed = []
    for check, label in (("default", "default"), ("previous", "previous")):
        s = summary[check]
        counts.append(
            [
                label,
                sci(s["tolerance"]),
                f"{len(s['misses'])} of {summary['wrong']}",
                f"{len(s['false_alarms'])} of {summary['right']}",
            ]
        )
        metric = "metric" if check == "default" else "old_metric"
        for kind, key in (("miss", "misses"), ("false alarm", "false_alarms")):
            for n in s[key]:
                r = by_number[n]
                listed.append(
                    [
                        label,
                        kind,
                        n,
                        r["problem"],
                        r["solver"],
                        r["dtype"],
                        r["steps"],
                        fmt(r["grad_error"]),
                        fmt(r[metric]),
                    ]
                )
    counts_header = ["check", "tolerance:", "misses:", "false alarms:"]
    listed_header = [
        "check",
        "",
        "#:",
        "problem",
        "solver",
        "dtype",
        "N:",
        "gradient error:",
        "check's metric:",
    ]
    sweep_text = (
        "Tolerance sweep: misses and false alarms of each metric at each tolerance "
        "(the default's metric with its floors; the previous metric)."
    )
    sweep = [
        [
            sci(s["tolerance"]),
            s["misses"],
            s["false_alarms"],
            s["misses"] + s["false_alarms"],
            s["old_misses"],
            s["old_false_alarms"],
        ]
        for s in summary["sweep"]
    ]
    sweep_header = [
        "tolerance:",
        "misses:",
        "false alarms:",
        "both:",
        "previous metric: misses:",
        "previous metric: false alarms:",
    ]
    every_text = (
        "Every case. `RCP float32`: the error of the exact float32 gradient "
        "(`RecursiveCheckpointAdjoint`) against float64, the rounding any float32 "
        "gradient has. `y`, `state`: the default check's relative errors of the "
        "rebuilt `y0` and solver state; `default`, `previous`: each check's verdict."
    )
    every = [
        [
            r["number"],
            r["problem"],
            r["solver"],
            r["dtype"],
            r["steps"],
            fmt(r["grad_error"]),
            fmt(r["rcp32_error"]),
            r["gradient"],
            fmt(r["metric_y"]),
            fmt(r["metric_state"]),
            verdict(r["passes"]),
            fmt(r["old_metric"]),
            verdict(r["old_passes"]),
        ]
        for r in rows
    ]
    every_header = [
        "#:",
        "problem",
        "solver",
        "dtype",
        "N:",
        "gradient error:",
        "RCP float32:",
        "gradient",
        "y:",
        "state:",
        "default",
        "previous metric:",
        "previous",
    ]
    return (
        intro
        + " "
        + agreement
        + "\n\n"
        + markdown_table(counts_header, counts)
        + "\n"
        + markdown_table(listed_header, listed)
        + "\n"
        + sweep_text
        + "\n\n"
        + markdown_table(sweep_header, sweep)
        + "\n"
        + every_text
        + "\n\n"
        + markdown_table(every_header, every)
    )


def main():
    args = parse_args(__doc__, repeats=1)
    start = time.perf_counter()
    info = machine()
    chosen = [
        (number, case)
        for number, case in enumerate(CASES, 1)
        if case[-1] in MODES[args.mode]
    ]
    # One compilation per problem family, solver and dtype, for its largest N.
    max_steps: dict = {}
    for _, (problem, solver, dtype, num_steps, _) in chosen:
        key = (problem.vf, solver, dtype)
        max_steps[key] = max(max_steps.get(key, 0), num_steps)
    rows = [
        measure(number, case, max_steps[case[0].vf, case[1], case[2]])
        for number, case in chosen
    ]
    summary = summarise(rows)
    seconds = time.perf_counter() - start
    payload = dict(machine=info, seconds=seconds, summary=summary, rows=rows)
    save("reconstruction_check", args, payload, markdown(rows, summary, info, seconds))
    if summary["disagreements"]:
        raise SystemExit(
            "the adjoint's verdict disagrees with the computed metric in cases "
            f"{summary['disagreements']}"
        )


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Reconstruction check: the wrong gradients it refuses, and the right ones"


def headline(data) -> list[dict]:
    # Its own table: diffrax has no such check to compare with.
    return []


def chart(data, path) -> None:
    sweep = data["summary"]["sweep"]
    labels = [f"tolerance {s['tolerance']:g}" for s in sweep]
    series = {
        "misses": [s["misses"] for s in sweep],
        "false alarms": [s["false_alarms"] for s in sweep],
        "previous check: misses": [s["old_misses"] for s in sweep],
        "previous check: false alarms": [s["old_false_alarms"] for s in sweep],
    }
    bar_chart(path, TITLE, labels, series, "cases")


if __name__ == "__main__":
    main()
