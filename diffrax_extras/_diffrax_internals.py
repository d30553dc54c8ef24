"""The one module that touches private diffrax and `equinox.internal` names.

diffrax's internals change between releases; keeping every such import here means that
an upgrade of diffrax touches this file only.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
from diffrax import RESULTS
from diffrax._adjoint import (
    _nondiff_solver_controller_state as nondiff_solver_controller_state,
    _only_transpose_ys as only_transpose_ys,
)
from diffrax._custom_types import (
    Args as Args,
    BoolScalarLike as BoolScalarLike,
    DenseInfo as DenseInfo,
    levy_tree_transpose as levy_tree_transpose,
    RealScalarLike as RealScalarLike,
    VF as VF,
    Y as Y,
)
from diffrax._heuristics import is_sde as is_sde, is_unsafe_sde as is_unsafe_sde
from diffrax._integrate import SaveState as SaveState, State as State
from diffrax._saveat import save_y as save_y
from diffrax._term import (
    _CallableToPath as CallableToPath,
    _ControlToODE as ControlToODE,
    WrapTerm as WrapTerm,
)
from jaxtyping import Array, Bool, Int, Real


while_loop = eqxi.while_loop
nondifferentiable = eqxi.nondifferentiable
nondifferentiable_backward = eqxi.nondifferentiable_backward
unvmap_any = eqxi.unvmap_any
error_if = eqxi.error_if

# The while loops that `diffrax._integrate.loop` expects from an adjoint. Ours are never
# differentiated by JAX (our adjoints supply the backward pass), so plain `lax` loops.
lax_inner_loop = ft.partial(eqxi.while_loop, kind="lax")
lax_outer_loop = lax_inner_loop


class StepRecord(eqx.Module):
    """What the backward pass of a replaying adjoint needs to know about the forward
    solve's accepted steps: one entry per accepted step, in order."""

    tprev: Real[Array, " max_steps"]
    tnext: Real[Array, " max_steps"]
    # A Python bool when diffrax resolved `made_jump` at trace time (no `jump_ts`).
    made_jump: Bool[Array, " max_steps"] | bool
    num_steps: Int[Array, ""]

    def made_jump_at(self, i: Int[Array, ""]) -> Bool[Array, ""] | bool:
        if isinstance(self.made_jump, bool):
            return self.made_jump
        return self.made_jump[i]


def loop_and_record_steps(
    loop: Callable, *, max_steps: int, **kwargs: Any
) -> tuple[State, Any, StepRecord]:
    """Runs `diffrax._integrate.loop` and records the accepted steps.

    diffrax's loop takes the outer while loop as an argument; ours wraps its body to
    note the start, end and `made_jump` of every accepted step. (With `jump_ts` the end
    of one step and the start of the next differ by a few ULPs, so both are kept.)
    Rejected steps leave no trace, so the record is exactly the accepted solve.
    """
    records = []
    static_made_jump = []

    def outer_while_loop(cond_fun, body_fun, init_val, *, max_steps, buffers=None):
        del buffers
        time_dtype = jnp.result_type(init_val.tprev)
        record = StepRecord(
            tprev=jnp.full(max_steps, jnp.inf, dtype=time_dtype),
            tnext=jnp.full(max_steps, jnp.inf, dtype=time_dtype),
            made_jump=jnp.zeros(max_steps, dtype=bool),
            num_steps=jnp.array(0, dtype=jnp.int32),
        )

        def _cond(carry):
            state, _ = carry
            return cond_fun(state)

        def _body(carry):
            state, rec = carry
            new_state = body_fun(state)
            # diffrax's loop makes `made_jump` a Python bool when it can never change.
            if isinstance(new_state.made_jump, bool):
                static_made_jump.append(new_state.made_jump)
            accepted = new_state.num_accepted_steps > state.num_accepted_steps
            i = state.num_accepted_steps

            def _put(buffer, value):
                return buffer.at[i].set(jnp.where(accepted, value, buffer[i]))

            rec = StepRecord(
                tprev=_put(rec.tprev, state.tprev),
                tnext=_put(rec.tnext, state.tnext),
                made_jump=_put(rec.made_jump, jnp.asarray(state.made_jump)),
                num_steps=new_state.num_accepted_steps.astype(jnp.int32),
            )
            return new_state, rec

        final_state, rec = eqxi.while_loop(
            _cond, _body, (init_val, record), max_steps=max_steps, kind="lax"
        )
        records.append(rec)
        return final_state

    final_state, aux_stats = loop(
        max_steps=max_steps,
        inner_while_loop=lax_inner_loop,
        outer_while_loop=outer_while_loop,
        **kwargs,
    )
    (record,) = records
    if static_made_jump:
        record = eqx.tree_at(lambda r: r.made_jump, record, static_made_jump[0])
    return final_state, aux_stats, record


def result_messages() -> list[str]:
    """The message of every `diffrax.RESULTS` item, indexed by `result_index`."""
    return list(RESULTS._index_to_message)


def result_index(result: Any) -> Any:
    """The index of a (possibly traced) `diffrax.RESULTS` item in `result_messages`."""
    return result._value


__all__ = [
    "Args",
    "CallableToPath",
    "ControlToODE",
    "BoolScalarLike",
    "DenseInfo",
    "RealScalarLike",
    "SaveState",
    "State",
    "StepRecord",
    "VF",
    "WrapTerm",
    "Y",
    "error_if",
    "is_sde",
    "is_unsafe_sde",
    "lax_inner_loop",
    "lax_outer_loop",
    "loop_and_record_steps",
    "nondifferentiable",
    "nondiff_solver_controller_state",
    "nondifferentiable_backward",
    "only_transpose_ys",
    "result_index",
    "result_messages",
    "save_y",
    "unvmap_any",
    "while_loop",
]
