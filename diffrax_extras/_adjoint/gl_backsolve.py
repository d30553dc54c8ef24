"""The backward solve of `GaussLegendreAdjoint`: the state and its adjoint from the
last saved time back to `t0`, in one loop over accepted steps, with the parameter
gradient integrated chunk by chunk from the steps' dense output.

It is written on diffrax's public solver and step-size-controller interfaces
(`init`, `step`, `adapt_step_size`) rather than as a `diffrax.diffeqsolve` per interval
between saved times, for three reasons. Memory: only the current chunk of steps is
kept, whatever `max_steps` is, where `SaveAt(dense=True)` would hold `max_steps` steps.
Stops: the loop stops at every saved time, jump, knot and grid time without restarting
the step-size controller. Batching: the batched vector-Jacobian product of a chunk runs
after a fixed number of accepted steps, so that under `jax.vmap` all members compute it
together rather than every member computing every member's.

The loop runs in the backward time `s = -t`, so that solvers and controllers see time
increasing.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import (
    AbstractAdaptiveStepSizeController,
    AbstractSolver,
    AbstractTerm,
    RESULTS,
)
from jaxtyping import Array, Bool, Int, PyTree, Real

from .._misc import is_none, tree_add
from .gl_quadrature import Chunk, chunk_integral, GaussRule, Integrand
from .gl_stops import Stops


class BackwardSolve(eqx.Module):
    """How to take the backward steps: a solver and either an adaptive controller or a
    fixed step (`step`, cut down so that it divides each interval between stops
    evenly; `inf` takes one step per interval)."""

    solver: AbstractSolver
    controller: AbstractAdaptiveStepSizeController | None
    dt0: Any
    step: Any
    max_steps: int | None = eqx.field(static=True)


class Quadrature(eqx.Module):
    rule: GaussRule
    chunk_size: int = eqx.field(static=True)
    max_refinements: int = eqx.field(static=True)
    # Python floats, or arrays when taken from a controller that holds arrays.
    rtol: Any
    atol: Any


class Outcome(eqx.Module):
    """What the backward solve returns."""

    adjoint: PyTree  # a(t0), the cotangent of y0
    value: PyTree  # the parameter gradient
    accurate: Bool[Array, ""]  # whether every chunk's error estimate met tolerance
    refinements: Int[Array, ""]  # the most halvings any chunk needed
    num_steps: Int[Array, ""]
    result: RESULTS


class _Stepper(eqx.Module):
    """The loop state that changes every step (all of it small)."""

    s: Real[Array, ""]
    z: PyTree
    solver_state: PyTree
    controller_state: PyTree
    dt: Real[Array, ""]
    made_jump: Bool[Array, ""]
    stop: Int[Array, ""]  # the next stop to reach
    t_mid: Real[Array, ""]  # the middle of the current interval between stops (t)
    chunk: Chunk
    num_steps: Int[Array, ""]
    result: RESULTS


class _Totals(eqx.Module):
    """What the quadrature has added up so far: parameter-sized, so kept out of the
    loops over steps."""

    value: PyTree
    accurate: Bool[Array, ""]
    refinements: Int[Array, ""]


def solve_backward(
    *,
    term: AbstractTerm,
    args_of: Callable[[Array], PyTree],
    stops: Stops,
    save_ys: PyTree,
    grad_ys: PyTree,
    backward: BackwardSolve,
    quadrature: Quadrature,
    integrand: Integrand,
    result: RESULTS,
) -> Outcome:
    """Solves `(y, a)` backwards through `stops`, integrating the parameter gradient.

    `term` is the backward vector field in `s`; `args_of(t_mid)` its `args` on the
    interval between stops whose middle (in forward time) is `t_mid`, which tells a
    control's derivative which side of a knot to take. At each stop with a saved
    output, `y` is reset to it and `a` jumps by the loss's gradient there. `result` is
    the forward solve's: a failed forward solve is not solved backwards.
    """
    solver = backward.solver
    num_stops = len(stops)
    adaptive = backward.controller is not None

    def arrive(st: _Stepper) -> _Stepper:
        """Acts on every stop at or below the current time."""

        def cond(carry):
            _, _, stop = carry
            return (stop < num_stops) & (stops.at(stop) <= st.s)

        def body(carry):
            (y, a), made_jump, i = carry
            k = stops.save[i]
            is_save = k >= 0
            k = jnp.maximum(k, 0)
            y = jtu.tree_map(lambda ys, x: jnp.where(is_save, ys[k], x), save_ys, y)
            a = jtu.tree_map(
                lambda g, x: x + jnp.where(is_save, g[k], jnp.zeros_like(x)),
                grad_ys,
                a,
            )
            return (y, a), made_jump | stops.restart[i], i + 1

        z, made_jump, stop = lax.while_loop(cond, body, (st.z, st.made_jump, st.stop))
        arrived = stop != st.stop
        upper = stops.at(stop)
        t_mid = jnp.where(arrived, -(st.s + upper) / 2, st.t_mid)
        dt = st.dt
        if not adaptive:
            length = upper - st.s
            pieces = jnp.maximum(jnp.ceil(length / backward.step), 1)
            dt = jnp.where(arrived, length / pieces, dt)
        return eqx.tree_at(
            lambda x: (x.z, x.made_jump, x.stop, x.t_mid, x.dt),
            st,
            (z, made_jump, stop, t_mid, dt),
        )

    def running(st: _Stepper) -> Bool[Array, ""]:
        out = (st.stop < num_stops) & (st.result == RESULTS.successful)
        if backward.max_steps is not None:
            out = out & (st.num_steps < backward.max_steps)
        return out

    def attempt(st: _Stepper) -> _Stepper:
        """One step from `st.s`, clipped to the next stop."""
        target = stops.at(st.stop)
        s_try = st.s + st.dt
        if adaptive:
            floor = stops.floor[jnp.minimum(st.stop, num_stops - 1)]
            s_try = jnp.where(s_try >= floor, target, s_try)
        else:
            s_try = jnp.where(s_try > target - st.dt / 2, target, s_try)
        s_try = jnp.minimum(s_try, target)
        args = args_of(st.t_mid)
        z1, z_error, dense_info, solver_state, solver_result = solver.step(
            term, st.s, s_try, st.z, args, st.solver_state, st.made_jump
        )
        if adaptive:
            assert backward.controller is not None
            # As diffrax's loop: a NaN error estimate (e.g. the vector field left its
            # domain) rejects the step.
            z_error = jtu.tree_map(
                lambda x: jnp.where(jnp.isnan(x), jnp.inf, x), z_error
            )
            keep, next_t0, next_t1, _, controller_state, controller_result = (
                backward.controller.adapt_step_size(
                    st.s,
                    s_try,
                    st.z,
                    z1,
                    args,
                    z_error,
                    # `None` for a solver of no known order, as diffrax's own loop
                    # passes it: the controller then raises, naming the fix.
                    solver.error_order(term),  # pyright: ignore[reportArgumentType]
                    st.controller_state,
                )
            )
            keep = jnp.asarray(keep)
            dt = next_t1 - next_t0
            # A step cut short by a stop says little about the step size after it.
            clipped = s_try < st.s + st.dt
            dt = jnp.where(keep & clipped, jnp.maximum(dt, st.dt), dt)
        else:
            keep = jnp.array(True)
            controller_state = st.controller_state
            controller_result = RESULTS.successful
            dt = st.dt

        def select(new, old):
            return jtu.tree_map(lambda x, y: jnp.where(keep, x, y), new, old)

        solver_result = RESULTS.where(keep, solver_result, RESULTS.successful)
        step_result = RESULTS.where(
            solver_result == RESULTS.successful, controller_result, solver_result
        )
        new = _Stepper(
            s=jnp.where(keep, s_try, st.s),
            z=select(z1, st.z),
            solver_state=select(solver_state, st.solver_state),
            controller_state=controller_state,
            dt=dt,
            made_jump=jnp.where(keep, False, st.made_jump),
            stop=st.stop,
            t_mid=st.t_mid,
            chunk=st.chunk.add(st.s, s_try, dense_info, keep),
            num_steps=st.num_steps + 1,
            result=RESULTS.where(
                st.result == RESULTS.successful, step_result, st.result
            ),
        )
        return arrive(new)

    def chunk_of_steps(carry: tuple[_Stepper, _Totals]) -> tuple[_Stepper, _Totals]:
        st, totals = carry

        def cond(_st):
            return running(_st) & (_st.chunk.count < _st.chunk.size)

        st = lax.while_loop(cond, attempt, st)
        value, converged, level = chunk_integral(
            st.chunk,
            rule=quadrature.rule,
            integrand=integrand,
            interpolation_cls=solver.interpolation_cls,
            fill_s=st.s,
            fill_z=st.z,
            rtol=quadrature.rtol,
            atol=quadrature.atol,
            total_length=stops.s[-1] - stops.s[0],
            max_refinements=quadrature.max_refinements,
        )
        totals = _Totals(
            value=tree_add(totals.value, value),
            accurate=totals.accurate & converged,
            refinements=jnp.maximum(totals.refinements, level),
        )
        st = eqx.tree_at(lambda x: x.chunk, st, st.chunk.clear())
        return st, totals

    st = _initial_stepper(
        term=term,
        args_of=args_of,
        stops=stops,
        save_ys=save_ys,
        backward=backward,
        quadrature=quadrature,
        result=result,
    )
    st = arrive(st)
    st = _start(st, term=term, args_of=args_of, stops=stops, backward=backward)
    totals = _Totals(
        value=integrand.zeros,
        accurate=jnp.array(True),
        refinements=jnp.array(0, jnp.int32),
    )
    st, totals = lax.while_loop(
        lambda carry: running(carry[0]), chunk_of_steps, (st, totals)
    )
    out_of_steps = (st.stop < num_stops) & (st.result == RESULTS.successful)
    result = RESULTS.where(out_of_steps, RESULTS.max_steps_reached, st.result)
    _, adjoint = st.z
    return Outcome(
        adjoint=adjoint,
        value=totals.value,
        accurate=totals.accurate,
        refinements=totals.refinements,
        num_steps=st.num_steps,
        result=result,
    )


def _initial_stepper(
    *, term, args_of, stops, save_ys, backward, quadrature, result
) -> _Stepper:
    s = stops.s[0]
    y = jtu.tree_map(lambda ys: ys[-1], save_ys)
    z = (y, jtu.tree_map(jnp.zeros_like, y))
    t_mid = -s
    args = args_of(t_mid)
    solver = backward.solver

    # Placeholders of the right structure; `_start` sets them once the stops at the
    # last saved time have set `(y, a)`. (Shapes only: tracing the solver's and the
    # controller's initialisation twice would compile them twice.)
    def structures():
        solver_state = solver.init(term, s, stops.at(1), z, args)
        step = solver.step(term, s, stops.at(1), z, args, solver_state, False)
        controller_state = None
        if backward.controller is not None:
            _, controller_state = backward.controller.init(
                term,
                s,
                stops.at(1),
                z,
                backward.dt0,
                args,
                solver.func,
                solver.error_order(term),
            )
        return solver_state, step[2], controller_state

    def placeholder(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jnp.zeros(x.shape, x.dtype)
        return x

    solver_state, dense_struct, controller_state = jtu.tree_map(
        placeholder, jax.eval_shape(structures)
    )
    return _Stepper(
        s=s,
        z=z,
        solver_state=solver_state,
        controller_state=controller_state,
        dt=jnp.zeros((), s.dtype),
        made_jump=jnp.array(False),
        stop=jnp.array(0, jnp.int32),
        t_mid=t_mid,
        chunk=Chunk.empty(quadrature.chunk_size, s, dense_struct),
        num_steps=jnp.array(0, jnp.int32),
        result=result,
    )


def _start(st: _Stepper, *, term, args_of, stops, backward) -> _Stepper:
    """The solver's and controller's initial states, once the stops at the last saved
    time have set `(y, a)`."""
    solver = backward.solver
    target = stops.at(st.stop)
    args = args_of(st.t_mid)
    # Solvers without state (`Heun`, ...) and some controllers hold `None`, which
    # `tree_at` must be told to replace.
    solver_state = solver.init(term, st.s, target, st.z, args)
    if backward.controller is None:
        return eqx.tree_at(
            lambda x: (x.solver_state, x.made_jump),
            st,
            (solver_state, jnp.array(False)),
            is_leaf=is_none,
        )
    t_first, controller_state = backward.controller.init(
        term,
        st.s,
        target,
        st.z,
        backward.dt0,
        args,
        solver.func,
        solver.error_order(term),
    )
    return eqx.tree_at(
        lambda x: (x.solver_state, x.controller_state, x.dt, x.made_jump),
        st,
        (solver_state, controller_state, t_first - st.s, jnp.array(False)),
        is_leaf=is_none,
    )
