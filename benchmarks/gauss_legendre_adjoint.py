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

Writes `benchmarks/results/gauss_legendre_adjoint{_quick}.{json,md}`.

Run: `python benchmarks/gauss_legendre_adjoint.py [--quick]`.
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


def relative_error(reference, other) -> float:
    errors = []
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        errors.append(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    return float(max(errors))


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
            print(
                f"W={width:5d} state={row['state']:4d} {name:28s} "
                f"{row['seconds'] * 1e3:9.1f} ms  error "
                f"{row['error_vs_checkpoint']:.1e} / {row['error_vs_tight']:.1e}  "
                f"compile {row['compile_seconds']:.1f} s",
                flush=True,
            )
    return rows


def markdown(rows, info, repeats) -> str:
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, "
        f"{info['device']}), jax {info['jax']}, diffrax {info['diffrax']}. Neural "
        "ODE, MLP with two hidden layers of width W, Tsit5 + PID (rtol 1e-6, atol "
        f"1e-8), float64, 10 saved times on [0, 2]; median of {repeats} interleaved "
        "repeats. Errors: relative to RecursiveCheckpointAdjoint at the same "
        "tolerances / at rtol = atol = 1e-11.",
        "",
        "| W | state | parameters | adjoint | time per gradient (ms) | vs Backsolve "
        "| vs RecursiveCheckpoint | error vs RecursiveCheckpoint | error vs tight "
        "| compile (s) |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["width"], r["state"]), {})[r["adjoint"]] = r
    for (width, state), by_name in by_case.items():
        backsolve = by_name["BacksolveAdjoint"]["seconds"]
        checkpoint = by_name["RecursiveCheckpointAdjoint"]["seconds"]
        for name, r in by_name.items():
            lines.append(
                f"| {width} | {state} | {r['parameters']} | {name} "
                f"| {r['seconds'] * 1e3:.1f} | {r['seconds'] / backsolve:.2f}x "
                f"| {r['seconds'] / checkpoint:.2f}x "
                f"| {r['error_vs_checkpoint']:.1e} | {r['error_vs_tight']:.1e} "
                f"| {r['compile_seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="widths 64 and 1024, no large state"
    )
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    if cli.quick:
        cases = [(64, None), (1024, None)]
    else:
        cases = [(64, None), (256, None), (1024, None), (2048, None), (64, 128)]
    info = machine()
    rows = run(cases, cli.repeats)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if cli.quick else ""
    out = dict(machine=info, repeats=cli.repeats, rows=rows)
    name = f"gauss_legendre_adjoint{suffix}"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    table = markdown(rows, info, cli.repeats)
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
