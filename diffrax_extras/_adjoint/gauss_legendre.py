import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractAdjoint,
    AbstractTerm,
    ODETerm,
)

from .._diffrax_internals import (
    is_sde,
    lax_inner_loop,
    lax_outer_loop,
    nondiff_solver_controller_state,
    only_transpose_ys,
    save_y,
)
from .._misc import (
    check_integer,
    materialise_cotangent,
)
from .common import (
    check_no_dense,
    check_no_event,
    controller_state_not_differentiated,
    is_subsaveat,
    prepare_differentiated_inputs,
    put_back,
    take_out,
)
from .first_order import not_differentiated_again, reverse_mode_only
from .gl_backsolve import solve_backward
from .gl_setup import backward_setup, check_outcome, NAME
from .gl_stops import make_stops
from .gl_terms import (
    backward_vector_field,
    check_terms,
    integrand,
    knot_times,
    nondifferentiable_knots,
    time_direction,
)


# The part of diffrax's initial loop state that carries gradients into the solve.
_DIFFERENTIATED = lambda s: (s.y,)  # noqa: E731
_BACKWARD_KWARGS = frozenset(
    {"solver", "stepsize_controller", "dt0", "max_steps", "throw"}
)


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
    vector-Jacobian product, with respect to the inputs being differentiated only
    (the others are neither integrated nor checked). The `(n_nodes - 1)`-point rule
    on the same step gives an error estimate. Where it is above tolerance, the steps
    are cut into halves, then quarters, and so on; if it is still above tolerance
    after `max_refinements` halvings, the gradient is NaN (or, with `throw=True`, an
    error says what to change), never a number that may be wrong.

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
                f"`{NAME}` got unknown keyword arguments {sorted(unknown)}; the "
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
            NAME,
            event,
            "the adjoint equations would need the sensitivity of the event time.",
        )
        check_no_dense(NAME, saveat, "the backward solve uses the saved outputs only.")
        _check_saveat(saveat)
        if is_sde(terms):
            raise NotImplementedError(
                f"`{NAME}()` does not support Brownian controls: quadrature needs "
                "an integrand that is smooth in time. Train the SDE as an ODE driven "
                "by smooth noise with `diffrax_extras.WongZakai(terms).ode_terms(...)`"
                ", or use "
                "`adjoint=diffrax_extras.ReversibleAdjoint()` with a reversible "
                "solver and `diffrax_extras.BrownianInterval`."
            )
        if not isinstance(terms, AbstractTerm):
            raise NotImplementedError(
                f"`{NAME}()` needs `terms` to be a single term (an `ODETerm`, a "
                f"`ControlTerm` or a `MultiTerm` of these), but got "
                f"{type(terms).__name__}."
            )
        check_terms(terms)
        backward_solver = self.kwargs.get("solver", solver)
        structure = backward_solver.term_structure
        single_term = isinstance(structure, type) and issubclass(ODETerm, structure)
        if not single_term:
            if "solver" in self.kwargs:
                raise ValueError(
                    f"The backward solve of `{NAME}()` is an ODE with a single "
                    f"`ODETerm`, which `{NAME}(solver={type(backward_solver).__name__}"
                    "())` cannot solve. Pass an ODE solver, e.g. "
                    f"`{NAME}(solver=diffrax.Tsit5())`."
                )
            raise NotImplementedError(
                f"The backward solve of `{NAME}()` is an ODE with a single term, "
                f"which `{type(solver).__name__}` cannot solve. Pass a solver for it: "
                f"`{NAME}(solver=diffrax.Tsit5())`."
            )

        (t0, t1, saveat, solver, stepsize_controller, dt0, init_state, terms) = (
            prepare_differentiated_inputs(
                NAME,
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
        args, terms = nondifferentiable_knots((args, terms))
        (y,), init_state = take_out(init_state, _DIFFERENTIATED)
        init_state = nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        # Forward mode and second derivatives would go through a backward pass that
        # gives first derivatives only: refused, with an error naming the way out.
        inputs = reverse_mode_only((y, args, terms), NAME)
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
        final_state = only_transpose_ys(final_state)
        return controller_state_not_differentiated(final_state), aux_stats


def _check_saveat(saveat) -> None:
    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    if len(subs) != 1:
        raise NotImplementedError(
            f"`{NAME}()` does not support `SaveAt(subs=...)`. Save one set of "
            "times with `SaveAt(t0=..., t1=..., ts=...)`."
        )
    (sub,) = subs
    if sub.steps:
        raise NotImplementedError(
            f"`{NAME}()` does not support `SaveAt(steps=True)`: the backward solve "
            "stops at the saved times, which must be known before the solve. Save at "
            "fixed times with `SaveAt(ts=...)`, or use "
            "`adjoint=diffrax_extras.ReversibleAdjoint()`."
        )
    if sub.fn is not save_y:
        raise NotImplementedError(
            f"`{NAME}()` does not support `SaveAt(fn=...)`. Save the state with "
            "`SaveAt(ts=...)` and apply the function to `sol.ys` afterwards."
        )


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
    del event, saveat, t1, init_state, progress_meter
    # The cotangents too: the backward solve and the quadrature are not
    # differentiable in forward mode either (diffrax's backward solve is itself a
    # `custom_vjp`).
    residuals, y__args__terms, grad_final_state__aux_stats = not_differentiated_again(
        (residuals, y__args__terms, grad_final_state__aux_stats), NAME
    )
    perturbed_params = perturbed[1:]  # those of (args, terms)
    save_ts, save_ys, result = residuals
    grad_final_state, _ = grad_final_state__aux_stats
    grad_ys = materialise_cotangent(save_ys, grad_final_state.save_state.ys)
    y0, args, terms = y__args__terms
    time_dtype = save_ts.dtype
    direction = time_direction(terms)
    knots = [jnp.asarray(k * direction, time_dtype) for k in knot_times((args, terms))]
    num_stops = 1 + save_ts.shape[0] + sum(math.prod(k.shape) for k in knots)
    setup = backward_setup(
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
        term=ODETerm(backward_vector_field),
        args_of=lambda t_mid: (args, terms, t_mid),
        stops=stops,
        save_ys=save_ys,
        grad_ys=grad_ys,
        backward=setup.backward,
        quadrature=setup.quadrature,
        integrand=integrand(args, terms, perturbed_params),
        result=result,
    )
    ct_args, ct_terms = outcome.value
    cotangents = (outcome.adjoint, ct_args, ct_terms)
    return check_outcome(outcome, setup, result, cotangents)
