"""What every benchmark script shares: the command line, the machine record,
interleaved timing, compile time, gradient errors, the markdown/JSON output and the
charts."""

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Sequence

import diffrax as dfx
import jax
import numpy as np


RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("tiny", "quick", "full", "device")
# The papers the headline sets our measurements against.
KIDGER = "Kidger et al. 2021"
MCCALLUM = "McCallum & Foster 2024"
NORCLIFFE = "Norcliffe & Deisenroth 2023"


def parse_args(
    doc: str | None, repeats: int = 3, extra: Callable | None = None
) -> argparse.Namespace:
    """The options every benchmark takes; `doc` is the benchmark's module docstring,
    whose first line describes it in `--help`.

    `--mode` picks the problem sizes: `full` (the published tables), `quick` (a few
    minutes on 2 CPU cores), `tiny` (seconds; checks that everything runs, the
    numbers mean little) or `device` (for one GPU; `python -m benchmarks --device`).
    `--quick` is short for `--mode quick`. Results go to
    `--out` (default `benchmarks/results/`) as `<name>.{json,md}`, with `_quick`,
    `_tiny` or `_device` appended outside full mode.
    """
    parser = argparse.ArgumentParser(description=first_line(doc))
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--quick", action="store_true", help="same as --mode quick")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.quick:
        args.mode = "quick"
    return args


def first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]


def result_stem(name: str, mode: str) -> str:
    return name if mode == "full" else f"{name}_{mode}"


def machine() -> dict:
    """CPU model, core count, accelerator, versions and date of this run."""
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
    gpus = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        device=f"{device.platform}: {device.device_kind}",
        gpu=gpus[0] if gpus else None,
        jax=jax.__version__,
        jaxlib=importlib.metadata.version("jaxlib"),
        diffrax=getattr(dfx, "__version__", "?"),
        date=time.strftime("%Y-%m-%d"),
    )


def describe(info: dict) -> str:
    """One sentence naming when, where and with what a table was measured."""
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"
    return (
        f"Measured {info['date']} on {where}, jax {info['jax']} (jaxlib "
        f"{info.get('jaxlib', '?')}), diffrax {info['diffrax']}."
    )


def interleaved_medians(
    fns: dict[Hashable, Callable[[], object]], repeats: int
) -> dict[Hashable, float]:
    """Median wall-clock seconds of each (already compiled) function, after one
    warm-up call each, with the repeats of all functions interleaved so that drifts
    in machine load hit every one alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_timed(fn, *inputs) -> tuple[jax.stages.Compiled, float]:
    """`fn` (a `jax.jit`-wrapped function) compiled for `inputs`, and the seconds
    that took."""
    start = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    return compiled, time.perf_counter() - start


def temp_bytes(compiled: jax.stages.Compiled) -> int:
    """The compiled program's scratch memory: XLA's `temp_size_in_bytes`."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError(f"no memory analysis on {jax.default_backend()}")
    return analysis.temp_size_in_bytes


def relative_error(reference, other) -> float:
    """Max over leaves of max|other - reference| / max|reference|, in float64."""
    errors = []
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errors.append(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    return float(max(errors))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; a header ending in `:` (dropped) is right-aligned."""
    titles = [h.rstrip(":") for h in header]
    align = ["---:" if h.endswith(":") else "---" for h in header]
    lines = ["| " + " | ".join(titles) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def log(**fields) -> None:
    """Prints one measurement as it is made, so long runs show progress."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{name}={value}")
    print("  ".join(parts), flush=True)


def save(name: str, args: argparse.Namespace, payload: dict, table: str) -> None:
    """Writes `<out>/<stem>.json` (payload + mode) and `<out>/<stem>.md`."""
    args.out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(name, args.mode)
    payload = dict(payload, mode=args.mode, repeats=args.repeats)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (args.out / f"{stem}.md").write_text(table)
    print(table, flush=True)


def bar_chart(path, title, labels, series, ylabel, log=False) -> None:
    """Grouped horizontal bars: one group per label, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
