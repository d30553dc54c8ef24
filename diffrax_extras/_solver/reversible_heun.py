from collections.abc import Callable
from typing import ClassVar, TypeAlias

import jax.tree_util as jtu
from diffrax import (
    AbstractAdaptiveSolver,
    AbstractStratonovichSolver,
    AbstractTerm,
    LocalLinearInterpolation,
    RESULTS,
)
from jaxtyping import PyTree

from .._diffrax_internals import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from .._misc import is_underdamped_langevin, refresh_if
from .base import AbstractReversibleSolver


_SolverState: TypeAlias = tuple[PyTree, PyTree]


def _refresh_vf(terms, t, yhat, vf, args, made_jump):
    """The vector field at `(t, yhat)`, re-evaluated only if a jump made `vf` stale."""
    if made_jump is False:
        return vf
    return refresh_if(made_jump, lambda: terms.vf(t, yhat, args), vf)


class ReversibleHeun(
    AbstractReversibleSolver[_SolverState],
    AbstractAdaptiveSolver[_SolverState],
    AbstractStratonovichSolver[_SolverState],
):
    r"""Reversible Heun method, with an exact algebraic inverse.

    The state is $(y, \hat{y}, \hat{f})$ with $\hat{f} = f(t, \hat{y})$. With $\Delta X$
    the control increment over the step ($\Delta t$ for an ODE, $(\Delta t, \Delta W)$
    for an SDE):

    $$\hat{y}_1 = 2y_0 - \hat{y}_0 + f(t_0, \hat{y}_0)\Delta X, \qquad
    y_1 = y_0 + \tfrac{1}{2}\bigl(f(t_0, \hat{y}_0) + f(t_1, \hat{y}_1)\bigr)\Delta X.$$

    One vector-field evaluation per step; order 2 for ODEs; converges to the
    Stratonovich solution of an SDE (strong order 0.5, or 1 for additive noise). Has
    an embedded first-order error estimate for adaptive step sizes, and uses linear
    interpolation for dense output and `SaveAt(ts=...)`.

    Unlike `diffrax.ReversibleHeun`, after a jump (`jump_ts` of
    `diffrax.ClipStepSizeController`) this re-evaluates the vector field at
    $\hat{y}_0$, not $y_0$, so the solve stays exactly reversible across jumps.
    Without jumps the two produce the same numbers;
    [`diffrax_extras.ReversibleAdjoint`][] accepts `diffrax.ReversibleHeun()` and
    solves with this class in its place.

    !!! warning "Stability"

        Reversible Heun is stable only on the segment $i[-1, 1]$ of the imaginary
        axis (for $\lambda\Delta t$, with $\lambda$ an eigenvalue of the Jacobian of the
        vector field): dissipative (real-negative) dynamics are not damped, and a
        stiff problem shows a growing parasitic oscillation between $y$ and
        $\hat{y}$. Use small steps, or [`diffrax_extras.Reversible`][] around a
        solver with a larger stability region.

    ??? cite "Reference"

        ```bibtex
        @article{kidger2021efficient,
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            title={{E}fficient and {A}ccurate {G}radients for {N}eural {SDE}s},
            year={2021},
            journal={Advances in Neural Information Processing Systems}
        }
        ```
    """

    term_structure: ClassVar = AbstractTerm
    interpolation_cls: ClassVar[Callable[..., LocalLinearInterpolation]] = (
        LocalLinearInterpolation
    )

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5

    def init(
        self,
        terms: AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        del t1
        if is_underdamped_langevin(terms):
            raise ValueError(
                "`ReversibleHeun()` cannot solve underdamped Langevin dynamics: the "
                "friction makes them dissipative, where reversible Heun is unstable "
                "at every step size (its parasitic mode grows; diffrax's Langevin "
                "example reaches variances of 1e6-1e10 instead of 1). Use diffrax's "
                "Langevin solvers (`diffrax.QUICSORT`, `diffrax.ShOULD`, "
                "`diffrax.ALIGN`), or, for a reversible solver, "
                "`diffrax_extras.Reversible(diffrax.QUICSORT(...), coupling=0.9)`."
            )
        return y0, terms.vf(t0, y0, args)

    def step(
        self,
        terms: AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y, DenseInfo, _SolverState, RESULTS]:
        yhat0, vf0 = solver_state
        vf0 = _refresh_vf(terms, t0, yhat0, vf0, args, made_jump)
        control = terms.contr(t0, t1)
        yhat1 = jtu.tree_map(
            lambda y, yh, dy: 2 * y - yh + dy,
            y0,
            yhat0,
            terms.prod(vf0, control),
        )
        vf1 = terms.vf(t1, yhat1, args)
        y1 = _heun_update(terms, y0, vf0, vf1, control, sign=1)
        vf_diff = jtu.tree_map(lambda a, b: a - b, vf1, vf0)
        y1_error = jtu.tree_map(lambda e: 0.5 * e, terms.prod(vf_diff, control))
        dense_info = dict(y0=y0, y1=y1)
        return y1, y1_error, dense_info, (yhat1, vf1), RESULTS.successful

    def backward_step(
        self,
        terms: AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump0: BoolScalarLike,
        made_jump1: BoolScalarLike,
    ) -> tuple[Y, DenseInfo, _SolverState, RESULTS]:
        # A jump at t0 made the forward step re-evaluate f at yhat0, which is what
        # the reconstruction evaluates anyway.
        del made_jump0
        yhat1, vf1 = solver_state
        vf1 = _refresh_vf(terms, t1, yhat1, vf1, args, made_jump1)
        control = terms.contr(t0, t1)
        yhat0 = jtu.tree_map(
            lambda y, yh, dy: 2 * y - yh - dy,
            y1,
            yhat1,
            terms.prod(vf1, control),
        )
        vf0 = terms.vf(t0, yhat0, args)
        y0 = _heun_update(terms, y1, vf0, vf1, control, sign=-1)
        dense_info = dict(y0=y0, y1=y1)
        return y0, dense_info, (yhat0, vf0), RESULTS.successful

    def func(self, terms: AbstractTerm, t0: RealScalarLike, y0: Y, args: Args) -> VF:
        return terms.vf(t0, y0, args)

    def unstable_reconstruction_advice(self) -> str:
        return (
            "Reversible Heun does not damp dissipative dynamics (see the warning in "
            "its docstring): run backwards, a decay at rate r amplifies rounding "
            "by about exp(r T) over a solve of length T, whatever the step, so "
            "smaller steps help only where a step is long against 1 / r. Use "
            "float64, or `diffrax_extras.Reversible(diffrax.Heun())` (a coupling "
            "below 1 damps forwards); or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


def _heun_update(terms, y, vf0, vf1, control, sign):
    # Computes y ± ½(f0 + f1)ΔX with the same rounding forwards and backwards, so that
    # the inverse step undoes exactly what the forward step did.
    vf_sum = jtu.tree_map(lambda a, b: a + b, vf0, vf1)
    return jtu.tree_map(
        lambda _y, dy: _y + sign * (0.5 * dy), y, terms.prod(vf_sum, control)
    )


ReversibleHeun.__init__.__doc__ = """**Arguments:** None"""
