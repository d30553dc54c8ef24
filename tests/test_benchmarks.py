"""The benchmark runner (`python -m benchmarks`) in its tiny mode writes the report,
its JSON and the charts, with every comparison that issue #8 asks for. The numbers
of a tiny run mean little; that they are present and finite is what is checked."""

import ast
import importlib.util
import json
import math

import pytest

from .processes import result, ROOT


# What each comparison must show: a row naming ours and the diffrax alternative.
# The neural SDE step's full table has all of these; its tiny run compiles the
# baseline and the headline's rows only (`TINY_CONFIGS`).
SDE_STEP_ROWS = [
    "Midpoint + VirtualBrownianTree + RecursiveCheckpoint",
    "Heun + VirtualBrownianTree + RecursiveCheckpoint",
    "ReversibleHeun + VirtualBrownianTree + RecursiveCheckpoint",
    "Midpoint + BrownianInterval + RecursiveCheckpoint",
    "ReversibleHeun + BrownianInterval + RecursiveCheckpoint",
    "ReversibleHeun + VirtualBrownianTree + ReversibleAdjoint",
    "ReversibleHeun + BrownianInterval + ReversibleAdjoint",
]
SDE_STEP_TINY_ROWS = [
    "Midpoint + VirtualBrownianTree + RecursiveCheckpoint",
    "ReversibleHeun + VirtualBrownianTree + RecursiveCheckpoint",
    "Midpoint + BrownianInterval + RecursiveCheckpoint",
    "ReversibleHeun + BrownianInterval + ReversibleAdjoint",
]
SECTION_ROWS = {
    "Neural SDE training step": SDE_STEP_TINY_ROWS,
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
    "Reconstruction check": ["| default |", "| previous |"],
    "SDE-GAN generator": ["| float32 |"],
}
# The papers' headline figures, each of which must sit beside our measurement.
PAPER_FIGURES = ["1.98x", "10.6x", "1.87x"]


@pytest.mark.script("benchmarks_tiny")
def test_runner_writes_every_row():
    _, folder = result("benchmarks_tiny")
    report = (folder / "results_tiny.md").read_text()
    data = json.loads((folder / "results_tiny.json").read_text())

    for key in ("cpu", "cores", "gpu", "jax", "jaxlib", "diffrax", "date"):
        assert key in data["machine"]
    # `peers` needs torch, which the test environment need not have.
    peers = {"peers"} if importlib.util.find_spec("torch") is not None else set()
    assert (
        set(data["sections"])
        == {
            "sde_step",
            "brownian",
            "reversible_adjoint",
            "gauss_legendre_adjoint",
            "sde_gan_step",
            "gradient_error",
            "reconstruction_check",
            "sde_gan_gradients",
        }
        | peers
    )

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


def _assigned(tree: ast.Module, name: str) -> ast.expr:
    """The value assigned to the module-level `name`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node.value
    raise AssertionError(f"no {name} in the module")


def _key(node: ast.expr, tree: ast.Module):
    """A literal, or a module-level name bound to one."""
    if isinstance(node, ast.Name):
        return ast.literal_eval(_assigned(tree, node.id))
    return ast.literal_eval(node)


def _dict_keys(tree: ast.Module, name: str) -> dict[str, ast.expr]:
    """The entries of the module-level dict literal assigned to `name`."""
    value = _assigned(tree, name)
    assert isinstance(value, ast.Dict)
    return {
        _key(k, tree): v
        for k, v in zip(value.keys, value.values, strict=True)
        if k is not None
    }


def test_sde_step_compares_every_configuration():
    tree = ast.parse((ROOT / "benchmarks" / "sde_step.py").read_text())
    assert list(_dict_keys(tree, "CONFIGS")) == SDE_STEP_ROWS
    tiny = _assigned(tree, "TINY_CONFIGS")
    assert isinstance(tiny, ast.Tuple)
    assert [_key(e, tree) for e in tiny.elts] == SDE_STEP_TINY_ROWS
    # The committed full table, from the current script's configurations.
    data = json.loads((ROOT / "benchmarks" / "results" / "sde_step.json").read_text())
    assert [r["configuration"] for r in data["rows"]] == SDE_STEP_ROWS


def test_device_mode_has_sizes_in_every_section():
    """`python -m benchmarks --device` runs the reversible adjoint, the neural SDE
    step, the Brownian paths and the Gauss–Legendre adjoint, each at its script's
    `device` sizes; the reversible adjoint spans N = 1,000 to 100,000."""
    benchmarks = ROOT / "benchmarks"
    runner = ast.parse((benchmarks / "run.py").read_text())
    sections = set(_dict_keys(runner, "DEVICE_SECTIONS"))
    assert sections == {
        "sde_step",
        "brownian",
        "gauss_legendre_adjoint",
        "reversible_adjoint",
    }
    tables = {"gauss_legendre_adjoint": "CASES"}
    for name in sections:
        tree = ast.parse((benchmarks / f"{name}.py").read_text())
        entries = _dict_keys(tree, tables.get(name, "SIZES"))
        assert "device" in entries, name
    tree = ast.parse((benchmarks / "reversible_adjoint.py").read_text())
    grid = ast.literal_eval(_dict_keys(tree, "SIZES")["device"])[0]
    assert min(grid) == 1000 and max(grid) == 100_000


@pytest.mark.script("benchmarks_device_tiny")
def test_device_tiny_form_writes_its_report():
    """The tiny form of the GPU run (`--device --mode tiny`), here on the reversible
    adjoint alone (the runner's tiny run above has the other sections' tiny sizes),
    writes `results_gpu_tiny.{md,json}` naming the device, with the reversible
    adjoint's time and memory against `RecursiveCheckpointAdjoint` for the one group
    its device arguments select, and names the sections it left out."""
    _, folder = result("benchmarks_device_tiny")
    report = (folder / "results_gpu_tiny.md").read_text()
    data = json.loads((folder / "results_gpu_tiny.json").read_text())
    assert f"Device: {data['device']}." in report
    assert data["machine"]["device"] == data["device"]
    assert set(data["sections"]) == {"reversible_adjoint"}
    assert data["left_out"] == ["sde_step", "brownian", "gauss_legendre_adjoint"]
    for name in data["left_out"]:
        assert f"`{name}`" in report

    rows = data["sections"]["reversible_adjoint"]["rows"]
    assert {r["group"] for r in rows} == {"ReversibleHeun"}
    assert {r["adjoint"] for r in rows} == {
        "ReversibleAdjoint",
        "RecursiveCheckpointAdjoint",
        "store-every-step",
    }
    for r in rows:
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert r["temp_bytes"] > 0, r
    section = report.split("## Reversible adjoint")[1].split("\n## ")[0]
    assert "ReversibleHeun: ReversibleAdjoint" in section
    assert "ReversibleHeun: RecursiveCheckpointAdjoint" in section
    for row in data["headline"]:
        assert math.isfinite(row["measured"]) and row["measured"] >= 0, row
    assert (folder / "results" / "charts" / "headline_tiny.png").stat().st_size > 1000
