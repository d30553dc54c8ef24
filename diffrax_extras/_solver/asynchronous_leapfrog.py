from collections.abc import Callable
from typing import ClassVar, TypeAlias

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractAdaptiveSolver,
    AbstractTerm,
    LocalLinearInterpolation,
    RESULTS,
)
from jaxtyping import PyTree

from .._diffrax_internals import (
    Args,
    BoolScalarLike,
    DenseInfo,
    is_sde,
    RealScalarLike,
    unvmap_any,
    VF,
    Y,
)
from .._misc import (
    check_in_interval,
    materialise_cotangent,
    refresh_if,
    tree_add,
    tree_lincomb,
)
from .base import AbstractReversibleSolver


# The solver state is `(v, d)`: `v`, the carried approximation of the vector field,
# and `d`, the previous step's `v_mid - v0`, which only the error estimate reads.
_SolverState: TypeAlias = tuple[VF, VF]


class AsynchronousLeapfrog(
    AbstractReversibleSolver[_SolverState], AbstractAdaptiveSolver
):
    r"""The damped asynchronous leapfrog method of MALI, with an exact inverse.

    The state is $(y, v)$ with $v_0 = f(t_0, y_0)$. With damping $\eta \in (1/2, 1]$
    and $\Delta X$ the control increment over the step ($h$ for an ODE), a step is

    $$\tilde{y} = y_0 + \tfrac{1}{2} v_0 \Delta X, \quad
    \tilde{v} = f(t_0 + \tfrac{h}{2}, \tilde{y}), \quad
    v_1 = v_0 + 2\eta(\tilde{v} - v_0), \quad
    y_1 = \tilde{y} + \tfrac{1}{2} v_1 \Delta X,$$

    and its exact inverse is $\tilde{y} = y_1 - \frac{1}{2} v_1 \Delta X$,
    $v_0 = (2\eta\tilde{v} - v_1)/(2\eta - 1)$, $y_0 = \tilde{y} - \frac{1}{2} v_0
    \Delta X$. One vector-field evaluation per step, order 2 (order 1 when damped).
    Dense output is linear between steps.

    For adaptive step sizes the error estimate is
    $\frac{1}{4}(d_n + d_{n-1})\Delta X$ with $d_n = \tilde{v} - v_0$ of this step
    and $d_{n-1}$ of the previous one (kept in the solver state). MALI's own estimate,
    $\frac{1}{2}d_n\Delta X$, also measures the parasitic error of the carried $v$,
    which the undamped method never damps: after a kink of a control or a jump of the
    vector field it flips sign every step and stays, and the controller answered it
    with ever smaller steps (a CDE with one kink at `rtol=1e-6` exhausted 200,000
    steps). That error moves $y$ only at second order and with alternating sign, so
    the sum of two consecutive differences, in which it cancels, is what the estimate
    uses; the same CDE then takes 3,644 steps (reversible Heun: 2,689).

    Solves ODEs and CDEs. SDEs are refused: the carried $v$ is not known to converge
    for rough controls; use [`diffrax_extras.ReversibleHeun`][] or
    [`diffrax_extras.Reversible`][] around a Stratonovich solver instead.

    !!! tip "Damping"

        With $\eta = 1$ (no damping) the method is stable on the imaginary segment
        $i[-1, 1]$ only, like [`diffrax_extras.ReversibleHeun`][]: the error of $v$
        oscillates without decaying. With $\eta < 1$ that error is multiplied by
        $1 - 2\eta$ each step and the stability region grows into the left
        half-plane, while the inverse step divides by $2\eta - 1$, so reconstruction
        errors grow by up to $1/(2\eta - 1)$ a step: over $N$ steps by
        $(2\eta - 1)^{-N}$, e.g. about $10^{9}$ for $\eta = 0.99$ and $N = 1000$.
        Keep $\eta = 1$ for long solves with [`diffrax_extras.ReversibleAdjoint`][];
        use damping only for short solves of dissipative problems, and check the
        gradient against `diffrax.RecursiveCheckpointAdjoint` once.

    !!! note "Jumps"

        At a jump (`jump_ts` of `diffrax.ClipStepSizeController`) re-evaluating
        $v$ would lose what is needed to step backwards, so instead the carried $v$ is
        shifted by the jump of the vector field at the current state,
        $v \mathrel{+}= f(t_0, y_0) - f(t_0^-, y_0)$ with $t_0^-$ two floating-point
        numbers before $t_0$, just before the jump; the backward step subtracts the
        same shift, so the inverse stays exact. (Two extra evaluations of the vector
        field at each jump.)

    ??? cite "Reference"

        ```bibtex
        @inproceedings{zhuang2021mali,
            title={{MALI}: A memory efficient and reverse accurate integrator for
                   {N}eural {ODE}s},
            author={Zhuang, Juntang and Dvornek, Nicha C and Tatikonda, Sekhar and
                    Duncan, James S},
            booktitle={International Conference on Learning Representations},
            year={2021}
        }
        ```
    """

    damping: RealScalarLike = 1.0

    term_structure: ClassVar = AbstractTerm
    interpolation_cls: ClassVar[Callable[..., LocalLinearInterpolation]] = (
        LocalLinearInterpolation
    )

    def __check_init__(self):
        check_in_interval(self.damping, "damping", 0.5, 1.0, _DAMPING_ADVICE)

    def order(self, terms: PyTree[AbstractTerm]) -> int | None:
        # Overall y1 = y0 + h((1 - eta) v0 + eta v_mid): the midpoint rule, of second
        # order, only when eta = 1.
        try:
            undamped = bool(np.asarray(self.damping) == 1)
        except jax.errors.TracerArrayConversionError:
            undamped = False
        return 2 if undamped else 1

    def error_order(self, terms: PyTree[AbstractTerm]) -> RealScalarLike | None:
        # The estimate (h/4)(d_n + d_{n-1}) is O(h^2) whatever the damping.
        return 2

    def strong_order(self, terms: PyTree[AbstractTerm]) -> RealScalarLike | None:
        return None

    def init(
        self,
        terms: AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        del t1
        if is_sde(terms):
            raise ValueError(
                "`AsynchronousLeapfrog()` solves ODEs and CDEs, not SDEs. Use "
                "`diffrax_extras.ReversibleHeun()` or `diffrax_extras.Reversible("
                "diffrax.Heun())` for an SDE."
            )
        v0 = terms.vf(t0, y0, args)
        return v0, jtu.tree_map(jnp.zeros_like, v0)

    def reconstructed_state(self, solver_state: _SolverState) -> PyTree:
        # `d` feeds the error estimate only, so the backward step does not rebuild it.
        v, _ = solver_state
        return v

    def _damping(self) -> RealScalarLike:
        return check_in_interval(self.damping, "damping", 0.5, 1.0, _DAMPING_ADVICE)

    @staticmethod
    def _jump(terms, t0, y0, args):
        """The jump of the vector field at `t0`, at `y0`."""
        t0 = jnp.asarray(t0)
        before = jnp.nextafter(t0, jnp.asarray(-jnp.inf, t0.dtype))
        # diffrax starts the step after a jump one or two floating-point numbers
        # after it; two before the start is before the jump in either case.
        before = jnp.nextafter(before, jnp.asarray(-jnp.inf, t0.dtype))
        return tree_lincomb(
            (1, terms.vf(t0, y0, args)), (-1, terms.vf(before, y0, args))
        )

    def _shift(self, terms, t0, y0, v, args, made_jump, sign):
        """`v` shifted by `sign` times the jump of the vector field, where
        `made_jump`."""
        if made_jump is False:
            return v
        return refresh_if(
            made_jump,
            lambda: tree_lincomb((1, v), (sign, self._jump(terms, t0, y0, args))),
            v,
        )

    @staticmethod
    def _midpoint(terms, t0, t1, y0, v0):
        """The half step to the midpoint: `(t_mid, y_mid)`."""
        control = terms.contr(t0, t1)
        return t0 + 0.5 * (t1 - t0), tree_lincomb(
            (1, y0), (0.5, terms.prod(v0, control))
        )

    def _finish(self, terms, t0, t1, y_mid, v0, v_mid):
        """Everything after the vector-field evaluation: `(y1, v1, d)`."""
        eta = self._damping()
        control = terms.contr(t0, t1)
        v1 = tree_lincomb((1 - 2 * eta, v0), (2 * eta, v_mid))
        y1 = tree_lincomb((1, y_mid), (0.5, terms.prod(v1, control)))
        return y1, v1, tree_lincomb((1, v_mid), (-1, v0))

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
        v0, d_prev = solver_state
        v0 = self._shift(terms, t0, y0, v0, args, made_jump, 1)
        t_mid, y_mid = self._midpoint(terms, t0, t1, y0, v0)
        v_mid = terms.vf(t_mid, y_mid, args)
        y1, v1, d = self._finish(terms, t0, t1, y_mid, v0, v_mid)
        d_sum = tree_lincomb((1, d), (1, d_prev))
        y_error = tree_lincomb((0.25, terms.prod(d_sum, terms.contr(t0, t1))))
        return y1, y_error, dict(y0=y0, y1=y1), (v1, d), RESULTS.successful

    def _reconstruct(self, terms, t0, t1, y1, v1, vf):
        """`(y0, v0 as the step used it, v_mid, extra)`, given
        `vf(t, y) -> (f(t, y), extra)`."""
        eta = self._damping()
        control = terms.contr(t0, t1)
        t_mid = t0 + 0.5 * (t1 - t0)
        y_mid = tree_lincomb((1, y1), (-0.5, terms.prod(v1, control)))
        v_mid, extra = vf(t_mid, y_mid)
        v0 = tree_lincomb((2 * eta / (2 * eta - 1), v_mid), (-1 / (2 * eta - 1), v1))
        y0 = tree_lincomb((1, y_mid), (-0.5, terms.prod(v0, control)))
        return y0, v0, v_mid, extra

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
        del made_jump1
        v1, d1 = solver_state
        y0, v0, _, _ = self._reconstruct(
            terms, t0, t1, y1, v1, lambda t, y: (terms.vf(t, y, args), None)
        )
        v0 = self._shift(terms, t0, y0, v0, args, made_jump0, -1)
        # `d` is not rebuilt (see `reconstructed_state`); the step ignores it.
        return y0, dict(y0=y0, y1=y1), (v0, d1), RESULTS.successful

    def backward_step_vjp(
        self,
        terms: AbstractTerm,
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
        # The step is `finish(y_mid, v, f(y_mid))` with `y_mid = midpoint(y0, v)` and
        # `v` the carried `v0`, shifted at a jump. The reconstruction evaluates f at
        # the midpoint, so it takes the VJP of f there; the linear maps around it are
        # cheap to differentiate again.
        del made_jump1
        v1, d1 = solver_state

        def vf(t, y):
            return eqx.filter_vjp(
                lambda _y, _a, _terms: _terms.vf(t, _y, _a), y, args, terms
            )

        y0, v_used, v_mid, vf_vjp = self._reconstruct(terms, t0, t1, y1, v1, vf)
        v0 = self._shift(terms, t0, y0, v_used, args, made_jump0, -1)
        dense_info = dict(y0=y0, y1=y1)

        def midpoint(_y0, _v, _terms):
            return self._midpoint(_terms, t0, t1, _y0, _v)[1]

        def finish(_y_mid, _y0, _v, _v_mid, _terms):
            _y1, _v1, _d = self._finish(_terms, t0, t1, _y_mid, _v, _v_mid)
            return _y1, dict(y0=_y0, y1=_y1), (_v1, _d)

        def pullback(ct_dense):
            cotangents = (ct_y1, ct_dense, ct_state1)
            y_mid, midpoint_vjp = eqx.filter_vjp(midpoint, y0, v_used, terms)
            out, finish_vjp = eqx.filter_vjp(finish, y_mid, y0, v_used, v_mid, terms)
            ct_y_mid, ct_y0, ct_v, ct_v_mid, ct_terms = finish_vjp(
                materialise_cotangent(out, cotangents)
            )
            ct_y_mid_vf, ct_args, ct_terms_vf = vf_vjp(ct_v_mid)
            ct_y0_mid, ct_v_mid_point, ct_terms_mid = midpoint_vjp(
                tree_add(ct_y_mid, ct_y_mid_vf)
            )
            ct_v = tree_add(ct_v, ct_v_mid_point)
            ct_y0 = tree_add(ct_y0, ct_y0_mid)
            ct_terms = tree_add(ct_terms, tree_add(ct_terms_vf, ct_terms_mid))
            if made_jump0 is not False:
                ct_y0, ct_args, ct_terms = self._jump_vjp(
                    terms, t0, y0, args, made_jump0, ct_v, (ct_y0, ct_args, ct_terms)
                )
            ct_d0 = jtu.tree_map(jnp.zeros_like, d1)
            return ct_y0, (ct_v, ct_d0), ct_args, ct_terms

        return y0, dense_info, (v0, d1), RESULTS.successful, pullback

    def _jump_vjp(self, terms, t0, y0, args, made_jump, ct_v, cts):
        """Adds the cotangents through the shift of `v` at a jump, where `made_jump`
        (skipped, under `jax.vmap` too, unless some batch member jumped)."""
        made_jump = jnp.asarray(made_jump)

        def through_shift():
            _, vjp_fn = eqx.filter_vjp(
                lambda _y, _a, _t: self._jump(_t, t0, _y, _a), y0, args, terms
            )
            extra = vjp_fn(ct_v)
            extra = jtu.tree_map(
                lambda x: jnp.where(made_jump, x, jnp.zeros_like(x)), extra
            )
            return tree_add(cts, extra)

        return lax.cond(unvmap_any(made_jump), through_shift, lambda: cts)

    def func(self, terms: AbstractTerm, t0: RealScalarLike, y0: Y, args: Args) -> VF:
        return terms.vf(t0, y0, args)

    def unstable_reconstruction_advice(self) -> str:
        return (
            "Each backward step divides the error of `v` by `2 * damping - 1`: use "
            "`AsynchronousLeapfrog(damping=1.0)`, float64, or fewer steps; or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


AsynchronousLeapfrog.__init__.__doc__ = """**Arguments:**

- `damping`: the damping $\\eta \\in (1/2, 1]$. Defaults to `1.0` (no damping), as in
    MALI; see the tip above for the trade-off.
"""

_DAMPING_ADVICE = (
    "Use `damping=1.0` (no damping, as in MALI) or a value a little below it; "
    "at 0.5 the inverse step does not exist."
)
