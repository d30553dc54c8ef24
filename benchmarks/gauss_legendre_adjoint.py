"""`GaussLegendreAdjoint` against `BacksolveAdjoint` and `RecursiveCheckpointAdjoint`.

A neural ODE with a small state (4) and an MLP vector field of two hidden layers of
width W (so about W^2 parameters), fitted to 10 saved times on [0, 2]; plus one
large-state case (a batch of 128 such states, W = 64) where quadrature has little to
save. Tsit5 with a PID controller (rtol 1e-6, atol 1e-8), float64. For each case, in
the same process:

- time per gradient (median of interleaved repeats, after compilation) and compile
  time, for `GaussLegendreAdjoint(8)`, `BacksolveAdjoint` (plain, and with the RMS
  seminorm of Kidger et al. 2021 on its backward controller) and
  `RecursiveCheckpointAdjoint`;
- the gradient's relative error (max over leaves of max|g - g_ref| / max|g_ref|)
  against `RecursiveCheckpointAdjoint` at the same tolerances, and against it at
  rtol = atol = 1e-11.

The continuous adjoints (Backsolve, Gauss-Legendre) differ from the discretised one
by the solver's error; the quadrature adds its own, which `n_nodes` controls.

Writes `benchmarks/results/gauss_legendre_adjoint{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/gauss_legendre_adjoint.py [--mode full|quick|tiny]`.
"""

import functools as ft
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    describe,
    interleaved_medians,
    log,
    machine,
    markdown_table,
    parse_args,
    relative_error,
    save,
)


jax.config.update("jax_enable_x64", True)
import diffrax_extras as dxe  # noqa: E402


DIM, T1, RTOL = 4, 2.0, 1e-6
SAVE_TS = jnp.linspace(0.2, T1, 10)


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        mlp = self.mlp if y.ndim == 1 else jax.vmap(self.mlp)
        return mlp(y) - 0.5 * y


def make(width, batch):
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(
        DIM, DIM, width, 2, activation=jnp.tanh, key=key_mlp, dtype=jnp.float64
    )
    shape = (DIM,) if batch is None else (batch, DIM)
    y0 = jr.normal(key_y, shape, jnp.float64)
    target = jnp.sin(SAVE_TS).reshape((-1,) + (1,) * len(shape)) * jnp.ones(shape)
    return Field(mlp), y0, target


def grad_fn(adjoint, tol=RTOL):
    controller = dfx.PIDController(rtol=tol, atol=1e-2 * tol)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(field, y0, target):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            T1,
            None,
            y0,
            saveat=dfx.SaveAt(ts=SAVE_TS),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=100_000,
        )
        return jnp.mean((sol.ys - target) ** 2)

    return grad


def run(cases, repeats):
    seminorm = dfx.PIDController(
        rtol=RTOL, atol=1e-2 * RTOL, norm=dfx.adjoint_rms_seminorm
    )
    adjoints = {
        "GaussLegendreAdjoint(8)": dxe.GaussLegendreAdjoint(8),
        "BacksolveAdjoint": dfx.BacksolveAdjoint(),
        "BacksolveAdjoint + seminorm": dfx.BacksolveAdjoint(
            stepsize_controller=seminorm
        ),
        "RecursiveCheckpointAdjoint": dfx.RecursiveCheckpointAdjoint(),
    }
    rows = []
    for width, batch in cases:
        field, y0, target = make(width, batch)
        params = sum(x.size for x in jax.tree.leaves(eqx.filter(field, eqx.is_array)))
        tight = grad_fn(dfx.RecursiveCheckpointAdjoint(), tol=1e-11)(field, y0, target)
        fns, compile_s, grads = {}, {}, {}
        for name, adjoint in adjoints.items():
            fn = grad_fn(adjoint)
            start = time.perf_counter()
            grads[name] = jax.block_until_ready(fn(field, y0, target))
            compile_s[name] = time.perf_counter() - start
            fns[name] = ft.partial(fn, field, y0, target)
        seconds = interleaved_medians(fns, repeats)
        for name in adjoints:
            row = dict(
                width=width,
                state=int(y0.size),
                parameters=int(params),
                adjoint=name,
                seconds=seconds[name],
                compile_seconds=compile_s[name],
                error_vs_checkpoint=relative_error(
                    grads["RecursiveCheckpointAdjoint"], grads[name]
                ),
                error_vs_tight=relative_error(tight, grads[name]),
            )
            rows.append(row)
            log(**row)
    return rows


def markdown(rows, info, repeats) -> str:
    intro = (
        f"{describe(info)} Neural ODE, MLP with two hidden layers of width W, Tsit5 "
        "+ PID (rtol 1e-6, atol 1e-8), float64, 10 saved times on [0, 2]; median "
        f"of {repeats} interleaved repeats. Errors: relative to "
        "RecursiveCheckpointAdjoint at the same tolerances / at rtol = atol = 1e-11."
    )
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["width"], r["state"]), {})[r["adjoint"]] = r
    table = []
    for by_name in by_case.values():
        backsolve = by_name["BacksolveAdjoint"]["seconds"]
        checkpoint = by_name["RecursiveCheckpointAdjoint"]["seconds"]
        for name, r in by_name.items():
            table.append(
                [
                    r["width"],
                    r["state"],
                    r["parameters"],
                    name,
                    f"{r['seconds'] * 1e3:.1f}",
                    f"{r['seconds'] / backsolve:.2f}x",
                    f"{r['seconds'] / checkpoint:.2f}x",
                    f"{r['error_vs_checkpoint']:.1e}",
                    f"{r['error_vs_tight']:.1e}",
                    f"{r['compile_seconds']:.1f}",
                ]
            )
    header = [
        "W:",
        "state:",
        "parameters:",
        "adjoint",
        "time per gradient (ms):",
        "vs Backsolve:",
        "vs RecursiveCheckpoint:",
        "error vs RecursiveCheckpoint:",
        "error vs tight:",
        "compile (s):",
    ]
    return intro + "\n\n" + markdown_table(header, table)


CASES = {
    # mode: [(MLP width, batch of states or None)]
    "full": [(64, None), (256, None), (1024, None), (2048, None), (64, 128)],
    "quick": [(64, None), (1024, None)],
    "tiny": [(8, None)],
    "device": [(1024, None), (4096, None), (256, 1024)],
}


def main():
    args = parse_args(__doc__)
    info = machine()
    rows = run(CASES[args.mode], args.repeats)
    payload = dict(machine=info, rows=rows)
    save("gauss_legendre_adjoint", args, payload, markdown(rows, info, args.repeats))


if __name__ == "__main__":
    main()
