import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from diffrax import (
    AbstractBrownianPath,
    AbstractItoSolver,
    AbstractPath,
    AbstractSolver,
    AbstractStratonovichSolver,
    AbstractTerm,
    ControlTerm,
)
from jaxtyping import Array, Inexact, PRNGKeyArray, PyTree, Real

from ._diffrax_internals import RealScalarLike
from ._misc import check_integer, path_shape, path_times


_MORE_MODES = "More modes give a rougher path, closer to Brownian motion."


class KarhunenLoevePath(AbstractPath):
    r"""A smooth approximation of Brownian motion: its Karhunen–Loève series on
    $[t_0, t_1]$, truncated after `n_modes` terms.

    With $c = t_1 - t_0$ and $\omega_n = (n - \tfrac12)\pi / c$,

    $W_N(t) = \sum_{n=1}^{N} Z_n \frac{\sqrt{2/c}}{\omega_n} \sin(\omega_n (t - t_0)),
    \qquad W_N'(t) = \sqrt{2/c} \sum_{n=1}^{N} Z_n \cos(\omega_n (t - t_0)),$

    where the $Z_n$ are independent standard normals drawn from `key`. As $N$ grows
    $W_N$ tends to Brownian motion: its covariance
    $\sum_n \sin(\omega_n s) \sin(\omega_n t) \, 2/(c\,\omega_n^2)$ tends to
    $\min(s, t) - t_0$. Being differentiable, it can drive a `ControlTerm` as an
    ODE (`ControlTerm(g, path).to_ode()`), which any ODE solver and adjoint can
    solve and differentiate; by the Wong–Zakai theorem the solutions tend to those of
    the Stratonovich SDE.

    To compare with an SDE solve path by path, build the path from a Brownian path
    with [`diffrax_extras.KarhunenLoevePath.from_brownian`][] instead.

    ??? cite "Reference"

        ```bibtex
        @article{norcliffe2023faster,
            title={Faster Training of Neural {ODE}s Using Gau{\ss}--Legendre
                   Quadrature},
            author={Norcliffe, Alexander and Deisenroth, Marc Peter},
            journal={Transactions on Machine Learning Research},
            year={2023}
        }

        @article{wong1965convergence,
            title={On the Convergence of Ordinary Integrals to Stochastic Integrals},
            author={Wong, Eugene and Zakai, Moshe},
            journal={The Annals of Mathematical Statistics},
            volume={36},
            number={5},
            pages={1560--1564},
            year={1965}
        }
        ```
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    coefficients: PyTree[Inexact[Array, "n_modes ..."]]

    def __init__(
        self,
        t0: RealScalarLike,
        t1: RealScalarLike,
        shape: tuple[int, ...] | PyTree[jax.ShapeDtypeStruct],
        key: PRNGKeyArray,
        n_modes: int,
    ):
        """**Arguments:**

        - `t0`, `t1`: the interval of the path.
        - `shape`: as for diffrax's Brownian paths: a tuple of integers, or a PyTree of
            `jax.ShapeDtypeStruct`s giving the shape, dtype and PyTree structure of
            the path's values.
        - `key`: a JAX random key; the coefficients are drawn from it.
        - `n_modes`: the number of terms of the series.
        """
        n_modes = check_integer(n_modes, "n_modes", 1, _MORE_MODES)
        shape = path_shape(shape)
        leaves, treedef = jtu.tree_flatten(shape)
        keys = jr.split(key, len(leaves))
        coefficients = [
            jr.normal(k, (n_modes, *s.shape), s.dtype)
            for k, s in zip(keys, leaves, strict=True)
        ]
        self.t0, self.t1 = path_times(t0, t1)
        self.coefficients = jtu.tree_unflatten(treedef, coefficients)

    @classmethod
    def from_brownian(
        cls, brownian: AbstractBrownianPath, n_modes: int, num_points: int
    ) -> "KarhunenLoevePath":
        r"""The series of a given Brownian path, for pathwise comparisons.

        The coefficients are those of the piecewise-linear interpolation of
        `brownian` on `num_points` equal steps of $[t_0, t_1]$,
        $Z_n = \sum_k \frac{\Delta W_k}{h} \int_{s_k}^{s_{k+1}} \sqrt{2/c}
        \cos(\omega_n (s - t_0)) \,\mathrm{d}s$. As `num_points` and then `n_modes`
        grow, the path tends to `brownian` itself, so an ODE driven by it tends to the
        Stratonovich SDE driven by `brownian`, path by path. With `num_points` at
        least a few times `n_modes`, the coefficients are close to independent
        standard normals.

        **Arguments:**

        - `brownian`: a Brownian path, such as [`diffrax_extras.BrownianInterval`][]
            or `diffrax.VirtualBrownianTree`.
        - `n_modes`: the number of terms of the series.
        - `num_points`: the number of steps on which `brownian` is sampled.
        """
        if not isinstance(brownian, AbstractBrownianPath):
            raise ValueError(
                "`brownian` must be a Brownian path (a `diffrax.AbstractBrownianPath`, "
                f"such as `diffrax_extras.BrownianInterval`), but got "
                f"{type(brownian).__name__}."
            )
        n_modes = check_integer(n_modes, "n_modes", 1, _MORE_MODES)
        num_points = check_integer(num_points, "num_points", 1)
        t0, t1 = path_times(brownian.t0, brownian.t1)
        grid = jnp.linspace(t0, t1, num_points + 1)
        increments = jax.vmap(brownian.evaluate)(grid[:-1], grid[1:])
        phi = jax.vmap(lambda t: _basis(t0, t1, n_modes, t)[0])(grid)
        # (steps, modes): the exact integral of each cosine over each step, per unit
        # of time, so the coefficients are those of the piecewise-linear path.
        weights = (phi[1:] - phi[:-1]) / (grid[1:] - grid[:-1])[:, None]

        def _project(dw):
            w = weights.astype(dw.dtype)
            return jnp.tensordot(w, dw, axes=(0, 0))

        coefficients = jtu.tree_map(_project, increments)
        shape = jax.eval_shape(lambda: jtu.tree_map(lambda z: z[0], coefficients))
        # The key only fills coefficients that are replaced at once.
        path = cls(t0, t1, shape, jr.key(0), n_modes)
        return eqx.tree_at(lambda p: p.coefficients, path, coefficients)

    @property
    def n_modes(self) -> int:
        return jtu.tree_leaves(self.coefficients)[0].shape[0]

    def _combine(self, basis: Real[Array, " n_modes"]) -> PyTree[Array]:
        return jtu.tree_map(
            lambda z: jnp.tensordot(basis.astype(z.dtype), z, axes=1),
            self.coefficients,
        )

    def evaluate(
        self, t0: RealScalarLike, t1: RealScalarLike | None = None, left: bool = True
    ) -> PyTree[Array]:
        del left
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: b - a, self.evaluate(t0), self.evaluate(t1)
            )
        phi, _ = _basis(self.t0, self.t1, self.n_modes, t0)
        return self._combine(phi)

    def derivative(self, t: RealScalarLike, left: bool = True) -> PyTree[Array]:
        del left
        _, psi = _basis(self.t0, self.t1, self.n_modes, t)
        return self._combine(psi)


def _basis(t0, t1, n_modes: int, t) -> tuple[Array, Array]:
    """The sine basis of the series and its derivative, the cosines, at `t`."""
    length = t1 - t0
    dtype = jnp.result_type(length)
    omega = (jnp.arange(1, n_modes + 1, dtype=dtype) - 0.5) * (math.pi / length)
    scale = jnp.sqrt(2 / length)
    phase = omega * (jnp.asarray(t, dtype) - t0)
    return scale * jnp.sin(phase) / omega, scale * jnp.cos(phase)


def _is_control_term(x) -> bool:
    return isinstance(x, ControlTerm)


def _brownian_terms(terms: PyTree[AbstractTerm]) -> list[ControlTerm]:
    return [
        t
        for t in jtu.tree_leaves(terms, is_leaf=_is_control_term)
        if _is_control_term(t) and isinstance(t.control, AbstractBrownianPath)
    ]


class WongZakai(eqx.Module):
    r"""Train an SDE as an ODE driven by smooth noise; sample it as an SDE.

    Takes ordinary diffrax SDE terms, such as
    `MultiTerm(ODETerm(f), ControlTerm(g, brownian))`, and builds from them, with the
    same `f`, `g` and parameters:

    - `ode_terms(path)`: the training terms, with every Brownian control replaced by
        a smooth path (a [`diffrax_extras.KarhunenLoevePath`][]) and turned into an
        ODE term. Any ODE solver and any adjoint apply, including
        [`diffrax_extras.GaussLegendreAdjoint`][] and adaptive step sizes.
    - `sde_terms(brownian, solver)`: the sampling terms, with a Brownian path (e.g.
        [`diffrax_extras.BrownianInterval`][]) in its place.

    By the Wong–Zakai theorem ODEs driven by smooth approximations of Brownian motion
    converge to the *Stratonovich* SDE, so the sampling solver must be a Stratonovich
    one (`Heun`, `Midpoint`, `EulerHeun`, `ReversibleHeun`, `SPaRK`, ...): an Itô
    solver raises an error.

    !!! example

        ```python
        wz = dxe.WongZakai(
            diffrax.MultiTerm(diffrax.ODETerm(f), diffrax.ControlTerm(g, bm))
        )
        path = dxe.KarhunenLoevePath(t0, t1, shape=(d,), key=key, n_modes=16)
        train = diffrax.diffeqsolve(
            wz.ode_terms(path), diffrax.Tsit5(), t0, t1, None, y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-6),
            adjoint=dxe.GaussLegendreAdjoint(),
        )
        sample = diffrax.diffeqsolve(
            wz.sde_terms(bm, diffrax.Heun()), diffrax.Heun(), t0, t1, dt, y0
        )
        ```

    ??? cite "Reference"

        ```bibtex
        @article{norcliffe2023faster,
            title={Faster Training of Neural {ODE}s Using Gau{\ss}--Legendre
                   Quadrature},
            author={Norcliffe, Alexander and Deisenroth, Marc Peter},
            journal={Transactions on Machine Learning Research},
            year={2023}
        }
        ```
    """

    terms: PyTree[AbstractTerm]

    def __init__(self, terms: PyTree[AbstractTerm]):
        """**Arguments:**

        - `terms`: the SDE's terms: a PyTree of diffrax terms in which at least one
            `ControlTerm` (or `WeaklyDiagonalControlTerm`) has a Brownian control.
            Every Brownian control is replaced by the same path in `ode_terms` and
            `sde_terms`; other terms are kept as they are.
        """
        if not _brownian_terms(terms):
            raise ValueError(
                "`terms` has no `ControlTerm` with a Brownian control to replace. "
                "Pass the SDE's terms, e.g. `MultiTerm(ODETerm(drift), "
                "ControlTerm(diffusion, brownian))`."
            )
        self.terms = terms

    def _replace(self, path: AbstractPath, to_ode: bool) -> PyTree[AbstractTerm]:
        def _swap(term):
            if not (
                _is_control_term(term)
                and isinstance(term.control, AbstractBrownianPath)
            ):
                return term
            old = jax.eval_shape(lambda: term.control.evaluate(path.t0, path.t1))
            new = jax.eval_shape(lambda: path.evaluate(path.t0, path.t1))
            if jtu.tree_structure(old) != jtu.tree_structure(new) or any(
                (a.shape, a.dtype) != (b.shape, b.dtype)
                for a, b in zip(jtu.tree_leaves(old), jtu.tree_leaves(new), strict=True)
            ):
                raise ValueError(
                    "The replacement path must have the shape, dtype and structure "
                    f"of the Brownian control it replaces: {old} against {new}."
                )
            swapped = eqx.tree_at(lambda t: t.control, term, path)
            return swapped.to_ode() if to_ode else swapped

        return jtu.tree_map(_swap, self.terms, is_leaf=_is_control_term)

    def ode_terms(self, path: AbstractPath) -> PyTree[AbstractTerm]:
        """The training terms: every Brownian control replaced by the differentiable
        `path` (usually a [`diffrax_extras.KarhunenLoevePath`][]) and each such
        `ControlTerm` turned into an `ODETerm`.

        **Arguments:**

        - `path`: a differentiable path of the Brownian control's shape.
        """
        if isinstance(path, AbstractBrownianPath):
            raise ValueError(
                "`ode_terms` needs a differentiable path, but got a Brownian one "
                f"({type(path).__name__}). Pass a `diffrax_extras.KarhunenLoevePath`, "
                "or use `sde_terms` to sample the SDE."
            )
        if not isinstance(path, AbstractPath):
            raise ValueError(
                f"`path` must be a `diffrax.AbstractPath`, got {type(path).__name__}."
            )
        return self._replace(path, to_ode=True)

    def sde_terms(
        self, brownian: AbstractBrownianPath, solver: AbstractSolver
    ) -> PyTree[AbstractTerm]:
        """The sampling terms: every Brownian control replaced by `brownian`.

        **Arguments:**

        - `brownian`: a Brownian path of the same shape as the original one, such
            as [`diffrax_extras.BrownianInterval`][].
        - `solver`: the solver that will sample the SDE, checked to converge to the
            Stratonovich solution (the limit of the training ODEs).
        """
        if not isinstance(brownian, AbstractBrownianPath):
            raise ValueError(
                "`sde_terms` needs a Brownian path (a `diffrax.AbstractBrownianPath`, "
                f"such as `diffrax_extras.BrownianInterval`), but got "
                f"{type(brownian).__name__}. Use `ode_terms` for smooth paths."
            )
        base = getattr(solver, "solver", solver)  # through `Reversible(solver)`
        if isinstance(base, AbstractItoSolver) and not isinstance(
            base, AbstractStratonovichSolver
        ):
            raise ValueError(
                f"`{type(base).__name__}` converges to the Itô solution, but ODEs "
                "driven by smooth noise converge to the Stratonovich one, so the "
                "sampled SDE would not be the trained model. Use a Stratonovich "
                "solver: `diffrax.Heun()`, `diffrax.Midpoint()`, "
                "`diffrax.EulerHeun()`, `diffrax_extras.ReversibleHeun()`, ..."
            )
        return self._replace(brownian, to_ode=False)
