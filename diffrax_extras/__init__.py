import importlib.metadata

from ._adjoint.gauss_legendre import GaussLegendreAdjoint as GaussLegendreAdjoint
from ._adjoint.reversible import ReversibleAdjoint as ReversibleAdjoint
from ._brownian.interval import BrownianInterval as BrownianInterval
from ._gan import clip_weights as clip_weights, lipswish as lipswish
from ._solver.asynchronous_leapfrog import AsynchronousLeapfrog as AsynchronousLeapfrog
from ._solver.base import AbstractReversibleSolver as AbstractReversibleSolver
from ._solver.reversible import Reversible as Reversible
from ._solver.reversible_heun import ReversibleHeun as ReversibleHeun
from ._wong_zakai import KarhunenLoevePath as KarhunenLoevePath, WongZakai as WongZakai


__version__ = importlib.metadata.version("diffrax-extras")
