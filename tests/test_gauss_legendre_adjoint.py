"""`GaussLegendreAdjoint` against `RecursiveCheckpointAdjoint` (the gradient of the
discretised solve) and closed forms, whatever the saved times, jumps and controls.

The quadrature adjoint gives the gradient of the continuous problem, so it differs
from the reference by the two solves' errors: the tolerances here keep those below
what is being measured, or a tighter reference is used. Each test compiles its
gradients together, in one program, to keep the file's compilation time down.
"""

import functools as ft
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffrax_extras as dxe

from .helpers import (
    _safe_sum,
    backprop,
    CDE_KNOTS,
    make_problem,
    max_relative_error,
    SAVE_TS,
    T0,
    T1,
)


TIGHT: dict[str, Any] = dict(rtol=1e-11, atol=1e-11)
# The reference, the discretised gradient: every step stored for the solves of at
# most 4096 steps (diffrax's default `max_steps`), recursively checkpointed beyond.
RCP = backprop(4096)
GL = dxe.GaussLegendreAdjoint()
SAVEAT = {
    "t1": dfx.SaveAt(t1=True),
    "t0_t1_ts": dfx.SaveAt(t0=True, t1=True, ts=jnp.asarray(SAVE_TS)),
}


def _both(grad):
    """`grad(params, adjoint)` for the reference and the quadrature adjoint, compiled
    as one program."""
    return eqx.filter_jit(lambda p: (grad(p, RCP), grad(p, GL)))


@ft.cache
def _helper_grads(kind, saveat="t1", reverse=False, dtype=jnp.float64, fixed=False):
    """Reference and quadrature gradients of a nonlinear loss of one helper problem,
    solved with Tsit5 tightly; with `fixed`, the quadrature gradient only, with fixed
    steps a quarter of the knot spacing."""
    params, build = make_problem(kind, dtype)
    # Times in the state's dtype: diffrax promotes the state to the time dtype.
    t0, t1 = jnp.asarray((T1, T0) if reverse else (T0, T1), dtype)
    save = SAVEAT[saveat]
    if save.subs.ts is not None:
        ts = (T0 + T1) - SAVE_TS if reverse else SAVE_TS
        save = eqx.tree_at(lambda s: s.subs.ts, save, jnp.asarray(ts, dtype))
    tols: dict[str, Any] = TIGHT if dtype == jnp.float64 else dict(rtol=1e-6, atol=1e-6)
    dt0 = None
    controller: Any = dfx.PIDController(**tols)
    if kind == "cde" and fixed:
        controller = dfx.ConstantStepSize()
        dt0 = jnp.asarray(np.diff(CDE_KNOTS)[0] / 4, dtype)
    elif kind == "cde":
        # Stepping to the control's knots keeps the reference (the gradient of the
        # discretised solve) accurate: across a knot, where the cubic's second
        # derivative jumps, its error is 5e-4 at these tolerances.
        controller = dfx.ClipStepSizeController(
            controller, jump_ts=jnp.asarray(CDE_KNOTS)
        )

    @eqx.filter_grad
    def grad(p, adjoint):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            terms,
            dfx.Tsit5(),
            t0,
            t1,
            dt0,
            y0,
            args=args,
            saveat=save,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=4096,
        )
        return _safe_sum(sol.ys)

    if fixed:
        return eqx.filter_jit(grad)(params, GL)
    return _both(grad)(params)


def test_neural_ode_with_pytree_state_and_saved_times():
    # Gradients w.r.t. a PyTree y0, args and the MLP at once; the two solves' floor.
    # Measured: 2e-10.
    reference, quadrature = _helper_grads("ode", "t0_t1_ts")
    assert max_relative_error(reference, quadrature) < 1e-8


def test_backwards_in_time():
    # t1 < t0: diffrax negates time; the stops and knots follow it. Measured: 1e-10.
    reference, quadrature = _helper_grads("ode", "t0_t1_ts", reverse=True)
    assert max_relative_error(reference, quadrature) < 1e-8


def test_neural_cde_over_cubic_interpolation():
    # `backward_hermite_coefficients` through `ControlTerm(...).to_ode()`, gradients
    # w.r.t. the coefficients included; the backward solve stops at the knots.
    # Adaptive steps (stepping to the knots): measured 1e-10.
    reference, adaptive = _helper_grads("cde", "t0_t1_ts")
    assert max_relative_error(reference, adaptive) < 1e-8
    # Fixed steps of a quarter of the knot spacing. Here the discretised gradient is
    # not the reference: its steps end within rounding of the knots, where a stage
    # takes the derivative of the cubic (the same from both sides) as a function of
    # one piece's coefficients or the other's, 7% of the coefficients' gradient in
    # the wrong piece. The continuous gradient does not depend on this; against the
    # adaptive reference, measured 1e-8 (Tsit5's error at h = 0.025).
    fixed = _helper_grads("cde", "t0_t1_ts", fixed=True)
    assert max_relative_error(reference, fixed) < 1e-6


def _oscillator(theta, t, y):
    return jnp.stack([y[1], -theta[0] * y[0] - theta[1] * y[1]])


class _Forced(eqx.Module):
    """A neural ODE with a time-dependent forcing: y' = mlp(y) + w sin(3 t)."""

    mlp: eqx.nn.MLP
    forcing: jax.Array

    def __call__(self, t, y, args):
        return self.mlp(y) - 0.3 * y + self.forcing * jnp.sin(3 * t)


def test_long_solves_saving_only_the_end():
    # Only SaveAt(t1=True): one interval between saved times spans the whole solve.
    # A damped oscillator over 10 periods (one 8-point rule over the solve was 28%
    # off), and a neural ODE with time-dependent forcing. Measured: 1e-9 and 3e-10.
    forced = _Forced(
        eqx.nn.MLP(3, 3, 8, 2, activation=jnp.tanh, key=jr.key(0)),
        jnp.array([0.5, -0.3, 0.2]),
    )
    params = (jnp.array([4.0, 0.1]), forced)
    controller = dfx.PIDController(rtol=1e-10, atol=1e-10)

    @eqx.filter_grad
    def grad(p, adjoint):
        theta, field = p
        kwargs: dict[str, Any] = dict(
            stepsize_controller=controller, adjoint=adjoint, max_steps=100_000
        )
        oscillator = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, th: _oscillator(th, t, y)),
            dfx.Tsit5(),
            0.0,
            10 * np.pi,
            None,
            jnp.array([1.0, 0.0]),
            args=theta,
            **kwargs,
        )
        neural = dfx.diffeqsolve(
            dfx.ODETerm(field), dfx.Tsit5(), 0.0, 10.0, None, jnp.ones(3), **kwargs
        )
        assert oscillator.ys is not None and neural.ys is not None
        return jnp.sum(oscillator.ys**2) + oscillator.ys[0, 0] + _safe_sum(neural.ys)

    reference, quadrature = _both(grad)(params)
    for leaf in range(2):
        assert max_relative_error(reference[leaf], quadrature[leaf]) < 1e-4, leaf


def test_jump_and_step_times():
    # The vector field switches at a declared jump (the quadrature was not split
    # there: 8.6% off); a declared step time is stepped to. Measured: 2e-10.
    def field(t, y, theta):
        return jnp.where(t < 0.37, -theta[0] * y, theta[1] * jnp.sin(y) + t)

    controller = dfx.ClipStepSizeController(
        dfx.PIDController(rtol=1e-10, atol=1e-10),
        jump_ts=jnp.array([0.37]),
        step_ts=jnp.array([0.61]),
    )

    @jax.grad
    def grad(theta, adjoint):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            jnp.array([1.0, 0.5]),
            args=theta,
            stepsize_controller=controller,
            adjoint=adjoint,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    reference, quadrature = _both(grad)(jnp.array([1.3, 0.8]))
    assert max_relative_error(reference, quadrature) < 1e-8


class _CDEField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y).reshape(3, 2)


def _linear_cde_grads(solver, dt0, adjoint):
    """A neural CDE over a piecewise-linear control with knots at 0, 1, ..., 10, as in
    diffrax's SDE-GAN discriminator: `ODETerm + ControlTerm`, fixed steps."""
    ts = jnp.arange(11.0)
    mlp = eqx.nn.MLP(3, 6, 16, 1, activation=jnp.tanh, key=jr.key(0))
    params = (mlp, jnp.stack([ts / 10, jnp.sin(ts)], -1))

    @eqx.filter_grad
    def grad(p):
        mlp, xs = p
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -0.1 * y),
            dfx.ControlTerm(_CDEField(mlp), dfx.LinearInterpolation(ts, xs)),
        )
        sol = dfx.diffeqsolve(
            terms, solver, 0.0, 10.0, dt0, jnp.array([0.1, 0.2, -0.3]), adjoint=adjoint
        )
        assert sol.ys is not None
        return jnp.sum(jnp.sin(sol.ys))

    return grad, params


def test_linear_control_with_fixed_steps():
    # At dt0 = 1 every backward step spans one linear piece, and its last stage sat
    # on the knot below it, where the control's derivative (taken from the left) is
    # the slope of the piece below: the parameter gradient was 385% off (Tsit5) and
    # the data gradient far too large. The reference is the continuous gradient:
    # the discretised one at dt0 = 1/64, whose own solver error is far smaller.
    # Measured against it, Tsit5: GL 7e-7 (RecursiveCheckpoint 3e-6,
    # BacksolveAdjoint 3e-6); ReversibleHeun, second order: GL 2.8e-2
    # (RecursiveCheckpoint and BacksolveAdjoint 5.6e-2), its own solver error.
    exact, params = _linear_cde_grads(dfx.Tsit5(), 1 / 64, RCP)
    tsit5, _ = _linear_cde_grads(dfx.Tsit5(), 1.0, GL)
    heun, _ = _linear_cde_grads(dfx.ReversibleHeun(), 1.0, GL)
    heun_rcp, _ = _linear_cde_grads(dfx.ReversibleHeun(), 1.0, RCP)
    grads = eqx.filter_jit(lambda p: (exact(p), tsit5(p), heun(p), heun_rcp(p)))
    exact, tsit5, heun, heun_rcp = grads(params)
    assert max_relative_error(exact, tsit5) < 1e-5
    # No better than the discrete gradient of the same solver could be expected.
    assert max_relative_error(exact, heun) < max_relative_error(exact, heun_rcp)


def test_linear_control_with_adaptive_steps():
    # A `ControlTerm` over a piecewise-linear control stepped to its knots, whose
    # derivative jumps at every knot. Measured: 3e-10.
    knots = jnp.linspace(0.0, 1.0, 6)
    xs = jnp.stack([knots, jnp.cos(7 * knots)], axis=-1)
    weight = 0.7 * jnp.cos(jnp.arange(8.0)).reshape(4, 2)
    params = (weight, xs, jnp.array([0.3, -0.4]), jnp.array(1.1))
    controller = dfx.ClipStepSizeController(dfx.PIDController(**TIGHT), jump_ts=knots)

    class Field(eqx.Module):
        weight: jax.Array

        def __call__(self, t, y, args):
            return (self.weight @ jnp.tanh(y)).reshape(2, 2) * args

    @eqx.filter_grad
    def grad(p, adjoint):
        weight, xs, y0, args = p
        term = dfx.ControlTerm(Field(weight), dfx.LinearInterpolation(knots, xs))
        sol = dfx.diffeqsolve(
            term,
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            y0,
            args=args,
            saveat=dfx.SaveAt(ts=jnp.array([0.45, 1.0])),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=4096,
        )
        assert sol.ys is not None
        return jnp.sum(jnp.sin(sol.ys))

    reference, quadrature = _both(grad)(params)
    assert max_relative_error(reference, quadrature) < 1e-8


def test_multiterm_with_a_karhunen_loeve_control():
    # The Wong–Zakai training ODE of docs/wong_zakai.md: drift plus diffusion times a
    # 16-mode smooth path, default SaveAt(t1=True) (the docs' snippet was 2.8x off).
    # Measured: 4e-9.
    params, build = make_problem("sde")
    path = dxe.KarhunenLoevePath(T0, T1, (3,), jr.key(6), 16)

    @eqx.filter_grad
    def grad(p, adjoint):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            dxe.WongZakai(terms).ode_terms(path),
            dfx.Tsit5(),
            T0,
            T1,
            None,
            y0,
            args=args,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            adjoint=adjoint,
            max_steps=4096,
        )
        return _safe_sum(sol.ys)

    reference, quadrature = _both(grad)(params)
    assert max_relative_error(reference, quadrature) < 1e-4


# y' = -y + theta sin(omega t), y(0) = 0, L = y(T): a(t) = exp(t - T), so
# dL/dtheta = int_0^T exp(t - T) sin(omega t) dt, in closed form.
_OMEGA, _T = 20.0, 2.0
_EXACT = (np.sin(_OMEGA * _T) - _OMEGA * np.cos(_OMEGA * _T) + _OMEGA * np.exp(-_T)) / (
    1 + _OMEGA**2
)


@ft.cache
def _forced_decay_grad():
    """The gradient with the backward solve in fixed steps of 0.5, over which the
    integrand turns through 10 radians: each step must be cut into pieces.
    `adjoint` options are traced where they can be, to share one program."""

    def grad(theta, **options):
        def loss(theta):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, th: -y + th * jnp.sin(_OMEGA * t)),
                dfx.Tsit5(),
                0.0,
                _T,
                None,
                jnp.array(0.0),
                args=theta,
                stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
                adjoint=dxe.GaussLegendreAdjoint(
                    stepsize_controller=dfx.ConstantStepSize(), dt0=0.5, **options
                ),
            )
            assert sol.ys is not None
            return sol.ys[-1]

        return jax.grad(loss)(theta)

    return grad


def test_refinement_reaches_the_tolerance_or_gives_nan():
    grad = _forced_decay_grad()
    theta = jnp.array(1.0)
    refined = jax.jit(grad)(theta)
    # Limited by a(t) = exp(t - T) read from the interpolation of 0.5-long Tsit5
    # steps (the quadrature itself is within its 1e-6). Measured: 3e-7.
    assert abs(float(refined) - _EXACT) < 1e-5 * abs(_EXACT)
    # Without halving, the 4-point rule on a 10-radian step cannot be trusted; nor can
    # any result against an impossible tolerance: NaN, never a number.
    coarse = jax.jit(ft.partial(grad, max_refinements=0, throw=False))(theta)
    impossible = ft.partial(grad, quadrature_rtol=0.0, quadrature_atol=0.0, throw=False)
    assert np.isnan(coarse) and np.isnan(jax.jit(impossible)(theta))
    # `throw` defaults to the forward solve's, True: an error that says what to do.
    with pytest.raises(
        Exception, match=r"quadrature .* did not reach.*max_refinements"
    ):
        jax.block_until_ready(jax.jit(ft.partial(grad, max_refinements=0))(theta))


# Saved times of the polynomial problems below: dy/dt = p(t), L = sum_i y(t_i), so
# that a = (number of saves still ahead) is piecewise constant and the gradient
# integrals are polynomials, between saves one backward step with no halving.
_POLYNOMIAL_SAVES = np.array([0.2, 0.55, 1.0])


def _sum_at_saves(field, args, **adjoint_kwargs):
    adjoint = dxe.GaussLegendreAdjoint(
        3,
        stepsize_controller=dfx.ConstantStepSize(),
        dt0=1.0,
        max_refinements=0,
        **adjoint_kwargs,
    )
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5(),
        0.0,
        1.0,
        0.1,
        jnp.zeros(()),
        args=args,
        saveat=dfx.SaveAt(ts=jnp.asarray(_POLYNOMIAL_SAVES)),
        adjoint=adjoint,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys)


def test_exact_for_polynomials():
    # dy/dt = sum_k theta_k t^k: dL/dtheta_k = sum_i t_i^(k+1) / (k+1) exactly. The
    # 3-node rule must integrate degree 5 exactly and degree 6 not. (A tolerance of 1
    # lets the degree 6 term through, to see its error.)
    degree = 6

    def loss(theta):
        def f(t, y, args):
            return jnp.sum(args * t ** jnp.arange(degree + 1.0)) * jnp.ones_like(y)

        return _sum_at_saves(f, theta, quadrature_rtol=1.0)

    grads = jax.jit(jax.grad(loss))(jnp.ones(degree + 1))
    exact = np.array(
        [np.sum(_POLYNOMIAL_SAVES ** (k + 1)) / (k + 1) for k in range(degree + 1)]
    )
    np.testing.assert_allclose(grads[:-1], exact[:-1], rtol=1e-12, atol=0)
    assert abs(grads[-1] - exact[-1]) > 1e-6


def test_only_the_differentiated_inputs_are_integrated():
    # dy/dt = smooth + rough * t^6, `args = (smooth, rough)`: at the default
    # tolerance the rough leaf's integral is above its error estimate, so its
    # gradient is NaN. The gradient with respect to `smooth` alone must not integrate
    # `rough`: exact, not NaN for a leaf nobody differentiates.
    def loss(smooth, rough):
        def f(t, y, args):
            return (args[0] + args[1] * t**6) * jnp.ones_like(y)

        return _sum_at_saves(f, (smooth, rough), throw=False)

    one = jnp.array(1.0)
    assert np.all(np.isnan(jax.jit(jax.grad(loss, argnums=(0, 1)))(one, one)))
    smooth = jax.jit(jax.grad(loss))(one, one)
    np.testing.assert_allclose(smooth, np.sum(_POLYNOMIAL_SAVES), rtol=1e-12, atol=0)

    # Nor hold it: with respect to `y0` alone, no parameter-sized integral. Measured
    # (float64, width 64): 0.017 MB of temporaries, against 0.255 MB when the
    # parameters were integrated anyway (about 7x their bytes).
    mlp = eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    params_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))

    def end(params, y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, p: eqx.combine(p, static)(y)),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            y0,
            args=params,
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
            adjoint=GL,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    grad = jax.jit(jax.grad(end, argnums=1))
    analysis = grad.lower(params, jnp.array([1.0, 0.5])).compile().memory_analysis()
    assert analysis is not None
    assert analysis.temp_size_in_bytes < params_bytes


def test_vmap_over_members_taking_different_numbers_of_steps():
    # Oscillators of different frequencies take different numbers of backward steps;
    # the batch runs until the last member is done, the others masked.
    def solve(theta, adjoint):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, th: _oscillator(th, t, y)),
            dfx.Tsit5(),
            0.0,
            3.0,
            None,
            jnp.array([1.0, 0.0]),
            args=theta,
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
            adjoint=adjoint,
        )

    def loss(theta):
        ys = solve(theta, GL).ys
        assert ys is not None
        return jnp.sum(ys**2)

    thetas = jnp.array([[1.0, 0.1], [9.0, 0.2], [36.0, 0.3]])
    steps = jax.jit(jax.vmap(lambda th: solve(th, GL).stats["num_steps"]))(thetas)
    assert len(set(np.asarray(steps).tolist())) == 3, steps
    batched = jax.jit(jax.vmap(jax.grad(loss)))(thetas)
    one = jax.jit(jax.grad(loss))
    for i in range(3):
        np.testing.assert_allclose(batched[i], one(thetas[i]), rtol=1e-12, atol=0)


def test_float32():
    params32, build = make_problem("ode", jnp.float32)
    params64 = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, params32
    )

    @eqx.filter_grad
    def grad(p, adjoint, rtol):
        terms, y0, args = build(p)
        dtype = jax.tree.leaves(y0)[0].dtype
        sol = dfx.diffeqsolve(
            terms,
            dfx.Tsit5(),
            jnp.asarray(T0, dtype),
            jnp.asarray(T1, dtype),
            None,
            y0,
            args=args,
            saveat=SAVEAT["t1"],
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            adjoint=adjoint,
        )
        return _safe_sum(sol.ys)

    reference, quadrature = eqx.filter_jit(
        lambda p64, p32: (grad(p64, RCP, 1e-11), grad(p32, GL, 1e-6))
    )(params64, params32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(quadrature))
    # Limited by the float32 solve at rtol = atol = 1e-6. Measured: 5e-6.
    assert max_relative_error(reference, quadrature) < 1e-4


def test_time_scales_far_from_one():
    # The same problem on [0, c] for c = 1e-3, 1, 1e3, time rescaled so that the loss
    # and its gradient do not depend on c.
    params, build = make_problem("ode")

    @eqx.filter_grad
    def grad(p, scale, adjoint):
        terms, y0, args = build(p)
        assert isinstance(terms, dfx.ODETerm)
        field = terms.vector_field

        def scaled(t, y, args):
            return jax.tree.map(lambda x: x / scale, field(t / scale, y, args))

        sol = dfx.diffeqsolve(
            dfx.ODETerm(scaled),
            dfx.Tsit5(),
            0.0,
            scale,
            None,
            y0,
            args=args,
            saveat=dfx.SaveAt(ts=scale * jnp.asarray(SAVE_TS)),
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            adjoint=adjoint,
        )
        return _safe_sum(sol.ys)

    both = eqx.filter_jit(lambda p, c: (grad(p, c, RCP), grad(p, c, GL)))
    for scale in (1e-3, 1.0, 1e3):
        reference, quadrature = both(params, jnp.asarray(scale))
        # Measured: 3e-10 at every scale.
        assert max_relative_error(reference, quadrature) < 1e-8, scale


def test_forward_controllers_solvers_and_backward_options():
    # y' = -theta y, L = sum_i |y(t_i)|^2, whose gradient is known in closed form,
    # with: a forward StepTo, solved backwards on the same grid (it used to fail: its
    # grid is increasing); ConstantStepSize, with the same step; a solver wrapped in
    # `diffrax.HalfSolver`; and Euler forwards with the backward solve's own solver,
    # controller, (negative) dt0 and max_steps; Heun, whose solver state is `None`
    # (it used to fail), with fixed and adaptive steps. The solvers' error bounds the
    # agreement: measured 7e-12, 6e-12, 3e-9, 3e-5 (Euler at dt = 1e-4), 1e-5 (Heun
    # at dt = 0.01) and 5e-8 (Heun at rtol 1e-7).
    y0 = jnp.array([1.0, 2.0])
    theta = jnp.array(0.8)
    options = dxe.GaussLegendreAdjoint(
        solver=dfx.Dopri5(),
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        dt0=-0.01,
        max_steps=500,
    )
    pid = dfx.PIDController(rtol=1e-10, atol=1e-10)
    configurations = [
        (dfx.Tsit5(), dfx.StepTo(ts=jnp.linspace(T0, T1, 21)), None, GL, 1e-7),
        (dfx.Tsit5(), dfx.ConstantStepSize(), 0.05, GL, 1e-7),
        (dfx.HalfSolver(dfx.Tsit5()), pid, None, GL, 1e-7),
        (dfx.Euler(), dfx.ConstantStepSize(), 1e-4, options, 1e-3),
        (dfx.Heun(), dfx.ConstantStepSize(), 0.01, GL, 1e-4),
        (dfx.Heun(), dfx.PIDController(rtol=1e-7, atol=1e-7), None, GL, 1e-6),
    ]

    def grad(configuration):
        solver, controller, dt0, adjoint, _ = configuration

        def loss(theta, y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, th: -th * y),
                solver,
                T0,
                T1,
                dt0,
                y0,
                args=theta,
                saveat=dfx.SaveAt(ts=jnp.asarray(SAVE_TS)),
                stepsize_controller=controller,
                adjoint=adjoint,
                max_steps=10_001,
            )
            assert sol.ys is not None
            return jnp.sum(sol.ys**2)

        return jax.grad(loss, argnums=(0, 1))(theta, y0)

    ts = jnp.asarray(SAVE_TS)[:, None]
    decay = jnp.exp(-2 * theta * ts)
    exact = (
        jnp.sum(-2 * ts * y0[None, :] ** 2 * decay),
        jnp.sum(2 * y0[None, :] * decay, axis=0),
    )
    grads = eqx.filter_jit(lambda: [grad(c) for c in configurations])()
    for configuration, quadrature in zip(configurations, grads, strict=True):
        tolerance = configuration[-1]
        assert max_relative_error(exact, quadrature) < tolerance, configuration


def test_parameters_closed_over_by_the_vector_field():
    # The model captured by the vector field instead of passed as `args`: converted to
    # explicit inputs of the adjoint's `custom_vjp` (else a `CustomVJPException`).
    def loss(a, adjoint):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -a * jnp.tanh(y) + jnp.sin(a * t)),
            dfx.Tsit5(),
            0.0,
            1.0,
            None,
            jnp.array([1.0, 2.0]),
            saveat=dfx.SaveAt(ts=jnp.asarray(SAVE_TS)),
            stepsize_controller=dfx.PIDController(**TIGHT),
            adjoint=adjoint,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    reference, quadrature = _both(jax.grad(loss))(jnp.array([0.7, 1.3]))
    assert max_relative_error(reference, quadrature) < 1e-8
