"""The solve's terms as the Gauss–Legendre adjoint sees them: an ODE in time (a
control term times its control's derivative), the backward vector field of the state
and its adjoint, the quadrature's integrand, and the knots of interpolated controls,
where the integrand may not be smooth."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import (
    AbstractPath,
    AbstractTerm,
    ControlTerm,
    CubicInterpolation,
    LinearInterpolation,
    MultiTerm,
    ODETerm,
)
from jaxtyping import Array, PyTree, Real

from .._diffrax_internals import (
    Args,
    CallableToPath,
    ControlToODE,
    nondifferentiable,
    RealScalarLike,
    WrapTerm,
    Y,
)
from .._misc import tree_lincomb, zeros_cotangent
from .gl_quadrature import Integrand
from .gl_setup import NAME


# Piecewise-polynomial paths whose derivative is not smooth across their knots; the
# backward solve stops there.
_KNOTTED_PATHS = (LinearInterpolation, CubicInterpolation)


def check_terms(term: AbstractTerm) -> None:
    if isinstance(term, MultiTerm):
        for t in term.terms:
            check_terms(t)
    elif isinstance(term, WrapTerm):
        check_terms(term.term)
    elif isinstance(term, ControlTerm):
        control = term.control
        if isinstance(control, CallableToPath) or not isinstance(control, AbstractPath):
            raise NotImplementedError(
                f"`{NAME}()` needs the derivative of a `ControlTerm`'s control, "
                "which a function of `(t0, t1)` does not give. Pass the control as a "
                "`diffrax.AbstractPath` (e.g. `diffrax.LinearInterpolation`)."
            )
    elif not isinstance(term, ODETerm):
        raise NotImplementedError(
            f"`{NAME}()` supports `ODETerm`, `ControlTerm` and `MultiTerm`s of them, "
            f"but got a `{type(term).__name__}`."
        )


def is_knotted(x: Any) -> bool:
    return isinstance(x, _KNOTTED_PATHS)


def nondifferentiable_knots(tree: PyTree) -> PyTree:
    # Moving a knot moves the point where the control's derivative jumps, which adds a
    # point mass to the parameter gradient that the quadrature does not see.
    msg = (
        f"`{NAME}()` cannot differentiate with respect to the knot times `ts` of an "
        "interpolated control. Wrap them in `jax.lax.stop_gradient`, or use "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()` for this gradient."
    )

    def _mark(x):
        if not is_knotted(x):
            return x
        return eqx.tree_at(
            lambda p: p.ts, x, replace_fn=lambda ts: nondifferentiable(ts, msg=msg)
        )

    return jtu.tree_map(_mark, tree, is_leaf=is_knotted)


def knot_times(tree: PyTree) -> list[Real[Array, " k"]]:
    return [p.ts for p in jtu.tree_leaves(tree, is_leaf=is_knotted) if is_knotted(p)]


def time_direction(terms: AbstractTerm) -> RealScalarLike:
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
    if t_mid is None or not is_knotted(control):
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


def backward_vector_field(s, z, args):
    """d(y, a)/ds in the backward time s = -t."""
    (forward_args, forward_terms, t_mid) = args
    y, a = z
    f, vjp_fn = jax.vjp(
        lambda _y: ode_vector_field(forward_terms, -s, _y, forward_args, t_mid), y
    )
    (a_f_y,) = vjp_fn(a)
    return jtu.tree_map(jnp.negative, f), a_f_y


def integrand(args, terms, perturbed: PyTree[bool]) -> Integrand:
    """The integrand over the inexact arrays of `(args, terms)` that are being
    differentiated, as `perturbed` (from `equinox.filter_custom_vjp`, with their
    structure) marks them; `None` for the others. An input nobody differentiates
    would otherwise be integrated, held at the parameters' size, and could make the
    quadrature refine (or give NaN, above its error estimate) for nothing."""
    diff, fixed = eqx.partition((args, terms), perturbed)

    def pullback(ts, ys, cts):
        def _f(_diff):
            _args, _terms = eqx.combine(_diff, fixed)
            return jax.vmap(lambda t, y: ode_vector_field(_terms, t, y, _args))(ts, ys)

        _, vjp_fn = eqx.filter_vjp(_f, diff)
        (ct,) = vjp_fn(cts)
        return ct

    return Integrand(pullback=pullback, zeros=zeros_cotangent(diff))
