"""The VampPrior: a uniform mixture of the variational posteriors of learned pseudo-inputs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal

from pyro_dgm.distributions.hyperspherical_uniform import _check_expansion, log_sphere_surface_area
from pyro_dgm.distributions.von_mises_fisher import VonMisesFisher

__all__ = ["VampPrior"]


class VampPrior(TorchDistribution):
    """Variational mixture of posteriors prior (VampPrior) of Tomczak & Welling (2018).

    .. math::

        p(z) = \\frac{1}{K} \\sum_{k=1}^{K} q(z \\mid u_k),

    the encoder's variational posterior :math:`q(z \\mid x)` evaluated at :math:`K`
    pseudo-inputs :math:`u_1, \\dots, u_K` (learned jointly with the VAE, see
    :class:`~pyro_dgm.models.VampPriorModule`). The encoder is called **once**, on the
    whole batch of pseudo-inputs, in the constructor; its output, a distribution of batch shape
    ``(K,)`` and event shape ``(m,)``, is kept as :attr:`components`.

    **Density**: :math:`\\log p(z) = \\operatorname{logsumexp}_k \\log q(z \\mid u_k) - \\log K`,
    from one batched component ``log_prob`` of ``z.unsqueeze(-2)`` (shape ``(..., 1, m)``,
    broadcast against the components' batch ``(K,)``) and one ``logsumexp``: no loop over
    components or points. For :class:`~pyro_dgm.distributions.VonMisesFisher` components the
    terms :math:`\\log C_m(\\kappa_k) + \\kappa_k \\mu_k^\\top z` come from one matrix product
    ``z @ (kappa * mu).T`` plus the :math:`K` log-normalizers, evaluated once per component (the
    Bessel function never sees the broadcast ``(..., K)`` shape), and no ``(..., K, m)``
    intermediate is formed; for ``Normal(...).to_event(1)`` components the squared distance is
    expanded into one float64 matrix product as well (after centering, about 1e-12 nats from
    the direct evaluation); other families go through their own ``log_prob`` on the broadcast
    ``(..., K, m)`` shape.

    **Sampling**: a component index :math:`k` uniform on :math:`\\{1, \\dots, K\\}` (a
    categorical draw, not reparameterized), then a draw of :math:`q(z \\mid u_k)`,
    reparameterized when the components are. As the mixture weights are fixed at
    :math:`1/K`, this pathwise gradient is unbiased whenever the components' is. For
    ``Normal(...).to_event(1)`` and :class:`~pyro_dgm.distributions.VonMisesFisher` components
    only the chosen components are drawn (their parameters are indexed), cost
    :math:`O(N m)` for :math:`N` draws; for other families every component is drawn and the
    chosen one gathered, cost :math:`O(N K m)`, acceptable for small :math:`K` only.
    :attr:`has_rsample` is the components'. The mixture's ``score_parts`` is Pyro's default,
    so the rejection-sampling correction of a von Mises-Fisher with :math:`m \\ne 3` (see
    :meth:`VonMisesFisher.score_parts`) is not carried over: as a *guide*, such a mixture gets
    the pathwise gradient only. As a prior (its use here) only ``log_prob`` enters the ELBO.

    ``expand(batch_shape)`` does not replicate the components: they keep batch shape ``(K,)``
    and the mixture's own batch shape is stored separately.

    :param encoder: callable mapping a batch of inputs of shape ``(K, *input_shape)`` to the
        posterior family's distribution with batch shape ``(K,)`` and event shape ``(m,)``, for
        example ``lambda x: pyro.distributions.Normal(loc(x), scale(x)).to_event(1)`` or a
        :class:`~pyro_dgm.distributions.VonMisesFisher`.
    :param torch.Tensor pseudo_inputs: :math:`u_{1:K}`, shape ``(K, *input_shape)``.
    :param validate_args: whether ``log_prob`` checks that its argument lies in the support.
    :raises ValueError: if ``pseudo_inputs`` is not a tensor with at least one dimension, or
        if the encoder's distribution does not have batch shape ``(K,)`` and a 1-D event
        shape.

    Batch shape ``()`` (until expanded); event shape ``(m,)``; support that of the components.

    Example::

        >>> net = torch.nn.Linear(784, 2 * 8)
        >>> def encoder(x):
        ...     loc, raw_scale = net(x).chunk(2, dim=-1)
        ...     return pyro.distributions.Normal(loc, F.softplus(raw_scale)).to_event(1)
        >>> prior = VampPrior(encoder, torch.rand(50, 784))
        >>> prior.num_components, prior.event_shape
        (50, torch.Size([8]))
        >>> z = prior.expand([64]).rsample((3,))  # shape (3, 64, 8)
        >>> prior.expand([64]).log_prob(z).shape
        torch.Size([3, 64])

    References:

    1. J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        encoder: Callable[[Tensor], Distribution],
        pseudo_inputs: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if not torch.is_tensor(pseudo_inputs) or pseudo_inputs.dim() < 1:
            shape = (
                tuple(pseudo_inputs.shape)
                if torch.is_tensor(pseudo_inputs)
                else type(pseudo_inputs).__name__
            )
            raise ValueError(
                f"pseudo_inputs must be a tensor of shape (K, *input_shape), got {shape}"
            )
        components = encoder(pseudo_inputs)
        _check_components(components, num_components=pseudo_inputs.shape[0])
        self._setup(components, validate_args)

    @classmethod
    def from_components(
        cls, components: Distribution, validate_args: bool | None = None
    ) -> VampPrior:
        """The VampPrior of already-computed components :math:`q(z \\mid u_k)` (for instance
        cached between calls), without calling an encoder.

        :param components: a distribution of batch shape ``(K,)`` and event shape ``(m,)``.
        :param validate_args: as for the constructor.
        :raises ValueError: if ``components`` is not a distribution of batch shape ``(K,)``
            and event shape ``(m,)``.
        """
        _check_components(components)
        prior = cls.__new__(cls)
        prior._setup(components, validate_args)
        return prior

    def _setup(self, components: Distribution, validate_args: bool | None) -> None:
        #: the components :math:`q(z \mid u_k)`, batch shape ``(K,)``, event shape ``(m,)``
        self.components = components
        super().__init__(torch.Size(), components.event_shape, validate_args=validate_args)

    @classmethod
    def infer_shapes(cls, **arg_shapes):
        """Not implemented: the event shape is that of the encoder's output."""
        raise NotImplementedError("VampPrior's shapes depend on its encoder, not on arg shapes")

    def expand(self, batch_shape, _instance=None) -> VampPrior:
        """:raises RuntimeError: as :meth:`torch.Tensor.expand` for an invalid batch shape."""
        _check_expansion(self.batch_shape, torch.Size(batch_shape))
        new = self._get_checked_instance(VampPrior, _instance)
        new.components = self.components
        super(VampPrior, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        return (f"VampPrior(num_components: {self.num_components}, components: "
                f"{self.components!r}, batch_shape: {self.batch_shape})")

    @property
    def num_components(self) -> int:
        """The number :math:`K` of pseudo-inputs (mixture components)."""
        return self.components.batch_shape[0]

    @property
    def support(self):
        return self.components.support

    @property
    def has_rsample(self) -> bool:
        return self.components.has_rsample

    @property
    def mean(self) -> Tensor:
        """:math:`\\frac{1}{K} \\sum_k \\mathbb{E}_{q(z \\mid u_k)}[z]`, the components' mean
        averaged (for von Mises-Fisher components :math:`A_m(\\kappa_k) \\mu_k` averaged)."""
        return self.components.mean.mean(-2).expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> Tensor:
        """Per-coordinate mixture variance :math:`\\frac{1}{K} \\sum_k (\\sigma_k^2 + (\\mu_k -
        \\bar\\mu)^2)`, written without the cancellation of :math:`E[z^2] - E[z]^2`; needs the
        components' ``variance`` (not available for von Mises-Fisher components)."""
        means = self.components.mean
        deviations = means - means.mean(-2, keepdim=True)
        variance = (self.components.variance + deviations.square()).mean(-2)
        return variance.expand(self.batch_shape + self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """:math:`\\log p(z)` in nats, with respect to the components' base measure.

        :param value: points :math:`z` of shape ``(..., m)``, any leading (particle, batch)
            dimensions broadcastable with the batch shape.
        :returns: tensor of shape ``broadcast(value.shape[:-1], batch_shape)``.
        """
        if self._validate_args:
            self._validate_sample(value)
        log_prob = self._component_log_probs(value).logsumexp(-1) - math.log(self.num_components)
        return log_prob.expand(torch.broadcast_shapes(log_prob.shape, self.batch_shape))

    def _component_log_probs(self, value: Tensor) -> Tensor:
        """:math:`\\log q(z \\mid u_k)` for all :math:`k`, shape ``value.shape[:-1] + (K,)``."""
        components = self.components
        if isinstance(components, VonMisesFisher):
            dtype = torch.promote_types(value.dtype, components.loc.dtype)
            weights = (components.concentration.unsqueeze(-1) * components.loc).to(dtype)
            # _bessel_terms is the instance's lazily cached (K,) float64 log 0F1 (the same
            # package's private API): one Bessel evaluation per component, kept with the cache.
            log_normalizer = -log_sphere_surface_area(self.event_shape[0]) - (
                components._bessel_terms[0]
            )
            return value.to(dtype) @ weights.transpose(-1, -2) + log_normalizer.to(dtype)
        if _is_diagonal_normal(components):
            return _diagonal_normal_log_probs(components.base_dist, value)
        return components.log_prob(value.unsqueeze(-2))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draw from the mixture, differentiably in the components' parameters.

        :returns: tensor of shape ``sample_shape + batch_shape + (m,)``.
        :raises NotImplementedError: if the components have no ``rsample``.
        """
        if not self.has_rsample:
            raise NotImplementedError(
                f"{type(self.components).__name__} components have no rsample; use sample"
            )
        return self._draw(sample_shape, reparameterized=True)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draw from the mixture without gradients; shape ``sample_shape + batch_shape + (m,)``."""
        with torch.no_grad():
            return self._draw(sample_shape, reparameterized=self.has_rsample)

    def _draw(self, sample_shape: torch.Size | tuple[int, ...], reparameterized: bool) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        chosen = _chosen_components(self.components, shape)
        if chosen is not None:
            return chosen.rsample() if reparameterized else chosen.sample()
        # Any other family: draw every component and keep the chosen one.
        draw = self.components.rsample if reparameterized else self.components.sample
        draws = draw(shape)
        index = _uniform_index(self.num_components, shape, draws.device)
        index = index[..., None, None].expand(*shape, 1, self.event_shape[0])
        return draws.gather(-2, index).squeeze(-2)


def _is_diagonal_normal(components: Distribution) -> bool:
    return (
        isinstance(components, Independent)
        and components.reinterpreted_batch_ndims == 1
        and isinstance(components.base_dist, Normal)
    )


def _diagonal_normal_log_probs(base: Normal, value: Tensor) -> Tensor:
    """:math:`\\log \\mathcal{N}(z; \\mu_k, \\mathrm{diag}\\,\\sigma_k^2)` for all
    :math:`k` as one matrix product, shape ``value.shape[:-1] + (K,)``:

    .. math::

        -\\tfrac12 \\big[(z - c)^{2} \\cdot \\tau_k - 2 (z - c) \\cdot \\tau_k (\\mu_k - c)
        + (\\mu_k - c)^2 \\cdot \\tau_k\\big] - \\textstyle\\sum_d \\log \\sigma_{kd}
        - \\tfrac{m}{2} \\log 2\\pi,

    :math:`\\tau_k = \\sigma_k^{-2}`, with the components' mean :math:`c` subtracted first so
    that the expansion of the square cancels little, and in float64 (error about 1e-12 nats
    against the direct evaluation at scales down to 0.05). This replaces the ``(..., K, m)``
    intermediate of the direct evaluation (and its backward) by a ``(..., 2m) x (2m, K)``
    product: for batch 100, K = 500, m = 40 about 8x faster on a CPU."""
    dtype = torch.promote_types(value.dtype, base.loc.dtype)
    # float64 inside: the expanded square loses digits in float32 (1e-3 nats at scales 0.05)
    loc, scale, value = (t.to(torch.float64) for t in (base.loc, base.scale, value))
    center = loc.mean(-2).detach()
    loc, value = loc - center, value - center
    precision = scale.pow(-2)
    weights = torch.cat([precision, -2 * precision * loc], -1)  # (K, 2m)
    features = torch.cat([value.square(), value], -1)  # (..., 2m)
    constant = (loc.square() * precision).sum(-1) + 2 * scale.log().sum(-1) + loc.shape[-1] * (
        math.log(2 * math.pi)
    )
    return (-0.5 * (features @ weights.transpose(-1, -2) + constant)).to(dtype)


def _chosen_components(components: Distribution, shape: torch.Size) -> Distribution | None:
    """The components at uniformly drawn indices of shape ``shape`` (batch shape ``shape``), for
    the families whose parameters can be indexed directly; ``None`` for other families."""
    if isinstance(components, VonMisesFisher):
        index = _uniform_index(components.batch_shape[0], shape, components.loc.device)
        return VonMisesFisher(
            components.loc[index],
            components.concentration[index],
            gradient=components.gradient,
            validate_args=False,
        )
    if _is_diagonal_normal(components):
        base = components.base_dist
        index = _uniform_index(components.batch_shape[0], shape, base.loc.device)
        return Independent(Normal(base.loc[index], base.scale[index], validate_args=False), 1)
    return None


def _uniform_index(num_components: int, shape: torch.Size, device: torch.device) -> Tensor:
    """Component indices, uniform (a categorical draw with equal weights)."""
    return torch.randint(num_components, shape, device=device)


def _check_components(components: object, num_components: int | None = None) -> None:
    if not isinstance(components, Distribution):
        raise ValueError(
            "the encoder must return a torch Distribution (the components q(z | u_k)), got "
            f"{type(components).__name__}"
        )
    batch_shape = tuple(components.batch_shape)
    event_shape = tuple(components.event_shape)
    if len(batch_shape) != 1:
        raise ValueError(
            "components must have batch shape (K,) (one component per pseudo-input), got "
            f"batch shape {batch_shape}"
        )
    if batch_shape[0] < 1:
        raise ValueError("components must have batch shape (K,) with K >= 1, got (0,)")
    if num_components is not None and batch_shape[0] != num_components:
        raise ValueError(
            f"the encoder's distribution must have batch shape (K,) = ({num_components},) for "
            f"{num_components} pseudo-inputs, got batch shape {batch_shape}"
        )
    if len(event_shape) != 1:
        raise ValueError(
            "components must have event shape (m,) (e.g. Normal(loc, scale).to_event(1)), got "
            f"event shape {event_shape}"
        )
