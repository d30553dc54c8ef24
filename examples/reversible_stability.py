"""Stability of the reversible solvers, and what the coupling / damping trades.

1. Plots the linear stability regions (the set of w = h*mu, mu an eigenvalue of the
   Jacobian, where one step does not grow any perturbation) of
   `Reversible(Tsit5(), coupling)` for several couplings, of `Tsit5()` itself, and of
   `AsynchronousLeapfrog(damping)` for several dampings. Each region is computed from
   the solvers' own `step`: the spectral radius of the Jacobian of one step of the
   linear test problem, state included.
2. Solves a stiff-ish problem, y' = -10 (y - cos t) at step 0.05 (w = -0.5), with each
   coupling, and reports the forward error and the error of the `ReversibleAdjoint`
   gradient against `RecursiveCheckpointAdjoint`.

Saves `examples/reversible_stability_output/{stability_regions.png,stiff.md}`.
Run: `python examples/reversible_stability.py`.
"""

import os
import pathlib

import diffrax as dfx
import jax
import jax.numpy as jnp
import matplotlib
from jax.flatten_util import ravel_pytree


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import diffrax_extras as dxe  # noqa: E402


jax.config.update("jax_enable_x64", True)

# Plots go next to this script unless DIFFRAX_EXTRAS_OUTPUT names another folder
# (the tests use a temporary one, so the committed plots stay those of full runs).
OUTPUT = (
    pathlib.Path(os.environ.get("DIFFRAX_EXTRAS_OUTPUT", pathlib.Path(__file__).parent))
    / "reversible_stability_output"
)
TINY = os.environ.get("DIFFRAX_EXTRAS_TINY") == "1"


def spectral_radius(solver, w):
    """Largest |eigenvalue| of one step's Jacobian on y' = mu y with h * mu = w, the
    complex scalar written as a real 2-vector, the solver state included."""
    a = jnp.array([[w.real, -w.imag], [w.imag, w.real]])
    term = dfx.ODETerm(lambda t, y, args: args @ y)
    y0 = jnp.array([1.0, 0.0])
    state0 = solver.init(term, 0.0, 1.0, y0, a)
    flat0, unflatten = ravel_pytree((y0, state0))

    def one_step(flat):
        y, state = unflatten(flat)
        y1, _, _, state1, _ = solver.step(term, 0.0, 1.0, y, a, state, False)
        return ravel_pytree((y1, state1))[0]

    return jnp.max(jnp.abs(jnp.linalg.eigvals(jax.jacrev(one_step)(flat0))))


def stability_regions():
    n = 80 if TINY else 300
    re = jnp.linspace(-6.0, 1.0, n)
    im = jnp.linspace(-4.0, 4.0, n)
    grid = (re[None, :] + 1j * im[:, None]).ravel()
    panels = {
        "Reversible(Tsit5(), coupling)": [
            ("Tsit5 alone", dfx.Tsit5()),
            ("coupling 0.999", dxe.Reversible(dfx.Tsit5(), 0.999)),
            ("coupling 0.9", dxe.Reversible(dfx.Tsit5(), 0.9)),
            ("coupling 0.5", dxe.Reversible(dfx.Tsit5(), 0.5)),
        ],
        "AsynchronousLeapfrog(damping)": [
            ("damping 1.0", dxe.AsynchronousLeapfrog(1.0)),
            ("damping 0.9", dxe.AsynchronousLeapfrog(0.9)),
            ("damping 0.7", dxe.AsynchronousLeapfrog(0.7)),
        ],
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, (title, solvers) in zip(axes, panels.items(), strict=True):
        for (label, solver), colour in zip(
            solvers, ["k", "C0", "C1", "C2"], strict=False
        ):
            radius = jax.jit(jax.vmap(spectral_radius, in_axes=(None, 0)))(solver, grid)
            stable = (radius <= 1 + 1e-9).reshape(n, n)
            ax.contour(re, im, stable.astype(float), levels=[0.5], colors=colour)
            ax.plot([], [], color=colour, label=label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(f"{title}: stable inside each curve")
        ax.set_xlabel("Re(h mu)")
        ax.set_ylabel("Im(h mu)")
        ax.legend(loc="lower left")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(OUTPUT / "stability_regions.png", dpi=110)


def stiff_example() -> str:
    term = dfx.ODETerm(lambda t, y, args: -args * (y - jnp.cos(t)))
    y0 = jnp.array([0.0])
    rate = jnp.array(10.0)
    dt, t1 = 0.05, 1.0
    # Exact solution of y' = -k (y - cos t), y(0) = 0.
    k = 10.0
    exact = k * (k * jnp.cos(t1) + jnp.sin(t1)) / (k**2 + 1) - k**2 / (
        k**2 + 1
    ) * jnp.exp(-k * t1)

    def solve(solver, adjoint, rate):
        sol = dfx.diffeqsolve(term, solver, 0.0, t1, dt, y0, args=rate, adjoint=adjoint)
        assert sol.ys is not None
        return sol.ys[-1, 0]

    rows = [
        "| solver | error at t = 1 | gradient error vs RecursiveCheckpointAdjoint |",
        "| --- | ---: | ---: |",
    ]
    solvers = [("Tsit5()", dfx.Tsit5(), None)] + [
        (f"Reversible(Tsit5(), {c})", dxe.Reversible(dfx.Tsit5(), c), c)
        for c in ((0.999, 0.5) if TINY else (0.999, 0.9, 0.7, 0.5))
    ]
    for label, solver, coupling in solvers:
        value = solve(solver, dfx.RecursiveCheckpointAdjoint(), rate)
        grad_note = "n/a"
        if coupling is not None:
            ref = jax.grad(solve, argnums=2)(
                solver, dfx.RecursiveCheckpointAdjoint(), rate
            )
            rev = jax.grad(solve, argnums=2)(solver, dxe.ReversibleAdjoint(), rate)
            grad_note = f"{float(jnp.abs(rev - ref) / jnp.abs(ref)):.1e}"
        rows.append(
            f"| `{label}` | {float(jnp.abs(value - exact)):.1e} | {grad_note} |"
        )
    return "\n".join(rows) + "\n"


def main():
    OUTPUT.mkdir(parents=True, exist_ok=True)
    stability_regions()
    table = stiff_example()
    (OUTPUT / "stiff.md").write_text(table)
    print(table)
    print(f"Saved {OUTPUT / 'stability_regions.png'} and {OUTPUT / 'stiff.md'}")


if __name__ == "__main__":
    main()
