"""A neural SDE training step: our stack against the diffrax stack it replaces.

A batch of neural SDE solves (each sample its own Brownian path), drift and
diffusion MLPs, general (non-diagonal) noise, saved at 8 times on [0, 1], float32
(the default dtype); the step is a loss, its gradient with respect to the MLPs and an
SGD update. Fixed steps of h = 1/N. Configurations, compared in the same process:

- the diffrax stacks: `Midpoint` or `Heun` + `VirtualBrownianTree(tol=h/2)` +
  `RecursiveCheckpointAdjoint` (both solvers take two vector-field evaluations a
  step);
- each of our pieces swapped in alone: `ReversibleHeun` (one evaluation a step; Kidger
  et al. 2021 measured up to 1.98x over midpoint), `BrownianInterval(tol=h/2, dt=h)`
  (up to 10.6x over the virtual Brownian tree in the same paper);
- both together: `ReversibleHeun` + `BrownianInterval` +
  `RecursiveCheckpointAdjoint`;
- `ReversibleAdjoint`, which needs a reversible solver, so swapped in on
  `ReversibleHeun` + `VirtualBrownianTree`;
- the full stack: `ReversibleHeun` + `BrownianInterval` + `ReversibleAdjoint`.

Time per step is the median of interleaved repeats after compilation; compile time and
XLA's temporary memory are reported separately. Writes
`benchmarks/results/sde_step{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/sde_step.py [--mode full|quick|tiny]`.
"""

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
    KIDGER,
    log,
    machine,
    markdown_table,
    parse_args,
    save,
    temp_bytes,
)

import diffrax_extras as dxe


BASELINE = "Midpoint + VirtualBrownianTree + RecursiveCheckpoint"
# name: (solver, Brownian path, adjoint, what it is compared with)
CONFIGS = {
    BASELINE: ("Midpoint", "VirtualBrownianTree", "RecursiveCheckpoint", None),
    "Heun + VirtualBrownianTree + RecursiveCheckpoint": (
        "Heun",
        "VirtualBrownianTree",
        "RecursiveCheckpoint",
        None,
    ),
    "ReversibleHeun + VirtualBrownianTree + RecursiveCheckpoint": (
        "ReversibleHeun",
        "VirtualBrownianTree",
        "RecursiveCheckpoint",
        "solver swapped in",
    ),
    "Midpoint + BrownianInterval + RecursiveCheckpoint": (
        "Midpoint",
        "BrownianInterval",
        "RecursiveCheckpoint",
        "Brownian path swapped in",
    ),
    "ReversibleHeun + BrownianInterval + RecursiveCheckpoint": (
        "ReversibleHeun",
        "BrownianInterval",
        "RecursiveCheckpoint",
        "solver and Brownian path swapped in",
    ),
    "ReversibleHeun + VirtualBrownianTree + ReversibleAdjoint": (
        "ReversibleHeun",
        "VirtualBrownianTree",
        "ReversibleAdjoint",
        "solver and adjoint swapped in",
    ),
    "ReversibleHeun + BrownianInterval + ReversibleAdjoint": (
        "ReversibleHeun",
        "BrownianInterval",
        "ReversibleAdjoint",
        "full stack",
    ),
}
# Tiny mode checks that the script runs end to end: the baseline and the
# configurations the headline compares with it (every solver but Heun, both paths,
# both adjoints), so that the three other compiled steps are left out.
FULL_STACK = "ReversibleHeun + BrownianInterval + ReversibleAdjoint"
SOLVER_ALONE = "ReversibleHeun + VirtualBrownianTree + RecursiveCheckpoint"
PATH_ALONE = "Midpoint + BrownianInterval + RecursiveCheckpoint"
TINY_CONFIGS = (BASELINE, SOLVER_ALONE, PATH_ALONE, FULL_STACK)
assert set(TINY_CONFIGS) <= set(CONFIGS)
SOLVERS = {
    "Midpoint": dfx.Midpoint,
    "Heun": dfx.Heun,
    "ReversibleHeun": dxe.ReversibleHeun,
}
ADJOINTS = {
    "RecursiveCheckpoint": dfx.RecursiveCheckpointAdjoint,
    "ReversibleAdjoint": dxe.ReversibleAdjoint,
}
SIZES = {
    # mode: (steps N, batch, state, noise channels, MLP width)
    "full": (200, 128, 16, 8, 64),
    "quick": (100, 64, 16, 8, 64),
    "tiny": (10, 4, 4, 2, 8),
    "device": (1000, 1024, 32, 8, 128),
}


class NeuralSDE(eqx.Module):
    drift: eqx.nn.MLP
    diffusion: eqx.nn.MLP
    noise: int = eqx.field(static=True)

    def __init__(self, state, noise, width, *, key):
        k1, k2 = jr.split(key)
        self.drift = eqx.nn.MLP(state, state, width, 1, jax.nn.silu, key=k1)
        self.diffusion = eqx.nn.MLP(
            state,
            state * noise,
            width,
            1,
            jax.nn.silu,
            final_activation=jnp.tanh,
            key=k2,
        )
        self.noise = noise

    def solve(self, y0, key, solver, path, adjoint, num_steps):
        h = 1.0 / num_steps
        if path == "VirtualBrownianTree":
            bm = dfx.VirtualBrownianTree(0.0, 1.0, h / 2, (self.noise,), key)
        else:
            bm = dxe.BrownianInterval(0.0, 1.0, h / 2, (self.noise,), key, dt=h)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: self.drift(y)),
            dfx.ControlTerm(
                lambda t, y, args: self.diffusion(y).reshape(y.shape[0], self.noise),
                bm,
            ),
        )
        sol = dfx.diffeqsolve(
            terms,
            SOLVERS[solver](),
            0.0,
            1.0,
            h,
            y0,
            saveat=dfx.SaveAt(ts=jnp.linspace(1 / 8, 1, 8)),
            adjoint=ADJOINTS[adjoint](),
            max_steps=num_steps,
        )
        return sol.ys


def make_step(config, static, num_steps):
    solver, path, adjoint, _ = config

    @jax.jit
    def step(params, y0, keys):
        def loss(params):
            model = eqx.combine(params, static)
            ys = jax.vmap(
                lambda y, k: model.solve(y, k, solver, path, adjoint, num_steps)
            )(y0, keys)
            return jnp.mean((ys - 0.5) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    return step


def run(num_steps, batch, state, noise, width, repeats, configs=tuple(CONFIGS)):
    model_key, y_key, bm_key = jr.split(jr.PRNGKey(0), 3)
    params, static = eqx.partition(
        NeuralSDE(state, noise, width, key=model_key), eqx.is_array
    )
    y0 = jr.normal(y_key, (batch, state))
    keys = jr.split(bm_key, batch)
    compiled, fns = {}, {}
    for name in configs:
        step = make_step(CONFIGS[name], static, num_steps)
        fn, seconds = compile_timed(step, params, y0, keys)
        compiled[name] = (seconds, temp_bytes(fn))
        fns[name] = lambda fn=fn: fn(params, y0, keys)
    losses = {name: float(fn()[0]) for name, fn in fns.items()}
    seconds = interleaved_medians(fns, repeats)
    rows = []
    for name in configs:
        solver, path, adjoint, role = CONFIGS[name]
        rows.append(
            dict(
                configuration=name,
                solver=solver,
                path=path,
                adjoint=adjoint,
                role=role or "diffrax",
                ms_per_step=1e3 * seconds[name],
                compile_seconds=compiled[name][0],
                temp_bytes=compiled[name][1],
                loss=losses[name],
            )
        )
        log(**rows[-1])
    return rows


def markdown(rows, info, config, repeats) -> str:
    intro = (
        f"{describe(info)} Neural SDE training step: batch {config['batch']}, state "
        f"{config['state']}, {config['noise']} noise channels, MLP width "
        f"{config['width']}, N = {config['steps']} fixed steps, float32; median of "
        f"{repeats} interleaved repeats. Speed-ups are the baseline's time "
        f"({BASELINE}) divided by the row's."
    )
    by_name = {r["configuration"]: r for r in rows}
    base = by_name[BASELINE]["ms_per_step"]
    table = []
    for r in rows:
        table.append(
            [
                r["configuration"],
                r["role"],
                f"{r['ms_per_step']:.2f}",
                f"{base / r['ms_per_step']:.2f}x",
                f"{r['temp_bytes'] / 1e6:.2f}",
                f"{r['compile_seconds']:.1f}",
            ]
        )
    header = [
        "configuration",
        "what changes",
        "ms per step:",
        "speed-up vs baseline:",
        "temp memory (MB):",
        "compile (s):",
    ]
    return intro + "\n\n" + markdown_table(header, table)


def main():
    args = parse_args(__doc__)
    num_steps, batch, state, noise, width = SIZES[args.mode]
    config = dict(steps=num_steps, batch=batch, state=state, noise=noise, width=width)
    info = machine()
    configs = TINY_CONFIGS if args.mode == "tiny" else tuple(CONFIGS)
    rows = run(num_steps, batch, state, noise, width, args.repeats, configs)
    payload = dict(machine=info, config=config, baseline=BASELINE, rows=rows)
    save("sde_step", args, payload, markdown(rows, info, config, args.repeats))


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Neural SDE training step"


def headline(data) -> list[dict]:
    rows = {r["configuration"]: r for r in data["rows"]}
    base = rows[data["baseline"]]

    def faster(name, than=base):
        return than["ms_per_step"] / rows[name]["ms_per_step"]

    return [
        dict(
            comparison="neural SDE training step, full stack",
            ours=FULL_STACK,
            instead_of=data["baseline"],
            measured=faster(FULL_STACK),
            unit="x faster",
            paper=None,
            source=f"{KIDGER} report the parts, not the stack",
        ),
        dict(
            comparison="neural SDE training step, solver alone",
            ours="ReversibleHeun",
            instead_of="Midpoint (both with VirtualBrownianTree + RecursiveCheckpoint)",
            measured=faster(SOLVER_ALONE),
            unit="x faster",
            paper=1.98,
            source=f"{KIDGER}: up to 1.98x",
        ),
        dict(
            comparison="neural SDE training step, Brownian path alone",
            ours="BrownianInterval",
            instead_of="VirtualBrownianTree (both with Midpoint + RecursiveCheckpoint)",
            measured=faster(PATH_ALONE),
            unit="x faster",
            paper=10.6,
            source=f"{KIDGER}: up to 10.6x",
        ),
    ]


def chart(data, path) -> None:
    rows = data["rows"]
    labels = [r["configuration"] for r in rows]
    series = {"ms per step": [r["ms_per_step"] for r in rows]}
    bar_chart(path, TITLE, labels, series, "ms per training step")


if __name__ == "__main__":
    main()
