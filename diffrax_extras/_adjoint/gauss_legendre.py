import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractAdaptiveStepSizeController,
    AbstractAdjoint,
    AbstractPath,
    AbstractTerm,
    ClipStepSizeController,
    ConstantStepSize,
    ControlTerm,
    CubicInterpolation,
    LinearInterpolation,
    MultiTerm,
    ODETerm,
    RESULTS,
    StepTo,
)
from jaxtyping import Array, PyTree, Real

from .._diffrax_internals import (
    Args,
    CallableToPath,
    ControlToODE,
    is_sde,
    lax_inner_loop,
    lax_outer_loop,
    nondiff_solver_controller_state,
    nondifferentiable,
    only_transpose_ys,
    RealScalarLike,
    result_index,
    result_messages,
    save_y,
    WrapTerm,
    Y,
)
from .._misc import (
    check_integer,
    materialise_cotangent,
    tree_lincomb,
    zeros_cotangent,
)
from .common import (
    check_no_dense,
    check_no_event,
    is_subsaveat,
    prepare_differentiated_inputs,
    put_back,
    take_out,
)
from .first_order import reverse_mode_only
from .gl_backsolve import BackwardSolve, Outcome, Quadrature, solve_backward
from .gl_quadrature import GaussRule, Integrand
from .gl_stops import make_stops


_NAME = "GaussLegendreAdjoint"
# The part of diffrax's initial loop state that carries gradients into the solve.
_DIFFERENTIATED = lambda s: (s.y,)  # noqa: E731
_BACKWARD_KWARGS = frozenset(
    {"solver", "stepsize_controller", "dt0", "max_steps", "throw"}
)
# Piecewise-polynomial paths whose derivative is not smooth across their knots; the
# backward solve stops there.
_KNOTTED_PATHS = (LinearInterpolation, CubicInterpolation)
# Backward steps per batched vector-Jacobian product, for a small state.
_STEPS_PER_CHUNK = 16


class GaussLegendreAdjoint(AbstractAdjoint):
    r"""Backpropagate through `diffrax.diffeqsolve` by the continuous adjoint,
    computing the parameter gradient by Gauss–Legendre quadrature.

    `diffrax.BacksolveAdjoint` integrates the adjoint of the parameters, a vector
    as long as the parameters, through every stage of the backward solve. This adjoint
    solves only the state and its adjoint $a(t) = \partial L / \partial y(t)$
    backwards,

    $\frac{\mathrm{d}y}{\mathrm{d}t} = f(t, y, \theta), \qquad
    \frac{\mathrm{d}a}{\mathrm{d}t} = -a^\top \frac{\partial f}{\partial y},$

    with the jumps $a \mathrel{+}= \partial L / \partial y(t_i)$ at the saved times,
    and computes

    $\frac{\mathrm{d}L}{\mathrm{d}\theta} = \int_{t_0}^{t_1} a^\top
    \frac{\partial f}{\partial \theta} \,\mathrm{d}t$

    by a composite Gauss–Legendre rule over the backward solve's accepted steps: on
    every step, $y$ and $a$ are read at `n_nodes` nodes off the step's dense
    interpolation, and the integrand at the nodes of many steps at once is one batched
    vector-Jacobian product. The `(n_nodes - 1)`-point rule on the same step gives an
    error estimate. Where it is above tolerance, the steps are cut into halves, then
    quarters, and so on; if it is still above tolerance after `max_refinements`
    halvings, the gradient is NaN (or, with `throw=True`, an error says what to change),
    never a number that may be wrong.

    The backward solve stops at, and no quadrature rule straddles, every time where the
    integrand may not be smooth: the saved times (where $a$ jumps), the `jump_ts` and
    `step_ts` of a `diffrax.ClipStepSizeController`, the grid of a `diffrax.StepTo`,
    and the knots of interpolated controls (`diffrax.LinearInterpolation`,
    `diffrax.CubicInterpolation`, anywhere in `terms` or `args`).

    Like `diffrax.BacksolveAdjoint` the gradient is that of the continuous problem, so
    it differs from the gradient of the discretised solve
    (`diffrax.RecursiveCheckpointAdjoint`) by the solver's error. Memory does not grow
    with the number of steps: the backward solve keeps `steps_per_chunk` steps of
    dense output at a time. It is fastest when the parameters are many and the state
    is small.

    Supports `diffrax.ODETerm`, `diffrax.ControlTerm` over a differentiable path
    (neural CDEs), `ControlTerm(...).to_ode()` and `diffrax.MultiTerm`s of these;
    `SaveAt(t0=..., t1=..., ts=...)`; any step size controller; gradients with respect
    to `y0`, `args` and everything differentiable inside `terms`; `jax.jit` and
    `jax.vmap`.

    Not supported (each raises an error at trace time): Brownian controls (SDEs; train
    them as ODEs driven by smooth noise with [`diffrax_extras.WongZakai`][], or use
    [`diffrax_extras.ReversibleAdjoint`][]), events, `SaveAt(steps=True)`,
    `SaveAt(dense=True)`, `SaveAt(fn=...)`, `SaveAt(subs=...)`, and gradients with
    respect to `t0`, `t1`, `SaveAt(ts=...)` or the knot times of an interpolated
    control.

    ??? cite "Reference"

        ```bibtex
        @article{norcliffe2023faster,
            title={Faster Training of Neural {ODE}s Using Gau{\ss}--Legendre
                   Quadrature},
            author={Norcliffe, Alexander and Deisenroth, Marc Peter},
            journal={Transactions on Machine Learning Research},
            year={2023}
        }
        ```
    """

    n_nodes: int = eqx.field(static=True)
    quadrature_rtol: float | None = eqx.field(static=True)
    quadrature_atol: float | None = eqx.field(static=True)
    max_refinements: int = eqx.field(static=True)
    steps_per_chunk: int | None = eqx.field(static=True)
    kwargs: dict[str, Any]

    def __init__(
        self,
        n_nodes: int = 4,
        *,
        quadrature_rtol: float | None = None,
        quadrature_atol: float | None = None,
        max_refinements: int = 4,
        steps_per_chunk: int | None = None,
        **kwargs,
    ):
        """**Arguments:**

        - `n_nodes`: the number of Gauss–Legendre nodes on each backward step (at
            least 2: the `(n_nodes - 1)`-point rule gives the error estimate).
        - `quadrature_rtol`, `quadrature_atol`: the quadrature's tolerance. The
            error estimate must satisfy `max|error| <= atol + rtol * max|gradient|` in
            every leaf of the parameters' gradient. By default, the backward step size
            controller's `rtol` and `atol`, but no less than 1000 times the machine
            epsilon of the state's dtype; `1e-6` (or that floor) for fixed backward
            steps. A tolerance you pass is used as it is.
        - `max_refinements`: how many times the backward steps may be halved for the
            quadrature before the gradient is declared inaccurate.
        - `steps_per_chunk`: how many backward steps are integrated by one batched
            vector-Jacobian product, of `steps_per_chunk * (2 * n_nodes - 1)`
            evaluations of the vector field at once. Larger is faster for large
            models and costs memory in proportion. By default 16, or fewer for a
            large state: at most `512 / (size of y)`, and at least 1.
        - `**kwargs`: options for the backward solve, as for
            `diffrax.BacksolveAdjoint`: `solver`, `stepsize_controller`, `dt0`,
            `max_steps` and `throw`. Each defaults to what the forward solve used
            (`dt0`'s magnitude is used). The defaults for a forward `StepTo` are the
            same grid backwards; for a forward `ConstantStepSize`, the same step;
            `max_steps` defaults to the forward solve's plus the number of stops of
            the backward solve (saved times, jumps, knots), each of which ends a step.
        """
        n_nodes = check_integer(
            n_nodes,
            "n_nodes",
            2,
            "The rule with one node fewer estimates the quadrature's error.",
        )
        max_refinements = check_integer(max_refinements, "max_refinements", 0)
        if steps_per_chunk is not None:
            steps_per_chunk = check_integer(steps_per_chunk, "steps_per_chunk", 1)
        for name, value in (
            ("quadrature_rtol", quadrature_rtol),
            ("quadrature_atol", quadrature_atol),
        ):
            if value is not None and not (
                isinstance(value, (int, float, np.floating)) and value >= 0
            ):
                raise ValueError(
                    f"`{name}` must be a non-negative number or None, but got "
                    f"{value!r}."
                )
        unknown = set(kwargs) - _BACKWARD_KWARGS
        if unknown:
            raise ValueError(
                f"`{_NAME}` got unknown keyword arguments {sorted(unknown)}; the "
                f"backward solve takes {sorted(_BACKWARD_KWARGS)}."
            )
        self.n_nodes = n_nodes
        self.quadrature_rtol = (
            None if quadrature_rtol is None else float(quadrature_rtol)
        )
        self.quadrature_atol = (
            None if quadrature_atol is None else float(quadrature_atol)
        )
        self.max_refinements = max_refinements
        self.steps_per_chunk = steps_per_chunk
        self.kwargs = kwargs

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        saveat,
        init_state,
        passed_solver_state,
        passed_controller_state,
        event,
        t0,
        t1,
        stepsize_controller,
        dt0,
        **kwargs,
    ):
        check_no_event(
            _NAME,
            event,
            "the adjoint equations would need the sensitivity of the event time.",
        )
        check_no_dense(_NAME, saveat, "the backward solve uses the saved outputs only.")
        _check_saveat(saveat)
        if is_sde(terms):
            raise NotImplementedError(
                f"`{_NAME}()` does not support Brownian controls: quadrature needs "
                "an integrand that is smooth in time. Train the SDE as an ODE driven "
                "by smooth noise with `diffrax_extras.WongZakai(terms).ode_terms(...)`"
                ", or use "
                "`adjoint=diffrax_extras.ReversibleAdjoint()` with a reversible "
                "solver and `diffrax_extras.BrownianInterval`."
            )
        if not isinstance(terms, AbstractTerm):
            raise NotImplementedError(
                f"`{_NAME}()` needs `terms` to be a single term (an `ODETerm`, a "
                f"`ControlTerm` or a `MultiTerm` of these), but got "
                f"{type(terms).__name__}."
            )
        _check_terms(terms)
        backward_solver = self.kwargs.get("solver", solver)
        structure = backward_solver.term_structure
        single_term = isinstance(structure, type) and issubclass(ODETerm, structure)
        if not single_term:
            if "solver" in self.kwargs:
                raise ValueError(
                    f"The backward solve of `{_NAME}()` is an ODE with a single "
                    f"`ODETerm`, which `{_NAME}(solver={type(backward_solver).__name__}"
                    "())` cannot solve. Pass an ODE solver, e.g. "
                    f"`{_NAME}(solver=diffrax.Tsit5())`."
                )
            raise NotImplementedError(
                f"The backward solve of `{_NAME}()` is an ODE with a single term, "
                f"which `{type(solver).__name__}` cannot solve. Pass a solver for it: "
                f"`{_NAME}(solver=diffrax.Tsit5())`."
            )

        (t0, t1, saveat, solver, stepsize_controller, dt0, init_state, terms) = (
            prepare_differentiated_inputs(
                _NAME,
                t0=t0,
                t1=t1,
                saveat=saveat,
                solver=solver,
                stepsize_controller=stepsize_controller,
                dt0=dt0,
                init_state=init_state,
                terms=terms,
                args=args,
            )
        )
        args, terms = _nondifferentiable_knots((args, terms))
        (y,), init_state = take_out(init_state, _DIFFERENTIATED)
        init_state = nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        # Forward mode and second derivatives would go through a backward pass that
        # gives first derivatives only: refused, with an error naming the way out.
        inputs = reverse_mode_only((y, args, terms), _NAME)
        final_state, aux_stats = _loop_quadrature(
            inputs,
            self=self,
            solver=solver,
            stepsize_controller=stepsize_controller,
            dt0=dt0,
            saveat=saveat,
            init_state=init_state,
            event=event,
            t0=t0,
            t1=t1,
            **kwargs,
        )
        return only_transpose_ys(final_state), aux_stats


def _check_saveat(saveat) -> None:
    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    if len(subs) != 1:
        raise NotImplementedError(
            f"`{_NAME}()` does not support `SaveAt(subs=...)`. Save one set of "
            "times with `SaveAt(t0=..., t1=..., ts=...)`."
        )
    (sub,) = subs
    if sub.steps:
        raise NotImplementedError(
            f"`{_NAME}()` does not support `SaveAt(steps=True)`: the backward solve "
            "stops at the saved times, which must be known before the solve. Save at "
            "fixed times with `SaveAt(ts=...)`, or use "
            "`adjoint=diffrax_extras.ReversibleAdjoint()`."
        )
    if sub.fn is not save_y:
        raise NotImplementedError(
            f"`{_NAME}()` does not support `SaveAt(fn=...)`. Save the state with "
            "`SaveAt(ts=...)` and apply the function to `sol.ys` afterwards."
        )


def _check_terms(term: AbstractTerm) -> None:
    if isinstance(term, MultiTerm):
        for t in term.terms:
            _check_terms(t)
    elif isinstance(term, WrapTerm):
        _check_terms(term.term)
    elif isinstance(term, ControlTerm):
        control = term.control
        if isinstance(control, CallableToPath) or not isinstance(control, AbstractPath):
            raise NotImplementedError(
                f"`{_NAME}()` needs the derivative of a `ControlTerm`'s control, "
                "which a function of `(t0, t1)` does not give. Pass the control as a "
                "`diffrax.AbstractPath` (e.g. `diffrax.LinearInterpolation`)."
            )
    elif not isinstance(term, ODETerm):
        raise NotImplementedError(
            f"`{_NAME}()` supports `ODETerm`, `ControlTerm` and `MultiTerm`s of them, "
            f"but got a `{type(term).__name__}`."
        )


def _is_knotted(x: Any) -> bool:
    return isinstance(x, _KNOTTED_PATHS)


def _nondifferentiable_knots(tree: PyTree) -> PyTree:
    # Moving a knot moves the point where the control's derivative jumps, which adds a
    # point mass to the parameter gradient that the quadrature does not see.
    msg = (
        f"`{_NAME}()` cannot differentiate with respect to the knot times `ts` of an "
        "interpolated control. Wrap them in `jax.lax.stop_gradient`, or use "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for this gradient."
    )

    def _mark(x):
        if not _is_knotted(x):
            return x
        return eqx.tree_at(
            lambda p: p.ts, x, replace_fn=lambda ts: nondifferentiable(ts, msg=msg)
        )

    return jtu.tree_map(_mark, tree, is_leaf=_is_knotted)


def _knots(tree: PyTree) -> list[Real[Array, " k"]]:
    return [p.ts for p in jtu.tree_leaves(tree, is_leaf=_is_knotted) if _is_knotted(p)]


def _direction(terms: AbstractTerm) -> RealScalarLike:
    """The sign that `diffeqsolve` normalised time with (it wraps every term)."""
    wrapped = [
        t
        for t in jtu.tree_leaves(terms, is_leaf=lambda x: isinstance(x, WrapTerm))
        if isinstance(t, WrapTerm)
    ]
    return wrapped[0].direction if wrapped else 1


def _tree_sum(*trees: PyTree) -> PyTree:
    return jtu.tree_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def _control_derivative(control: AbstractPath, t, t_mid) -> PyTree[Array]:
    # A piecewise-polynomial control's derivative may jump at a knot, where `t` is
    # often evaluated (a step ends there). Inside an interval between stops, take the
    # side facing the interval: the left derivative in its upper half, the right one
    # in its lower half.
    if t_mid is None or not _is_knotted(control):
        return control.derivative(t)
    below = control.derivative(t, left=True)
    above = control.derivative(t, left=False)
    return jtu.tree_map(lambda b, a: jnp.where(t > t_mid, b, a), below, above)


def ode_vector_field(
    term: AbstractTerm, t: RealScalarLike, y: Y, args: Args, t_mid=None
) -> PyTree[Array]:
    """dy/dt of `term` at `t`: for a control term, its vector field times the
    control's derivative. `t_mid`, if given, is the middle of the interval between
    stops that `t` belongs to (see `_control_derivative`)."""
    if isinstance(term, MultiTerm):
        return _tree_sum(*[ode_vector_field(x, t, y, args, t_mid) for x in term.terms])
    if isinstance(term, WrapTerm):
        inner_mid = None if t_mid is None else t_mid * term.direction
        out = ode_vector_field(term.term, t * term.direction, y, args, inner_mid)
        return tree_lincomb((term.direction, out))
    if isinstance(term, ODETerm) and isinstance(term.vector_field, ControlToODE):
        return ode_vector_field(term.vector_field.control_term, t, y, args, t_mid)
    if isinstance(term, ODETerm):
        return term.vf(t, y, args)
    assert isinstance(term, ControlTerm)
    return term.vf_prod(t, y, args, _control_derivative(term.control, t, t_mid))


def _backward_vector_field(s, z, args):
    """d(y, a)/ds in the backward time s = -t."""
    (forward_args, forward_terms, t_mid) = args
    y, a = z
    f, vjp_fn = jax.vjp(
        lambda _y: ode_vector_field(forward_terms, -s, _y, forward_args, t_mid), y
    )
    (a_f_y,) = vjp_fn(a)
    return jtu.tree_map(jnp.negative, f), a_f_y


@eqx.filter_custom_vjp
def _loop_quadrature(y__args__terms, *, self, throw, init_state, **kwargs):
    del throw
    y, args, terms = y__args__terms
    init_state = put_back(init_state, _DIFFERENTIATED, (y,))
    return self._loop(
        args=args,
        terms=terms,
        init_state=init_state,
        inner_while_loop=lax_inner_loop,
        outer_while_loop=lax_outer_loop,
        **kwargs,
    )


@_loop_quadrature.def_fwd
def _loop_quadrature_fwd(perturbed, y__args__terms, **kwargs):
    del perturbed
    final_state, aux_stats = _loop_quadrature(y__args__terms, **kwargs)
    # `loop` checked that `save_state` is a single `SaveState`.
    residuals = (
        final_state.save_state.ts,
        final_state.save_state.ys,
        final_state.result,
    )
    return (final_state, aux_stats), residuals


class _Setup(eqx.Module):
    """The backward solve and quadrature, as resolved from the adjoint's options and
    the forward solve's."""

    backward: BackwardSolve
    quadrature: Quadrature
    jumps: list
    steps: list
    throw: bool = eqx.field(static=True)


def _epsilon(y0: PyTree) -> float:
    dtypes = [
        jnp.result_type(x) for x in jtu.tree_leaves(y0) if eqx.is_inexact_array(x)
    ]
    return max(
        (float(jnp.finfo(d).eps) for d in dtypes), default=float(jnp.finfo(float).eps)
    )


def _tolerance(value: float | None, fallback, floor: float):
    """The tolerance set by the user, else `fallback` (a controller's, perhaps an
    array) raised to `floor`: a Python float where possible, so that error messages
    can print it."""
    if value is not None:
        return value
    if isinstance(fallback, (int, float, np.floating)):
        return max(float(fallback), floor)
    return jnp.maximum(fallback, floor)


def _backward_stepping(user, forward, dt0, direction, time_dtype):
    """How the backward solve steps: `(adaptive controller or None, fixed step or
    None, jump times, step times)` from the controller passed to the adjoint (in the
    user's time) or else the forward solve's (already in normalised time)."""
    if user is None:
        controller = forward
    elif isinstance(user, StepTo):
        raise ValueError(
            f"`{_NAME}(stepsize_controller=diffrax.StepTo(...))` cannot be used: "
            "the backward solve also stops at every saved time, jump and knot. "
            f"Pass `{_NAME}(stepsize_controller=diffrax.ConstantStepSize(), "
            "dt0=...)` or an adaptive controller."
        )
    else:
        controller = user.wrap(direction)
    jumps, steps = [], []
    if isinstance(controller, ClipStepSizeController):
        # Its times become stops of the backward solve, which clips its steps itself.
        if controller.jump_ts is not None:
            jumps.append(controller.jump_ts)
        if controller.step_ts is not None:
            steps.append(controller.step_ts)
        controller = controller.controller
    if isinstance(controller, StepTo):
        # The forward grid, backwards: one step between consecutive grid times.
        steps.append(controller.ts)
        return None, jnp.asarray(jnp.inf, time_dtype), jumps, steps
    if isinstance(controller, ConstantStepSize):
        if dt0 is None:
            raise ValueError(
                f"The backward solve of `{_NAME}()` takes constant steps but has no "
                f"step size: pass `{_NAME}(dt0=...)`."
            )
        return None, dt0, jumps, steps
    if isinstance(controller, AbstractAdaptiveStepSizeController):
        return controller, None, jumps, steps
    raise ValueError(
        f"`{_NAME}()` cannot run its backward solve with the step size controller "
        f"`{type(controller).__name__}`. Pass one with "
        f"`{_NAME}(stepsize_controller=diffrax.PIDController(rtol=..., atol=...))` "
        "or `diffrax.ConstantStepSize()` with `dt0=...`."
    )


def _quadrature(self: GaussLegendreAdjoint, adaptive, y0) -> Quadrature:
    """The rule and its tolerance: the adjoint's, else the backward controller's,
    raised to the rounding level of the two rules' difference."""
    floor = 1000 * _epsilon(y0)
    if adaptive is None:
        rtol = atol = max(1e-6, floor)
    else:
        rtol, atol = getattr(adaptive, "rtol", 1e-6), getattr(adaptive, "atol", 1e-6)
    chunk_size = self.steps_per_chunk
    if chunk_size is None:
        # The nodes' batch holds the vector field's intermediate values at every node:
        # for a large state, fewer steps at a time keep it to a few times the memory of
        # `RecursiveCheckpointAdjoint` (measured: 17x at a state of 1024 with 16).
        size = sum(math.prod(jnp.shape(x)) for x in jtu.tree_leaves(y0))
        chunk_size = min(_STEPS_PER_CHUNK, max(1, 512 // max(size, 1)))
    return Quadrature(
        rule=GaussRule(self.n_nodes),
        chunk_size=chunk_size,
        max_refinements=self.max_refinements,
        rtol=_tolerance(self.quadrature_rtol, rtol, floor),
        atol=_tolerance(self.quadrature_atol, atol, floor),
    )


def _setup(
    self: GaussLegendreAdjoint,
    *,
    solver,
    stepsize_controller,
    dt0,
    max_steps,
    throw,
    direction,
    y0,
    time_dtype,
    num_stops,
) -> _Setup:
    """Resolves the backward solve's solver, controller, step and tolerances."""
    options = self.kwargs
    dt0 = options.get("dt0", dt0)
    dt0 = None if dt0 is None else jnp.abs(jnp.asarray(dt0, time_dtype))
    adaptive, step, jumps, steps = _backward_stepping(
        options.get("stepsize_controller"),
        stepsize_controller,
        dt0,
        direction,
        time_dtype,
    )
    # Each stop ends a backward step that the forward solve need not have taken.
    num_stops += sum(math.prod(jnp.shape(x)) for x in jumps + steps)
    max_steps = options.get(
        "max_steps", None if max_steps is None else max_steps + num_stops
    )
    backward = BackwardSolve(
        solver=options.get("solver", solver),
        controller=adaptive,
        dt0=dt0,
        step=step,
        max_steps=max_steps,
    )
    return _Setup(
        backward=backward,
        quadrature=_quadrature(self, adaptive, y0),
        jumps=jumps,
        steps=steps,
        throw=options.get("throw", throw),
    )


def _integrand(args, terms) -> Integrand:
    def pullback(ts, ys, cts):
        def _f(_args, _terms):
            return jax.vmap(lambda t, y: ode_vector_field(_terms, t, y, _args))(ts, ys)

        _, vjp_fn = eqx.filter_vjp(_f, args, terms)
        return vjp_fn(cts)

    return Integrand(pullback=pullback, zeros=zeros_cotangent((args, terms)))


def _format(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "as set on the controller"


def _check_outcome(outcome: Outcome, setup: _Setup, forward_result, cotangents):
    """NaN cotangents, or with `throw=True` an error, for a backward solve that failed
    or a quadrature whose error estimate is above tolerance."""
    quadrature = setup.quadrature
    accurate = outcome.accurate
    solved = outcome.result == RESULTS.successful
    ok = solved & accurate
    if setup.throw:
        backward_failed = jnp.logical_not(solved) & (
            forward_result == RESULTS.successful
        )
        max_steps = setup.backward.max_steps
        messages = [
            f"The backward solve of `{_NAME}` failed: {m} Change the backward solve "
            f"with `{_NAME}(solver=..., stepsize_controller=..., dt0=..., "
            "max_steps=...)`."
            for m in result_messages()
        ]
        messages[result_index(RESULTS.max_steps_reached)] = (
            f"The backward solve of `{_NAME}` reached the maximum number of solver "
            f"steps (max_steps={max_steps}). Pass a larger "
            f"`{_NAME}(max_steps=...)`, or take larger backward steps with "
            f"`{_NAME}(stepsize_controller=...)`."
        )
        cotangents = eqx.branched_error_if(
            cotangents, backward_failed, result_index(outcome.result), messages
        )
        cotangents = eqx.error_if(
            cotangents,
            solved & jnp.logical_not(accurate),
            f"The quadrature of `{_NAME}` did not reach its tolerance "
            f"(quadrature_rtol={_format(quadrature.rtol)}, "
            f"quadrature_atol={_format(quadrature.atol)}) after halving the backward "
            f"steps {quadrature.max_refinements} times, so the parameter gradient "
            "would be inaccurate. Take smaller backward steps "
            f"(`{_NAME}(stepsize_controller=..., dt0=...)`), allow more halvings "
            f"(`{_NAME}(max_refinements=...)`), or loosen `quadrature_rtol` and "
            "`quadrature_atol`.",
        )

    def fill(x):
        if eqx.is_inexact_array(x):
            return jnp.where(ok, x, jnp.nan)
        return x

    return jtu.tree_map(fill, cotangents)


@_loop_quadrature.def_bwd
def _loop_quadrature_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y__args__terms,
    *,
    self,
    solver,
    stepsize_controller,
    event,
    saveat,
    t0,
    t1,
    dt0,
    max_steps,
    throw,
    init_state,
    progress_meter,
):
    del perturbed, event, saveat, t1, init_state, progress_meter
    save_ts, save_ys, result = residuals
    grad_final_state, _ = grad_final_state__aux_stats
    grad_ys = materialise_cotangent(save_ys, grad_final_state.save_state.ys)
    y0, args, terms = y__args__terms
    time_dtype = save_ts.dtype
    direction = _direction(terms)
    knots = [jnp.asarray(k * direction, time_dtype) for k in _knots((args, terms))]
    num_stops = 1 + save_ts.shape[0] + sum(math.prod(k.shape) for k in knots)
    setup = _setup(
        self,
        solver=solver,
        stepsize_controller=stepsize_controller,
        dt0=dt0,
        max_steps=max_steps,
        throw=throw,
        direction=direction,
        y0=y0,
        time_dtype=time_dtype,
        num_stops=num_stops,
    )
    stops = make_stops(
        jnp.asarray(t0, time_dtype),
        save_ts,
        jumps=[*setup.jumps, *knots],
        steps=setup.steps,
    )
    outcome = solve_backward(
        term=ODETerm(_backward_vector_field),
        args_of=lambda t_mid: (args, terms, t_mid),
        stops=stops,
        save_ys=save_ys,
        grad_ys=grad_ys,
        backward=setup.backward,
        quadrature=setup.quadrature,
        integrand=_integrand(args, terms),
        result=result,
    )
    ct_args, ct_terms = outcome.value
    cotangents = (outcome.adjoint, ct_args, ct_terms)
    return _check_outcome(outcome, setup, result, cotangents)
