"""Each example runs end to end in its tiny configuration and writes its plots (into a
temporary folder, so that the committed plots stay those of the full runs).

The examples run as their own processes, started as soon as collection ends (by
`pytest_collection_finish` in `conftest.py`), so that they compile alongside the
first test files: XLA compiles on one thread, and the suite's other core would
otherwise sit idle. Each test here then waits for its example's result.
"""

import os
import pathlib
import subprocess
import sys
import tempfile


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
# Test name -> the example script and its arguments.
RUNS = {
    "test_quickstart_runs_and_saves_its_plot": ("quickstart.py",),
    "test_reversible_stability_runs_and_saves_its_plot": ("reversible_stability.py",),
    "test_wong_zakai_ou_runs_and_saves_its_plot": ("wong_zakai_ou.py",),
    "test_neural_cde_runs_and_saves_its_plot": ("neural_cde.py",),
    "test_sde_gan_runs_both_variants_and_saves_its_plots": ("sde_gan.py", "--both"),
}
_running: dict[str, tuple[subprocess.Popen, pathlib.Path]] = {}
_scratch = tempfile.TemporaryDirectory(prefix="diffrax_extras_examples_")


def start(names) -> None:
    """Starts the examples of the tests `names` (those not started yet)."""
    for name in names:
        if name in _running or name not in RUNS:
            continue
        script, *args = RUNS[name]
        folder = pathlib.Path(_scratch.name) / name
        folder.mkdir()
        env = dict(
            os.environ,
            DIFFRAX_EXTRAS_TINY="1",
            DIFFRAX_EXTRAS_OUTPUT=str(folder),
            MPLBACKEND="Agg",
        )
        # Output to files, not pipes, so that a chatty example never blocks.
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            process = subprocess.Popen(
                [sys.executable, str(EXAMPLES / script), *args],
                env=env,
                stdout=out,
                stderr=err,
            )
        _running[name] = (process, folder)


def stop() -> None:
    for process, _ in _running.values():
        if process.poll() is None:
            process.kill()
    _scratch.cleanup()


def _result(name: str) -> tuple[str, pathlib.Path]:
    """The example's standard output and the folder it wrote its plots into."""
    start([name])
    process, folder = _running[name]
    process.wait(timeout=600)
    stderr = (folder / "stderr").read_text()
    assert process.returncode == 0, stderr
    return (folder / "stdout").read_text(), folder


def test_quickstart_runs_and_saves_its_plot():
    out, folder = _result("test_quickstart_runs_and_saves_its_plot")
    assert "gradient vs RecursiveCheckpointAdjoint" in out
    assert (folder / "quickstart_output" / "fit.png").exists()


def test_reversible_stability_runs_and_saves_its_plot():
    out, folder = _result("test_reversible_stability_runs_and_saves_its_plot")
    assert "Reversible(Tsit5(), 0.5)" in out
    output = folder / "reversible_stability_output"
    assert (output / "stability_regions.png").exists()
    assert (output / "stiff.md").exists()


def test_wong_zakai_ou_runs_and_saves_its_plot():
    out, folder = _result("test_wong_zakai_ou_runs_and_saves_its_plot")
    assert "trained as ODE" in out and "trained as SDE" in out
    assert (folder / "wong_zakai_ou_output" / "paths.png").exists()


def test_neural_cde_runs_and_saves_its_plot():
    out, folder = _result("test_neural_cde_runs_and_saves_its_plot")
    assert "test accuracy" in out and "gradient vs RecursiveCheckpointAdjoint" in out
    assert (folder / "neural_cde_output" / "spirals.png").exists()


def test_sde_gan_runs_both_variants_and_saves_its_plots():
    out, folder = _result("test_sde_gan_runs_both_variants_and_saves_its_plots")
    for row in ("weight clipping + LipSwish", "gradient penalty", "untrained"):
        assert f"| {row}" in out
    assert "gradient penalty / clipping, time per step" in out
    assert (folder / "sde_gan_output" / "paths.png").exists()
    assert (folder / "sde_gan_output" / "loss.png").exists()
