r"""Dequantization of 8-bit images as a Pyro model/guide pair: uniform [1, 2] and variational
(Flow++ [3]) dequantization of a flow density, and bits per dimension from the bounds.

A continuous density :math:`p` on :math:`[0, 1]^D` (an :class:`~pyro_dgm.models.ImageFlow`)
defines a distribution of 8-bit images :math:`k \in \{0, \ldots, 255\}^D` by quantizing:
:math:`P(k) = \int_{[0, 1)^D} p_{256}(k + u)\, du`, where
:math:`p_{256}(y) = 256^{-D} p(y / 256)` is the density on the :math:`[0, 256]` scale. This
is a latent variable model, with the noise :math:`u` as latent: the model draws
:math:`u \sim U[0, 1)^D` (log-density 0) and observes :math:`k + u` under :math:`p_{256}`. Any
guide :math:`q(u \mid k)` on :math:`[0, 1)^D` then gives the ELBO and the importance-weighted
bounds

.. math::

    \log P(k) \ge \mathbb{E}_{u_{1:K} \sim q} \log \frac{1}{K} \sum_{j=1}^K
    \frac{p(x_j)\, 256^{-D}}{q(u_j \mid k)}, \qquad x_j = \frac{k + u_j}{256},

the ELBO at :math:`K = 1`, increasing in :math:`K` [4]. With the uniform guide
(:math:`q = 1`) the ELBO is :math:`\mathbb{E}_u[\log p(x)] - D \log 256`, the bound of Theis
et al. [2]; a learned :math:`q` (:class:`VariationalDequantization`) tightens it [3]. The
:math:`- D \log 256` is the Jacobian of the :math:`1/256` scaling, so the bounds are on the
discrete :math:`\log P(k)` and bits per dimension are :math:`-\log P(k) / (D \ln 2)`, the
papers' unit [1, 3].

References:

1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
2. L\. Theis, A. van den Oord, M. Bethge, "A note on the evaluation of generative models",
   ICLR 2016.
3. J\. Ho, X. Chen, A. Srinivas, Y. Duan, P. Abbeel, "Flow++: Improving Flow-Based Generative
   Models with Variational Dequantization and Architecture Design", ICML 2019.
4. Y\. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

__all__ = [
    "BitsPerDim",
    "DequantizedImageFlow",
    "UniformDequantization",
    "VariationalDequantization",
    "evaluate_bits_per_dim",
]

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import AffineTransform, SigmoidTransform
from tqdm.auto import tqdm

from pyro_dgm.infer._sites import guess_max_plate_nesting
from pyro_dgm.infer.evaluation import importance_log_likelihood
from pyro_dgm.transforms.image_base import check_image, check_image_shape
from pyro_dgm.transforms.image_coupling import conditional_masked_affine_coupling2d

#: The number of intensity levels of 8-bit images.
LEVELS = 256


class _ClosedUnitUniform(dist.Uniform):
    """``Uniform(low, high)`` whose density is also :math:`1 / (high - low)` at ``high``: the
    same distribution (the ends have measure zero), but a sigmoid that rounds to exactly 1 in
    float32 does not give :math:`\\log 0`."""

    def log_prob(self, value: Tensor) -> Tensor:
        inside = (value >= self.low) & (value <= self.high)
        log_density = -torch.log(self.high - self.low)
        return torch.where(inside, log_density, log_density.new_full((), -math.inf))


def _unit_cube(like: Tensor) -> dist.TorchDistribution:
    """The uniform distribution on :math:`[0, 1]^{C \\times H \\times W}`, batch shape
    ``like.shape[:-3]``, event shape ``like.shape[-3:]``."""
    return _ClosedUnitUniform(like.new_zeros(()), like.new_ones(())).expand(
        like.shape).to_event(3)


class UniformDequantization(nn.Module):
    r"""The uniform dequantization guide :math:`q(u \mid k) = U[0, 1]^D` [1]: calling it on
    intensity levels ``(B, C, H, W)`` returns that distribution, batch shape ``(B,)``, event
    shape ``(C, H, W)``, :math:`\log q = 0`, reparameterized. With it the ELBO of
    :class:`DequantizedImageFlow` is :math:`\mathbb{E}_u[\log p((k + u) / 256)] - D \log 256`.

    References:

    1. L\. Theis, A. van den Oord, M. Bethge, "A note on the evaluation of generative models",
       ICLR 2016.
    """

    def forward(self, levels: Tensor) -> dist.TorchDistribution:
        """The distribution of the noise for ``levels`` :math:`k`, shape ``(B, C, H, W)``."""
        return _unit_cube(levels)


class VariationalDequantization(nn.Module):
    r"""Variational dequantization [1, Sec. 3.1]: the guide :math:`q(u \mid k)` on
    :math:`(0, 1)^D`, a conditional flow of standard normal noise squashed by a sigmoid.

    .. math::

        u = \sigma\bigl(g_k^{-1}(\boldsymbol{\varepsilon})\bigr), \qquad
        \boldsymbol{\varepsilon} \sim \mathcal{N}(0, I), \qquad
        \log q(u \mid k) = \log \mathcal{N}(g_k(v); 0, I)
        + \log \lvert \det J_{g_k}(v) \rvert - \sum_i \log \sigma'(v_i),

    with :math:`v = \operatorname{logit} u`, :math:`\log \sigma'(v) = -\operatorname{softplus}
    (-v) - \operatorname{softplus}(v)`, and :math:`g_k = c_L \circ \cdots \circ c_1`
    ``num_couplings`` :class:`~pyro_dgm.transforms.ConditionalMaskedAffineCoupling2d`
    (normalizing direction), conditioned on the features :math:`\mathbf{h}(k)` of a small
    convolutional network (two 3x3 convolutions with ReLUs on :math:`k / 127.5 - 1`), as
    Flow++ conditions its
    dequantizing flow on features of :math:`k`. Masks: checkerboard of alternating parity;
    with :math:`C \ge 2`, alternating with channel-wise masks. Each coupling starts as the
    identity, so :math:`q` starts as a logit-normal.

    Calling the module on levels ``(B, C, H, W)`` returns :math:`q(\cdot \mid k)` as a
    :class:`~pyro.distributions.TransformedDistribution` (batch shape ``(B,)``, event shape
    ``(C, H, W)``, ``has_rsample``), whose ``log_prob`` is the formula above; for its own
    samples it comes from the transforms' caches, with no inverse computed. Flow++'s mixture
    of logistics couplings and its attention are not reproduced.

    :param image_shape: ``(C, H, W)``.
    :type image_shape: Sequence[int]
    :param num_couplings: :math:`L \ge 1`.
    :type num_couplings: int
    :param hidden_channels: the width of the coupling networks.
    :type hidden_channels: int
    :param context_channels: :math:`F`, the channels of :math:`\mathbf{h}(k)`.
    :type context_channels: int
    :raises ValueError: for a bad ``image_shape`` or a non-positive count.

    References:

    1. J\. Ho, X. Chen, A. Srinivas, Y. Duan, P. Abbeel, "Flow++: Improving Flow-Based
       Generative Models with Variational Dequantization and Architecture Design", ICML 2019.
    """

    def __init__(self, image_shape: Sequence[int], num_couplings: int = 4,
                 hidden_channels: int = 32, context_channels: int = 16) -> None:
        super().__init__()
        self.image_shape = check_image_shape(image_shape)
        for name, value in (("num_couplings", num_couplings),
                            ("hidden_channels", hidden_channels),
                            ("context_channels", context_channels)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        channels = self.image_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, context_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(context_channels, context_channels, 3, padding=1),
            nn.ReLU(),
        )
        masks = [("checkerboard", False), ("checkerboard", True)]
        if channels >= 2:
            masks += [("channel", False), ("channel", True)]
        self.couplings = nn.ModuleList(
            conditional_masked_affine_coupling2d(channels, context_channels, *masks[i % len(
                masks)], hidden_channels=hidden_channels)
            for i in range(num_couplings))
        self.register_buffer("base_loc", torch.zeros(()))
        self.register_buffer("base_scale", torch.ones(()))

    def forward(self, levels: Tensor) -> dist.TransformedDistribution:
        """:math:`q(\\cdot \\mid k)` for ``levels`` :math:`k` of shape ``(B, C, H, W)``
        (floating point, values in :math:`\\{0, \\ldots, 255\\}`)."""
        check_image(levels, self.image_shape[0])
        context = self.features(levels / 127.5 - 1)
        base = dist.Normal(self.base_loc.expand(levels.shape),
                           self.base_scale.expand(levels.shape)).to_event(3)
        # Sampling runs g^{-1} = c_1^{-1} o ... o c_L^{-1}, then the sigmoid; cached, so that
        # the log-density of a sample reuses the maps' values.
        transforms = [coupling.condition(context).inv for coupling in reversed(self.couplings)]
        return dist.TransformedDistribution(base, [*transforms, SigmoidTransform(cache_size=1)])


def _floating_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point buffer or parameter (torch's default
    for a module without one)."""
    for tensor in (*module.buffers(), *module.parameters()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


class DequantizedImageFlow(nn.Module):
    r"""A flow density of 8-bit images with dequantization, as a Pyro model/guide pair.

    ``model(images, indices=None, *, num_data=None, kl_scale=1.0)``:

    * ``u = pyro.sample("u", U[0, 1]^D)`` (log-density 0),
    * ``pyro.sample("x", p_256, obs=k + u)``, where ``p_256`` is ``flow()`` pushed forward by
      :math:`y = 256 x`: :math:`\log p_{256}(k + u) = \log p((k + u) / 256) - D \log 256`.
      The observation is the dequantized image on the :math:`[0, 256]` scale, so that the
      :math:`1/256` scaling's Jacobian is part of the observed density and every bound is on
      the discrete :math:`\log P(k)` (see the module documentation);

    ``guide(...)``: ``u = pyro.sample("u", dequantization(k))``, reparameterized
    (:class:`UniformDequantization` or :class:`VariationalDequantization`).

    Both sites sit in ``pyro.plate("data", ...)``: over the batch, or with ``indices`` and
    ``num_data`` over a data set of ``num_data`` images subsampled at ``indices``, so Pyro's
    losses are scaled to the whole data set (as :class:`~pyro_dgm.models.VAE`'s);
    :func:`~pyro_dgm.infer.importance_log_likelihood` and :func:`evaluate_bits_per_dim` apply
    directly, since both sites are in the plate. ``kl_scale`` is accepted for the training
    harness and must be 1: there is no KL to warm up.

    **Images**: ``uint8`` levels :math:`k \in \{0, \ldots, 255\}`, or floating point
    intensities :math:`k / 255` (what :class:`~pyro_dgm.data.MinibatchLoader` yields with
    ``binarize=False``), from which :math:`k` is recovered by rounding :math:`255 x`; shape
    ``(B, C, H, W)`` or flattened ``(B, C H W)``. Floating point values are not read on the
    host to check them: levels given as floats 0..255 are misread.

    :param flow: the density :math:`p` on :math:`[0, 1]^D`: a module called as
        ``flow(temperature)`` that returns a distribution of event shape
        ``flow.image_shape`` :math:`= (C, H, W)`, such as
        :class:`~pyro_dgm.models.ImageFlow` with the logit preprocessing.
    :type flow: torch.nn.Module
    :param dequantization: the guide's family, called on levels ``(B, C, H, W)`` (floating
        point); ``None`` for :class:`UniformDequantization`.
    :type dequantization: torch.nn.Module or None
    :param param_store: register the modules with ``pyro.module`` in ``model`` and ``guide``
        (for :class:`~pyro.infer.SVI`); ``False`` when a torch optimizer trains
        :meth:`parameters` directly.
    :type param_store: bool
    :raises ValueError: (``model``, ``guide``) for images of another shape, ``indices``
        without ``num_data`` or the reverse, or ``kl_scale`` other than 1.
    :raises TypeError: for images neither ``uint8`` nor floating point.

    Example::

        flow = DequantizedImageFlow(real_nvp((1, 28, 28)),
                                    VariationalDequantization((1, 28, 28)))
        loss = Trace_ELBO().differentiable_loss(flow.model, flow.guide, images)
        result = evaluate_bits_per_dim(flow.model, flow.guide, test_images, num_samples=16)
    """

    def __init__(self, flow: nn.Module, dequantization: nn.Module | None = None,
                 param_store: bool = True) -> None:
        super().__init__()
        self.flow = flow
        if dequantization is None:
            dequantization = UniformDequantization()
        self.dequantization = dequantization
        self.image_shape = torch.Size(flow.image_shape)
        self.param_store = param_store

    @property
    def num_dims(self) -> int:
        """:math:`D = C H W`."""
        return self.image_shape.numel()

    def levels(self, images: Tensor) -> Tensor:
        """The levels :math:`k` of ``images`` (see the class documentation) as floats of the
        flow's dtype, shape ``(B, C, H, W)``.

        :raises ValueError: for a shape other than ``(B, C, H, W)`` or ``(B, C H W)``.
        :raises TypeError: for a dtype neither ``uint8`` nor floating point.
        """
        if images.dim() == 2 and images.shape[1] == self.num_dims:
            images = images.reshape(-1, *self.image_shape)
        if images.dim() != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, self.image_shape))})"
                             f" or (B, {self.num_dims}), got {tuple(images.shape)}")
        dtype = _floating_dtype(self.flow)
        if images.dtype == torch.uint8:
            return images.to(dtype)
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 levels or floating point intensities k / 255,"
                            f" got {images.dtype}")
        return (images.to(dtype) * (LEVELS - 1)).round()

    def density(self, temperature: float = 1.0) -> dist.TransformedDistribution:
        """:math:`p_{256}`: ``flow(temperature)`` on the :math:`[0, 256]` scale, event shape
        ``(C, H, W)``."""
        scaling = AffineTransform(0.0, float(LEVELS), event_dim=3)
        return dist.TransformedDistribution(self.flow(temperature), [scaling])

    def _data_plate(self, levels: Tensor, indices: Tensor | None, num_data: int | None):
        if (indices is None) != (num_data is None):
            raise ValueError("indices and num_data must be given together (the batch's "
                             "positions in a data set of num_data images)")
        if num_data is None:
            return pyro.plate("data", levels.shape[0], dim=-1)
        return pyro.plate("data", num_data, subsample=indices, dim=-1)

    @staticmethod
    def _check_kl_scale(kl_scale: float) -> None:
        if not (isinstance(kl_scale, (int, float)) and kl_scale == 1):
            raise ValueError(f"kl_scale must be 1 (a flow density has no KL to warm up), "
                             f"got {kl_scale}")

    def model(self, images: Tensor, indices: Tensor | None = None, *,
              num_data: int | None = None, kl_scale: float = 1.0) -> None:
        self._check_kl_scale(kl_scale)
        if self.param_store:
            pyro.module("flow", self.flow)
        levels = self.levels(images)
        with self._data_plate(levels, indices, num_data):
            noise = pyro.sample("u", _unit_cube(levels))
            pyro.sample("x", self.density(), obs=levels + noise)

    def guide(self, images: Tensor, indices: Tensor | None = None, *,
              num_data: int | None = None, kl_scale: float = 1.0) -> None:
        self._check_kl_scale(kl_scale)
        if self.param_store:
            pyro.module("dequantization", self.dequantization)
        levels = self.levels(images)
        with self._data_plate(levels, indices, num_data):
            pyro.sample("u", self.dequantization(levels))

    @torch.no_grad()
    def sample(self, num_samples: int, temperature: float = 1.0) -> Tensor:
        """``num_samples`` images from the flow at ``temperature``, intensities clamped to
        :math:`[0, 1]`, shape ``(num_samples, C, H, W)``."""
        return self.flow(temperature).sample((num_samples,)).clamp(0, 1)


@dataclass
class BitsPerDim:
    """Bits per dimension of a data set, :math:`-\\log P(k) / (D \\ln 2)` averaged over its
    images, from importance-sampled bounds on :math:`\\log P(k)` (the ELBO for
    ``num_samples = 1``).

    :ivar bits_per_dim: the mean over the images.
    :ivar standard_error: the standard error of that mean over the images (their sample
        standard deviation over :math:`\\sqrt{N}`; it includes the Monte Carlo noise of
        each image's estimate).
    :ivar monte_carlo_standard_error: the Monte Carlo part alone: the importance sampler's
        delta-method standard errors of the images combined, :math:`\\sqrt{\\sum_i
        \\sigma_i^2} / N`, bits per dimension; ``None`` for ``num_samples = 1``, where one
        sample gives no estimate of it.
    :ivar log_likelihood: the mean bound on :math:`\\log P(k)`, nats per image.
    :ivar num_samples: :math:`K`, importance samples per image.
    :ivar num_images: :math:`N`.
    :ivar per_image: the bits per dimension of each image, shape ``(N,)`` (not in
        :meth:`as_dict`).
    """

    bits_per_dim: float
    standard_error: float
    monte_carlo_standard_error: float | None
    log_likelihood: float
    num_samples: int
    num_images: int
    per_image: Tensor

    def as_dict(self) -> dict:
        """The figures, without ``per_image``, for a JSON file."""
        return {"bits_per_dim": self.bits_per_dim, "standard_error": self.standard_error,
                "monte_carlo_standard_error": self.monte_carlo_standard_error,
                "log_likelihood": self.log_likelihood, "num_samples": self.num_samples,
                "num_images": self.num_images}


@torch.no_grad()
def evaluate_bits_per_dim(
    model: Callable,
    guide: Callable,
    images: Tensor,
    *,
    num_samples: int = 1,
    batch_size: int = 100,
    chunk_size: int | None = None,
    data_plate: str = "data",
    max_plate_nesting: int | None = None,
    progress: bool = False,
    description: str = "bits/dim",
) -> BitsPerDim:
    """Bits per dimension of ``images`` under a model/guide pair whose log-densities are those
    of the discrete data (such as :class:`DequantizedImageFlow`'s), from
    :func:`~pyro_dgm.infer.importance_log_likelihood` with ``num_samples`` :math:`= K`
    (:math:`K = 1`: the ELBO; :math:`K > 1`: the importance-weighted bound) on batches of
    ``batch_size`` images, :math:`D` being the number of entries of one image.

    A non-finite estimate (NaN, or :math:`\\pm\\infty`) is an error, raised as soon as its
    batch is done: it is never averaged away or dropped.

    :param images: shape ``(N, ...)``, ``N >= 1``; the model and guide are called on slices.
    :param int num_samples: :math:`K \\ge 1`.
    :param int batch_size: images per call.
    :param chunk_size: particles per vectorized pass (see
        :func:`~pyro_dgm.infer.importance_log_likelihood`); ``None``: all :math:`K` at once.
    :type chunk_size: int or None
    :param str data_plate: the name of the plate over images.
    :param max_plate_nesting: plates nested in the model; ``None``: found by one run of
        the model and guide on the first image.
    :type max_plate_nesting: int or None
    :param bool progress: a tqdm bar over the batches, labelled ``description``.
    :returns: :class:`BitsPerDim`.
    :raises ValueError: for an empty ``images``, a non-positive ``num_samples`` or
        ``batch_size``, or a non-finite estimate, naming the batch (0-based), its images and
        the value.
    """
    if images.dim() == 0 or images.shape[0] == 0:
        raise ValueError(f"images must hold at least one image, got shape "
                         f"{tuple(images.shape)}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_dims = images[0].numel()
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, (images[:1],), {})
    log_likelihoods, variances = [], []
    starts = range(0, images.shape[0], batch_size)
    for number, start in enumerate(tqdm(starts, desc=description, disable=not progress,
                                        leave=False)):
        batch = images[start:start + batch_size]
        estimate = importance_log_likelihood(
            model, guide, batch, num_samples=num_samples,
            chunk_size=chunk_size or num_samples, data_plate=data_plate,
            max_plate_nesting=max_plate_nesting)
        log_likelihood = estimate.log_likelihood.double()
        finite = torch.isfinite(log_likelihood)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            raise ValueError(
                f"non-finite log-likelihood estimate in batch {number} (images {start} to "
                f"{start + len(batch) - 1}): image {start + first} has "
                f"{float(log_likelihood[first])}")
        log_likelihoods.append(log_likelihood)
        variances.append(estimate.standard_error.double().square())
    log_likelihood = torch.cat(log_likelihoods)
    scale = num_dims * math.log(2)
    per_image = -log_likelihood / scale
    count = per_image.shape[0]
    spread = float(per_image.std()) if count > 1 else 0.0
    monte_carlo = None
    if num_samples > 1:
        monte_carlo = math.sqrt(float(torch.cat(variances).sum())) / count / scale
    return BitsPerDim(
        bits_per_dim=float(per_image.mean()),
        standard_error=spread / math.sqrt(count),
        monte_carlo_standard_error=monte_carlo,
        log_likelihood=float(log_likelihood.mean()),
        num_samples=num_samples,
        num_images=count,
        per_image=per_image.cpu(),
    )
