"""Each example runs end to end in its tiny configuration and writes its plots (the
processes are started early; see `tests/processes.py`)."""

from .processes import result as _result


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
