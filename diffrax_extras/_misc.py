"""PyTree and argument-checking helpers shared by the solvers and the adjoints."""

from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import UnderdampedLangevinDiffusionTerm, UnderdampedLangevinDriftTerm
from jaxtyping import Array, ArrayLike, PyTree

from ._diffrax_internals import BoolScalarLike, RealScalarLike, unvmap_any


def is_none(x) -> bool:
    return x is None


def refresh_if(
    pred: BoolScalarLike, fresh: Callable[[], PyTree], old: PyTree
) -> PyTree:
    """`fresh()` where `pred`, else `old`: the vector field re-evaluated after a jump.

    Under `jax.vmap` a `lax.cond` with a batched predicate evaluates both branches,
    which would evaluate the vector field at every step of every batch member; jumps
    are rare, so the branch is skipped unless some member jumped.
    """
    pred = jnp.asarray(pred)

    def _fresh():
        return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), fresh(), old)

    return lax.cond(unvmap_any(pred), _fresh, lambda: old)


_LANGEVIN_TERMS = (UnderdampedLangevinDriftTerm, UnderdampedLangevinDiffusionTerm)


def is_underdamped_langevin(terms: PyTree) -> bool:
    """Whether `terms` hold diffrax's underdamped Langevin terms (also when wrapped,
    as `diffeqsolve` wraps every term)."""
    is_langevin = lambda x: isinstance(x, _LANGEVIN_TERMS)
    return any(is_langevin(x) for x in jtu.tree_leaves(terms, is_leaf=is_langevin))


def zeros_cotangent(primal: PyTree) -> PyTree:
    """Zeros for every inexact array of `primal`, `None` for every other leaf."""
    return jtu.tree_map(
        lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else None, primal
    )


def materialise_cotangent(primal: PyTree, cotangent: PyTree | None) -> PyTree:
    """The cotangent that `equinox.filter_vjp`'s pullback expects for `primal`: an
    array for every inexact array of `primal` and `None` for every other leaf. A
    `None` anywhere in `cotangent` stands for zeros over the matching subtree.
    """

    def _fn(ct, x):
        if ct is None:
            return zeros_cotangent(x)
        return ct if eqx.is_inexact_array(x) else None

    return jtu.tree_map(_fn, cotangent, primal, is_leaf=is_none)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Adds two cotangent PyTrees of the same structure, `None` standing for zero."""

    def _add(x, y):
        if x is None:
            return y
        if y is None:
            return x
        return x + y

    return jtu.tree_map(_add, a, b, is_leaf=is_none)


def tree_lincomb(*terms: tuple[ArrayLike, PyTree]) -> PyTree:
    """`sum(c * x for c, x in terms)` over PyTrees of the same structure.

    Each coefficient is cast to the dtype of the leaf it multiplies, so that a float64
    coefficient scales a float32 state without promoting it (and without tripping
    `jax_numpy_dtype_promotion="strict"`).
    """
    coeffs = [c for c, _ in terms]
    trees = [x for _, x in terms]

    def _combine(*leaves):
        out = None
        for c, leaf in zip(coeffs, leaves, strict=True):
            scaled = jnp.asarray(c, dtype=jnp.result_type(leaf)) * leaf
            out = scaled if out is None else out + scaled
        return out

    return jtu.tree_map(_combine, *trees)


def tree_sum_leading(tree: PyTree) -> PyTree:
    """Sums every array leaf over its leading axis, keeping `None`s."""
    return jtu.tree_map(lambda x: jnp.sum(x, axis=0), tree)


_Value = TypeVar("_Value", bound=RealScalarLike)


def check_in_interval(
    value: _Value,
    name: str,
    lower: RealScalarLike,
    upper: RealScalarLike,
    advice: str,
    upper_name: str | None = None,
    lower_name: str | None = None,
) -> _Value:
    """Checks `lower < value <= upper` for a parameter.

    Concrete values are checked at once, with a `ValueError`; traced ones (under
    `jax.vmap` or `jax.jit`) with `equinox.error_if` when the computation runs.
    `lower_name` and `upper_name` name the bounds in the message when they are not
    constants.
    """
    low = lower if lower_name is None else lower_name
    high = upper if upper_name is None else upper_name
    msg = f"`{name}` must lie in ({low}, {high}], but got {{}}. {advice}"
    try:
        concrete = [np.asarray(x) for x in (value, lower, upper)]
    except jax.errors.TracerArrayConversionError:
        concrete = None
    if concrete is None:
        return eqx.error_if(
            value, (value <= lower) | (value > upper), msg.format("a value outside")
        )
    c_value, c_lower, c_upper = concrete
    if not np.all((c_value > c_lower) & (c_value <= c_upper)):
        raise ValueError(msg.format(value))
    return value


def check_integer(value, name: str, minimum: int, advice: str = "") -> int:
    """An integer option of at least `minimum`, else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be an integer of at least {minimum}, but got {value!r}."
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be at least {minimum}, but got {value}."
            + (f" {advice}" if advice else "")
        )
    return int(value)


def path_times(t0, t1, *others) -> tuple[Array, ...]:
    """A path's `t0`, `t1` (and further times such as a tolerance or a step) in one
    floating dtype, promoted as JAX promotes them, with `t0 < t1` checked."""
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(t0, t1, *others, float)
    t0, t1, *rest = (jnp.asarray(x, dtype) for x in (t0, t1, *others))
    t1 = check_in_interval(
        t1,
        "t1",
        t0,
        np.inf,
        "The interval must not be empty.",
        lower_name="t0",
        upper_name="inf",
    )
    return (t0, t1, *rest)


def path_shape(shape: tuple[int, ...] | PyTree[jax.ShapeDtypeStruct]) -> PyTree:
    """A path's `shape` argument as diffrax's Brownian paths take it: a tuple of
    integers (an array of the default floating dtype) or a PyTree of
    `jax.ShapeDtypeStruct`s of floating or complex dtype."""
    if isinstance(shape, tuple) and all(isinstance(x, int) for x in shape):
        shape = jax.ShapeDtypeStruct(shape, jnp.zeros(()).dtype)
    for struct in jtu.tree_leaves(shape):
        if not isinstance(struct, jax.ShapeDtypeStruct):
            raise ValueError(
                "`shape` must be a tuple of integers or a PyTree of "
                f"`jax.ShapeDtypeStruct`s, but it holds {struct!r}."
            )
        if not jnp.issubdtype(struct.dtype, jnp.inexact):
            raise ValueError(
                "`shape` dtypes must be floating-point or complex, but got "
                f"{struct.dtype}. Pass e.g. `jax.ShapeDtypeStruct(shape, "
                "jnp.float32)`."
            )
    return shape
