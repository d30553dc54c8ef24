import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractBrownianIncrement,
    AbstractBrownianPath,
    BrownianIncrement,
    SpaceTimeLevyArea,
    SpaceTimeTimeLevyArea,
)
from jaxtyping import Array, Int, PRNGKeyArray, PyTree, Real

from .._diffrax_internals import levy_tree_transpose, nondifferentiable, RealScalarLike
from .._misc import check_in_interval, path_shape
from . import levy as lv


# Node keys are folded from (level, index) with `index < 2**level` as a uint32.
_MAX_DEPTH = 32
# Query times within this many ULPs (of the largest time) of a piece boundary are
# treated as on it: enough to absorb the rounding of `t0 + k * (t1 - t0) / n` in
# `diffrax.ConstantStepSize` and of `t0 + k * dt`, far below any sensible `tol`.
_SNAP_ULPS = 8


def _where(pred, x: PyTree, y: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), x, y)


def _node_key(tree_key: PRNGKeyArray, level, index) -> PRNGKeyArray:
    return jr.fold_in(jr.fold_in(tree_key, level), index)


class _Node(eqx.Module):
    """A node of the dyadic tree inside one piece, in coordinates where the piece is
    $[0, 1]$: the interval $[s, e]$, its place in the tree and its increment (one
    `Levy` per leaf of `shape`)."""

    value: list[lv.Levy]
    s: Real[Array, ""]
    e: Real[Array, ""]
    level: Int[Array, ""]
    index: Array


class BrownianInterval(AbstractBrownianPath):
    """Brownian motion that is exact, consistent under any order of queries, and costs
    one normal draw per step when the steps fall on its pieces.

    The interval $[t_0, t_1]$ is cut into pieces of length `dt` (the last one takes
    what is left). The increment of each piece, with its Lévy areas, is drawn from a
    key folded from the piece's index. Inside a piece a dyadic tree of depth
    $\\lceil\\log_2(\\mathtt{dt}/\\mathtt{tol})\\rceil$ is sampled by exact Brownian
    bridges, each node from a key folded from its level and position, so any node can
    be drawn without its siblings. A query $[s, t]$ takes the whole pieces between $s$
    and $t$ as they are, and inside a piece descends once to the deepest node holding
    both ends before bridging down to each end.

    So a fixed-step solve whose steps are the pieces (`dt` equal to the solver's `dt0`)
    costs what `diffrax.UnsafeBrownianPath` costs, one draw per step; and unlike
    it, the path is a pure function of `key` and the query, so it can be queried again
    (rejected adaptive steps, checkpoint replay,
    [`diffrax_extras.ReversibleAdjoint`][]), backwards in time, in any order, under
    `jax.vmap`, and always returns bitwise the same values. Compared with
    `diffrax.VirtualBrownianTree`, which descends from the root for both ends of
    every step, queries inside a piece descend a tree over `dt` rather than over
    $t_1 - t_0$, from the node the two ends share.

    Every query point has the exact marginal and conditional law of Brownian motion
    (and of its Lévy areas); the joint law of several points is exact when no two of
    them fall in the same leaf of width at most `tol`, exactly as for
    `diffrax.VirtualBrownianTree`. Query times within a few ULPs of a piece boundary are
    treated as on it.

    !!! info "Lévy Area"

        `levy_area` can be `diffrax.BrownianIncrement` (the default),
        `diffrax.SpaceTimeLevyArea` (for solvers such as `SPaRK`, `ShARK` and
        `SRA1`) or `diffrax.SpaceTimeTimeLevyArea`. Across pieces the areas are
        combined by Chen's relation. The choice changes the path drawn from a key.

    !!! tip "Choosing `dt`"

        Set `dt` to the solver's step for fixed steps, and to about the typical step
        for adaptive ones. A query that spans many pieces draws each of them, so do
        not make `dt` much smaller than the steps. `dt=None` makes one piece of the
        whole interval: a virtual Brownian tree that descends from the shared node.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{kidger2021efficient,
            title={Efficient and Accurate Gradients for Neural {SDE}s},
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            booktitle={Advances in Neural Information Processing Systems},
            year={2021}
        }
        ```

        The bridges of the Lévy areas are those of
        ```bibtex
        @misc{jelincic2024singleseed,
            title={Single-seed generation of {B}rownian paths and integrals for
                   adaptive and high order {SDE} solvers},
            author={Jelin{\\v{c}}i{\\v{c}}, Andra{\\v{z}} and Foster, James and
                    Kidger, Patrick},
            year={2024},
            eprint={2405.06464},
            archivePrefix={arXiv}
        }
        ```
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    tol: Real[Array, ""]
    dt: Real[Array, ""]
    shape: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)
    levy_area: type[BrownianIncrement | SpaceTimeLevyArea | SpaceTimeTimeLevyArea] = (
        eqx.field(static=True)
    )
    key: PyTree[PRNGKeyArray]

    def __init__(
        self,
        t0: RealScalarLike,
        t1: RealScalarLike,
        tol: RealScalarLike,
        shape: tuple[int, ...] | PyTree[jax.ShapeDtypeStruct],
        key: PRNGKeyArray,
        levy_area: type[
            BrownianIncrement | SpaceTimeLevyArea | SpaceTimeTimeLevyArea
        ] = BrownianIncrement,
        dt: RealScalarLike | None = None,
    ):
        """**Arguments:**

        - `t0`: the start of the interval. Must be at most the `t0` passed to
            `diffrax.diffeqsolve`.
        - `t1`: the end of the interval. Must be at least the `t1` passed to
            `diffrax.diffeqsolve`.
        - `tol`: the width below which the tree inside a piece stops splitting. As for
            `diffrax.VirtualBrownianTree`, points closer than `tol` may not have the
            exact joint law; steps that fall on the pieces do not depend on it.
        - `shape`: a PyTree of `jax.ShapeDtypeStruct`s giving the shape, floating or
            complex dtype and PyTree structure of the output, or a tuple of integers
            for a single array of the default floating dtype.
        - `key`: a JAX random key, as from `jax.random.key(seed)`.
        - `levy_area`: `diffrax.BrownianIncrement`, `diffrax.SpaceTimeLevyArea` or
            `diffrax.SpaceTimeTimeLevyArea`: which Lévy areas to generate besides
            the increments.
        - `dt`: the length of the pieces, usually the solver's step. `None` means a
            single piece covering `[t0, t1]`.
        """
        if levy_area not in (
            BrownianIncrement,
            SpaceTimeLevyArea,
            SpaceTimeTimeLevyArea,
        ):
            raise ValueError(
                "`levy_area` must be one of `diffrax.BrownianIncrement`, "
                "`diffrax.SpaceTimeLevyArea` or `diffrax.SpaceTimeTimeLevyArea`, "
                f"but got {levy_area}."
            )
        shape = path_shape(shape)
        with jax.numpy_dtype_promotion("standard"):
            times = [t0, t1, tol] + ([] if dt is None else [dt])
            time_dtype = jnp.result_type(*times, float)
        t0, t1, tol = (jnp.asarray(x, time_dtype) for x in (t0, t1, tol))
        t1 = check_in_interval(
            t1,
            "t1",
            t0,
            np.inf,
            "The interval must not be empty.",
            lower_name="t0",
            upper_name="inf",
        )
        length = t1 - t0
        dt = length if dt is None else jnp.asarray(dt, time_dtype)
        dt = check_in_interval(
            dt,
            "dt",
            0,
            length,
            "Pass the solver's step, or `dt=None` for a single piece.",
            upper_name="t1 - t0",
        )
        tol = check_in_interval(
            tol,
            "tol",
            dt * 2.0**-_MAX_DEPTH,
            np.inf,
            f"`tol` must be positive, and a tree deeper than {_MAX_DEPTH} levels "
            "per piece is not supported: make `dt` smaller instead.",
            lower_name="dt * 2**-32",
            upper_name="inf",
        )
        self.t0 = t0
        self.t1 = t1
        self.tol = tol
        self.dt = dt
        self.shape = shape
        self.levy_area = levy_area
        leaves, treedef = jtu.tree_flatten(shape)
        self.key = jtu.tree_unflatten(treedef, list(jr.split(key, len(leaves))))

    #
    # Pieces
    #

    @property
    def _time_dtype(self):
        return self.t0.dtype

    def _snap(self) -> Real[Array, ""]:
        scale = jnp.maximum(jnp.abs(self.t0), jnp.abs(self.t1))
        return _SNAP_ULPS * jnp.finfo(self._time_dtype).eps * scale

    def _num_pieces(self) -> Int[Array, ""]:
        count = jnp.ceil((self.t1 - self.t0 - self._snap()) / self.dt)
        return jnp.maximum(count, 1).astype(jnp.int32)

    def _depth(self) -> Int[Array, ""]:
        depth = jnp.ceil(jnp.log2(self.dt / self.tol))
        return jnp.clip(depth, 0, _MAX_DEPTH).astype(jnp.int32)

    def _piece_bounds(self, n: Int[Array, ""]) -> tuple[Array, Array]:
        start = self.t0 + n.astype(self._time_dtype) * self.dt
        last = n == self._num_pieces() - 1
        after = self.t0 + (n + 1).astype(self._time_dtype) * self.dt
        end = jnp.where(last, self.t1, after)
        return start, end

    def _locate(
        self, x: Real[Array, ""], right: bool
    ) -> tuple[Int[Array, ""], Real[Array, ""]]:
        """The piece holding `x` and the position of `x` in it, in [0, 1]. A point on a
        boundary counts as the start of the piece after it, or with `right=True` as
        the end of the piece before it."""
        num_pieces = self._num_pieces()
        n = jnp.floor((x - self.t0) / self.dt)
        last = (num_pieces - 1).astype(self._time_dtype)
        n = jnp.clip(n, 0, last).astype(jnp.int32)
        start, end = self._piece_bounds(n)
        u = jnp.clip((x - start) / (end - start), 0, 1)
        snap = self._snap()
        u = jnp.where(x - start <= snap, 0, u)
        u = jnp.where(end - x <= snap, 1, u)
        if right:
            move = (u == 0) & (n > 0)
            return jnp.where(move, n - 1, n), jnp.where(move, 1, u)
        move = (u == 1) & (n < num_pieces - 1)
        return jnp.where(move, n + 1, n), jnp.where(move, 0, u)

    def _piece(self, n: Int[Array, ""]) -> tuple[list[lv.Levy], list[PRNGKeyArray]]:
        """The increment of piece `n` over [0, 1], and the keys of its tree."""
        values, tree_keys = [], []
        for key, struct in zip(
            jtu.tree_leaves(self.key), jtu.tree_leaves(self.shape), strict=True
        ):
            total_key, tree_key = jr.split(jr.fold_in(key, n))
            values.append(
                lv.sample(
                    total_key,
                    self.levy_area,
                    struct.shape,
                    struct.dtype,
                    self._time_dtype,
                )
            )
            tree_keys.append(tree_key)
        return values, tree_keys

    def _split(self, node: _Node, tree_keys, at) -> list[lv.Levy]:
        """The increments over [node.s, at] of every leaf."""
        return [
            lv.bridge(
                _node_key(k, node.level, node.index), v, at - node.s, self.levy_area
            )
            for k, v in zip(tree_keys, node.value, strict=True)
        ]

    @staticmethod
    def _child(node: _Node, left: list[lv.Levy], at, go_left) -> _Node:
        right = [lv.difference(a, b) for a, b in zip(left, node.value, strict=True)]
        return _Node(
            value=_where(go_left, left, right),
            s=jnp.where(go_left, node.s, at),
            e=jnp.where(go_left, at, node.e),
            level=node.level + 1,
            index=2 * node.index + jnp.where(go_left, 0, 1).astype(node.index.dtype),
        )

    def _tail(self, node: _Node, tree_keys, x, depth) -> list[lv.Levy]:
        """The increments over [node.s, x]: halve down to depth `depth`, then split the
        leaf at `x` itself. Draws nothing when `x` is an end of `node`."""

        def cond_fun(carry):
            _, nd = carry
            return (nd.s < x) & (x < nd.e)

        def body_fun(carry):
            acc, nd = carry
            at = jnp.where(nd.level < depth, (nd.s + nd.e) / 2, x)
            left = self._split(nd, tree_keys, at)
            go_left = x <= at
            skipped = [lv.concatenate(a, b) for a, b in zip(acc, left, strict=True)]
            return _where(go_left, acc, skipped), self._child(nd, left, at, go_left)

        init = ([lv.zero(v) for v in node.value], node)
        acc, nd = lax.while_loop(cond_fun, body_fun, init)
        whole = [lv.concatenate(a, b) for a, b in zip(acc, nd.value, strict=True)]
        return _where(x == nd.e, whole, acc)

    def _within_piece(self, n, u, v) -> list[lv.Levy]:
        """The increments over [u, v] inside piece `n`, in the piece's coordinates."""
        root, tree_keys = self._piece(n)
        depth = self._depth()

        def cond_fun(nd):
            mid = (nd.s + nd.e) / 2
            return (nd.level < depth) & (u < v) & ((v <= mid) | (u >= mid))

        def body_fun(nd):
            mid = (nd.s + nd.e) / 2
            return self._child(nd, self._split(nd, tree_keys, mid), mid, v <= mid)

        time_dtype = self._time_dtype
        top = _Node(
            value=root,
            s=jnp.zeros((), time_dtype),
            e=jnp.ones((), time_dtype),
            level=jnp.zeros((), jnp.int32),
            index=jnp.zeros((), jnp.uint32),
        )
        node = lax.while_loop(cond_fun, body_fun, top)

        # Both tails run through one traced loop, so that the bridge (and its random
        # number generation) is compiled once.
        def tail(k, ends):
            to_x = self._tail(node, tree_keys, jnp.where(k == 0, u, v), depth)
            return _where(k == 0, (to_x, ends[1]), (ends[0], to_x))

        zero = [lv.zero(x) for x in root]
        to_u, to_v = lax.fori_loop(0, 2, tail, (zero, zero))
        return [lv.difference(a, b) for a, b in zip(to_u, to_v, strict=True)]

    def _increment(self, a, b) -> list[lv.Levy]:
        """The increments over [a, b], a <= b, of every leaf."""
        n_a, u_a = self._locate(a, right=False)
        n_b, u_b = self._locate(b, right=True)
        # `a == b` on a boundary: the two conventions put `b` one piece before `a`.
        empty = n_b < n_a
        n_b = jnp.where(empty, n_a, n_b)
        u_b = jnp.where(empty, u_a, u_b)

        # Every piece from `n_a` to `n_b` through one traced body: whole pieces in
        # the middle, where the descents below take no steps, cost one draw each.
        def add_piece(n, acc):
            u = jnp.where(n == n_a, u_a, 0)
            v = jnp.where(n == n_b, u_b, 1)
            start, end = self._piece_bounds(n)
            part = [lv.scale(x, end - start) for x in self._within_piece(n, u, v)]
            return [lv.concatenate(x, y) for x, y in zip(acc, part, strict=True)]

        time_dtype = self._time_dtype
        zero = [
            lv.zeros(struct, self.levy_area, time_dtype)
            for struct in jtu.tree_leaves(self.shape)
        ]

        def one_piece():
            start, end = self._piece_bounds(n_a)
            return [lv.scale(x, end - start) for x in self._piece(n_a)[0]]

        # The common case of a fixed-step solve, a step that is exactly one piece,
        # skips the loops' overhead. (Under `jax.vmap` with batched times `lax.cond`
        # runs both branches: one extra draw.)
        whole_piece = (n_a == n_b) & (u_a == 0) & (u_b == 1)
        return lax.cond(
            whole_piece,
            one_piece,
            lambda: lax.fori_loop(n_a, n_b + 1, add_piece, zero),
        )

    @eqx.filter_jit
    def evaluate(
        self,
        t0: RealScalarLike,
        t1: RealScalarLike | None = None,
        left: bool = True,
        use_levy: bool = False,
    ) -> PyTree[Array] | AbstractBrownianIncrement:
        """Implements `diffrax.AbstractBrownianPath.evaluate`.

        With `t1 < t0` this returns the increment run backwards in time, as
        `diffrax.VirtualBrownianTree` does: `dt` and `W` (and `K`) change sign, `H`
        does not.
        """
        del left
        # The path is a function of its times, not a differentiable one: JAX cannot
        # reverse-differentiate the descents' while loops, and solvers and adjoints
        # (ours included) differentiate with respect to everything in the terms.
        self = jtu.tree_map(
            lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, self
        )
        t0 = nondifferentiable(t0, name="t0")
        if t1 is None:
            s, t = self.t0, jnp.asarray(t0, self._time_dtype)
        else:
            t1 = nondifferentiable(t1, name="t1")
            s, t = (jnp.asarray(x, self._time_dtype) for x in (t0, t1))
        s, t = eqx.error_if(
            (s, t),
            (jnp.minimum(s, t) < self.t0) | (jnp.maximum(s, t) > self.t1),
            "BrownianInterval was queried outside its interval [t0, t1]: pass "
            "`t0`/`t1` to BrownianInterval that cover the solve's `t0`/`t1`.",
        )
        values = self._increment(jnp.minimum(s, t), jnp.maximum(s, t))
        sign = jnp.where(t < s, -1, 1)
        values = [
            jtu.tree_map(lambda x: jnp.astype(sign, x.dtype) * x, v) for v in values
        ]
        increments = [lv.to_increment(v, self.levy_area) for v in values]
        treedef = jtu.tree_structure(self.shape)
        out = levy_tree_transpose(self.shape, jtu.tree_unflatten(treedef, increments))
        return out if use_levy else out.W
