"""Scripts that the tests run as their own processes: the examples and the benchmark
runner, each in its tiny configuration, writing into a temporary folder (so that the
committed plots and results stay those of the full runs).

They are queued as soon as collection ends (by `pytest_collection_finish` in
`conftest.py`) and run one after another, at a lower priority, on a background
thread: XLA compiles on one thread, so the suite's other core would otherwise sit
idle, while running them all at once would starve the test process. Their tests are
moved to the end of the session (`pytest_collection_modifyitems`), by which time
the queue is done; each waits for its process's result.
"""

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading


ROOT = pathlib.Path(__file__).parent.parent
# Test name -> the command's arguments after `python`; `{out}` is the process's folder.
RUNS = {
    "test_quickstart_runs_and_saves_its_plot": ("examples/quickstart.py",),
    "test_reversible_stability_runs_and_saves_its_plot": (
        "examples/reversible_stability.py",
    ),
    "test_wong_zakai_ou_runs_and_saves_its_plot": ("examples/wong_zakai_ou.py",),
    "test_neural_cde_runs_and_saves_its_plot": ("examples/neural_cde.py",),
    "test_sde_gan_runs_both_variants_and_saves_its_plots": (
        "examples/sde_gan.py",
        "--both",
    ),
    "test_sharded_batch_matches_unsharded": ("-m", "tests.sharding_script"),
    "test_runner_writes_every_row": (
        "-m",
        "benchmarks",
        "--mode",
        "tiny",
        "--repeats",
        "1",
        "--out",
        "{out}",
    ),
    # The tiny form of the GPU run, on two of its sections (the runner test above
    # covers the others' tiny sizes).
    "test_device_tiny_form_writes_its_report": (
        "-m",
        "benchmarks",
        "--device",
        "--mode",
        "tiny",
        "--repeats",
        "1",
        "--sections",
        "brownian,reversible_adjoint",
        "--out",
        "{out}",
    ),
}
_scratch = tempfile.TemporaryDirectory(prefix="diffrax_extras_processes_")
# One worker: the scripts run one after another, in the order they were queued.
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
_futures: dict[str, concurrent.futures.Future[int]] = {}
_current: subprocess.Popen | None = None
_stopping = False
_lock = threading.Lock()  # between starting a process and `stop` killing it

# Through `nice`, not a `preexec_fn`: running Python in the child between fork and
# exec can deadlock a multithreaded parent such as JAX.
_NICE_PATH = shutil.which("nice")
_NICE = [_NICE_PATH, "-n", "10"] if _NICE_PATH else []


def _folder(name: str) -> pathlib.Path:
    return pathlib.Path(_scratch.name) / name


def _run(name: str) -> int:
    global _current
    folder = _folder(name)
    folder.mkdir()
    env = dict(
        os.environ,
        DIFFRAX_EXTRAS_TINY="1",
        DIFFRAX_EXTRAS_OUTPUT=str(folder),
        MPLBACKEND="Agg",
    )
    command = [arg.format(out=folder) for arg in RUNS[name]]
    # Output to files, not pipes, so that a chatty process never blocks.
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        with _lock:
            if _stopping:
                return -1
            process = _current = subprocess.Popen(
                [*_NICE, sys.executable, *command],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )
        return process.wait()


def start(names) -> None:
    """Queues the processes of the tests `names` (those not queued yet)."""
    for name in names:
        if name in RUNS and name not in _futures:
            _futures[name] = _executor.submit(_run, name)


def stop() -> None:
    global _stopping
    with _lock:
        _stopping = True
        if _current is not None:
            _current.kill()
    _executor.shutdown(wait=True, cancel_futures=True)
    _scratch.cleanup()


def result(name: str) -> tuple[str, pathlib.Path]:
    """The process's standard output and the folder it wrote into."""
    start([name])
    folder = _folder(name)
    returncode = _futures[name].result(timeout=1800)
    assert returncode == 0, (folder / "stderr").read_text()
    return (folder / "stdout").read_text(), folder
