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
from jaxtyping import Array, Bool, Int, PRNGKeyArray, PyTree, Real

from .._diffrax_internals import levy_tree_transpose, nondifferentiable, RealScalarLike
from .._misc import check_in_interval, path_shape
from . import levy as lv


# Node keys are folded from (level, index) with `index < 2**level` as a uint32.
_MAX_DEPTH = 32
# Piece indices are folded into keys as int32.
_MAX_PIECES = 2**31 - 1
# A query time within this many ULPs of a piece boundary is treated as on it, the
# ULPs being those of the larger of |t0| and |boundary|: what `t0 + n * dt` is
# rounded by. Enough to absorb the rounding of `t0 + (t1 - t0) * (k / n)` in
# `diffrax.ConstantStepSize` and of `t0 + k * dt` (measured at most 1.6 ULPs), and no
# more, so that a query far from the boundary's own rounding is never moved.
_SNAP_ULPS = 4


def _where(pred, x: PyTree, y: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), x, y)


def _node_key(tree_key: PRNGKeyArray, level, index) -> PRNGKeyArray:
    return jr.fold_in(jr.fold_in(tree_key, level), index)


class _Point(eqx.Module):
    """A query time inside a node of the tree, as its distance `d`, in units of the
    node's length, from the node's start (`from_end=False`) or its end
    (`from_end=True`).

    Each time is measured from whichever end of its piece is nearer, where its
    distance is exact, and keeps that end all the way down the tree: halving a node
    replaces `d` by `2d` or `2d - 1`, both exact in floating point. The distance
    to the other end of a node, `1 - d`, is exact whenever it is the smaller of the
    two, so every split knows the shorter of its two parts exactly.
    """

    from_end: Bool[Array, ""]
    d: Real[Array, ""]

    def at_start(self) -> Bool[Array, ""]:
        return jnp.where(self.from_end, self.d == 1, self.d == 0)

    def at_end(self) -> Bool[Array, ""]:
        return jnp.where(self.from_end, self.d == 0, self.d == 1)

    def fractions(self) -> tuple[Real[Array, ""], Real[Array, ""]]:
        """The fractions of the node before and after the point."""
        rest = 1 - self.d
        return (
            jnp.where(self.from_end, rest, self.d),
            jnp.where(self.from_end, self.d, rest),
        )

    def halve(self, as_end) -> tuple[Bool[Array, ""], "_Point"]:
        """Whether the point lies in the left half of the node, and the point in that
        half. A point on the midpoint is the end of the left half if `as_end`, else
        the start of the right half."""
        toward_own_end = (self.d < 0.5) | ((self.d == 0.5) & (as_end != self.from_end))
        go_left = toward_own_end != self.from_end
        d = jnp.where(toward_own_end, 2 * self.d, 2 * self.d - 1)
        return go_left, _Point(self.from_end, d)


def _same_point(x: _Point, y: _Point) -> Bool[Array, ""]:
    both_mid = (x.d == 0.5) & (y.d == 0.5)
    return ((x.from_end == y.from_end) & (x.d == y.d)) | both_mid


class _Node(eqx.Module):
    """A node of the dyadic tree inside one piece: its increment (one standardised
    `lv.Levy` per leaf of `shape`), its length as a fraction of the piece, and its
    place in the tree."""

    value: list[lv.Levy]
    h: Real[Array, ""]
    level: Int[Array, ""]
    index: Array


class _Part(eqx.Module):
    """An increment being accumulated: one `lv.Levy` per leaf, and its length."""

    value: list[lv.Levy]
    h: Real[Array, ""]


def _join(x: _Part, y: _Part) -> _Part:
    a, b = lv.fractions(x.h, y.h)
    value = [lv.concatenate(u, v, a, b) for u, v in zip(x.value, y.value, strict=True)]
    return _Part(value, x.h + y.h)


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
    both ends before splitting down to each end.

    So a fixed-step solve whose steps are the pieces (`dt` equal to the solver's `dt0`)
    costs what `diffrax.UnsafeBrownianPath` costs, one draw per step; and unlike
    it, the path is a pure function of `key` and the query, so it can be queried again
    (rejected adaptive steps, checkpoint replay,
    [`diffrax_extras.ReversibleAdjoint`][]), backwards in time, in any order, under
    `jax.vmap`. Compared with `diffrax.VirtualBrownianTree`, which descends from the
    root for both ends of every step, queries inside a piece descend a tree over `dt`
    rather than over $t_1 - t_0$, from the node the two ends share.

    Every query has the exact law of Brownian motion (and of its Lévy areas),
    increments over disjoint intervals are independent, and the joint law of several
    points is exact when no two of them fall in the same leaf of width at most
    `tol`, exactly as for `diffrax.VirtualBrownianTree`. This holds at every time
    scale and in every floating dtype the answer can be represented in (float16 and
    bfloat16 included): each piece and each node is held in its own unit coordinates,
    where its increment and Lévy areas are of order one, and is scaled by the square
    root of its length only when returned. A query time within 4 ULPs of a piece
    boundary (ULPs of that boundary, or of `t0` if larger) is treated as on it, so
    that steps computed as `t0 + k * dt` fall on the pieces.

    !!! info "Consistency"

        The same query gives bitwise the same values however it is asked: in any
        order, repeated, reversed in time (with the signs below), eagerly or inside
        `jax.jit`, and with the path and the times as traced arguments or as
        compile-time constants (a path closed over by a jitted function, Python
        floats as times): the arithmetic of the times is kept out of XLA's constant
        folding. Under `jax.vmap` the members of a batch are bitwise the same
        wherever they sit in it and from one call to the next, and agree with the
        unbatched query to rounding (about one ULP of each quantity), as for
        `diffrax.VirtualBrownianTree`: XLA fuses multiply-adds differently in a
        batched program.

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
            single piece covering `[t0, t1]`. The times are computed in the dtype
            of `t0`, `t1`, `tol` and `dt` (float64 with `jax_enable_x64`, else
            float32, for Python floats), and a piece must be longer than 8 ULPs of
            the largest time in it.
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
        eps = jnp.finfo(time_dtype).eps
        dt = check_in_interval(
            dt,
            "dt",
            2 * _SNAP_ULPS * eps * jnp.maximum(jnp.abs(t0), jnp.abs(t1)),
            np.inf,
            f"Pieces this short cannot be told apart in {jnp.dtype(time_dtype)}: "
            "pass the times in float64 (with `jax_enable_x64`), or a longer `dt`.",
            lower_name=f"{2 * _SNAP_ULPS} * eps * max(|t0|, |t1|)",
            upper_name="inf",
        )
        dt = check_in_interval(
            dt,
            "dt",
            length / _MAX_PIECES,
            np.inf,
            "More than 2**31 - 1 pieces are not supported: pass a longer `dt`.",
            lower_name="(t1 - t0) / (2**31 - 1)",
            upper_name="inf",
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

    @property
    def _fraction_dtype(self):
        # Positions inside a piece and lengths of nodes: at least single precision,
        # so that a tree 32 levels deep is resolved whatever the dtype of the times.
        return lv.compute_dtype(self._time_dtype)

    def _snap(self, boundary) -> Real[Array, ""]:
        """How close to `boundary` a query time is treated as on it."""
        scale = jnp.maximum(jnp.abs(self.t0), jnp.abs(boundary))
        return _SNAP_ULPS * jnp.finfo(self._time_dtype).eps * scale

    def _num_pieces(self) -> Int[Array, ""]:
        # A remainder shorter than two snapping widths joins the last whole piece.
        count = jnp.ceil((self.t1 - self.t0 - 2 * self._snap(self.t1)) / self.dt)
        return jnp.maximum(count, 1).astype(jnp.int32)

    def _depth(self) -> Int[Array, ""]:
        # ceil(log2(dt / tol)), exactly: `log2` is rounded differently by XLA's
        # constant folder and its compiled kernels, and an exact power of two must
        # not gain a level in one and not the other.
        mantissa, exponent = jnp.frexp(self.dt / self.tol)
        depth = jnp.where(mantissa == 0.5, exponent - 1, exponent)
        return jnp.clip(depth, 0, _MAX_DEPTH).astype(jnp.int32)

    def _piece_bounds(self, n: Int[Array, ""], num_pieces) -> tuple[Array, Array]:
        start = self.t0 + n.astype(self._time_dtype) * self.dt
        after = self.t0 + (n + 1).astype(self._time_dtype) * self.dt
        end = jnp.where(n == num_pieces - 1, self.t1, after)
        return start, end

    def _locate(self, x: Real[Array, ""], right: bool) -> tuple[Int[Array, ""], _Point]:
        """The piece holding `x`, and `x` inside it. A point on a boundary counts as
        the start of the piece after it, or with `right=True` as the end of the piece
        before it."""
        num_pieces = self._num_pieces()
        last = num_pieces - 1
        guess = jnp.floor((x - self.t0) / self.dt)
        guess = jnp.clip(guess, 0, last.astype(self._time_dtype)).astype(jnp.int32)
        # The division may be off by one next to a boundary.
        start, end = self._piece_bounds(guess, num_pieces)
        n = guess - (x < start).astype(jnp.int32) + (x > end).astype(jnp.int32)
        n = jnp.clip(n, 0, last)
        start, end = self._piece_bounds(n, num_pieces)
        # Exact (Sterbenz) wherever `x` is near `start` or `end`.
        before = jnp.maximum(x - start, 0)
        after = jnp.maximum(end - x, 0)
        at_start = before <= self._snap(start)
        at_end = (after <= self._snap(end)) & ~(at_start & (before <= after))
        at_start = at_start & ~at_end
        fraction = self._fraction_dtype
        from_end = after < before
        d = jnp.where(from_end, after, before).astype(fraction)
        d = jnp.minimum(d / (end - start).astype(fraction), 0.5)
        zero = jnp.zeros((), fraction)
        if right:
            move = at_start & (n > 0)
            n = jnp.where(move, n - 1, n)
            at_end = at_end | move
            at_start = at_start & ~move
        else:
            move = at_end & (n < last)
            n = jnp.where(move, n + 1, n)
            at_start = at_start | move
            at_end = at_end & ~move
        from_end = jnp.where(at_start, False, jnp.where(at_end, True, from_end))
        d = jnp.where(at_start | at_end, zero, d)
        return n, _Point(from_end, d)

    def _piece(self, n: Int[Array, ""]) -> tuple[list[lv.Levy], list[PRNGKeyArray]]:
        """The standardised increment of piece `n`, and the keys of its tree."""
        values, tree_keys = [], []
        for key, struct in zip(
            jtu.tree_leaves(self.key), jtu.tree_leaves(self.shape), strict=True
        ):
            total_key, tree_key = jr.split(jr.fold_in(key, n))
            values.append(lv.sample(total_key, self.levy_area, struct))
            tree_keys.append(tree_key)
        return values, tree_keys

    def _empty(self) -> _Part:
        value = [
            lv.zeros(struct, self.levy_area) for struct in jtu.tree_leaves(self.shape)
        ]
        return _Part(value, jnp.zeros((), self._fraction_dtype))

    #
    # The tree inside a piece
    #

    def _split(self, node: _Node, tree_keys, p, q) -> tuple[_Part, _Part]:
        """The parts of `node` before and after the fraction `p` of it (and `q` after
        it)."""
        lefts, rights = [], []
        for k, v in zip(tree_keys, node.value, strict=True):
            key = _node_key(k, node.level, node.index)
            left, right = lv.split(key, v, p, q, self.levy_area)
            lefts.append(left)
            rights.append(right)
        return _Part(lefts, node.h * p), _Part(rights, node.h * q)

    @staticmethod
    def _child(node: _Node, left: _Part, right: _Part, go_left) -> _Node:
        index = 2 * node.index + jnp.where(go_left, 0, 1).astype(node.index.dtype)
        return _Node(
            value=_where(go_left, left.value, right.value),
            h=node.h / 2,
            level=node.level + 1,
            index=index,
        )

    def _tail(self, node: _Node, tree_keys, x: _Point, suffix, skip, active, depth):
        """The increment over [x, end of `node`] (`suffix`), or over [start of
        `node`, x]. With `skip`, the first halving keeps only the half holding `x`:
        the increment stops at the node's midpoint. Draws nothing unless `active`.

        One loop for both kinds, so that the bridge is compiled once."""
        half = jnp.full((), 0.5, self._fraction_dtype)

        def cond_fun(carry):
            return ~carry[-1]

        def body_fun(carry):
            nd, pt, acc, skip, _ = carry
            leaf = nd.level >= depth
            p, q = pt.fractions()
            left, right = self._split(
                nd, tree_keys, jnp.where(leaf, p, half), jnp.where(leaf, q, half)
            )
            go_left, child_pt = pt.halve(as_end=~suffix)
            child = self._child(nd, left, right, go_left)
            child_part = _Part(child.value, child.h)
            other = _where(go_left, right, left)
            # The whole child, once `x` reaches its end on the side accumulated.
            reached = jnp.where(suffix, child_pt.at_start(), child_pt.at_end())
            part = _where(
                leaf,
                _where(suffix, right, left),
                _where(reached, child_part, other),
            )
            other_before = jnp.where(suffix, go_left, ~go_left)
            add = leaf | reached | (other_before & ~skip)
            joined = _join(*_where(suffix, (part, acc), (acc, part)))
            acc = _where(add, joined, acc)
            done = leaf | child_pt.at_start() | child_pt.at_end()
            return child, child_pt, acc, jnp.zeros_like(skip), done

        init = (node, x, self._empty(), skip, ~active)
        _, _, acc, _, _ = lax.while_loop(cond_fun, body_fun, init)
        return acc

    def _within_piece(self, n, u: _Point, v: _Point) -> _Part:
        """The increment over [u, v] inside piece `n`, with lengths as fractions of
        the piece."""
        root, tree_keys = self._piece(n)
        depth = self._depth()
        fraction = self._fraction_dtype
        empty = _same_point(u, v)
        half = jnp.full((), 0.5, fraction)

        def cond_fun(carry):
            nd, u, v = carry
            u_left, _ = u.halve(as_end=False)
            v_left, _ = v.halve(as_end=True)
            return (nd.level < depth) & ~empty & (u_left == v_left)

        def body_fun(carry):
            nd, u, v = carry
            left, right = self._split(nd, tree_keys, half, half)
            go_left, u = u.halve(as_end=False)
            _, v = v.halve(as_end=True)
            return self._child(nd, left, right, go_left), u, v

        top = _Node(
            value=root,
            h=jnp.ones((), fraction),
            level=jnp.zeros((), jnp.int32),
            index=jnp.zeros((), jnp.uint32),
        )
        node, u, v = lax.while_loop(cond_fun, body_fun, (top, u, v))

        u_start, v_end = u.at_start(), v.at_end()
        whole = u_start & v_end
        # Both ends inside one leaf: the increment is the difference of the parts up
        # to each, taken from the end of the leaf they are nearer, as in
        # `diffrax.VirtualBrownianTree` (and with the same caveat on the joint law).
        in_leaf = (node.level >= depth) & ~u_start & ~v_end
        p_u, q_u = u.fractions()
        leaf_suffix = q_u < p_u
        suffix = jnp.where(in_leaf, leaf_suffix, jnp.stack([True, False]))
        skip = ~in_leaf & ~u_start & ~v_end
        active = ~empty & ~whole & jnp.stack([~u_start, ~v_end])

        # Both tails through one traced loop, so that the bridge is compiled once.
        def tail(k, ends):
            pt = _where(k == 0, u, v)
            part = self._tail(node, tree_keys, pt, suffix[k], skip, active[k], depth)
            return _where(k == 0, (part, ends[1]), (ends[0], part))

        to_u, to_v = lax.fori_loop(0, 2, tail, (self._empty(), self._empty()))

        def leaf_difference():
            # [u, v] from [s, u] and [s, v]; or from [u, e] and [v, e], which in
            # reversed time are the parts up to v and u of the leaf.
            first, second = _where(leaf_suffix, (to_v, to_u), (to_u, to_v))
            h = second.h - first.h
            a, b = lv.fractions(first.h, h)
            value = []
            for x, z in zip(first.value, second.value, strict=True):
                x, z = (
                    lv.where(leaf_suffix, lv.reverse(x), x),
                    lv.where(leaf_suffix, lv.reverse(z), z),
                )
                y = lv.remove_left(x, z, a, b)
                value.append(lv.where(leaf_suffix, lv.reverse(y), y))
            return _Part(value, h)

        result = lax.cond(in_leaf, leaf_difference, lambda: _join(to_u, to_v))
        result = _where(whole, _Part(node.value, node.h), result)
        return _where(empty, self._empty(), result)

    def _increment(self, a, b) -> _Part:
        """The increment over [a, b], a <= b, with its length in units of time."""
        n_a, u_a = self._locate(a, right=False)
        n_b, u_b = self._locate(b, right=True)
        num_pieces = self._num_pieces()
        fraction = self._fraction_dtype

        def piece_length(n):
            start, end = self._piece_bounds(n, num_pieces)
            return (end - start).astype(fraction)

        # Every piece from `n_a` to `n_b` through one traced body: whole pieces in
        # the middle, where the descents below take no steps, cost one draw each.
        # (With `a == b` on a boundary, `n_b < n_a`: no pieces, the empty increment.)
        def add_piece(n, acc):
            start = _Point(jnp.array(False), jnp.zeros((), fraction))
            end = _Point(jnp.array(True), jnp.zeros((), fraction))
            u = _where(n == n_a, u_a, start)
            v = _where(n == n_b, u_b, end)
            part = self._within_piece(n, u, v)
            return _join(acc, _Part(part.value, part.h * piece_length(n)))

        def one_piece():
            return _Part(self._piece(n_a)[0], piece_length(n_a))

        # The common case of a fixed-step solve, a step that is exactly one piece,
        # skips the loops' overhead. (Under `jax.vmap` with batched times `lax.cond`
        # runs both branches: one extra draw.)
        whole_piece = (n_a == n_b) & u_a.at_start() & u_b.at_end()
        return lax.cond(
            whole_piece,
            one_piece,
            lambda: lax.fori_loop(n_a, n_b + 1, add_piece, self._empty()),
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
        # The same values whether the path and the times are traced or compile-time
        # constants: behind the barrier XLA sees neither, so it cannot fold or
        # simplify the arithmetic of the times differently in the two cases.
        self, s, t = lax.optimization_barrier((self, s, t))
        part = self._increment(jnp.minimum(s, t), jnp.maximum(s, t))
        root_h = jnp.sqrt(part.h)
        backwards = t < s
        increments = []
        for x, struct in zip(part.value, jtu.tree_leaves(self.shape), strict=True):
            x = lv.where(backwards, lv.reverse(x), x)
            increments.append(_to_increment(x, root_h, t - s, struct, self.levy_area))
        treedef = jtu.tree_structure(self.shape)
        out = levy_tree_transpose(self.shape, jtu.tree_unflatten(treedef, increments))
        return out if use_levy else out.W


def _to_increment(
    x: lv.Levy, root_h, dt, struct, levy_area
) -> BrownianIncrement | SpaceTimeLevyArea | SpaceTimeTimeLevyArea:
    """The diffrax increment type in the leaf's dtype: the standardised values
    scaled by the square root of the length, rounded once."""

    def scale(y):
        return jnp.astype(jnp.astype(root_h, y.dtype) * y, struct.dtype)

    dt = jnp.astype(dt, lv.real_dtype(struct.dtype))
    w = scale(x.w)
    if levy_area is BrownianIncrement:
        return BrownianIncrement(dt=dt, W=w)
    assert x.hh is not None
    if levy_area is SpaceTimeLevyArea:
        return SpaceTimeLevyArea(dt=dt, W=w, H=scale(x.hh))
    assert x.kk is not None
    return SpaceTimeTimeLevyArea(dt=dt, W=w, H=scale(x.hh), K=scale(x.kk))
