"""The backward solve and quadrature of the Gauss–Legendre adjoint, resolved from its
options and the forward solve's, and the check of their outcome."""

import math
from typing import TYPE_CHECKING

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractAdaptiveStepSizeController,
    ClipStepSizeController,
    ConstantStepSize,
    RESULTS,
    StepTo,
)
from jaxtyping import PyTree

from .._diffrax_internals import result_index, result_messages
from .common import nan_where, raise_where
from .gl_backsolve import BackwardSolve, Outcome, Quadrature
from .gl_quadrature import GaussRule


if TYPE_CHECKING:
    from .gauss_legendre import GaussLegendreAdjoint


# The adjoint's name in its messages.
NAME = "GaussLegendreAdjoint"
# Backward steps per batched vector-Jacobian product, for a small state.
_STEPS_PER_CHUNK = 16


class Setup(eqx.Module):
    """The backward solve and quadrature, as resolved from the adjoint's options and
    the forward solve's."""

    backward: BackwardSolve
    quadrature: Quadrature
    jumps: list
    steps: list
    throw: bool = eqx.field(static=True)


def _epsilon(y0: PyTree) -> float:
    dtypes = [
        jnp.result_type(x) for x in jtu.tree_leaves(y0) if eqx.is_inexact_array(x)
    ]
    return max(
        (float(jnp.finfo(d).eps) for d in dtypes), default=float(jnp.finfo(float).eps)
    )


def _tolerance(value: float | None, fallback, floor: float):
    """The tolerance set by the user, else `fallback` (a controller's, perhaps an
    array) raised to `floor`: a Python float where possible, so that error messages
    can print it."""
    if value is not None:
        return value
    if isinstance(fallback, (int, float, np.floating)):
        return max(float(fallback), floor)
    return jnp.maximum(fallback, floor)


def _backward_stepping(user, forward, dt0, direction, time_dtype):
    """How the backward solve steps: `(adaptive controller or None, fixed step or
    None, jump times, step times)` from the controller passed to the adjoint (in the
    user's time) or else the forward solve's (already in normalised time)."""
    if user is None:
        controller = forward
    elif isinstance(user, StepTo):
        raise ValueError(
            f"`{NAME}(stepsize_controller=diffrax.StepTo(...))` cannot be used: "
            "the backward solve also stops at every saved time, jump and knot. "
            f"Pass `{NAME}(stepsize_controller=diffrax.ConstantStepSize(), "
            "dt0=...)` or an adaptive controller."
        )
    else:
        controller = user.wrap(direction)
    jumps, steps = [], []
    if isinstance(controller, ClipStepSizeController):
        # Its times become stops of the backward solve, which clips its steps itself.
        if controller.jump_ts is not None:
            jumps.append(controller.jump_ts)
        if controller.step_ts is not None:
            steps.append(controller.step_ts)
        controller = controller.controller
    if isinstance(controller, StepTo):
        # The forward grid, backwards: one step between consecutive grid times.
        steps.append(controller.ts)
        return None, jnp.asarray(jnp.inf, time_dtype), jumps, steps
    if isinstance(controller, ConstantStepSize):
        if dt0 is None:
            raise ValueError(
                f"The backward solve of `{NAME}()` takes constant steps but has no "
                f"step size: pass `{NAME}(dt0=...)`."
            )
        return None, dt0, jumps, steps
    if isinstance(controller, AbstractAdaptiveStepSizeController):
        return controller, None, jumps, steps
    raise ValueError(
        f"`{NAME}()` cannot run its backward solve with the step size controller "
        f"`{type(controller).__name__}`. Pass one with "
        f"`{NAME}(stepsize_controller=diffrax.PIDController(rtol=..., atol=...))` "
        "or `diffrax.ConstantStepSize()` with `dt0=...`."
    )


def _quadrature(self: "GaussLegendreAdjoint", adaptive, y0) -> Quadrature:
    """The rule and its tolerance: the adjoint's, else the backward controller's,
    raised to the rounding level of the two rules' difference."""
    floor = 1000 * _epsilon(y0)
    if adaptive is None:
        rtol = atol = max(1e-6, floor)
    else:
        rtol, atol = getattr(adaptive, "rtol", 1e-6), getattr(adaptive, "atol", 1e-6)
    chunk_size = self.steps_per_chunk
    if chunk_size is None:
        # The nodes' batch holds the vector field's intermediate values at every node:
        # for a large state, fewer steps at a time keep it to a few times the memory of
        # `RecursiveCheckpointAdjoint` (measured: 17x at a state of 1024 with 16).
        size = sum(math.prod(jnp.shape(x)) for x in jtu.tree_leaves(y0))
        chunk_size = min(_STEPS_PER_CHUNK, max(1, 512 // max(size, 1)))
    return Quadrature(
        rule=GaussRule(self.n_nodes),
        chunk_size=chunk_size,
        max_refinements=self.max_refinements,
        rtol=_tolerance(self.quadrature_rtol, rtol, floor),
        atol=_tolerance(self.quadrature_atol, atol, floor),
    )


def backward_setup(
    self: "GaussLegendreAdjoint",
    *,
    solver,
    stepsize_controller,
    dt0,
    max_steps,
    throw,
    direction,
    y0,
    time_dtype,
    num_stops,
) -> Setup:
    """Resolves the backward solve's solver, controller, step and tolerances."""
    options = self.kwargs
    dt0 = options.get("dt0", dt0)
    dt0 = None if dt0 is None else jnp.abs(jnp.asarray(dt0, time_dtype))
    adaptive, step, jumps, steps = _backward_stepping(
        options.get("stepsize_controller"),
        stepsize_controller,
        dt0,
        direction,
        time_dtype,
    )
    # Each stop ends a backward step that the forward solve need not have taken.
    num_stops += sum(math.prod(jnp.shape(x)) for x in jumps + steps)
    max_steps = options.get(
        "max_steps", None if max_steps is None else max_steps + num_stops
    )
    backward = BackwardSolve(
        solver=options.get("solver", solver),
        controller=adaptive,
        dt0=dt0,
        step=step,
        max_steps=max_steps,
    )
    return Setup(
        backward=backward,
        quadrature=_quadrature(self, adaptive, y0),
        jumps=jumps,
        steps=steps,
        throw=options.get("throw", throw),
    )


def _format(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "as set on the controller"


def check_outcome(outcome: Outcome, setup: Setup, forward_result, cotangents):
    """NaN cotangents, or with `throw=True` an error, for a backward solve that failed
    or a quadrature whose error estimate is above tolerance."""
    quadrature = setup.quadrature
    accurate = outcome.accurate
    solved = outcome.result == RESULTS.successful
    inaccurate = solved & jnp.logical_not(accurate)
    bad = jnp.logical_not(solved & accurate)
    if setup.throw:
        backward_failed = jnp.logical_not(solved) & (
            forward_result == RESULTS.successful
        )
        max_steps = setup.backward.max_steps
        messages = [
            f"The backward solve of `{NAME}` failed: {m} Change the backward solve "
            f"with `{NAME}(solver=..., stepsize_controller=..., dt0=..., "
            "max_steps=...)`."
            for m in result_messages()
        ]
        messages[result_index(RESULTS.max_steps_reached)] = (
            f"The backward solve of `{NAME}` reached the maximum number of solver "
            f"steps (max_steps={max_steps}). Pass a larger "
            f"`{NAME}(max_steps=...)`, or take larger backward steps with "
            f"`{NAME}(stepsize_controller=...)`."
        )
        backward_failed = raise_where(
            backward_failed, messages, result_index(outcome.result)
        )
        inaccurate = raise_where(
            inaccurate,
            f"The quadrature of `{NAME}` did not reach its tolerance "
            f"(quadrature_rtol={_format(quadrature.rtol)}, "
            f"quadrature_atol={_format(quadrature.atol)}) after halving the backward "
            f"steps {quadrature.max_refinements} times, so the parameter gradient "
            "would be inaccurate. Take smaller backward steps "
            f"(`{NAME}(stepsize_controller=..., dt0=...)`), allow more halvings "
            f"(`{NAME}(max_refinements=...)`), or loosen `quadrature_rtol` and "
            "`quadrature_atol`.",
        )
        bad = bad | backward_failed | inaccurate
    return nan_where(bad, cotangents)
