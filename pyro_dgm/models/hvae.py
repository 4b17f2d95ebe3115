"""A VAE with two stochastic levels (the HVAE of Tomczak & Welling 2018), built from parts."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as pyro_dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_dgm.models.latents import GaussianLatent, VonMisesFisherLatent
from pyro_dgm.models.likelihoods import PixelCNNLikelihood
from pyro_dgm.models.networks import GatedDense, GatedMLP
from pyro_dgm.models.pixelcnn import PixelCNNDecoder
from pyro_dgm.models.priors import VampPriorModule
from pyro_dgm.models.vae import (
    _as_pyro,
    _data_plate,
    _draw,
    _kl_scaled,
    _likelihood,
    _mean_or_sample,
    _point,
    _PriorPart,
)

__all__ = ["HierarchicalVAE", "TwoStreamNet"]

_INSTANCES = itertools.count()
_TOP_LATENTS = ("normal", "vmf")
_TOP_PRIORS = ("fixed", "vamp")
_DECODERS = ("mlp", "pixelcnn")


class TwoStreamNet(nn.Module):
    """Two inputs, each through a network of its own, joined:
    ``joint(cat(first(a), second(b)))``, the features broadcast against each other first (so
    ``a`` of shape ``(B, D)`` meets ``b`` of shape ``(S, B, m)``). The layout of the HVAE's
    :math:`q(z_1 \\mid x, z_2)` and :math:`p(x \\mid z_1, z_2)` (Tomczak & Welling 2018).

    :param nn.Module first: maps ``a`` to ``(..., F1)``.
    :param nn.Module second: maps ``b`` to ``(..., F2)``.
    :param nn.Module joint: maps ``(..., F1 + F2)`` to the output (features, logits, or a
        distribution when it ends in a latent family).

    Example::

        >>> net = TwoStreamNet(GatedDense(784, 300), GatedDense(40, 300),
        ...                    nn.Sequential(GatedDense(600, 300), GaussianLatent(300, 40)))
        >>> net(torch.rand(5, 784), torch.randn(3, 5, 40)).batch_shape
        torch.Size([3, 5])
    """

    def __init__(self, first: nn.Module, second: nn.Module, joint: nn.Module) -> None:
        super().__init__()
        self.first, self.second, self.joint = first, second, joint

    def forward(self, a: Tensor, b: Tensor):
        left, right = self.first(a), self.second(b)
        shape = torch.broadcast_shapes(left.shape[:-1], right.shape[:-1])
        features = torch.cat([left.expand(*shape, left.shape[-1]),
                              right.expand(*shape, right.shape[-1])], dim=-1)
        return self.joint(features)


def _latent_of(part: nn.Module) -> nn.Module:
    """The module that knows the fixed prior: the part itself or the last of a Sequential."""
    if isinstance(part, nn.Sequential) and not hasattr(part, "fixed_prior"):
        return part[-1]
    return part


class HierarchicalVAE(PyroModule):
    """A VAE with two stochastic levels (Tomczak & Welling 2018, the HVAE of section 3 and
    their PixelHVAE) as a Pyro ``model``/``guide`` pair built from parts:

    .. math::

        q(z_1, z_2 \\mid x) = q(z_2 \\mid x) \\, q(z_1 \\mid x, z_2), \\qquad
        p(x, z_1, z_2) = p(z_2) \\, p(z_1 \\mid z_2) \\, p(x \\mid z_1, z_2).

    Parts (any ``nn.Module`` with these inputs and outputs):

    * ``top_posterior``: ``x`` ``(B, *x_shape)`` to :math:`q(z_2 \\mid x)`, a distribution of
      batch shape ``(B,)`` and event shape ``(m_2,)`` (e.g. an MLP followed by a latent
      family);
    * ``lower_posterior``: ``(x, z_2)`` to :math:`q(z_1 \\mid x, z_2)` (a
      :class:`TwoStreamNet` ending in a latent family);
    * ``lower_prior``: ``z_2`` ``(..., m_2)`` to :math:`p(z_1 \\mid z_2)`;
    * ``decoder``: ``(z_1, z_2)`` to Bernoulli logits shaped like ``x`` or a distribution of
      ``x`` (:class:`~pyro_dgm.models.PixelCNNLikelihood`, the PixelHVAE);
    * ``top_prior``: as :class:`~pyro_dgm.models.VAE`'s ``prior``: ``None`` (the fixed prior
      of ``top_posterior``'s latent family: its ``fixed_prior``, or that of the last module of
      an ``nn.Sequential``), a distribution, a :class:`~pyro_dgm.models.VampPriorModule`
      (:math:`p(z_2) = \\frac1K \\sum_k q(z_2 \\mid u_k)`, the paper's) or a module returning
      a distribution.

    Sample sites ``"z2"``, ``"z1"`` (in this order in both programs) and ``"x"``, all in the
    plate ``"data"``; ``model`` and ``guide`` take the arguments of
    :class:`~pyro_dgm.models.VAE`'s (``indices``, ``num_data``, ``kl_scale``, which scales
    both latent sites). With Gaussian levels (or a vMF top level) and the fixed prior, both
    KLs have closed forms; :math:`\\mathrm{KL}(q(z_1 \\mid x, z_2) \\| p(z_1 \\mid z_2))` is
    a function of the sample :math:`z_2`, and
    :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` keeps the gradient unbiased for a
    rejection-sampled (vMF) :math:`z_2`.

    :meth:`preset` builds the paper's networks.

    :param bool param_store: as for :class:`~pyro_dgm.models.VAE`.
    :raises ValueError: if a part is not an ``nn.Module``, or as
        :class:`~pyro_dgm.models.VAE` for ``top_prior``.

    Reference: J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018,
    arXiv:1705.07120 (and the authors' ``models/HVAE_2level.py`` and
    ``models/PixelHVAE_2level.py``).
    """

    def __init__(self, top_posterior: nn.Module, lower_posterior: nn.Module,
                 lower_prior: nn.Module, decoder: nn.Module, *,
                 top_prior: Distribution | nn.Module | None = None,
                 param_store: bool = True) -> None:
        for name, part in (("top_posterior", top_posterior),
                           ("lower_posterior", lower_posterior),
                           ("lower_prior", lower_prior), ("decoder", decoder)):
            if not isinstance(part, nn.Module):
                raise ValueError(f"{name} must be an nn.Module, got {type(part).__name__}")
        super().__init__()
        self.param_store = param_store
        self.pyro_name = f"HierarchicalVAE{next(_INSTANCES)}"
        self.top_posterior = top_posterior
        self.lower_posterior = lower_posterior
        self.lower_prior = lower_prior
        self.decoder = decoder
        #: the top prior's module (None for a fixed prior)
        self.prior_module = top_prior if isinstance(top_prior, nn.Module) else None
        self._prior = _PriorPart(top_prior, _latent_of(top_posterior))

    @classmethod
    def preset(
        cls,
        input_dim: int = 784,
        latent_dims: Sequence[int] = (40, 40),
        *,
        top_latent: str = "normal",
        prior: str = "vamp",
        hidden_dim: int = 300,
        decoder: str = "mlp",
        image_shape: Sequence[int] = (1, 28, 28),
        pixelcnn_channels: int = 64,
        pixelcnn_layers: int = 8,
        num_pseudo_inputs: int = 500,
        pseudo_input_init: str | Tensor = "normal",
        pseudo_input_data: Tensor | None = None,
        param_store: bool = True,
    ) -> HierarchicalVAE:
        """The HVAE of Tomczak & Welling (2018) with their gated networks
        (:class:`~pyro_dgm.models.GatedDense`, ``hidden_dim`` = 300 units; the layout of the
        authors' ``models/HVAE_2level.py``):

        * :math:`q(z_2 \\mid x)`: two gated layers, then the latent head;
        * :math:`q(z_1 \\mid x, z_2)`: a gated layer for :math:`x`, one for :math:`z_2`, a
          joint gated layer (600 to 300), then the head;
        * :math:`p(z_1 \\mid z_2)`: two gated layers, then the head;
        * :math:`p(x \\mid z_1, z_2)` (``decoder="mlp"``): a gated layer for each code, a
          joint gated layer, then a linear map to the Bernoulli logits; ``"pixelcnn"``: a
          :class:`~pyro_dgm.models.PixelCNNDecoder` (``pixelcnn_layers`` layers of
          ``pixelcnn_channels``) conditioned on :math:`(z_1, z_2)` through two context maps
          (the PixelHVAE).

        ``latent_dims = (d_1, d_2)``; :math:`z_1` is Gaussian, :math:`z_2` Gaussian
        (``top_latent="normal"``) or von Mises-Fisher on :math:`S^{d_2}`
        (``top_latent="vmf"``). ``prior``: ``"vamp"`` (the VampPrior on :math:`z_2`, with
        ``num_pseudo_inputs``, initialised as ``pseudo_input_init`` says) or ``"fixed"``
        (:math:`\\mathcal{N}(0, I)`, or uniform on the sphere). Differences from the authors'
        code: the scales are :math:`\\operatorname{softplus}` of the head's output (theirs a
        clipped log-variance) and PyTorch's default initialisation.

        :raises ValueError: for an unknown ``top_latent``, ``prior`` or ``decoder``, or
            ``image_shape`` not of ``input_dim`` pixels with ``decoder="pixelcnn"``.
        """
        if top_latent not in _TOP_LATENTS:
            raise ValueError(f"top_latent must be one of {_TOP_LATENTS}, got {top_latent!r}")
        if prior not in _TOP_PRIORS:
            raise ValueError(f"prior must be one of {_TOP_PRIORS}, got {prior!r}")
        if decoder not in _DECODERS:
            raise ValueError(f"decoder must be one of {_DECODERS}, got {decoder!r}")
        lower_dim, top_dim = latent_dims
        family = VonMisesFisherLatent if top_latent == "vmf" else GaussianLatent
        top = family(hidden_dim, top_dim)
        top_size, joint = top.event_size, 2 * hidden_dim
        top_posterior = nn.Sequential(GatedMLP(input_dim, (hidden_dim, hidden_dim)), top)
        lower_posterior = TwoStreamNet(
            GatedDense(input_dim, hidden_dim), GatedDense(top_size, hidden_dim),
            nn.Sequential(GatedDense(joint, hidden_dim), GaussianLatent(hidden_dim, lower_dim)))
        lower_prior = nn.Sequential(GatedMLP(top_size, (hidden_dim, hidden_dim)),
                                    GaussianLatent(hidden_dim, lower_dim))
        if decoder == "mlp":
            likelihood = TwoStreamNet(
                GatedDense(lower_dim, hidden_dim), GatedDense(top_size, hidden_dim),
                nn.Sequential(GatedDense(joint, hidden_dim), nn.Linear(hidden_dim, input_dim)))
        else:
            if torch.Size(image_shape).numel() != input_dim:
                raise ValueError(f"image_shape must have input_dim = {input_dim} pixels, got "
                                 f"{tuple(image_shape)}")
            likelihood = PixelCNNLikelihood(
                PixelCNNDecoder(lower_dim + top_size, image_shape, channels=pixelcnn_channels,
                                num_layers=pixelcnn_layers, context_channels=2),
                event_shape=(input_dim,))
        top_prior = None
        if prior == "vamp":
            top_prior = VampPriorModule(num_pseudo_inputs, input_dim, init=pseudo_input_init,
                                        data=pseudo_input_data)
        return cls(top_posterior, lower_posterior, lower_prior, likelihood,
                   top_prior=top_prior, param_store=param_store)

    def prior(self, batch_size: int | None, like: Tensor) -> pyro_dist.TorchDistribution:
        """The top prior :math:`p(z_2)`, batch shape ``(batch_size,)`` (``()`` for ``None``),
        as :meth:`pyro_dgm.models.VAE.prior`."""
        return self._prior(batch_size, like, self.top_posterior)

    def _register(self, *names: str) -> None:
        if self.param_store:
            for name in names:
                module = getattr(self, name)
                if module is not None and any(True for _ in module.parameters()):
                    pyro.module(f"{self.pyro_name}.{name}", module)

    def model(self, x: Tensor, indices: Tensor | None = None, *, num_data: int | None = None,
              kl_scale: float = 1.0) -> None:
        self._register("lower_prior", "decoder", "prior_module")
        with _data_plate(x, indices, num_data):
            with _kl_scaled(kl_scale):
                z2 = pyro.sample("z2", self.prior(x.shape[0], x))
                z1 = pyro.sample("z1", _as_pyro(self.lower_prior(z2)))
            pyro.sample("x", _likelihood(self.decoder(z1, z2), x), obs=x)

    def guide(self, x: Tensor, indices: Tensor | None = None, *, num_data: int | None = None,
              kl_scale: float = 1.0) -> None:
        self._register("top_posterior", "lower_posterior")
        with _data_plate(x, indices, num_data):
            with _kl_scaled(kl_scale):
                z2 = pyro.sample("z2", _as_pyro(self.top_posterior(x)))
                pyro.sample("z1", _as_pyro(self.lower_posterior(x, z2)))

    def _lower_at_top_point(self, x: Tensor) -> Distribution:
        """:math:`q(z_1 \\mid x, \\hat z_2)` at the point :math:`\\hat z_2` (mode) of
        :math:`q(z_2 \\mid x)`."""
        return self.lower_posterior(x, _point(self.top_posterior(x)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder's mean (a draw for PixelCNN) at the posterior modes :math:`\\hat z_2`
        and :math:`\\hat z_1` of :math:`q(z_1 \\mid x, \\hat z_2)`, shape like ``x``."""
        top = _point(self.top_posterior(x))
        lower = _point(self.lower_posterior(x, top))
        return _mean_or_sample(_likelihood(self.decoder(lower, top), x))

    @torch.no_grad()
    def generate(self, num_samples: int, like: Tensor) -> Tensor:
        """The decoder's mean (a draw for PixelCNN) at ``num_samples`` draws
        :math:`z_2 \\sim p(z_2)`, :math:`z_1 \\sim p(z_1 \\mid z_2)`."""
        top = _draw(self.prior(num_samples, like))
        lower = _draw(_as_pyro(self.lower_prior(top)))
        rows = like[:1].expand(num_samples, *like.shape[1:])
        return _mean_or_sample(_likelihood(self.decoder(lower, top), rows))

    def latent_levels(self, like: Tensor) -> list[tuple[str, Callable, Distribution | None]]:
        """The levels for diagnostics (:func:`~pyro_dgm.infer.latent_diagnostics`):
        ``("z2", q(z2 | x), p(z2))`` and ``("z1", q(z1 | x, mode of q(z2 | x)), None)`` (the
        marginal :math:`p(z_1)` has no closed form: no ELBO surgery for that level)."""
        return [("z2", self.top_posterior, self.prior(None, like)),
                ("z1", self._lower_at_top_point, None)]
