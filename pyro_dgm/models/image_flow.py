r"""Flow density models of images: Real NVP [1] and Glow [2] over a standard normal base.

An :class:`ImageFlow` is a :class:`torch.nn.Module` holding the flow's transforms and its base
distribution's location and scale as buffers (so ``.to(device)`` and ``.double()`` move
everything); calling it returns the density as a
:class:`~pyro.distributions.TransformedDistribution`, built afresh from the current parameters,
for ``pyro.sample`` statements::

    flow = glow((1, 28, 28), num_levels=2, num_steps=8)

    def model(images):  # images: (B, 1, 28, 28), intensities in [0, 1]
        pyro.module("flow", flow)
        with pyro.plate("data", images.shape[0]):
            pyro.sample("x", flow(), obs=images)

    samples = flow(temperature=0.7).sample((16,))  # (16, 1, 28, 28)

**Units**: ``log_prob`` is in nats, a density with respect to Lebesgue measure on the data's
scale: :math:`[0, 1]` intensities when the flow starts with the logit preprocessing
(:class:`~pyro_dgm.transforms.LogitPreprocessing`, the default). For 8-bit images
:math:`k \in \{0, \ldots, 255\}^D` dequantized as :math:`x = (k + u) / 256`,
:math:`u \sim U[0, 1)^D`, the discrete log-likelihood is bounded by
:math:`\log P(k) \ge \mathbb{E}_u[\log p(x)] - D \log 256` (the :math:`1/256` scaling's
Jacobian), and bits per dimension are

.. math::

    \mathrm{bpd} = \frac{-\log p(x) + D \log 256}{D \log 2},

``pyro_dgm.infer.bits_per_dim(log_prob - D * math.log(256), D)``, :math:`D = C H W`.

References:

1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018.
"""

from __future__ import annotations

__all__ = ["ImageFlow", "glow", "real_nvp"]

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import nn
from torch.distributions import Transform

from pyro_dgm.transforms.image_actnorm import ActNorm
from pyro_dgm.transforms.image_base import check_image_shape, clear_caches
from pyro_dgm.transforms.image_conv1x1 import InvertibleConv1x1
from pyro_dgm.transforms.image_coupling import masked_affine_coupling2d
from pyro_dgm.transforms.image_logit import LogitPreprocessing
from pyro_dgm.transforms.image_multiscale import FactorOut, Squeeze2d


class ImageFlow(nn.Module):
    r"""A normalizing-flow density over images ``(C, H, W)``: transforms (data to latent) and a
    standard normal base.

    .. math::

        \log p(\mathbf{x}) = \log \mathcal{N}\bigl(f(\mathbf{x}); 0, T^2 I\bigr)
        + \log \lvert \det J_f(\mathbf{x}) \rvert, \qquad f = f_K \circ \cdots \circ f_1,

    with :math:`f_1, \ldots, f_K` the ``transforms`` in the normalizing direction (the papers'
    order, data first) and :math:`T` the temperature. ``forward(temperature)`` returns this
    density as a :class:`~pyro.distributions.TransformedDistribution` with base
    ``Normal(loc, T * scale).to_event(3)`` (``loc`` and ``scale`` the buffers
    :attr:`base_loc` and :attr:`base_scale`, 0 and 1, expanded to :attr:`latent_shape`) and
    transform :math:`f^{-1}`: ``log_prob`` evaluates :math:`f` and ``rsample`` draws
    :math:`f^{-1}(T \boldsymbol{\varepsilon})`. Batch shape ``()``, event shape
    :attr:`image_shape`; support the first transform's domain. Units: see the module
    documentation.

    **Temperature** [2]: sampling from :math:`f^{-1}(T \boldsymbol{\varepsilon})`
    with :math:`T < 1` trades diversity for quality; ``log_prob`` at :math:`T` is that of the
    tempered distribution (the same :math:`f`, a base of standard deviation :math:`T`).

    **Caches**: the transforms keep their last input and output (Pyro's ``cache_size=1``), so
    that ``log_prob`` evaluates each map once. Every call of this module empties these caches,
    so a distribution obtained by calling it afresh after each optimizer step never returns
    outputs of the old parameters; a distribution kept across steps needs :meth:`clear_cache`
    (Pyro's ``TransformedDistribution.clear_cache`` does not reach the nested transforms).

    The transforms' module parameters are this module's (through :attr:`transform`, a
    :class:`~pyro.distributions.transforms.ComposeTransformModule`). The first ``log_prob``
    of a data batch initialises any :class:`~pyro_dgm.transforms.ActNorm`.

    :param image_shape: the shape ``(C, H, W)`` of one image.
    :type image_shape: Sequence[int]
    :param transforms: the bijections :math:`f_1, \ldots, f_K`, data to latent, ``event_dim``
        at most 3; they may change the shape (the latent shape is
        ``transform.forward_shape(image_shape)``).
    :type transforms: Sequence[torch.distributions.Transform]
    :raises ValueError: if ``image_shape`` is not three positive integers, if the transforms
        do not accept it, or (``forward``) if ``temperature`` is not positive.

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
       NeurIPS 2018.
    """

    def __init__(self, image_shape: Sequence[int], transforms: Sequence[Transform]) -> None:
        super().__init__()
        self.image_shape = check_image_shape(image_shape)
        #: :math:`f`, data to latent, a
        #: :class:`~pyro.distributions.transforms.ComposeTransformModule`
        self.transform = ComposeTransformModule(list(transforms))
        #: the shape of :math:`f(\mathbf{x})` for one image
        self.latent_shape = self.transform.forward_shape(self.image_shape)
        if len(self.latent_shape) != 3:
            raise ValueError(
                f"transforms must map images {tuple(self.image_shape)} to a shape (C', H', W'),"
                f" got {tuple(self.latent_shape)}"
            )
        self.register_buffer("base_loc", torch.zeros(()))
        self.register_buffer("base_scale", torch.ones(()))

    def forward(
        self, temperature: float = 1.0, validate_args: bool | None = None
    ) -> dist.TransformedDistribution:
        """The density, at ``temperature`` :math:`T > 0`.

        :param temperature: :math:`T`, the base distribution's standard deviation.
        :type temperature: float
        :param validate_args: passed to the distributions (``False`` on the ``meta`` device,
            where there are no values to check).
        :type validate_args: bool or None
        :raises ValueError: if ``temperature`` is not positive.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.clear_cache()
        loc = self.base_loc.expand(self.latent_shape)
        scale = (self.base_scale * temperature).expand(self.latent_shape)
        base = dist.Normal(loc, scale, validate_args=validate_args).to_event(3)
        return dist.TransformedDistribution(
            base, self.transform.inv, validate_args=validate_args
        )

    def clear_cache(self) -> None:
        """Empty the one-entry caches of the transforms and of those nested in them;
        :meth:`forward` does it first."""
        clear_caches(self.transform)


def _check_divisible(image_shape: torch.Size, times: int, argument: str) -> None:
    """Raise unless H and W can be halved ``times`` times."""
    if image_shape[-2] % 2**times or image_shape[-1] % 2**times:
        raise ValueError(
            f"image_shape {tuple(image_shape)}: H and W must be divisible by 2**{times} for"
            f" {argument}"
        )


def real_nvp(
    image_shape: Sequence[int],
    num_scales: int = 2,
    hidden_channels: int = 64,
    alpha: float | None = 0.05,
) -> ImageFlow:
    r"""The multi-scale Real NVP [1, Sec. 3.6] as an :class:`ImageFlow`.

    Each scale but the last: three checkerboard couplings (alternating masks), a squeeze, three
    channel-wise couplings (alternating), then half of the channels factored out
    (:class:`~pyro_dgm.transforms.FactorOut`) and the other half passed to the
    next scale; the last scale: four checkerboard couplings. Couplings are
    :class:`~pyro_dgm.transforms.MaskedAffineCoupling2d` with Glow's small
    convolutional network (:func:`~pyro_dgm.transforms.masked_affine_coupling2d`),
    zero-initialised, so the flow starts as the identity after the preprocessing; [1]'s
    residual networks and batch normalization are not reproduced, and the factored-out
    channels have a standard normal base.

    :param image_shape: ``(C, H, W)``, with ``H`` and ``W`` divisible by
        ``2 ** (num_scales - 1)``.
    :type image_shape: Sequence[int]
    :param num_scales: the number of scales (at least 1).
    :type num_scales: int
    :param hidden_channels: the width of the coupling networks.
    :type hidden_channels: int
    :param alpha: the shrink of the logit preprocessing
        (:class:`~pyro_dgm.transforms.LogitPreprocessing`), the flow's first map;
        ``None`` for none (a density over real-valued images).
    :type alpha: float or None
    :raises ValueError: for a bad ``image_shape``, ``num_scales < 1``, or sizes not divisible
        as above.

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    """
    shape = check_image_shape(image_shape)
    if num_scales < 1:
        raise ValueError(f"num_scales must be at least 1, got {num_scales}")
    _check_divisible(shape, num_scales - 1, f"num_scales={num_scales}")

    def scale(channels: int, scales_left: int) -> list[Transform]:
        def coupling(c: int, mask: str, i: int) -> Transform:
            return masked_affine_coupling2d(c, mask, bool(i % 2), hidden_channels)

        if scales_left == 1:
            return [coupling(channels, "checkerboard", i) for i in range(4)]
        squeezed = 4 * channels
        return [
            *(coupling(channels, "checkerboard", i) for i in range(3)),
            Squeeze2d(),
            *(coupling(squeezed, "channel", i) for i in range(3)),
            FactorOut(squeezed // 2,
                      ComposeTransformModule(scale(squeezed // 2, scales_left - 1))),
            Squeeze2d().inv,
        ]

    preprocessing = [] if alpha is None else [LogitPreprocessing(alpha)]
    return ImageFlow(shape, preprocessing + scale(shape[0], num_scales))


def glow(
    image_shape: Sequence[int],
    num_levels: int = 2,
    num_steps: int = 8,
    hidden_channels: int = 64,
    alpha: float | None = 0.05,
    generator: torch.Generator | None = None,
) -> ImageFlow:
    r"""The multi-scale Glow [1, Fig. 2] as an :class:`ImageFlow`.

    Each level: a squeeze, ``num_steps`` steps of flow
    (:class:`~pyro_dgm.transforms.ActNorm`,
    :class:`~pyro_dgm.transforms.InvertibleConv1x1`, and a channel-wise
    :class:`~pyro_dgm.transforms.MaskedAffineCoupling2d` with a zero-initialised
    last layer), then, but for the last level, half of the channels factored out
    (:class:`~pyro_dgm.transforms.FactorOut`) and the other half passed to
    the next level. The factored-out channels have a standard normal base, not [1]'s learned
    conditional prior, and the couplings use a :math:`\tanh`-bounded scale (see
    :class:`~pyro_dgm.transforms.MaskedAffineCoupling2d`).

    :param image_shape: ``(C, H, W)``, with ``H`` and ``W`` divisible by
        ``2 ** num_levels``.
    :type image_shape: Sequence[int]
    :param num_levels: the number of levels :math:`L` (at least 1; [1] used 3 on 32x32 images;
        2 suits MNIST's 28x28).
    :type num_levels: int
    :param num_steps: the steps of flow per level :math:`K` (at least 1; [1] used 32).
    :type num_steps: int
    :param hidden_channels: the width of the coupling networks.
    :type hidden_channels: int
    :param alpha: the shrink of the logit preprocessing, the flow's first map; ``None`` for
        none.
    :type alpha: float or None
    :param generator: the source of the 1x1 convolutions' initial rotations (torch's global CPU
        generator when ``None``).
    :type generator: torch.Generator or None
    :raises ValueError: for a bad ``image_shape``, ``num_levels < 1``, ``num_steps < 1``, or
        sizes not divisible as above.

    References:

    1. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
       NeurIPS 2018.
    """
    shape = check_image_shape(image_shape)
    if num_levels < 1:
        raise ValueError(f"num_levels must be at least 1, got {num_levels}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    _check_divisible(shape, num_levels, f"num_levels={num_levels}")

    def level(channels: int, levels_left: int) -> list[Transform]:
        squeezed = 4 * channels
        parts: list[Transform] = [Squeeze2d()]
        for _ in range(num_steps):
            parts += [
                ActNorm(squeezed),
                InvertibleConv1x1(squeezed, generator),
                masked_affine_coupling2d(squeezed, "channel", False, hidden_channels),
            ]
        if levels_left > 1:
            deeper = ComposeTransformModule(level(squeezed // 2, levels_left - 1))
            parts.append(FactorOut(squeezed // 2, deeper))
        return [*parts, Squeeze2d().inv]

    preprocessing = [] if alpha is None else [LogitPreprocessing(alpha)]
    return ImageFlow(shape, preprocessing + level(shape[0], num_levels))
