"""Distributions for deep generative models, usable as ``pyro.sample`` sites.

``import pyro_dgm.distributions as dist`` also registers their closed-form KL divergences with
:func:`torch.distributions.kl_divergence`.
"""

from pyro_dgm.distributions import kl as _kl  # noqa: F401  (registers the KL divergences)
from pyro_dgm.distributions.hyperspherical_uniform import (
    HypersphericalUniform,
    log_sphere_surface_area,
)
from pyro_dgm.distributions.scoring import (
    ScoredIndependent,
    ScoredMasked,
    score_function_of,
    score_parts_of,
)
from pyro_dgm.distributions.vamp_prior import VampPrior
from pyro_dgm.distributions.von_mises_fisher import VonMisesFisher

__all__ = [
    "HypersphericalUniform",
    "ScoredIndependent",
    "ScoredMasked",
    "VampPrior",
    "VonMisesFisher",
    "log_sphere_surface_area",
    "score_function_of",
    "score_parts_of",
]
