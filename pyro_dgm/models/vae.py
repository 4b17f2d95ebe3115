"""A variational auto-encoder for binary images, with Gaussian or hyperspherical latents."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ConditionalPlanar, conditional_affine_autoregressive
from pyro.nn import DenseNN, PyroModule
from torch import Tensor, nn

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher
from pyro_dgm.infer import active_units, elbo_surgery
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
    """``poutine.scale(kl_scale)`` for the latent site; no handler at all for the plain 1.0 (a
    messenger less on the stack of every sample statement)."""
    if isinstance(kl_scale, (int, float)) and kl_scale == 1:
        return contextlib.nullcontext()
    return poutine.scale(scale=kl_scale)


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

    Posterior flows (Gaussian latents only). With ``flow`` set, :math:`q(z \\mid x)` is the
    Gaussian :math:`q_0 = \\mathcal{N}(\\mu(x), \\sigma^2(x))` pushed through ``num_flows``
    normalizing flows :math:`z_K = f_K \\circ \\cdots \\circ f_1(z_0)` whose parameters are
    amortized: computed from the encoder's last hidden layer :math:`h(x)` (the context, of
    dimension ``hidden_dims[-1]``), as in the papers below. :meth:`posterior` returns this as one
    :class:`~pyro.distributions.TransformedDistribution`, so the guide keeps its single site
    ``"z"``; its ``log_prob`` of the guide's own sample,
    :math:`\\log q_0(z_0) - \\sum_k \\log \\lvert \\det \\partial f_k / \\partial z_{k-1}
    \\rvert`, comes from the transforms' caches (no inverse is computed; the planar flow has
    none). There is no closed-form KL then:
    :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` falls back to the Monte Carlo KL, and
    :func:`~pyro_dgm.infer.importance_log_likelihood` applies unchanged. The kinds:

    * ``"planar"``: Pyro's :class:`~pyro.distributions.transforms.ConditionalPlanar`, its
      parameters a linear function of :math:`h(x)` (Rezende & Mohamed 2015);
    * ``"iaf"``: Pyro's :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`
      (inverse autoregressive flow, Kingma et al. 2016), each a
      :class:`~pyro.nn.ConditionalAutoRegressiveNN` with one hidden layer of width
      :math:`5d` (320 for :math:`d = 64`) and a random variable order of its own;
    * ``"householder"``: the Householder flow of Tomczak & Welling (2016),
      :class:`~pyro_dgm.transforms.ConditionalHouseholder` with ``num_flows`` reflections whose
      vectors form the paper's chain started from :math:`h(x)`
      (:class:`~pyro_dgm.transforms.HouseholderChainNN`);
    * ``"orthogonal-sylvester"``, ``"householder-sylvester"``, ``"triangular-sylvester"``: the
      Sylvester flows of van den Berg et al. (2018), one stack of ``num_flows`` flows whose
      parameters are a linear function of :math:`h(x)`
      (:class:`~pyro_dgm.transforms.ConditionalOrthogonalSylvester`,
      :class:`~pyro_dgm.transforms.ConditionalHouseholderSylvester`,
      :class:`~pyro_dgm.transforms.ConditionalTriangularSylvester`) with the class defaults
      (orthogonal: bottleneck :math:`M = \\min(32, d)`; householder: 8 reflections per flow;
      triangular: :math:`Q` alternating between the identity and the reversal permutation
      along the stack).

    Priors (``prior``). Besides the fixed ones (``"standard"``: :math:`\\mathcal{N}(0, I)`;
    ``"uniform"``: uniform on :math:`S^d`), learned priors, whose parameters train with the rest
    (the optimal prior is the aggregate posterior, Hoffman & Johnson 2016):

    * ``"vamp"`` (both families): the VampPrior of Tomczak & Welling (2018),
      :math:`p(z) = \\frac1K \\sum_k q(z \\mid u_k)` over ``num_pseudo_inputs`` learned
      pseudo-inputs :math:`u_k \\in [0, 1]^D` (:class:`~pyro_dgm.models.VampPriorModule`,
      initialised as ``pseudo_input_init`` says), built from the current encoder once per
      ``model`` call, so the gradient reaches pseudo-inputs and encoder; for the S-VAE a
      mixture of vMFs on the sphere;
    * ``"mog"``: a mixture of ``num_prior_components`` Gaussians with learned weights, means
      and diagonal scales (:class:`~pyro_dgm.models.MixtureOfGaussiansPrior`);
    * ``"flow"``: :math:`\\mathcal{N}(0, I)` pushed through ``num_prior_flows`` affine
      autoregressive flows, density evaluated in one pass per flow (MAF;
      :class:`~pyro_dgm.models.FlowPrior`).

    A learned prior has no closed-form KL: :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` then
    uses the Monte Carlo KL, :math:`\\log q(z \\mid x) - \\log p(z)` at the posterior
    sample, and :class:`~pyro_dgm.infer.ImportanceWeightedELBO` and
    :func:`~pyro_dgm.infer.importance_log_likelihood` need nothing else.

    :param str latent: ``"normal"`` or ``"vmf"``.
    :param int latent_dim: manifold dimension :math:`d \\ge 1`.
    :param int input_dim: data dimension (784 for MNIST).
    :param hidden_dims: encoder hidden widths; the decoder uses them reversed.
    :param flow: ``None`` (default: the plain Gaussian or vMF posterior) or one of the flow
        kinds above; Gaussian latents only.
    :type flow: str or None
    :param int num_flows: number of flows in the stack (of reflections for ``"householder"``).
    :param prior: ``"standard"``, ``"vamp"``, ``"flow"`` or ``"mog"`` for Gaussian latents,
        ``"uniform"`` or ``"vamp"`` for vMF latents; ``None``: the family's fixed prior.
    :type prior: str or None
    :param int num_pseudo_inputs: :math:`K` for ``prior="vamp"`` (500 in the paper).
    :param pseudo_input_init: ``"normal"`` (:math:`\\mathcal{N}(0.05, 0.01^2)`, the paper's),
        ``"data"`` (random rows of ``pseudo_input_data``) or a tensor of initial values.
    :param pseudo_input_data: training data for ``pseudo_input_init="data"``.
    :param int num_prior_components: mixture components for ``prior="mog"``.
    :param int num_prior_flows: autoregressive flows for ``prior="flow"``.
    :param bool param_store: register the networks' parameters in Pyro's param store when
        ``model`` and ``guide`` run (``pyro.module``), as ``SVI`` with a ``pyro.optim`` optimizer
        needs. A torch optimizer over ``vae.parameters()`` (as in
        :func:`~pyro_dgm.experiments.train_epoch`) does not: ``param_store=False`` skips the
        registration, about a dozen ``pyro.param`` sites per step.
    :raises ValueError: for an unknown ``latent``, ``flow`` or ``prior`` (or one of the other
        family), a flow with ``latent="vmf"`` or with the VampPrior (whose mixture evaluates the
        posterior at arbitrary points), or a non-positive dimension or ``num_flows``.

    References: D. J. Rezende, S. Mohamed, "Variational Inference with Normalizing Flows", ICML
    2015; D. P. Kingma et al., "Improved Variational Inference with Inverse Autoregressive
    Flow", NeurIPS 2016; J. M. Tomczak, M. Welling, "Improving Variational Auto-Encoders using
    Householder Flow", arXiv:1611.09630 (2016); R. van den Berg, L. Hasenclever, J. M.
    Tomczak, M. Welling, "Sylvester Normalizing Flows for Variational Inference", UAI 2018.

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
        *,
        flow: str | None = None,
        num_flows: int = 16,
        prior: str | None = None,
        num_pseudo_inputs: int = 500,
        pseudo_input_init: str | Tensor = "normal",
        pseudo_input_data: Tensor | None = None,
        num_prior_components: int = 10,
        num_prior_flows: int = 2,
        param_store: bool = True,
    ) -> None:
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
                raise ValueError(
                    f"flow={flow!r} needs latent='normal' (posterior flows act on R^d), got "
                    f"latent={latent!r}"
                )
            if num_flows < 1:
                raise ValueError(f"num_flows must be positive, got {num_flows}")
        if latent_dim < 1 or input_dim < 1 or not hidden_dims or min(hidden_dims) < 1:
            raise ValueError(
                f"latent_dim, input_dim and hidden_dims must be positive, got {latent_dim}, "
                f"{input_dim}, {tuple(hidden_dims)}"
            )
        super().__init__()
        # With param_store, model and guide register the networks' parameters with Pyro
        # (pyro.module), so that SVI with a pyro.optim optimizer trains them. The param store is
        # global: each VAE gets a name of its own, since two registering under one name would
        # silently share parameters.
        self.param_store = param_store
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
        self.flow = flow
        self.num_flows = num_flows if flow is not None else 0
        self.prior_kind = prior
        self._fixed_priors: dict[tuple, pyro_dist.TorchDistribution] = {}
        #: the learned prior's module (None for the fixed priors)
        self.prior_module: nn.Module | None = None
        if prior == "vamp":
            self.prior_module = VampPriorModule(num_pseudo_inputs, input_dim,
                                                init=pseudo_input_init, data=pseudo_input_data)
        elif prior == "mog":
            self.prior_module = MixtureOfGaussiansPrior(latent_dim, num_prior_components)
        elif prior == "flow":
            self.prior_module = FlowPrior(latent_dim, num_prior_flows)
        #: the amortized posterior flows, each conditioned on h(x); empty without ``flow``
        self.flows = nn.ModuleList(
            [] if flow is None else _make_flows(flow, latent_dim, hidden_dims[-1], num_flows)
        )

    def posterior(self, x: Tensor) -> pyro_dist.TorchDistribution:
        """The variational posterior :math:`q(z \\mid x)`: batch shape ``(B,)``, event shape
        ``(event_dim,)``; with a ``flow``, a
        :class:`~pyro.distributions.TransformedDistribution` of the Gaussian."""
        features = self.encoder(x)
        head = self.posterior_head(features)
        loc, second = head.split([self.event_dim, head.shape[-1] - self.event_dim], -1)
        if self.latent == "vmf":
            return VonMisesFisher(F.normalize(loc, dim=-1), F.softplus(second.squeeze(-1)) + 1)
        base = pyro_dist.Normal(loc, F.softplus(second)).to_event(1)
        if not self.flows:
            return base
        transforms = [flow.condition(features) for flow in self.flows]
        return pyro_dist.TransformedDistribution(base, transforms)

    def _posterior_point(self, x: Tensor) -> Tensor:
        """The posterior mode; with a flow, the flow's image of the Gaussian's mode (not in
        general the mode of the flow posterior, which has no closed form)."""
        q = self.posterior(x)
        if not self.flows:
            return q.mode
        z = q.base_dist.mode
        for transform in q.transforms:
            z = transform(z)
        return z

    def prior(self, batch_size: int | None, like: Tensor) -> pyro_dist.TorchDistribution:
        """The prior :math:`p(z)`: batch shape ``(batch_size,)``, or ``()`` for
        ``batch_size=None``; event shape ``(event_dim,)``. A fixed prior is built on ``like``'s
        device and dtype, a learned one on its parameters'; the VampPrior runs the encoder on
        the pseudo-inputs (once per call; cached in eval mode)."""
        if self.prior_kind == "vamp":
            prior = self.prior_module(self.posterior)
        elif self.prior_module is not None:
            prior = self.prior_module()
        else:
            return self._fixed_prior(batch_size, like)
        return prior if batch_size is None else prior.expand([batch_size])

    def _fixed_prior(self, batch_size: int | None, like: Tensor) -> pyro_dist.TorchDistribution:
        """The parameter-free prior, built once per batch size, dtype, device and validation
        setting (distributions are immutable): none of its construction in a training step."""
        validation = torch.distributions.Distribution._validate_args
        key = (batch_size, like.dtype, like.device, validation)
        prior = self._fixed_priors.get(key)
        if prior is None:
            if self.latent == "vmf":
                prior = HypersphericalUniform(self.event_dim, dtype=like.dtype,
                                              device=like.device)
            else:
                prior = pyro_dist.Normal(like.new_zeros(()), like.new_ones(()))
                prior = prior.expand([self.event_dim]).to_event(1)
            if batch_size is not None:
                prior = prior.expand([batch_size])
            if len(self._fixed_priors) >= 16:  # a few shapes in practice; never unbounded
                self._fixed_priors.clear()
            self._fixed_priors[key] = prior
        return prior

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
        if self.param_store:
            pyro.module(f"{self.pyro_name}.decoder", self.decoder)
            if self.prior_module is not None:
                pyro.module(f"{self.pyro_name}.prior", self.prior_module)
        with self._data_plate(x, indices, num_data):
            with _kl_scaled(kl_scale):
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
        if self.param_store:
            pyro.module(f"{self.pyro_name}.encoder", self.encoder)
            pyro.module(f"{self.pyro_name}.posterior_head", self.posterior_head)
            if self.flows:
                pyro.module(f"{self.pyro_name}.flows", self.flows)
        with self._data_plate(x, indices, num_data):
            with _kl_scaled(kl_scale):
                pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Bernoulli means of :math:`p(x \\mid z)` at the posterior mode, shape like ``x`` (with
        a ``flow``: at the flow's image of the Gaussian's mode)."""
        return torch.sigmoid(self.decode(self._posterior_point(x)))

    @torch.no_grad()
    def generate(self, num_samples: int, like: Tensor) -> Tensor:
        """Bernoulli means of :math:`p(x \\mid z)` for ``num_samples`` draws of the prior."""
        return torch.sigmoid(self.decode(self.prior(num_samples, like).sample()))

    @torch.no_grad()
    def latent_diagnostics(
        self, data: Tensor, *, num_points: int | None = 1000, threshold: float = 0.01,
        seed: int | None = 0,
    ) -> dict[str, float]:
        """How the latent code is used on ``data`` (shape ``(N, input_dim)``, binary):

        * ``active_units``: units whose posterior mean varies over the data by more than
          ``threshold`` (:func:`~pyro_dgm.infer.active_units`; for the S-VAE, coordinates of
          :math:`\\mathbb{E}_q[z] = A(\\kappa)\\mu \\in \\mathbb{R}^{d+1}`);
        * ``average_kl``, ``mutual_information``, ``marginal_kl``, ``log_num_data``: the ELBO
          surgery of Hoffman & Johnson (2016), :func:`~pyro_dgm.infer.elbo_surgery`, with
          ``num_points`` draws of :math:`z` against all :math:`N` posteriors (nats).

        :returns: a dict of floats.
        """
        units = active_units(self.posterior, data, threshold=threshold, seed=seed)
        surgery = elbo_surgery(self.posterior, self.prior(None, data), data,
                               num_points=None if num_points is None else min(num_points,
                                                                               len(data)),
                               seed=seed)
        return {"active_units": units.count, "average_kl": surgery.average_kl,
                "mutual_information": surgery.mutual_information,
                "marginal_kl": surgery.marginal_kl, "log_num_data": surgery.log_num_data}


class _PlanarHeads(nn.Module):
    """Linear map from the context to the parameters ``(b, u, w)`` of a planar flow."""

    def __init__(self, input_dim: int, context_dim: int) -> None:
        super().__init__()
        self.split_sizes = [1, input_dim, input_dim]
        self.linear = nn.Linear(context_dim, 1 + 2 * input_dim)

    def forward(self, context: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.linear(context).split(self.split_sizes, dim=-1))


def _make_flows(kind: str, dim: int, context_dim: int, num_flows: int) -> list[nn.Module]:
    """The conditional transform modules of a posterior flow (see :class:`VAE`)."""
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
