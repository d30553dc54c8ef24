import functools as ft
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import diffrax_extras as dxe

from .helpers import (
    backprop,
    EXACT,
    grad_of,
    make_loss,
    max_relative_error,
)


SOLVER = dxe.ReversibleHeun()


def test_gradient_matches_finite_differences():
    loss, params = make_loss("ode", SOLVER, dxe.ReversibleAdjoint(), saveat="t0_t1_ts")
    grads = eqx.filter_jit(eqx.filter_grad(loss))(params)
    flat, unflatten = ravel_pytree(eqx.filter(params, eqx.is_array))
    flat_grads, _ = ravel_pytree(eqx.filter(grads, eqx.is_array))
    _, static = eqx.partition(params, eqx.is_array)

    def flat_loss(x):
        return loss(eqx.combine(unflatten(x), static))

    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = jnp.asarray(rng.standard_normal(flat.shape))
        eps = 1e-6
        fd = (flat_loss(flat + eps * direction) - flat_loss(flat - eps * direction)) / (
            2 * eps
        )
        # Central differences have error O(eps^2) + O(rounding / eps) ~ 1e-10.
        assert jnp.abs(fd - flat_grads @ direction) < 1e-7 * (1 + jnp.abs(fd))


def test_accepts_diffrax_reversible_heun():
    grad_theirs, params = grad_of(
        "ode", dfx.ReversibleHeun(), dxe.ReversibleAdjoint(), "pid", "t0_t1_ts"
    )
    grad_ours, _ = grad_of("ode", SOLVER, dxe.ReversibleAdjoint(), "pid", "t0_t1_ts")
    assert max_relative_error(grad_ours(params), grad_theirs(params)) < EXACT


def _ode_solve(adjoint, y0, params, t0=0.0, t1=1.0, ts=None, **kwargs):
    saveat = dfx.SaveAt(t1=True) if ts is None else dfx.SaveAt(ts=ts)
    dtype = y0.dtype
    t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, a: -a * y + jnp.sin(t)),
        SOLVER,
        t0,
        t1,
        jnp.where(t1 >= t0, 0.01, -0.01).astype(dtype),
        y0,
        args=params,
        adjoint=adjoint,
        saveat=saveat,
        **kwargs,
    )
    assert sol.ys is not None
    return sol.ys


@pytest.mark.parametrize("t0, t1", [(1.0, 0.0), (0.5, 0.5)])
def test_backwards_in_time_and_trivial_interval(t0, t1):
    ts = jnp.array([t0, 0.3 * t0 + 0.7 * t1, t1])

    def loss(y0, a, adjoint):
        return jnp.sum(_ode_solve(adjoint, y0, a, t0=t0, t1=t1, ts=ts) ** 2)

    y0, a = jnp.array([1.0, 2.0]), jnp.array(0.7)
    ref = jax.grad(loss, argnums=(0, 1))(y0, a, backprop(4096))
    rev = jax.grad(loss, argnums=(0, 1))(y0, a, dxe.ReversibleAdjoint())
    assert max_relative_error(ref, rev) < EXACT


def test_vmap_and_grad_compose():
    y0 = jnp.array([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]])
    a = jnp.array([0.5, 1.0, 2.0])

    def loss(y0, a, adjoint):
        return jnp.sum(_ode_solve(adjoint, y0, a) ** 2)

    for adjoint_grad in (
        # grad of vmap
        lambda adj: jax.grad(
            lambda y, p: jnp.sum(jax.vmap(lambda yi, pi: loss(yi, pi, adj))(y, p)),
            argnums=(0, 1),
        )(y0, a),
        # vmap of grad
        lambda adj: jax.vmap(
            jax.grad(lambda yi, pi: loss(yi, pi, adj), argnums=(0, 1))
        )(y0, a),
    ):
        ref = jax.jit(adjoint_grad, static_argnums=0)(backprop(4096))
        rev = jax.jit(adjoint_grad, static_argnums=0)(dxe.ReversibleAdjoint())
        assert max_relative_error(ref, rev) < EXACT


def test_progress_meter_runs():
    def loss(y0):
        return jnp.sum(
            _ode_solve(
                dxe.ReversibleAdjoint(),
                y0,
                jnp.array(1.0),
                progress_meter=dfx.TextProgressMeter(minimum_increase=0.5),
            )
        )

    grad = jax.grad(loss)(jnp.array([1.0, 2.0]))
    ref = jax.grad(lambda y0: jnp.sum(_ode_solve(backprop(4096), y0, jnp.array(1.0))))(
        jnp.array([1.0, 2.0])
    )
    assert max_relative_error(ref, grad) < EXACT


# The network of the memory tests: batch 32, state 16, width 32.
_BATCH, _WIDTH = 32, 32


@ft.cache
def _temp_bytes(num_steps: int, constant_solver_state: bool = False) -> int:
    """Compiled temporary memory of a gradient through `num_steps` steps; with
    `constant_solver_state`, of a solve given an initial solver state that depends on
    nothing differentiated."""
    mlp = eqx.nn.MLP(16, 16, _WIDTH, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    y0 = jnp.ones((_BATCH, 16))

    def loss(mlp, y0):
        term = dfx.ODETerm(lambda t, y, m: jax.vmap(m)(y))
        dt0 = 1.0 / num_steps
        state = None
        if constant_solver_state:
            state = lax.stop_gradient(SOLVER.init(term, 0.0, dt0, y0, mlp))
        sol = dfx.diffeqsolve(
            term,
            SOLVER,
            0.0,
            1.0,
            dt0,
            y0,
            args=mlp,
            adjoint=dxe.ReversibleAdjoint(),
            max_steps=num_steps,
            solver_state=state,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    params, static = eqx.partition(mlp, eqx.is_array)
    grad = jax.jit(jax.grad(lambda p, y: loss(eqx.combine(p, static), y)))
    analysis = grad.lower(params, y0).compile().memory_analysis()
    assert analysis is not None
    return analysis.temp_size_in_bytes


def test_memory_does_not_grow_with_steps():
    small, large = _temp_bytes(100), _temp_bytes(10_000)
    # The only buffer that grows is the record of step times, one float64 per step
    # (no jump flags without `jump_ts`); everything else is one step's worth.
    step_times = 8 * (10_000 - 100)
    assert large - step_times <= 1.1 * small, (small, large)


def test_initial_solver_state_keeps_no_residuals_through_the_solve():
    # diffrax computes the initial solver state (here the vector field at `y0`)
    # before the solve. Differentiated from there, JAX would keep that evaluation's
    # activations (2 x batch x width float64s, 16 KB) alive throughout the solve;
    # the backward pass differentiates `solver.init` again at the end instead, so
    # the gradient costs no more than one whose initial state is a constant. (The
    # old code: 88,160 bytes against 71,968.) Half an activation of slack, for XLA's
    # scheduling.
    slack = 8 * _BATCH * _WIDTH // 2
    assert _temp_bytes(100) <= _temp_bytes(100, constant_solver_state=True) + slack


def test_checks_keep_no_copy_of_the_parameter_cotangent():
    # A gradient with respect to `y0` alone must not hold the parameters' cotangent:
    # XLA drops it as unused, unless something keeps it alive. The run-time checks
    # once did (`equinox.error_if` on the cotangents passes them through a host
    # callback): 2.0x the parameters' bytes of temporaries here, now 0.08x.
    mlp = eqx.nn.MLP(8, 8, 256, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    params_bytes = sum(x.nbytes for x in jtu.tree_leaves(params))

    def loss(params, y0):
        term = dfx.ODETerm(lambda t, y, m: jax.vmap(m)(y))
        sol = dfx.diffeqsolve(
            term,
            SOLVER,
            0.0,
            1.0,
            0.1,
            y0,
            args=eqx.combine(params, static),
            adjoint=dxe.ReversibleAdjoint(),
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    grad = jax.jit(jax.grad(loss, argnums=1))
    analysis = grad.lower(params, jnp.ones((4, 8))).compile().memory_analysis()
    assert analysis is not None
    assert analysis.temp_size_in_bytes < 0.25 * params_bytes


def test_pytree_structure_of_gradients():
    grad, params = grad_of("ode", SOLVER, dxe.ReversibleAdjoint())
    grads = grad(params)
    assert jtu.tree_structure(eqx.filter(grads, eqx.is_array)) == jtu.tree_structure(
        eqx.filter(params, eqx.is_array)
    )
    assert set(grads["y0"]) == {"x", "v"}


def test_parameters_closed_over_by_the_vector_field():
    # The usual training-loop style: the model is captured by the vector field, not
    # passed as `args`. The adjoint is a `custom_vjp`; without converting the closure
    # JAX would raise a `CustomVJPException` (as with `diffrax.BacksolveAdjoint`).
    bm = dxe.BrownianInterval(0.0, 1.0, 0.01, (2,), jr.PRNGKey(1), dt=0.05)

    def loss(y0, a, adjoint):
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -a * y + jnp.sin(t)),
            dfx.ControlTerm(lambda t, y, args: 0.3 * a * jnp.diag(jnp.cos(y)), bm),
        )
        sol = dfx.diffeqsolve(
            terms, SOLVER, 0.0, 1.0, 0.05, y0, adjoint=adjoint, max_steps=40
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    y0, a = jnp.array([1.0, 2.0]), jnp.array(0.7)
    ref = jax.grad(loss, argnums=(0, 1))(y0, a, backprop(40))
    rev = jax.grad(loss, argnums=(0, 1))(y0, a, dxe.ReversibleAdjoint())
    assert max_relative_error(ref, rev) < EXACT


def _van_der_pol(t, y, args):
    return jnp.stack([y[1], -args[0] * y[0] - args[1] * y[1] * (1 - y[0] ** 2)])


def _chunked_loss(solver, adjoint, a, num_chunks=3):
    """A solve continued chunk by chunk from the previous chunk's `sol.solver_state`
    inside a `lax.scan`, as when training on a long sequence in pieces."""

    field = _van_der_pol

    def chunk(carry, i):
        y, state = carry
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            solver,
            i * 0.5,
            (i + 1) * 0.5,
            0.05,
            y,
            args=a,
            adjoint=adjoint,
            saveat=dfx.SaveAt(t1=True, solver_state=True),
            solver_state=state,
            max_steps=16,
        )
        assert sol.ys is not None
        return (sol.ys[-1], sol.solver_state), jnp.sum(sol.ys[-1] ** 2)

    y0 = jnp.array([1.0, 0.0])
    init = solver.init(dfx.ODETerm(field), 0.0, 0.05, y0, a)
    _, losses = jax.lax.scan(chunk, (y0, init), jnp.arange(num_chunks, dtype=y0.dtype))
    return jnp.sum(losses)


@pytest.mark.parametrize(
    "solver",
    [dxe.ReversibleHeun(), dxe.Reversible(dfx.Tsit5()), dxe.AsynchronousLeapfrog()],
    ids=lambda s: type(s).__name__,
)
def test_chunked_solve_continued_from_its_solver_state(solver):
    # The cotangent of each chunk's final solver state flows into its backward pass
    # (it was dropped, and the gradient was 1.5-25% off).
    a = jnp.array([1.3, 0.4])
    grad = jax.jit(jax.grad(_chunked_loss, argnums=2), static_argnums=(0, 1))
    reference = grad(solver, backprop(16), a)
    assert max_relative_error(reference, grad(solver, dxe.ReversibleAdjoint(), a)) < (
        EXACT
    )


def test_chunked_solve_continued_from_its_controller_state():
    # Adaptive chunks that pass on the controller's state too (`SaveAt(
    # controller_state=True)`). It carries no derivative, but as an output of the
    # adjoint's `custom_vjp` it was taken to depend on the parameters, and the second
    # chunk refused it with equinox's "Unexpected tangent".
    field = _van_der_pol
    controller = dfx.PIDController(rtol=1e-3, atol=1e-6)
    saveat = dfx.SaveAt(t1=True, solver_state=True, controller_state=True)

    def loss(a, adjoint):
        kwargs: dict[str, Any] = dict(args=a, adjoint=adjoint, max_steps=128)
        kwargs.update(stepsize_controller=controller, saveat=saveat)
        y0 = jnp.array([1.0, 0.0])
        first = dfx.diffeqsolve(dfx.ODETerm(field), SOLVER, 0, 1, 0.05, y0, **kwargs)
        assert first.ys is not None
        second = dfx.diffeqsolve(
            dfx.ODETerm(field),
            SOLVER,
            1,
            2,
            0.05,
            first.ys[-1],
            solver_state=first.solver_state,
            controller_state=first.controller_state,
            made_jump=first.made_jump,
            **kwargs,
        )
        assert second.ys is not None
        return jnp.sum(second.ys**2) + jnp.sum(first.ys**2)

    a = jnp.array([1.3, 0.4])
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    reference = grad(a, backprop(128))
    assert max_relative_error(reference, grad(a, dxe.ReversibleAdjoint())) < EXACT


def test_forward_over_reverse_for_an_input_of_the_loss_alone():
    # `q` enters the loss only, so its tangent reaches the backward pass through the
    # cotangents, in which the backward pass is linear: exact, not refused.
    def loss(a, q, adjoint):
        y0 = jnp.array([1.0, 0.0])
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_van_der_pol), SOLVER, 0, 1, 0.1, y0, args=a, adjoint=adjoint
        )
        assert sol.ys is not None
        return jnp.sum(jnp.sin(q[None] * sol.ys))

    def mixed(adjoint):
        grad_a = jax.grad(loss)
        return jax.jit(jax.jacfwd(lambda q: grad_a(a, q, adjoint)))(q)

    a, q = jnp.array([1.3, 0.4]), jnp.array([0.7, 1.3])
    reference = mixed(dfx.DirectAdjoint())
    assert max_relative_error(reference, mixed(dxe.ReversibleAdjoint())) < EXACT


def test_parameters_closed_over_by_saveat_fn_and_control():
    # A trained read-out in `SaveAt(fn=...)` and a callable control over trained
    # data are differentiated as by `RecursiveCheckpointAdjoint`.
    def loss(params, adjoint):
        readout, c = params
        control = lambda t0, t1: jnp.stack(
            [jnp.sin(c * t1) - jnp.sin(c * t0), (t1 - t0) * c]
        )
        term = dfx.ControlTerm(
            lambda t, y, args: jnp.tanh(y)[:, None] * jnp.ones((1, 2)), control
        )
        sol = dfx.diffeqsolve(
            term,
            SOLVER,
            0.0,
            1.0,
            0.05,
            jnp.array([1.0, 2.0]),
            adjoint=adjoint,
            saveat=dfx.SaveAt(
                ts=jnp.linspace(0.1, 1.0, 4),
                fn=lambda t, y, args: jnp.tanh(readout @ y),
            ),
            max_steps=32,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    params = (jnp.array([[0.3, -0.5], [0.8, 0.1]]), jnp.array(1.3))
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    reference = grad(params, backprop(32))
    assert max_relative_error(reference, grad(params, dxe.ReversibleAdjoint())) < EXACT
