"""The cotangents of a replaying adjoint's saved outputs, pulled back into the solve.

diffrax's loop writes the outputs of one `SubSaveAt` into one buffer, in this order:
the `t0` entry; then, after each accepted step, the outputs at the `ts` that the step
reached (by its interpolation), followed by the every-`steps`-th output; and last the
`t1` entry (unless the `steps` outputs already end with it). `SavedOutputs` replays
that order to find which entry of the incoming cotangent belongs to which step, and
pulls it back through `SubSaveAt.fn` and, for `ts`, through the interpolation.
"""

from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import SubSaveAt
from jaxtyping import PyTree

from .._diffrax_internals import unvmap_any
from .._misc import materialise_cotangent, tree_add, tree_sum_leading
from .step_record import StepRecord


def fn_vjp(fn, t, y, args, ct) -> tuple[PyTree, PyTree, PyTree]:
    """Cotangents of `(y, args, fn)` through `fn(t, y, args)`; `fn`'s own arrays are
    those of a closure-converted function (a trained read-out, say)."""
    out, vjp_fn = eqx.filter_vjp(lambda _y, _a, _fn: _fn(t, _y, _a), y, args, fn)
    return vjp_fn(materialise_cotangent(out, ct))


class SavedOutputs(eqx.Module):
    """One `SubSaveAt`, the cotangent of its saved outputs, and the step record of the
    forward solve that wrote them.

    Every `pull_back_*` method takes and returns the running cotangents
    `(ct_y, ct_args, ct_fn)` (for `pull_back_ts`, `ct_dense` instead of `ct_y`).
    """

    sub: SubSaveAt
    ct_ys: Any
    record: StepRecord

    def _ct_at(self, index):
        return jtu.tree_map(lambda c: c[index], self.ct_ys)

    @property
    def _t0_offset(self) -> int:
        return 1 if self.sub.t0 else 0

    def _num_ts_reached(self, t):
        # diffrax saves `ts[k]` in the first accepted step whose end is at or after
        # it, so this many outputs at `ts` are written by the end of a step ending at
        # `t`.
        ts = self.sub.ts
        assert ts is not None
        return jnp.searchsorted(ts, t, side="right").astype(jnp.int32)

    def _steps_before(self, i):
        return 0 if self.sub.steps == 0 else i // self.sub.steps

    def _add(self, cts, t, y, args, ct):
        ct_y, ct_args, ct_fn = cts
        dy, dargs, dfn = fn_vjp(self.sub.fn, t, y, args, ct)
        return tree_add(ct_y, dy), tree_add(ct_args, dargs), tree_add(ct_fn, dfn)

    def pull_back_t0(self, cts, t0, y0, args):
        """The `t0` entry."""
        if not self.sub.t0:
            return cts
        return self._add(cts, t0, y0, args, self._ct_at(0))

    def pull_back_trivial(self, cts, t0, tfinal, y_final, args):
        """A solve with `t0 == t1` takes no step and saves `y0` at every `ts`."""
        sub = self.sub
        if sub.ts is None:
            return cts
        start, num_ts = self._t0_offset, len(sub.ts)

        def trivial(_cts):
            ct_ts = jtu.tree_map(lambda c: c[start : start + num_ts], self.ct_ys)
            each = jax.vmap(lambda ct: fn_vjp(sub.fn, t0, y_final, args, ct))(ct_ts)
            return tree_add(_cts, tree_sum_leading(each))

        is_trivial = t0 == tfinal
        # The outer `cond` has an unbatched predicate, so that under `jax.vmap` (where
        # the inner `cond` becomes a `select` that evaluates both branches) the work
        # is skipped whenever no batch member is trivial, which is almost always.
        return lax.cond(
            unvmap_any(is_trivial),
            lambda c: lax.cond(is_trivial, trivial, lambda _c: _c, c),
            lambda c: c,
            cts,
        )

    def pull_back_t1(self, cts, t0, tfinal, y_final, args):
        """The `t1` entry, unless the last every-`steps`-th output was at `t1` and
        diffrax did not write it twice."""
        sub = self.sub
        if not sub.t1:
            return cts
        num_steps = self.record.num_steps
        if sub.steps == 0:
            written = True
        elif sub.steps == 1:
            written = False
        else:
            written = num_steps % sub.steps != 0
        if written is False:
            return cts
        num_ts = 0
        if sub.ts is not None:
            num_ts = jnp.where(t0 == tfinal, len(sub.ts), self._num_ts_reached(tfinal))
        index = self._t0_offset + num_ts + self._steps_before(num_steps)
        ct = jtu.tree_map(lambda c: jnp.where(written, c, 0), self._ct_at(index))
        return self._add(cts, tfinal, y_final, args, ct)

    def pull_back_step(self, cts, i, tprev_next, y1, args):
        """The every-`steps`-th output, saved after accepted step `i` at the start of
        the next step (or the end of the solve)."""
        sub = self.sub
        if sub.steps == 0:
            return cts
        saved = (i + 1) % sub.steps == 0
        num_ts = 0 if sub.ts is None else self._num_ts_reached(self.record.tnext[i])
        index = jnp.maximum(self._t0_offset + num_ts + (i + 1) // sub.steps - 1, 0)
        ct = jtu.tree_map(lambda c: jnp.where(saved, c, 0), self._ct_at(index))
        return self._add(cts, tprev_next, y1, args, ct)

    def pull_back_ts(self, cts, i, solver, tprev, tnext, dense_info, args):
        """The outputs at `ts` that accepted step `i` reached, by its interpolation.
        `cts` is `(ct_dense, ct_args, ct_fn)`."""
        sub = self.sub
        ts = sub.ts
        if ts is None:
            return cts
        tnext_before = self.record.tnext[jnp.maximum(i - 1, 0)]
        k_start = jnp.where(i > 0, self._num_ts_reached(tnext_before), 0)
        k_end = self._num_ts_reached(tnext)
        offset = self._t0_offset + self._steps_before(i)

        def save(_dense_info, _args, _fn, t):
            interpolation = solver.interpolation_cls(t0=tprev, t1=tnext, **_dense_info)
            return _fn(t, interpolation.evaluate(t), _args)

        def cond_fun(carry):
            k, _ = carry
            return k < k_end

        def body_fun(carry):
            k, _cts = carry
            t = ts[k]
            out, vjp_fn = eqx.filter_vjp(
                lambda d, a, f: save(d, a, f, t), dense_info, args, sub.fn
            )
            step_cts = vjp_fn(materialise_cotangent(out, self._ct_at(offset + k)))
            return k + 1, tree_add(_cts, step_cts)

        _, cts = lax.while_loop(cond_fun, body_fun, (k_start, cts))
        return cts
