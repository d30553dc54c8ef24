"""The one module that touches private diffrax and `equinox.internal` names.

diffrax's internals change between releases; keeping every such import here means that
an upgrade of diffrax touches this file only.
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
nondifferentiable = eqxi.nondifferentiable
nondifferentiable_backward = eqxi.nondifferentiable_backward
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
    "nondifferentiable_backward",
    "only_transpose_ys",
    "result_index",
    "result_messages",
    "save_y",
    "unvmap_any",
    "while_loop",
]
