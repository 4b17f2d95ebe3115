"""Likelihoods :math:`p(x \\mid z)` that need more than parameters of :math:`z`: the
autoregressive PixelCNN likelihood, whose density of an image is computed from the image
itself (every pixel's Bernoulli given the pixels before it).

A VAE's decoder returns either Bernoulli logits shaped like the data or a distribution over the
data; :class:`PixelCNNLikelihood` returns the distribution :class:`PixelCNNBernoulli`, so a
PixelCNN decoder takes a plain decoder's place in :class:`~pyro_dgm.models.VAE` and
:class:`~pyro_dgm.models.HierarchicalVAE`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from pyro_dgm.models.pixelcnn import PixelCNNDecoder

__all__ = ["PixelCNNBernoulli", "PixelCNNLikelihood"]


class PixelCNNBernoulli(TorchDistribution):
    """The autoregressive Bernoulli distribution of binary images that a conditional PixelCNN
    defines given a context :math:`h`,
    :math:`p(x \\mid h) = \\prod_i \\mathrm{Bernoulli}(x_i \\mid \\sigma(f_i(x_{<i}, h)))`
    (van den Oord et al. 2016).

    ``log_prob(x)`` runs the network once on ``x`` (every conditional at once);
    ``sample()`` draws pixel by pixel with :meth:`PixelCNNDecoder.generate`; there is no
    ``rsample`` and no closed-form ``mean``.

    :param PixelCNNDecoder decoder: the network.
    :param Tensor context: shape ``batch_shape + (decoder.context_dim,)``.
    :param event_shape: the shape of one image as the data hold it: ``decoder.image_shape``
        (default) or flattened, e.g. ``(784,)``; the number of elements must match.
    :raises ValueError: if the context's last dimension or the event shape's size does not
        match the decoder.
    """

    arg_constraints: dict = {}
    support = constraints.boolean
    has_rsample = False

    def __init__(self, decoder: PixelCNNDecoder, context: Tensor,
                 event_shape: Sequence[int] | None = None, validate_args=None) -> None:
        if context.dim() < 1 or context.shape[-1] != decoder.context_dim:
            raise ValueError(f"context must have shape (..., {decoder.context_dim}), got "
                             f"{tuple(context.shape)}")
        image_shape = tuple(decoder.image_shape)
        event_shape = image_shape if event_shape is None else tuple(event_shape)
        if math.prod(event_shape) != math.prod(image_shape):
            raise ValueError(f"event_shape must have {math.prod(image_shape)} elements (the "
                             f"decoder's image_shape {image_shape}), got {event_shape}")
        self.decoder, self.context = decoder, context
        self.support = constraints.independent(constraints.boolean, len(event_shape))
        super().__init__(context.shape[:-1], torch.Size(event_shape), validate_args=False)

    def expand(self, batch_shape, _instance=None) -> PixelCNNBernoulli:
        batch_shape = torch.Size(batch_shape)
        context = self.context.expand(*batch_shape, self.decoder.context_dim)
        return PixelCNNBernoulli(self.decoder, context, self.event_shape)

    def logits(self, value: Tensor) -> Tensor:
        """Each pixel's logit given the pixels before it in ``value``, shape like ``value``
        (broadcast with the batch shape)."""
        images = value.reshape(*value.shape[: value.dim() - len(self.event_shape)],
                               *self.decoder.image_shape)
        logits = self.decoder(images, self.context)
        return logits.reshape(*logits.shape[:-3], *self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        logits = self.logits(value)
        value = value.expand_as(logits)
        pixels = -F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return pixels.flatten(-len(self.event_shape)).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        context = self.context.expand(*shape, self.decoder.context_dim)
        images = self.decoder.generate(context)
        return images.reshape(*shape, *self.event_shape)


class PixelCNNLikelihood(nn.Module):
    """A decoder part for a VAE: the latent codes, concatenated, are the context of a
    :class:`~pyro_dgm.models.PixelCNNDecoder` (the PixelVAE and the VampPrior paper's
    PixelHVAE, conditioned on :math:`z` or on :math:`(z_1, z_2)`).

    :param PixelCNNDecoder decoder: its ``context_dim`` is the total size of the codes.
    :param event_shape: the shape of one image as the data hold it (default the decoder's
        ``image_shape``; ``(784,)`` for flattened MNIST).

    ``forward(*codes)`` takes tensors of shapes ``(..., d_k)`` (broadcast against each other)
    and returns :class:`PixelCNNBernoulli` with batch shape ``(...)``.

    Example::

        >>> likelihood = PixelCNNLikelihood(PixelCNNDecoder(10, (1, 28, 28)), (784,))
        >>> likelihood(torch.randn(5, 4), torch.randn(5, 6)).event_shape
        torch.Size([784])
    """

    def __init__(self, decoder: PixelCNNDecoder, event_shape: Sequence[int] | None = None
                 ) -> None:
        super().__init__()
        self.decoder = decoder
        self.event_shape = tuple(decoder.image_shape if event_shape is None else event_shape)

    def forward(self, *codes: Tensor) -> PixelCNNBernoulli:
        if len(codes) > 1:
            shape = torch.broadcast_shapes(*(code.shape[:-1] for code in codes))
            codes = tuple(code.expand(*shape, code.shape[-1]) for code in codes)
        context = codes[0] if len(codes) == 1 else torch.cat(codes, dim=-1)
        return PixelCNNBernoulli(self.decoder, context, self.event_shape)
