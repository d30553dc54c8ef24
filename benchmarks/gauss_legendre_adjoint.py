"""`GaussLegendreAdjoint` against `BacksolveAdjoint` and `RecursiveCheckpointAdjoint`.

A neural ODE with a small state (4) and an MLP vector field of two hidden layers of
width W (so about W^2 parameters), in two settings:

- "10 saved": fitted to 10 saved times on [0, 2];
- "t1 only": diffrax's default `SaveAt(t1=True)` on [0, 10], a loss of the final state
  only (one interval between saved times spans the whole solve);

plus one large-state case (a batch of 128 such states, W = 64, 10 saved times) where
quadrature has little to save. Tsit5 with a PID controller (rtol 1e-6, atol 1e-8),
float64. For each case, in the same process:

- time per gradient (median of interleaved repeats, after compilation), compile time,
  and the compiled gradient's temporary memory (XLA's `temp_size_in_bytes`), for
  `GaussLegendreAdjoint()`, `BacksolveAdjoint` (plain, and with the RMS seminorm of
  Kidger et al. 2021 on its backward controller) and `RecursiveCheckpointAdjoint`;
- the gradient's relative error (max over leaves of max|g - g_ref| / max|g_ref|)
  against `RecursiveCheckpointAdjoint` at the same tolerances, and against it at
  rtol = atol = 1e-11.

The continuous adjoints (Backsolve, Gauss-Legendre) differ from the discretised one
by the solver's error; the quadrature adds its own, which it keeps below tolerance.

Then, compiled but not run, the temporary memory of the gradient as one thing varies
at a time, for `GaussLegendreAdjoint()`, `BacksolveAdjoint` and
`RecursiveCheckpointAdjoint` (W = 64 unless stated):

- the number of steps N: fixed steps of 0.01 over [0, N / 100] (`max_steps` 20,000
  throughout, so that only N changes);
- the state: a batch of B states of 4 (10 saved times on [0, 2]);
- `max_steps` (10 saved times on [0, 2]);
- for `GaussLegendreAdjoint`, `steps_per_chunk`, at W = 1024 (its parameter-sized
  buffers show).

Writes `benchmarks/results/gauss_legendre_adjoint{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/gauss_legendre_adjoint.py [--mode full|quick|tiny]`.
"""

import functools as ft

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    bar_chart,
    compile_timed,
    describe,
    interleaved_medians,
    log,
    machine,
    markdown_table,
    NORCLIFFE,
    parse_args,
    relative_error,
    save,
    temp_bytes,
)


jax.config.update("jax_enable_x64", True)
import diffrax_extras as dxe  # noqa: E402


DIM, RTOL = 4, 1e-6
# name: (t1, saved times or None for SaveAt(t1=True))
SETTINGS = {
    "10 saved": (2.0, jnp.linspace(0.2, 2.0, 10)),
    "t1 only": (10.0, None),
}


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        mlp = self.mlp if y.ndim == 1 else jax.vmap(self.mlp)
        return mlp(y) - 0.5 * y


def make(width, batch, setting):
    _, save_ts = SETTINGS[setting]
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(
        DIM, DIM, width, 2, activation=jnp.tanh, key=key_mlp, dtype=jnp.float64
    )
    shape = (DIM,) if batch is None else (batch, DIM)
    y0 = jr.normal(key_y, shape, jnp.float64)
    times = jnp.ones(1) if save_ts is None else save_ts
    target = jnp.sin(times).reshape((-1,) + (1,) * len(shape)) * jnp.ones(shape)
    params, static = eqx.partition(Field(mlp), eqx.is_array)
    return params, static, y0, target


def loss_fn(adjoint, static, t1, save_ts, *, tol=RTOL, fixed=False, max_steps=100_000):
    """The mean squared error of the neural ODE's saved states (at `save_ts`, or at
    `t1` only when it is `None`), with adaptive steps of tolerance `tol` or, with
    `fixed`, steps of 0.01."""
    if fixed:
        controller, dt0 = dfx.ConstantStepSize(), 0.01
    else:
        controller, dt0 = dfx.PIDController(rtol=tol, atol=1e-2 * tol), None
    saveat = dfx.SaveAt(t1=True) if save_ts is None else dfx.SaveAt(ts=save_ts)

    def loss(params, y0, target):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(eqx.combine(params, static)),
            dfx.Tsit5(),
            0.0,
            t1,
            dt0,
            y0,
            saveat=saveat,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        assert sol.ys is not None
        return jnp.mean((sol.ys - target) ** 2)

    return loss


def adjoints():
    seminorm = dfx.PIDController(
        rtol=RTOL, atol=1e-2 * RTOL, norm=dfx.adjoint_rms_seminorm
    )
    return {
        "GaussLegendreAdjoint()": dxe.GaussLegendreAdjoint(),
        "BacksolveAdjoint": dfx.BacksolveAdjoint(),
        "BacksolveAdjoint + seminorm": dfx.BacksolveAdjoint(
            stepsize_controller=seminorm
        ),
        "RecursiveCheckpointAdjoint": dfx.RecursiveCheckpointAdjoint(),
    }


def run(cases, repeats, names):
    rows = []
    for setting, width, batch in cases:
        params, static, y0, target = make(width, batch, setting)
        count = sum(x.size for x in jax.tree.leaves(params))
        inputs = (params, y0, target)
        tight_loss = loss_fn(
            dfx.RecursiveCheckpointAdjoint(), static, *SETTINGS[setting], tol=1e-11
        )
        tight = jax.jit(jax.grad(tight_loss))(*inputs)
        fns, compile_s, memory, grads = {}, {}, {}, {}
        for name, adjoint in adjoints().items():
            if name not in names:
                continue
            grad = jax.jit(jax.grad(loss_fn(adjoint, static, *SETTINGS[setting])))
            compiled, compile_s[name] = compile_timed(grad, *inputs)
            memory[name] = temp_bytes(compiled)
            grads[name] = jax.block_until_ready(compiled(*inputs))
            fns[name] = ft.partial(compiled, *inputs)
        seconds = interleaved_medians(fns, repeats)
        reference = grads.get("RecursiveCheckpointAdjoint", tight)
        for name in fns:
            row = dict(
                setting=setting,
                width=width,
                state=int(y0.size),
                parameters=int(count),
                adjoint=name,
                seconds=seconds[name],
                compile_seconds=compile_s[name],
                temp_bytes=memory[name],
                error_vs_checkpoint=relative_error(reference, grads[name]),
                error_vs_tight=relative_error(tight, grads[name]),
            )
            rows.append(row)
            log(**row)
    return rows


def memory(mode):
    """Temporary bytes of the compiled gradient, one variable at a time."""
    small = mode == "tiny"
    variables = {
        # Tiny mode checks that the table is written, by each of its two kinds of
        # row (the three adjoints; the quadrature adjoint's chunks): one value each.
        "steps N": [100] if small else [100, 1000, 10_000],
        "state (batch B of 4)": [] if small else [1, 32, 256],
        "max_steps": [] if small else [4096, 100_000],
        "steps_per_chunk (W = 1024)": [8] if small else [8, 16, 32, 64],
    }
    three = {
        "GaussLegendreAdjoint()": dxe.GaussLegendreAdjoint(),
        "BacksolveAdjoint": dfx.BacksolveAdjoint(),
        "RecursiveCheckpointAdjoint": dfx.RecursiveCheckpointAdjoint(),
    }
    save_ts = SETTINGS["10 saved"][1]
    rows = []
    for variable, values in variables.items():
        for value in values:
            width, batch, t1, saves, fixed, max_steps = (
                64,
                None,
                2.0,
                save_ts,
                False,
                20_000,
            )
            adjoints = three
            if variable == "steps N":
                t1, saves, fixed = value / 100, None, True
            elif variable.startswith("state"):
                batch = None if value == 1 else value
            elif variable == "max_steps":
                max_steps = value
            else:
                width = 8 if small else 1024
                adjoints = {
                    f"GaussLegendreAdjoint(steps_per_chunk={value})": (
                        dxe.GaussLegendreAdjoint(steps_per_chunk=value)
                    )
                }
            params, static, y0, _ = make(width, batch, "10 saved")
            times = jnp.ones(1) if saves is None else saves
            target = jnp.sin(times).reshape((-1,) + (1,) * y0.ndim) * jnp.ones_like(y0)
            for name, adjoint in adjoints.items():
                loss = loss_fn(
                    adjoint, static, t1, saves, fixed=fixed, max_steps=max_steps
                )
                compiled, _ = compile_timed(jax.jit(jax.grad(loss)), params, y0, target)
                row = dict(
                    variable=variable,
                    value=value,
                    adjoint=name,
                    temp_bytes=temp_bytes(compiled),
                )
                rows.append(row)
                log(**row)
    return rows


def memory_markdown(rows) -> str:
    table = [
        [r["variable"], r["value"], r["adjoint"], f"{r['temp_bytes'] / 1e6:.3f}"]
        for r in rows
    ]
    header = ["varied", "value:", "adjoint", "temporary memory (MB):"]
    return (
        "Temporary memory of the compiled gradient (XLA's `temp_size_in_bytes`), "
        "one variable at a time; W = 64, state 4, Tsit5, float64 unless stated.\n\n"
        + markdown_table(header, table)
    )


def markdown(rows, info, repeats) -> str:
    intro = (
        f"{describe(info)} Neural ODE, MLP with two hidden layers of width W, Tsit5 "
        '+ PID (rtol 1e-6, atol 1e-8), float64; "10 saved": 10 saved times on '
        '[0, 2], "t1 only": `SaveAt(t1=True)` on [0, 10]; median of '
        f"{repeats} interleaved repeats. Errors: relative to "
        "RecursiveCheckpointAdjoint at the same tolerances / at rtol = atol = 1e-11. "
        "Memory: the compiled gradient's temporary buffers."
    )
    by_case: dict = {}
    for r in rows:
        key = (r["setting"], r["width"], r["state"])
        by_case.setdefault(key, {})[r["adjoint"]] = r
    table = []
    for by_name in by_case.values():
        backsolve = by_name.get("BacksolveAdjoint", {}).get("seconds")
        checkpoint = by_name.get("RecursiveCheckpointAdjoint", {}).get("seconds")
        for name, r in by_name.items():
            table.append(
                [
                    r["setting"],
                    r["width"],
                    r["state"],
                    r["parameters"],
                    name,
                    f"{r['seconds'] * 1e3:.1f}",
                    "-" if backsolve is None else f"{r['seconds'] / backsolve:.2f}x",
                    "-" if checkpoint is None else f"{r['seconds'] / checkpoint:.2f}x",
                    f"{r['error_vs_checkpoint']:.1e}",
                    f"{r['error_vs_tight']:.1e}",
                    f"{r['temp_bytes'] / 1e6:.2f}",
                    f"{r['compile_seconds']:.1f}",
                ]
            )
    header = [
        "saved",
        "W:",
        "state:",
        "parameters:",
        "adjoint",
        "time per gradient (ms):",
        "vs Backsolve:",
        "vs RecursiveCheckpoint:",
        "error vs RecursiveCheckpoint:",
        "error vs tight:",
        "memory (MB):",
        "compile (s):",
    ]
    return intro + "\n\n" + markdown_table(header, table)


def _cases(widths, large=True, settings=tuple(SETTINGS)):
    out = [(s, w, None) for w in widths for s in settings]
    return out + ([("10 saved", 64, 128)] if large else [])


CASES = {
    # mode: [(setting, MLP width, batch of states or None)]
    "full": _cases([64, 256, 1024, 2048]),
    "quick": _cases([64, 1024]),
    # The setting of the headline: the other differs only in its `SaveAt`.
    "tiny": _cases([8], large=False, settings=("t1 only",)),
    "device": _cases([1024, 4096], large=False) + [("10 saved", 256, 1024)],
}


def main():
    def extra(parser):
        parser.add_argument(
            "--adjoints",
            default=",".join(adjoints()),
            help="comma-separated adjoint names to run (default: all)",
        )

    args = parse_args(__doc__, extra=extra)
    info = machine()
    names = args.adjoints.split(",")
    rows = run(CASES[args.mode], args.repeats, names)
    memory_rows = memory(args.mode)
    payload = dict(machine=info, rows=rows, memory=memory_rows)
    table = markdown(rows, info, args.repeats) + "\n" + memory_markdown(memory_rows)
    save("gauss_legendre_adjoint", args, payload, table)


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Gauss–Legendre quadrature adjoint against Backsolve"


def headline(data) -> list[dict]:
    # diffrax's default SaveAt(t1=True), where one interval between saved times spans
    # the whole solve.
    rows = [r for r in data["rows"] if r["state"] == 4 and r["setting"] == "t1 only"]
    width = max(r["width"] for r in rows)
    pick = {r["adjoint"]: r for r in rows if r["width"] == width}
    ours = "GaussLegendreAdjoint()"
    return [
        dict(
            comparison=f"neural ODE gradient, MLP width {width}, SaveAt(t1=True)",
            ours=ours,
            instead_of="BacksolveAdjoint",
            measured=pick["BacksolveAdjoint"]["seconds"] / pick[ours]["seconds"],
            unit=f"x faster (gradient error {pick[ours]['error_vs_tight']:.0e})",
            paper=None,
            source=f"{NORCLIFFE}: faster, most for large models",
        )
    ]


def chart(data, path) -> None:
    groups = {}
    for r in data["rows"]:
        label = f"{r['setting']}, W={r['width']}, state {r['state']}"
        groups.setdefault(r["adjoint"], {})[label] = r["seconds"] * 1e3
    labels = list(next(iter(groups.values())))
    series = {a: [v[x] for x in labels] for a, v in groups.items()}
    bar_chart(path, TITLE, labels, series, "ms per gradient", log=True)


if __name__ == "__main__":
    main()
