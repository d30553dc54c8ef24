"""Gradient time and compiled memory: `ReversibleAdjoint` against diffrax's built-ins.

A neural ODE (full mode: state 32, MLP width 128, batch 256, float64) solved over N
fixed steps. For each N the gradient of a loss is timed, in the same process and
interleaved, for two groups of configurations, each compared with its own diffrax
baseline:

- `ReversibleHeun` with `diffrax_extras.ReversibleAdjoint()`, with
  `diffrax.RecursiveCheckpointAdjoint()` (diffrax's default: O(log N) checkpoints) and
  with `diffrax.RecursiveCheckpointAdjoint(checkpoints=N)` (store every step: the cost
  floor of an exact gradient, with memory linear in N);
- `diffrax_extras.Reversible(diffrax.Tsit5())` with `ReversibleAdjoint()`, against
  `diffrax.Tsit5()` with `RecursiveCheckpointAdjoint()` and with store-every-step.

A second table measures what the step record costs under `jax.vmap` with adaptive
steps, where every batch member keeps its own times: the compiled temporary memory
of one gradient of a small neural ODE (state 4, width 32, float64, `PIDController`)
over a batch, with `max_steps` far above the steps taken, for `ReversibleAdjoint`
and `RecursiveCheckpointAdjoint` (which keeps O(log max_steps) checkpoints).

Compile time is measured separately; run time is the median of several repeats.
Writes `benchmarks/results/reversible_adjoint{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/reversible_adjoint.py [--mode full|quick|tiny]`.
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
    MCCALLUM,
    parse_args,
    save,
    temp_bytes,
)

import diffrax_extras as dxe


jax.config.update("jax_enable_x64", True)


def make_grad(solver, adjoint, num_steps, state, width, batch):
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(state, state, width, 2, activation=jnp.tanh, key=key_mlp)
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = jr.normal(key_y, (batch, state))

    def loss(p, y0):
        model = eqx.combine(p, static)
        term = dfx.ODETerm(lambda t, y, m: jax.vmap(m)(y))
        sol = dfx.diffeqsolve(
            term,
            solver,
            0.0,
            1.0,
            1.0 / num_steps,
            y0,
            args=model,
            adjoint=adjoint,
            max_steps=num_steps,
        )
        assert sol.ys is not None
        return jnp.mean(sol.ys**2)

    compiled, compile_s = compile_timed(jax.jit(jax.grad(loss)), params, y0)
    return compiled, (params, y0), compile_s, temp_bytes(compiled)


# (group, name, solver, adjoint for N steps); the first of each group is ours, the
# second the baseline that the ratios divide by.
CONFIGS = [
    (
        "ReversibleHeun",
        "ReversibleAdjoint",
        dxe.ReversibleHeun(),
        lambda n: dxe.ReversibleAdjoint(),
    ),
    (
        "ReversibleHeun",
        "RecursiveCheckpointAdjoint",
        dxe.ReversibleHeun(),
        lambda n: dfx.RecursiveCheckpointAdjoint(),
    ),
    (
        "ReversibleHeun",
        "store-every-step",
        dxe.ReversibleHeun(),
        lambda n: dfx.RecursiveCheckpointAdjoint(checkpoints=n),
    ),
    (
        "Tsit5",
        "Reversible(Tsit5) + ReversibleAdjoint",
        dxe.Reversible(dfx.Tsit5()),
        lambda n: dxe.ReversibleAdjoint(),
    ),
    (
        "Tsit5",
        "Tsit5 + RecursiveCheckpointAdjoint",
        dfx.Tsit5(),
        lambda n: dfx.RecursiveCheckpointAdjoint(),
    ),
    (
        "Tsit5",
        "Tsit5 + store-every-step",
        dfx.Tsit5(),
        lambda n: dfx.RecursiveCheckpointAdjoint(checkpoints=n),
    ),
]


SIZES = {
    # mode: (step counts, state, MLP width, batch)
    "full": ([100, 1000, 10_000], 32, 128, 256),
    "quick": ([100, 1000], 32, 128, 64),
    "tiny": ([10], 4, 8, 4),
    "device": ([1000, 10_000, 100_000], 32, 256, 256),
}


# mode: (batch, max_steps values) of the vmapped adaptive table.
VMAP_SIZES = {
    "full": (256, [10_000, 100_000]),
    "quick": (256, [10_000, 100_000]),
    "tiny": (4, [100]),
}


def vmap_memory(batch, max_steps, adjoint):
    """Temporary memory of a gradient through a `vmap`ped adaptive solve."""
    mlp = eqx.nn.MLP(4, 4, 32, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = jr.normal(jr.PRNGKey(1), (batch, 4))

    def loss(p, y0):
        model = eqx.combine(p, static)

        def one(y):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, m: m(y)),
                dxe.ReversibleHeun(),
                0.0,
                1.0,
                0.01,
                y,
                args=model,
                adjoint=adjoint,
                max_steps=max_steps,
                stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
            )
            assert sol.ys is not None
            return jnp.mean(sol.ys**2)

        return jnp.mean(jax.vmap(one)(y0))

    compiled = jax.jit(jax.grad(loss)).lower(params, y0).compile()
    return temp_bytes(compiled)


def run_vmap(mode):
    batch, grid = VMAP_SIZES[mode]
    rows = []
    for max_steps in grid:
        for name, adjoint in [
            ("ReversibleAdjoint", dxe.ReversibleAdjoint()),
            ("RecursiveCheckpointAdjoint", dfx.RecursiveCheckpointAdjoint()),
        ]:
            rows.append(
                dict(
                    batch=batch,
                    max_steps=max_steps,
                    adjoint=name,
                    temp_bytes=vmap_memory(batch, max_steps, adjoint),
                )
            )
            log(**rows[-1])
    return rows


def markdown_vmap(rows) -> str:
    intro = (
        "Under `jax.vmap` with adaptive steps (ReversibleHeun, state 4, width 32, "
        "float64, `PIDController(rtol=1e-4, atol=1e-6)`): compiled temporary memory "
        "of one gradient. `ReversibleAdjoint` keeps one step time (8 bytes) per step "
        "of `max_steps` for every batch member; `RecursiveCheckpointAdjoint` keeps "
        "O(log max_steps) checkpoints of the state."
    )
    table = [
        [r["batch"], r["max_steps"], r["adjoint"], f"{r['temp_bytes'] / 1e6:.1f}"]
        for r in rows
    ]
    header = ["batch:", "max_steps:", "adjoint", "temp memory (MB):"]
    return intro + "\n\n" + markdown_table(header, table)


def run(grid, repeats, state, width, batch, groups):
    configs = [c for c in CONFIGS if c[0] in groups]
    rows = []
    for n in grid:
        built = {
            (group, name): make_grad(solver, make(n), n, state, width, batch)
            for group, name, solver, make in configs
        }
        seconds = interleaved_medians(
            {key: ft.partial(fn, *inputs) for key, (fn, inputs, _, _) in built.items()},
            repeats,
        )
        for (group, name), (_, _, compile_s, memory) in built.items():
            rows.append(
                dict(
                    steps=n,
                    group=group,
                    adjoint=name,
                    seconds=seconds[(group, name)],
                    compile_seconds=compile_s,
                    temp_bytes=memory,
                )
            )
            log(**rows[-1])
    return rows


def markdown(rows, info, config) -> str:
    intro = (
        f"{describe(info)} Neural ODE: state {config['state']}, MLP width "
        f"{config['width']}, batch {config['batch']}, float64; median of "
        f"{config['repeats']} interleaved repeats. Ratios are against the baseline "
        "of the same group and N: `RecursiveCheckpointAdjoint` with the same solver "
        "(for `ReversibleHeun`) or with plain `Tsit5`, and store-every-step likewise."
    )
    by_group: dict = {}
    for r in rows:
        by_group.setdefault((r["steps"], r["group"]), []).append(r)
    table = []
    for r in rows:
        _, ref, floor = by_group[(r["steps"], r["group"])]
        table.append(
            [
                r["steps"],
                f"{r['group']}: {r['adjoint']}",
                f"{r['seconds']:.3f}",
                f"{r['seconds'] / ref['seconds']:.2f}x",
                f"{r['seconds'] / floor['seconds']:.2f}x",
                f"{r['temp_bytes'] / 1e6:.2f}",
                f"{r['compile_seconds']:.1f}",
                f"{r['compile_seconds'] / ref['compile_seconds']:.2f}x",
            ]
        )
    header = [
        "N steps:",
        "configuration",
        "time (s):",
        "vs RecursiveCheckpoint:",
        "vs store-every-step:",
        "temp memory (MB):",
        "compile (s):",
        "compile vs RecursiveCheckpoint:",
    ]
    return intro + "\n\n" + markdown_table(header, table)


def main():
    def extra(parser):
        parser.add_argument(
            "--groups",
            default="ReversibleHeun,Tsit5",
            help="comma-separated groups to run: ReversibleHeun, Tsit5",
        )

    args = parse_args(__doc__, extra=extra)
    grid, state, width, batch = SIZES[args.mode]
    config = dict(state=state, width=width, batch=batch, repeats=args.repeats)
    info = machine()
    rows = run(grid, args.repeats, state, width, batch, args.groups.split(","))
    vmap_rows = run_vmap(args.mode)
    payload = dict(machine=info, config=config, rows=rows, vmap_rows=vmap_rows)
    text = markdown(rows, info, config) + "\n\n" + markdown_vmap(vmap_rows)
    save("reversible_adjoint", args, payload, text)


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Reversible adjoint: time and memory against N"


def headline(data) -> list[dict]:
    rows = data["rows"]
    largest = max(r["steps"] for r in rows)
    smallest = min(r["steps"] for r in rows)
    pick = {(r["steps"], r["adjoint"]): r for r in rows}
    ours = "Reversible(Tsit5) + ReversibleAdjoint"
    theirs = "Tsit5 + RecursiveCheckpointAdjoint"
    if (largest, ours) not in pick:  # the ReversibleHeun group alone was run
        ours, theirs = "ReversibleAdjoint", "RecursiveCheckpointAdjoint"

    def mb(n, name):
        return f"{pick[(n, name)]['temp_bytes'] / 1e6:.2f}"

    return [
        dict(
            comparison=f"gradient memory, N = {smallest} → {largest} steps",
            ours=ours,
            instead_of=theirs,
            measured=pick[(largest, theirs)]["temp_bytes"]
            / pick[(largest, ours)]["temp_bytes"],
            unit=(
                f"x less at N = {largest} (ours {mb(smallest, ours)} → "
                f"{mb(largest, ours)} MB; theirs {mb(smallest, theirs)} → "
                f"{mb(largest, theirs)} MB)"
            ),
            paper=None,
            source=f"{MCCALLUM}: memory constant in N",
        ),
        dict(
            comparison=f"gradient time, N = {largest} steps",
            ours=ours,
            instead_of=theirs,
            measured=pick[(largest, ours)]["seconds"]
            / pick[(largest, theirs)]["seconds"],
            unit="x the time (two base steps per step)",
            paper=None,
            source=f"{MCCALLUM}: about 2x the base solver's work",
        ),
    ]


def chart(data, path) -> None:
    groups = {}
    for r in data["rows"]:
        groups.setdefault(f"{r['group']}: {r['adjoint']}", {})[r["steps"]] = (
            r["temp_bytes"] / 1e6
        )
    steps = sorted({r["steps"] for r in data["rows"]})
    series = {f"N = {n}": [g[n] for g in groups.values()] for n in steps}
    bar_chart(path, TITLE, list(groups), series, "temp memory (MB)", log=True)


if __name__ == "__main__":
    main()
