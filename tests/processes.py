"""Scripts that the tests run as their own processes: the examples and the benchmark
runner, each in its tiny configuration, writing into a temporary folder (so that the
committed plots and results stay those of the full runs).

They are started as soon as collection ends (by `pytest_collection_finish` in
`conftest.py`), so that they compile alongside the first test files: XLA compiles
on one thread, and the suite's other core would otherwise sit idle. Each test then
waits for its process's result.
"""

import os
import pathlib
import subprocess
import sys
import tempfile


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
_running: dict[str, tuple[subprocess.Popen, pathlib.Path]] = {}
_scratch = tempfile.TemporaryDirectory(prefix="diffrax_extras_processes_")


def start(names) -> None:
    """Starts the processes of the tests `names` (those not started yet)."""
    for name in names:
        if name in _running or name not in RUNS:
            continue
        folder = pathlib.Path(_scratch.name) / name
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
            process = subprocess.Popen(
                [sys.executable, *command], cwd=ROOT, env=env, stdout=out, stderr=err
            )
        _running[name] = (process, folder)


def stop() -> None:
    for process, _ in _running.values():
        if process.poll() is None:
            process.kill()
    _scratch.cleanup()


def result(name: str) -> tuple[str, pathlib.Path]:
    """The process's standard output and the folder it wrote into."""
    start([name])
    process, folder = _running[name]
    process.wait(timeout=900)
    stderr = (folder / "stderr").read_text()
    assert process.returncode == 0, stderr
    return (folder / "stdout").read_text(), folder
