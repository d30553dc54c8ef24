"""The check that guards `ReversibleAdjoint`'s gradient: did the backward pass rebuild
the initial state?

If running the solver backwards is unstable (a small coupling or damping, a
dissipative problem for reversible Heun, a long float32 solve), the reconstructed
states drift from the true ones and the gradient taken along them is wrong. The
reconstructed initial state and solver state are the one place where the truth is
known, so they are compared with it: element by element, relative to the element's
size at the start and at the end of the solve, so that neither a small state nor a
small element of a leaf that also holds large ones slips through. Elements far
smaller than the largest of their array are measured against a floor at a fraction
of it, as their rounding comes from the values they are computed with. The tolerance
and the floor were chosen from the measured cases in `docs/reliability.md`
(`benchmarks/reconstruction_check.py`).
"""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree


RECONSTRUCTION_TOL = 1e-3
# The floor, as a power of the dtype's epsilon, relative to the array's largest
# element: eps**(1/3) is 6e-6 in float64, 5e-3 in float32.
FLOOR_POWER = 1 / 3


def _leaf_error(true, rebuilt, final, floor_power) -> Array:
    if not eqx.is_inexact_array(true) or true.size == 0:
        return jnp.zeros(())
    size = jnp.maximum(jnp.abs(true), jnp.abs(final))
    eps = jnp.finfo(true.dtype).eps
    floor = jnp.asarray(eps**floor_power, size.dtype) * jnp.max(size)
    scale = jnp.maximum(size, floor)
    # Tiny in the dtype's terms: an all-zero array must compare exactly.
    scale = jnp.maximum(scale, jnp.finfo(size.dtype).tiny)
    error = jnp.abs(true - rebuilt) / scale
    # NaN counts as the largest error.
    return jnp.where(jnp.isnan(error), jnp.inf, error).max().astype(jnp.float32)


def reconstruction_error(
    true: PyTree, rebuilt: PyTree, final: PyTree, floor_power: float = FLOOR_POWER
) -> Array:
    """The largest relative error of `rebuilt` against `true` over every inexact
    array element, each measured against the larger of its sizes in `true` and
    `final` (the state at the end of the solve), floored at `eps**floor_power` times
    the largest such size in its array."""
    errors = jtu.tree_map(
        lambda a, b, c: _leaf_error(a, b, c, floor_power), true, rebuilt, final
    )
    return jtu.tree_reduce(jnp.maximum, errors, jnp.zeros((), jnp.float32))


def not_finite(tree: PyTree) -> Bool[Array, ""]:
    """Whether any inexact array element of `tree` is NaN or infinite."""
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    flags = [jnp.any(~jnp.isfinite(x)) for x in leaves]
    return jnp.any(jnp.stack(flags)) if flags else jnp.array(False)
