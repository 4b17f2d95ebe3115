"""Normalizing flows: Sylvester flows (orthogonal, Householder, triangular) and Householder flows.

Each flow comes as a Pyro :class:`~pyro.distributions.TransformModule` with global parameters,
as a :class:`~pyro.distributions.ConditionalTransformModule` whose parameters are computed from
a context (amortized, as in the papers), and as a lower-case helper constructor.
"""

from .householder import (
    ConditionalHouseholder,
    ConditionedHouseholder,
    Householder,
    conditional_householder,
    householder,
)
from .sylvester import (
    ConditionalSylvester,
    ConditionedSylvester,
    Sylvester,
    conditional_sylvester,
    sylvester,
)

__all__ = [
    "ConditionalHouseholder",
    "ConditionalSylvester",
    "ConditionedHouseholder",
    "ConditionedSylvester",
    "Householder",
    "Sylvester",
    "conditional_householder",
    "conditional_sylvester",
    "householder",
    "sylvester",
]
