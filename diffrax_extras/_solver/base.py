import abc
from collections.abc import Callable
from typing import Generic, TypeVar

import equinox as eqx
from diffrax import AbstractSolver, AbstractTerm, RESULTS
from jaxtyping import PyTree

from .._diffrax_internals import Args, BoolScalarLike, DenseInfo, RealScalarLike, Y
from .._misc import materialise_cotangent


_SolverState = TypeVar("_SolverState")


class AbstractReversibleSolver(AbstractSolver[_SolverState], Generic[_SolverState]):
    """Abstract base class for algebraically reversible solvers.

    A reversible solver has, besides the usual `diffrax.AbstractSolver.step`, an
    exact inverse `backward_step`: given what `step` returned it reconstructs what
    `step` was given, up to floating-point rounding. This is what lets
    [`diffrax_extras.ReversibleAdjoint`][] compute the exact gradient of the
    discretised solve in memory that does not grow with the number of steps.

    Subclasses implement `backward_step`; they may also override
    `backward_step_vjp`, the hook the adjoint calls once per step, to fuse the
    reconstruction with the vector-Jacobian product (the default reconstructs and then
    differentiates `step`).
    """

    @abc.abstractmethod
    def backward_step(
        self,
        terms: PyTree[AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump0: BoolScalarLike,
        made_jump1: BoolScalarLike,
    ) -> tuple[Y, DenseInfo, _SolverState, RESULTS]:
        """Inverts one step of the solver.

        **Arguments:**

        - `terms`, `t0`, `t1`, `args`: as for the forward `step` that is inverted.
        - `y1`: the value of `y` that the forward `step` returned.
        - `solver_state`: the solver state that the forward `step` returned, or, if
            `made_jump1`, the one that the backward step of the next step returned.
        - `made_jump0`: the `made_jump` that the forward step was given (a jump at
            `t0`).
        - `made_jump1`: whether the forward solve jumped at `t1`, i.e. whether the step
            *after* this one was taken with `made_jump=True`. Any solver state that
            that step refreshed at the jump is then stale and must be re-evaluated at
            `t1` before stepping backwards.

        **Returns:**

        A 4-tuple `(y0, dense_info, solver_state, result)`: the value of `y` at `t0`,
        the same dense information the forward step produced, the solver state the
        forward step was given (parts that the forward step refreshes because of
        `made_jump0`, and so ignores, may be returned stale), and a `diffrax.RESULTS`.
        """

    def backward_step_vjp(
        self,
        terms: PyTree[AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump0: BoolScalarLike,
        made_jump1: BoolScalarLike,
        ct_y1: Y,
        ct_state1: _SolverState,
    ) -> tuple[Y, DenseInfo, _SolverState, RESULTS, Callable]:
        """Inverts one step and returns the pullback of the forward step there.

        This is the hook that [`diffrax_extras.ReversibleAdjoint`][] calls once per
        step on its backward pass. The default reconstructs with `backward_step` and
        then differentiates `step` at the reconstructed point; subclasses may
        override it to reuse the reconstruction's vector-field evaluations, and to
        apply parts of the pullback early (the cotangents of `y1` and of the solver
        state are given; only that of the dense output has to wait for the
        reconstructed step), so that fewer residuals are alive at once.

        **Arguments:**

        - `terms`, `t0`, `t1`, `y1`, `args`, `solver_state`, `made_jump0`,
            `made_jump1`: as for `backward_step`.
        - `ct_y1`, `ct_state1`: the cotangents of the forward step's outputs `y1` and
            `solver_state` (`None` standing for zero).

        **Returns:**

        A 5-tuple `(y0, dense_info, solver_state0, result, pullback)`: the first four
        as for `backward_step`, and `pullback`, a function taking the cotangent of
        the forward step's `dense_info` (`None` standing for zero) to the cotangents
        of its inputs `(y0, solver_state0, args, terms)`, each filtered to its
        inexact arrays as by `equinox.filter_vjp`.
        """
        y0, _, solver_state0, result = self.backward_step(
            terms, t0, t1, y1, args, solver_state, made_jump0, made_jump1
        )

        def _step(_y0, _solver_state0, _args, _terms):
            _y1, _, _dense_info, _solver_state1, _ = self.step(
                _terms, t0, t1, _y0, _args, _solver_state0, made_jump0
            )
            return _y1, _dense_info, _solver_state1

        out, vjp_fn = eqx.filter_vjp(_step, y0, solver_state0, args, terms)
        _, dense_info, _ = out

        def pullback(ct_dense):
            cotangents = (ct_y1, ct_dense, ct_state1)
            return vjp_fn(materialise_cotangent(out, cotangents))

        return y0, dense_info, solver_state0, result, pullback

    def reconstructed_state(self, solver_state: _SolverState) -> PyTree:
        """The part of a solver state that `backward_step` rebuilds exactly: all of
        it, unless a subclass keeps something that only its error estimate reads.
        [`diffrax_extras.ReversibleAdjoint`][] checks this part of the rebuilt initial
        solver state against the true one."""
        return solver_state

    def unstable_reconstruction_advice(self) -> str:
        """What to change when the backward pass cannot rebuild the initial state
        (named in the error [`diffrax_extras.ReversibleAdjoint`][] raises then)."""
        return (
            "Use smaller steps or float64, or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )
