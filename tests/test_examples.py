import os
import pathlib
import subprocess
import sys


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _run_example(name: str) -> str:
    env = dict(os.environ, DIFFRAX_EXTRAS_TINY="1", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _remove(path: pathlib.Path) -> pathlib.Path:
    if path.exists():
        path.unlink()
    return path


def test_quickstart_runs_and_saves_its_plot():
    plot = _remove(EXAMPLES / "quickstart_output" / "fit.png")
    assert "gradient vs RecursiveCheckpointAdjoint" in _run_example("quickstart.py")
    assert plot.exists()


def test_reversible_stability_runs_and_saves_its_plot():
    output = EXAMPLES / "reversible_stability_output"
    plot = _remove(output / "stability_regions.png")
    table = _remove(output / "stiff.md")
    assert "Reversible(Tsit5(), 0.5)" in _run_example("reversible_stability.py")
    assert plot.exists() and table.exists()


def test_wong_zakai_ou_runs_and_saves_its_plot():
    plot = _remove(EXAMPLES / "wong_zakai_ou_output" / "paths.png")
    out = _run_example("wong_zakai_ou.py")
    assert "trained as ODE" in out and "trained as SDE" in out
    assert plot.exists()
