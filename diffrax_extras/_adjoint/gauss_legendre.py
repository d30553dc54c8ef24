from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractAdjoint,
    AbstractTerm,
    ControlTerm,
    CubicInterpolation,
    LinearInterpolation,
    MultiTerm,
    ODETerm,
    RESULTS,
    SaveAt,
)
from jaxtyping import Array, PyTree, Real

from .._diffrax_internals import (
    Args,
    is_sde,
    lax_inner_loop,
    lax_outer_loop,
    nondiff_solver_controller_state,
    nondifferentiable,
    only_transpose_ys,
    RealScalarLike,
    save_y,
    WrapTerm,
    Y,
)
from .._misc import materialise_cotangent, tree_add, tree_lincomb, zeros_cotangent
from .common import (
    check_no_dense,
    check_no_event,
    closure_convert_terms,
    is_subsaveat,
    nan_if_failed,
    nondifferentiable_times,
)


_NAME = "GaussLegendreAdjoint"
_BACKWARD_KWARGS = frozenset(
    {"solver", "stepsize_controller", "dt0", "max_steps", "throw"}
)
# Piecewise-polynomial paths whose derivative is not smooth across their knots; the
# quadrature is split there.
_KNOTTED_PATHS = (LinearInterpolation, CubicInterpolation)


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

    by `n_nodes`-point Gauss–Legendre quadrature over each interval between saved
    times: $y$ and $a$ are read off the backward solve at the nodes, and one batched
    vector-Jacobian product over the nodes gives the interval's contribution. The rule
    is exact when the integrand is a polynomial in $t$ of degree at most
    $2\,\mathtt{n\_nodes} - 1$; its error otherwise falls quickly with `n_nodes` for
    smooth vector fields. Where a control is a piecewise polynomial
    (`diffrax.LinearInterpolation`, `diffrax.CubicInterpolation`), whose
    derivative is not smooth across its knots, the intervals are split at the knots.

    Like `diffrax.BacksolveAdjoint` the gradient is that of the continuous
    problem, so it differs from the gradient of the discretised solve
    (`diffrax.RecursiveCheckpointAdjoint`) by the solver's error and the
    quadrature's; memory does not grow with the number of steps. It is fastest when the
    parameters are many and the state is small.

    Supports `diffrax.ODETerm`, `diffrax.ControlTerm` over a differentiable
    path (neural CDEs), `ControlTerm(...).to_ode()` and `diffrax.MultiTerm`s of
    these; `SaveAt(t0=..., t1=..., ts=...)`; gradients with respect to `y0`, `args` and
    everything differentiable inside `terms`; `jax.jit` and `jax.vmap`.

    Not supported (each raises an error at trace time): Brownian controls (SDEs; train
    them as ODEs driven by smooth noise with [`diffrax_extras.WongZakai`][], or use
    [`diffrax_extras.ReversibleAdjoint`][]),
    events, `SaveAt(steps=True)`, `SaveAt(dense=True)`, `SaveAt(fn=...)`,
    `SaveAt(subs=...)`, and gradients with respect to `t0`, `t1`, `SaveAt(ts=...)` or
    the knot times of an interpolated control.

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
    kwargs: dict[str, Any]

    def __init__(self, n_nodes: int = 8, **kwargs):
        """**Arguments:**

        - `n_nodes`: the number of Gauss–Legendre nodes per interval between saved
            times (and knots of interpolated controls).
        - `**kwargs`: options for the backward solves, as for
            `diffrax.BacksolveAdjoint`: `solver`, `stepsize_controller`, `dt0`,
            `max_steps` and `throw`. Each defaults to what the forward solve used
            (`dt0` with its sign flipped). `max_steps` applies to each interval.
        """
        if isinstance(n_nodes, bool) or not isinstance(n_nodes, (int, np.integer)):
            raise TypeError(
                f"`n_nodes` must be a positive integer, but got {n_nodes!r}."
            )
        if n_nodes < 1:
            raise ValueError(
                f"`n_nodes` must be at least 1, but got {n_nodes}. The default of 8 "
                "integrates polynomials of degree up to 15 exactly."
            )
        unknown = set(kwargs) - _BACKWARD_KWARGS
        if unknown:
            raise ValueError(
                f"`{_NAME}` got unknown keyword arguments {sorted(unknown)}; the "
                f"backward solve takes {sorted(_BACKWARD_KWARGS)}."
            )
        self.n_nodes = int(n_nodes)
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
        **kwargs,
    ):
        check_no_event(
            _NAME,
            event,
            "the adjoint equations would need the sensitivity of the event time.",
        )
        check_no_dense(_NAME, saveat, "the backward solve uses the saved outputs only.")
        subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
        if len(subs) != 1:
            raise NotImplementedError(
                f"`{_NAME}()` does not support `SaveAt(subs=...)`. Save one set of "
                "times with `SaveAt(t0=..., t1=..., ts=...)`."
            )
        (sub,) = subs
        if sub.steps:
            raise NotImplementedError(
                f"`{_NAME}()` does not support `SaveAt(steps=True)`: the quadrature "
                "runs over intervals between saved times that are known before the "
                "solve. Save at fixed times with `SaveAt(ts=...)`, or use "
                "`adjoint=diffrax_extras.ReversibleAdjoint()`."
            )
        if sub.fn is not save_y:
            raise NotImplementedError(
                f"`{_NAME}()` does not support `SaveAt(fn=...)`. Save the state with "
                "`SaveAt(ts=...)` and apply the function to `sol.ys` afterwards."
            )
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
        structure = solver.term_structure
        single_term = isinstance(structure, type) and issubclass(ODETerm, structure)
        if "solver" not in self.kwargs and not single_term:
            raise NotImplementedError(
                f"The backward solve of `{_NAME}()` is an ODE with a single term, "
                f"which `{type(solver).__name__}` cannot solve. Pass a solver for it: "
                f"`{_NAME}(solver=diffrax.Tsit5())`."
            )

        t0, t1, saveat = nondifferentiable_times(_NAME, t0, t1, saveat)
        y = init_state.y
        terms = closure_convert_terms(terms, t0, y, args)
        args, terms = _nondifferentiable_knots((args, terms))
        init_state = eqx.tree_at(lambda s: s.y, init_state, object())
        init_state = nondiff_solver_controller_state(
            self, init_state, passed_solver_state, passed_controller_state
        )
        final_state, aux_stats = _loop_quadrature(
            (y, args, terms),
            self=self,
            solver=solver,
            saveat=saveat,
            init_state=init_state,
            event=event,
            t0=t0,
            t1=t1,
            **kwargs,
        )
        return only_transpose_ys(final_state), aux_stats


def _check_terms(term: AbstractTerm) -> None:
    if isinstance(term, MultiTerm):
        for t in term.terms:
            _check_terms(t)
    elif isinstance(term, WrapTerm):
        _check_terms(term.term)
    elif not isinstance(term, (ODETerm, ControlTerm)):
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


def ode_vector_field(
    term: AbstractTerm, t: RealScalarLike, y: Y, args: Args
) -> PyTree[Array]:
    """dy/dt of `term` at `t`: for a control term, its vector field times the
    control's derivative."""
    if isinstance(term, MultiTerm):
        return _tree_sum(*[ode_vector_field(x, t, y, args) for x in term.terms])
    if isinstance(term, WrapTerm):
        out = ode_vector_field(term.term, t * term.direction, y, args)
        return tree_lincomb((term.direction, out))
    if isinstance(term, ODETerm):
        return term.vf(t, y, args)
    assert isinstance(term, ControlTerm)
    return term.vf_prod(t, y, args, term.control.derivative(t))


def _adjoint_vector_field(t, y__a, args__terms):
    y, a = y__a
    args, terms = args__terms
    f, vjp_fn = jax.vjp(lambda _y: ode_vector_field(terms, t, _y, args), y)
    (a_f_y,) = vjp_fn(a)
    return f, jtu.tree_map(jnp.negative, a_f_y)


@eqx.filter_custom_vjp
def _loop_quadrature(y__args__terms, *, self, throw, init_state, **kwargs):
    del throw
    y, args, terms = y__args__terms
    init_state = eqx.tree_at(lambda s: s.y, init_state, y)
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
    del perturbed, event, saveat, t1, init_state, progress_meter
    save_ts, save_ys, result = residuals
    grad_final_state, _ = grad_final_state__aux_stats
    grad_ys = materialise_cotangent(save_ys, grad_final_state.save_state.ys)
    y0, args, terms = y__args__terms
    n_nodes = self.n_nodes
    backward: dict[str, Any] = dict(
        solver=solver,
        stepsize_controller=stepsize_controller,
        dt0=None if dt0 is None else -dt0,
        max_steps=max_steps,
        throw=throw,
    )
    backward.update(self.kwargs)

    # The breakpoints of the quadrature: t0, the saved times (where `a` jumps and `y`
    # is reset to its saved value) and the knots of interpolated controls, in order.
    time_dtype = save_ts.dtype
    t_last = save_ts[-1]
    direction = _direction(terms)
    knots = [
        jnp.clip(jnp.asarray(k * direction, time_dtype), t0, t_last)
        for k in _knots((args, terms))
    ]
    num_saves = save_ts.shape[0]
    num_knots = sum(k.shape[0] for k in knots)
    times = jnp.concatenate([jnp.reshape(t0, (1,)).astype(time_dtype), save_ts, *knots])
    is_save = np.concatenate(
        [[False], np.full(num_saves, True), np.full(num_knots, False)]
    )

    def _pad(x, fill):
        pad = jnp.zeros((num_knots, *x.shape[1:]), x.dtype)
        return jnp.concatenate([fill[None], x, pad])

    ys_at = jtu.tree_map(lambda ys, y: _pad(ys, y), save_ys, y0)
    jumps = jtu.tree_map(lambda g, y: _pad(g, jnp.zeros_like(y)), grad_ys, y0)
    order = jnp.argsort(times, stable=True)
    times = times[order]
    is_save = jnp.asarray(is_save)[order]
    ys_at = jtu.tree_map(lambda x: x[order], ys_at)
    jumps = jtu.tree_map(lambda x: x[order], jumps)

    nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
    # Descending, the direction of the backward solve.
    nodes = jnp.asarray((nodes[::-1] + 1) / 2, time_dtype)
    weights = jnp.asarray(weights[::-1] / 2, time_dtype)
    adjoint_term = ODETerm(_adjoint_vector_field)

    def _parameter_vjp(ts, ys, cts):
        def _f(_args, _terms):
            return jax.vmap(lambda t, y: ode_vector_field(_terms, t, y, _args))(ts, ys)

        _, vjp_fn = eqx.filter_vjp(_f, args, terms)
        return vjp_fn(cts)

    def _interval(carry, xs):
        y, a, ct_args, ct_terms, result = carry
        lower, upper, save_here, y_saved, jump = xs
        y = jtu.tree_map(lambda s, c: jnp.where(save_here, s, c), y_saved, y)
        a = tree_add(a, jump)
        ts = lower + (upper - lower) * nodes
        sol = diffrax.diffeqsolve(
            adjoint_term,
            t0=upper,
            t1=lower,
            y0=(y, a),
            args=(args, terms),
            saveat=SaveAt(ts=ts, t1=True),
            **backward,
        )
        node_ys, node_as = jtu.tree_map(lambda x: x[:n_nodes], sol.ys)
        y, a = jtu.tree_map(lambda x: x[n_nodes], sol.ys)
        w = weights * (upper - lower)
        cts = jtu.tree_map(
            lambda x: jnp.asarray(w, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * x,
            node_as,
        )
        _ct_args, _ct_terms = _parameter_vjp(ts, node_ys, cts)
        # With `throw=False`, a backward solve that fails is as bad as a forward one.
        result = RESULTS.where(result == RESULTS.successful, sol.result, result)
        ct_args = tree_add(ct_args, _ct_args)
        ct_terms = tree_add(ct_terms, _ct_terms)
        return (y, a, ct_args, ct_terms, result), None

    first = jtu.tree_map(lambda x: x[0], jumps)
    rest = jtu.tree_map(lambda x: x[1:], (is_save, ys_at, jumps))
    carry = (
        y0,
        zeros_cotangent(y0),
        zeros_cotangent(args),
        zeros_cotangent(terms),
        result,
    )
    (_, a, ct_args, ct_terms, result), _ = lax.scan(
        _interval, carry, (times[:-1], times[1:], *rest), reverse=True
    )
    return nan_if_failed(result, (tree_add(a, first), ct_args, ct_terms))
