"""Every bad input to every public object, in one table: each must raise early, with
a message that names the argument and says what to do instead.

Trace-time checks raise the listed exception type; checks of traced values run inside
the compiled program (`equinox.error_if`) and raise whatever JAX raises for a failed
runtime check, so those rows expect `Exception` and are matched by message.
"""

from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import diffrax_extras as dxe

from .helpers import make_problem


def _decay(t, y, args):
    return -y


def _ode(solver=None, adjoint=None, terms=None, saveat=None, **kwargs):
    return dfx.diffeqsolve(
        dfx.ODETerm(_decay) if terms is None else terms,
        dxe.ReversibleHeun() if solver is None else solver,
        0.0,
        1.0,
        0.1,
        jnp.array([1.0]),
        adjoint=dfx.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        saveat=dfx.SaveAt(t1=True) if saveat is None else saveat,
        **kwargs,
    )


def _sde(solver, bm, adjoint=None):
    terms = dfx.MultiTerm(
        dfx.ODETerm(_decay), dfx.ControlTerm(lambda t, y, args: y, bm)
    )
    return _ode(solver=solver, adjoint=adjoint, terms=terms)


def _tree():
    return dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (1,), key=jr.PRNGKey(0))


def _unsafe():
    return dfx.UnsafeBrownianPath(shape=(1,), key=jr.PRNGKey(0))


def _interval(**kwargs):
    full: dict[str, Any] = dict(
        t0=0.0, t1=1.0, tol=2**-8, shape=(2,), key=jr.PRNGKey(0), dt=0.1
    )
    return dxe.BrownianInterval(**(full | kwargs))


def _jit_solve(make_solver, value):
    """A solve whose solver gets a traced `value`: checked at run time."""

    @jax.jit
    def solve(v):
        return _ode(solver=make_solver(v)).ys

    return solve(jnp.asarray(value))


def _time_gradient(name):
    def loss(t):
        t0, t1, ts = 0.0, 1.0, jnp.array([0.5])
        if name == "t0":
            t0 = t
        elif name == "t1":
            t1 = t
        else:
            ts = ts * t
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_decay),
            dxe.ReversibleHeun(),
            t0,
            t1,
            0.1,
            jnp.array([1.0]),
            saveat=dfx.SaveAt(ts=ts),
            adjoint=dxe.ReversibleAdjoint(),
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys)

    jax.grad(loss)(jnp.asarray({"t0": 0.0, "t1": 1.0, "saveat.ts": 1.0}[name]))


class _Field(eqx.Module):
    weight: jax.Array

    def __call__(self, t, y, args):
        return jnp.tanh(self.weight @ y)[:, None] * jnp.ones((1, 2)) * args


def _interpolation_gradient(argnum):
    def loss(knots, t1):
        control = dfx.LinearInterpolation(knots, jnp.stack([knots, knots**2], -1))
        sol = dfx.diffeqsolve(
            dfx.ControlTerm(_Field(jnp.ones((2, 2))), control),
            dfx.Tsit5(),
            0.0,
            t1,
            0.1,
            jnp.ones(2),
            args=jnp.array(1.0),
            adjoint=dxe.GaussLegendreAdjoint(),
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys)

    jax.grad(loss, argnums=argnum)(jnp.linspace(0.0, 1.0, 4), 1.0)


def _sde_terms():
    params, build = make_problem("sde")
    return build(params)[0]


def _kl(n_modes: Any = 4, shape=(3,), t0=0.0, t1=1.0):
    return dxe.KarhunenLoevePath(t0, t1, shape, jr.key(0), n_modes)


_EVENT = dfx.Event(lambda t, y, args, **kwargs: t > 0.5)
_GL = dxe.GaussLegendreAdjoint()
_RA = dxe.ReversibleAdjoint()


def _filtered_linear():
    params, _ = eqx.partition(eqx.nn.Linear(2, 2, key=jr.key(3)), eqx.is_array)
    return eqx.tree_at(
        lambda lin: lin.weight, params, None, is_leaf=lambda x: x is None
    )


def _ra_loss(a, *, solver=None, controller=None, dt0=0.1, y0=None, **kwargs):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -args * y),
        dxe.ReversibleHeun() if solver is None else solver,
        0.0,
        1.0,
        dt0,
        jnp.array([1.0]) if y0 is None else y0,
        args=a,
        adjoint=_RA,
        stepsize_controller=dfx.ConstantStepSize()
        if controller is None
        else controller,
        max_steps=64,
        **kwargs,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys)


def _grad_of_grad_wrt_y0(loss):
    """The gradient with respect to `args` of the gradient with respect to `y0`: it
    reaches the backward pass through the residuals, not the marked inputs."""

    def grad_y0(a):
        return jnp.sum(jax.grad(lambda y: loss(a, y0=y))(jnp.array([1.0])))

    return jax.grad(grad_y0)(jnp.array(1.0))


def _second_wrt_a_loss_input(loss, outer):
    """`outer` (`jax.grad` or `jax.jacfwd`) of the gradient with respect to `args`,
    with respect to a weight that only the loss depends on: it reaches the backward
    pass through the cotangents that pass is given."""

    def grad_args(q):
        return jax.grad(lambda a: q * loss(a))(jnp.array(1.0))

    return outer(grad_args)(jnp.array(2.0))


def _ra_setting_gradient(name):
    """The gradient with respect to a setting that is not differentiable."""

    def loss(x):
        if name == "jump_ts":
            controller = dfx.ClipStepSizeController(
                dfx.PIDController(rtol=1e-3, atol=1e-6), jump_ts=jnp.stack([x])
            )
            return _ra_loss(jnp.array(1.0), controller=controller)
        if name == "rtol":
            return _ra_loss(
                jnp.array(1.0), controller=dfx.PIDController(rtol=x, atol=1e-6)
            )
        if name == "dt0":
            return _ra_loss(jnp.array(1.0), dt0=x)
        if name == "controller_state":
            controller = dfx.PIDController(rtol=1e-3, atol=1e-6)
            term = dfx.ODETerm(lambda t, y, args: -y)

            def field(terms, t, y, args):
                return terms.vf(t, y, args)

            _, state = controller.init(term, 0.0, 1.0, jnp.ones(1), 0.1, None, field, 2)
            state = jax.tree.map(
                lambda c: c * x if eqx.is_inexact_array(c) else c, state
            )
            return _ra_loss(
                jnp.array(1.0), controller=controller, controller_state=state
            )
        return _ra_loss(jnp.array(1.0), solver=dxe.Reversible(dfx.Heun(), coupling=x))

    jax.grad(loss)(jnp.asarray({"jump_ts": 0.5, "rtol": 1e-3}.get(name, 0.1)))


def _langevin(solver):
    bm = dfx.VirtualBrownianTree(
        0.0, 1.0, 1e-3, (1,), jr.key(0), levy_area=dfx.SpaceTimeTimeLevyArea
    )
    gamma, u = jnp.array(1.0), jnp.array(1.0)
    terms = dfx.MultiTerm(
        dfx.UnderdampedLangevinDriftTerm(gamma, u, lambda x, args: x),
        dfx.UnderdampedLangevinDiffusionTerm(gamma, u, bm),
    )
    return dfx.diffeqsolve(terms, solver, 0.0, 1.0, 0.1, (jnp.zeros(1), jnp.zeros(1)))


def _gl_loss(
    a, *, controller=None, adjoint=None, dt0: float | None = 0.1, throw=True, y0=None
):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -args * y),
        dfx.Tsit5(),
        0.0,
        1.0,
        dt0,
        jnp.array([1.0]) if y0 is None else y0,
        args=a,
        adjoint=_GL if adjoint is None else adjoint,
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8)
        if controller is None
        else controller,
        max_steps=64,
        throw=throw,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys)


def _gl_jump_ts_gradient():
    def loss(x):
        controller = dfx.ClipStepSizeController(
            dfx.PIDController(rtol=1e-3, atol=1e-6), jump_ts=jnp.stack([x])
        )
        return _gl_loss(jnp.array(1.0), controller=controller)

    jax.grad(loss)(jnp.array(0.5))


def _gl_backward(adjoint, dt0: float | None = 0.1):
    return jax.block_until_ready(
        jax.jit(jax.grad(lambda a: _gl_loss(a, adjoint=adjoint, dt0=dt0)))(
            jnp.array(1.0)
        )
    )


def _gl_callable_control():
    def loss(a):
        term = dfx.ControlTerm(
            lambda t, y, args: -args * y[:, None],
            lambda t0, t1: jnp.asarray(t1 - t0)[None],
        )
        sol = _ode(solver=dfx.Tsit5(), adjoint=_GL, terms=term, args=a)
        assert sol.ys is not None
        return jnp.sum(sol.ys)

    jax.grad(loss)(jnp.array(1.0))


# (object, bad input) -> (thunk, exception type, message pattern)
CASES = {
    # ReversibleHeun, AsynchronousLeapfrog, Reversible
    "AsynchronousLeapfrog damping=0.5": (
        lambda: dxe.AsynchronousLeapfrog(0.5),
        ValueError,
        r"`damping` must lie in \(0.5, 1.0\]",
    ),
    "AsynchronousLeapfrog damping=0.2": (
        lambda: dxe.AsynchronousLeapfrog(0.2),
        ValueError,
        r"`damping` must lie in \(0.5, 1.0\]",
    ),
    "AsynchronousLeapfrog damping=1.2": (
        lambda: dxe.AsynchronousLeapfrog(1.2),
        ValueError,
        r"`damping` must lie in \(0.5, 1.0\]",
    ),
    "AsynchronousLeapfrog traced damping=0.5": (
        lambda: _jit_solve(dxe.AsynchronousLeapfrog, 0.5),
        Exception,
        "`damping` must lie",
    ),
    "AsynchronousLeapfrog on an SDE": (
        lambda: _sde(dxe.AsynchronousLeapfrog(), _tree()),
        ValueError,
        "not SDEs.*ReversibleHeun",
    ),
    "Reversible(LeapfrogMidpoint)": (
        lambda: dxe.Reversible(dfx.LeapfrogMidpoint()),
        ValueError,
        "LeapfrogMidpoint.*carries",
    ),
    "Reversible(SemiImplicitEuler)": (
        lambda: dxe.Reversible(dfx.SemiImplicitEuler()),
        ValueError,
        "SemiImplicitEuler.*carries",
    ),
    "Reversible(diffrax.ReversibleHeun)": (
        lambda: dxe.Reversible(dfx.ReversibleHeun()),
        ValueError,
        "ReversibleHeun.*carries",
    ),
    "Reversible(ReversibleHeun)": (
        lambda: dxe.Reversible(dxe.ReversibleHeun()),
        ValueError,
        "already reversible",
    ),
    "Reversible(Reversible(...))": (
        lambda: dxe.Reversible(dxe.Reversible(dfx.Heun())),
        ValueError,
        "already reversible",
    ),
    "Reversible coupling=0": (
        lambda: dxe.Reversible(dfx.Heun(), coupling=0.0),
        ValueError,
        "`coupling` must lie",
    ),
    "Reversible coupling=1.5": (
        lambda: dxe.Reversible(dfx.Heun(), coupling=1.5),
        ValueError,
        "`coupling` must lie",
    ),
    "Reversible traced coupling=1.5": (
        lambda: _jit_solve(lambda c: dxe.Reversible(dfx.Heun(), coupling=c), 1.5),
        Exception,
        "`coupling` must lie",
    ),
    "Reversible(Euler) on an SDE (Itô)": (
        lambda: _sde(dxe.Reversible(dfx.Euler()), _tree()),
        ValueError,
        "Euler.*Stratonovich",
    ),
    "Reversible(Tsit5) on an SDE": (
        lambda: _sde(dxe.Reversible(dfx.Tsit5()), _tree()),
        ValueError,
        "Tsit5",
    ),
    "Reversible with UnsafeBrownianPath": (
        lambda: _sde(dxe.Reversible(dfx.Heun()), _unsafe()),
        ValueError,
        "UnsafeBrownianPath",
    ),
    # ReversibleAdjoint
    "ReversibleAdjoint reconstruction_tol=0": (
        lambda: dxe.ReversibleAdjoint(reconstruction_tol=0.0),
        ValueError,
        "reconstruction_tol",
    ),
    "ReversibleAdjoint with a non-reversible solver": (
        lambda: _ode(solver=dfx.Tsit5(), adjoint=_RA),
        ValueError,
        r"reversible solver.*Tsit5.*Reversible\(",
    ),
    "ReversibleAdjoint with an event": (
        lambda: _ode(adjoint=_RA, event=_EVENT),
        NotImplementedError,
        "does not support events",
    ),
    "ReversibleAdjoint with SaveAt(dense=True)": (
        lambda: _ode(adjoint=_RA, saveat=dfx.SaveAt(dense=True)),
        NotImplementedError,
        r"SaveAt\(dense=True\)",
    ),
    "ReversibleAdjoint with max_steps=None": (
        lambda: _ode(adjoint=_RA, max_steps=None),
        ValueError,
        "max_steps",
    ),
    "ReversibleAdjoint with UnsafeBrownianPath": (
        lambda: _sde(dxe.ReversibleHeun(), _unsafe(), adjoint=_RA),
        ValueError,
        "UnsafeBrownianPath.*BrownianInterval",
    ),
    "ReversibleAdjoint gradient w.r.t. t0": (
        lambda: _time_gradient("t0"),
        RuntimeError,
        "differentiate with respect to `t0`",
    ),
    "ReversibleAdjoint gradient w.r.t. t1": (
        lambda: _time_gradient("t1"),
        RuntimeError,
        "differentiate with respect to `t1`",
    ),
    "ReversibleAdjoint gradient w.r.t. saveat.ts": (
        lambda: _time_gradient("saveat.ts"),
        RuntimeError,
        "differentiate with respect to `saveat.ts`",
    ),
    "ReversibleAdjoint under jax.jvp": (
        lambda: jax.jvp(_ra_loss, (jnp.array(1.0),), (jnp.array(1.0),)),
        TypeError,
        r"reverse mode only.*diffrax.ForwardMode",
    ),
    "ReversibleAdjoint under jax.jacfwd": (
        lambda: jax.jacfwd(_ra_loss)(jnp.array(1.0)),
        TypeError,
        r"reverse mode only.*diffrax.ForwardMode",
    ),
    "ReversibleAdjoint under jax.hessian": (
        lambda: jax.hessian(_ra_loss)(jnp.array(1.0)),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    "ReversibleAdjoint, grad of grad": (
        lambda: jax.grad(jax.grad(_ra_loss))(jnp.array(1.0)),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    "ReversibleAdjoint, grad w.r.t. args of grad w.r.t. y0": (
        lambda: _grad_of_grad_wrt_y0(_ra_loss),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    # Forward over reverse is exact there (tests/test_reversible_adjoint.py).
    "ReversibleAdjoint, grad of grad w.r.t. an input of the loss alone": (
        lambda: _second_wrt_a_loss_input(_ra_loss, jax.grad),
        TypeError,
        r"first derivatives only.*jax.jacfwd\(jax.grad.*diffrax.DirectAdjoint",
    ),
    "ReversibleAdjoint gradient w.r.t. jump_ts": (
        lambda: _ra_setting_gradient("jump_ts"),
        RuntimeError,
        "step size controller's parameters",
    ),
    "ReversibleAdjoint gradient w.r.t. rtol": (
        lambda: _ra_setting_gradient("rtol"),
        RuntimeError,
        "step size controller's parameters",
    ),
    "ReversibleAdjoint gradient w.r.t. dt0": (
        lambda: _ra_setting_gradient("dt0"),
        RuntimeError,
        "differentiate with respect to `dt0`",
    ),
    "ReversibleAdjoint gradient w.r.t. the controller's state": (
        lambda: _ra_setting_gradient("controller_state"),
        RuntimeError,
        r"step size controller's state \(`diffeqsolve\(..., controller_state=",
    ),
    "ReversibleAdjoint gradient w.r.t. the coupling": (
        lambda: _ra_setting_gradient("coupling"),
        RuntimeError,
        r"parameters of `solver=Reversible",
    ),
    "ReversibleAdjoint with HalfSolver(ReversibleHeun())": (
        lambda: _ode(solver=dfx.HalfSolver(dxe.ReversibleHeun()), adjoint=_RA),
        ValueError,
        r"HalfSolver\(ReversibleHeun\(...\)\)` is not one.*solver=ReversibleHeun\(\)",
    ),
    "ReversibleHeun on underdamped Langevin terms": (
        lambda: _langevin(dxe.ReversibleHeun()),
        ValueError,
        "underdamped Langevin.*QUICSORT",
    ),
    # GaussLegendreAdjoint
    "GaussLegendreAdjoint n_nodes=0": (
        lambda: dxe.GaussLegendreAdjoint(0),
        ValueError,
        "n_nodes",
    ),
    "GaussLegendreAdjoint n_nodes=2.0": (
        lambda: dxe.GaussLegendreAdjoint(2.0),  # pyright: ignore[reportArgumentType]
        TypeError,
        "n_nodes",
    ),
    "GaussLegendreAdjoint adjoint=...": (
        lambda: dxe.GaussLegendreAdjoint(adjoint=dfx.RecursiveCheckpointAdjoint()),
        ValueError,
        "adjoint",
    ),
    "GaussLegendreAdjoint with SaveAt(steps=True)": (
        lambda: _ode(solver=dfx.Tsit5(), adjoint=_GL, saveat=dfx.SaveAt(steps=True)),
        NotImplementedError,
        "steps=True",
    ),
    "GaussLegendreAdjoint with SaveAt(dense=True)": (
        lambda: _ode(
            solver=dfx.Tsit5(), adjoint=_GL, saveat=dfx.SaveAt(t1=True, dense=True)
        ),
        NotImplementedError,
        "dense",
    ),
    "GaussLegendreAdjoint with SaveAt(fn=...)": (
        lambda: _ode(
            solver=dfx.Tsit5(),
            adjoint=_GL,
            saveat=dfx.SaveAt(t1=True, fn=lambda t, y, args: y**2),
        ),
        NotImplementedError,
        "fn=",
    ),
    "GaussLegendreAdjoint with SaveAt(subs=[...])": (
        lambda: _ode(
            solver=dfx.Tsit5(),
            adjoint=_GL,
            saveat=dfx.SaveAt(subs=[dfx.SubSaveAt(t1=True)] * 2),
        ),
        NotImplementedError,
        "subs",
    ),
    "GaussLegendreAdjoint with an event": (
        lambda: _ode(solver=dfx.Tsit5(), adjoint=_GL, event=_EVENT),
        NotImplementedError,
        "events",
    ),
    "GaussLegendreAdjoint with a Brownian control": (
        lambda: _sde(dfx.Heun(), _tree(), adjoint=_GL),
        NotImplementedError,
        "Brownian.*Wong",
    ),
    "GaussLegendreAdjoint with UnsafeBrownianPath": (
        lambda: _sde(dfx.Heun(), _unsafe(), adjoint=_GL),
        NotImplementedError,
        "Brownian.*Wong",
    ),
    "GaussLegendreAdjoint, backward solve it cannot do": (
        lambda: _ode(
            solver=dfx.KenCarp3(),
            adjoint=_GL,
            terms=dfx.MultiTerm(dfx.ODETerm(_decay), dfx.ODETerm(_decay)),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3),
        ),
        NotImplementedError,
        r"GaussLegendreAdjoint\(solver=",
    ),
    "GaussLegendreAdjoint gradient w.r.t. interpolation knots": (
        lambda: _interpolation_gradient(0),
        Exception,
        "knot times",
    ),
    "GaussLegendreAdjoint gradient w.r.t. t1": (
        lambda: _interpolation_gradient(1),
        Exception,
        "`t1`",
    ),
    "GaussLegendreAdjoint n_nodes=1": (
        lambda: dxe.GaussLegendreAdjoint(1),
        ValueError,
        "`n_nodes` must be at least 2",
    ),
    "GaussLegendreAdjoint max_refinements=-1": (
        lambda: dxe.GaussLegendreAdjoint(max_refinements=-1),
        ValueError,
        "`max_refinements`",
    ),
    "GaussLegendreAdjoint steps_per_chunk=0": (
        lambda: dxe.GaussLegendreAdjoint(steps_per_chunk=0),
        ValueError,
        "`steps_per_chunk`",
    ),
    "GaussLegendreAdjoint quadrature_rtol=-1": (
        lambda: dxe.GaussLegendreAdjoint(quadrature_rtol=-1.0),
        ValueError,
        "`quadrature_rtol`",
    ),
    "GaussLegendreAdjoint backward StepTo": (
        lambda: _gl_backward(
            dxe.GaussLegendreAdjoint(stepsize_controller=dfx.StepTo(ts=[0.0, 1.0]))
        ),
        ValueError,
        r"GaussLegendreAdjoint\(stepsize_controller=diffrax.ConstantStepSize\(\)",
    ),
    "GaussLegendreAdjoint backward ConstantStepSize without dt0": (
        lambda: _gl_backward(
            dxe.GaussLegendreAdjoint(stepsize_controller=dfx.ConstantStepSize()),
            dt0=None,
        ),
        ValueError,
        r"pass `GaussLegendreAdjoint\(dt0=...\)`",
    ),
    "GaussLegendreAdjoint backward max_steps too few": (
        lambda: _gl_backward(dxe.GaussLegendreAdjoint(max_steps=2)),
        Exception,
        r"backward solve of `GaussLegendreAdjoint` reached the maximum number of "
        r"solver steps \(max_steps=2\).*GaussLegendreAdjoint\(max_steps=...\)",
    ),
    "GaussLegendreAdjoint with a control given as a function": (
        _gl_callable_control,
        NotImplementedError,
        "derivative of a `ControlTerm`'s control",
    ),
    "GaussLegendreAdjoint gradient w.r.t. jump_ts": (
        _gl_jump_ts_gradient,
        Exception,
        "step size controller's parameters",
    ),
    "GaussLegendreAdjoint under jax.jvp": (
        lambda: jax.jvp(_gl_loss, (jnp.array(1.0),), (jnp.array(1.0),)),
        TypeError,
        r"`GaussLegendreAdjoint\(\)` differentiates in reverse mode only.*"
        r"diffrax.ForwardMode",
    ),
    "GaussLegendreAdjoint under jax.hessian": (
        lambda: jax.hessian(_gl_loss)(jnp.array(1.0)),
        TypeError,
        r"`GaussLegendreAdjoint\(\)` computes first derivatives only.*"
        r"diffrax.DirectAdjoint",
    ),
    "GaussLegendreAdjoint, grad of grad": (
        lambda: jax.grad(jax.grad(_gl_loss))(jnp.array(1.0)),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    # It once met JAX's "Differentiation rule for 'nextafter' not implemented".
    "GaussLegendreAdjoint, grad w.r.t. args of grad w.r.t. y0": (
        lambda: _grad_of_grad_wrt_y0(_gl_loss),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    "GaussLegendreAdjoint, grad of grad w.r.t. an input of the loss alone": (
        lambda: _second_wrt_a_loss_input(_gl_loss, jax.grad),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    "GaussLegendreAdjoint, jacfwd of grad w.r.t. an input of the loss alone": (
        lambda: _second_wrt_a_loss_input(_gl_loss, jax.jacfwd),
        TypeError,
        r"first derivatives only.*diffrax.DirectAdjoint",
    ),
    # BrownianInterval
    "BrownianInterval t1 < t0": (
        lambda: _interval(t0=1.0, t1=0.0),
        ValueError,
        "`t1` must lie in",
    ),
    "BrownianInterval tol=0": (lambda: _interval(tol=0.0), ValueError, "`tol` must"),
    "BrownianInterval tol<0": (lambda: _interval(tol=-1e-3), ValueError, "`tol` must"),
    "BrownianInterval tol too fine for dt": (
        lambda: _interval(tol=1e-14, dt=0.5),
        ValueError,
        "deeper than 32 levels",
    ),
    "BrownianInterval dt=0": (lambda: _interval(dt=0.0), ValueError, "`dt` must lie"),
    "BrownianInterval dt > t1 - t0": (
        lambda: _interval(dt=1.5),
        ValueError,
        "`dt` must lie in",
    ),
    "BrownianInterval dt below the resolution of float32 times": (
        lambda: _interval(
            t0=jnp.float32(1e4), t1=jnp.float32(1e4 + 1), tol=jnp.float32(1e-4), dt=1e-3
        ),
        ValueError,
        "cannot be told apart in float32",
    ),
    "BrownianInterval more than 2**31 pieces": (
        lambda: _interval(dt=1e-10),
        ValueError,
        "More than 2\\*\\*31 - 1 pieces",
    ),
    "BrownianInterval traced dt<0": (
        lambda: jax.jit(lambda dt: _interval(dt=dt).evaluate(0.1, 0.2))(-0.1),
        Exception,
        "`dt` must lie in",
    ),
    "BrownianInterval integer dtype": (
        lambda: _interval(shape=jax.ShapeDtypeStruct((2,), jnp.int32)),
        ValueError,
        "floating-point",
    ),
    "BrownianInterval shape as a list": (
        lambda: _interval(shape=[3]),
        ValueError,
        "ShapeDtypeStruct",
    ),
    "BrownianInterval abstract levy_area": (
        lambda: _interval(levy_area=dfx.AbstractBrownianIncrement),
        ValueError,
        "`levy_area` must be",
    ),
    "BrownianInterval query past t1": (
        lambda: _interval().evaluate(0.5, 1.5),
        Exception,
        "queried outside its interval",
    ),
    "BrownianInterval query before t0": (
        lambda: _interval().evaluate(-0.1),
        Exception,
        "queried outside its interval",
    ),
    "BrownianInterval Lévy area not configured": (
        lambda: dfx.diffeqsolve(
            dfx.MultiTerm(
                dfx.ODETerm(_decay),
                dfx.ControlTerm(lambda t, y, args: jnp.eye(2), _interval()),
            ),
            dfx.ShARK(),
            0.0,
            1.0,
            0.1,
            jnp.ones(2),
        ),
        Exception,
        "SpaceTimeLevyArea",
    ),
    "BrownianInterval gradient w.r.t. time": (
        lambda: jax.grad(lambda t: jnp.sum(_interval().evaluate(jnp.array(0.1), t)))(  # pyright: ignore[reportArgumentType]
            jnp.array(0.5)
        ),
        Exception,
        "t1",
    ),
    # Wong–Zakai
    "KarhunenLoevePath n_modes=0": (lambda: _kl(0), ValueError, "n_modes"),
    "KarhunenLoevePath n_modes=2.5": (lambda: _kl(2.5), TypeError, "n_modes"),
    "KarhunenLoevePath t1 = t0": (lambda: _kl(t0=1.0), ValueError, "`t1`"),
    "KarhunenLoevePath integer dtype": (
        lambda: _kl(shape=jax.ShapeDtypeStruct((2,), jnp.int32)),
        ValueError,
        "floating",
    ),
    "KarhunenLoevePath.from_brownian of a smooth path": (
        lambda: dxe.KarhunenLoevePath.from_brownian(_kl(), 4, 16),  # pyright: ignore[reportArgumentType]
        ValueError,
        "Brownian path",
    ),
    "WongZakai without a Brownian control": (
        lambda: dxe.WongZakai(dfx.ODETerm(_decay)),
        ValueError,
        "Brownian control",
    ),
    "WongZakai.ode_terms with a Brownian path": (
        lambda: dxe.WongZakai(_sde_terms()).ode_terms(
            dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (3,), jr.key(0))
        ),
        ValueError,
        "differentiable",
    ),
    "WongZakai.ode_terms with the wrong shape": (
        lambda: dxe.WongZakai(_sde_terms()).ode_terms(_kl(shape=(4,))),
        ValueError,
        "shape",
    ),
    "WongZakai.sde_terms with a smooth path": (
        lambda: dxe.WongZakai(_sde_terms()).sde_terms(_kl(), dfx.Heun()),  # pyright: ignore[reportArgumentType]
        ValueError,
        "Brownian path",
    ),
    "WongZakai.sde_terms with an Itô solver": (
        lambda: dxe.WongZakai(_sde_terms()).sde_terms(
            dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (3,), jr.key(0)), dfx.Euler()
        ),
        ValueError,
        "Itô.*Stratonovich",
    ),
    # SDE-GAN recipe
    "lipswish on integers": (
        lambda: dxe.lipswish(jnp.arange(3)),
        TypeError,
        "needs a floating array `x`.*astype",
    ),
    "clip_weights on a filtered model": (
        lambda: dxe.clip_weights(_filtered_linear()),
        TypeError,
        "Call it on the model itself",
    ),
}


@pytest.mark.filterwarnings("ignore:.*not marked as converging")
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_clear_error(name):
    make, error, match = CASES[name]
    with pytest.raises(error, match=match):
        make()


def test_default_coupling_on_langevin_dynamics_warns():
    with pytest.warns(UserWarning, match="coupling well below 1"):
        _langevin(dxe.Reversible(dfx.QUICSORT(100.0)))
