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
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

from _common import (
    bar_chart,
    describe,
    first_line,
    machine,
    markdown_table,
    result_stem,
)


HERE = pathlib.Path(__file__).parent
# The benchmark scripts, run in this order. Each owns its rows, its headline rows
# and its chart (`TITLE`, `headline(data)` and `chart(data, path)`).
SECTIONS = [
    "sde_step",
    "brownian",
    "reversible_adjoint",
    "gauss_legendre_adjoint",
    "sde_gan_step",
    "gradient_error",
    "reconstruction_check",
    "sde_gan_gradients",
    "peers",
]
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


def section(name: str):
    """The benchmark script `name`, imported for its report functions (its `main`
    runs only in its own process)."""
    return importlib.import_module(name)


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
        lines += [f"## {section(name).TITLE}", "", text]
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
        headline += section(name).headline(data)
        charts[name] = f"{result_stem(name, mode)}.png"
        section(name).chart(data, results / "charts" / charts[name])
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
