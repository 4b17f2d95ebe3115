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

Image flows act on tensors of shape ``(..., C, H, W)`` (``event_dim = 3``), written from data to
latent as in the papers: :class:`ActNorm`, :class:`InvertibleConv1x1` (Glow, Kingma & Dhariwal
2018), :class:`MaskedAffineCoupling2d` with checkerboard and channel-wise masks (with
:class:`ConditionedMaskedAffineCoupling2d` and :class:`ConditionalMaskedAffineCoupling2d`, whose
network also reads a context, as in Flow++'s variational dequantization, Ho et al. 2019),
:class:`Squeeze2d` and :class:`FactorOut` (Real NVP, Dinh et al. 2017), and
:class:`LogitPreprocessing`. Pyro's vector :class:`~pyro.distributions.transforms.AffineCoupling`
keeps its name and meaning.
"""

from .householder import (
    ConditionalHouseholder,
    ConditionedHouseholder,
    Householder,
    HouseholderChainNN,
    conditional_householder,
    householder,
)
from .image_actnorm import ActNorm, act_norm
from .image_conv1x1 import InvertibleConv1x1, invertible_conv1x1
from .image_coupling import (
    ConditionalMaskedAffineCoupling2d,
    ConditionedMaskedAffineCoupling2d,
    MaskedAffineCoupling2d,
    conditional_masked_affine_coupling2d,
    masked_affine_coupling2d,
)
from .image_logit import LogitPreprocessing, logit_preprocessing
from .image_multiscale import FactorOut, Squeeze2d
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
    "ActNorm",
    "ConditionalHouseholder",
    "ConditionalHouseholderSylvester",
    "ConditionalMaskedAffineCoupling2d",
    "ConditionalOrthogonalSylvester",
    "ConditionalTriangularSylvester",
    "ConditionedHouseholder",
    "ConditionedHouseholderSylvester",
    "ConditionedMaskedAffineCoupling2d",
    "ConditionedOrthogonalSylvester",
    "ConditionedTriangularSylvester",
    "FactorOut",
    "Householder",
    "HouseholderChainNN",
    "HouseholderSylvester",
    "InvertibleConv1x1",
    "LogitPreprocessing",
    "MaskedAffineCoupling2d",
    "OrthogonalSylvester",
    "Squeeze2d",
    "TriangularSylvester",
    "act_norm",
    "conditional_householder",
    "conditional_householder_sylvester",
    "conditional_masked_affine_coupling2d",
    "conditional_orthogonal_sylvester",
    "conditional_triangular_sylvester",
    "householder",
    "householder_sylvester",
    "invertible_conv1x1",
    "logit_preprocessing",
    "masked_affine_coupling2d",
    "orthogonal_sylvester",
    "triangular_sylvester",
]
