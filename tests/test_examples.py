"""Each example runs end to end in its tiny configuration and writes its plots (the
processes are started early; see `tests/processes.py`)."""

import pytest

from .processes import result as _result


@pytest.mark.script("quickstart")
def test_quickstart_runs_and_saves_its_plot():
    out, folder = _result("quickstart")
    assert "gradient vs RecursiveCheckpointAdjoint" in out
    assert (folder / "quickstart_output" / "fit.png").exists()


@pytest.mark.script("reversible_stability")
def test_reversible_stability_runs_and_saves_its_plot():
    out, folder = _result("reversible_stability")
    assert "Reversible(Tsit5(), 0.5)" in out
    output = folder / "reversible_stability_output"
    assert (output / "stability_regions.png").exists()
    assert (output / "stiff.md").exists()


@pytest.mark.script("wong_zakai_ou")
def test_wong_zakai_ou_runs_and_saves_its_plot():
    out, folder = _result("wong_zakai_ou")
    assert "trained as ODE" in out and "trained as SDE" in out
    assert (folder / "wong_zakai_ou_output" / "paths.png").exists()


@pytest.mark.script("neural_cde")
def test_neural_cde_runs_and_saves_its_plot():
    out, folder = _result("neural_cde")
    assert "test accuracy" in out and "gradient vs RecursiveCheckpointAdjoint" in out
    assert (folder / "neural_cde_output" / "spirals.png").exists()


@pytest.mark.script("sde_gan")
def test_sde_gan_runs_both_variants_and_saves_its_plots():
    out, folder = _result("sde_gan")
    for row in ("weight clipping + LipSwish", "gradient penalty", "untrained"):
        assert f"| {row}" in out
    assert "gradient penalty / clipping, time per step" in out
    assert (folder / "sde_gan_output" / "paths.png").exists()
    assert (folder / "sde_gan_output" / "loss.png").exists()
