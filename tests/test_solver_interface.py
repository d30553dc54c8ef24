"""`Reversible(solver)` answers everything diffrax may ask of `solver`.

diffrax reads a solver's attributes from `diffeqsolve`, its adjoints and its Brownian
paths (`term_structure`, `interpolation_cls`, `minimal_levy_area` of SRK methods,
`scan_kind` for forward-mode autodiff, `root_finder` of implicit solvers, ...), and
forwards `isinstance` checks through wrapped solvers to decide which of them to read.
This walks every solver diffrax exports, so that an attribute missing from the wrapper
cannot recur.
"""

import inspect

import diffrax as dfx
import pytest

import diffrax_extras as dxe


def _diffrax_solvers():
    out = []
    for name in sorted(dir(dfx)):
        cls = getattr(dfx, name)
        if not (inspect.isclass(cls) and issubclass(cls, dfx.AbstractSolver)):
            continue
        if name.startswith("Abstract") or issubclass(cls, dfx.AbstractWrappedSolver):
            continue  # abstract, or a wrapper around another solver
        try:
            solver = cls()
        except TypeError:
            try:  # the Langevin solvers' Taylor threshold
                solver = cls(100.0)  # pyright: ignore[reportCallIssue]
            except TypeError:
                continue
        out.append(solver)
    return out


def _wrappable():
    out = []
    for solver in _diffrax_solvers():
        try:
            out.append((solver, dxe.Reversible(solver)))
        except ValueError:
            # Refused with an error of its own (tests/test_errors.py): solvers that
            # are reversible already or carry state between steps.
            pass
    return out


CASES = _wrappable()
# Every kind of solver that diffrax tells apart with `isinstance`.
KINDS = [
    dfx.AbstractImplicitSolver,
    dfx.AbstractItoSolver,
    dfx.AbstractStratonovichSolver,
    dfx.AbstractAdaptiveSolver,
    dfx.AbstractRungeKutta,
    dfx.AbstractSRK,
]


def test_every_explicit_and_implicit_single_step_solver_is_covered():
    names = {type(s).__name__ for s, _ in CASES}
    expected = {"Euler", "Tsit5", "Dopri8", "Kvaerno5", "SPaRK", "ShARK", "QUICSORT"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("base, wrapped", CASES, ids=lambda x: type(x).__name__)
def test_reversible_answers_what_diffrax_reads(base, wrapped):
    for name in dir(type(base)):
        if name.startswith("_"):
            continue
        assert hasattr(wrapped, name), name
        value = getattr(base, name)
        if callable(value) or name == "interpolation_cls":
            # Methods (of the wrapper, with its own meaning) and the interpolation,
            # which the wrapper shifts onto its `y`.
            continue
        assert getattr(wrapped, name) == value, name
    for kind in KINDS:
        if isinstance(base, kind):
            assert isinstance(wrapped, kind), kind.__name__
    for method in ("order", "strong_order", "error_order"):
        terms = dfx.ODETerm(lambda t, y, args: y)
        try:
            expected = getattr(base, method)(terms)
        except Exception as error:
            expected = type(error)
        try:
            got = getattr(wrapped, method)(terms)
        except Exception as error:
            got = type(error)
        assert got == expected, method
