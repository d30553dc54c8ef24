"""Scripts that the tests run as their own processes: the examples and the benchmark
sections, each in its tiny configuration, writing into a temporary folder (so that
the committed plots and results stay those of the full runs).

They are queued as soon as collection ends (by `pytest_collection_finish` in
`conftest.py`), each after the scripts it needs (`AFTER`), and run one after
another, at a lower priority, on a background thread: XLA compiles on one thread, so
the suite's other core would otherwise sit idle, while running them all at once
would starve the test process. Their tests are moved to the end of the session
(`pytest_collection_modifyitems`); each waits for its process's result, or, if the
queue has not reached its script yet, runs it in this session, which is otherwise
idle by then, so that at the end both cores run scripts. The benchmark runner's
tiny run is therefore split into its sections (run as scripts, longest first) and
the runner's report of their results: one 200-second script at the end would leave
one core idle meanwhile. A test names its script with `@pytest.mark.script(name)`,
a key of `RUNS`.

The same queue is the suite's second worker: a session that runs the modules of
`OFFLOADED` together with others hands them, first in the queue, to a pytest process
of their own, and their tests in this session (moved to the end) report that
process's outcome for each. `DIFFRAX_EXTRAS_NO_OFFLOAD=1` runs every test in this
process (as the offloaded process itself does), e.g. to debug one with `--pdb`.
"""

import concurrent.futures
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree


ROOT = pathlib.Path(__file__).parent.parent
# The benchmark sections of the runner's tiny run (`python -m benchmarks --mode
# tiny`), each run as a script of its own so that both cores can share them, longest
# first (seconds each in CI on 2 cores, beside the test process, 2026-12-03: 68, 58,
# 55, 48, 48, 38, 23, 20); `peers` only where torch is importable, as the runner
# does. The runner then assembles their results.
BENCHMARK_SECTIONS = [
    "sde_gan_step",
    "sde_step",
    "gauss_legendre_adjoint",
    "gradient_error",
    "reversible_adjoint",
    "sde_gan_gradients",
    "reconstruction_check",
    "brownian",
] + (["peers"] if importlib.util.find_spec("torch") is not None else [])
# Script name -> the command's arguments after `python`; `{out}` is the process's
# folder, `{benchmarks}` that of the runner's tiny run. A test asks for one with
# `@pytest.mark.script(name)` and reads it with `result(name)`.
RUNS = {
    "quickstart": ("examples/quickstart.py",),
    "reversible_stability": ("examples/reversible_stability.py",),
    "wong_zakai_ou": ("examples/wong_zakai_ou.py",),
    "neural_cde": ("examples/neural_cde.py",),
    "sde_gan": ("examples/sde_gan.py", "--both"),
    "sharding": ("-m", "tests.sharding_script"),
    **{
        f"benchmark_{name}": (
            f"benchmarks/{name}.py",
            "--mode",
            "tiny",
            "--repeats",
            "1",
            "--out",
            "{benchmarks}/results",
        )
        for name in BENCHMARK_SECTIONS
    },
    # The report of the sections' saved results (`--sections ""` runs none).
    "benchmarks_tiny": (
        "-m",
        "benchmarks",
        "--mode",
        "tiny",
        "--sections",
        "",
        "--out",
        "{out}",
    ),
    # The tiny form of the GPU run, on one of its sections, run by the runner with
    # that section's device arguments (the sections' tiny sizes are run above).
    "benchmarks_device_tiny": (
        "-m",
        "benchmarks",
        "--device",
        "--mode",
        "tiny",
        "--repeats",
        "1",
        "--sections",
        "reversible_adjoint",
        "--out",
        "{out}",
    ),
}
# Scripts that need others' results first.
AFTER = {"benchmarks_tiny": [f"benchmark_{name}" for name in BENCHMARK_SECTIONS]}
# Test modules run by a process of their own when the session runs others too.
OFFLOADED = ("tests/test_gauss_legendre_adjoint.py",)
_NO_OFFLOAD = "DIFFRAX_EXTRAS_NO_OFFLOAD"
_scratch = tempfile.TemporaryDirectory(prefix="diffrax_extras_processes_")
# One worker: the scripts run one after another, in the order they were queued.
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
_futures: dict[str, concurrent.futures.Future[int]] = {}
_running: set[subprocess.Popen] = set()
_stopping = False
# Between starting a process and `stop` killing it, and between the threads that
# may run a queued script (the background worker and this session).
_lock = threading.RLock()
# Script name -> (start, end) on `time.monotonic`, for the session's summary.
_times: dict[str, tuple[float, float]] = {}

# Through `nice`, not a `preexec_fn`: running Python in the child between fork and
# exec can deadlock a multithreaded parent such as JAX.
_NICE_PATH = shutil.which("nice")
_NICE = [_NICE_PATH, "-n", "10"] if _NICE_PATH else []


def _folder(name: str) -> pathlib.Path:
    return pathlib.Path(_scratch.name) / name


def _run(name: str, arguments) -> int:
    dependencies = AFTER.get(name, ())
    # Those not started yet first, then those the background worker is running:
    # waiting in order would leave this thread idle while the worker, always one
    # ahead, ran them all one after another.
    for dependency in dependencies:
        _outcome(dependency, wait=False)
    for dependency in dependencies:
        returncode = _outcome(dependency)
        if returncode != 0:
            return -1 if returncode is None else returncode
    folder = _folder(name)
    folder.mkdir(exist_ok=True)
    benchmarks = _folder("benchmarks_tiny")
    (benchmarks / "results").mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        DIFFRAX_EXTRAS_TINY="1",
        DIFFRAX_EXTRAS_OUTPUT=str(folder),
        MPLBACKEND="Agg",
        **{_NO_OFFLOAD: "1"},
    )
    if arguments[0].startswith(("examples/", "benchmarks/")):
        # Tiny runs check that the scripts run end to end; their numbers mean
        # nothing, so XLA's optimisations are switched off to compile faster (as the
        # benchmark runner does in tiny mode): 15-20% of the examples' time.
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    command = [arg.format(out=folder, benchmarks=benchmarks) for arg in arguments]
    # Output to files, not pipes, so that a chatty process never blocks.
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        with _lock:
            if _stopping:
                return -1
            process = subprocess.Popen(
                [*_NICE, sys.executable, *command],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )
            _running.add(process)
        started = time.monotonic()
        returncode = process.wait()
        with _lock:
            _running.discard(process)
        _times[name] = (started, time.monotonic())
        return returncode


def _outcome(name: str, wait: bool = True) -> int | None:
    """The exit status of script `name`, once it has run: in the background, or, if
    the queue has not reached it yet, in this thread. With `wait=False`, `None` for
    a script that has started elsewhere, without waiting for it."""
    start([name])
    with _lock:
        future = _futures[name]
        stolen = future.cancel()
        if stolen:
            # Marked running, so that another thread waits for this one's result
            # instead of running the script a second time.
            future = _futures[name] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
    if not stolen:
        return future.result(timeout=1800) if wait else None
    try:
        returncode = _run(name, RUNS[name])
    except BaseException as error:
        future.set_exception(error)
        raise
    future.set_result(returncode)
    return returncode


def scripts_of(item) -> list[str]:
    """The scripts a collected test asks for with `@pytest.mark.script(...)`."""
    names = [n for mark in item.iter_markers("script") for n in mark.args]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ValueError(f"{item.nodeid} asks for unknown scripts {unknown}.")
    return names


def start(names) -> None:
    """Queues the scripts `names` (those not queued yet), in order, each after the
    scripts it needs."""
    with _lock:
        for name in names:
            start(AFTER.get(name, ()))
            if name not in _futures:
                _futures[name] = _executor.submit(_run, name, RUNS[name])


def offload(items) -> list:
    """Queues the tests among `items` of the `OFFLOADED` modules in a pytest process
    of their own, if `items` holds other tests too, and returns them (else `[]`)."""
    if os.environ.get(_NO_OFFLOAD) == "1":
        return []
    handed = [item for item in items if item.nodeid.split("::")[0] in OFFLOADED]
    if not handed or len(handed) == len(items):
        return []
    _futures["offloaded"] = _executor.submit(
        _run,
        "offloaded",
        # No `addopts`: the durations and summary are this session's to report.
        ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=")
        + ("--junitxml", "{out}/junit.xml", *(item.nodeid for item in handed)),
    )
    return handed


def offloaded_outcome(nodeid: str) -> tuple[str, str]:
    """`(outcome, text)` of an offloaded test: "passed", "skipped" (with the reason)
    or "failed" (with the report), once its process has ended."""
    returncode = _futures["offloaded"].result(timeout=1800)
    folder = _folder("offloaded")
    path, _, name = nodeid.partition("::")
    classname = path.removesuffix(".py").replace("/", ".")
    try:
        cases = ElementTree.parse(folder / "junit.xml").iter("testcase")
    except (OSError, ElementTree.ParseError):
        cases = iter(())
    for case in cases:
        if case.get("classname") == classname and case.get("name") == name:
            for kind in ("failure", "error"):
                report = case.find(kind)
                if report is not None:
                    return "failed", report.text or report.get("message", "")
            skipped = case.find("skipped")
            if skipped is not None:
                return "skipped", skipped.get("message", "")
            return "passed", ""
    stderr = (folder / "stderr").read_text()[-5000:]
    return "failed", f"no result (exit status {returncode}):\n{stderr}"


def stop() -> None:
    global _stopping
    with _lock:
        _stopping = True
        for process in _running:
            process.kill()
    _executor.shutdown(wait=True, cancel_futures=True)
    _scratch.cleanup()


def summary() -> list[str]:
    """One line per finished script: its wall time and when it ended, counted from
    the first script's start, so that the background's share of the session shows."""
    if not _times:
        return []
    origin = min(start for start, _ in _times.values())
    return [
        f"{name}: {end - start:.0f} s (done at {end - origin:.0f} s)"
        for name, (start, end) in sorted(_times.items(), key=lambda kv: kv[1])
    ]


def result(name: str) -> tuple[str, pathlib.Path]:
    """The process's standard output and the folder it wrote into."""
    returncode = _outcome(name)
    folder = _folder(name)
    stderr = [_folder(n) / "stderr" for n in (*AFTER.get(name, ()), name)]
    assert returncode == 0, "\n".join(p.read_text() for p in stderr if p.exists())
    return (folder / "stdout").read_text(), folder
