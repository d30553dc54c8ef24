"""`ReversibleAdjoint`'s reconstruction check over cases of the measured table
(`benchmarks/results/reconstruction_check.md`, case numbers below), the regressions
of its earlier form among them: a wrong gradient is refused (NaN) and a right one
passed. Whether a gradient is right is measured here, not taken from the table: the
check off (`reconstruction_tol=None`) against backpropagation, right at most 1e-3
relative error, wrong above 1e-2, as in the benchmark. Cases share one compiled
program per solver and dtype (the number of steps and the final time are inputs).

The table also lists cases that the default check gets wrong (a few misses and
false alarms: no tolerance on the rebuilt initial state avoids both; see
docs/reliability.md), which are not asserted here.
"""

import functools as ft

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffrax_extras as dxe

from .helpers import backprop, max_relative_error


RIGHT, WRONG = 1e-3, 1e-2
MAX_STEPS = 1400
# Lotka-Volterra: periodic orbits of every size.
LV_PARAMS = np.array([2 / 3, 4 / 3, 1.0, 1.0])


def _lotka_volterra(t, y, p):
    s, x = p  # y / s follows Lotka-Volterra: a state of size s.
    u, v = y[0] / s, y[1] / s
    return s * jnp.stack([x[0] * u - x[1] * u * v, x[3] * u * v - x[2] * v])


ALF_07 = "AsynchronousLeapfrog(damping=0.7)"
SOLVERS = {
    "AsynchronousLeapfrog": dxe.AsynchronousLeapfrog(),
    ALF_07: dxe.AsynchronousLeapfrog(damping=0.7),
    "Reversible(Tsit5)": dxe.Reversible(dfx.Tsit5()),
    "Reversible(Dopri5)": dxe.Reversible(dfx.Dopri5()),
}


@ft.cache
def _gradient(solver: str, dtype, adjoint: str):
    """The gradient of |y(T) / s|^2 with respect to (Lotka-Volterra's parameters,
    y0), in fixed steps of T / N; `T`, `N` and `s` are inputs."""
    adjoints = {
        "unchecked": dxe.ReversibleAdjoint(reconstruction_tol=None),
        "checked": dxe.ReversibleAdjoint(),
        "backprop": backprop(MAX_STEPS),
    }

    @jax.jit
    def grad(x, t1, num_steps, scale):
        def loss(x):
            params, y0 = x
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_lotka_volterra),
                SOLVERS[solver],
                jnp.zeros_like(t1),
                t1,
                t1 / num_steps,
                y0,
                args=(scale, params),
                adjoint=adjoints[adjoint],
                max_steps=MAX_STEPS,
                throw=False,
            )
            assert sol.ys is not None
            return jnp.sum((sol.ys[-1] / scale) ** 2)

        return jax.grad(loss)(x)

    return grad


# (case in the table, solver, dtype, T, y0 / s, s, N, right or wrong)
CASES = [
    # AsynchronousLeapfrog in float32 over 1,400 steps: the earlier check (absolute
    # below size 1) passed #47, 7.6 times the gradient's size off.
    (47, "AsynchronousLeapfrog", "float32", 14.0, (3.0, 2.0), 1.0, 1400, "wrong"),
    (49, "AsynchronousLeapfrog", "float32", 35.0, (2.0, 1.0), 1.0, 1400, "wrong"),
    (51, "AsynchronousLeapfrog", "float32", 140.0, (1.0, 1.0), 1.0, 1400, "right"),
    (52, "AsynchronousLeapfrog", "float32", 560.0, (0.5, 0.5), 1.0, 1400, "right"),
    # The wrapper in float32 over 1,400 steps: gradients 2,200 and 7,900 times
    # their size off, and right ones on the same orbits' family.
    (58, "Reversible(Dopri5)", "float32", 14.0, (3.0, 2.0), 1.0, 1400, "wrong"),
    (60, "Reversible(Dopri5)", "float32", 140.0, (1.0, 1.0), 1.0, 1400, "right"),
    (65, "Reversible(Tsit5)", "float32", 14.0, (3.0, 2.0), 1.0, 1400, "wrong"),
    (66, "Reversible(Tsit5)", "float32", 140.0, (1.0, 1.0), 1.0, 1400, "right"),
    # A state of size 1e-7: the earlier check passed #72 (9% off).
    (70, ALF_07, "float64", 10.0, (1, 1), 1e-7, 30, "right"),
    (72, ALF_07, "float64", 10.0, (1, 1), 1e-7, 42, "wrong"),
    # Its twin of size 1.
    (76, ALF_07, "float64", 10.0, (1, 1), 1.0, 42, "wrong"),
]


@pytest.mark.parametrize(
    "number, solver, dtype, t1, y0, scale, num_steps, kind",
    CASES,
    ids=[f"#{case[0]}" for case in CASES],
)
def test_refuses_the_wrong_gradients_and_passes_the_right(
    number, solver, dtype, t1, y0, scale, num_steps, kind
):
    dtype = jnp.dtype(dtype)
    x = (jnp.asarray(LV_PARAMS, dtype), scale * jnp.asarray(y0, dtype))
    inputs = (x, *(jnp.asarray(v, dtype) for v in (t1, num_steps, scale)))
    exact = _gradient(solver, dtype, "backprop")(*inputs)
    unchecked = _gradient(solver, dtype, "unchecked")(*inputs)
    checked = _gradient(solver, dtype, "checked")(*inputs)
    error = max_relative_error(exact, unchecked)
    refused = all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree.leaves(checked))
    if kind == "right":
        # The premise: with the check off the gradient is right here...
        assert error <= RIGHT, error
        # ...and with it on, passed.
        assert not refused
        assert max_relative_error(exact, checked) <= RIGHT
    else:
        assert not (error <= WRONG), error
        assert refused
