import functools as ft
import warnings
from collections.abc import Callable
from typing import Any, TypeAlias

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax import (
    AbstractAdaptiveSolver,
    AbstractLocalInterpolation,
    AbstractSolver,
    AbstractStratonovichSolver,
    AbstractTerm,
    AbstractWrappedSolver,
    RESULTS,
)
from jaxtyping import Array, PyTree

from .._diffrax_internals import (
    Args,
    BoolScalarLike,
    DenseInfo,
    is_sde,
    is_unsafe_sde,
    linear_rescale,
    RealScalarLike,
    VF,
    Y,
)
from .._misc import (
    check_in_interval,
    is_underdamped_langevin,
    materialise_cotangent,
    tree_add,
    tree_lincomb,
    zeros_cotangent,
)
from .base import AbstractReversibleSolver


# The solver state is `z`, the second copy of the state that the coupling carries.
_SolverState: TypeAlias = Y

# Solvers whose steps depend on state carried over from the previous step, which a
# fresh `init` per step would silently change into a different method.
_STATEFUL = (
    diffrax.ReversibleHeun,
    diffrax.LeapfrogMidpoint,
    diffrax.SemiImplicitEuler,
)


def _first_result(results: RESULTS) -> RESULTS:
    """The first unsuccessful result of a stacked pair, or success."""
    first = jtu.tree_map(lambda r: r[0], results)
    second = jtu.tree_map(lambda r: r[1], results)
    return RESULTS.where(first == RESULTS.successful, second, first)


def _index(tree: PyTree, i: int) -> PyTree:
    return jtu.tree_map(lambda x: x[i], tree)


class Reversible(
    AbstractReversibleSolver[_SolverState],
    AbstractAdaptiveSolver[_SolverState],
    # SDEs are accepted only with a Stratonovich base solver (checked in `init`).
    AbstractStratonovichSolver[_SolverState],
    # diffrax forwards `isinstance` checks through a wrapped solver to the solver it
    # wraps, and then reads that kind of solver's own attributes (`scan_kind` of a
    # Runge–Kutta method for forward-mode autodiff, `root_finder` of an implicit one
    # for its tolerances); `__getattr__` below forwards them.
    AbstractWrappedSolver[_SolverState],
):
    r"""Makes any single-step solver algebraically reversible.

    Let $\Psi_h(t, x)$ be the increment of one step of `solver` from $x$ over
    $[t, t + h]$, started from a fresh solver state. With the coupling
    $\lambda \in (0, 1]$ the state is $(y, z)$, $z_0 = y_0$, and a step is

    $$y_1 = \lambda y_0 + (1 - \lambda) z_0 + \Psi_h(t_0, z_0), \qquad
    z_1 = z_0 - \Psi_{-h}(t_1, y_1),$$

    whose exact inverse is $z_0 = z_1 + \Psi_{-h}(t_1, y_1)$,
    $y_0 = \lambda^{-1}\bigl(y_1 - (1 - \lambda) z_0 - \Psi_h(t_0, z_0)\bigr)$. This
    keeps the order of `solver`, uses its error estimate for adaptive step sizes and
    its interpolation (shifted onto $y$) for dense output, at the price of two steps
    of `solver` per step. With [`diffrax_extras.ReversibleAdjoint`][] the gradient is
    exact and its memory does not grow with the number of steps.

    Works for ODEs and CDEs with any single-step solver, explicit or implicit
    (`Euler`, `Heun`, `Midpoint`, `Ralston`, `Bosh3`, `Tsit5`, `Dopri5`, `Dopri8`,
    `Kvaerno5`, ...), and for SDEs with a Stratonovich solver (`EulerHeun`, `Heun`,
    `Midpoint`, `SPaRK`, `ShARK`, `GeneralShARK`, `SRA1`, the Langevin solvers, ...),
    given a Brownian path that can be queried backwards in time and again, such as
    [`diffrax_extras.BrownianInterval`][] or `diffrax.VirtualBrownianTree`. It is a
    diffrax wrapped solver: `isinstance` checks and the attributes diffrax reads are
    forwarded to `solver`.

    An implicit `solver` inverts exactly too, since the inverse only evaluates its
    steps at the points the forward step did; but on a stiff problem, where every
    accurate step contracts, running the solve backwards expands errors whatever
    the solver, and [`diffrax_extras.ReversibleAdjoint`][] refuses the gradient.

    !!! tip "Choosing the coupling"

        One step's linear part has determinant $\lambda$. On a dissipative problem the
        forward solve is stable when $\lambda$ is small enough compared to the step
        size, but the reconstruction on the backward pass runs the inverse, which
        grows errors by up to $1/\lambda$ a step. The default $\lambda = 0.999$ keeps
        the reconstruction accurate over many thousands of steps; lower it (e.g. to
        0.9 or 0.5) only if the forward solve oscillates or diverges at step sizes
        where `solver` alone is stable.

    ??? cite "Reference"

        ```bibtex
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural ODEs},
            author={McCallum, Sam and Foster, James},
            journal={arXiv preprint arXiv:2410.11648},
            year={2024}
        }
        ```
    """

    solver: AbstractSolver
    coupling: RealScalarLike = 0.999

    def __check_init__(self):
        solver = self.solver
        name = type(solver).__name__
        if isinstance(solver, AbstractReversibleSolver):
            raise ValueError(
                f"`Reversible(solver={name}(...))`: the solver is already reversible. "
                "Pass it to `diffeqsolve` directly instead of wrapping it again."
            )
        if isinstance(solver, _STATEFUL):
            raise ValueError(
                f"`Reversible(solver={name}(...))` needs a single-step solver, but "
                f"`{name}` carries state from one step to the next. "
                "`diffrax.ReversibleHeun` is reversible already: use "
                "`diffrax_extras.ReversibleHeun()`; otherwise wrap a single-step "
                "solver such as `diffrax.Tsit5()` or `diffrax.Heun()`."
            )
        check_in_interval(
            self.coupling,
            "coupling",
            0.0,
            1.0,
            "The default 0.999 suits most problems; see the docstring of "
            "`diffrax_extras.Reversible`.",
        )

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes that `Reversible` does not define: those of the
        # wrapped solver that diffrax reads (`minimal_levy_area` of an SRK method,
        # `scan_kind`, `root_finder`, ...). `eqx.tree_at` finds them through here as
        # parts of `self.solver`.
        if name.startswith("_") or name == "solver":
            raise AttributeError(name)
        return getattr(self.solver, name)

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return _coupled_interpolation(self.solver.interpolation_cls)

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms: PyTree[AbstractTerm]) -> int | None:
        return self.solver.order(terms)

    def strong_order(self, terms: PyTree[AbstractTerm]) -> RealScalarLike | None:
        return self.solver.strong_order(terms)

    def error_order(self, terms: PyTree[AbstractTerm]) -> RealScalarLike | None:
        return self.solver.error_order(terms)

    def init(
        self,
        terms: PyTree[AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        del t0, t1, args
        name = type(self.solver).__name__
        if is_sde(terms) and not isinstance(self.solver, AbstractStratonovichSolver):
            raise ValueError(
                f"`Reversible({name}(...))` cannot solve an SDE: its steps run "
                "backwards in time too, which converges to the Stratonovich solution "
                f"only for a Stratonovich solver, and `{name}` is not one. Use e.g. "
                "`diffrax.Heun()`, `diffrax.EulerHeun()` or `diffrax.SPaRK()`."
            )
        if is_unsafe_sde(terms):
            raise ValueError(
                "`Reversible(...)` queries the Brownian motion backwards in time, "
                "which `diffrax.UnsafeBrownianPath` cannot do consistently. Use "
                "`diffrax_extras.BrownianInterval` or `diffrax.VirtualBrownianTree`."
            )
        if is_underdamped_langevin(terms) and _at_least(self.coupling, 0.99):
            warnings.warn(
                f"`Reversible({name}(...), coupling={self.coupling})` on underdamped "
                "Langevin dynamics: their friction makes them dissipative, where the "
                "coupled steps are stable only for a coupling well below 1 (on "
                "diffrax's Langevin example at gamma * dt = 0.1 the default 0.999 "
                "diverges to variances of 1e11; 0.9 samples the stationary law). "
                "Pass e.g. `coupling=0.9`.",
                stacklevel=2,
            )
        return y0

    def _coupling(self) -> RealScalarLike:
        return check_in_interval(self.coupling, "coupling", 0.0, 1.0, "")

    def _increment(self, terms, ta, tb, x, args):
        """Psi: one step of the base solver from `x` over `[ta, tb]`, from a fresh
        state (so no state of the base solver has to be reversed)."""
        state = self.solver.init(terms, ta, tb, x, args)
        x1, y_error, dense_info, _, result = self.solver.step(
            terms, ta, tb, x, args, state, False
        )
        psi = jtu.tree_map(lambda a, b: a - b, x1, x)
        return psi, y_error, dense_info, result

    def step(
        self,
        terms: PyTree[AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y | None, DenseInfo, _SolverState, RESULTS]:
        del made_jump  # Every base step starts afresh: nothing is cached.
        z0 = solver_state
        lam = self._coupling()

        def psi(x, ta, tb):
            return self._increment(terms, ta, tb, x, args)

        def next_point(x, out):
            return tree_lincomb((lam, y0), (1 - lam, z0), (1, out[0]))

        points, (psis, y_errors, denses, results) = _twice(
            psi, z0, _times(t0, t1), next_point
        )
        y1 = _index(points, 1)
        z1 = tree_lincomb((1, z0), (-1, _index(psis, 1)))
        dense_info = _coupled_dense_info(lam, y0, z0, _index(denses, 0))
        y_error = None if y_errors is None else _index(y_errors, 0)
        return y1, y_error, dense_info, z1, _first_result(results)

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
        del made_jump0, made_jump1  # Every base step starts afresh: nothing is cached.

        def psi(x, ta, tb):
            psi, _, dense_info, result = self._increment(terms, ta, tb, x, args)
            return psi, dense_info, result

        y0, z0, dense_base, _, result = self._reconstruct(t0, t1, y1, solver_state, psi)
        dense_info = _coupled_dense_info(self._coupling(), y0, z0, dense_base)
        return y0, dense_info, z0, result

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
        # The forward step is z0 -> Psi_h -> y1 -> Psi_{-h} -> z1; the reconstruction
        # evaluates Psi at the same two points in the opposite order, which is also
        # the order of the pullback. The cotangent of Psi_{-h} is known at once
        # (-ct_z1: its dense output is not used), so its VJP is applied as soon as it
        # is taken and only the VJP of Psi_h, which needs the dense output's
        # cotangent, is kept: one base step's residuals at a time, and the forward
        # step is never run again.
        del made_jump0, made_jump1
        lam = self._coupling()
        ct_y1, ct_z1 = materialise_cotangent((y1, solver_state), (ct_y1, ct_state1))

        def vjp_at(x, ta, tb):
            def _fn(_x, _args, _terms):
                _psi, _, _dense_info, _result = self._increment(
                    _terms, ta, tb, _x, _args
                )
                return (_psi, _dense_info), _result

            return eqx.filter_vjp(_fn, x, args, terms, has_aux=True)

        (psi_b, dense_b), vjp_b, result_b = vjp_at(y1, t1, t0)
        ct_y1_b, ct_args_b, ct_terms_b = vjp_b(
            (tree_lincomb((-1, ct_z1)), zeros_cotangent(dense_b))
        )
        ct_y1_total = tree_lincomb((1, ct_y1), (1, ct_y1_b))
        z0 = tree_lincomb((1, solver_state), (1, psi_b))
        (psi_a, dense_base), vjp_a, result_a = vjp_at(z0, t0, t1)
        y0 = tree_lincomb((1 / lam, y1), (-(1 - lam) / lam, z0), (-1 / lam, psi_a))
        dense_info = _coupled_dense_info(lam, y0, z0, dense_base)
        result = RESULTS.where(result_b == RESULTS.successful, result_a, result_b)

        def pullback(ct_dense):
            ct_dense = materialise_cotangent(dense_info, ct_dense)
            ct_offset = tree_lincomb(
                (1, ct_dense["offset0"]), (lam, ct_dense["offset1"])
            )
            ct_z0_a, ct_args_a, ct_terms_a = vjp_a((ct_y1_total, ct_dense["base"]))
            ct_y0 = tree_lincomb((1, ct_offset), (lam, ct_y1_total))
            ct_z0 = tree_lincomb(
                (1, ct_z1), (-1, ct_offset), (1 - lam, ct_y1_total), (1, ct_z0_a)
            )
            return (
                ct_y0,
                ct_z0,
                tree_add(ct_args_a, ct_args_b),
                tree_add(ct_terms_a, ct_terms_b),
            )

        return y0, dense_info, z0, result, pullback

    def _reconstruct(self, t0, t1, y1, z1, psi):
        """Inverts a step, given `psi(x, ta, tb) -> (increment, extra, result)`.

        Returns `(y0, z0, extra at z0, both extras stacked, result)`.
        """
        lam = self._coupling()

        def next_point(x, out):
            return tree_lincomb((1, z1), (1, out[0]))

        points, (psis, extras, results) = _twice(psi, y1, _times(t1, t0), next_point)
        z0 = _index(points, 1)
        psi_a = _index(psis, 1)
        y0 = tree_lincomb((1 / lam, y1), (-(1 - lam) / lam, z0), (-1 / lam, psi_a))
        return y0, z0, _index(extras, 1), extras, _first_result(results)

    def func(
        self, terms: PyTree[AbstractTerm], t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return self.solver.func(terms, t0, y0, args)

    def unstable_reconstruction_advice(self) -> str:
        return (
            "Each backward step divides by the coupling: use a coupling closer to 1 "
            "in `Reversible(..., coupling=...)` (1 is the most stable backwards), "
            "float64, or fewer steps; or "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`."
        )


Reversible.__init__.__doc__ = """**Arguments:**

- `solver`: the single-step solver to make reversible, e.g. `diffrax.Tsit5()`.
- `coupling`: the coupling parameter $\\lambda \\in (0, 1]$; smaller is more stable
    forwards and less accurate to reconstruct backwards. Defaults to `0.999`.
"""


def _at_least(value: RealScalarLike, bound: float) -> bool:
    """`value >= bound` for a concrete value; `False` for a traced one."""
    try:
        return bool(np.asarray(value) >= bound)
    except jax.errors.TracerArrayConversionError:
        return False


def _times(ta: RealScalarLike, tb: RealScalarLike) -> Array:
    """The step's two time intervals, `[ta, tb]` and then `[tb, ta]`, stacked."""
    ta, tb = jnp.asarray(ta), jnp.asarray(tb)
    return jnp.stack([jnp.stack([ta, tb]), jnp.stack([tb, ta])])


def _twice(
    psi: Callable[[PyTree, Array, Array], tuple[Any, ...]],
    x0: PyTree,
    times: Array,
    next_point: Callable[[PyTree, tuple[Any, ...]], PyTree],
):
    """Evaluates `psi` at `x0` over `times[0]`, then at `next_point(x0, out0)` over
    `times[1]`, in a two-iteration `lax.scan`.

    Running both evaluations through one loop body traces the base solver's step once
    instead of twice, which halves the compile time that a wrapped solver adds.

    Returns the two points and the two outputs of `psi`, each stacked.
    """

    def body(x, ta_tb):
        ta, tb = ta_tb
        out = psi(x, ta, tb)
        return next_point(x, out), (x, out)

    _, (points, outs) = lax.scan(body, x0, times)
    return points, outs


def _coupled_dense_info(lam, y0, z0, dense_base) -> DenseInfo:
    offset0 = tree_lincomb((1, y0), (-1, z0))
    return dict(base=dense_base, offset0=offset0, offset1=tree_lincomb((lam, offset0)))


class _CoupledInterpolation(AbstractLocalInterpolation):
    """The base solver's interpolation of `z`, shifted onto `y`: `y - z` moves
    linearly from `offset0` at `t0` to `offset1` at `t1`."""

    t0: RealScalarLike
    t1: RealScalarLike
    base: AbstractLocalInterpolation
    offset0: Y
    offset1: Y

    def evaluate(
        self, t0: RealScalarLike, t1: RealScalarLike | None = None, left: bool = True
    ) -> Y:
        if t1 is not None:
            return tree_lincomb(
                (1, self.evaluate(t1, left=left)), (-1, self.evaluate(t0, left=left))
            )
        # Guarded against `self.t0 == self.t1`, as diffrax's interpolations are: the
        # steps that a finished member of a `jax.vmap`ped batch keeps taking have
        # zero length, and an unguarded division there gives NaN gradients.
        s = linear_rescale(self.t0, t0, self.t1)
        return tree_lincomb(
            (1, self.base.evaluate(t0, left=left)),
            (1 - s, self.offset0),
            (s, self.offset1),
        )


@ft.cache
def _coupled_interpolation(base_cls: Callable[..., AbstractLocalInterpolation]):
    # Cached so that the solver hands diffrax the same callable every time (it may be
    # kept as static data, e.g. by `SaveAt(dense=True)`).
    def make(*, t0, t1, base, offset0, offset1) -> _CoupledInterpolation:
        return _CoupledInterpolation(
            t0=t0,
            t1=t1,
            base=base_cls(t0=t0, t1=t1, **base),
            offset0=offset0,
            offset1=offset1,
        )

    return make
