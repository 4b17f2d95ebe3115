"""A variational auto-encoder for binary images, with Gaussian or hyperspherical latents."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.nn import DenseNN, PyroModule
from torch import Tensor, nn

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher

__all__ = ["VAE"]

_LATENTS = ("normal", "vmf")
_INSTANCES = itertools.count()


class VAE(PyroModule):
    """VAE with a Bernoulli decoder, as a Pyro ``model``/``guide`` pair (Kingma & Welling 2014).

    The latent family is ``"normal"`` (the N-VAE: :math:`q = \\mathcal{N}(\\mu, \\sigma^2)`,
    prior :math:`\\mathcal{N}(0, I)` in :math:`\\mathbb{R}^d`) or ``"vmf"`` (the S-VAE of
    Davidson et al. 2018: :math:`q = \\mathrm{vMF}(\\mu, \\kappa)`, prior uniform on
    :math:`S^d \\subset \\mathbb{R}^{d+1}`, :math:`\\kappa = \\mathrm{softplus}(\\cdot) + 1`).
    ``latent_dim`` is the manifold dimension :math:`d` in both cases, as in the paper's tables,
    so the S-VAE's samples have :math:`d + 1` coordinates.

    Encoder: MLP ``input_dim -> hidden_dims -> heads`` with ReLU; decoder: the mirror image,
    ending in Bernoulli logits (the paper's 784-256-128 by default).

    ``model(x, ...)`` and ``guide(x, ...)`` take a batch ``x`` of shape ``(B, input_dim)`` with
    values in :math:`\\{0, 1\\}`, and keyword arguments:

    * ``indices`` and ``num_data``: the batch's positions in a data set of ``num_data`` points;
      the data plate then subsamples and scales log-densities by ``num_data / B``, so the loss
      is an estimate for the whole data set;
    * ``kl_scale``: the KL warm-up factor :math:`\\beta` multiplying the latent site's log
      densities (:math:`\\log p(z) - \\log q(z)`, or the closed-form KL).

    All sample sites live in the plate named ``"data"`` (the latent site is ``"z"``, the
    observation ``"x"``), so :func:`~pyro_dgm.infer.importance_log_likelihood` and
    :func:`~pyro_dgm.infer.elbo_terms` apply directly.

    :param str latent: ``"normal"`` or ``"vmf"``.
    :param int latent_dim: manifold dimension :math:`d \\ge 1`.
    :param int input_dim: data dimension (784 for MNIST).
    :param hidden_dims: encoder hidden widths; the decoder uses them reversed.
    :raises ValueError: for an unknown ``latent`` or a non-positive dimension.

    Example::

        >>> vae = VAE("vmf", latent_dim=10)
        >>> x = torch.bernoulli(torch.full((64, 784), 0.3))
        >>> loss = TraceAnalyticKL_ELBO().differentiable_loss(vae.model, vae.guide, x)
    """

    def __init__(
        self,
        latent: str = "vmf",
        latent_dim: int = 10,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (256, 128),
    ) -> None:
        if latent not in _LATENTS:
            raise ValueError(f"latent must be one of {_LATENTS}, got {latent!r}")
        if latent_dim < 1 or input_dim < 1 or not hidden_dims or min(hidden_dims) < 1:
            raise ValueError(
                f"latent_dim, input_dim and hidden_dims must be positive, got {latent_dim}, "
                f"{input_dim}, {tuple(hidden_dims)}"
            )
        super().__init__()
        # model and guide register the networks' parameters with Pyro (pyro.module), so that
        # SVI with a pyro.optim optimizer trains them; a torch optimizer over
        # vae.parameters() works too. The param store is global: each VAE gets a name of its
        # own, since two registering under one name would silently share parameters.
        self.pyro_name = f"VAE{next(_INSTANCES)}"
        self.latent = latent
        self.latent_dim = latent_dim
        self.input_dim = input_dim
        #: number of coordinates of z: d + 1 on the sphere S^d, d for the Gaussian
        self.event_dim = latent_dim + 1 if latent == "vmf" else latent_dim
        layers: list[nn.Module] = []
        for width_in, width_out in zip((input_dim, *hidden_dims[:-1]), hidden_dims, strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        #: the encoder's last hidden layer h(x), shared by the posterior heads
        self.encoder = nn.Sequential(*layers)
        second_head = 1 if latent == "vmf" else latent_dim  # concentration or scale
        self.posterior_head = nn.Linear(hidden_dims[-1], self.event_dim + second_head)
        # An activation module of its own: DenseNN's default nn.ReLU() is one instance shared
        # by every DenseNN (harmless here, but not if a user converts it to a PyroModule).
        self.decoder = DenseNN(
            self.event_dim, list(reversed(hidden_dims)), [input_dim], nonlinearity=nn.ReLU()
        )

    def posterior(self, x: Tensor) -> pyro_dist.TorchDistribution:
        """The variational posterior :math:`q(z \\mid x)`: batch shape ``(B,)``, event shape
        ``(event_dim,)``."""
        head = self.posterior_head(self.encoder(x))
        loc, second = head.split([self.event_dim, head.shape[-1] - self.event_dim], -1)
        if self.latent == "vmf":
            return VonMisesFisher(F.normalize(loc, dim=-1), F.softplus(second.squeeze(-1)) + 1)
        return pyro_dist.Normal(loc, F.softplus(second)).to_event(1)

    def prior(self, batch_size: int, like: Tensor) -> pyro_dist.TorchDistribution:
        """The prior :math:`p(z)`, batch shape ``(batch_size,)``, on ``like``'s device/dtype."""
        if self.latent == "vmf":
            return HypersphericalUniform(
                self.event_dim, dtype=like.dtype, device=like.device
            ).expand([batch_size])
        zero = like.new_zeros(())
        return (
            pyro_dist.Normal(zero, 1.0).expand([batch_size, self.event_dim]).to_event(1)
        )

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits of :math:`p(x \\mid z)`, shape ``z.shape[:-1] + (input_dim,)``."""
        return self.decoder(z)

    def _data_plate(self, x: Tensor, indices: Tensor | None, num_data: int | None):
        if num_data is None:
            return pyro.plate("data", x.shape[0], dim=-1)
        if indices is None:
            raise ValueError("indices (the batch's positions in the data set) must be given "
                             "with num_data")
        return pyro.plate("data", num_data, subsample=indices, dim=-1)

    def model(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        *,
        num_data: int | None = None,
        kl_scale: float = 1.0,
    ) -> None:
        pyro.module(f"{self.pyro_name}.decoder", self.decoder)
        with self._data_plate(x, indices, num_data):
            with poutine.scale(scale=kl_scale):
                z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample(
                "x", pyro_dist.Bernoulli(logits=self.decode(z), validate_args=False).to_event(1),
                obs=x,
            )

    def guide(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        *,
        num_data: int | None = None,
        kl_scale: float = 1.0,
    ) -> None:
        pyro.module(f"{self.pyro_name}.encoder", self.encoder)
        pyro.module(f"{self.pyro_name}.posterior_head", self.posterior_head)
        with self._data_plate(x, indices, num_data):
            with poutine.scale(scale=kl_scale):
                pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Bernoulli means of :math:`p(x \\mid z)` at the posterior mode, shape like ``x``."""
        return torch.sigmoid(self.decode(self.posterior(x).mode))

    @torch.no_grad()
    def generate(self, num_samples: int, like: Tensor) -> Tensor:
        """Bernoulli means of :math:`p(x \\mid z)` for ``num_samples`` draws of the prior."""
        return torch.sigmoid(self.decode(self.prior(num_samples, like).sample()))
