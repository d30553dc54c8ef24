import os
import pathlib
import subprocess
import sys


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def test_quickstart_runs_and_saves_its_plot(tmp_path):
    plot = EXAMPLES / "quickstart_output" / "fit.png"
    if plot.exists():
        plot.unlink()
    env = dict(os.environ, DIFFRAX_EXTRAS_TINY="1", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "gradient vs RecursiveCheckpointAdjoint" in result.stdout
    assert plot.exists()
