"""Learnable priors :math:`p_\\lambda(z)` for VAEs, as Pyro ``PyroModule`` subclasses.

Hoffman & Johnson (2016) write the ELBO averaged over the data as a reconstruction term minus
the mutual information between :math:`x` and :math:`z` minus :math:`\\mathrm{KL}(q(z) \\|
p(z))`, with :math:`q(z)` the aggregate posterior: a prior that can move towards :math:`q(z)`
gains on the last term. Each module's ``forward`` returns a distribution of batch shape ``()``
and event shape ``(d,)`` on its parameters' device and dtype; a model calls
``.expand([batch_size])`` on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as pyro_dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import AffineAutoregressive, affine_autoregressive
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_dgm.distributions import VampPrior

__all__ = ["FlowPrior", "MixtureOfGaussiansPrior", "VampPriorModule"]

_PSEUDO_INPUT_INITS = ("normal", "data")
# Pseudo-inputs are sigmoid(raw): initial values are kept this far inside (0, 1) so that the
# logit is finite.
_CLAMP = 1e-4


class VampPriorModule(PyroModule):
    """The VampPrior's learnable pseudo-inputs; ``forward(encoder)`` returns the
    :class:`~pyro_dgm.distributions.VampPrior` :math:`p(z) = \\frac{1}{K} \\sum_k q(z \\mid
    u_k)`.

    The :math:`K` pseudo-inputs :math:`u_k` live in data space :math:`[0, 1]` (images'
    intensities) as :math:`u = \\sigma(r)`, with :math:`r` the unconstrained parameter
    ``raw_pseudo_inputs``. Initialisation (``init``):

    * ``"normal"`` (the paper's): :math:`u \\sim \\mathcal{N}(0.05, 0.01^2)` elementwise,
      clamped to :math:`[10^{-4}, 1 - 10^{-4}]` before the logit;
    * ``"data"``: :math:`K` distinct rows of ``data`` drawn at random (with torch's global
      generator), shrunk to :math:`0.01 + 0.98\\, x` so that the logit is finite;
    * a tensor of shape ``(K, *input_shape)`` with values in :math:`[0, 1]`: those values,
      clamped to :math:`[10^{-4}, 1 - 10^{-4}]`.

    ``forward(encoder)`` calls the encoder once on all pseudo-inputs, so that gradients of
    the prior's ``log_prob`` reach both the pseudo-inputs and the encoder. **Eval mode**: with
    ``self.training`` false, the prior is built once without gradient tracking and returned
    again by later calls with the same encoder (compared with ``==``, so a bound method such as
    ``vae.posterior`` matches itself); ``train(mode)`` (also called by ``eval()`` and by a
    parent module's ``train``/``eval``) and :meth:`clear_cache` drop it. Parameters changed in
    eval mode (``load_state_dict``, a manual update) therefore need ``clear_cache()``.

    :param int num_pseudo_inputs: :math:`K \\ge 1`.
    :param input_shape: shape of one input, e.g. ``784`` or ``(1, 28, 28)``.
    :type input_shape: int or tuple[int, ...]
    :param init: ``"normal"``, ``"data"`` or a tensor of initial pseudo-inputs, see above.
    :type init: str or torch.Tensor
    :param data: for ``init="data"``: a tensor of shape ``(N, *input_shape)``, :math:`N \\ge K`,
        values in :math:`[0, 1]` (e.g. the training images).
    :raises ValueError: for :math:`K < 1`, a non-positive ``input_shape``, an unknown
        ``init``, ``init="data"`` without ``data``, ``data`` given without ``init="data"``, data
        with fewer than :math:`K` rows or of the wrong shape, or initial values of the wrong
        shape or outside :math:`[0, 1]`.

    Example::

        >>> vae = VAE("normal", latent_dim=8)
        >>> prior = VampPriorModule(500, 784, init="data", data=train_images)
        >>> p = prior(vae.posterior)  # batch shape (), event shape (8,)
        >>> p.expand([64]).log_prob(torch.randn(64, 8)).shape
        torch.Size([64])

    References:

    1. J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018.
    2. M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the
       variational evidence lower bound", NeurIPS Workshop on Advances in Approximate Bayesian
       Inference, 2016.
    """

    def __init__(
        self,
        num_pseudo_inputs: int,
        input_shape: int | Sequence[int],
        *,
        init: str | Tensor = "normal",
        data: Tensor | None = None,
    ) -> None:
        if isinstance(num_pseudo_inputs, bool) or not isinstance(num_pseudo_inputs, int) or (
            num_pseudo_inputs < 1
        ):
            raise ValueError(
                f"num_pseudo_inputs must be an integer >= 1, got {num_pseudo_inputs!r}"
            )
        input_shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        if not input_shape or not all(isinstance(n, int) and n >= 1 for n in input_shape):
            raise ValueError(
                f"input_shape must be a positive integer or a tuple of them, got {input_shape}"
            )
        shape = (num_pseudo_inputs, *input_shape)
        initial = _initial_pseudo_inputs(shape, init, data)
        super().__init__()
        self.num_pseudo_inputs = num_pseudo_inputs
        self.input_shape = input_shape
        #: the unconstrained :math:`r`, pseudo-inputs :math:`u = \sigma(r)`
        self.raw_pseudo_inputs = nn.Parameter(torch.logit(initial))
        self._cache: tuple[Callable[[Tensor], Distribution], VampPrior] | None = None

    @property
    def pseudo_inputs(self) -> Tensor:
        """:math:`u = \\sigma(r) \\in [0, 1]`, shape ``(K, *input_shape)``."""
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self, encoder: Callable[[Tensor], Distribution]) -> VampPrior:
        """The VampPrior of ``encoder`` at the pseudo-inputs (cached in eval mode, see above).

        :param encoder: maps inputs ``(K, *input_shape)`` to the posterior distribution, batch
            shape ``(K,)``, event shape ``(m,)``.
        :returns: :class:`~pyro_dgm.distributions.VampPrior`, batch shape ``()``, event shape
            ``(m,)``.
        """
        if self.training:
            return VampPrior(encoder, self.pseudo_inputs)
        if self._cache is None or self._cache[0] != encoder:
            with torch.no_grad():
                prior = VampPrior(encoder, self.pseudo_inputs)
            self._cache = (encoder, prior)
        return self._cache[1]

    def clear_cache(self) -> None:
        """Forget the prior cached in eval mode."""
        self._cache = None

    def train(self, mode: bool = True) -> VampPriorModule:
        """Set the training mode (see :meth:`torch.nn.Module.train`) and clear the cache."""
        self.clear_cache()
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"num_pseudo_inputs={self.num_pseudo_inputs}, input_shape={self.input_shape}"


def _initial_pseudo_inputs(
    shape: tuple[int, ...], init: str | Tensor, data: Tensor | None
) -> Tensor:
    """Initial pseudo-inputs in data space, strictly inside (0, 1)."""
    num_pseudo_inputs, input_shape = shape[0], shape[1:]
    if isinstance(init, str):
        if init not in _PSEUDO_INPUT_INITS:
            raise ValueError(
                f"init must be one of {_PSEUDO_INPUT_INITS} or a tensor, got {init!r}"
            )
        if init == "normal":
            if data is not None:
                raise ValueError("data is only used with init='data', got init='normal'")
            return (0.05 + 0.01 * torch.randn(shape)).clamp(_CLAMP, 1 - _CLAMP)
        if data is None:
            raise ValueError("init='data' needs data, a tensor of shape (N, *input_shape)")
        if not torch.is_tensor(data) or tuple(data.shape[1:]) != input_shape:
            got = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
            raise ValueError(
                f"data must have shape (N, *input_shape) = (N, {', '.join(map(str, input_shape))})"
                f", got {got}"
            )
        if data.shape[0] < num_pseudo_inputs:
            raise ValueError(
                f"init='data' needs at least num_pseudo_inputs = {num_pseudo_inputs} rows of "
                f"data, got {data.shape[0]}"
            )
        rows = data[torch.randperm(data.shape[0], device=data.device)[:num_pseudo_inputs]]
        rows = _as_float(rows)
        _check_unit_interval(rows, "data")
        return 0.01 + 0.98 * rows
    if not torch.is_tensor(init):
        raise ValueError(
            f"init must be one of {_PSEUDO_INPUT_INITS} or a tensor, got {type(init).__name__}"
        )
    if data is not None:
        raise ValueError("data is only used with init='data', got init as a tensor")
    if tuple(init.shape) != shape:
        raise ValueError(
            f"init must have shape (num_pseudo_inputs, *input_shape) = {shape}, got "
            f"{tuple(init.shape)}"
        )
    initial = _as_float(init.detach().clone())
    _check_unit_interval(initial, "init")
    return initial.clamp(_CLAMP, 1 - _CLAMP)


def _as_float(values: Tensor) -> Tensor:
    return values if values.is_floating_point() else values.to(torch.get_default_dtype())


def _check_unit_interval(values: Tensor, name: str) -> None:
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(
            f"{name} must have values in [0, 1] (pseudo-inputs live in data space), got the "
            f"range [{values.min().item():.3g}, {values.max().item():.3g}]"
        )


class MixtureOfGaussiansPrior(PyroModule):
    """A learnable mixture of :math:`K` diagonal Gaussians in :math:`\\mathbb{R}^d`,

    .. math::

        p(z) = \\sum_{k=1}^K \\pi_k \\, \\mathcal{N}(z \\mid \\mu_k, \\operatorname{diag}
        \\sigma_k^2), \\qquad \\pi = \\operatorname{softmax}(\\text{logits}), \\quad
        \\sigma_k = \\operatorname{softplus}(\\rho_k).

    Initialisation: means :math:`\\mu_k \\sim \\mathcal{N}(0, s^2 I)` with :math:`s` =
    ``init_scale`` (spread so that the components start apart and their symmetry is broken),
    scales :math:`\\sigma_k = 1` (the standard normal prior's), equal weights (logits 0).
    Parameters: ``loc`` ``(K, d)``, ``raw_scale`` :math:`\\rho` ``(K, d)``, ``logits``
    ``(K,)``. The scales are not bounded below; a component may collapse if the data drive it
    there.

    ``forward()`` returns :class:`pyro.distributions.MixtureSameFamily` with batch shape ``()``
    and event shape ``(d,)``; it has no ``rsample`` (enough for a prior).

    :param int latent_dim: :math:`d \\ge 1`.
    :param int num_components: :math:`K \\ge 1`.
    :param float init_scale: :math:`s > 0`, standard deviation of the initial means.
    :raises ValueError: for a non-positive ``latent_dim``, ``num_components`` or
        ``init_scale``.

    Example::

        >>> prior = MixtureOfGaussiansPrior(latent_dim=2, num_components=10)
        >>> prior().expand([64]).log_prob(torch.randn(64, 2)).shape
        torch.Size([64])

    References:

    1. M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the
       variational evidence lower bound", NeurIPS Workshop on Advances in Approximate Bayesian
       Inference, 2016.
    2. J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018 (the mixture of
       Gaussians as a baseline prior).
    """

    def __init__(self, latent_dim: int, num_components: int, *, init_scale: float = 1.0) -> None:
        _check_positive_int(latent_dim=latent_dim, num_components=num_components)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        super().__init__()
        self.latent_dim = latent_dim
        self.num_components = num_components
        self.loc = nn.Parameter(init_scale * torch.randn(num_components, latent_dim))
        # softplus^{-1}(1) = log(e - 1): the components start with unit scales.
        self.raw_scale = nn.Parameter(
            torch.full((num_components, latent_dim), math.log(math.expm1(1.0)))
        )
        self.logits = nn.Parameter(torch.zeros(num_components))

    @property
    def scale(self) -> Tensor:
        """:math:`\\sigma = \\operatorname{softplus}(\\rho)`, shape ``(K, d)``."""
        return F.softplus(self.raw_scale)

    def forward(self) -> pyro_dist.MixtureSameFamily:
        """The mixture, batch shape ``()``, event shape ``(d,)``."""
        return pyro_dist.MixtureSameFamily(
            pyro_dist.Categorical(logits=self.logits),
            pyro_dist.Normal(self.loc, self.scale).to_event(1),
        )

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}"


class FlowPrior(PyroModule):
    """A standard normal pushed through a masked autoregressive flow (MAF), as a prior.

    With :math:`T = T_L \\circ \\cdots \\circ T_1` a stack of affine autoregressive maps
    :math:`T_l(x)_i = \\exp(s_{l,i}(x_{<i})) \\, x_i + m_{l,i}(x_{<i})` (Pyro's
    :class:`~pyro.distributions.transforms.AffineAutoregressive`, each with a MADE network and
    a random variable order of its own),

    .. math::

        p(z) = \\mathcal{N}(T(z) \\mid 0, I) \\,
        \\left| \\det \\frac{\\partial T}{\\partial z} \\right|, \\qquad
        \\log \\left| \\det \\frac{\\partial T}{\\partial z} \\right| = \\sum_{l, i} s_{l,i}.

    The distribution is Pyro's :class:`~pyro.distributions.TransformedDistribution` of the base
    with the transforms' inverses ``[T_L.inv, ..., T_1.inv]``, so that ``log_prob(z)`` runs
    :math:`T` in its **forward**, parallel direction: one pass of each network, as in the MAF of
    Papamakarios et al. (2017) (an IAF would need :math:`d` sequential passes per density).
    Sampling :math:`z = T^{-1}(u)` is the sequential direction, :math:`d` passes per flow:
    slower, acceptable for a prior, which the ELBO only evaluates. The transforms are submodules
    (``self.transforms``, an ``nn.ModuleList``), so their parameters train with the module.
    The log-scales are clipped to :math:`[-5, 3]` (Pyro's default). The transforms are Pyro's
    (networks from :func:`~pyro.distributions.transforms.affine_autoregressive`) with an inverse
    that keeps the parameters' dtype, so a float64 prior samples too.

    :param int latent_dim: :math:`d \\ge 1` (for :math:`d = 1` each flow is a learned affine
        map and Pyro warns).
    :param int num_flows: :math:`L \\ge 1`.
    :param hidden_dims: hidden widths of each MADE network, each at least :math:`d`; default
        ``[4 * latent_dim]``.
    :type hidden_dims: list[int] or None
    :raises ValueError: for a non-positive ``latent_dim`` or ``num_flows``, or a hidden width
        below ``latent_dim``.

    ``forward()`` returns a distribution of batch shape ``()`` and event shape ``(d,)``.

    Example::

        >>> prior = FlowPrior(latent_dim=8, num_flows=2)
        >>> prior().expand([64]).log_prob(torch.randn(64, 8)).shape
        torch.Size([64])

    References:

    1. G. Papamakarios, T. Pavlakou, I. Murray, "Masked Autoregressive Flow for Density
       Estimation", NeurIPS 2017.
    2. M. Germain, K. Gregor, I. Murray, H. Larochelle, "MADE: Masked Autoencoder for
       Distribution Estimation", ICML 2015.
    3. M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the
       variational evidence lower bound", NeurIPS Workshop on Advances in Approximate Bayesian
       Inference, 2016.
    """

    def __init__(
        self, latent_dim: int, num_flows: int = 2, hidden_dims: Sequence[int] | None = None
    ) -> None:
        _check_positive_int(latent_dim=latent_dim, num_flows=num_flows)
        hidden_dims = [4 * latent_dim] if hidden_dims is None else list(hidden_dims)
        if not hidden_dims or min(hidden_dims) < latent_dim:
            raise ValueError(
                f"hidden_dims must be a non-empty list of widths >= latent_dim = {latent_dim}, "
                f"got {hidden_dims}"
            )
        super().__init__()
        self.latent_dim = latent_dim
        self.hidden_dims = hidden_dims
        #: :math:`T_1, \dots, T_L`, in the density (z -> u) direction
        self.transforms = nn.ModuleList(
            [
                _AffineAutoregressive(affine_autoregressive(latent_dim, hidden_dims).arn)
                for _ in range(num_flows)
            ]
        )

    def forward(self) -> pyro_dist.TransformedDistribution:
        """The flow prior, batch shape ``()``, event shape ``(d,)``."""
        reference = next(self.transforms.parameters())
        base = pyro_dist.Normal(
            reference.new_zeros(self.latent_dim), reference.new_ones(self.latent_dim)
        ).to_event(1)
        return pyro_dist.TransformedDistribution(
            base, [transform.inv for transform in reversed(self.transforms)]
        )

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, hidden_dims={self.hidden_dims}"


class _AffineAutoregressive(AffineAutoregressive):
    """Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive` whose sequential
    inverse keeps the dtype of its argument (Pyro 1.9's starts from zeros of torch's default
    dtype, so sampling a float64 flow fails)."""

    def _inverse(self, y: Tensor) -> Tensor:
        x = torch.zeros_like(y)
        permutation = self.arn.permutation.to(y.device)
        for position, index in enumerate(permutation.tolist()):
            mean, log_scale = self.arn(x)
            log_scale = clamp_preserve_gradients(
                log_scale, self.log_scale_min_clip, self.log_scale_max_clip
            )
            column = (y[..., index] - mean[..., index]) * torch.exp(-log_scale[..., index])
            # out of place: x is an input of the networks' graph
            x = x.index_copy(-1, permutation[position : position + 1], column.unsqueeze(-1))
        # The last pass saw every input but the last in the order, on which no output depends:
        # its log-scales are those at x.
        self._cached_log_scale = log_scale
        return x


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
