r"""Affine coupling for images, with the checkerboard and channel-wise masks of Real NVP.

Named ``MaskedAffineCoupling2d`` because the papers' own name, affine coupling, is taken by
Pyro's :class:`~pyro.distributions.transforms.AffineCoupling`, which splits a *vector* at one
index; here a binary mask :math:`\mathbf{b}` over ``(C, H, W)`` chooses the conditioning
entries, as in Real NVP's masked formulation [1], and ``2d`` marks the image layout as in
:class:`torch.nn.Conv2d`.

References:

1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018.
"""

from __future__ import annotations

__all__ = ["MaskedAffineCoupling2d", "masked_affine_coupling2d"]

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from .image_base import check_image, real_image

_MASKS = ("checkerboard", "channel")


class MaskedAffineCoupling2d(TransformModule):
    r"""Affine coupling layer for images [1], with a checkerboard or a channel-wise mask.

    .. math::

        \mathbf{y} = \mathbf{b} \odot \mathbf{x} + (1 - \mathbf{b}) \odot
        \bigl(\mathbf{x} \odot e^{\mathbf{s}} + \mathbf{t}\bigr), \qquad
        \mathbf{s} = \boldsymbol{\rho} \odot \tanh \tilde{\mathbf{s}}, \qquad
        (\mathbf{t}, \tilde{\mathbf{s}}) = \mathrm{NN}(\mathbf{b} \odot \mathbf{x}),

    on images of shape ``(..., C, H, W)`` (``event_dim = 3``), in the normalizing direction of
    [1], with

    .. math::

        \log \lvert \det J \rvert = \sum_{c,h,w} (1 - b_{c,h,w})\, s_{c,h,w}.

    The inverse is :math:`\mathbf{x} = \mathbf{b} \odot \mathbf{y} + (1 - \mathbf{b}) \odot
    (\mathbf{y} - \mathbf{t}) \odot e^{-\mathbf{s}}`, exact because
    :math:`\mathbf{b} \odot \mathbf{y} = \mathbf{b} \odot \mathbf{x}` bit for bit.

    * ``mask="checkerboard"``: :math:`b_{c,h,w} = 1` where :math:`h + w` is even (odd with
      ``invert_mask``), in every channel.
    * ``mask="channel"``: :math:`b_{c,h,w} = 1` for the first :math:`\lfloor C/2 \rfloor`
      channels (the others with ``invert_mask``).

    **Scale**: the log-scale is :math:`\tanh` of the network's output times a learned
    per-channel factor :math:`\boldsymbol{\rho}` (:attr:`log_scale_factor`, initially 1):
    bounded by :math:`\lvert \rho_c \rvert`, so that one step cannot blow up. Glow's
    :math:`\operatorname{sigmoid}(\tilde s + 2)` is not used because it does not give the
    identity at a zero output. With a last layer initialised to zero
    (:func:`masked_affine_coupling2d` does that), :math:`\mathbf{s} = \mathbf{t} = 0` and the
    layer starts as the identity [2].

    The network is called once per forward or inverse call; the log-determinant of that call is
    kept with its input, so the ``log_abs_det_jacobian`` that follows does not call it again.

    :param channels: the number of channels :math:`C` (at least 2 for ``mask="channel"``).
    :type channels: int
    :param hypernet: maps images ``(N, C, H, W)`` (the masked input) to ``(N, 2 C, H, W)``, the
        shift :math:`\mathbf{t}` then the unscaled log-scale :math:`\tilde{\mathbf{s}}` along the
        channels; e.g. the network built by :func:`masked_affine_coupling2d`.
    :type hypernet: torch.nn.Module
    :param mask: ``"checkerboard"`` or ``"channel"``.
    :type mask: str
    :param invert_mask: whether to swap the roles of the two halves.
    :type invert_mask: bool
    :raises ValueError: for an unknown ``mask``, ``channels < 2`` with ``mask="channel"``, or an
        input not of shape ``(..., C, H, W)``.

    Example::

        coupling = masked_affine_coupling2d(4, mask="checkerboard", hidden_channels=32)
        y = coupling(x)  # x: (B, 4, 16, 16); the identity until trained

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
       NeurIPS 2018.
    """

    domain = real_image
    codomain = real_image
    bijective = True

    def __init__(
        self,
        channels: int,
        hypernet: nn.Module,
        mask: str = "checkerboard",
        invert_mask: bool = False,
    ) -> None:
        super().__init__(cache_size=1)
        if mask not in _MASKS:
            raise ValueError(f"mask must be one of {_MASKS}, got {mask!r}")
        minimum = 2 if mask == "channel" else 1
        if channels < minimum:
            raise ValueError(
                f"channels must be at least {minimum} with mask={mask!r}, got {channels}"
            )
        self.channels = channels
        self.hypernet = hypernet
        self.mask_type = mask
        self.invert_mask = invert_mask
        self.log_scale_factor = nn.Parameter(torch.ones(channels, 1, 1))
        self._cached_ladj: tuple[Tensor, Tensor] | None = None  # (input x, log|det J| at x)

    def mask(self, like: Tensor) -> Tensor:
        """The mask :math:`\\mathbf{b}`, 1 on the conditioning entries, with the dtype and
        device of ``like`` (shape ``(..., C, H, W)``), broadcastable to ``(C, H, W)``."""
        channels, height, width = like.shape[-3:]
        if self.mask_type == "checkerboard":
            rows = torch.arange(height, device=like.device)
            cols = torch.arange(width, device=like.device)
            mask = ((rows[:, None] + cols) % 2 == int(self.invert_mask)).unsqueeze(0)
        else:
            mask = (torch.arange(channels, device=like.device) < channels // 2)[:, None, None]
            mask = mask ^ self.invert_mask
        return mask.to(like.dtype)

    def _shift_and_log_scale(self, masked: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`(1 - \\mathbf{b}) \\odot \\mathbf{t}` and :math:`(1 - \\mathbf{b}) \\odot
        \\mathbf{s}` from the masked input ``(..., C, H, W)``."""
        params = self.hypernet(masked.reshape(-1, *masked.shape[-3:]))
        shift, raw = params.reshape(*masked.shape[:-3], *params.shape[-3:]).chunk(2, dim=-3)
        free = 1 - mask
        return free * shift, free * self.log_scale_factor * torch.tanh(raw)

    def _call(self, x: Tensor) -> Tensor:
        check_image(x, self.channels)
        mask = self.mask(x)
        shift, log_scale = self._shift_and_log_scale(mask * x, mask)
        self._cached_ladj = x, log_scale.sum((-3, -2, -1))
        return x * log_scale.exp() + shift

    def _inverse(self, y: Tensor) -> Tensor:
        check_image(y, self.channels)
        mask = self.mask(y)
        shift, log_scale = self._shift_and_log_scale(mask * y, mask)
        x = (y - shift) * torch.exp(-log_scale)
        self._cached_ladj = x, log_scale.sum((-3, -2, -1))
        return x

    def clear_cache(self) -> None:
        super().clear_cache()
        self._cached_ladj = None

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\sum (1 - \\mathbf{b}) \\odot \\mathbf{s}`, of shape ``x.shape[:-3]``."""
        if self._cached_ladj is not None and self._cached_ladj[0] is x:
            return self._cached_ladj[1]
        mask = self.mask(x)
        return self._shift_and_log_scale(mask * x, mask)[1].sum((-3, -2, -1))


class _CouplingNet(nn.Sequential):
    """Glow's coupling network [2, Sec. 3.3]: a 3x3 convolution, a 1x1 convolution (ReLUs
    after both) and a zero-initialised 3x3 convolution, all with 'same' padding."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 2 * channels, 3, padding=1),
        )
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)


def masked_affine_coupling2d(
    channels: int,
    mask: str = "checkerboard",
    invert_mask: bool = False,
    hidden_channels: int = 64,
) -> MaskedAffineCoupling2d:
    """Build a :class:`MaskedAffineCoupling2d`, in the manner of Pyro's helpers, with Glow's
    network: 3x3 convolution, ReLU, 1x1 convolution, ReLU, and a zero-initialised 3x3
    convolution to the :math:`2C` output channels, so the layer starts as the identity.

    :param channels: the number of channels :math:`C`.
    :type channels: int
    :param mask: ``"checkerboard"`` or ``"channel"``.
    :type mask: str
    :param invert_mask: whether to swap the roles of the two halves.
    :type invert_mask: bool
    :param hidden_channels: the width of the network's hidden layers.
    :type hidden_channels: int
    :raises ValueError: as :class:`MaskedAffineCoupling2d`, or for ``hidden_channels < 1``.
    """
    if hidden_channels < 1:
        raise ValueError(f"hidden_channels must be positive, got {hidden_channels}")
    return MaskedAffineCoupling2d(
        channels, _CouplingNet(channels, hidden_channels), mask, invert_mask
    )
