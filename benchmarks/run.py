"""Every benchmark in one run, and one report that sets each against the papers.

Runs each benchmark script of this folder in its own process (each sets its own
precision, and compiled programs do not pile up in one process), in the mode asked
for, then reads their JSON results and writes:

- `results.md`: the headline table (each comparison, what it replaces, our measured
  ratio and the paper's figure), then every benchmark's own table;
- `results.json`: the machine, the headline rows and every benchmark's results;
- `results/charts/*.png`: a bar chart per benchmark and one of the headline.

Outside full mode the files are `results_quick.*` / `results_tiny.*`. The `peers`
section (the PyTorch libraries, `peers.py`) needs the optional `[peers]` dependencies
and is skipped, with a message, where torch is not importable. Each A/B pair
is timed in the same process, interleaved, after compilation; compile time is
reported separately. `--sections` reruns some benchmarks and reuses the others'
saved results (each table names the date and machine it was measured on).

`--device` runs the sections that matter on an accelerator (reversible adjoint, neural
SDE step, Brownian paths, Gauss–Legendre adjoint) at the sizes of each script's
`device` entry, meant to finish in under 8 minutes on one H100/H200 (JAX with CUDA),
and writes `results_gpu.{md,json}` naming the device; `--device --mode tiny` runs the
same sections at their tiny sizes on any machine (`results_gpu_tiny.*`).

Run: `python -m benchmarks [--quick | --full | --mode tiny] [--device]
[--sections a,b]`.
"""

import argparse
import importlib.util
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
    "peers": "Peers: the PyTorch libraries users would pick instead",
}
# Sections that need the optional `[peers]` dependencies (torch).
NEEDS_TORCH = {"peers"}
# `--device`: these sections, in this order, with extra arguments for their scripts
# and their default repeats. Sized from estimates of 50-100 µs per solver step on
# one GPU (diffrax's loop is launch-bound at these sizes): about 2 + 1.5 + 1 + 3.5
# minutes. The reversible adjoint's N = 100,000 dominates, so it is timed once after
# its warm-up, and without the Tsit5 group (which doubles it; the CPU table has it).
DEVICE_SECTIONS = {
    "sde_step": ([], 2),
    "brownian": ([], 2),
    "gauss_legendre_adjoint": ([], 2),
    "reversible_adjoint": (["--groups", "ReversibleHeun"], 1),
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


def headline_peers(data):
    # Its own table (README, results/peers.md): the headline compares with diffrax.
    return []


HEADLINES = {
    "sde_step": headline_sde_step,
    "brownian": headline_brownian,
    "reversible_adjoint": headline_reversible_adjoint,
    "gauss_legendre_adjoint": headline_gauss_legendre_adjoint,
    "sde_gan_step": headline_sde_gan_step,
    "gradient_error": headline_gradient_error,
    "peers": headline_peers,
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
    elif name == "peers":
        rows = [
            r
            for p in data["processes"]
            for r in p["timing"]
            if not r.get("skipped") and r["side"] == "peer"
        ]

        def peer_label(r):
            peer = r["configuration"].split(" (")[0]
            peer += ", seminorm" if "seminorm" in r["configuration"] else ""
            problem = r["problem"].split(" (")[0].split(" consecutive")[0]
            return f"{peer}: {problem.split(', ')[-1]}, threads {r['threads']}"

        labels = [peer_label(r) for r in rows]
        series = {"peer's time / ours": [r["peer_over_ours"] for r in rows]}
        title = "The PyTorch peers: their time / ours"
        bar_chart(path, title, labels, series, "x (above 1: ours faster)", log=True)
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


def report(mode, info, results, headline, charts, device=False, left_out=()) -> str:
    command = "python -m benchmarks" + (" --device" if device else "")
    command += "" if mode in ("full", "device") else f" --mode {mode}"
    lines = [
        f"# Benchmark results ({mode} mode{', device' if device else ''})",
        "",
        f"Report assembled {info['date']} by `{command}`. {describe(info)} Each "
        "table below names the date and machine it was measured on.",
        "",
    ]
    if device:
        lines += [f"Device: {info['device']}.", ""]
        if info["gpu"] is None:
            lines += ["No GPU was found: these numbers are from the CPU.", ""]
    if left_out:
        names = ", ".join(f"`{name}`" for name in left_out)
        lines += [f"Left out (no saved results): {names}.", ""]
    lines += ["## Headline", ""]
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
    for name in charts:
        if name == "headline":
            continue
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
        "--device",
        action="store_true",
        help="the accelerator run (under 8 min on one H100/H200); with --mode tiny, "
        "its tiny form on any machine",
    )
    parser.add_argument(
        "--sections",
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
    if args.device:
        if mode not in ("full", "tiny"):
            parser.error("--device takes no mode but --mode tiny (its tiny form)")
        # The scripts' `device` size entries, or their tiny ones for the tiny form.
        mode = "device" if mode == "full" else mode
    sections = list(DEVICE_SECTIONS) if args.device else list(SECTIONS)
    out = args.out
    results = out / "results"
    (results / "charts").mkdir(parents=True, exist_ok=True)
    requested = args.sections if args.sections is not None else ",".join(sections)
    to_run = [s for s in requested.split(",") if s]
    unknown = set(to_run) - set(sections)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {sections}")
    has_torch = importlib.util.find_spec("torch") is not None
    skipped = set()
    if not has_torch:
        skipped = NEEDS_TORCH & set(sections)
        for name in sorted(skipped & set(to_run)):
            print(
                f"== {name}: skipped, torch is not importable (install the "
                '`[peers]` extra: pip install -e ".[peers]")',
                flush=True,
            )

    timings = {}
    for name in sections:
        if name not in to_run or name in skipped:
            continue
        command = [sys.executable, str(HERE / f"{name}.py"), "--mode", mode]
        command += ["--out", str(results)]
        repeats = args.repeats
        if args.device:
            extra, device_repeats = DEVICE_SECTIONS[name]
            command += extra
            repeats = device_repeats if repeats is None else repeats
        if repeats is not None:
            command += ["--repeats", str(repeats)]
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

    data_by_section, headline, charts, left_out = {}, [], {}, []
    for name in sections:
        path = results / f"{result_stem(name, mode)}.json"
        if not path.exists() and (name in NEEDS_TORCH or args.device):
            # A device run may be partial (`--sections`): it reports what it has.
            print(f"== {name}: no saved results, left out of the report", flush=True)
            left_out.append(name)
            continue
        if not path.exists():
            sys.exit(f"{path} is missing: run with --sections {name}")
        data = json.loads(path.read_text())
        data_by_section[name] = data
        headline += HEADLINES[name](data)
        charts[name] = f"{result_stem(name, mode)}.png"
        chart(name, data, results / "charts" / charts[name])
    charts["headline"] = f"{result_stem('headline', mode)}.png"
    headline_chart(headline, results / "charts" / charts["headline"])

    info = machine()
    if args.device:
        stem = "results_gpu" + ("" if mode == "device" else f"_{mode}")
    else:
        stem = result_stem("results", mode)
    text = report(mode, info, results, headline, charts, args.device, left_out)
    (out / f"{stem}.md").write_text(text)
    payload = dict(
        machine=info,
        mode=mode,
        device=info["device"],
        seconds_per_section=timings,
        seconds=sum(timings.values()),
        left_out=left_out,
        headline=headline,
        sections=data_by_section,
    )
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    print(text)


if __name__ == "__main__":
    main()
