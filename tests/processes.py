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
    "test_sharded_batch_matches_unsharded": ("tests/sharding_script.py",),
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
}
_NICENESS = 10
_scratch = tempfile.TemporaryDirectory(prefix="diffrax_extras_processes_")
_queue: list[str] = []
_done: dict[str, threading.Event] = {}
_returncodes: dict[str, int] = {}
_current: list[subprocess.Popen] = []
_stopping = threading.Event()
_lock = threading.Lock()
_worker: threading.Thread | None = None


def _folder(name: str) -> pathlib.Path:
    return pathlib.Path(_scratch.name) / name


# Through `nice`, not a `preexec_fn`: running Python in the child between fork and
# exec can deadlock a multithreaded parent such as JAX.
_NICE_PATH = shutil.which("nice")
_NICE = [_NICE_PATH, "-n", str(_NICENESS)] if _NICE_PATH else []


def _run(name: str) -> None:
    folder = _folder(name)
    folder.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        DIFFRAX_EXTRAS_TINY="1",
        DIFFRAX_EXTRAS_OUTPUT=str(folder),
        MPLBACKEND="Agg",
    )
    command = [arg.format(out=folder) for arg in RUNS[name]]
    # Output to files, not pipes, so that a chatty process never blocks.
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        process = subprocess.Popen(
            [*_NICE, sys.executable, *command],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
        _current[:] = [process]
        _returncodes[name] = process.wait()


def _work() -> None:
    while not _stopping.is_set():
        with _lock:
            if not _queue:
                return
            name = _queue.pop(0)
        try:
            _run(name)
        except Exception as error:  # reported by `result`, in the test that waits
            _returncodes[name] = -1
            (_folder(name) / "error").write_text(repr(error))
        finally:
            _done[name].set()


def start(names) -> None:
    """Queues the processes of the tests `names` (those not queued yet)."""
    global _worker
    with _lock:
        for name in names:
            if name in _done or name not in RUNS:
                continue
            _done[name] = threading.Event()
            _queue.append(name)
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, daemon=True)
            _worker.start()


def stop() -> None:
    _stopping.set()
    for process in _current:
        if process.poll() is None:
            process.kill()
    if _worker is not None:
        _worker.join(timeout=10)
    _scratch.cleanup()


def result(name: str) -> tuple[str, pathlib.Path]:
    """The process's standard output and the folder it wrote into."""
    start([name])
    assert _done[name].wait(timeout=1800), f"{name}: its script did not finish"
    folder = _folder(name)
    if _returncodes[name] != 0:
        files = (folder / "stderr", folder / "error")
        report = [f.read_text() for f in files if f.exists()]
        raise AssertionError("\n".join(r for r in report if r))
    return (folder / "stdout").read_text(), folder
