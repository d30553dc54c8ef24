import functools as ft
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffrax_extras as dxe

from .helpers import (
    _safe_sum,
    CDE_KNOTS,
    make_problem,
    max_relative_error,
    SAVE_TS,
    T0,
    T1,
)


# Both the quadrature adjoint and the reference differentiate nearly the same
# problem: the continuous gradient and the discretised solve's differ by the solver's
# error, which these tolerances keep below the quadrature errors being measured.
TIGHT: dict[str, Any] = dict(rtol=1e-11, atol=1e-11)
SAVEAT = {
    "t1": dfx.SaveAt(t1=True),
    "t0_t1_ts": dfx.SaveAt(t0=True, t1=True, ts=jnp.asarray(SAVE_TS)),
}


@ft.cache
def _grad(kind, n_nodes, saveat="t1", reverse=False, dtype=jnp.float64):
    """The jitted gradient of a nonlinear loss of one helper problem, solved tightly
    with Tsit5, compiled once per configuration: with `GaussLegendreAdjoint(n_nodes)`,
    or with `RecursiveCheckpointAdjoint()` for `n_nodes=None`."""
    if n_nodes is None:
        adjoint = dfx.RecursiveCheckpointAdjoint()
    else:
        adjoint = dxe.GaussLegendreAdjoint(n_nodes)
    params, build = make_problem(kind, dtype)
    # Times in the state's dtype: diffrax promotes the state to the time dtype.
    t0, t1 = jnp.asarray((T1, T0) if reverse else (T0, T1), dtype)
    save = SAVEAT[saveat]
    if save.subs.ts is not None:
        ts = (T0 + T1) - SAVE_TS if reverse else SAVE_TS
        save = eqx.tree_at(lambda s: s.subs.ts, save, jnp.asarray(ts, dtype))
    tols: dict[str, Any] = TIGHT if dtype == jnp.float64 else dict(rtol=1e-6, atol=1e-6)
    # Stepping to the control's knots keeps the reference (the gradient of the
    # discretised solve) accurate: across a knot, where the cubic's second derivative
    # jumps, its error is 5e-4 at these tolerances, the quadrature's 8e-9.
    controller = dfx.PIDController(**tols)
    if kind == "cde":
        controller = dfx.ClipStepSizeController(
            controller, jump_ts=jnp.asarray(CDE_KNOTS)
        )

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(p):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            terms,
            dfx.Tsit5(),
            t0,
            t1,
            None,
            y0,
            args=args,
            saveat=save,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=4096,
        )
        return _safe_sum(sol.ys)

    return grad, params


def _error(kind, n_nodes, **kwargs):
    grad_ref, params = _grad(kind, None, **kwargs)
    grad_gl, _ = _grad(kind, n_nodes, **kwargs)
    return max_relative_error(grad_ref(params), grad_gl(params))


def test_error_falls_with_nodes():
    # The PyTree-state neural ODE with several saved times; gradients w.r.t. y0, args
    # and the MLP at once. The error falls until it meets the floor (~1e-10) set by
    # the two solves' tolerances.
    # Measured: 1.7e-3, 5e-7, 1e-10 at 1, 2 and 8 nodes (1e-10 already at 4).
    errors = [_error("ode", n, saveat="t0_t1_ts") for n in (1, 2, 8)]
    for coarse, fine in zip(errors[:-1], errors[1:], strict=True):
        assert fine < 0.2 * coarse or fine < 1e-9, errors
    assert errors[-1] < 1e-8, errors


def test_backwards_in_time():
    assert _error("ode", 8, reverse=True) < 1e-8


def test_neural_cde():
    # A cubic-interpolated control through `ControlTerm(...).to_ode()`, gradients
    # w.r.t. its coefficients included; the quadrature is split at its knots.
    assert _error("cde", 8, saveat="t0_t1_ts") < 1e-8


class _Field(eqx.Module):
    weight: jax.Array

    def __call__(self, t, y, args):
        return (self.weight @ jnp.tanh(y)).reshape(2, 2) * args


def test_linear_control_term_split_at_knots():
    # A `ControlTerm` over a piecewise-linear control, whose derivative jumps at every
    # knot: without the split, quadrature across a jump converges only slowly.
    knots = jnp.linspace(0.0, 1.0, 6)
    xs = jnp.stack([knots, jnp.cos(7 * knots)], axis=-1)
    weight = 0.7 * jnp.cos(jnp.arange(8.0)).reshape(4, 2)
    params = (weight, xs, jnp.array([0.3, -0.4]), jnp.array(1.1))
    controller = dfx.ClipStepSizeController(dfx.PIDController(**TIGHT), jump_ts=knots)

    def loss(p, adjoint):
        weight, xs, y0, args = p
        term = dfx.ControlTerm(_Field(weight), dfx.LinearInterpolation(knots, xs))
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

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    reference = grad(params, dfx.RecursiveCheckpointAdjoint())
    errors = [
        max_relative_error(reference, grad(params, dxe.GaussLegendreAdjoint(n)))
        for n in (1, 8)
    ]
    # Measured: 3e-2 at one node; at 8 nodes the solves' floor.
    assert errors[0] > 1e-3 and errors[1] < 1e-8, errors


@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_exact_for_polynomials(n_nodes):
    # dy/dt = sum_k theta_k t^k, L = sum_i y(t_i): a = (number of saves still ahead)
    # is piecewise constant, so dL/dtheta_k = sum_i t_i^(k+1) / (k+1) exactly, and the
    # rule integrates degree 2n-1 exactly and degree 2n not.
    save_ts = np.array([0.2, 0.55, 1.0])
    degree = 2 * n_nodes

    def loss(theta):
        def f(t, y, args):
            return jnp.sum(args * t ** jnp.arange(degree + 1.0)) * jnp.ones_like(y)

        sol = dfx.diffeqsolve(
            dfx.ODETerm(f),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.zeros(()),
            args=theta,
            saveat=dfx.SaveAt(ts=jnp.asarray(save_ts)),
            adjoint=dxe.GaussLegendreAdjoint(n_nodes),
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys)

    grads = jax.jit(jax.grad(loss))(jnp.ones(degree + 1))
    exact = np.array([np.sum(save_ts ** (k + 1)) / (k + 1) for k in range(degree + 1)])
    np.testing.assert_allclose(grads[:-1], exact[:-1], rtol=1e-12, atol=0)
    assert abs(grads[-1] - exact[-1]) > 1e-6


def test_vmap_of_grad():
    params, build = make_problem("ode")
    adjoint = dxe.GaussLegendreAdjoint(4)

    def loss(p, scale):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            terms, dfx.Tsit5(), T0, T1, 0.05, y0, args=args * scale, adjoint=adjoint
        )
        return _safe_sum(sol.ys)

    grad = eqx.filter_grad(loss)
    scales = jnp.array([0.5, 1.0, 1.5])
    batched = eqx.filter_jit(eqx.filter_vmap(grad, in_axes=(None, 0)))(params, scales)
    one_at_a_time = eqx.filter_jit(grad)
    for i, s in enumerate(scales):
        each = jax.tree.map(lambda x, i=i: x[i], batched)
        assert max_relative_error(one_at_a_time(params, s), each) < 1e-12


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

    a = jnp.array([0.7, 1.3])
    ref = jax.grad(loss)(a, dfx.RecursiveCheckpointAdjoint())
    assert max_relative_error(ref, jax.grad(loss)(a, dxe.GaussLegendreAdjoint())) < 1e-8


def test_float32():
    grad32, params32 = _grad("ode", 8, dtype=jnp.float32)
    grad64, _ = _grad("ode", None)
    g32 = grad32(params32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g32))
    params64 = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, params32
    )
    # Limited by the float32 solve at rtol=atol=1e-6.
    assert max_relative_error(grad64(params64), g32) < 1e-4


def test_backward_solver_options():
    params, build = make_problem("ode")
    adjoint = dxe.GaussLegendreAdjoint(
        solver=dfx.Dopri5(),
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        dt0=-0.01,
        max_steps=500,
    )
    grad_fn, _ = _grad("ode", None)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(p):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            terms,
            dfx.Euler(),  # the forward solve's solver is not used backwards
            T0,
            T1,
            1e-4,
            y0,
            args=args,
            adjoint=adjoint,
            max_steps=10_001,
        )
        return _safe_sum(sol.ys)

    # Euler's error at dt=1e-4 bounds the agreement.
    assert max_relative_error(grad_fn(params), grad(params)) < 1e-3
