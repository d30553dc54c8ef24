"""PyTree helpers for cotangents, shared by the solvers and the adjoints."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree


def _is_none(x) -> bool:
    return x is None


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

    return jtu.tree_map(_fn, cotangent, primal, is_leaf=_is_none)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Adds two cotangent PyTrees of the same structure, `None` standing for zero."""

    def _add(x, y):
        if x is None:
            return y
        if y is None:
            return x
        return x + y

    return jtu.tree_map(_add, a, b, is_leaf=_is_none)
