"""Normalizing flows: the Householder flow and Sylvester flows (orthogonal, Householder,
triangular).

Each flow comes, as in Pyro, as a :class:`~pyro.distributions.TransformModule` with global
parameters (``X``), as a :class:`~torch.distributions.transforms.Transform` with given (e.g.
per-data-point) parameters (``ConditionedX``), as a
:class:`~pyro.distributions.ConditionalTransformModule` whose parameters a network computes
from a context (``ConditionalX``, amortized, as in the papers), and as lower-case helpers
``x(input_dim, ...)`` and ``conditional_x(input_dim, context_dim, hidden_dims=None, ...)``.

The Householder family (:class:`Householder`, :class:`ConditionedHouseholder`,
:class:`ConditionalHouseholder`, :func:`householder`, :func:`conditional_householder`) is a
drop-in for Pyro's: the same arguments in the same order, the same defaults and the same map,
computed faster. In it, as in Pyro, ``count_transforms`` is the number of reflections of one
transform. The Sylvester flows are named after the paper (van den Berg et al. 2018):
:class:`OrthogonalSylvester`, :class:`HouseholderSylvester` and :class:`TriangularSylvester`;
each module is a stack of ``num_flows`` flows. Pyro's own
:class:`~pyro.distributions.transforms.Sylvester` is a different transform, under another
name.
"""

from .householder import (
    ConditionalHouseholder,
    ConditionedHouseholder,
    Householder,
    HouseholderChainNN,
    conditional_householder,
    householder,
)
from .sylvester import (
    ConditionalHouseholderSylvester,
    ConditionalOrthogonalSylvester,
    ConditionalTriangularSylvester,
    ConditionedHouseholderSylvester,
    ConditionedOrthogonalSylvester,
    ConditionedTriangularSylvester,
    HouseholderSylvester,
    OrthogonalSylvester,
    TriangularSylvester,
    conditional_householder_sylvester,
    conditional_orthogonal_sylvester,
    conditional_triangular_sylvester,
    householder_sylvester,
    orthogonal_sylvester,
    triangular_sylvester,
)

__all__ = [
    "ConditionalHouseholder",
    "ConditionalHouseholderSylvester",
    "ConditionalOrthogonalSylvester",
    "ConditionalTriangularSylvester",
    "ConditionedHouseholder",
    "ConditionedHouseholderSylvester",
    "ConditionedOrthogonalSylvester",
    "ConditionedTriangularSylvester",
    "Householder",
    "HouseholderChainNN",
    "HouseholderSylvester",
    "OrthogonalSylvester",
    "TriangularSylvester",
    "conditional_householder",
    "conditional_householder_sylvester",
    "conditional_orthogonal_sylvester",
    "conditional_triangular_sylvester",
    "householder",
    "householder_sylvester",
    "orthogonal_sylvester",
    "triangular_sylvester",
]
