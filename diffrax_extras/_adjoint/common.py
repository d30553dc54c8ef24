"""Checks and input preparation shared by the adjoints of this package."""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractTerm, RESULTS, SaveAt, SubSaveAt

from .._diffrax_internals import (
    CallableToPath,
    error_if,
    nondifferentiable,
    RealScalarLike,
)
from .._misc import is_none


def is_subsaveat(x: Any) -> bool:
    return isinstance(x, SubSaveAt)


def _is_callable_control(x: Any) -> bool:
    # A `ControlTerm` wraps a control given as a function in a path whose `fn` is that
    # function, which may close over arrays like a vector field.
    return isinstance(x, CallableToPath) and not isinstance(x.fn, eqx.Module)


def _has_function_vector_field(x: Any) -> bool:
    # A vector field that is an `equinox.Module` (a model, `ControlTerm.to_ode()`'s
    # wrapper) already holds its arrays as leaves of `terms`, where the adjoints can
    # see them (the quadrature adjoint looks for interpolations to split at their
    # knots); only plain functions can hide closed-over arrays.
    if not isinstance(x, AbstractTerm):
        return False
    vector_field = getattr(x, "vector_field", None)
    return callable(vector_field) and not isinstance(vector_field, eqx.Module)


def closure_convert_terms(terms: Any, t0: Any, y0: Any, args: Any) -> Any:
    """Makes every array that a term's `vector_field` closes over an explicit leaf of
    `terms`.

    The adjoints here are `custom_vjp`s with `terms` among their inputs, and JAX cannot
    differentiate a `custom_vjp` with respect to values it only closes over: a vector
    field written as `lambda t, y, args: model(y)`, with `model` being differentiated,
    would raise a `CustomVJPException` (as it does with `diffrax.BacksolveAdjoint`).
    Converting hoists those values into the term, so that such a gradient is taken as
    with `diffrax.RecursiveCheckpointAdjoint`.
    """

    def convert(term):
        if not _has_function_vector_field(term):
            return term
        fn = eqx.filter_closure_convert(term.vector_field, t0, y0, args)
        return eqx.tree_at(lambda x: x.vector_field, term, fn)

    def convert_control(path):
        if not _is_callable_control(path):
            return path
        fn = eqx.filter_closure_convert(path.fn, t0, t0)
        return eqx.tree_at(lambda x: x.fn, path, fn)

    terms = jtu.tree_map(convert_control, terms, is_leaf=_is_callable_control)
    return jtu.tree_map(convert, terms, is_leaf=_has_function_vector_field)


def closure_convert_saveat(saveat: SaveAt, t0: Any, y0: Any, args: Any) -> SaveAt:
    """Makes every array that a `SubSaveAt.fn` closes over an explicit leaf of
    `saveat`, as `closure_convert_terms` does for vector fields: a trained read-out
    `fn=lambda t, y, args: readout(y)` then gets its gradient. (diffrax itself wraps
    each `fn` in a closure over the time direction.)"""

    def convert(sub):
        if not is_subsaveat(sub):
            return sub
        fn = eqx.filter_closure_convert(sub.fn, t0, y0, args)
        return eqx.tree_at(lambda s: s.fn, sub, fn)

    return jtu.tree_map(convert, saveat, is_leaf=is_subsaveat)


def nan_where(pred: Any, cotangents: Any) -> Any:
    """NaN in every inexact array of `cotangents` where `pred`."""

    def fill(x):
        if eqx.is_inexact_array(x):
            return jnp.where(pred, jnp.nan, x)
        return x

    return jtu.tree_map(fill, cotangents)


def nan_if_failed(result: RESULTS, cotangents: Any) -> Any:
    """NaN cotangents for a solve that did not succeed (`diffeqsolve(..., throw=False)`
    that stopped early or diverged): what the backward pass computed would be the
    gradient of part of a solve, finite and silently wrong."""
    return nan_where(result != RESULTS.successful, cotangents)


def raise_where(pred: Any, msg: str | list[str], index: Any = None) -> Any:
    """`pred`, with an error at run time (`msg`, or `msg[index]`) where it holds.

    The error is attached to the predicate, and the cotangents it guards are then
    filled by `nan_where` with it: `equinox.error_if` passes what it guards through
    a host callback, so guarding the cotangents themselves would keep a second copy
    of each of them (the parameter gradient among them) in the compiled program's
    temporaries (measured: 0.2 MB of 1.0 for a width-128 MLP's gradient).
    """
    if isinstance(msg, str):
        return error_if(pred, pred, msg)
    return eqx.branched_error_if(pred, pred, index, msg)


def nan_or_raise(cotangents: Any, pred: Any, throw: bool, msg: str) -> Any:
    """Where `pred`, the cotangents cannot be trusted: with `throw`, an error with
    `msg` at run time; otherwise NaN in every inexact array, never a plausible
    wrong number."""
    if throw:
        pred = raise_where(pred, msg)
    return nan_where(pred, cotangents)


def _get_subsaveat_ts(saveat: SaveAt) -> list:
    out = [s.ts for s in jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)]
    return [x for x in out if x is not None]


def _no_time_grad(adjoint: str, name: str) -> str:
    return (
        f"`{adjoint}()` cannot differentiate with respect to `{name}`. Wrap it in "
        "`jax.lax.stop_gradient`, or use "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for this gradient."
    )


def nondifferentiable_times(
    adjoint: str, t0: RealScalarLike, t1: RealScalarLike, saveat: SaveAt
) -> tuple[RealScalarLike, RealScalarLike, SaveAt]:
    """Marks `t0`, `t1` and every `SubSaveAt.ts` as not differentiable, so that asking
    for their gradient raises an error naming them instead of a `CustomVJPException`.
    """
    t0 = nondifferentiable(t0, msg=_no_time_grad(adjoint, "t0"))
    t1 = nondifferentiable(t1, msg=_no_time_grad(adjoint, "t1"))
    saveat = eqx.tree_at(
        _get_subsaveat_ts,
        saveat,
        replace_fn=lambda ts: nondifferentiable(
            ts, msg=_no_time_grad(adjoint, "saveat.ts")
        ),
    )
    return t0, t1, saveat


def _not_differentiable(adjoint: str, name: str) -> str:
    return (
        f"`{adjoint}()` cannot differentiate with respect to {name}. Wrap it in "
        "`jax.lax.stop_gradient`, or use "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for this gradient."
    )


def nondifferentiable_settings(
    adjoint: str, solver: Any, stepsize_controller: Any, dt0: Any, init_state: Any
) -> tuple[Any, Any, Any, Any]:
    """Marks the solver's and the step size controller's own arrays, `dt0`, and the
    first step's times as not differentiable, so that asking for their gradient (a
    `jump_ts` that is being trained, say) raises an error naming them, at trace
    time, instead of equinox's "Unexpected tangent" from inside the adjoint."""
    solver = nondifferentiable(
        solver,
        msg=_not_differentiable(
            adjoint, f"the parameters of `solver={type(solver).__name__}(...)`"
        ),
    )
    stepsize_controller = nondifferentiable(
        stepsize_controller,
        msg=_not_differentiable(
            adjoint,
            "the step size controller's parameters (such as `jump_ts`, `step_ts`, "
            "`rtol` and `atol`)",
        ),
    )
    msg = _not_differentiable(adjoint, "`dt0`")
    dt0 = nondifferentiable(dt0, msg=msg)
    init_state = eqx.tree_at(
        lambda s: (s.tprev, s.tnext),
        init_state,
        replace_fn=lambda t: nondifferentiable(t, msg=msg),
    )
    msg = _not_differentiable(
        adjoint,
        "the step size controller's state (`diffeqsolve(..., controller_state=...)`; "
        "the one this adjoint returns is not differentiated, so it can be passed on "
        "as it is)",
    )
    init_state = eqx.tree_at(
        lambda s: s.controller_state,
        init_state,
        replace_fn=lambda c: nondifferentiable(c, msg=msg),
        is_leaf=is_none,
    )
    return solver, stepsize_controller, dt0, init_state


def controller_state_not_differentiated(final_state: Any) -> Any:
    """The final state with its step size controller's state cut off from autodiff.

    These adjoints take the step times as constants (and diffrax's controllers stop
    gradients through their step sizes anyway), so the controller's state carries no
    derivative. Left as an output of the adjoint's `custom_vjp`, JAX would count it
    as depending on every differentiated input, and a solve continued from it with
    `controller_state=` would be refused."""
    return eqx.tree_at(
        lambda s: s.controller_state,
        final_state,
        replace_fn=lax.stop_gradient,
        is_leaf=is_none,
    )


def check_no_event(adjoint: str, event: Any, why: str) -> None:
    if event is not None:
        raise NotImplementedError(
            f"`{adjoint}()` does not support events (`diffeqsolve(..., event=...)`): "
            f"{why} Use `adjoint=diffrax.RecursiveCheckpointAdjoint()` instead."
        )


def check_no_dense(adjoint: str, saveat: SaveAt, why: str) -> None:
    if saveat.dense:
        raise NotImplementedError(
            f"`{adjoint}()` does not support `SaveAt(dense=True)`: {why} Save at the "
            "times you need with `SaveAt(ts=...)`, or use "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


def prepare_differentiated_inputs(
    adjoint: str,
    *,
    t0: RealScalarLike,
    t1: RealScalarLike,
    saveat: SaveAt,
    solver: Any,
    stepsize_controller: Any,
    dt0: Any,
    init_state: Any,
    terms: Any,
    args: Any,
) -> tuple[Any, ...]:
    """What both adjoints do to `diffeqsolve`'s inputs before their `custom_vjp`: the
    times and the solver's and controller's settings are marked not differentiable
    (asking for their gradient raises an error naming them), and arrays that the
    vector fields close over become leaves of `terms` (so they get gradients).

    Returns `(t0, t1, saveat, solver, stepsize_controller, dt0, init_state, terms)`.
    """
    t0, t1, saveat = nondifferentiable_times(adjoint, t0, t1, saveat)
    solver, stepsize_controller, dt0, init_state = nondifferentiable_settings(
        adjoint, solver, stepsize_controller, dt0, init_state
    )
    terms = closure_convert_terms(terms, t0, init_state.y, args)
    return t0, t1, saveat, solver, stepsize_controller, dt0, init_state, terms


class _Hole:
    """Where a differentiated part of diffrax's loop state was taken out."""


def take_out(init_state: Any, parts: Any) -> tuple[tuple, Any]:
    """`(parts(init_state), init_state with those parts replaced by holes)`, for
    `parts` a function returning a tuple of parts of the state.

    A `custom_vjp` differentiates its explicit inputs only, so the parts of
    diffrax's initial loop state that carry gradients (`y`, and for a solve that
    continues from `sol.solver_state`, the solver state) travel as inputs and are put
    back with `put_back` inside it."""
    values = parts(init_state)
    holes = tuple(_Hole() for _ in values)
    return values, eqx.tree_at(parts, init_state, holes, is_leaf=is_none)


def put_back(hollow_state: Any, parts: Any, values: tuple) -> Any:
    """The inverse of `take_out`."""
    return eqx.tree_at(parts, hollow_state, values)
