r"""Affine coupling for images, with the checkerboard and channel-wise masks of Real NVP.

Named ``MaskedAffineCoupling2d`` because the papers' own name, affine coupling, is taken by
Pyro's :class:`~pyro.distributions.transforms.AffineCoupling`, which splits a *vector* at one
index; here a binary mask :math:`\mathbf{b}` over ``(C, H, W)`` chooses the conditioning
entries, as in Real NVP's masked formulation [1], and ``2d`` marks the image layout as in
:class:`torch.nn.Conv2d`.

As Pyro's transforms, it comes as a triple sharing one map, mask and log-determinant:
:class:`ConditionedMaskedAffineCoupling2d` (a given network),
:class:`MaskedAffineCoupling2d` (a learned network, a subclass of it) and
:class:`ConditionalMaskedAffineCoupling2d` (a network that also reads a context, as in Flow++'s
variational dequantization [3]), with the helpers :func:`masked_affine_coupling2d` and
:func:`conditional_masked_affine_coupling2d`.

References:

1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
2. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018.
3. J\. Ho, X. Chen, A. Srinivas, Y. Duan, P. Abbeel, "Flow++: Improving Flow-Based Generative
   Models with Variational Dequantization and Architecture Design", ICML 2019.
"""

from __future__ import annotations

__all__ = [
    "ConditionalMaskedAffineCoupling2d",
    "ConditionedMaskedAffineCoupling2d",
    "MaskedAffineCoupling2d",
    "conditional_masked_affine_coupling2d",
    "masked_affine_coupling2d",
]

from collections.abc import Callable

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform

from .image_base import check_image, real_image

_MASKS = ("checkerboard", "channel")


def _check_mask(mask: str, channels: int) -> None:
    """Raise a ValueError for an unknown ``mask`` or too few ``channels`` for it."""
    if mask not in _MASKS:
        raise ValueError(f"mask must be one of {_MASKS}, got {mask!r}")
    minimum = 2 if mask == "channel" else 1
    if channels < minimum:
        raise ValueError(
            f"channels must be at least {minimum} with mask={mask!r}, got {channels}"
        )


def _apply_to_images(net: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """``net`` (images ``(N, C, H, W)`` to ``(N, C', H, W)``) on ``images`` of any batch shape
    ``(..., C, H, W)``, returning ``(..., C', H, W)``."""
    out = net(images.reshape(-1, *images.shape[-3:]))
    return out.reshape(*images.shape[:-3], *out.shape[-3:])


class ConditionedMaskedAffineCoupling2d(Transform):
    r"""Affine coupling layer for images [1] with a given network, e.g. one whose context is
    fixed (:class:`ConditionalMaskedAffineCoupling2d` builds this transform from a context):

    .. math::

        \mathbf{y} = \mathbf{b} \odot \mathbf{x} + (1 - \mathbf{b}) \odot
        \bigl(\mathbf{x} \odot e^{\mathbf{s}} + \mathbf{t}\bigr), \qquad
        \mathbf{s} = \boldsymbol{\rho} \odot \tanh \tilde{\mathbf{s}}, \qquad
        (\mathbf{t}, \tilde{\mathbf{s}}) = \mathrm{NN}(\mathbf{b} \odot \mathbf{x}),

    on images of shape ``(..., C, H, W)`` (``event_dim = 3``), in the normalizing direction of
    [1] (data to noise), with

    .. math::

        \log \lvert \det J \rvert = \sum_{c,h,w} (1 - b_{c,h,w})\, s_{c,h,w}.

    The inverse is :math:`\mathbf{x} = \mathbf{b} \odot \mathbf{y} + (1 - \mathbf{b}) \odot
    (\mathbf{y} - \mathbf{t}) \odot e^{-\mathbf{s}}`, exact because
    :math:`\mathbf{b} \odot \mathbf{y} = \mathbf{b} \odot \mathbf{x}` bit for bit.

    * ``mask="checkerboard"``: :math:`b_{c,h,w} = 1` where :math:`h + w` is even (odd with
      ``invert_mask``), in every channel.
    * ``mask="channel"``: :math:`b_{c,h,w} = 1` for the first :math:`\lfloor C/2 \rfloor`
      channels (the others with ``invert_mask``).

    With a network that also reads a context :math:`\mathbf{h}`,
    :math:`(\mathbf{t}, \tilde{\mathbf{s}}) = \mathrm{NN}(\mathbf{b} \odot \mathbf{x},
    \mathbf{h})`: Flow++ [2, Sec. 3.2] conditions its dequantizing flow's couplings this way,
    on features of the image being dequantized.

    The network is called once per forward or inverse call; the log-determinant of that call is
    kept with its input, so the ``log_abs_det_jacobian`` that follows does not call it again.

    :param channels: the number of channels :math:`C` (at least 2 for ``mask="channel"``).
    :type channels: int
    :param hypernet: maps the masked input ``(..., C, H, W)`` to ``(..., 2 C, H, W)``, the
        shift :math:`\mathbf{t}` then the unscaled log-scale :math:`\tilde{\mathbf{s}}` along
        the channels; e.g. ``functools.partial(net, context=h)``.
    :type hypernet: Callable[[Tensor], Tensor]
    :param mask: ``"checkerboard"`` or ``"channel"``.
    :type mask: str
    :param invert_mask: whether to swap the roles of the two halves.
    :type invert_mask: bool
    :param log_scale_factor: :math:`\boldsymbol{\rho}`, shape ``(C, 1, 1)``; ``None`` for 1.
    :type log_scale_factor: Tensor or None
    :raises ValueError: for an unknown ``mask``, ``channels < 2`` with ``mask="channel"``, or
        an input not of shape ``(..., C, H, W)``.

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    2. J\. Ho, X. Chen, A. Srinivas, Y. Duan, P. Abbeel, "Flow++: Improving Flow-Based
       Generative Models with Variational Dequantization and Architecture Design", ICML 2019.
    """

    domain = real_image
    codomain = real_image
    bijective = True

    def __init__(
        self,
        channels: int,
        hypernet: Callable[[Tensor], Tensor],
        mask: str = "checkerboard",
        invert_mask: bool = False,
        log_scale_factor: Tensor | None = None,
    ) -> None:
        super().__init__(cache_size=1)
        _check_mask(mask, channels)
        self.channels = channels
        self.hypernet = hypernet
        self.mask_type = mask
        self.invert_mask = invert_mask
        self.log_scale_factor = log_scale_factor
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

    def _hypernet_output(self, masked: Tensor) -> Tensor:
        return self.hypernet(masked)

    def _shift_and_log_scale(self, x_or_y: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`(1 - \\mathbf{b}) \\odot \\mathbf{t}` and :math:`(1 - \\mathbf{b}) \\odot
        \\mathbf{s}` at ``x_or_y`` ``(..., C, H, W)`` (the same at :math:`\\mathbf{x}` and at
        :math:`\\mathbf{y}`, whose conditioning entries agree)."""
        check_image(x_or_y, self.channels)
        mask = self.mask(x_or_y)
        shift, raw = self._hypernet_output(mask * x_or_y).chunk(2, dim=-3)
        log_scale = torch.tanh(raw)
        if self.log_scale_factor is not None:
            log_scale = self.log_scale_factor * log_scale
        free = 1 - mask
        return free * shift, free * log_scale

    def _call(self, x: Tensor) -> Tensor:
        shift, log_scale = self._shift_and_log_scale(x)
        self._cached_ladj = x, log_scale.sum((-3, -2, -1))
        return x * log_scale.exp() + shift

    def _inverse(self, y: Tensor) -> Tensor:
        shift, log_scale = self._shift_and_log_scale(y)
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
        return self._shift_and_log_scale(x)[1].sum((-3, -2, -1))


class MaskedAffineCoupling2d(ConditionedMaskedAffineCoupling2d, TransformModule):
    r"""Affine coupling layer for images [1], with a checkerboard or a channel-wise mask: the
    map of :class:`ConditionedMaskedAffineCoupling2d`,

    .. math::

        \mathbf{y} = \mathbf{b} \odot \mathbf{x} + (1 - \mathbf{b}) \odot
        \bigl(\mathbf{x} \odot e^{\mathbf{s}} + \mathbf{t}\bigr), \qquad
        \mathbf{s} = \boldsymbol{\rho} \odot \tanh \tilde{\mathbf{s}}, \qquad
        (\mathbf{t}, \tilde{\mathbf{s}}) = \mathrm{NN}(\mathbf{b} \odot \mathbf{x}),

    :math:`\log \lvert \det J \rvert = \sum_{c,h,w} (1 - b_{c,h,w})\, s_{c,h,w}`, on images of
    shape ``(..., C, H, W)`` (``event_dim = 3``), in the normalizing direction of [1], with a
    learned network and learned :math:`\boldsymbol{\rho}`. The masks are those of
    :class:`ConditionedMaskedAffineCoupling2d`; the network is called once per forward or
    inverse call, on the images flattened to ``(N, C, H, W)``.

    **Scale**: the log-scale is :math:`\tanh` of the network's output times a learned
    per-channel factor :math:`\boldsymbol{\rho}` (:attr:`log_scale_factor`, shape
    ``(C, 1, 1)``, initially 1): bounded by :math:`\lvert \rho_c \rvert`, so that one step
    cannot blow up. Glow's :math:`\operatorname{sigmoid}(\tilde s + 2)` is not used because it
    does not give the identity at a zero output. With a last layer initialised to zero
    (:func:`masked_affine_coupling2d` does that), :math:`\mathbf{s} = \mathbf{t} = 0` and the
    layer starts as the identity [2].

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

    def __init__(
        self,
        channels: int,
        hypernet: nn.Module,
        mask: str = "checkerboard",
        invert_mask: bool = False,
    ) -> None:
        super().__init__(channels, hypernet, mask, invert_mask)
        self.log_scale_factor = nn.Parameter(torch.ones(channels, 1, 1))

    def _hypernet_output(self, masked: Tensor) -> Tensor:
        return _apply_to_images(self.hypernet, masked)


def _glow_coupling_layers(
    in_channels: int, hidden_channels: int, out_channels: int
) -> list[nn.Module]:
    """Glow's coupling network [2, Sec. 3.3] as layers: a 3x3 convolution, a 1x1 convolution
    (ReLUs after both) and a 3x3 convolution initialised to zero, all with 'same' padding."""
    layers = [
        nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, 1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, out_channels, 3, padding=1),
    ]
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return layers


class _CouplingNet(nn.Sequential):
    """Glow's coupling network [2, Sec. 3.3]: a 3x3 convolution, a 1x1 convolution (ReLUs
    after both) and a zero-initialised 3x3 convolution, all with 'same' padding."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__(*_glow_coupling_layers(channels, hidden_channels, 2 * channels))


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


class _ContextCouplingNet(nn.Module):
    """Glow's coupling network on the masked input and the context stacked along the
    channels, to ``2 * channels``, its last layer zero-initialised."""

    def __init__(self, channels: int, context_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *_glow_coupling_layers(channels + context_channels, hidden_channels, 2 * channels)
        )

    def forward(self, masked: Tensor, context: Tensor) -> Tensor:
        """``masked`` ``(..., C, H, W)``, ``context`` ``(..., F, H, W)`` with leading
        dimensions that broadcast to those of ``masked`` (a batch ``(B,)`` against particles
        ``(S, B)``); returns ``(..., 2 C, H, W)``."""
        context = context.expand(*masked.shape[:-3], *context.shape[-3:])
        return _apply_to_images(self.net, torch.cat([masked, context], dim=-3))


class ConditionalMaskedAffineCoupling2d(ConditionalTransformModule):
    r"""An image affine coupling whose network also reads a context:
    ``condition(context)`` returns the :class:`ConditionedMaskedAffineCoupling2d` with that
    context, :math:`\mathbf{h}` of shape ``(..., F, H, W)`` (the spatial size of the images),
    and this module's learned :math:`\boldsymbol{\rho}` (:attr:`log_scale_factor`). Flow++ [1,
    Sec. 3.2] conditions its dequantizing flow's couplings this way.

    :param channels: :math:`C`.
    :type channels: int
    :param hypernet: called as ``hypernet(masked, context)``, mapping ``(..., C, H, W)`` and
        ``(..., F, H, W)`` to ``(..., 2 C, H, W)``; e.g. the network built by
        :func:`conditional_masked_affine_coupling2d`.
    :type hypernet: torch.nn.Module
    :param mask: ``"checkerboard"`` or ``"channel"``.
    :type mask: str
    :param invert_mask: whether to swap the roles of the two halves.
    :type invert_mask: bool
    :raises ValueError: as :class:`ConditionedMaskedAffineCoupling2d`.

    Example::

        coupling = conditional_masked_affine_coupling2d(2, 16, mask="channel")
        y = coupling.condition(h)(x)  # x: (B, 2, 8, 8), h: (B, 16, 8, 8)

    References:

    1. J\. Ho, X. Chen, A. Srinivas, Y. Duan, P. Abbeel, "Flow++: Improving Flow-Based
       Generative Models with Variational Dequantization and Architecture Design", ICML 2019.
    """

    def __init__(self, channels: int, hypernet: nn.Module, mask: str = "checkerboard",
                 invert_mask: bool = False) -> None:
        super().__init__()
        _check_mask(mask, channels)
        self.channels = channels
        self.hypernet = hypernet
        self.mask_type = mask
        self.invert_mask = invert_mask
        #: :math:`\boldsymbol{\rho}`, shape ``(C, 1, 1)``, initially 1
        self.log_scale_factor = nn.Parameter(torch.ones(channels, 1, 1))

    def condition(self, context: Tensor) -> ConditionedMaskedAffineCoupling2d:
        """The coupling with the context :math:`\\mathbf{h}` = ``context``."""

        def hypernet(masked: Tensor) -> Tensor:
            return self.hypernet(masked, context)

        return ConditionedMaskedAffineCoupling2d(self.channels, hypernet, self.mask_type,
                                                 self.invert_mask, self.log_scale_factor)


def conditional_masked_affine_coupling2d(
    channels: int,
    context_channels: int,
    mask: str = "checkerboard",
    invert_mask: bool = False,
    hidden_channels: int = 32,
) -> ConditionalMaskedAffineCoupling2d:
    """Build a :class:`ConditionalMaskedAffineCoupling2d`, in the manner of Pyro's helpers,
    with Glow's coupling network (as :func:`masked_affine_coupling2d`'s) on the masked input
    and the context stacked along the channels, its last layer zero-initialised (the coupling
    starts as the identity).

    :param channels: :math:`C`.
    :type channels: int
    :param context_channels: :math:`F`, the channels of the context.
    :type context_channels: int
    :param mask: ``"checkerboard"`` or ``"channel"``.
    :type mask: str
    :param invert_mask: whether to swap the roles of the two halves.
    :type invert_mask: bool
    :param hidden_channels: the width of the network's hidden layers.
    :type hidden_channels: int
    :raises ValueError: as :class:`ConditionalMaskedAffineCoupling2d`, or for a
        non-positive ``context_channels`` or ``hidden_channels``.
    """
    if context_channels < 1 or hidden_channels < 1:
        raise ValueError("context_channels and hidden_channels must be positive, got "
                         f"{context_channels} and {hidden_channels}")
    net = _ContextCouplingNet(channels, context_channels, hidden_channels)
    return ConditionalMaskedAffineCoupling2d(channels, net, mask, invert_mask)
