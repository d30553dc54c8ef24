"""Every benchmark in one run, and one report that sets each against the papers.

Runs each benchmark script of this folder in its own process (each sets its own
precision, and compiled programs do not pile up in one process), in the mode asked
for, then reads their JSON results and writes:

- `results.md`: the headline table (each comparison, what it replaces, our measured
  ratio and the paper's figure), then every benchmark's own table;
- `results.json`: the machine, the headline rows and every benchmark's results;
- `results/charts/*.png`: a bar chart per benchmark and one of the headline.

Outside full mode the files are `results_quick.*` / `results_tiny.*`. Each A/B pair
is timed in the same process, interleaved, after compilation; compile time is
reported separately. `--sections` reruns some benchmarks and reuses the others'
saved results (each table names the date and machine it was measured on).

Run: `python -m benchmarks [--quick | --full | --mode tiny] [--sections a,b]`.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import (  # noqa: E402
    describe,
    first_line,
    machine,
    markdown_table,
    result_stem,
)


HERE = pathlib.Path(__file__).parent
# name: title; run in this order.
SECTIONS = {
    "sde_step": "Neural SDE training step",
    "brownian": "Brownian motion: BrownianInterval against diffrax's paths",
    "reversible_adjoint": "Reversible adjoint: time and memory against N",
    "gauss_legendre_adjoint": "Gauss–Legendre quadrature adjoint against Backsolve",
    "sde_gan_step": "SDE-GAN step: weight clipping against gradient penalty",
    "gradient_error": "Gradient error of each adjoint",
}
KIDGER = "Kidger et al. 2021"
MCCALLUM = "McCallum & Foster 2024"
NORCLIFFE = "Norcliffe & Deisenroth 2023"


def headline_sde_step(data):
    rows = {r["configuration"]: r for r in data["rows"]}
    base = rows[data["baseline"]]

    def faster(name, than=base):
        return than["ms_per_step"] / rows[name]["ms_per_step"]

    full = "ReversibleHeun + BrownianInterval + ReversibleAdjoint"
    return [
        dict(
            comparison="neural SDE training step, full stack",
            ours=full,
            instead_of=data["baseline"],
            measured=faster(full),
            unit="x faster",
            paper=None,
            source=f"{KIDGER} report the parts, not the stack",
        ),
        dict(
            comparison="neural SDE training step, solver alone",
            ours="ReversibleHeun",
            instead_of="Midpoint (both with VirtualBrownianTree + RecursiveCheckpoint)",
            measured=faster(
                "ReversibleHeun + VirtualBrownianTree + RecursiveCheckpoint"
            ),
            unit="x faster",
            paper=1.98,
            source=f"{KIDGER}: up to 1.98x",
        ),
        dict(
            comparison="neural SDE training step, Brownian path alone",
            ours="BrownianInterval",
            instead_of="VirtualBrownianTree (both with Midpoint + RecursiveCheckpoint)",
            measured=faster("Midpoint + BrownianInterval + RecursiveCheckpoint"),
            unit="x faster",
            paper=10.6,
            source=f"{KIDGER}: up to 10.6x",
        ),
    ]


def headline_brownian(data):
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


def headline_reversible_adjoint(data):
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


def headline_gauss_legendre_adjoint(data):
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


def headline_sde_gan_step(data):
    clip, penalty = data["rows"]
    return [
        dict(
            comparison=f"SDE-GAN training step, batch {data['config']['batch']}",
            ours="weight clipping + LipSwish",
            instead_of="gradient penalty",
            measured=penalty["ms_per_step"] / clip["ms_per_step"],
            unit="x faster",
            paper=1.87,
            source=f"{KIDGER}: up to 1.87x",
        )
    ]


def headline_gradient_error(data):
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


HEADLINES = {
    "sde_step": headline_sde_step,
    "brownian": headline_brownian,
    "reversible_adjoint": headline_reversible_adjoint,
    "gauss_legendre_adjoint": headline_gauss_legendre_adjoint,
    "sde_gan_step": headline_sde_gan_step,
    "gradient_error": headline_gradient_error,
}


def bar_chart(path, title, labels, series, ylabel, log=False):
    """Grouped horizontal bars: one group per label, one bar per series."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) * len(series) + 1.5))
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        positions = [j + i * height for j in range(len(labels))]
        ax.barh(positions, values, height=height, label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    if log:
        ax.set_xscale("log")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chart(name, data, path):
    if name == "sde_step":
        rows = data["rows"]
        labels = [r["configuration"] for r in rows]
        series = {"ms per step": [r["ms_per_step"] for r in rows]}
        bar_chart(path, SECTIONS[name], labels, series, "ms per training step")
    elif name == "brownian":
        groups: dict = {}
        for r in data["rows"]:
            if r["context"] == "diffeqsolve":
                label = f"N={r['N']} {r['levy_area']} {r['mode']}"
                groups.setdefault(r["path"], {})[label] = r["us_per_step"]
        labels = list(groups["BrownianInterval"])
        series = {p: [v.get(x, 0.0) for x in labels] for p, v in groups.items()}
        bar_chart(path, SECTIONS[name], labels, series, "µs per step", log=True)
    elif name == "reversible_adjoint":
        groups = {}
        for r in data["rows"]:
            groups.setdefault(f"{r['group']}: {r['adjoint']}", {})[r["steps"]] = (
                r["temp_bytes"] / 1e6
            )
        steps = sorted({r["steps"] for r in data["rows"]})
        series = {f"N = {n}": [g[n] for g in groups.values()] for n in steps}
        bar_chart(
            path, SECTIONS[name], list(groups), series, "temp memory (MB)", log=True
        )
    elif name == "gauss_legendre_adjoint":
        groups = {}
        for r in data["rows"]:
            label = f"{r['setting']}, W={r['width']}, state {r['state']}"
            groups.setdefault(r["adjoint"], {})[label] = r["seconds"] * 1e3
        labels = list(next(iter(groups.values())))
        series = {a: [v[x] for x in labels] for a, v in groups.items()}
        bar_chart(path, SECTIONS[name], labels, series, "ms per gradient", log=True)
    elif name == "sde_gan_step":
        rows = data["rows"]
        series = {"ms per step": [r["ms_per_step"] for r in rows]}
        bar_chart(
            path, SECTIONS[name], [r["variant"] for r in rows], series, "ms per step"
        )
    elif name == "gradient_error":
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


def headline_chart(rows, path):
    numeric = [r for r in rows if r["paper"] is not None]
    labels = [r["comparison"] for r in numeric]
    series = {
        "measured here": [r["measured"] for r in numeric],
        "paper (up to)": [r["paper"] for r in numeric],
    }
    bar_chart(path, "Speed-ups: measured against the papers", labels, series, "x")


def fmt(value):
    return f"{value:.1e}" if value < 1e-2 else f"{value:.2f}"


def report(mode, info, results, headline, charts) -> str:
    command = "python -m benchmarks" + ("" if mode == "full" else f" --mode {mode}")
    lines = [
        f"# Benchmark results ({mode} mode)",
        "",
        f"Report assembled {info['date']} by `{command}`. {describe(info)} Each "
        "table below names the date and machine it was measured on.",
        "",
        "## Headline",
        "",
    ]
    table = []
    for r in headline:
        space = "" if r["unit"].startswith("x") else " "
        table.append(
            [
                r["comparison"],
                f"`{r['ours']}`",
                r["instead_of"],
                f"{fmt(r['measured'])}{space}{r['unit']}",
                r["source"],
            ]
        )
    header = ["comparison", "ours", "instead of (diffrax)", "measured", "paper"]
    # Snippet markers: the docs and the README include this table alone.
    lines += [
        "<!-- --8<-- [start:headline] -->",
        markdown_table(header, table),
        "<!-- --8<-- [end:headline] -->",
        "",
    ]
    lines.append(f"![headline](results/charts/{charts['headline']})\n")
    for name in SECTIONS:
        text = (results / f"{result_stem(name, mode)}.md").read_text()
        lines += [f"## {SECTIONS[name]}", "", text]
        lines.append(f"![{name}](results/charts/{charts[name]})\n")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=first_line(__doc__))
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="under 15 min on 2 cores")
    modes.add_argument("--full", action="store_true", help="the published tables")
    modes.add_argument("--mode", choices=["tiny", "quick", "full"])
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated benchmarks to run; the others' saved results are used",
    )
    parser.add_argument("--repeats", type=int, help="passed to every benchmark")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=HERE,
        help="folder for results.md/json (and results/ beneath it)",
    )
    args = parser.parse_args()
    mode = args.mode or ("quick" if args.quick else "full")
    out = args.out
    results = out / "results"
    (results / "charts").mkdir(parents=True, exist_ok=True)
    to_run = [s for s in args.sections.split(",") if s]
    unknown = set(to_run) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {SECTIONS}")

    timings = {}
    for name in SECTIONS:
        if name not in to_run:
            continue
        command = [sys.executable, str(HERE / f"{name}.py"), "--mode", mode]
        command += ["--out", str(results)]
        if args.repeats is not None:
            command += ["--repeats", str(args.repeats)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        env = dict(os.environ)
        if mode == "tiny":
            # Tiny mode checks that everything runs; its numbers mean nothing, so
            # XLA's optimisations are switched off to compile faster.
            env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        timings[name] = time.perf_counter() - start
        print(f"== {name} took {timings[name]:.0f} s", flush=True)

    sections, headline, charts = {}, [], {}
    for name in SECTIONS:
        path = results / f"{result_stem(name, mode)}.json"
        if not path.exists():
            sys.exit(f"{path} is missing: run with --sections {name}")
        data = json.loads(path.read_text())
        sections[name] = data
        headline += HEADLINES[name](data)
        charts[name] = f"{result_stem(name, mode)}.png"
        chart(name, data, results / "charts" / charts[name])
    charts["headline"] = f"{result_stem('headline', mode)}.png"
    headline_chart(headline, results / "charts" / charts["headline"])

    info = machine()
    stem = result_stem("results", mode)
    text = report(mode, info, results, headline, charts)
    (out / f"{stem}.md").write_text(text)
    payload = dict(
        machine=info,
        mode=mode,
        seconds_per_section=timings,
        headline=headline,
        sections=sections,
    )
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print(text)


if __name__ == "__main__":
    main()
