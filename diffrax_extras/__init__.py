import importlib.metadata

from ._adjoint.reversible import ReversibleAdjoint as ReversibleAdjoint
from ._brownian.interval import BrownianInterval as BrownianInterval
from ._solver.asynchronous_leapfrog import AsynchronousLeapfrog as AsynchronousLeapfrog
from ._solver.base import AbstractReversibleSolver as AbstractReversibleSolver
from ._solver.reversible import Reversible as Reversible
from ._solver.reversible_heun import ReversibleHeun as ReversibleHeun


__version__ = importlib.metadata.version("diffrax-extras")
