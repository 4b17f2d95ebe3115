"""Binarization of gray-scale images by Bernoulli sampling.

*Dynamic* binarization draws a fresh binary image every time an image is used, treating the
intensity as the probability of a black pixel; it acts as a regularizer and is the protocol of
most VAE / IWAE likelihood results on "dynamically binarized MNIST". A test set is binarized
*once*, with a fixed seed, so that evaluations are comparable.
"""

__all__ = ["binarize", "binarize_fixed"]

import torch
from torch import Tensor


def binarize(
    images: Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw binary images, each pixel an independent Bernoulli variable.

    :param images: intensities, any shape: ``uint8`` in [0, 255] (probability ``pixel / 255``)
        or floating point in [0, 1] (probability ``pixel``).
    :param generator: random number generator on the images' device; ``None`` uses torch's
        global generator.
    :param dtype: floating dtype of the result.
    :returns: tensor of the images' shape and device with values 0. and 1., a fresh draw on
        every call.
    :raises TypeError: for integer images other than ``uint8``.
    :raises RuntimeError: from :func:`torch.bernoulli` for floating images outside [0, 1]
        (on CPU; CUDA checks with a device-side assertion).
    """
    # Probabilities in at least single precision: k / 255 in half or bfloat16 is off by up to
    # 0.4% in relative terms, a bias of the binarized data set.
    prob_dtype = torch.promote_types(dtype, torch.float32)
    if images.dtype == torch.uint8:
        probs = images.to(prob_dtype).div_(255)
    elif images.is_floating_point():
        probs = images.to(prob_dtype)
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return torch.bernoulli(probs, generator=generator).to(dtype)


def binarize_fixed(images: Tensor, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Binarize once, reproducibly: the fixed evaluation set for a stochastically binarized test.

    The draw is made on the CPU with a generator seeded with ``seed`` and then moved to the
    images' device, so the same seed gives the same bits on every device (for a given torch
    version). Call it once and keep the result; do not use it for training data, which should be
    binarized afresh every epoch (:func:`binarize`, :class:`~pyro_dgm.data.MinibatchLoader`).

    :param images: as for :func:`binarize`; a 10,000-image test set costs about 0.1 s.
    :param seed: seed of the Bernoulli draws.
    :param dtype: floating dtype of the result.
    :returns: tensor of the images' shape and device with values 0. and 1.
    :raises TypeError: as :func:`binarize`.
    """
    generator = torch.Generator().manual_seed(seed)
    return binarize(images.cpu(), generator, dtype).to(images.device)
