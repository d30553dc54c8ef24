"""Where the backward solve of `GaussLegendreAdjoint` must stop: every time at which the
integrand of the parameter gradient may fail to be smooth, so that no step and no
quadrature rule straddles it.

These are the saved times (where the adjoint jumps by the loss's gradient and the
state is reset to its saved value), the `jump_ts` of the forward controller (the vector
field jumps), the knots of interpolated controls (their derivative, or a higher one,
jumps), and times that the backward solve should step to without restarting (the
forward controller's `step_ts`, the grid of a forward `StepTo`).
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Real


class Stops(eqx.Module):
    """The stops of the backward solve, in the backward time `s = -t` (ascending), for
    a forward solve normalised to run forwards in time from `t0`."""

    s: Real[Array, " stops"]
    # Just under each stop: a step that would end above it ends on it instead.
    floor: Real[Array, " stops"]
    # The index of the saved output at this stop, or -1.
    save: Int[Array, " stops"]
    # Whether the solver must restart after this stop: its first-same-as-last
    # evaluation of the vector field is stale once the state is reset or the vector
    # field jumps.
    restart: Bool[Array, " stops"]

    def __len__(self) -> int:
        return self.s.shape[0]

    def at(self, i: Int[Array, ""]) -> Real[Array, ""]:
        return self.s[jnp.minimum(i, len(self) - 1)]


def make_stops(
    t0: Real[Array, ""],
    save_ts: Real[Array, " saves"],
    *,
    jumps: list[Real[Array, " _"]],
    steps: list[Real[Array, " _"]],
) -> Stops:
    """The stops from `t0` to the last saved time (nothing after it matters to the
    loss). `jumps` are times where the vector field may jump; `steps` times to step to
    without restarting. All are clipped into `[t0, save_ts[-1]]`."""
    dtype = save_ts.dtype
    t0 = jnp.asarray(t0, dtype)
    t_last = save_ts[-1]
    num_saves = save_ts.shape[0]
    times = [jnp.reshape(t0, (1,)), save_ts]
    save = [jnp.full(1, -1, jnp.int32), jnp.arange(num_saves, dtype=jnp.int32)]
    restart = [jnp.zeros(1, bool), jnp.ones(num_saves, bool)]
    for group, jump in [(x, True) for x in jumps] + [(x, False) for x in steps]:
        group = jnp.ravel(jnp.asarray(group, dtype))
        # Padding (`inf`, `nan`) and times outside the solve become harmless repeats
        # of its ends.
        group = jnp.where(jnp.isfinite(group), group, t_last)
        group = jnp.clip(group, t0, t_last)
        times.append(group)
        save.append(jnp.full(group.shape, -1, jnp.int32))
        restart.append(jnp.full(group.shape, jump, bool))
    s = -jnp.concatenate(times)
    order = jnp.argsort(s, stable=True)
    s = s[order]
    # As diffrax's own loop rounds a step ending within 100 ULP of `t1` onto `t1`, so
    # that no interval of dense output is too short to evaluate accurately. ULPs of
    # the largest time: near a time of 0 its own ULP would be far too fine.
    ulp = jnp.abs(jnp.spacing(jnp.max(jnp.abs(s))))
    floor = s - 100 * ulp
    return Stops(
        s=s,
        floor=floor,
        save=jnp.concatenate(save)[order],
        restart=jnp.concatenate(restart)[order],
    )
