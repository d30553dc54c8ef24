"""Each example runs end to end in its tiny configuration and writes its plots (into a
temporary folder, so that the committed plots stay those of the full runs)."""

import os
import pathlib
import subprocess
import sys


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _run_example(name: str, output: pathlib.Path, *args: str) -> str:
    env = dict(
        os.environ,
        DIFFRAX_EXTRAS_TINY="1",
        DIFFRAX_EXTRAS_OUTPUT=str(output),
        MPLBACKEND="Agg",
    )
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart_runs_and_saves_its_plot(tmp_path):
    out = _run_example("quickstart.py", tmp_path)
    assert "gradient vs RecursiveCheckpointAdjoint" in out
    assert (tmp_path / "quickstart_output" / "fit.png").exists()


def test_reversible_stability_runs_and_saves_its_plot(tmp_path):
    out = _run_example("reversible_stability.py", tmp_path)
    assert "Reversible(Tsit5(), 0.5)" in out
    output = tmp_path / "reversible_stability_output"
    assert (output / "stability_regions.png").exists()
    assert (output / "stiff.md").exists()


def test_wong_zakai_ou_runs_and_saves_its_plot(tmp_path):
    out = _run_example("wong_zakai_ou.py", tmp_path)
    assert "trained as ODE" in out and "trained as SDE" in out
    assert (tmp_path / "wong_zakai_ou_output" / "paths.png").exists()


def test_neural_cde_runs_and_saves_its_plot(tmp_path):
    out = _run_example("neural_cde.py", tmp_path)
    assert "test accuracy" in out and "gradient vs RecursiveCheckpointAdjoint" in out
    assert (tmp_path / "neural_cde_output" / "spirals.png").exists()


def test_sde_gan_runs_both_variants_and_saves_its_plots(tmp_path):
    out = _run_example("sde_gan.py", tmp_path, "--both")
    for row in ("weight clipping + LipSwish", "gradient penalty", "untrained"):
        assert f"| {row}" in out
    assert "gradient penalty / clipping, time per step" in out
    assert (tmp_path / "sde_gan_output" / "paths.png").exists()
    assert (tmp_path / "sde_gan_output" / "loss.png").exists()
