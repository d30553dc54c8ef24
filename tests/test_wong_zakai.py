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
    make_problem,
    max_relative_error,
    SAVE_TS,
    T0,
    T1,
)


def _basis_path(n_modes, t0=0.0, t1=2.0):
    """A path whose value is the vector of the series' basis functions at t."""
    path = dxe.KarhunenLoevePath(t0, t1, (), jr.key(0), n_modes)
    return eqx.tree_at(lambda p: p.coefficients, path, jnp.eye(n_modes))


def test_covariance_tends_to_brownian():
    # Cov(W_N(s), W_N(t)) = sum_n phi_n(s) phi_n(t) must tend to min(s, t) - t0.
    ts = jnp.linspace(0.5, 2.5, 41)
    exact = np.minimum(ts[:, None], ts[None, :]) - 0.5
    errors = []
    for n_modes in (4, 16, 64):
        phi = jax.vmap(_basis_path(n_modes, 0.5, 2.5).evaluate)(ts)
        errors.append(float(np.max(np.abs(phi @ phi.T - exact))))
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[-1] < 0.01, errors


def test_coefficients_are_standard_normal():
    n = 4000

    @jax.jit
    @jax.vmap
    def values(key):
        path = dxe.KarhunenLoevePath(0.0, 2.0, (), key, 64)
        return jnp.stack([path.evaluate(0.5), path.evaluate(2.0)])

    samples = np.asarray(values(jr.split(jr.key(1), n)))
    # The variance of W_64(t) is t to within 0.4% (the series' truncation).
    for column, t in zip(samples.T, (0.5, 2.0), strict=True):
        assert abs(column.mean()) < 5 * np.sqrt(t / n)
        assert abs(column.var() / t - 1) < 5 * np.sqrt(2 / n)


def test_derivative_matches_finite_differences():
    path = dxe.KarhunenLoevePath(-1.0, 1.0, (3,), jr.key(2), 32)
    eps = 1e-6
    for t in (-0.9, 0.0, 0.37, 0.99):
        fd = (path.evaluate(t + eps) - path.evaluate(t - eps)) / (2 * eps)
        np.testing.assert_allclose(path.derivative(t), fd, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            path.evaluate(t, 0.5), path.evaluate(0.5) - path.evaluate(t), rtol=1e-14
        )
    np.testing.assert_allclose(path.evaluate(-1.0), 0.0, atol=1e-15)


def test_pytree_shape_and_dtypes():
    shape = {
        "a": jax.ShapeDtypeStruct((2, 3), jnp.float32),
        "b": jax.ShapeDtypeStruct((), jnp.float64),
    }
    path = dxe.KarhunenLoevePath(0.0, 1.0, shape, jr.key(3), 8)
    for out in (path.evaluate(0.3), path.evaluate(0.1, 0.4), path.derivative(0.3)):
        assert out["a"].shape == (2, 3) and out["a"].dtype == jnp.float32
        assert out["b"].shape == () and out["b"].dtype == jnp.float64


def test_from_brownian_tends_to_the_brownian_path():
    bm = dxe.BrownianInterval(0.0, 1.0, 2**-12, (2,), jr.key(4), dt=2**-10)
    grid = jnp.linspace(0.0, 1.0, 257)
    target = jax.vmap(bm.evaluate)(jnp.zeros_like(grid), grid)
    errors = []
    for n_modes in (16, 64, 256):
        path = dxe.KarhunenLoevePath.from_brownian(bm, n_modes, 1024)
        values = jax.vmap(path.evaluate)(grid)
        errors.append(float(jnp.max(jnp.abs(values - target))))
    assert errors[0] > errors[1] > errors[2], errors


class _DiagonalField(eqx.Module):
    def __call__(self, t, y, args):
        return 0.6 * jnp.sin(y) + 0.3


NUM_POINTS = 1024


def _sde_terms_and_path(key):
    # Diagonal noise, each component driven by its own Brownian motion: commutative,
    # so Heun converges strongly at order 1 and its error at h = 2^-10 (~1e-3) is
    # below the smooth-noise errors measured.
    bm = dxe.BrownianInterval(0.0, 1.0, 2**-12, (2,), key, dt=1 / NUM_POINTS)
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: 1.0 - y),
        dfx.WeaklyDiagonalControlTerm(_DiagonalField(), bm),
    )
    return dxe.WongZakai(terms), bm


Y0 = jnp.array([0.2, -0.4])


def _sde_end(key):
    wz, bm = _sde_terms_and_path(key)
    terms = wz.sde_terms(bm, dfx.Heun())
    sol = dfx.diffeqsolve(terms, dfx.Heun(), 0.0, 1.0, 1 / NUM_POINTS, Y0)
    assert sol.ys is not None
    return sol.ys[-1]


def _ode_end(key, n_modes):
    wz, bm = _sde_terms_and_path(key)
    path = dxe.KarhunenLoevePath.from_brownian(bm, n_modes, NUM_POINTS)
    sol = dfx.diffeqsolve(
        wz.ode_terms(path),
        dfx.Tsit5(),
        0.0,
        1.0,
        None,
        Y0,
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        max_steps=100_000,
    )
    assert sol.ys is not None
    return sol.ys[-1]


# diffrax 0.7 deprecates it in favour of a `lineax.DiagonalLinearOperator` vector
# field, but the adapter must still take it.
@pytest.mark.filterwarnings("ignore:.*WeaklyDiagonalControlTerm")
def test_ode_converges_to_the_coupled_stratonovich_sde():
    keys = jr.split(jr.key(5), 8)
    sde = jax.jit(jax.vmap(_sde_end))(keys)
    errors = []
    for n_modes in (8, 32, 128):
        ode = jax.jit(jax.vmap(lambda k, n=n_modes: _ode_end(k, n)))(keys)
        errors.append(float(jnp.mean(jnp.abs(sde - ode))))
    # Measured: 0.087, 0.051, 0.019 (and 0.006 at 512 modes).
    assert errors[0] > 1.3 * errors[1] and errors[1] > 1.3 * errors[2], errors


def _training_grad(adjoint, solver, controller, dt0):
    params, build = make_problem("sde")
    path = dxe.KarhunenLoevePath(T0, T1, (3,), jr.key(6), 8)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(p):
        terms, y0, args = build(p)
        sol = dfx.diffeqsolve(
            dxe.WongZakai(terms).ode_terms(path),
            solver,
            T0,
            T1,
            dt0,
            y0,
            args=args,
            saveat=dfx.SaveAt(ts=jnp.asarray(SAVE_TS)),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=4096,
        )
        return _safe_sum(sol.ys)

    return grad(params)


def test_gradients_through_the_training_ode():
    constant = dfx.ConstantStepSize()
    reversible = [dxe.ReversibleHeun(), constant, 0.01]
    reference = _training_grad(backprop(4096), *reversible)
    assert (
        max_relative_error(
            reference, _training_grad(dxe.ReversibleAdjoint(), *reversible)
        )
        < 1e-10
    )
    tight = [dfx.Tsit5(), dfx.PIDController(rtol=1e-11, atol=1e-11), None]
    reference = _training_grad(backprop(4096), *tight)
    # The continuous gradient, to the quadrature's and the solves' accuracy.
    assert (
        max_relative_error(
            reference, _training_grad(dxe.GaussLegendreAdjoint(), *tight)
        )
        < 1e-8
    )
