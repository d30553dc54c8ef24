"""Gradient time and compiled memory: `ReversibleAdjoint` against diffrax's built-ins.

A neural ODE (state 32, MLP width 128, batch 256, float64) solved with
`ReversibleHeun` over N fixed steps. For each N the gradient of a loss is timed, in the
same process and interleaved, under:

- `diffrax_extras.ReversibleAdjoint()`;
- `diffrax.RecursiveCheckpointAdjoint()` (diffrax's default: O(log N) checkpoints);
- `diffrax.RecursiveCheckpointAdjoint(checkpoints=N)` (store every step: the cost floor
  of an exact gradient, with memory linear in N).

Compile time is measured separately; run time is the median of several repeats.
Writes `benchmarks/results/reversible_adjoint.{json,md}`.

Run: `python benchmarks/reversible_adjoint.py [--quick]`.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import diffrax_extras as dxe


jax.config.update("jax_enable_x64", True)

RESULTS = pathlib.Path(__file__).parent / "results"


def machine() -> dict:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        device=f"{device.platform}: {device.device_kind}",
        jax=jax.__version__,
        diffrax=dfx.__version__ if hasattr(dfx, "__version__") else "?",
        date=time.strftime("%Y-%m-%d"),
    )


def make_grad(adjoint, num_steps, state, width, batch):
    key_mlp, key_y = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(state, state, width, 2, activation=jnp.tanh, key=key_mlp)
    params, static = eqx.partition(mlp, eqx.is_array)
    y0 = jr.normal(key_y, (batch, state))

    def loss(p, y0):
        model = eqx.combine(p, static)
        term = dfx.ODETerm(lambda t, y, m: jax.vmap(m)(y))
        sol = dfx.diffeqsolve(
            term,
            dxe.ReversibleHeun(),
            0.0,
            1.0,
            1.0 / num_steps,
            y0,
            args=model,
            adjoint=adjoint,
            max_steps=num_steps,
        )
        return jnp.mean(sol.ys**2)

    grad = jax.jit(jax.grad(loss))
    start = time.perf_counter()
    compiled = grad.lower(params, y0).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis().temp_size_in_bytes
    return compiled, (params, y0), compile_s, memory


def run(grid, repeats, state, width, batch):
    adjoints = {
        "ReversibleAdjoint": lambda n: dxe.ReversibleAdjoint(),
        "RecursiveCheckpointAdjoint": lambda n: dfx.RecursiveCheckpointAdjoint(),
        "store-every-step": lambda n: dfx.RecursiveCheckpointAdjoint(checkpoints=n),
    }
    rows = []
    for n in grid:
        built = {
            name: make_grad(make(n), n, state, width, batch)
            for name, make in adjoints.items()
        }
        times = {name: [] for name in adjoints}
        for fn, inputs, _, _ in built.values():
            jax.block_until_ready(fn(*inputs))  # warm up
        for _ in range(repeats):
            for name, (fn, inputs, _, _) in built.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times[name].append(time.perf_counter() - start)
        for name, (_, _, compile_s, memory) in built.items():
            row = dict(
                steps=n,
                adjoint=name,
                seconds=statistics.median(times[name]),
                compile_seconds=compile_s,
                temp_bytes=memory,
            )
            rows.append(row)
            print(
                f"N={n:6d} {name:28s} {row['seconds']:8.3f} s  compile "
                f"{compile_s:5.1f} s  temp {memory / 1e6:8.2f} MB",
                flush=True,
            )
    return rows


def markdown(rows, info, config) -> str:
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores, "
        f"{info['device']}), jax {info['jax']}, diffrax {info['diffrax']}. "
        f"Neural ODE: state {config['state']}, MLP width {config['width']}, batch "
        f"{config['batch']}, float64, `ReversibleHeun`; median of {config['repeats']} "
        "interleaved repeats.",
        "",
        "| N steps | adjoint | time (s) | vs RecursiveCheckpoint | vs store-every-step "
        "| temp memory (MB) | compile (s) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by = {(r["steps"], r["adjoint"]): r for r in rows}
    for r in rows:
        ref = by[(r["steps"], "RecursiveCheckpointAdjoint")]["seconds"]
        floor = by[(r["steps"], "store-every-step")]["seconds"]
        lines.append(
            f"| {r['steps']} | {r['adjoint']} | {r['seconds']:.3f} | "
            f"{r['seconds'] / ref:.2f}x | {r['seconds'] / floor:.2f}x | "
            f"{r['temp_bytes'] / 1e6:.2f} | {r['compile_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="N up to 1,000 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    cli = parser.parse_args()
    grid = [100, 1000] if cli.quick else [100, 1000, 10_000]
    config = dict(state=32, width=128, batch=cli.batch, repeats=cli.repeats)
    info = machine()
    rows = run(grid, cli.repeats, config["state"], config["width"], config["batch"])
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if cli.quick else ""
    out = dict(machine=info, config=config, rows=rows)
    (RESULTS / f"reversible_adjoint{suffix}.json").write_text(json.dumps(out, indent=2))
    table = markdown(rows, info, config)
    (RESULTS / f"reversible_adjoint{suffix}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
