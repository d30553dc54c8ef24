"""Microseconds per step: `BrownianInterval` against diffrax's Brownian paths.

Brownian motion of shape (256, 16) on [0, 1] with N nominal steps of length h = 1/N,
float32 (the default dtype), compared in the same process:

- `diffrax.UnsafeBrownianPath`: one draw per query; the cost floor, but not
  consistent (no adaptive steps, no replay);
- `diffrax.VirtualBrownianTree(tol=h/2)`: consistent; both ends of every query
  descend from the root;
- `diffrax_extras.BrownianInterval(tol=h/2, dt=...)`.

Two contexts: `evaluate` in a `lax.scan` over a fixed list of queries, and inside
`diffeqsolve` (Heun, or SPaRK with space-time Lévy area, on a geometric Brownian
motion with diagonal noise). Three step patterns:

- `on`: fixed steps of h, and pieces of h (`dt=h`): the steps are the pieces;
- `off`: fixed steps of h, pieces of 1.3h: queries start and end inside pieces;
- `adaptive`: in the scan, steps of random length around h with one step in five
  rejected and retried at half the length; in `diffeqsolve`, a PID controller, with
  pieces of h. (`UnsafeBrownianPath` cannot take adaptive steps in `diffeqsolve`.)

Run time is the median of interleaved repeats after compilation; compile time is
reported separately. Writes `benchmarks/results/brownian{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/brownian.py [--mode full|quick|tiny]`.
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
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
)

import diffrax_extras as dxe


SHAPE = (256, 16)
PATHS = ["UnsafeBrownianPath", "VirtualBrownianTree", "BrownianInterval"]
MODES = ["on", "off", "adaptive"]
# Pieces per step in the `off` pattern.
OFF_RATIO = 1.3


def make_path(name, key, num_steps, mode, levy_area):
    h = 1.0 / num_steps
    if name == "UnsafeBrownianPath":
        return dfx.UnsafeBrownianPath(SHAPE, key, levy_area=levy_area)
    if name == "VirtualBrownianTree":
        return dfx.VirtualBrownianTree(0.0, 1.0, h / 2, SHAPE, key, levy_area=levy_area)
    dt = OFF_RATIO * h if mode == "off" else h
    return dxe.BrownianInterval(0.0, 1.0, h / 2, SHAPE, key, levy_area=levy_area, dt=dt)


def scan_queries(num_steps: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    h = 1.0 / num_steps
    if mode != "adaptive":
        grid = np.linspace(0.0, 1.0, num_steps + 1)
        return grid[:-1], grid[1:]
    rng = np.random.default_rng(0)
    starts, ends = [], []
    t = 0.0
    while t < 1.0:
        step = h * float(np.exp(rng.uniform(-0.5, 0.5)))
        if rng.uniform() < 0.2:  # rejected, then retried at half the length
            starts.append(t)
            ends.append(min(t + step, 1.0))
            step = step / 2
        starts.append(t)
        ends.append(min(t + step, 1.0))
        t = ends[-1]
    return np.array(starts), np.array(ends)


def build_scan(name, num_steps, mode, levy_area):
    starts, ends = (jnp.asarray(x) for x in scan_queries(num_steps, mode))
    use_levy = levy_area is not dfx.BrownianIncrement

    @jax.jit
    def run(key):
        path = make_path(name, key, num_steps, mode, levy_area)

        def body(total, query):
            out = path.evaluate(*query, use_levy=use_levy)
            w = out.W if isinstance(out, dfx.AbstractBrownianIncrement) else out
            return total + jnp.sum(jnp.asarray(w)), None

        return jax.lax.scan(body, jnp.zeros(()), (starts, ends))[0]

    return run, len(starts)


def build_solve(name, num_steps, mode, levy_area):
    h = 1.0 / num_steps
    solver = dfx.Heun() if levy_area is dfx.BrownianIncrement else dfx.SPaRK()
    if mode == "adaptive":
        # Tolerances that give about N steps with some rejections at N = 1,000; at
        # N = 10,000 SPaRK would need tolerances below float32 rounding, so there
        # `dtmax` sets the step. The measured step counts are in the results.
        if levy_area is dfx.BrownianIncrement:
            tol = 6e-5 * 1000 / num_steps
        else:
            tol = 1e-6
        controller = dfx.PIDController(rtol=tol, atol=tol, dtmin=h / 8, dtmax=2 * h)
    else:
        controller = dfx.ConstantStepSize()

    @jax.jit
    def run(key):
        path = make_path(name, key, num_steps, mode, levy_area)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -0.5 * y),
            dfx.ControlTerm(
                lambda t, y, args: lx.DiagonalLinearOperator(0.4 * y), path
            ),
        )
        sol = dfx.diffeqsolve(
            terms,
            solver,
            0.0,
            1.0,
            h,
            jnp.ones(SHAPE),
            stepsize_controller=controller,
            max_steps=16 * num_steps,
            # Nothing is differentiated; `RecursiveCheckpointAdjoint` (the default)
            # would refuse `UnsafeBrownianPath`.
            adjoint=dfx.ForwardMode(),
        )
        return sol.ys, sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"]

    return run, None


def run(grid, repeats, levy_areas, contexts, modes):
    key = jr.PRNGKey(0)
    rows = []
    for num_steps in grid:
        for levy_area in levy_areas:
            for context in contexts:
                build = build_scan if context == "scan" else build_solve
                for mode in modes:
                    names = [
                        p
                        for p in PATHS
                        if not (
                            p == "UnsafeBrownianPath"
                            and context == "diffeqsolve"
                            and mode == "adaptive"
                        )
                    ]
                    built, compile_s, steps, rejected = {}, {}, {}, {}
                    for name in names:
                        fn, count = build(name, num_steps, mode, levy_area)
                        compiled, compile_s[name] = compile_timed(fn, key)
                        if count is None:  # the solve reports its own step count
                            _, accepted, rejects = compiled(key)
                            count = int(accepted) + int(rejects)
                            rejected[name] = int(rejects)
                        built[name] = lambda c=compiled: c(key)
                        steps[name] = count
                    seconds = interleaved_medians(built, repeats)
                    for name in names:
                        row = dict(
                            N=num_steps,
                            levy_area=levy_area.__name__,
                            context=context,
                            mode=mode,
                            path=name,
                            steps=steps[name],
                            rejected_steps=rejected.get(name),
                            us_per_step=1e6 * seconds[name] / steps[name],
                            compile_seconds=compile_s[name],
                        )
                        rows.append(row)
                        log(**row)
    return rows


def markdown(rows, info, repeats) -> str:
    intro = (
        f"{describe(info)} Shape {SHAPE}, float32, median of {repeats} interleaved "
        "repeats; µs per step (queries in the scan; accepted plus rejected steps in "
        "the solve). `on`: steps are the pieces; `off`: pieces of 1.3 steps; "
        "`adaptive`: random steps with rejections (scan) or a PID controller (solve)."
    )
    groups: dict = {}
    for r in rows:
        key = (r["N"], r["levy_area"], r["context"], r["mode"])
        groups.setdefault(key, {})[r["path"]] = r
    table = []
    for (n, levy, context, mode), by_path in groups.items():
        interval = by_path["BrownianInterval"]
        tree = by_path["VirtualBrownianTree"]
        unsafe = by_path.get("UnsafeBrownianPath")
        count = f"{interval['steps']}"
        if interval["rejected_steps"] is not None:
            count += f" ({interval['rejected_steps']})"
        table.append(
            [
                n,
                levy,
                context,
                mode,
                count,
                "n/a" if unsafe is None else f"{unsafe['us_per_step']:.1f}",
                f"{tree['us_per_step']:.1f}",
                f"{interval['us_per_step']:.1f}",
                "n/a"
                if unsafe is None
                else f"{interval['us_per_step'] / unsafe['us_per_step']:.2f}x",
                f"{tree['us_per_step'] / interval['us_per_step']:.1f}x",
                f"{interval['compile_seconds'] / tree['compile_seconds']:.2f}x",
            ]
        )
    header = [
        "N:",
        "Lévy area",
        "context",
        "steps",
        "queries (rejected):",
        "Unsafe µs:",
        "VirtualTree µs:",
        "Interval µs:",
        "Interval / Unsafe:",
        "VirtualTree / Interval:",
        "compile Interval / VirtualTree:",
    ]
    return intro + "\n\n" + markdown_table(header, table)


LEVY_AREAS = [dfx.BrownianIncrement, dfx.SpaceTimeLevyArea]
CONTEXTS = ["scan", "diffeqsolve"]
SIZES = {
    # mode: (N, Lévy areas, contexts, step patterns)
    "full": ([1000, 10_000], LEVY_AREAS, CONTEXTS, MODES),
    "quick": ([1000], LEVY_AREAS, CONTEXTS, MODES),
    # Only the rows the benchmark runner's headline reads.
    "tiny": ([100], LEVY_AREAS[:1], ["diffeqsolve"], ["on"]),
    "device": ([10_000], LEVY_AREAS, ["diffeqsolve"], ["on", "off"]),
}


def main():
    args = parse_args(__doc__)
    info = machine()
    grid, levy_areas, contexts, modes = SIZES[args.mode]
    rows = run(grid, args.repeats, levy_areas, contexts, modes)
    payload = dict(machine=info, shape=SHAPE, rows=rows)
    save("brownian", args, payload, markdown(rows, info, args.repeats))


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Brownian motion: BrownianInterval against diffrax's paths"


def headline(data) -> list[dict]:
    rows = data["rows"]
    largest = max(r["N"] for r in rows)
    pick = {
        r["path"]: r
        for r in rows
        if r["N"] == largest
        and r["context"] == "diffeqsolve"
        and r["mode"] == "on"
        and r["levy_area"] == "BrownianIncrement"
    }
    return [
        dict(
            comparison=f"Brownian path inside diffeqsolve (Heun, N = {largest})",
            ours="BrownianInterval",
            instead_of="VirtualBrownianTree",
            measured=pick["VirtualBrownianTree"]["us_per_step"]
            / pick["BrownianInterval"]["us_per_step"],
            unit="x faster",
            paper=10.6,
            source=f"{KIDGER}: up to 10.6x",
        )
    ]


def chart(data, path) -> None:
    groups: dict = {}
    for r in data["rows"]:
        if r["context"] == "diffeqsolve":
            label = f"N={r['N']} {r['levy_area']} {r['mode']}"
            groups.setdefault(r["path"], {})[label] = r["us_per_step"]
    labels = list(groups["BrownianInterval"])
    series = {p: [v.get(x, 0.0) for x in labels] for p, v in groups.items()}
    bar_chart(path, TITLE, labels, series, "µs per step", log=True)


if __name__ == "__main__":
    main()
