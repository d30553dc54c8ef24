"""The quadrature of `GaussLegendreAdjoint`: the parameter gradient over a chunk of the
backward solve's accepted steps, with its error estimate and refinement.

On every step (or, after refinement, on every piece of a step) the gradient's integrand
is integrated by the `n`-point Gauss–Legendre rule, and the `(n - 1)`-point rule on the
same piece gives the error estimate: their difference is about the error of the
`(n - 1)`-point rule, so it over-estimates the error of the `n`-point result that is
kept. The state and its adjoint at the nodes are read from each step's dense
interpolation, and the integrand at all nodes of the chunk is one batched
vector-Jacobian product, so that the cost of evaluating the parameters' derivatives is
shared by many nodes.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree, Real

from .._misc import tree_add


class GaussRule(eqx.Module):
    """The `n`-point Gauss–Legendre rule and the `(n - 1)`-point rule, on [0, 1]."""

    # Tuples of floats, static: the rules are part of the compiled program.
    nodes: tuple[float, ...] = eqx.field(static=True)
    weights: tuple[float, ...] = eqx.field(static=True)
    coarse_nodes: tuple[float, ...] = eqx.field(static=True)
    coarse_weights: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, n: int):
        def on_unit_interval(k):
            x, w = np.polynomial.legendre.leggauss(k)
            return tuple(float(v) for v in (x + 1) / 2), tuple(float(v) for v in w / 2)

        self.nodes, self.weights = on_unit_interval(n)
        self.coarse_nodes, self.coarse_weights = on_unit_interval(n - 1)


class Chunk(eqx.Module):
    """Accepted steps of the backward solve, waiting for their quadrature.

    Slot `i < count` holds a step from `s0[i]` to `s1[i]` in the backward time
    `s = -t`, and the dense information that its solver's interpolation is built from.
    """

    s0: Real[Array, " size"]
    s1: Real[Array, " size"]
    dense_info: PyTree[Array]
    count: Int[Array, ""]

    @classmethod
    def empty(cls, size: int, s: Array, dense_info_struct: PyTree) -> "Chunk":
        def zeros(x):
            return jnp.zeros((size, *x.shape), x.dtype)

        return cls(
            s0=jnp.zeros(size, s.dtype),
            s1=jnp.zeros(size, s.dtype),
            dense_info=jtu.tree_map(zeros, dense_info_struct),
            count=jnp.array(0, jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.s0.shape[0]

    def add(self, s0, s1, dense_info, keep: Bool[Array, ""]) -> "Chunk":
        """Puts the step `[s0, s1]` in the next free slot when `keep`."""
        i = jnp.minimum(self.count, self.size - 1)

        def put(buffer, value):
            return buffer.at[i].set(jnp.where(keep, value, buffer[i]))

        return Chunk(
            s0=put(self.s0, s0),
            s1=put(self.s1, s1),
            dense_info=jtu.tree_map(put, self.dense_info, dense_info),
            count=self.count + jnp.where(keep, 1, 0).astype(jnp.int32),
        )

    def clear(self) -> "Chunk":
        return eqx.tree_at(lambda c: c.count, self, jnp.array(0, jnp.int32))

    def length(self) -> Array:
        used = jnp.arange(self.size, dtype=jnp.int32) < self.count
        return jnp.sum(jnp.where(used, self.s1 - self.s0, 0))


def _max_abs(x) -> Array:
    return jnp.max(jnp.abs(x), initial=0)


def leaf_max_abs(tree: PyTree[Array]) -> PyTree[Array]:
    """`max|x|` of every leaf."""
    return jtu.tree_map(_max_abs, tree)


def within_tolerance(
    error: PyTree[Array], value: PyTree[Array], rtol, atol
) -> Bool[Array, ""]:
    """Whether `error <= atol + rtol * max|value|` in every leaf, for `error` a
    PyTree of per-leaf error bounds (scalars) with the structure of `value`."""
    checks = jtu.tree_map(
        lambda e, v: (
            e <= jnp.asarray(atol, e.dtype) + jnp.asarray(rtol, e.dtype) * _max_abs(v)
        ),
        error,
        value,
    )
    return jtu.tree_reduce(jnp.logical_and, checks, jnp.array(True))


class Integrand(eqx.Module):
    """The parameter gradient's integrand, a(t)ᵀ ∂f/∂θ(t, y(t)), as a pullback:
    `pullback(ts, ys, cts)` is the sum over nodes of the vector-Jacobian products of
    the vector field with respect to the differentiated inputs, at times `ts` and
    states `ys` (stacked along a leading axis), with cotangents `cts`."""

    pullback: Callable[[Array, PyTree, PyTree], PyTree]
    zeros: PyTree


def _nodes_of(chunk: Chunk, piece, pieces, nodes, weights, interpolation_cls):
    """Node times (backward time), weights and the interpolated state at the nodes of
    piece `piece` of `pieces` equal pieces of every step of the chunk."""
    dtype = chunk.s0.dtype
    frac0 = piece.astype(dtype) / pieces.astype(dtype)
    frac1 = (piece + 1).astype(dtype) / pieces.astype(dtype)
    h = chunk.s1 - chunk.s0
    lower = chunk.s0 + h * frac0
    width = h * (frac1 - frac0)
    node_s = lower[:, None] + width[:, None] * jnp.asarray(nodes, dtype)[None, :]
    node_w = width[:, None] * jnp.asarray(weights, dtype)[None, :]

    def evaluate(s0, s1, info, ss):
        interp = interpolation_cls(t0=s0, t1=s1, **info)
        return jax.vmap(interp.evaluate)(ss)

    z = jax.vmap(evaluate)(chunk.s0, chunk.s1, chunk.dense_info, node_s)
    return node_s, node_w, z


def _piece_integral(
    chunk: Chunk,
    piece,
    pieces,
    nodes,
    weights,
    *,
    integrand: Integrand,
    interpolation_cls,
    fill_s: Array,
    fill_z: PyTree,
):
    node_s, node_w, (ys, adj) = _nodes_of(
        chunk, piece, pieces, nodes, weights, interpolation_cls
    )
    size, k = node_s.shape
    used = (jnp.arange(size, dtype=jnp.int32) < chunk.count)[:, None]
    # Unused slots may hold nothing (their interpolation is then NaN) or an old step:
    # they are evaluated at the current state with zero weight, which adds exactly 0.
    fill_y, _ = fill_z
    ts = -jnp.where(used, node_s, fill_s).reshape(size * k)

    def flat(x, fill):
        x = jnp.where(used.reshape((size, 1) + (1,) * (x.ndim - 2)), x, fill)
        return x.reshape((size * k, *x.shape[2:]))

    ys = jtu.tree_map(flat, ys, fill_y)
    w = jnp.where(used, node_w, 0).reshape(size * k)

    def weighted(x):
        x = flat(x, jnp.zeros_like(x[0, 0]))
        return w.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) * x

    cts = jtu.tree_map(weighted, adj)
    return integrand.pullback(ts, ys, cts)


def chunk_integral(
    chunk: Chunk,
    *,
    rule: GaussRule,
    integrand: Integrand,
    interpolation_cls,
    fill_s: Array,
    fill_z: PyTree,
    rtol: Array,
    atol: Array,
    total_length: Array,
    max_refinements: int,
) -> tuple[PyTree, Bool[Array, ""], Int[Array, ""]]:
    """The integral over the chunk's steps, whether its error estimate met the
    tolerance, and how many times the steps were halved.

    Each step is first integrated whole. While the estimate is above
    `atol * (chunk length / total length) + rtol * |integral|` (in some leaf), every
    step is cut into twice as many equal pieces, up to `2 ** max_refinements`.
    The tolerance is local, as a step size controller's is: each chunk's error
    relative to its own contribution, so that contributions of opposite signs from
    different chunks, which cancel in the total, do not make it unattainable.
    """

    def at_level(level):
        pieces = jnp.left_shift(jnp.array(1, jnp.int32), level)

        def body(piece, value__error):
            value, error = value__error
            kwargs: dict[str, Any] = dict(
                integrand=integrand,
                interpolation_cls=interpolation_cls,
                fill_s=fill_s,
                fill_z=fill_z,
            )
            fine = _piece_integral(
                chunk, piece, pieces, rule.nodes, rule.weights, **kwargs
            )
            coarse = _piece_integral(
                chunk, piece, pieces, rule.coarse_nodes, rule.coarse_weights, **kwargs
            )
            value = tree_add(value, fine)
            # Summing each piece's largest difference bounds the largest difference
            # of the sums, in one number per leaf rather than an array as large as
            # the parameters.
            difference = leaf_max_abs(jtu.tree_map(jnp.subtract, fine, coarse))
            return value, tree_add(error, difference)

        zeros = integrand.zeros
        return lax.fori_loop(0, pieces, body, (zeros, leaf_max_abs(zeros)))

    share = chunk.length() / jnp.maximum(
        total_length, jnp.finfo(total_length.dtype).tiny
    )

    def converged(value, error):
        return within_tolerance(error, value, rtol, atol * share)

    # One loop from level 0, so that the quadrature is traced (and compiled) once.
    def cond(carry):
        level, value, error = carry
        return (level < 0) | (
            (level < max_refinements) & jnp.logical_not(converged(value, error))
        )

    def body(carry):
        level, _, _ = carry
        value, error = at_level(level + 1)
        return level + 1, value, error

    zeros = integrand.zeros
    start = (jnp.array(-1, jnp.int32), zeros, leaf_max_abs(zeros))
    level, value, error = lax.while_loop(cond, body, start)
    return value, converged(value, error), level


__all__ = [
    "Chunk",
    "GaussRule",
    "Integrand",
    "chunk_integral",
    "leaf_max_abs",
    "within_tolerance",
]
