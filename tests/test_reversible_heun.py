import diffrax as dfx
import jax.tree_util as jtu
import numpy as np

import diffrax_extras as dxe

from .helpers import (
    make_problem,
)


SOLVER = dxe.ReversibleHeun()


def test_same_numbers_as_diffrax_without_jumps():
    params, build = make_problem("sde")
    terms, y0, args = build(params)

    def solve(solver):
        return dfx.diffeqsolve(
            terms, solver, 0.0, 1.0, 0.01, y0, args=args, saveat=dfx.SaveAt(steps=True)
        ).ys

    ours, theirs = solve(SOLVER), solve(dfx.ReversibleHeun())
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_pytree_state_and_solver_state_structure():
    params, build = make_problem("ode")
    terms, y0, args = build(params)
    yhat, vf = SOLVER.init(terms, 0.0, 0.1, y0, args)
    assert jtu.tree_structure(yhat) == jtu.tree_structure(y0)
    assert jtu.tree_structure(vf) == jtu.tree_structure(y0)
