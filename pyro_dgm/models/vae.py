"""A variational auto-encoder composed of parts: an encoder, a latent family with its prior, an
optional posterior flow and a decoder (the likelihood :math:`p(x \\mid z)`)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import torch
from pyro.contrib.zuko import ZukoToPyro
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.transforms import ConditionalPlanar, conditional_affine_autoregressive
from pyro.nn import DenseNN, PyroModule
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_dgm.models.latents import GaussianLatent, VonMisesFisherLatent
from pyro_dgm.models.likelihoods import PixelCNNLikelihood
from pyro_dgm.models.networks import GatedMLP
from pyro_dgm.models.pixelcnn import PixelCNNDecoder
from pyro_dgm.models.priors import FlowPrior, MixtureOfGaussiansPrior, VampPriorModule
from pyro_dgm.transforms import (
    ConditionalHouseholder,
    HouseholderChainNN,
    conditional_householder_sylvester,
    conditional_orthogonal_sylvester,
    conditional_triangular_sylvester,
)

__all__ = ["VAE"]

_LATENTS = ("normal", "vmf")
_PRIORS = {"normal": ("standard", "vamp", "flow", "mog"), "vmf": ("uniform", "vamp")}
_FLOWS = (
    "planar",
    "iaf",
    "householder",
    "orthogonal-sylvester",
    "householder-sylvester",
    "triangular-sylvester",
)
_INSTANCES = itertools.count()


def _kl_scaled(kl_scale: float | Tensor):
    """``poutine.scale(kl_scale)`` for the latent sites; no handler at all for the plain 1.0 (a
    messenger less on the stack of every sample statement)."""
    if isinstance(kl_scale, (int, float)) and kl_scale == 1:
        return contextlib.nullcontext()
    return poutine.scale(scale=kl_scale)


def _data_plate(x: Tensor, indices: Tensor | None, num_data: int | None):
    """The plate ``"data"`` over the batch, subsampling a data set of ``num_data`` points."""
    if num_data is None:
        return pyro.plate("data", x.shape[0], dim=-1)
    if indices is None:
        raise ValueError("indices (the batch's positions in the data set) must be given "
                         "with num_data")
    return pyro.plate("data", num_data, subsample=indices, dim=-1)


def _as_pyro(distribution: Distribution) -> pyro_dist.TorchDistribution:
    """A Pyro distribution as it is; any other ``torch.distributions.Distribution`` (a zuko
    flow's, for instance) wrapped in Pyro's :class:`~pyro.contrib.zuko.ZukoToPyro`."""
    if isinstance(distribution, TorchDistributionMixin):
        return distribution
    if isinstance(distribution, Distribution):
        return ZukoToPyro(distribution)
    raise ValueError(f"a part must return a distribution, got {type(distribution).__name__}")


def _likelihood(output: Tensor | Distribution, like: Tensor) -> pyro_dist.TorchDistribution:
    """The decoder's output as the distribution of an observation shaped like ``like`` (batch
    dim first): Bernoulli logits (a tensor) or a distribution, taken as it is."""
    if torch.is_tensor(output):
        return pyro_dist.Bernoulli(logits=output, validate_args=False).to_event(like.dim() - 1)
    return _as_pyro(output)


def _draw(distribution: Distribution) -> Tensor:
    """One draw, the Pyro way (``fn()``: Pyro's :class:`~pyro.contrib.zuko.ZukoToPyro` has no
    ``sample``)."""
    if isinstance(distribution, TorchDistributionMixin):
        return distribution()
    return distribution.sample()


def _mean_or_sample(distribution: Distribution) -> Tensor:
    """The mean where it has a closed form (Bernoulli means), else one draw (PixelCNN)."""
    try:
        return distribution.mean
    except NotImplementedError:
        return _draw(distribution)


def _point(distribution: Distribution) -> Tensor:
    """A point summary of a posterior: its mode, else its mean, else one draw."""
    for name in ("mode", "mean"):
        try:
            return getattr(distribution, name)
        except (NotImplementedError, AttributeError):
            continue
    return _draw(distribution)


class _PriorPart:
    """The prior of one latent level, however it was given: ``None`` (the latent family's
    ``fixed_prior``, built once per batch size, dtype, device and validation setting), a fixed
    distribution, a :class:`~pyro_dgm.models.VampPriorModule` (called with the level's
    posterior) or any module whose ``forward()`` returns a distribution (a zuko flow's is
    wrapped in :class:`~pyro.contrib.zuko.ZukoToPyro`)."""

    def __init__(self, prior, latent: nn.Module) -> None:
        if prior is not None and not isinstance(prior, (Distribution, nn.Module)):
            raise ValueError(f"prior must be None, a distribution or an nn.Module, got "
                             f"{type(prior).__name__}")
        if prior is None and not hasattr(latent, "fixed_prior"):
            raise ValueError(f"prior must be given: the latent part "
                             f"{type(latent).__name__} has no fixed_prior")
        self.prior, self.latent = prior, latent
        self._cache: dict[tuple, pyro_dist.TorchDistribution] = {}

    def __call__(self, batch_size: int | None, like: Tensor,
                 posterior: Callable[[Tensor], Distribution]) -> pyro_dist.TorchDistribution:
        if isinstance(self.prior, VampPriorModule):
            prior = self.prior(posterior)
        elif isinstance(self.prior, nn.Module):
            prior = _as_pyro(self.prior())
        elif self.prior is not None:
            prior = _as_pyro(self.prior)
        else:
            return self._fixed(batch_size, like)
        return prior if batch_size is None else prior.expand([batch_size])

    def _fixed(self, batch_size: int | None, like: Tensor) -> pyro_dist.TorchDistribution:
        # distributions are immutable: none of this construction in a training step
        validation = torch.distributions.Distribution._validate_args
        key = (batch_size, like.dtype, like.device, validation)
        prior = self._cache.get(key)
        if prior is None:
            prior = self.latent.fixed_prior(like)
            if batch_size is not None:
                prior = prior.expand([batch_size])
            if len(self._cache) >= 16:  # a few shapes in practice; never unbounded
                self._cache.clear()
            self._cache[key] = prior
        return prior


class VAE(PyroModule):
    """A VAE as a Pyro ``model``/``guide`` pair built from parts (Kingma & Welling 2014):

    .. math::

        q(z \\mid x) = \\text{flow}_{h(x)} \\# \\, \\text{latent}(h(x)), \\quad
        h = \\text{encoder}(x), \\qquad p(x, z) = p(z) \\, p(x \\mid z), \\quad
        p(x \\mid z) = \\text{decoder}(z).

    Every combination of parts runs through the same ``model`` and ``guide``; any
    ``nn.Module`` that takes the inputs and returns the outputs below can take a part's place:

    * ``encoder``: data ``(B, *x_shape)`` to features ``(B, F)``;
    * ``latent``: features to :math:`q(z \\mid x)`, a distribution of batch shape ``(B,)``
      and event shape ``(m,)``: a latent family (:class:`~pyro_dgm.models.GaussianLatent`,
      :class:`~pyro_dgm.models.VonMisesFisherLatent`, whose ``fixed_prior`` is the default
      prior), or a conditional zuko flow (``zuko.flows.NSF(m, context=F)``: its distributions
      are wrapped in Pyro's :class:`~pyro.contrib.zuko.ZukoToPyro`);
    * ``decoder``: codes ``(..., m)`` to Bernoulli logits of shape ``(..., *x_shape)``, or to
      a distribution of :math:`x` (:class:`~pyro_dgm.models.PixelCNNLikelihood`);
    * ``prior``: ``None`` (the latent family's fixed prior), a distribution of batch shape
      ``()``, a :class:`~pyro_dgm.models.VampPriorModule` (the VampPrior of the current
      encoder and latent head), or a module whose ``forward()`` returns a distribution
      (:class:`~pyro_dgm.models.MixtureOfGaussiansPrior`,
      :class:`~pyro_dgm.models.FlowPrior`, an unconditional zuko flow, wrapped in
      ``ZukoToPyro``);
    * ``flow``: ``None`` or a sequence of Pyro ``ConditionalTransformModule`` s, each
      conditioned on the features :math:`h(x)`: :math:`q(z \\mid x)` is then the latent
      family's distribution pushed through them (one
      :class:`~pyro.distributions.TransformedDistribution`, whose ``log_prob`` of the guide's
      own sample comes from the transforms' caches). There is no closed-form KL then:
      :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` falls back to the Monte Carlo KL.

    ``model(x, ...)`` and ``guide(x, ...)`` take a batch ``x`` of shape ``(B, *x_shape)`` and
    keyword arguments ``indices`` and ``num_data`` (the batch's positions in a data set of
    ``num_data`` points: the data plate then subsamples and scales log-densities by
    ``num_data / B``) and ``kl_scale`` (the KL warm-up factor :math:`\\beta` multiplying the
    latent site's log-densities). All sample sites lie in the plate ``"data"`` (latent site
    ``"z"``, observation ``"x"``), so :func:`~pyro_dgm.infer.importance_log_likelihood` and
    :func:`~pyro_dgm.infer.elbo_terms` apply directly.

    **Presets.** :meth:`preset` builds the MLP models of the S-VAE, VampPrior and flow papers
    from names (:meth:`svae` and :meth:`nvae` for the first), and a string as the first
    argument (``VAE("vmf", latent_dim=10)``, the constructor of earlier versions) calls it.
    Checkpoints of those versions load: their key ``posterior_head.*`` is read as
    ``latent.head.*``.

    :param encoder: the encoder module.
    :param latent: the latent part (see above).
    :param decoder: the decoder module.
    :param prior: the prior part (see above).
    :param flow: posterior flows conditioned on the encoder's features.
    :param bool param_store: register the parts in Pyro's param store when ``model`` and
        ``guide`` run (``pyro.module``), as ``SVI`` with a ``pyro.optim`` optimizer needs; a
        torch optimizer over ``vae.parameters()`` does not (``param_store=False`` skips it).
    :raises ValueError: for a part of the wrong kind, ``prior=None`` with a latent part
        without ``fixed_prior``, or as :meth:`preset` raises (string form).

    Example::

        >>> vae = VAE(GatedMLP(784, (300, 300)), VonMisesFisherLatent(300, 10),
        ...           GatedMLP(11, (300, 300), output_dim=784),
        ...           prior=VampPriorModule(500, 784))
        >>> x = torch.bernoulli(torch.full((64, 784), 0.3))
        >>> loss = TraceAnalyticKL_ELBO().differentiable_loss(vae.model, vae.guide, x)
    """

    def __init__(
        self,
        encoder: nn.Module | str = "vmf",
        latent: nn.Module | int | None = None,
        decoder: nn.Module | int | None = None,
        *preset_args,
        prior: Distribution | nn.Module | str | None = None,
        flow: Sequence[nn.Module] | str | None = None,
        param_store: bool = True,
        **preset_options,
    ) -> None:
        if isinstance(encoder, str):
            positional = [value for value in (latent, decoder) if value is not None]
            parts = _preset_parts(encoder, *positional, *preset_args, prior=prior, flow=flow,
                                  **preset_options)
            encoder, latent, decoder = parts["encoder"], parts["latent"], parts["decoder"]
            prior, flow = parts["prior"], parts["flow"]
        elif preset_args or preset_options:
            raise ValueError(f"options {sorted(preset_options) or preset_args} are for the "
                             "string presets (VAE.preset); parts are modules")
        for name, part in (("encoder", encoder), ("latent", latent), ("decoder", decoder)):
            if not isinstance(part, nn.Module):
                raise ValueError(f"{name} must be an nn.Module, got {type(part).__name__}")
        if isinstance(flow, str):
            raise ValueError(f"flow={flow!r} is a preset's name: use VAE.preset or pass "
                             "conditional transform modules")
        super().__init__()
        # The param store is global: each VAE gets a name of its own, since two registering
        # under one name would silently share parameters.
        self.param_store = param_store
        self.pyro_name = f"VAE{next(_INSTANCES)}"
        self.encoder = encoder
        self.latent = latent
        self.decoder = decoder
        #: the prior's module (None for a fixed prior)
        self.prior_module = prior if isinstance(prior, nn.Module) else None
        self._prior = _PriorPart(prior, latent)
        #: the amortized posterior flows, each conditioned on h(x); empty without ``flow``
        self.flows = nn.ModuleList(list(flow or []))

    @classmethod
    def preset(cls, latent: str = "vmf", latent_dim: int = 10, input_dim: int = 784,
               hidden_dims: Sequence[int] = (256, 128), *, flow: str | None = None,
               num_flows: int = 16, prior: str | None = None, num_pseudo_inputs: int = 500,
               pseudo_input_init: str | Tensor = "normal",
               pseudo_input_data: Tensor | None = None, num_prior_components: int = 10,
               num_prior_flows: int = 2, param_store: bool = True) -> VAE:
        """The MLP VAEs of the papers, by name: encoder ``input_dim -> hidden_dims`` with ReLU
        (the features :math:`h(x)`, of size ``hidden_dims[-1]``), the decoder its mirror image
        (Pyro's :class:`~pyro.nn.DenseNN`) ending in Bernoulli logits.

        * ``latent``: ``"normal"`` (:class:`~pyro_dgm.models.GaussianLatent`, the N-VAE) or
          ``"vmf"`` (:class:`~pyro_dgm.models.VonMisesFisherLatent`, the S-VAE of Davidson et
          al. 2018); ``latent_dim`` is the manifold dimension :math:`d` in both cases, so the
          S-VAE's samples have :math:`d + 1` coordinates.
        * ``prior``: ``"standard"`` (:math:`\\mathcal{N}(0, I)`) or ``"uniform"`` (on
          :math:`S^d`), the family's fixed prior and the default; ``"vamp"`` (both families,
          :class:`~pyro_dgm.models.VampPriorModule` with ``num_pseudo_inputs``, initialised
          as ``pseudo_input_init`` says from ``pseudo_input_data``; Tomczak & Welling 2018);
          ``"mog"`` (:class:`~pyro_dgm.models.MixtureOfGaussiansPrior` of
          ``num_prior_components``) and ``"flow"`` (:class:`~pyro_dgm.models.FlowPrior` of
          ``num_prior_flows``), Gaussian latents only.
        * ``flow`` (Gaussian latents, not with the VampPrior, whose mixture evaluates the
          posterior at arbitrary points): ``num_flows`` amortized flows conditioned on
          :math:`h(x)`: ``"planar"`` (Pyro's ``ConditionalPlanar``, parameters linear in
          :math:`h`; Rezende & Mohamed 2015), ``"iaf"`` (Pyro's
          ``ConditionalAffineAutoregressive``, one hidden layer of width :math:`5d`; Kingma et
          al. 2016), ``"householder"`` (:class:`~pyro_dgm.transforms.ConditionalHouseholder`,
          ``num_flows`` reflections from the chain
          :class:`~pyro_dgm.transforms.HouseholderChainNN`; Tomczak & Welling 2016),
          ``"orthogonal-sylvester"``, ``"householder-sylvester"``, ``"triangular-sylvester"``
          (one stack of ``num_flows`` Sylvester flows with the class defaults; van den Berg et
          al. 2018).

        :raises ValueError: for an unknown ``latent``, ``flow`` or ``prior`` (or one of the
            other family), a flow with ``latent="vmf"`` or with the VampPrior, or a
            non-positive dimension or ``num_flows``.

        References: D. J. Rezende, S. Mohamed, "Variational Inference with Normalizing
        Flows", ICML 2015; D. P. Kingma et al., "Improved Variational Inference with Inverse
        Autoregressive Flow", NeurIPS 2016; J. M. Tomczak, M. Welling, "Improving Variational
        Auto-Encoders using Householder Flow", arXiv:1611.09630 (2016); R. van den Berg et
        al., "Sylvester Normalizing Flows for Variational Inference", UAI 2018; T. R.
        Davidson et al., "Hyperspherical Variational Auto-Encoders", UAI 2018.
        """
        return cls(latent, latent_dim, input_dim, hidden_dims, flow=flow, num_flows=num_flows,
                   prior=prior, num_pseudo_inputs=num_pseudo_inputs,
                   pseudo_input_init=pseudo_input_init, pseudo_input_data=pseudo_input_data,
                   num_prior_components=num_prior_components, num_prior_flows=num_prior_flows,
                   param_store=param_store)

    @classmethod
    def svae(cls, latent_dim: int = 10, **options) -> VAE:
        """The S-VAE (Davidson et al. 2018): :meth:`preset` with ``latent="vmf"``."""
        return cls.preset("vmf", latent_dim, **options)

    @classmethod
    def nvae(cls, latent_dim: int = 10, **options) -> VAE:
        """The Gaussian VAE (N-VAE): :meth:`preset` with ``latent="normal"``."""
        return cls.preset("normal", latent_dim, **options)

    @classmethod
    def gated(
        cls,
        input_dim: int = 784,
        latent_dim: int = 40,
        *,
        latent: str = "normal",
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
    ) -> VAE:
        """The one-level VAE of the VampPrior paper (Tomczak & Welling 2018) with its gated
        networks, the one-level counterpart of
        :meth:`HierarchicalVAE.preset <pyro_dgm.models.HierarchicalVAE.preset>` with the same
        options: encoder two :class:`~pyro_dgm.models.GatedDense` layers of ``hidden_dim``
        units, the ``latent`` family's head (``"normal"`` or ``"vmf"``); decoder
        (``decoder="mlp"``) two gated layers and a linear map to the Bernoulli logits, or
        (``"pixelcnn"``, the PixelVAE) a :class:`~pyro_dgm.models.PixelCNNDecoder`
        conditioned on :math:`z`; ``prior``: ``"vamp"`` or ``"fixed"`` (the family's).

        :raises ValueError: for an unknown ``latent``, ``prior`` or ``decoder``, or an
            ``image_shape`` not of ``input_dim`` pixels with ``decoder="pixelcnn"``.
        """
        if latent not in _LATENTS:
            raise ValueError(f"latent must be one of {_LATENTS}, got {latent!r}")
        if prior not in ("fixed", "vamp"):
            raise ValueError(f"prior must be 'fixed' or 'vamp', got {prior!r}")
        family = (VonMisesFisherLatent if latent == "vmf" else GaussianLatent)(hidden_dim,
                                                                                latent_dim)
        if decoder == "mlp":
            likelihood = GatedMLP(family.event_size, (hidden_dim, hidden_dim),
                                  output_dim=input_dim)
        elif decoder == "pixelcnn":
            if torch.Size(image_shape).numel() != input_dim:
                raise ValueError(f"image_shape must have input_dim = {input_dim} pixels, got "
                                 f"{tuple(image_shape)}")
            likelihood = PixelCNNLikelihood(
                PixelCNNDecoder(family.event_size, image_shape, channels=pixelcnn_channels,
                                num_layers=pixelcnn_layers), event_shape=(input_dim,))
        else:
            raise ValueError(f"decoder must be 'mlp' or 'pixelcnn', got {decoder!r}")
        vamp = None if prior == "fixed" else VampPriorModule(
            num_pseudo_inputs, input_dim, init=pseudo_input_init, data=pseudo_input_data)
        return cls(GatedMLP(input_dim, (hidden_dim, hidden_dim)), family, likelihood,
                   prior=vamp, param_store=param_store)

    @property
    def event_dim(self) -> int:
        """Number of coordinates of :math:`z` (:math:`d + 1` on the sphere :math:`S^d`)."""
        return self.latent.event_size

    def posterior(self, x: Tensor) -> pyro_dist.TorchDistribution:
        """The variational posterior :math:`q(z \\mid x)`: batch shape ``(B,)``, event shape
        ``(m,)``; with flows, a :class:`~pyro.distributions.TransformedDistribution`."""
        features = self.encoder(x)
        base = _as_pyro(self.latent(features))
        if not self.flows:
            return base
        return pyro_dist.TransformedDistribution(
            base, [flow.condition(features) for flow in self.flows])

    def prior(self, batch_size: int | None, like: Tensor) -> pyro_dist.TorchDistribution:
        """The prior :math:`p(z)`: batch shape ``(batch_size,)``, or ``()`` for
        ``batch_size=None``; event shape ``(m,)``. A fixed prior is built on ``like``'s device
        and dtype, a learned one on its parameters'; the VampPrior runs the encoder on the
        pseudo-inputs (once per call; cached in eval mode)."""
        return self._prior(batch_size, like, self.posterior)

    def decode(self, z: Tensor) -> Tensor | Distribution:
        """The decoder's output at codes ``z`` of shape ``(..., m)``: Bernoulli logits of
        shape ``(..., *x_shape)``, or a distribution."""
        return self.decoder(z)

    def likelihood(self, z: Tensor, like: Tensor) -> pyro_dist.TorchDistribution:
        """:math:`p(x \\mid z)` for observations shaped like ``like`` (batch dim first)."""
        return _likelihood(self.decoder(z), like)

    def _register(self, *names: str) -> None:
        if self.param_store:
            for name in names:
                module = getattr(self, name)
                if module is not None and any(True for _ in module.parameters()):
                    pyro.module(f"{self.pyro_name}.{name}", module)

    def model(self, x: Tensor, indices: Tensor | None = None, *, num_data: int | None = None,
              kl_scale: float = 1.0) -> None:
        self._register("decoder", "prior_module")
        with _data_plate(x, indices, num_data):
            with _kl_scaled(kl_scale):
                z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample("x", self.likelihood(z, x), obs=x)

    def guide(self, x: Tensor, indices: Tensor | None = None, *, num_data: int | None = None,
              kl_scale: float = 1.0) -> None:
        self._register("encoder", "latent", "flows")
        with _data_plate(x, indices, num_data):
            with _kl_scaled(kl_scale):
                pyro.sample("z", self.posterior(x))

    def _posterior_point(self, x: Tensor) -> Tensor:
        """The posterior's mode (mean, or a draw, where it has none); with flows, the flows'
        image of the base distribution's point (not in general the mode of the flow
        posterior, which has no closed form)."""
        q = self.posterior(x)
        if not self.flows:
            return _point(q)
        z = _point(q.base_dist)
        for transform in q.transforms:
            z = transform(z)
        return z

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder's mean at the posterior's point (:meth:`_posterior_point`), shape like
        ``x``: Bernoulli means, or a draw for a likelihood without a closed-form mean
        (PixelCNN)."""
        return _mean_or_sample(self.likelihood(self._posterior_point(x), x))

    @torch.no_grad()
    def generate(self, num_samples: int, like: Tensor) -> Tensor:
        """The decoder's mean (or a draw, see :meth:`reconstruct`) for ``num_samples`` draws
        of the prior; observations shaped like ``like``'s rows."""
        z = _draw(self.prior(num_samples, like))
        return _mean_or_sample(self.likelihood(z, like[:1].expand(num_samples,
                                                                  *like.shape[1:])))

    def latent_levels(self, like: Tensor) -> list[tuple[str, Callable, Distribution | None]]:
        """The latent levels for diagnostics, ``[(site name, posterior, prior)]``: here one,
        ``("z", self.posterior, self.prior(None, like))`` (see
        :func:`~pyro_dgm.infer.latent_diagnostics`)."""
        return [("z", self.posterior, self.prior(None, like))]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints of the string-built VAE kept its head as posterior_head
        for key in [key for key in state_dict if key.startswith(prefix + "posterior_head.")]:
            new = prefix + "latent.head." + key[len(prefix + "posterior_head."):]
            state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _preset_parts(
    latent: str = "vmf",
    latent_dim: int = 10,
    input_dim: int = 784,
    hidden_dims: Sequence[int] = (256, 128),
    *,
    flow: str | None = None,
    num_flows: int = 16,
    prior: str | None = None,
    num_pseudo_inputs: int = 500,
    pseudo_input_init: str | Tensor = "normal",
    pseudo_input_data: Tensor | None = None,
    num_prior_components: int = 10,
    num_prior_flows: int = 2,
) -> dict:
    """The parts of :meth:`VAE.preset`, checked."""
    if latent not in _LATENTS:
        raise ValueError(f"latent must be one of {_LATENTS}, got {latent!r}")
    prior = _PRIORS[latent][0] if prior is None else prior
    if prior not in _PRIORS[latent]:
        raise ValueError(f"prior must be one of {_PRIORS[latent]} for latent={latent!r}, "
                         f"got {prior!r}")
    if prior == "vamp" and flow is not None:
        raise ValueError(f"prior='vamp' needs a posterior without flow (its mixture "
                         f"evaluates q(z | u_k) at every z), got flow={flow!r}")
    if flow is not None:
        if flow not in _FLOWS:
            raise ValueError(f"flow must be None or one of {_FLOWS}, got {flow!r}")
        if latent != "normal":
            raise ValueError(f"flow={flow!r} needs latent='normal' (posterior flows act on "
                             f"R^d), got latent={latent!r}")
        if num_flows < 1:
            raise ValueError(f"num_flows must be positive, got {num_flows}")
    if latent_dim < 1 or input_dim < 1 or not hidden_dims or min(hidden_dims) < 1:
        raise ValueError(
            f"latent_dim, input_dim and hidden_dims must be positive, got {latent_dim}, "
            f"{input_dim}, {tuple(hidden_dims)}"
        )
    layers: list[nn.Module] = []
    for width_in, width_out in zip((input_dim, *hidden_dims[:-1]), hidden_dims, strict=True):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    family = VonMisesFisherLatent if latent == "vmf" else GaussianLatent
    latent_part = family(hidden_dims[-1], latent_dim)
    # An activation module of its own: DenseNN's default nn.ReLU() is one instance shared by
    # every DenseNN (harmless here, but not if a user converts it to a PyroModule).
    decoder = DenseNN(latent_part.event_size, list(reversed(hidden_dims)), [input_dim],
                      nonlinearity=nn.ReLU())
    prior_part = None
    if prior == "vamp":
        prior_part = VampPriorModule(num_pseudo_inputs, input_dim, init=pseudo_input_init,
                                     data=pseudo_input_data)
    elif prior == "mog":
        prior_part = MixtureOfGaussiansPrior(latent_dim, num_prior_components)
    elif prior == "flow":
        prior_part = FlowPrior(latent_dim, num_prior_flows)
    flows = None if flow is None else _make_flows(flow, latent_dim, hidden_dims[-1], num_flows)
    return {"encoder": nn.Sequential(*layers), "latent": latent_part, "decoder": decoder,
            "prior": prior_part, "flow": flows}


class _PlanarHeads(nn.Module):
    """Linear map from the context to the parameters ``(b, u, w)`` of a planar flow."""

    def __init__(self, input_dim: int, context_dim: int) -> None:
        super().__init__()
        self.split_sizes = [1, input_dim, input_dim]
        self.linear = nn.Linear(context_dim, 1 + 2 * input_dim)

    def forward(self, context: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.linear(context).split(self.split_sizes, dim=-1))


def _make_flows(kind: str, dim: int, context_dim: int, num_flows: int) -> list[nn.Module]:
    """The conditional transform modules of a preset's posterior flow (see
    :meth:`VAE.preset`)."""
    if kind == "planar":
        return [ConditionalPlanar(_PlanarHeads(dim, context_dim)) for _ in range(num_flows)]
    if kind == "iaf":
        return [
            conditional_affine_autoregressive(dim, context_dim, hidden_dims=[5 * dim])
            for _ in range(num_flows)
        ]
    if kind == "householder":
        chain = HouseholderChainNN(context_dim, dim, num_flows)
        return [ConditionalHouseholder(dim, chain, count_transforms=num_flows)]
    sylvester = {
        "orthogonal-sylvester": conditional_orthogonal_sylvester,
        "householder-sylvester": conditional_householder_sylvester,
        "triangular-sylvester": conditional_triangular_sylvester,
    }[kind]
    return [sylvester(dim, context_dim, num_flows=num_flows)]  # one module for the stack
