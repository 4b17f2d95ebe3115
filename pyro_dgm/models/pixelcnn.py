"""A conditional PixelCNN decoder for binary images: gated masked convolutions conditioned on a
context computed from the latent code.

The decoder models :math:`p(x \\mid h) = \\prod_i \\mathrm{Bernoulli}(x_i \\mid \\sigma(f_i(x_{<i},
h)))` over the pixels :math:`i` of an image in raster order (row by row, left to right), where
:math:`h` is a context vector (a VAE's latent code, or the concatenated codes of a hierarchical
VAE). It is the PixelCNN of van den Oord et al. (2016a) with the gated, conditioned layers of van
den Oord et al. (2016b),

.. math::
    y = \\tanh(W_f * x + V_f * s) \\odot \\sigma(W_g * x + V_g * s),

with :math:`*` a masked convolution and :math:`s = m(h)` a feature map of the image's size
computed once from the context (:math:`V * s` a 1x1 convolution: location-dependent
conditioning, section 2.3 of the latter paper). The first layer's mask (type A) hides the
current pixel, the later layers' masks (type B) let each position see its own features, so that
the logit at pixel :math:`i` depends on the input pixels :math:`j < i` only.

Tomczak & Welling (2018) use such a decoder in their PixelHVAE. Their code
(``models/PixelHVAE_2level.py`` and ``utils/nn.py`` of github.com/jmtomczak/vae_vampprior) maps
each latent level by a ``GatedDense`` layer to one 28x28 map, concatenates the maps to the image
as input channels of the first (type A) layer, and stacks 8 masked 3x3 convolutions of 64
channels (1 of type A, 7 of type B), each without bias and followed by batch normalisation and
a ReLU, then a 1x1 convolution to the Bernoulli means. The defaults here take their depth, width
and kernel size, their ``GatedDense`` context map (:class:`~pyro_dgm.models.networks.GatedDense`,
one map per ``context_channels``), and the gated layers and per-layer conditioning of van den
Oord et al. (2016b) instead of ReLUs; no batch normalisation, whose batch statistics in training
mode would let a pixel's output depend on later pixels.

Like the PixelCNN of van den Oord et al. (2016a) and the authors' PixelHVAE, a single stack of
masked convolutions has a blind spot: some pixels above and to the right of pixel :math:`i` lie
outside its receptive field although they precede it (van den Oord et al. 2016b, section 2.2,
remove it with two stacks, which this decoder does not have). The model is still a valid
autoregressive density.

:meth:`PixelCNNDecoder.generate` keeps every layer's features from one pixel to the next and
computes each of them once, as Ramachandran et al. (2017) do.

References:

1. A. van den Oord, N. Kalchbrenner, K. Kavukcuoglu. Pixel Recurrent Neural Networks.
   ICML 2016, arXiv:1601.06759 (masks A and B, section 3.4).
2. A. van den Oord, N. Kalchbrenner, O. Vinyals, L. Espeholt, A. Graves, K. Kavukcuoglu.
   Conditional Image Generation with PixelCNN Decoders. NeurIPS 2016, arXiv:1606.05328
   (gated layers, section 2.1; conditioning, section 2.3).
3. J. M. Tomczak, M. Welling. VAE with a VampPrior. AISTATS 2018, arXiv:1705.07120.
4. P. Ramachandran, T. L. Paine, P. Khorrami, M. Babaeizadeh, S. Chang, Y. Zhang,
   M. A. Hasegawa-Johnson, R. H. Campbell, T. S. Huang. Fast Generation for Convolutional
   Autoregressive Models. ICLR 2017 workshop, arXiv:1704.06001.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_dgm.models.networks import GatedDense

__all__ = ["GatedMaskedConv2d", "MaskedConv2d", "PixelCNNDecoder"]

_MASK_TYPES = ("A", "B")


def _odd_kernel(kernel_size: int | Sequence[int], name: str = "kernel_size") -> tuple[int, int]:
    sizes = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(sizes) != 2 or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1 and size % 2 == 1
        for size in sizes
    ):
        raise ValueError(f"{name} must be an odd positive int or a pair of them, got "
                         f"{kernel_size!r}")
    return sizes


def _non_negative_int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class MaskedConv2d(nn.Conv2d):
    """A 2-D convolution whose kernel is masked so that each output position sees only the
    input positions before it in raster order (van den Oord et al. 2016a, section 3.4).

    The mask keeps the kernel rows above the centre, and in the centre row the columns left of
    the centre; mask type ``"B"`` also keeps the centre (a position sees its own features), type
    ``"A"`` does not (for the first layer, which sees the image: a pixel must not see itself).
    All input channels of a position are masked alike: the channels of one pixel are modelled
    as conditionally independent given the previous pixels. Stride is 1 and the padding keeps
    the spatial size, ``padding = kernel_size // 2`` (zeros).

    :param int in_channels: input channels.
    :param int out_channels: output channels.
    :param kernel_size: an odd int or a pair of odd ints ``(kh, kw)``.
    :param str mask_type: ``"A"`` or ``"B"`` (default ``"B"``).
    :param bool bias: whether to add a learnable bias (default ``True``).
    :param device: where to create the parameters and the mask.
    :param dtype: dtype of the parameters and the mask.
    :raises ValueError: if ``mask_type`` is not ``"A"`` or ``"B"``, or a kernel size is even.

    ``forward(x)`` maps ``(N, in_channels, H, W)`` to ``(N, out_channels, H, W)``; the masked
    weights (``weight * mask``) are used, so the masked entries of ``weight`` get zero gradient.

    Example::

        >>> conv = MaskedConv2d(1, 16, 7, mask_type="A")
        >>> conv(torch.rand(5, 1, 28, 28)).shape
        torch.Size([5, 16, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str = "B",
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ) -> None:
        if mask_type not in _MASK_TYPES:
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        rows, columns = _odd_kernel(kernel_size)
        super().__init__(in_channels, out_channels, (rows, columns),
                         padding=(rows // 2, columns // 2), bias=bias, device=device,
                         dtype=dtype)
        self.mask_type = mask_type
        mask = torch.ones(rows, columns, device=self.weight.device, dtype=self.weight.dtype)
        mask[rows // 2, columns // 2 + (mask_type == "B"):] = 0
        mask[rows // 2 + 1:] = 0
        self.register_buffer("mask", mask)

    @property
    def reach(self) -> tuple[int, int]:
        """``(rows, columns)``: an output position depends on inputs at most this many rows
        above it and this many columns either side of it."""
        rows, columns = self.kernel_size
        return rows // 2, columns // 2

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}"


class GatedMaskedConv2d(nn.Module):
    """A gated masked convolution with optional location-dependent conditioning (van den Oord et
    al. 2016b, sections 2.1 and 2.3):

    .. math::
        y = \\tanh(W_f * x + V_f * s) \\odot \\sigma(W_g * x + V_g * s) \\;[+\\, x],

    where :math:`W * x` is a :class:`MaskedConv2d` (both halves computed by one convolution with
    ``2 * out_channels`` outputs), :math:`V * s` a bias-free 1x1 convolution of a context map
    :math:`s` of the same spatial size, and the residual :math:`+\\, x` is added when
    ``residual`` is true.

    :param int in_channels: input channels.
    :param int out_channels: output channels.
    :param kernel_size: an odd int or a pair of odd ints.
    :param str mask_type: ``"A"`` or ``"B"`` (default ``"B"``).
    :param int context_channels: channels of the context map :math:`s`; 0 (default) for an
        unconditioned layer.
    :param residual: add the input to the output; default: when ``mask_type == "B"`` and
        ``in_channels == out_channels``.
    :param device: where to create the parameters.
    :param dtype: dtype of the parameters.
    :raises ValueError: if a number of channels is not a positive int (``context_channels``:
        not a non-negative int), if ``residual`` is requested with mask type ``"A"`` (the output
        would see the current pixel) or with ``in_channels != out_channels``, or as
        :class:`MaskedConv2d` raises.

    ``forward(x, context=None)`` maps ``x`` of shape ``(N, in_channels, H, W)`` and ``context``
    of shape ``(N, context_channels, H, W)`` (``None`` if and only if ``context_channels`` is
    0) to ``(N, out_channels, H, W)``. ``project_context`` and ``forward_projected`` split this
    in two, so that :math:`V * s` can be computed once and reused.

    Example::

        >>> layer = GatedMaskedConv2d(64, 64, 3, "B", context_channels=1)
        >>> layer(torch.rand(5, 64, 28, 28), torch.rand(5, 1, 28, 28)).shape
        torch.Size([5, 64, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str = "B",
        context_channels: int = 0,
        residual: bool | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _non_negative_int(in_channels, "in_channels", 1)
        _non_negative_int(out_channels, "out_channels", 1)
        context_channels = _non_negative_int(context_channels, "context_channels")
        if residual is None:
            residual = mask_type == "B" and in_channels == out_channels
        elif residual and mask_type != "B":
            raise ValueError("residual must be False with mask_type 'A': the output would see "
                             "the current pixel")
        elif residual and in_channels != out_channels:
            raise ValueError(f"residual needs in_channels == out_channels, got {in_channels} "
                             f"and {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_channels = context_channels
        self.residual = residual
        self.conv = MaskedConv2d(in_channels, 2 * out_channels, kernel_size, mask_type,
                                 device=device, dtype=dtype)
        self.context_projection = (
            nn.Conv2d(context_channels, 2 * out_channels, 1, bias=False, device=device,
                      dtype=dtype)
            if context_channels else None
        )

    @property
    def reach(self) -> tuple[int, int]:
        """The masked convolution's :attr:`MaskedConv2d.reach`."""
        return self.conv.reach

    def project_context(self, context: Tensor) -> Tensor:
        """:math:`[V_f * s, V_g * s]`: shape ``(N, context_channels, H, W)`` to
        ``(N, 2 * out_channels, H, W)``.

        :raises ValueError: if the layer has no context channels or ``context`` has the wrong
            number of channels.
        """
        if self.context_projection is None:
            raise ValueError("context must be None: this layer has context_channels=0")
        if context.dim() != 4 or context.shape[1] != self.context_channels:
            raise ValueError(f"context must have shape (N, {self.context_channels}, H, W), got "
                             f"{tuple(context.shape)}")
        return self.context_projection(context)

    def forward_projected(self, input: Tensor, context_term: Tensor | None) -> Tensor:
        """The layer's output, shape ``(N, out_channels, H, W)``, given ``context_term =
        project_context(context)`` of shape ``(N, 2 * out_channels, H, W)`` (or broadcastable
        to it), or ``None`` without conditioning."""
        hidden = self.conv(input)
        if context_term is not None:
            hidden = hidden + context_term
        value, gate = hidden.chunk(2, dim=-3)
        output = value.tanh() * gate.sigmoid()
        return input + output if self.residual else output

    # Sampling one position at a time (PixelCNNDecoder.generate). Its layer inputs are stored
    # channels-last, (N, rows, columns, channels), zero-padded by the reach above, left and
    # right. The pre-activation at (i, j) is split into the part from the rows above i, known
    # for the whole row i once row i - 1 is done, and the part from row i, columns j - kw // 2
    # to j: a contiguous slice of the channels-last row.

    def _row_part(self, above: Tensor, context_row: Tensor | None) -> Tensor:
        """Bias, context term and the kernel rows above the centre, for every position of a
        row. ``above``: the padded input rows i - kh // 2 to i - 1, shape ``(N, kh // 2, W +
        2 (kw // 2), in_channels)``; ``context_row``: ``(N, 2 * out_channels, W)`` or ``None``.
        Returns shape ``(N, W, 2 * out_channels)``."""
        rows = self.conv.kernel_size[0] // 2
        if rows:
            weight = (self.conv.weight * self.conv.mask)[:, :, :rows]
            part = F.conv2d(above.permute(0, 3, 1, 2), weight, self.conv.bias)[:, :, 0]
        else:  # a one-row kernel sees nothing above
            width = above.shape[2] - 2 * (self.conv.kernel_size[1] // 2)
            part = self.conv.bias[:, None].expand(above.shape[0], -1, width)
        if context_row is not None:
            part = part + context_row
        return part.transpose(1, 2).contiguous()

    def _centre_weight(self) -> Tensor:
        """The masked kernel's centre row, columns 0 to kw // 2, as a matrix of shape
        ``((kw // 2 + 1) * in_channels, 2 * out_channels)`` in the channels-last order."""
        rows, columns = self.conv.kernel_size
        weight = (self.conv.weight * self.conv.mask)[:, :, rows // 2, : columns // 2 + 1]
        return weight.permute(2, 1, 0).reshape(-1, weight.shape[0])

    def _position(self, centre: Tensor, row_part: Tensor, centre_weight: Tensor) -> Tensor:
        """The output at one position, shape ``(N, out_channels)``, from ``centre``: the
        input at row i, columns j - kw // 2 to j, flattened channels-last, shape ``(N, (kw // 2
        + 1) * in_channels)``; ``row_part``: ``_row_part(...)[:, j]``."""
        value, gate = torch.addmm(row_part, centre, centre_weight).chunk(2, dim=-1)
        output = value.tanh() * gate.sigmoid()
        return output + centre[:, -self.in_channels:] if self.residual else output

    def forward(self, input: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            if self.context_projection is not None:
                raise ValueError(f"context of shape (N, {self.context_channels}, H, W) is "
                                 "required: this layer has context channels")
            return self.forward_projected(input, None)
        return self.forward_projected(input, self.project_context(context))

    def extra_repr(self) -> str:
        return f"context_channels={self.context_channels}, residual={self.residual}"


class PixelCNNDecoder(nn.Module):
    """A conditional PixelCNN: Bernoulli logits of every pixel of a binary image given the
    pixels before it in raster order and a context vector.

    The context vector :math:`h` (shape ``(..., context_dim)``) is mapped by ``context_net`` to
    a map :math:`s` of shape ``(..., context_channels, H, W)``; then ``num_layers`` gated masked
    convolutions (:class:`GatedMaskedConv2d`; the first of type A, the others of type B with a
    residual connection, each conditioned on :math:`s` by its own 1x1 convolution) and a 1x1
    convolution give one logit per pixel and channel. See the module's docstring for the
    architecture's sources.

    :param int context_dim: size of the context vector; 0 for an unconditional PixelCNN (then
        ``context`` must be ``None``).
    :param image_shape: ``(C, H, W)``, default ``(1, 28, 28)``.
    :param int channels: channels of every hidden layer (default 64, as the authors'
        PixelHVAE).
    :param int num_layers: number of gated masked convolutions, at least 1 (default 8, as the
        authors' PixelHVAE).
    :param kernel_size: odd kernel size of the type B layers (default 3, as the authors').
    :param first_kernel_size: odd kernel size of the type A layer (default ``kernel_size``; van
        den Oord et al. 2016a use 7).
    :param int context_channels: channels of the context map :math:`s` (default 1; the
        authors' PixelHVAE has one map per latent level, 2 in all).
    :param context_net: module mapping the context ``(M, context_dim)`` to the map ``(M,
        context_channels, H, W)``; default a :class:`~pyro_dgm.models.networks.GatedDense`
        layer to ``context_channels * H * W`` units, reshaped (the authors'). Unused when
        ``context_dim`` is 0.
    :param device: where to create the parameters.
    :param dtype: dtype of the parameters.
    :raises ValueError: on a non-positive size, an even kernel size, or an ``image_shape`` that
        is not three positive ints.

    ``forward(x, context)`` returns the logits, of the broadcast batch shape of ``x`` (shape
    ``(..., C, H, W)``) and ``context`` (shape ``(..., context_dim)``) followed by ``(C, H,
    W)``. The log-likelihood of binary ``x`` is then
    ``pyro.distributions.Bernoulli(logits=logits).to_event(3).log_prob(x)``: one forward pass
    gives every pixel's conditional, as training needs. :meth:`generate` samples.

    Example::

        >>> decoder = PixelCNNDecoder(context_dim=40)
        >>> x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.13))
        >>> decoder(x, torch.randn(5, 40)).shape
        torch.Size([5, 1, 28, 28])
        >>> decoder.generate(torch.randn(3, 40)).shape
        torch.Size([3, 1, 28, 28])
    """

    def __init__(
        self,
        context_dim: int,
        image_shape: Sequence[int] = (1, 28, 28),
        channels: int = 64,
        num_layers: int = 8,
        kernel_size: int | tuple[int, int] = 3,
        first_kernel_size: int | tuple[int, int] | None = None,
        context_channels: int = 1,
        context_net: nn.Module | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.context_dim = _non_negative_int(context_dim, "context_dim")
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1
            for size in image_shape
        ):
            raise ValueError(f"image_shape must be three positive ints (C, H, W), got "
                             f"{image_shape!r}")
        self.image_shape = image_shape
        _non_negative_int(channels, "channels", 1)
        _non_negative_int(num_layers, "num_layers", 1)
        _odd_kernel(kernel_size)
        first_kernel_size = kernel_size if first_kernel_size is None else first_kernel_size
        _odd_kernel(first_kernel_size, "first_kernel_size")
        in_channels, height, width = image_shape
        if context_dim:
            self.context_channels = _non_negative_int(context_channels, "context_channels", 1)
            if context_net is None:
                context_net = nn.Sequential(
                    GatedDense(context_dim, context_channels * height * width, device=device,
                               dtype=dtype),
                    nn.Unflatten(-1, (context_channels, height, width)),
                )
            self.context_net = context_net
        else:
            self.context_channels = 0
            self.context_net = None
        factory = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList(
            [GatedMaskedConv2d(in_channels, channels, first_kernel_size, "A",
                               self.context_channels, **factory)]
            + [GatedMaskedConv2d(channels, channels, kernel_size, "B", self.context_channels,
                                 **factory)
               for _ in range(num_layers - 1)]
        )
        self.output = nn.Conv2d(channels, in_channels, 1, **factory)

    @property
    def reach(self) -> tuple[int, int]:
        """``(rows, columns)``: the logit at pixel ``(i, j)`` depends only on input pixels in
        rows ``i - rows`` to ``i`` and columns ``j - columns`` to ``j + columns`` (the sums of
        the layers' reaches)."""
        return (sum(layer.reach[0] for layer in self.layers),
                sum(layer.reach[1] for layer in self.layers))

    def _context_terms(self, context: Tensor | None, batch_size: int) -> list[Tensor | None]:
        """Each layer's :math:`V * s` for a context of shape ``(batch_size, context_dim)``."""
        if self.context_net is None:
            return [None] * len(self.layers)
        context_map = self.context_net(context)
        expected = (batch_size, self.context_channels, *self.image_shape[1:])
        if context_map.shape != expected:
            raise ValueError(f"context_net must return shape {expected}, got "
                             f"{tuple(context_map.shape)}")
        return [layer.project_context(context_map) for layer in self.layers]

    def _logits(self, x: Tensor, context_terms: Sequence[Tensor | None]) -> Tensor:
        hidden = x
        for layer, term in zip(self.layers, context_terms):
            hidden = layer.forward_projected(hidden, term)
        return self.output(hidden)

    def _check_context(self, context: Tensor | None) -> None:
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("context must be None: this decoder has context_dim=0")
        elif context is None or context.dim() < 1 or context.shape[-1] != self.context_dim:
            shape = None if context is None else tuple(context.shape)
            raise ValueError(f"context must have shape (..., {self.context_dim}), got {shape}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if x.dim() < 4 or tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.image_shape))}) "
                             f"or with more batch dims, got {tuple(x.shape)}")
        self._check_context(context)
        batch_shape = x.shape[:-3]
        if context is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, context.shape[:-1])
            context = context.expand(*batch_shape, self.context_dim).reshape(-1,
                                                                             self.context_dim)
        flat = x.expand(*batch_shape, *self.image_shape).reshape(-1, *self.image_shape)
        logits = self._logits(flat, self._context_terms(context, flat.shape[0]))
        return logits.reshape(*batch_shape, *self.image_shape)

    @torch.no_grad()
    def generate(
        self,
        context: Tensor | None = None,
        num_samples: int | None = None,
        *,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Sample images pixel by pixel in raster order: pixel :math:`i` is drawn from
        :math:`\\mathrm{Bernoulli}(\\sigma(f_i(x_{<i}, h)))` given the pixels already drawn.

        Cost: the context map and each layer's :math:`V * s` are computed once, for the whole
        image. Then, for each of the ``H * W`` pixels in turn, every layer is evaluated at that
        pixel only, from the layer inputs at the positions its mask sees, kept from the earlier
        steps: a layer's features at a position depend only on the pixels before that
        position, so they are final once computed (the caching of Ramachandran et al. 2017). The
        kernel rows above the centre are applied once per image row and layer, for the whole
        row, the centre row once per pixel and layer. Each layer is thus evaluated once per
        position, as in one :meth:`forward` pass, and the sampler's arithmetic is at most that
        of one forward pass (less, as the masked kernel entries are skipped), in ``H * W``
        sequential steps of ``num_layers + 1`` small matrix products. The naive sampler runs
        ``H * W`` full forward passes.

        :param context: context vectors of shape ``(..., context_dim)``, one image per vector;
            ``None`` for an unconditional decoder.
        :param num_samples: number of images when ``context`` is ``None``.
        :param generator: a :class:`torch.Generator` on the sampling device, for reproducible
            draws (default: torch's global generator).
        :param bool return_logits: also return the logits each pixel was drawn with.
        :return: binary images (0. or 1.) of shape ``(..., C, H, W)`` on the context's device
            and dtype (the parameters' when ``context`` is ``None``); with ``return_logits``,
            the pair ``(images, logits)``, where ``logits`` equals ``forward(images, context)``
            up to the order of the floating-point sums.
        :raises ValueError: if ``context`` does not match ``context_dim``, or
            ``num_samples`` is missing or given with a context.
        """
        self._check_context(context)
        if context is None:
            if num_samples is None:
                raise ValueError("num_samples is required when context is None")
            batch_shape = torch.Size([_non_negative_int(num_samples, "num_samples", 1)])
            device, dtype = self.output.weight.device, self.output.weight.dtype
        else:
            if num_samples is not None:
                raise ValueError("num_samples must be None when context is given: one image "
                                 "per context vector")
            batch_shape = context.shape[:-1]
            device, dtype = context.device, context.dtype
            context = context.reshape(-1, self.context_dim)
        batch_size = batch_shape.numel()
        channels, height, width = self.image_shape
        terms = self._context_terms(context, batch_size)
        reaches = [layer.reach for layer in self.layers]
        # inputs[k]: the input of layer k (inputs[0] the image), channels-last and zero-padded
        # by the layer's reach above, left and right (see GatedMaskedConv2d._row_part).
        inputs = [
            torch.zeros(batch_size, height + rows, width + 2 * columns, layer.in_channels,
                        device=device, dtype=dtype)
            for layer, (rows, columns) in zip(self.layers, reaches)
        ]
        centre_weights = [layer._centre_weight() for layer in self.layers]
        head_weight = self.output.weight.flatten(1)
        logits = torch.empty(batch_size, height, width, channels, device=device, dtype=dtype)
        for row in range(height):
            # Every layer's input above this row is final: the rows above, for the whole row.
            row_parts = [
                layer._row_part(stored[:, row: row + rows],
                                None if term is None else term[:, :, row])
                for layer, stored, (rows, _), term in zip(self.layers, inputs, reaches, terms)
            ]
            for column in range(width):
                for index, layer in enumerate(self.layers):
                    rows, columns = reaches[index]
                    centre = inputs[index][:, row + rows, column: column + columns + 1]
                    hidden = layer._position(centre.flatten(1), row_parts[index][:, column],
                                             centre_weights[index])
                    if index + 1 < len(self.layers):
                        below, beside = reaches[index + 1]
                        inputs[index + 1][:, row + below, column + beside] = hidden
                pixel_logits = F.linear(hidden, head_weight, self.output.bias)
                logits[:, row, column] = pixel_logits
                below, beside = reaches[0]
                inputs[0][:, row + below, column + beside] = torch.bernoulli(
                    pixel_logits.sigmoid(), generator=generator)
        below, beside = reaches[0]
        images = inputs[0][:, below:, beside: beside + width].permute(0, 3, 1, 2)
        images = images.reshape(*batch_shape, *self.image_shape)
        if return_logits:
            logits = logits.permute(0, 3, 1, 2).reshape(*batch_shape, *self.image_shape)
            return images, logits
        return images
