"""`GaussLegendreAdjoint` against `BacksolveAdjoint` and `RecursiveCheckpointAdjoint`.

A neural ODE with a small state (batch 16 x 2) and an MLP vector field of two hidden
layers of width W (so about W^2 parameters), fitted to 10 saved times on [0, 2];
Tsit5 with a PID controller (rtol 1e-6, atol 1e-8), float64. For each width, in the
same process:

- time per gradient (median of interleaved repeats, after compilation) and compile
  time;
- the gradient's relative error (max over leaves of max|g - g_ref| / max|g_ref|)
  against `RecursiveCheckpointAdjoint` with rtol = atol = 1e-11.

The continuous adjoints (Backsolve, Gauss-Legendre) differ from the discretised one
(RecursiveCheckpoint) by the solver's error; the quadrature adds its own, which
`n_nodes` controls.

Writes `benchmarks/results/gauss_legendre{_quick}.{json,md}`.

Run: `python benchmarks/gauss_legendre.py [--quick]`.
"""

import argparse
import functools as ft
import json
import pathlib
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import interleaved_medians, machine


jax.config.update("jax_enable_x64", True)
import diffrax_extras as dxe  # noqa: E402


RESULTS = pathlib.Path(__file__).parent / "results"
BATCH, DIM, T1 = 16, 2, 2.0
SAVE_TS = jnp.linspace(0.2, T1, 10)


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jax.vmap(self.mlp)(y) - 0.5 * y


def make(width):
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(
        DIM, DIM, width, 2, activation=jnp.tanh, key=key_mlp, dtype=jnp.float64
    )
    y0 = jr.normal(key_y, (BATCH, DIM), jnp.float64)
    target = jnp.sin(SAVE_TS)[:, None, None] * jnp.ones((BATCH, DIM))
    return Field(mlp), y0, target


def grad_fn(adjoint, tol=1e-6):
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


def relative_error(reference, other) -> float:
    errors = []
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        errors.append(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    return float(max(errors))


def run(widths, repeats):
    adjoints = {
        "GaussLegendreAdjoint(8)": dxe.GaussLegendreAdjoint(8),
        "GaussLegendreAdjoint(4)": dxe.GaussLegendreAdjoint(4),
        "BacksolveAdjoint": dfx.BacksolveAdjoint(),
        "RecursiveCheckpointAdjoint": dfx.RecursiveCheckpointAdjoint(),
    }
    rows = []
    for width in widths:
        field, y0, target = make(width)
        params = sum(x.size for x in jax.tree.leaves(eqx.filter(field, eqx.is_array)))
        reference = grad_fn(dfx.RecursiveCheckpointAdjoint(), tol=1e-11)(
            field, y0, target
        )
        fns, compile_s, errors = {}, {}, {}
        for name, adjoint in adjoints.items():
            fn = grad_fn(adjoint)
            start = time.perf_counter()
            grads = jax.block_until_ready(fn(field, y0, target))
            compile_s[name] = time.perf_counter() - start
            errors[name] = relative_error(reference, grads)
            fns[name] = ft.partial(fn, field, y0, target)
        seconds = interleaved_medians(fns, repeats)
        for name in adjoints:
            row = dict(
                width=width,
                parameters=int(params),
                adjoint=name,
                seconds=seconds[name],
                compile_seconds=compile_s[name],
                gradient_error=errors[name],
            )
            rows.append(row)
            print(
                f"W={width:5d} {name:28s} {row['seconds'] * 1e3:9.1f} ms  "
                f"error {row['gradient_error']:.1e}  compile "
                f"{row['compile_seconds']:.1f} s",
                flush=True,
            )
    return rows


def markdown(rows, info, repeats) -> str:
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, "
        f"{info['device']}), jax {info['jax']}, diffrax {info['diffrax']}. Neural "
        f"ODE, state {BATCH}x{DIM}, MLP with two hidden layers of width W, Tsit5 + "
        "PID (rtol 1e-6), float64, 10 saved times; median of "
        f"{repeats} interleaved repeats. Gradient error: against "
        "RecursiveCheckpointAdjoint at rtol 1e-11.",
        "",
        "| W | parameters | adjoint | time per gradient (ms) | vs Backsolve "
        "| vs RecursiveCheckpoint | gradient error | compile (s) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_width: dict = {}
    for r in rows:
        by_width.setdefault(r["width"], {})[r["adjoint"]] = r
    for width, by_name in by_width.items():
        backsolve = by_name["BacksolveAdjoint"]["seconds"]
        checkpoint = by_name["RecursiveCheckpointAdjoint"]["seconds"]
        for name, r in by_name.items():
            lines.append(
                f"| {width} | {r['parameters']} | {name} | {r['seconds'] * 1e3:.1f} "
                f"| {r['seconds'] / backsolve:.2f}x | {r['seconds'] / checkpoint:.2f}x "
                f"| {r['gradient_error']:.1e} | {r['compile_seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="widths 32 and 256 only")
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    widths = [32, 256] if cli.quick else [32, 256, 1024]
    info = machine()
    rows = run(widths, cli.repeats)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if cli.quick else ""
    out = dict(machine=info, repeats=cli.repeats, rows=rows)
    (RESULTS / f"gauss_legendre{suffix}.json").write_text(json.dumps(out, indent=2))
    table = markdown(rows, info, cli.repeats)
    (RESULTS / f"gauss_legendre{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
