"""The benchmark runner (`python -m benchmarks`) in its tiny mode writes the report,
its JSON and the charts, with every comparison that issue #8 asks for. The numbers
of a tiny run mean little; that they are present and finite is what is checked."""

import json
import math

from .processes import result


# What each comparison must show: a row naming ours and the diffrax alternative.
SDE_STEP_ROWS = [
    "Midpoint + VirtualBrownianTree + RecursiveCheckpoint",
    "Heun + VirtualBrownianTree + RecursiveCheckpoint",
    "ReversibleHeun + VirtualBrownianTree + RecursiveCheckpoint",
    "Midpoint + BrownianInterval + RecursiveCheckpoint",
    "ReversibleHeun + BrownianInterval + RecursiveCheckpoint",
    "ReversibleHeun + VirtualBrownianTree + ReversibleAdjoint",
    "ReversibleHeun + BrownianInterval + ReversibleAdjoint",
]
SECTION_ROWS = {
    "Neural SDE training step": SDE_STEP_ROWS,
    "Brownian motion": ["BrownianIncrement | diffeqsolve | on"],
    "Reversible adjoint": [
        "ReversibleHeun: ReversibleAdjoint",
        "ReversibleHeun: RecursiveCheckpointAdjoint",
        "ReversibleHeun: store-every-step",
        "Tsit5: Reversible(Tsit5) + ReversibleAdjoint",
        "Tsit5: Tsit5 + RecursiveCheckpointAdjoint",
    ],
    "Gauss–Legendre quadrature adjoint": [
        "GaussLegendreAdjoint()",
        "BacksolveAdjoint",
        "RecursiveCheckpointAdjoint",
    ],
    "SDE-GAN step": ["weight clipping + LipSwish", "gradient penalty"],
    "Gradient error": ["ReversibleAdjoint", "BacksolveAdjoint", "GaussLegendreAdjoint"],
}
# The papers' headline figures, each of which must sit beside our measurement.
PAPER_FIGURES = ["1.98x", "10.6x", "1.87x"]


def test_runner_writes_every_row():
    _, folder = result("test_runner_writes_every_row")
    report = (folder / "results_tiny.md").read_text()
    data = json.loads((folder / "results_tiny.json").read_text())

    for key in ("cpu", "cores", "gpu", "jax", "jaxlib", "diffrax", "date"):
        assert key in data["machine"]
    assert set(data["sections"]) == {
        "sde_step",
        "brownian",
        "reversible_adjoint",
        "gauss_legendre_adjoint",
        "sde_gan_step",
        "gradient_error",
    }

    headline = report.split("## Headline")[1].split("\n## ")[0]
    for figure in PAPER_FIGURES:
        assert figure in headline
    comparisons = [r["comparison"] for r in data["headline"]]
    for needed in (
        "full stack",
        "solver alone",
        "Brownian path alone",
        "gradient memory",
        "neural ODE gradient",
        "SDE-GAN training step",
        "gradient error",
    ):
        assert any(needed in c for c in comparisons), needed
    for row in data["headline"]:
        assert math.isfinite(row["measured"]) and row["measured"] >= 0, row
        assert row["comparison"] in headline

    for title, rows in SECTION_ROWS.items():
        section = report.split(f"## {title}")[1].split("\n## ")[0]
        for row in rows:
            assert row in section, (title, row)
        chart = section.split("](results/charts/")[1].split(")")[0]
        assert (folder / "results" / "charts" / chart).stat().st_size > 1000
    assert (folder / "results" / "charts" / "headline_tiny.png").stat().st_size > 1000
