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
of it, as their rounding comes from the values they are computed with. The solver
state (the `z` of the coupling, the `v` of the leapfrog) is measured against the
largest element of each of its arrays: it enters a step scaled by the step, and held
to the elementwise measure it refused right gradients of damped leapfrogs.

The tolerance and the floors were chosen from 106 measured cases (the table in
`docs/reliability.md`, from `benchmarks/reconstruction_check.py`). No choice separates
every right gradient from every wrong one: how wrong a gradient is for a given error
in the rebuilt state depends on how sensitive the gradient is to the path, which
ranged over seven orders of magnitude. The default misses 5 of 44 wrong gradients and
refuses 11 of 53 right ones.
"""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree


RECONSTRUCTION_TOL = 5e-4
# The floor for the elements of `y`, as a power of the dtype's epsilon, relative to
# its array's largest element: eps**(1/3) is 6e-6 in float64, 5e-3 in float32.
FLOOR_POWER = 1 / 3
# For the solver state, a floor of the array's largest element itself.
STATE_FLOOR_POWER = 0.0
# The fewest roundings of its dtype an element is held to. The default tolerance is
# below the epsilon of float16 (9.8e-4) and of bfloat16 (7.8e-3), where it would
# refuse a reconstruction off by a single rounding, as those of stable solves are
# (1-2 roundings measured over 10 to 1,000 steps); in float32 and float64 the floor is
# far below the tolerance.
MIN_ROUNDINGS = 4


def _leaf_scale(true, final, floor_power) -> Array | None:
    if not eqx.is_inexact_array(true) or true.size == 0:
        return None
    size = jnp.maximum(jnp.abs(true), jnp.abs(final))
    eps = jnp.finfo(true.dtype).eps
    floor = jnp.asarray(eps**floor_power, size.dtype) * jnp.max(size)
    # Tiny in the dtype's terms: an all-zero array must compare exactly.
    floor = jnp.maximum(floor, jnp.finfo(size.dtype).tiny)
    # With no floor below the largest element, one number per array is enough.
    return floor if floor_power == 0 else jnp.maximum(size, floor)


def reconstruction_scale(
    true: PyTree, final: PyTree, floor_power: float = FLOOR_POWER
) -> PyTree:
    """What each element's error is measured against: the larger of its sizes in
    `true` and in `final` (the state at the end of the solve), floored at
    `eps**floor_power` times the largest such size in its array. Computed before the
    backward pass, so that `final` need not outlive it."""
    return jtu.tree_map(lambda a, c: _leaf_scale(a, c, floor_power), true, final)


def reconstruction_error(
    true: PyTree, rebuilt: PyTree, scale: PyTree, tol: float | None = None
) -> Array:
    """The largest relative error of `rebuilt` against `true` over every inexact
    array element, relative to `scale` (from `reconstruction_scale`). Given the
    tolerance `tol`, each element's error is scaled by `tol / max(tol, MIN_ROUNDINGS *
    eps)` for its dtype's `eps`, so that, compared with `tol`, no element is held to
    less than `MIN_ROUNDINGS` roundings."""

    def leaf_error(a, b, c):
        if c is None:
            return jnp.zeros((), jnp.float32)
        error = jnp.abs(a - b) / c
        if tol is not None:
            floor = MIN_ROUNDINGS * float(jnp.finfo(a.dtype).eps)
            error = error * jnp.asarray(tol / max(tol, floor), error.dtype)
        # NaN counts as the largest error.
        return jnp.where(jnp.isnan(error), jnp.inf, error).max().astype(jnp.float32)

    errors = jtu.tree_map(leaf_error, true, rebuilt, scale, is_leaf=lambda x: x is None)
    return jtu.tree_reduce(jnp.maximum, errors, jnp.zeros((), jnp.float32))


def not_finite(tree: PyTree) -> Bool[Array, ""]:
    """Whether any inexact array element of `tree` is NaN or infinite."""
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    flags = [jnp.any(~jnp.isfinite(x)) for x in leaves]
    return jnp.any(jnp.stack(flags)) if flags else jnp.array(False)
