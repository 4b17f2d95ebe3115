r"""The pieces of the multi-scale architecture of Real NVP [1] and Glow [2]: the squeeze
(space-to-depth) and the factoring-out of channels.

At each scale the flow squeezes the image, trading resolution for channels, transforms it, and
factors out half of the channels: these leave the flow and are modelled by the base
distribution directly, while the other half goes on to the next scale [1, Sec. 3.6]. With a
standard normal base for the factored-out channels (no learned conditional prior), this is the
bijection

.. math::

    (\mathbf{h}_{\mathrm{kept}}, \mathbf{h}_{\mathrm{out}}) \mapsto
    (g(\mathbf{h}_{\mathrm{kept}}), \mathbf{h}_{\mathrm{out}}),

with :math:`g` the deeper scales, followed by a standard normal density on the whole output:
:class:`FactorOut`. The deeper scales end by undoing their squeeze (a permutation, log-determinant
zero), so that :math:`g` keeps the shape of its input and every scale's output has the shape of
the data.

References:

1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018.
"""

from __future__ import annotations

__all__ = ["FactorOut", "Squeeze2d"]

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform
from torch.distributions.utils import _sum_rightmost
from torch.nn import functional as F

from .image_base import check_image, clear_caches, real_image


class Squeeze2d(Transform):
    r"""Space-to-depth [1, Sec. 3.6]: each :math:`r \times r` block of pixels becomes
    :math:`r^2` channels, ``(..., C, H, W)`` to ``(..., C r^2, H / r, W / r)``.

    Output channel :math:`c r^2 + i r + j` holds the pixels at offset :math:`(i, j)` of the
    blocks of input channel :math:`c` (:func:`torch.nn.functional.pixel_unshuffle`); the inverse,
    ``Squeeze2d(r).inv``, is :func:`torch.nn.functional.pixel_shuffle`. A permutation:
    :math:`\log \lvert \det J \rvert = 0`. Not named ``Squeeze``, which in torch removes
    dimensions of size one.

    :param factor: the block size :math:`r`.
    :type factor: int
    :raises ValueError: if ``factor`` is not positive, or an input is not of shape
        ``(..., C, H, W)`` with ``H`` and ``W`` divisible by ``factor``.

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    """

    domain = real_image
    codomain = real_image
    bijective = True
    volume_preserving = True

    def __init__(self, factor: int = 2) -> None:
        # Cached so that the transform after it meets the same tensor object again when a
        # ComposeTransform recomputes the chain for the log-determinant.
        super().__init__(cache_size=1)
        if factor < 1:
            raise ValueError(f"factor must be positive, got {factor}")
        self.factor = factor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Squeeze2d) and other.factor == self.factor

    def __hash__(self) -> int:
        return hash((Squeeze2d, self.factor))

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        """``(..., C r^2, H / r, W / r)`` for ``(..., C, H, W)``.

        :raises ValueError: if ``H`` or ``W`` is not divisible by :math:`r`.
        """
        if len(shape) < 3 or shape[-2] % self.factor or shape[-1] % self.factor:
            raise ValueError(
                f"expected a shape (..., C, H, W) with H and W divisible by {self.factor},"
                f" got {tuple(shape)}"
            )
        *batch, channels, height, width = shape
        r = self.factor
        return torch.Size((*batch, channels * r * r, height // r, width // r))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        """``(..., C / r^2, H r, W r)`` for ``(..., C, H, W)``.

        :raises ValueError: if ``C`` is not divisible by :math:`r^2`.
        """
        r = self.factor
        if len(shape) < 3 or shape[-3] % (r * r):
            raise ValueError(
                f"expected a shape (..., C, H, W) with C divisible by {r * r}, got {tuple(shape)}"
            )
        *batch, channels, height, width = shape
        return torch.Size((*batch, channels // (r * r), height * r, width * r))

    def _call(self, x: Tensor) -> Tensor:
        check_image(x)
        self.forward_shape(x.shape)
        return F.pixel_unshuffle(x, self.factor)

    def _inverse(self, y: Tensor) -> Tensor:
        check_image(y)
        self.inverse_shape(y.shape)
        return F.pixel_shuffle(y, self.factor)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """Zero, of shape ``x.shape[:-3]``."""
        return x.new_zeros(x.shape[:-3])


class FactorOut(TransformModule):
    r"""Factoring out channels [1, Sec. 3.6]: the first ``kept_channels`` channels go through
    ``transform``, the others leave unchanged (to be modelled by the base distribution).

    .. math::

        \mathbf{y} = \bigl(g(\mathbf{x}_{1:k}), \mathbf{x}_{k+1:C}\bigr), \qquad
        \log \lvert \det J \rvert = \log \lvert \det J_g(\mathbf{x}_{1:k}) \rvert,

    along the channel dimension of images ``(..., C, H, W)``; :math:`g` must keep the shape
    ``(k, H, W)`` (a deeper scale that ends by undoing its squeeze, see the module
    documentation). The inverse applies :math:`g^{-1}` to the first :math:`k` channels. As in
    Glow [2], the first half continues and the second is factored out. When ``transform`` is a
    :class:`torch.nn.Module` (e.g. a
    :class:`~pyro.distributions.transforms.ComposeTransformModule`) its parameters are this
    module's.

    :param kept_channels: the number :math:`k` of channels that go on through ``transform``.
    :type kept_channels: int
    :param transform: the deeper scales :math:`g`, a bijection of images ``(k, H, W)``
        (``event_dim`` at most 3).
    :type transform: torch.distributions.Transform
    :raises ValueError: if ``kept_channels`` is not positive, or an input has no more than
        :math:`k` channels, or ``transform`` changes the shape of its input.

    Example::

        deeper = ComposeTransformModule([Squeeze2d(), act_norm(8), Squeeze2d().inv])
        scale = FactorOut(2, deeper)  # on (B, 4, H, W): channels 0-1 go deeper, 2-3 leave

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
       NeurIPS 2018.
    """

    domain = real_image
    codomain = real_image
    bijective = True

    def __init__(self, kept_channels: int, transform: Transform) -> None:
        super().__init__(cache_size=1)
        if kept_channels < 1:
            raise ValueError(f"kept_channels must be positive, got {kept_channels}")
        if transform.event_dim > 3:
            raise ValueError(f"transform.event_dim must be at most 3, got {transform.event_dim}")
        self.kept_channels = kept_channels
        self.transform = transform
        self._cached_ladj: tuple[Tensor, Tensor] | None = None  # (input x, log|det J| at x)

    def _check_shape(self, shape: torch.Size) -> None:
        if len(shape) < 3 or shape[-3] <= self.kept_channels:
            raise ValueError(
                f"expected a shape (..., C, H, W) with C > kept_channels = {self.kept_channels},"
                f" got {tuple(shape)}"
            )
        kept = torch.Size((self.kept_channels, *shape[-2:]))
        if self.transform.forward_shape(kept) != kept:
            raise ValueError(
                f"transform must keep the shape {tuple(kept)} of the kept channels, got"
                f" {tuple(self.transform.forward_shape(kept))}"
            )

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        """``shape``, unchanged.

        :raises ValueError: if ``shape`` has no more than :math:`k` channels or ``transform``
            does not keep the shape of the kept channels.
        """
        self._check_shape(shape)
        return torch.Size(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        """``shape``, unchanged; raises as :meth:`forward_shape`."""
        self._check_shape(shape)
        return torch.Size(shape)

    def _ladj(self, kept_x: Tensor, kept_y: Tensor) -> Tensor:
        ladj = self.transform.log_abs_det_jacobian(kept_x, kept_y)
        return _sum_rightmost(ladj, 3 - self.transform.event_dim)

    def _call(self, x: Tensor) -> Tensor:
        check_image(x)
        self._check_shape(x.shape[-3:])
        kept, out = x.split([self.kept_channels, x.shape[-3] - self.kept_channels], dim=-3)
        kept_y = self.transform(kept)
        self._cached_ladj = x, self._ladj(kept, kept_y)
        return torch.cat([kept_y, out], dim=-3)

    def _inverse(self, y: Tensor) -> Tensor:
        check_image(y)
        self._check_shape(y.shape[-3:])
        kept, out = y.split([self.kept_channels, y.shape[-3] - self.kept_channels], dim=-3)
        kept_x = self.transform.inv(kept)
        x = torch.cat([kept_x, out], dim=-3)
        self._cached_ladj = x, self._ladj(kept_x, kept)
        return x

    def clear_cache(self) -> None:
        """Empty this transform's cache and those inside ``transform``."""
        super().clear_cache()
        self._cached_ladj = None
        clear_caches(self.transform)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """That of ``transform`` on the kept channels, of shape ``x.shape[:-3]``."""
        if self._cached_ladj is not None and self._cached_ladj[0] is x:
            return self._cached_ladj[1]
        k = self.kept_channels
        return self._ladj(x[..., :k, :, :], y[..., :k, :, :])
