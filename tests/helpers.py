"""Problems and checks shared by the test files.

Every problem is a small neural differential equation whose parameters, initial value
and (for CDEs) control coefficients are all differentiated, so that one gradient
comparison covers `y0`, `args` and `terms` at once.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import diffrax_extras as dxe


# float64: the reversible adjoint reconstructs states to rounding error only.
EXACT = 1e-10
T0, T1 = 0.0, 1.0
DEFAULT_DT0 = 0.05
SAVE_TS = np.linspace(0.13, 0.97, 6)
JUMP_TS = np.array([0.31, 0.52])
STEP_TS = np.array([0.77])
CDE_KNOTS = np.linspace(T0, T1, 11)
# The adaptive SDE solves take up to ~900 steps (ReversibleHeun with a PID controller
# rejects about as many steps as it accepts on a Brownian path), and how many moves
# with rounding: compiled without XLA's optimisations the same solve takes 1,073.
# Twice that leaves room for another CPU's rounding; the bound costs no compile time
# (measured: 1024 against 2048).
MAX_STEPS = 2048


def backprop(max_steps: int = MAX_STEPS) -> dfx.RecursiveCheckpointAdjoint:
    """The reference gradient: backpropagation through every step of a solve of at
    most `max_steps` steps, each step's state stored. The same exact gradient of the
    discretised solve as the default `RecursiveCheckpointAdjoint()`, quicker to
    compile (no recomputation schedule: 20-30% less tracing and compiling per
    gradient), and free of diffrax 0.7.2's float32 cotangent doubling under its
    default checkpointing (docs/reliability.md#float32)."""
    return dfx.RecursiveCheckpointAdjoint(checkpoints=max_steps)


CONTROLLERS: dict[str, Callable[[], Any]] = {
    "constant": lambda: dfx.ConstantStepSize(),
    "step_to": lambda: dfx.StepTo(ts=jnp.linspace(T0, T1, 23)),
    "pid": lambda: dfx.PIDController(rtol=1e-3, atol=1e-5),
    "clip": lambda: dfx.ClipStepSizeController(
        dfx.PIDController(rtol=1e-3, atol=1e-5),
        jump_ts=jnp.asarray(JUMP_TS),
        step_ts=jnp.asarray(STEP_TS),
    ),
}

SAVEATS: dict[str, Callable[[], dfx.SaveAt]] = {
    "t1": lambda: dfx.SaveAt(t1=True),
    "t0_t1_ts": lambda: dfx.SaveAt(t0=True, t1=True, ts=jnp.asarray(SAVE_TS)),
    "steps": lambda: dfx.SaveAt(steps=True),
    "subs_fn": lambda: dfx.SaveAt(
        subs=[
            dfx.SubSaveAt(
                ts=jnp.asarray(SAVE_TS),
                fn=lambda t, y, args: jtu.tree_leaves(y)[0] ** 2,
            ),
            dfx.SubSaveAt(t1=True, steps=3, fn=lambda t, y, args: jtu.tree_leaves(y)),
        ]
    ),
}


class PyTreeField(eqx.Module):
    """A vector field on the PyTree state `{"x": (2,), "v": (3,)}`."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        z = jnp.concatenate([y["x"], y["v"]])
        out = self.mlp(z) * (1 + t) * args
        return {"x": out[:2], "v": out[2:]}


class CDEField(eqx.Module):
    mlp: eqx.nn.MLP
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __call__(self, t, y, args):
        return (self.mlp(y) * args).reshape(self.hidden, self.channels)


class Drift(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y) * args


class AdditiveDiffusion(eqx.Module):
    weight: jax.Array

    def __call__(self, t, y, args):
        return self.weight * args


class Diffusion(eqx.Module):
    weight: jax.Array

    def __call__(self, t, y, args):
        return jnp.tanh(self.weight * y[:, None])


def _mlp(n_in, n_out, key, dtype):
    return eqx.nn.MLP(n_in, n_out, 8, 2, activation=jnp.tanh, key=key, dtype=dtype)


def make_problem(kind: str, dtype=jnp.float64):
    """Returns `(params, build)`: `params` is a PyTree of everything differentiated;
    `build(params) -> (terms, y0, args)`."""
    k1, k2, k3 = jr.split(jr.PRNGKey(5678), 3)
    if kind == "ode":
        params = dict(
            field=PyTreeField(_mlp(5, 5, k1, dtype)),
            y0={
                "x": jnp.array([0.5, -0.2], dtype),
                "v": jnp.array([0.1, 0.3, -0.4], dtype),
            },
            args=jnp.array(1.3, dtype),
        )

        def build_ode(p):
            return dfx.ODETerm(p["field"]), p["y0"], p["args"]

        build = build_ode

    elif kind == "cde":
        hidden, channels = 3, 2
        ts = jnp.asarray(CDE_KNOTS, dtype)
        xs = jnp.stack([ts, jnp.sin(4 * ts)], axis=-1)
        params = dict(
            field=CDEField(
                _mlp(hidden, hidden * channels, k1, dtype), hidden, channels
            ),
            coeffs=dfx.backward_hermite_coefficients(ts, xs),
            y0=jnp.array([0.2, -0.1, 0.4], dtype),
            args=jnp.array(0.9, dtype),
        )

        def build_cde(p):
            control = dfx.CubicInterpolation(ts, p["coeffs"])
            return dfx.ControlTerm(p["field"], control).to_ode(), p["y0"], p["args"]

        build = build_cde

    elif kind in ("sde", "sde_levy", "sde_additive"):
        # "sde_levy" and "sde_additive" also sample the space-time Levy area that SRK
        # solvers need; "sde_additive" has additive noise, for ShARK and SRA1.
        # "sde" and "sde_levy" use our BrownianInterval, with pieces of the default
        # step (adaptive controllers query inside them); "sde_additive" diffrax's
        # VirtualBrownianTree, so that both kinds of path are covered.
        levy_area = dfx.BrownianIncrement if kind == "sde" else dfx.SpaceTimeLevyArea
        if kind == "sde_additive":
            bm = dfx.VirtualBrownianTree(
                T0, T1, tol=2**-10, shape=(3,), key=k3, levy_area=levy_area
            )
        else:
            bm = dxe.BrownianInterval(
                T0, T1, 2**-10, (3,), k3, levy_area=levy_area, dt=DEFAULT_DT0
            )
        params = dict(
            drift=Drift(_mlp(3, 3, k1, dtype)),
            diffusion=(AdditiveDiffusion if kind == "sde_additive" else Diffusion)(
                0.5 * jr.normal(k2, (3, 3), dtype)
            ),
            y0=jnp.array([0.3, -0.5, 0.1], dtype),
            args=jnp.array(0.8, dtype),
        )

        def build_sde(p):
            terms = dfx.MultiTerm(
                dfx.ODETerm(p["drift"]), dfx.ControlTerm(p["diffusion"], bm)
            )
            return terms, p["y0"], p["args"]

        build = build_sde

    else:
        raise ValueError(kind)
    return params, build


def _safe_sum(ys, weight_key=0):
    """A nonlinear scalar loss of saved outputs, ignoring the `inf` padding that
    `SaveAt(steps=True)` leaves in unused slots."""
    total = 0.0
    for i, leaf in enumerate(jtu.tree_leaves(ys)):
        finite = jnp.isfinite(leaf)
        safe = jnp.where(finite, leaf, 0)
        weights = jnp.cos(jnp.arange(leaf.size, dtype=leaf.dtype) + i + weight_key)
        total = total + jnp.sum(
            jnp.where(finite, jnp.sin(safe), 0) * weights.reshape(leaf.shape)
        )
    return total


def make_loss(
    kind: str,
    solver: dfx.AbstractSolver,
    adjoint: dfx.AbstractAdjoint,
    controller: str = "constant",
    saveat: str = "t1",
    dt0: float | None = DEFAULT_DT0,
    max_steps: int = MAX_STEPS,
):
    """A jitted `loss(params)` for one problem, built from the tables above."""
    params, build = make_problem(kind)
    ctrl = CONTROLLERS[controller]()
    save = SAVEATS[saveat]()
    if isinstance(ctrl, dfx.StepTo):
        dt0 = None

    @eqx.filter_jit
    def loss(p):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            terms,
            solver,
            T0,
            T1,
            dt0,
            y0,
            args=args,
            saveat=save,
            stepsize_controller=ctrl,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        return _safe_sum(sol.ys)

    return loss, params


@ft.cache
def grad_of(kind, solver, adjoint, controller="constant", saveat="t1"):
    """The jitted gradient for one configuration, compiled once per test session."""
    loss, params = make_loss(kind, solver, adjoint, controller, saveat)
    return eqx.filter_jit(eqx.filter_grad(loss)), params


def max_relative_error(reference, other, floor: float = 0.0) -> float:
    """The largest, over leaves, of max|reference - other| / max|reference|, the
    scale no smaller than `floor` (for leaves that are zero in exact arithmetic and
    only rounding error in practice)."""
    errors = []
    for a, b in zip(jtu.tree_leaves(reference), jtu.tree_leaves(other), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        scale = max(np.max(np.abs(a), initial=0.0), floor, np.finfo(a.dtype).tiny)
        errors.append(np.max(np.abs(a - b), initial=0.0) / scale)
    return max(errors)


def decay_loss(solver, y0, a, adjoint=None):
    """A forced decay `y' = -a y + sin t` over [0, 1] in 100 steps, in the dtype of
    `y0`: the problem of the reduced-precision tests. `adjoint` defaults to
    `ReversibleAdjoint()`."""
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, a: -a * y + jnp.sin(t)),
        solver,
        jnp.asarray(0.0, y0.dtype),
        jnp.asarray(1.0, y0.dtype),
        jnp.asarray(0.01, y0.dtype),
        y0,
        args=a,
        adjoint=dxe.ReversibleAdjoint() if adjoint is None else adjoint,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys**2)


#
# Reversible solvers: inversion and convergence, shared by every solver's test file.
#


def forward_then_back(solver, terms, y0, args, ts, made_jumps):
    """Steps forward over `ts` with `step`, then back with `backward_step`.

    Returns `(y0 reconstructed, forward dense infos, backward dense infos)`.
    """
    state = solver.init(terms, ts[0], ts[1], y0, args)
    y = y0
    forward, backward = [], []
    for i in range(len(ts) - 1):
        y, _, dense, state, _ = solver.step(
            terms, ts[i], ts[i + 1], y, args, state, made_jumps[i]
        )
        forward.append(dense)
    for i in reversed(range(len(ts) - 1)):
        jump_at_t1 = made_jumps[i + 1] if i + 1 < len(ts) - 1 else False
        y, dense, state, _ = solver.backward_step(
            terms, ts[i], ts[i + 1], y, args, state, made_jumps[i], jump_at_t1
        )
        backward.append(dense)
    return y, forward, backward[::-1]


def inversion_errors(solver, kind: str, made_jumps) -> tuple[float, float]:
    """Steps forward over `len(made_jumps)` equal steps of [0, 1] and back.

    Returns the relative errors of the reconstructed `y0` and of the dense output,
    compared where it is used: the interpolated solution at each step's midpoint.
    """
    params, build = make_problem(kind)
    terms, y0, args = build(params)
    ts = np.linspace(T0, T1, len(made_jumps) + 1)

    def midpoints(denses):
        return [
            solver.interpolation_cls(t0=ta, t1=tb, **d).evaluate(0.5 * (ta + tb))
            for ta, tb, d in zip(ts[:-1], ts[1:], denses, strict=True)
        ]

    @jax.jit
    def run():
        y0_back, forward, backward = forward_then_back(
            solver, terms, y0, args, ts, made_jumps
        )
        return y0_back, midpoints(forward), midpoints(backward)

    y0_back, forward, backward = run()
    return max_relative_error(y0, y0_back), max_relative_error(forward, backward)


def fused_vjp_error(solver, kind: str = "ode") -> float:
    """Relative difference between a solver's own `backward_step_vjp` and the default
    of `AbstractReversibleSolver` (reconstruct, then differentiate `step`): in the
    reconstruction and in the cotangents of one step, pulled back from random ones."""
    params, build = make_problem(kind)
    terms, y0, args = build(params)
    t0, t1 = 0.0, 0.1

    def run(backward_step_vjp, y1, state1, ct_y1, ct_dense, ct_state1):
        y0_, dense_, state0_, _, pullback = backward_step_vjp(
            solver, terms, t0, t1, y1, args, state1, False, False, ct_y1, ct_state1
        )
        return (y0_, dense_, state0_), pullback(ct_dense)

    # One compiled program for the step and both pullbacks (eagerly, each of their
    # hundreds of operations compiles on its own: 3-4x the time).
    @jax.jit
    def both():
        state0 = solver.init(terms, t0, t1, y0, args)
        y1, _, dense, state1, _ = solver.step(terms, t0, t1, y0, args, state0, False)
        keys = iter(jr.split(jr.PRNGKey(0), 100))
        cotangents = jtu.tree_map(
            lambda x: jr.normal(next(keys), jnp.shape(x), jnp.result_type(x)),
            (y1, dense, state1),
        )
        ct_y1, ct_dense, ct_state1 = cotangents
        inputs = (y1, state1, ct_y1, ct_dense, ct_state1)
        default = run(dxe.AbstractReversibleSolver.backward_step_vjp, *inputs)
        fused = run(type(solver).backward_step_vjp, *inputs)
        return y1, default, fused

    y1, (default_values, default_ct), (fused_values, fused_ct) = both()
    # The reconstruction and the dense output are in units of the state. Some dense
    # leaves (`Reversible`'s offsets between the two states) are zero in exact
    # arithmetic, about 5e-17 from rounding, and rounded differently by the two
    # orders; they are measured on the state's scale, not their own.
    y_scale = max(float(jnp.max(jnp.abs(x))) for x in jtu.tree_leaves(y1))
    return max(
        max_relative_error(default_values, fused_values, floor=y_scale),
        max_relative_error(default_ct, fused_ct),
    )


def reconstruction_error(solver, kind: str = "ode", num_steps: int = 1000) -> float:
    """Relative error of `y0` after `num_steps` steps forward and as many back."""
    params, build = make_problem(kind)
    terms, y0, args = build(params)
    ts = jnp.linspace(T0, T1, num_steps + 1)

    @jax.jit
    def run(y0):
        state = solver.init(terms, ts[0], ts[1], y0, args)

        def fwd(carry, i):
            y, state = carry
            y, _, _, state, _ = solver.step(
                terms, ts[i], ts[i + 1], y, args, state, False
            )
            return (y, state), None

        def bwd(carry, i):
            y, state = carry
            y, _, state, _ = solver.backward_step(
                terms, ts[i], ts[i + 1], y, args, state, False, False
            )
            return (y, state), None

        carry, _ = jax.lax.scan(fwd, (y0, state), jnp.arange(num_steps))
        (y, _), _ = jax.lax.scan(bwd, carry, jnp.arange(num_steps), reverse=True)
        return y

    return max_relative_error(y0, run(y0))


def _rotation_field(t, y, args):
    return jnp.stack([y[1], -y[0]]) * (1 + 0.5 * t)


def measured_order(solver, dts, t1: float = 2.0) -> tuple[float, list[float]]:
    """The convergence order of `solver` on `y' = (1 + t/2) J y`, whose exact solution
    is a rotation by `t + t^2/4`, fitted over the constant step sizes `dts`."""
    theta = t1 + 0.25 * t1**2
    exact = np.array([np.cos(theta), -np.sin(theta)])

    @jax.jit
    def final(dt):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_rotation_field),
            solver,
            0.0,
            t1,
            dt,
            jnp.array([1.0, 0.0]),
            max_steps=20000,
        )
        assert sol.ys is not None
        return sol.ys[-1]

    errors = [float(np.max(np.abs(np.asarray(final(dt)) - exact))) for dt in dts]
    order = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    return float(order), errors


def neural_sde_ys(params, static, y0, key):
    """A neural SDE with the whole stack (ReversibleHeun, BrownianInterval,
    ReversibleAdjoint): its values at five times. Shared by the determinism test and
    the sharding script."""
    model = eqx.combine(params, static)
    bm = dxe.BrownianInterval(0.0, 1.0, 2**-6, (2,), key, dt=0.05)
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: model(y)),
        dfx.ControlTerm(lambda t, y, args: 0.3 * jnp.diag(jnp.tanh(y)), bm),
    )
    sol = dfx.diffeqsolve(
        terms,
        dxe.ReversibleHeun(),
        0.0,
        1.0,
        0.05,
        y0,
        saveat=dfx.SaveAt(ts=jnp.linspace(0.1, 1.0, 5)),
        adjoint=dxe.ReversibleAdjoint(),
        max_steps=20,
    )
    assert sol.ys is not None
    return sol.ys
