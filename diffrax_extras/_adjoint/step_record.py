"""The forward half of a replaying adjoint: diffrax's loop, with a record of the times
of its accepted steps, so that the backward pass can walk the same steps in reverse.

The record holds one time per accepted step (where it ended); where a step starts
after a jump (`jump_ts` of `diffrax.ClipStepSizeController`, which starts the next
step a few ULPs after where the last one ended), that start is kept as well, in a
buffer with one entry per jump. Without `jump_ts` the jump flags are not stored at
all. For a solve of `max_steps` steps that is `max_steps` times (8 bytes in float64),
`max_steps` bytes of jump flags with `jump_ts`, and one time per jump time; under
`jax.vmap` with batched times, once per batch member.
"""

from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import (
    AbstractStepSizeController,
    ClipStepSizeController,
    ConstantStepSize,
    PIDController,
    StepTo,
)
from jaxtyping import Array, Bool, Int, Real

from .._diffrax_internals import buffer_at_set, lax_inner_loop, State, while_loop


class StepRecord(eqx.Module):
    """The accepted steps of a forward solve.

    Step `i` runs from `tprev(i)` to `tnext[i]`. `made_jump[i]` says whether it was
    taken with `made_jump=True`, i.e. just after a jump; it is a Python bool when
    diffrax resolved it at trace time (no `jump_ts`).
    """

    t0: Real[Array, ""]
    tnext: Real[Array, " max_steps"]
    made_jump: Bool[Array, " max_steps"] | bool
    # The start of every step after a jump (but the first step), in order.
    jump_tprev: Real[Array, " max_jumps"] | None
    num_steps: Int[Array, ""]

    def made_jump_at(self, i: Int[Array, ""]) -> Bool[Array, ""] | bool:
        if isinstance(self.made_jump, bool):
            return self.made_jump
        return self.made_jump[i]

    def jumped_into(self, i: Int[Array, ""]) -> Bool[Array, ""] | bool:
        """Whether step `i` started later than step `i - 1` ended (at a jump)."""
        if isinstance(self.made_jump, bool):
            return False
        return self.made_jump[i] & (i > 0)

    def tprev(self, i: Int[Array, ""], jumps: Int[Array, ""]) -> Real[Array, ""]:
        """The start of step `i`, given the number of jumps into steps `1, ..., i`."""
        before = jnp.where(i > 0, self.tnext[jnp.maximum(i - 1, 0)], self.t0)
        if self.jump_tprev is None:
            return before
        after_jump = self.jump_tprev[jnp.maximum(jumps - 1, 0)]
        return jnp.where(self.jumped_into(i), after_jump, before)

    def num_jumps(self) -> Int[Array, ""]:
        """The number of jumps into steps `1, ..., num_steps - 1`."""
        if isinstance(self.made_jump, bool):
            return jnp.array(0, jnp.int32)
        steps = jnp.arange(self.made_jump.shape[0], dtype=jnp.int32)
        into = self.made_jump & (steps > 0) & (steps < self.num_steps)
        return jnp.sum(into, dtype=jnp.int32)


# diffrax's own controllers: only `ClipStepSizeController` makes jumps, at its
# `jump_ts`. A controller of another kind may make any number.
_KNOWN_CONTROLLERS = (ConstantStepSize, StepTo, PIDController, ClipStepSizeController)


def max_jumps(stepsize_controller: AbstractStepSizeController, max_steps: int) -> int:
    """An upper bound on the number of jumps a solve can make: one per jump time of
    every `ClipStepSizeController` (each is passed once), or `max_steps` for a
    controller of unknown kind."""
    is_controller = lambda x: isinstance(x, AbstractStepSizeController)
    controllers = [
        x
        for x in jtu.tree_leaves(stepsize_controller, is_leaf=is_controller)
        if is_controller(x)
    ]
    if any(type(x) not in _KNOWN_CONTROLLERS for x in controllers):
        return max_steps
    count = sum(
        x.jump_ts.shape[0]
        for x in controllers
        if isinstance(x, ClipStepSizeController) and x.jump_ts is not None
    )
    return min(count, max_steps)


def loop_and_record_steps(
    loop: Callable, *, max_steps: int, max_jumps: int, **kwargs: Any
) -> tuple[State, Any, StepRecord]:
    """Runs `diffrax._integrate.loop` and records its accepted steps.

    diffrax's loop takes its outer while loop as an argument; ours wraps the loop's
    body to note the end of every accepted step (and the start of one after a jump).
    Rejected steps leave no trace, so the record is exactly the accepted solve.
    """
    records = []

    def outer_while_loop(cond_fun, body_fun, init_val, *, max_steps, buffers=None):
        time_dtype = jnp.result_type(init_val.tprev)
        # Flags are needed if a step may start after a jump: from `jump_ts`, or for
        # the first step, from `diffeqsolve(..., made_jump=True)`. (`None` for a
        # buffer not kept, so that it stays out of the loop's carry.)
        keep_flags = max_jumps > 0 or init_val.made_jump is not False
        tnext = jnp.full(max_steps, jnp.inf, dtype=time_dtype)
        flags = jnp.zeros(max_steps, dtype=bool) if keep_flags else None
        jump_tprev = jnp.full(max_jumps, jnp.inf, time_dtype) if max_jumps else None

        def _cond(carry):
            return cond_fun(carry[0])

        def _body(carry):
            state, tnext, flags, jump_tprev, num_jumps = carry
            new_state = body_fun(state)
            if flags is None and new_state.made_jump is not False:
                # Jumps that no buffer was sized for: without their times the
                # backward pass would step over the wrong intervals.
                raise NotImplementedError(
                    "The step size controller makes jumps that the reversible "
                    "adjoint did not expect; please report this, with the "
                    "controller used."
                )
            accepted = new_state.num_accepted_steps > state.num_accepted_steps
            i = state.num_accepted_steps
            # Each entry is written once, when its step is accepted: the buffers'
            # in-place writes (no copy of the whole record per step, which under
            # `jax.vmap` with a batched predicate would otherwise be made).
            tnext = buffer_at_set(tnext, i, state.tnext, pred=accepted)
            if flags is not None:
                made_jump = jnp.asarray(state.made_jump)
                flags = buffer_at_set(flags, i, made_jump, pred=accepted)
            if jump_tprev is not None:
                jump_next = accepted & jnp.asarray(new_state.made_jump)
                index = jnp.minimum(num_jumps, max_jumps - 1)
                jump_tprev = buffer_at_set(
                    jump_tprev, index, new_state.tprev, pred=jump_next
                )
                num_jumps = num_jumps + jump_next.astype(jnp.int32)
            return new_state, tnext, flags, jump_tprev, num_jumps

        def _buffers(carry):
            state, tnext, flags, jump_tprev, _ = carry
            own = [x for x in (tnext, flags, jump_tprev) if x is not None]
            return [*([] if buffers is None else [buffers(state)]), *own]

        carry = (init_val, tnext, flags, jump_tprev, jnp.array(0, jnp.int32))
        out = while_loop(
            _cond, _body, carry, max_steps=max_steps, buffers=_buffers, kind="lax"
        )
        # Plain arrays again once the loop is done.
        final_state, tnext, flags, jump_tprev, _ = cast(tuple[Any, ...], out)
        records.append(
            StepRecord(
                t0=jnp.asarray(init_val.tprev),
                tnext=tnext,
                made_jump=False if flags is None else flags,
                jump_tprev=jump_tprev,
                num_steps=jnp.asarray(final_state.num_accepted_steps, jnp.int32),
            )
        )
        return final_state

    final_state, aux_stats = loop(
        max_steps=max_steps,
        inner_while_loop=lax_inner_loop,
        outer_while_loop=outer_while_loop,
        **kwargs,
    )
    (record,) = records
    # diffrax's loop makes `made_jump` a Python bool when it can never change; then
    # neither the flags nor the jump times need keeping.
    if isinstance(final_state.made_jump, bool):
        record = eqx.tree_at(
            lambda r: (r.made_jump, r.jump_tprev),
            record,
            (final_state.made_jump, None),
            is_leaf=lambda x: x is None,
        )
    return final_state, aux_stats, record
