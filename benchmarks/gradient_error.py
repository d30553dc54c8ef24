"""How exact each adjoint's gradient is, and how far float32 drifts from float64.

A neural ODE (state 8, MLP width 32 with tanh, batch 16, t in [0, 10], loss the mean
square of y(1)), fixed steps of 1/N. Two tables:

- adjoints: at N = 100, the relative error (max over parameters of
  max|g - g_ref| / max|g_ref|) of each adjoint's gradient against the exact gradient
  of the same discretised solve (`RecursiveCheckpointAdjoint` with the same solver
  in float64), in float64 and in float32; and against the ODE's own gradient
  (Tsit5 + `RecursiveCheckpointAdjoint` at 10N steps, float64). The reversible
  adjoint differentiates the discretisation exactly (to rounding), as
  `RecursiveCheckpointAdjoint` does; `BacksolveAdjoint` and `GaussLegendreAdjoint`
  (here with Heun, second order as `ReversibleHeun` is) differentiate the ODE, so
  they differ from the discretisation's gradient by its error.
- float32 drift: for each reversible solver and coupling/damping, at N = 100, 1,000
  and 10,000, the error of the float32 `ReversibleAdjoint` gradient against the
  exact float64 one, with float32 `RecursiveCheckpointAdjoint` alongside (rounding
  in the forward and backward passes alone, no reconstruction). The reversible adjoint
  rebuilds each state from the next, so rounding there is amplified by the inverse
  step: by up to 1/coupling per step for `Reversible`, 1/(2 damping - 1) for
  `AsynchronousLeapfrog`. These gradients are taken with `reconstruction_tol=None`;
  a last column says whether the default check (`reconstruction_tol=1e-3`) raises
  on the float32 solve instead of returning that gradient.

Writes `benchmarks/results/gradient_error{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/gradient_error.py [--mode full|quick|tiny]`.
"""

import functools as ft
import logging

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    bar_chart,
    describe,
    log,
    machine,
    markdown_table,
    MCCALLUM,
    parse_args,
    relative_error,
    save,
)


jax.config.update("jax_enable_x64", True)
import diffrax_extras as dxe  # noqa: E402


SOLVERS = {
    "ReversibleHeun": lambda: dxe.ReversibleHeun(),
    "Reversible(Tsit5, coupling=1)": lambda: dxe.Reversible(dfx.Tsit5(), 1.0),
    "Reversible(Tsit5)": lambda: dxe.Reversible(dfx.Tsit5()),
    "Reversible(Tsit5, coupling=0.99)": lambda: dxe.Reversible(dfx.Tsit5(), 0.99),
    "Reversible(Tsit5, coupling=0.9)": lambda: dxe.Reversible(dfx.Tsit5(), 0.9),
    "AsynchronousLeapfrog": lambda: dxe.AsynchronousLeapfrog(),
    "AsynchronousLeapfrog(damping=0.9)": lambda: dxe.AsynchronousLeapfrog(0.9),
    "AsynchronousLeapfrog(damping=0.75)": lambda: dxe.AsynchronousLeapfrog(0.75),
    "Tsit5": lambda: dfx.Tsit5(),
    "Heun": lambda: dfx.Heun(),
}
ADJOINTS = {
    # Unchecked, so that the drift table can show how wrong an unstable
    # reconstruction's gradient is; "checked" is the default, which raises instead.
    "ReversibleAdjoint": lambda: dxe.ReversibleAdjoint(reconstruction_tol=None),
    "ReversibleAdjoint checked": lambda: dxe.ReversibleAdjoint(),
    "RecursiveCheckpointAdjoint": lambda: dfx.RecursiveCheckpointAdjoint(),
    "BacksolveAdjoint": lambda: dfx.BacksolveAdjoint(),
    "GaussLegendreAdjoint": lambda: dxe.GaussLegendreAdjoint(),
}
# (solver, adjoint) pairs of the first table, each against RecursiveCheckpoint with
# the same solver.
PAIRS = [
    ("ReversibleHeun", "ReversibleAdjoint"),
    ("ReversibleHeun", "RecursiveCheckpointAdjoint"),
    ("Reversible(Tsit5)", "ReversibleAdjoint"),
    ("Reversible(Tsit5)", "RecursiveCheckpointAdjoint"),
    ("AsynchronousLeapfrog", "ReversibleAdjoint"),
    ("AsynchronousLeapfrog", "RecursiveCheckpointAdjoint"),
    # Heun: second order, as ReversibleHeun; so the continuous adjoints' distance
    # from the discrete gradient (the solver's error) is of the same size as the
    # distance of either from the ODE's gradient.
    ("Heun", "RecursiveCheckpointAdjoint"),
    ("Heun", "BacksolveAdjoint"),
    ("Heun", "GaussLegendreAdjoint"),
]
T1 = 10.0
REVERSIBLE = [s for s in SOLVERS if s not in ("Tsit5", "Heun")]
# The pairs the benchmark runner's headline reads.
HEADLINE_PAIRS = [PAIRS[0], PAIRS[7], PAIRS[8]]
SIZES = {
    # mode: (N and pairs of the first table, N and solvers of the drift table)
    "full": (100, PAIRS, [100, 1000, 10_000], REVERSIBLE),
    "quick": (100, PAIRS, [100, 1000], REVERSIBLE),
    "tiny": (10, HEADLINE_PAIRS, [10], ["ReversibleHeun"]),
}


def problem(dtype):
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    # The same weights in both precisions: drawn in float64, then cast.
    mlp = eqx.nn.MLP(8, 8, 32, 2, activation=jnp.tanh, key=key_mlp)
    mlp = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_array(x) else x, mlp)
    params, static = eqx.partition(mlp, eqx.is_array)
    return params, static, jr.normal(key_y, (16, 8)).astype(dtype)


@ft.cache
def gradient(solver, adjoint, dtype, max_steps):
    """The compiled gradient of the loss for any N <= `max_steps` (N is an input, so
    one compilation serves every N)."""
    params, static, y0 = problem(dtype)

    @jax.jit
    def grad(params, num_steps):
        def loss(p):
            term = dfx.ODETerm(lambda t, y, m: jax.vmap(m)(y))
            t1 = jnp.asarray(T1, dtype)
            sol = dfx.diffeqsolve(
                term,
                SOLVERS[solver](),
                jnp.asarray(0.0, dtype),
                t1,
                t1 / num_steps,
                y0,
                args=eqx.combine(p, static),
                adjoint=ADJOINTS[adjoint](),
                max_steps=max_steps,
            )
            assert sol.ys is not None
            return jnp.mean(sol.ys**2)

        return jax.grad(loss)(params)

    return lambda num_steps: grad(params, jnp.asarray(num_steps, dtype))


def adjoint_errors(num_steps, pairs):
    rows = []
    ode = gradient("Tsit5", "RecursiveCheckpointAdjoint", jnp.float64, 10 * num_steps)
    ode_grad = ode(10 * num_steps)
    for solver, adjoint in pairs:
        reference = gradient(solver, "RecursiveCheckpointAdjoint", jnp.float64, 10_000)
        exact = reference(num_steps)
        g64 = gradient(solver, adjoint, jnp.float64, 10_000)(num_steps)
        g32 = gradient(solver, adjoint, jnp.float32, 10_000)(num_steps)
        rows.append(
            dict(
                steps=num_steps,
                solver=solver,
                adjoint=adjoint,
                float64_vs_discrete=relative_error(exact, g64),
                float32_vs_discrete=relative_error(exact, g32),
                float64_vs_ode=relative_error(ode_grad, g64),
            )
        )
        log(**rows[-1])
    return rows


def drift(grid, solvers):
    rows = []
    for solver in solvers:
        for num_steps in grid:
            exact = gradient(solver, "RecursiveCheckpointAdjoint", jnp.float64, 10_000)
            g64 = exact(num_steps)
            for adjoint, dtype in (
                ("ReversibleAdjoint", jnp.float32),
                ("RecursiveCheckpointAdjoint", jnp.float32),
                ("ReversibleAdjoint", jnp.float64),
            ):
                g = gradient(solver, adjoint, dtype, 10_000)(num_steps)
                rows.append(
                    dict(
                        steps=num_steps,
                        solver=solver,
                        adjoint=adjoint,
                        dtype=jnp.dtype(dtype).name,
                        relative_error=relative_error(g64, g),
                    )
                )
                log(**rows[-1])
            rows[-3]["check_raises"] = check_raises(solver, num_steps)
    return rows


def check_raises(solver, num_steps) -> bool:
    """Whether the default `ReversibleAdjoint` refuses the float32 gradient."""
    # JAX logs the traceback of every failing callback; the refusal is expected here.
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
    try:
        jax.block_until_ready(
            gradient(solver, "ReversibleAdjoint checked", jnp.float32, 10_000)(
                num_steps
            )
        )
    except Exception as error:  # jax wraps the runtime error in its own type.
        if "could not reconstruct the initial state" in str(error):
            return True
        raise
    return False


def markdown(adjoint_rows, drift_rows, info) -> str:
    first = (
        f"{describe(info)} Neural ODE: state 8, MLP width 32 (tanh), batch 16, t in "
        f"[0, {T1:g}], fixed steps. Relative gradient errors (max over parameters of "
        "max|g - g_ref| / max|g_ref|). `discrete`: against "
        "`RecursiveCheckpointAdjoint` with the same solver and steps in float64, the "
        "exact gradient of the discretised solve; `ODE`: against Tsit5 at ten times "
        "the steps, the gradient of the ODE itself."
    )
    table = [
        [
            r["steps"],
            r["solver"],
            r["adjoint"],
            f"{r['float64_vs_discrete']:.1e}",
            f"{r['float32_vs_discrete']:.1e}",
            f"{r['float64_vs_ode']:.1e}",
        ]
        for r in adjoint_rows
    ]
    header = [
        "N:",
        "solver",
        "adjoint",
        "float64 vs discrete:",
        "float32 vs discrete:",
        "float64 vs ODE:",
    ]
    second = (
        "Drift: relative error of the gradient against the exact gradient of the "
        "same discretised solve (`RecursiveCheckpointAdjoint`, float64). "
        "`ReversibleAdjoint` columns: the gradient taken with "
        "`reconstruction_tol=None`; `nan`: the reconstruction overflowed. Last "
        "column: whether the default `ReversibleAdjoint()` (which checks the "
        "rebuilt initial state against `y0`, tolerance 1e-3) raises on the float32 "
        "solve instead of returning its gradient."
    )
    by_key: dict = {}
    for r in drift_rows:
        key = (r["adjoint"], r["dtype"])
        errors = by_key.setdefault((r["solver"], r["steps"]), {})
        errors[key] = r["relative_error"]
        if "check_raises" in r:
            errors["check"] = "raises" if r["check_raises"] else "passes"
    drift_table = [
        [
            solver,
            steps,
            f"{errors[('ReversibleAdjoint', 'float32')]:.1e}",
            f"{errors[('RecursiveCheckpointAdjoint', 'float32')]:.1e}",
            f"{errors[('ReversibleAdjoint', 'float64')]:.1e}",
            errors["check"],
        ]
        for (solver, steps), errors in by_key.items()
    ]
    drift_header = [
        "solver",
        "N:",
        "ReversibleAdjoint float32:",
        "RecursiveCheckpointAdjoint float32:",
        "ReversibleAdjoint float64:",
        "default check, float32",
    ]
    return (
        first
        + "\n\n"
        + markdown_table(header, table)
        + "\n"
        + second
        + "\n\n"
        + markdown_table(drift_header, drift_table)
    )


def main():
    args = parse_args(__doc__, repeats=1)
    num_steps, pairs, grid, solvers = SIZES[args.mode]
    info = machine()
    adjoint_rows = adjoint_errors(num_steps, pairs)
    drift_rows = drift(grid, solvers)
    payload = dict(machine=info, adjoints=adjoint_rows, drift=drift_rows)
    save("gradient_error", args, payload, markdown(adjoint_rows, drift_rows, info))


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Gradient error of each adjoint"


def headline(data) -> list[dict]:
    out = []
    for r in data["adjoints"]:
        if r["adjoint"] == "RecursiveCheckpointAdjoint":
            continue
        exact = r["adjoint"] == "ReversibleAdjoint"
        theirs = r["adjoint"] == "BacksolveAdjoint"
        out.append(
            dict(
                comparison=f"gradient error, N = {r['steps']} fixed steps",
                ours=f"{r['solver']} + {r['adjoint']}"
                + (" (diffrax's, for reference)" if theirs else ""),
                instead_of="the same solver + RecursiveCheckpointAdjoint (exact)",
                measured=r["float64_vs_discrete"],
                unit=f"relative error in float64 ({r['float32_vs_discrete']:.0e} "
                "in float32)",
                paper=None,
                source=(
                    f"{MCCALLUM}: exact to rounding"
                    if exact
                    else "continuous adjoint: off by the solver's error"
                ),
            )
        )
    return out


def chart(data, path) -> None:
    rows = data["adjoints"]
    labels = [f"{r['solver']} + {r['adjoint']}" for r in rows]
    series = {
        "float64": [max(r["float64_vs_discrete"], 1e-17) for r in rows],
        "float32": [max(r["float32_vs_discrete"], 1e-17) for r in rows],
    }
    bar_chart(
        path,
        "Gradient error against the exact discrete gradient",
        labels,
        series,
        "relative error (1e-17 = exactly equal)",
        log=True,
    )


if __name__ == "__main__":
    main()
