"""The private behaviours of diffrax that the package relies on (listed in the
docstring of `diffrax_extras/_diffrax_internals.py`): if an upgrade of diffrax
changes one, this fails here, loudly, rather than as a wrong gradient elsewhere."""

from typing import Any

import diffrax as dfx
import jax.numpy as jnp
import numpy as np

import diffrax_extras as dxe
from diffrax_extras._adjoint.step_record import loop_and_record_steps
from diffrax_extras._diffrax_internals import CallableToPath, State, WrapTerm


def _solve(**kwargs: Any):
    options: dict[str, Any] = dict(
        terms=dfx.ODETerm(lambda t, y, args: -y + jnp.sin(5 * t)),
        solver=dfx.Heun(),
        t0=0.0,
        t1=1.0,
        dt0=0.05,
        y0=jnp.array([1.0]),
        stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
    )
    return dfx.diffeqsolve(**(options | kwargs))


def _recorded(max_jumps=0, **kwargs):
    """A solve whose adjoint runs diffrax's loop through the step recorder."""
    records = []

    class Recording(dfx.RecursiveCheckpointAdjoint):
        def loop(self, *, max_steps, **kwargs):
            for name in ("throw", "passed_solver_state", "passed_controller_state"):
                del kwargs[name]
            final_state, aux, record = loop_and_record_steps(
                self._loop, max_steps=max_steps, max_jumps=max_jumps, **kwargs
            )
            assert isinstance(final_state, State)
            records.append(final_state.made_jump)
            # Out of `diffeqsolve`'s `jit` through its statistics.
            return final_state, dict(aux, record=record)

    sol = _solve(adjoint=Recording(), **kwargs)
    (made_jump,) = records
    return sol, sol.stats["record"], made_jump


def test_loop_runs_one_outer_while_loop_and_its_steps_are_recorded():
    # The recorder's own asserts check one call of the outer loop; its step ends are
    # the accepted steps' ends, which diffrax saves (at the next step's start) with
    # SaveAt(steps=True); and without jump_ts `made_jump` is a Python bool.
    sol, record, made_jump = _recorded(saveat=dfx.SaveAt(steps=True))
    n = int(record.num_steps)
    assert sol.ts is not None
    assert n == int(sol.stats["num_accepted_steps"])
    np.testing.assert_array_equal(np.asarray(record.tnext[:n]), sol.ts[:n])
    assert made_jump is False


def test_saved_outputs_are_written_in_the_order_assumed():
    # t0, then per accepted step the ts it reached and then the every-steps-th output
    # (at the next step's start), and t1 last unless the steps outputs end with it.
    ts = jnp.array([0.1, 0.35, 0.5, 0.9])
    sol = _solve(saveat=dfx.SaveAt(t0=True, ts=ts, steps=2, t1=True))
    steps = _solve(saveat=dfx.SaveAt(steps=True))
    assert sol.ts is not None and steps.ts is not None
    n = int(steps.stats["num_accepted_steps"])
    step_ends = np.asarray(steps.ts[:n])
    expected = [0.0]
    for i, end in enumerate(step_ends):
        before = step_ends[i - 1] if i else -np.inf
        expected += [float(t) for t in ts if before < t <= end]
        if (i + 1) % 2 == 0:
            expected.append(float(end))
    if n % 2 != 0:
        expected.append(1.0)
    got = np.asarray(sol.ts)
    got = got[np.isfinite(got)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_the_step_after_a_jump_starts_just_after_it():
    controller = dfx.ClipStepSizeController(
        dfx.PIDController(rtol=1e-4, atol=1e-6), jump_ts=jnp.array([0.5])
    )
    _, record, _ = _recorded(max_jumps=1, stepsize_controller=controller)
    assert record.jump_tprev is not None
    n = int(record.num_steps)
    ends = np.asarray(record.tnext[:n])
    (i,) = np.nonzero(np.asarray(record.made_jump[:n]))[0]
    assert ends[i - 1] in (0.5, np.nextafter(0.5, 0.0))
    start = float(record.jump_tprev[0])
    assert start == np.nextafter(0.5, 1.0)
    # Two floats before the start is before the jump, as AsynchronousLeapfrog's
    # shift of v at a jump assumes.
    assert np.nextafter(np.nextafter(start, 0.0), 0.0) < 0.5


def test_terms_saveat_and_controls_are_wrapped_as_assumed():
    seen = []

    class Spy(dfx.RecursiveCheckpointAdjoint):
        def loop(self, *, terms, saveat, **kwargs):
            seen.append((terms, saveat))
            return super().loop(terms=terms, saveat=saveat, **kwargs)

    control = lambda t0, t1: jnp.stack([t1 - t0])
    term = dfx.ControlTerm(lambda t, y, args: jnp.ones((1, 1)), control)
    _solve(terms=term, adjoint=Spy(), stepsize_controller=dfx.ConstantStepSize())
    ((terms, saveat),) = seen
    assert isinstance(terms, WrapTerm)
    assert isinstance(terms.term, dfx.ControlTerm)
    assert isinstance(terms.term.control, CallableToPath)
    assert terms.term.control.fn is control
    assert callable(saveat.subs.fn)


def test_isinstance_sees_through_wrapped_solvers():
    assert isinstance(dxe.Reversible(dfx.Kvaerno5()), dfx.AbstractImplicitSolver)
    assert isinstance(
        dfx.HalfSolver(dxe.ReversibleHeun()), dxe.AbstractReversibleSolver
    )
