"""First-order reverse mode only: a marker on an adjoint's inputs that turns
forward-mode and higher-order differentiation into errors that say what to use instead.

The adjoints of this package are `custom_vjp`s. JAX cannot push tangents through a
`custom_vjp` (forward mode fails deep inside JAX), and differentiating the backward
pass again would differentiate a reconstruction or a quadrature that was written to
give first derivatives only. So each adjoint passes its differentiable inputs through
`reverse_mode_only`, an identity whose derivative rules are:

- its JVP is the identity again, but split into two other identities: one on the
  primal (`_primal_p`) that refuses to be differentiated (any second derivative passes
  through it), and one on the tangent (`_tangent_p`) that is linear, so that reverse
  mode transposes it away, but that refuses to be evaluated or compiled, which only
  forward mode does.

In a first-order `jax.grad` neither refusal is reached; under `jax.jvp`,
`jax.jacfwd` or `jax.linearize` the tangent identity is evaluated; under
`jax.hessian` or `jax.grad` of `jax.grad` the primal one is differentiated. Batching
passes through all three, and the JVP-then-partial-evaluation route that JAX takes
inside `lax.scan`, `lax.while_loop` bodies and `jax.checkpoint` still ends in a
transposition, so those stay first-order reverse mode and work.

A second derivative can also reach a backward pass by other routes, which two more
identities close: `not_differentiated_again` on the residuals and primal inputs of a
backward pass (it refuses any derivative), and `not_transposed_again` on the
cotangents that a backward pass returns (forward mode passes, reverse mode is
refused), for an input that only the loss depends on.
"""

import functools as ft

import equinox as eqx
import jax.extend.core
import jax.interpreters.ad as ad
import jax.interpreters.batching as batching
import jax.interpreters.mlir as mlir
import jax.tree_util as jtu
from jaxtyping import PyTree


def _identity(x, **params):
    del params
    return x


def _pass_through_batching(primitive):
    def rule(args, dims, **params):
        (x,), (dim,) = args, dims
        return primitive.bind(x, **params), dim

    return rule


def _identity_lowering(primitive):
    mlir.register_lowering(primitive, mlir.lower_fun(_identity, multiple_results=False))


def _refuse_forward_mode(*args, forward, higher):
    # Both the eager rule `(x, **params)` and the lowering rule `(ctx, x, **params)`.
    del args, higher
    raise TypeError(forward)


_mark_p = jax.extend.core.Primitive("diffrax_extras_reverse_mode_only")
_primal_p = jax.extend.core.Primitive("diffrax_extras_not_differentiated_again")
_tangent_p = jax.extend.core.Primitive("diffrax_extras_forward_mode_tangent")
_linear_p = jax.extend.core.Primitive("diffrax_extras_not_transposed_again")

for _p in (_mark_p, _primal_p, _tangent_p, _linear_p):
    _p.def_abstract_eval(_identity)
for _p in (_mark_p, _primal_p, _linear_p):
    _p.def_impl(_identity)
    batching.primitive_batchers[_p] = _pass_through_batching(_p)
    _identity_lowering(_p)
# Reverse mode transposes the tangent identity before anything is batched, compiled
# or run; `jax.jacfwd` batches it, and raises here before JAX's own error.
_tangent_p.def_impl(_refuse_forward_mode)
batching.primitive_batchers[_tangent_p] = _refuse_forward_mode
mlir.register_lowering(_tangent_p, _refuse_forward_mode)


def _mark_jvp(primals, tangents, *, forward, higher):
    (x,), (t,) = primals, tangents
    out = _primal_p.bind(x, forward=forward, higher=higher)
    if type(t) is ad.Zero:
        return out, t
    return out, _tangent_p.bind(t, forward=forward, higher=higher)


def _primal_jvp(primals, tangents, *, forward, higher):
    (x,), (t,) = primals, tangents
    if type(t) is not ad.Zero:
        raise TypeError(higher)
    return _primal_p.bind(x, forward=forward, higher=higher), t


def _tangent_jvp(primals, tangents, *, forward, higher):
    del primals, tangents, forward
    raise TypeError(higher)


def _tangent_transpose(ct, x, *, forward, higher):
    del x, forward, higher
    return [ct]


def _linear_jvp(primals, tangents, **params):
    (x,), (t,) = primals, tangents
    out = _linear_p.bind(x, **params)
    return out, t if type(t) is ad.Zero else _linear_p.bind(t, **params)


def _linear_transpose(ct, x, *, forward, higher):
    del ct, x, forward
    raise TypeError(higher)


ad.primitive_jvps[_mark_p] = _mark_jvp
ad.primitive_jvps[_primal_p] = _primal_jvp
ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
ad.primitive_jvps[_linear_p] = _linear_jvp
ad.primitive_transposes[_linear_p] = _linear_transpose


def _messages(adjoint: str, higher_extra: str = "") -> tuple[str, str]:
    forward = (
        f"`{adjoint}()` differentiates in reverse mode only (`jax.grad`, `jax.vjp`, "
        "`jax.jacrev`), not in forward mode (`jax.jvp`, `jax.jacfwd`, "
        "`jax.linearize`). For forward mode use "
        "`diffeqsolve(..., adjoint=diffrax.ForwardMode())`; for derivatives of any "
        "order and mode, `adjoint=diffrax.DirectAdjoint()`."
    )
    higher = (
        f"`{adjoint}()` computes first derivatives only: its backward pass cannot "
        "itself be differentiated, so `jax.hessian`, `jax.grad` of `jax.grad` and "
        "other second derivatives are not available through it. "
        + higher_extra
        + "Use `diffeqsolve(..., adjoint=diffrax.DirectAdjoint())` for higher-order "
        "derivatives (or `adjoint=diffrax.ForwardMode()` for forward mode)."
    )
    return forward, higher


def _bind(primitive, tree: PyTree, adjoint: str, higher_extra: str = "") -> PyTree:
    forward, higher = _messages(adjoint, higher_extra)
    bind = ft.partial(primitive.bind, forward=forward, higher=higher)
    return jtu.tree_map(lambda x: bind(x) if eqx.is_inexact_array(x) else x, tree)


def reverse_mode_only(tree: PyTree, adjoint: str) -> PyTree:
    """The identity on every inexact array of `tree`, marked as differentiable once,
    in reverse mode, by the adjoint named `adjoint` (which the errors name)."""
    return _bind(_mark_p, tree, adjoint)


def not_differentiated_again(tree: PyTree, adjoint: str) -> PyTree:
    """The identity on every inexact array of `tree`, refusing any derivative: for
    the residuals and primal inputs of a backward pass. A second derivative (the
    gradient of a gradient with respect to other inputs, say) reaches the backward
    pass through them rather than through the marked inputs, and JAX would
    differentiate it as far as some primitive without a rule (`nextafter`), or
    differentiate through its loops, and fail there with its own message.

    The cotangents are left alone: the backward pass is linear in them, so a
    forward-mode derivative with respect to something only the loss depends on is
    exact."""
    return _bind(_primal_p, tree, adjoint)


def not_transposed_again(tree: PyTree, adjoint: str) -> PyTree:
    """The identity on every inexact array of `tree`, for the cotangents that a
    backward pass returns, if that pass is linear in the cotangents it is given and
    forward mode can differentiate it there. Forward mode passes through (it is
    linear); reverse mode, which would transpose the backward pass's loops, gets the
    "first derivatives only" error instead of JAX's about `lax.while_loop`."""
    extra = (
        "(With respect to an input that only the loss depends on, take the outer "
        "derivative in forward mode, `jax.jacfwd(jax.grad(...))` as `jax.hessian` "
        "does: that one is exact.) "
    )
    return _bind(_linear_p, tree, adjoint, extra)
