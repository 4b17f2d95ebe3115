"""Latent families of a VAE: a head that maps features to a distribution of the latent code,
together with the family's fixed prior.

A latent family is an ``nn.Module`` whose ``forward(features)`` returns a distribution of batch
shape ``features.shape[:-1]`` and event shape ``(event_size,)``. The same module serves as a
variational posterior head (features of :math:`x`) and as the head of a conditional prior
(features of an upper latent level, as :math:`p(z_1 \\mid z_2)` of a hierarchical VAE).
``fixed_prior(like)`` returns the family's parameter-free prior on ``like``'s device and dtype,
with batch shape ``()``.
"""

from __future__ import annotations

import pyro.distributions as pyro_dist
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher

__all__ = ["GaussianLatent", "VonMisesFisherLatent"]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class GaussianLatent(nn.Module):
    """Diagonal Gaussian codes in :math:`\\mathbb{R}^d`: a linear head maps features :math:`h`
    to :math:`\\mathcal{N}(\\mu(h), \\operatorname{diag} \\sigma(h)^2)` with
    :math:`\\sigma = \\operatorname{softplus}(\\cdot)`; the fixed prior is
    :math:`\\mathcal{N}(0, I)` (Kingma & Welling 2014).

    :param int input_dim: size of the features' last dimension.
    :param int latent_dim: :math:`d`.
    :raises ValueError: if a size is not a positive int.

    ``forward(features)`` maps shape ``(..., input_dim)`` to a
    :class:`~pyro.distributions.Normal` ``.to_event(1)`` of batch shape ``(...)`` and event
    shape ``(d,)``. Attributes: ``latent_dim`` :math:`= d`, ``event_size`` :math:`= d`
    (coordinates of a sample), ``head`` (the ``nn.Linear`` to :math:`2d` outputs: means, then
    raw scales).

    Example::

        >>> latent = GaussianLatent(300, 40)
        >>> latent(torch.randn(5, 300)).event_shape
        torch.Size([40])
    """

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = _positive_int(latent_dim, "latent_dim")
        self.event_size = latent_dim
        self.head = nn.Linear(_positive_int(input_dim, "input_dim"), 2 * latent_dim)

    def forward(self, features: Tensor) -> pyro_dist.TorchDistribution:
        loc, raw_scale = self.head(features).split(self.latent_dim, dim=-1)
        return pyro_dist.Normal(loc, F.softplus(raw_scale)).to_event(1)

    def fixed_prior(self, like: Tensor) -> pyro_dist.TorchDistribution:
        """:math:`\\mathcal{N}(0, I_d)`, batch shape ``()``, on ``like``'s device and dtype."""
        return pyro_dist.Normal(like.new_zeros(()), like.new_ones(())).expand(
            [self.event_size]).to_event(1)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


class VonMisesFisherLatent(nn.Module):
    """Hyperspherical codes on :math:`S^d \\subset \\mathbb{R}^{d+1}` (the S-VAE of Davidson et
    al. 2018): a linear head maps features to :math:`\\mathrm{vMF}(\\mu, \\kappa)` with
    :math:`\\mu` the normalised first :math:`d + 1` outputs and :math:`\\kappa =
    \\operatorname{softplus}(\\cdot) + 1`; the fixed prior is the uniform distribution on
    :math:`S^d`.

    :param int input_dim: size of the features' last dimension.
    :param int latent_dim: the manifold dimension :math:`d` (samples have :math:`d + 1`
        coordinates, ``event_size``).
    :raises ValueError: if a size is not a positive int.

    ``forward(features)`` maps shape ``(..., input_dim)`` to a
    :class:`~pyro_dgm.distributions.VonMisesFisher` of batch shape ``(...)`` and event shape
    ``(d + 1,)``.

    Example::

        >>> latent = VonMisesFisherLatent(300, 10)
        >>> latent(torch.randn(5, 300)).event_shape
        torch.Size([11])
    """

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = _positive_int(latent_dim, "latent_dim")
        self.event_size = latent_dim + 1
        self.head = nn.Linear(_positive_int(input_dim, "input_dim"), latent_dim + 2)

    def forward(self, features: Tensor) -> VonMisesFisher:
        loc, raw_concentration = self.head(features).split([self.event_size, 1], dim=-1)
        return VonMisesFisher(F.normalize(loc, dim=-1),
                              F.softplus(raw_concentration.squeeze(-1)) + 1)

    def fixed_prior(self, like: Tensor) -> HypersphericalUniform:
        """The uniform distribution on :math:`S^d`, batch shape ``()``, on ``like``'s device
        and dtype."""
        return HypersphericalUniform(self.event_size, dtype=like.dtype, device=like.device)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"
