"""The one module that touches private diffrax and `equinox.internal` names.

diffrax's internals change between releases; keeping every such import here means that
an upgrade of diffrax touches this file only. Beyond these names, the package relies on
these behaviours of diffrax's private code, each checked by
`tests/test_diffrax_internals.py` so that an upgrade that changes one fails there:

1. `diffrax._integrate.loop` runs its solve in one call of the `outer_while_loop` it
   is given, as `outer_while_loop(cond_fun, body_fun, init_val, max_steps=...,
   buffers=...)`, over a `State` with `tprev`, `tnext`, `made_jump`,
   `num_accepted_steps`, `y` and `solver_state`; `made_jump` is a Python bool when it
   cannot change.
   (`_adjoint/step_record.py`)
2. It writes a `SubSaveAt`'s outputs in this order: `t0`; after each accepted step
   the `ts` that the step reached (`ts[k] <= tnext`), then the every-`steps`-th
   output, saved at the next step's start; last `t1`, unless the `steps` outputs end
   with it. (`_adjoint/saved_outputs.py`)
3. After a jump of `ClipStepSizeController` the next step starts one or two
   floating-point numbers after the jump time. (`_solver/asynchronous_leapfrog.py`)
4. `diffeqsolve` wraps every term in `WrapTerm(term, direction)` and every
   `SubSaveAt.fn` in a closure, and a callable control of a `ControlTerm` in
   `_CallableToPath(fn)`. (`_adjoint/common.py`)
5. `isinstance` checks against solver classes see through an `AbstractWrappedSolver`
   to its `solver`. (`_solver/reversible.py`)
"""

import functools as ft
from typing import Any

import equinox.internal as eqxi
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
from diffrax._misc import linear_rescale as linear_rescale
from diffrax._saveat import save_y as save_y
from diffrax._term import (
    _CallableToPath as CallableToPath,
    _ControlToODE as ControlToODE,
    WrapTerm as WrapTerm,
)


while_loop = eqxi.while_loop
buffer_at_set = eqxi.buffer_at_set
nondifferentiable = eqxi.nondifferentiable
unvmap_any = eqxi.unvmap_any
error_if = eqxi.error_if

# The while loops that `diffrax._integrate.loop` expects from an adjoint. Ours are never
# differentiated by JAX (our adjoints supply the backward pass), so plain `lax` loops.
lax_inner_loop = ft.partial(eqxi.while_loop, kind="lax")
lax_outer_loop = lax_inner_loop


def result_messages() -> list[str]:
    """The message of every `diffrax.RESULTS` item, indexed by `result_index`."""
    return list(RESULTS._index_to_message)


def result_index(result: Any) -> Any:
    """The index of a (possibly traced) `diffrax.RESULTS` item in `result_messages`."""
    return result._value


__all__ = [
    "Args",
    "BoolScalarLike",
    "buffer_at_set",
    "CallableToPath",
    "ControlToODE",
    "DenseInfo",
    "RealScalarLike",
    "SaveState",
    "State",
    "VF",
    "WrapTerm",
    "Y",
    "error_if",
    "is_sde",
    "is_unsafe_sde",
    "linear_rescale",
    "lax_inner_loop",
    "lax_outer_loop",
    "nondifferentiable",
    "nondiff_solver_controller_state",
    "only_transpose_ys",
    "result_index",
    "result_messages",
    "save_y",
    "unvmap_any",
    "while_loop",
]
