"""Failing solves and determinism, under each adjoint of this package.

- A solve that diverges raises diffrax's error with `throw=True`; with `throw=False`
  its result says so and the gradient is NaN (the backward pass would otherwise
  differentiate the part of the solve that ran, and return a finite, wrong number).
  The same holds for `GaussLegendreAdjoint`'s own backward solve.
- A backward pass that cannot rebuild the initial state (running the solver backwards
  is unstable) raises instead of returning the wrong gradient it would give, or with
  `throw=False` gives NaN; so does a forward solve that overflowed.
- The same key and inputs give bitwise the same values and gradients on every run,
  under `jit` and `vmap`.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffrax_extras as dxe

from .helpers import backprop, decay_loss, max_relative_error, neural_sde_ys


ADJOINTS = {
    "ReversibleAdjoint": (dxe.ReversibleHeun(), dxe.ReversibleAdjoint()),
    "GaussLegendreAdjoint": (dfx.Tsit5(), dxe.GaussLegendreAdjoint()),
}


def _blow_up(solver, adjoint, throw):
    """y' = a y^2, y(0) = 1 blows up at t = 1/a; solving to t = 2 cannot succeed: the
    controller shrinks the step until `max_steps` is reached."""

    def solve(a):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: a * y**2),
            solver,
            0.0,
            2.0,
            0.1,
            jnp.array([1.0]),
            args=a,
            saveat=dfx.SaveAt(ts=jnp.array([0.1, 2.0])),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
            adjoint=adjoint,
            max_steps=64,
            throw=throw,
        )

    return solve


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_diverging_solve_raises_or_gives_nan_gradient(name):
    solver, adjoint = ADJOINTS[name]
    a = jnp.array(1.0)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(jax.jit(_blow_up(solver, adjoint, True))(a).ys)

    solve = _blow_up(solver, adjoint, False)

    @jax.jit
    def value_and_grad(a):
        def loss(a):
            sol = solve(a)
            # The saved value before the blow-up is finite; the gradient must still
            # be NaN, as the solve as a whole failed.
            assert sol.ys is not None
            return sol.ys[0, 0], sol.result == dfx.RESULTS.successful

        (value, ok), grad = jax.value_and_grad(loss, has_aux=True)(a)
        return value, ok, grad

    value, ok, grad = value_and_grad(a)
    assert not bool(ok)
    assert np.isfinite(value)
    assert np.isnan(grad)


def test_failing_backward_solve_raises_or_gives_nan_gradient():
    """`GaussLegendreAdjoint` solves backwards with its own `max_steps`: 2 are too
    few for the backward solve, though the forward one succeeds."""

    def gradient(throw):
        def loss(a):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, a: -a * y),
                dfx.Tsit5(),
                0.0,
                1.0,
                0.1,
                jnp.array([1.0]),
                args=a,
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
                adjoint=dxe.GaussLegendreAdjoint(max_steps=2),
                max_steps=64,
                throw=throw,
            )
            assert sol.ys is not None
            return jnp.sum(sol.ys)

        return jax.jit(jax.grad(loss))(jnp.array(1.0))

    assert np.isnan(gradient(False))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(gradient(True))


def test_overflowing_forward_solve_gives_nan_gradient_or_raises():
    """y' = y^3 from y = 2 blows up at t = 1/8; fixed steps overflow to inf and NaN
    with diffrax reporting success. The gradient is NaN, as with
    `RecursiveCheckpointAdjoint`, or with `throw=True` an error that says so (not
    one that blames the reconstruction)."""

    def gradient(adjoint, throw):
        def loss(a):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, a: a * y**3),
                dxe.ReversibleHeun(),
                0.0,
                1.0,
                0.01,
                jnp.array([2.0]),
                args=a,
                adjoint=adjoint,
                max_steps=100,
                throw=throw,
            )
            assert sol.ys is not None
            return jnp.sum(sol.ys)

        return jax.jit(jax.grad(loss))(jnp.array(1.0))

    assert np.isnan(gradient(dfx.RecursiveCheckpointAdjoint(), True))
    assert np.isnan(gradient(dxe.ReversibleAdjoint(), False))
    with pytest.raises(Exception, match="forward solve diverged"):
        jax.block_until_ready(gradient(dxe.ReversibleAdjoint(), True))


def _damped_leapfrog_gradient(adjoint, throw=True, dtype=jnp.float64):
    def loss(a):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: jnp.tanh(a @ y)),
            dxe.AsynchronousLeapfrog(damping=0.6),
            jnp.asarray(0.0, dtype),
            jnp.asarray(5.0, dtype),
            jnp.asarray(0.1, dtype),
            jnp.array([1.0, -0.5], dtype),
            args=a,
            adjoint=adjoint,
            max_steps=50,
            throw=throw,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    return jax.jit(jax.grad(loss))(jnp.array([[0.0, 1.0], [-1.0, 0.0]], dtype))


def test_unstable_reconstruction_raises_or_gives_nan():
    """Damping 0.6 makes the asynchronous leapfrog's inverse step expand errors by
    about 1/0.6 per step: after 50 steps the rebuilt states, and the gradient taken
    along them, are far off."""
    gradient = _damped_leapfrog_gradient
    exact = gradient(dfx.RecursiveCheckpointAdjoint())
    unchecked = gradient(dxe.ReversibleAdjoint(reconstruction_tol=None))
    # What the check guards against: a finite gradient, and a wrong one.
    assert np.all(np.isfinite(unchecked))
    assert np.max(np.abs(unchecked - exact)) > 0.1 * np.max(np.abs(exact))
    with pytest.raises(Exception, match="could not reconstruct the initial state"):
        jax.block_until_ready(gradient(dxe.ReversibleAdjoint()))
    # With `throw=False` nothing raises, and the gradient says it cannot be trusted.
    assert np.all(np.isnan(gradient(dxe.ReversibleAdjoint(), throw=False)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_reconstruction_is_held_to_a_few_roundings(dtype):
    """The default tolerance (5e-4) is below one rounding in float16 and bfloat16:
    held to it, a stable reversible Heun solve rebuilt to within one rounding was
    refused. Each element is now held to at least 4 roundings, which still refuses
    the unstable leapfrog above."""

    grad = jax.jit(jax.grad(decay_loss, argnums=(1, 2)), static_argnums=(0, 3))
    y0, a = jnp.array([1.0, 2.0], dtype), jnp.array(0.7, dtype)
    reference = grad(dxe.ReversibleHeun(), y0, a, backprop())
    ours = grad(dxe.ReversibleHeun(), y0, a, dxe.ReversibleAdjoint())
    assert all(x.dtype == dtype for x in (*reference, *ours))
    # The two differ by how the backward pass rounds: a few roundings.
    reference, ours = ([x.astype(jnp.float64) for x in g] for g in (reference, ours))
    assert max_relative_error(reference, ours) <= 4 * float(jnp.finfo(dtype).eps)
    with pytest.raises(Exception, match="could not reconstruct the initial state"):
        jax.block_until_ready(
            _damped_leapfrog_gradient(dxe.ReversibleAdjoint(), True, dtype)
        )


def _neural_sde_loss(key, params, static):
    return jnp.mean(neural_sde_ys(params, static, jnp.array([0.5, -0.3]), key) ** 2)


def test_bitwise_deterministic_values_and_gradients():
    mlp = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    keys = jr.split(jr.PRNGKey(1), 4)

    def value_and_grad(key, params):
        return jax.value_and_grad(_neural_sde_loss, argnums=1)(key, params, static)

    jitted = jax.jit(value_and_grad)
    batched = jax.jit(jax.vmap(value_and_grad, in_axes=(0, None)))
    runs = [jitted(keys[0], params) for _ in range(2)]
    # A second, separately traced and compiled program gives the same bits.
    runs.append(jax.jit(value_and_grad)(keys[0], params))
    batches = [batched(keys, params) for _ in range(2)]
    for run in runs[1:]:
        for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(run), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(batches[0]), jax.tree.leaves(batches[1]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # The batch's first member is the unbatched run: batching may change the order of
    # floating-point reductions inside the MLP, so equal to rounding, not bitwise.
    first = jax.tree.map(lambda x: x[0], batches[0])
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(first), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
