"""Pictures of what a generative model of images learned (torchvision imported lazily)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["save_samples_and_reconstructions"]


@torch.no_grad()
def save_samples_and_reconstructions(
    model, images: Tensor, out: str | Path, image_shape: tuple[int, ...] = (1, 28, 28)
) -> list[Path]:
    """Save ``samples.png`` (64 draws from the model, 8 per row) and ``reconstructions.png``
    (32 of ``images`` in the top four rows, their reconstructions below) in ``out``.

    :param model: anything with ``generate(num_samples, like) -> (num_samples, D)`` and
        ``reconstruct(x) -> x.shape`` returning pixel means in [0, 1], such as
        :class:`~pyro_dgm.models.VAE`.
    :param images: flattened images, shape ``(N, D)`` with ``N >= 32`` and
        ``D = prod(image_shape)``.
    :param image_shape: ``(channels, height, width)`` of one image.
    :returns: the two paths written.
    :raises ValueError: if fewer than 32 images are given.
    """
    from torchvision.utils import save_image

    if images.shape[0] < 32:
        raise ValueError(f"images must hold at least 32 images, got {images.shape[0]}")
    out = Path(out)
    samples = model.generate(64, images).reshape(64, *image_shape)
    originals = images[:32].reshape(32, *image_shape)
    reconstructions = model.reconstruct(images[:32]).reshape(32, *image_shape)
    paths = [out / "samples.png", out / "reconstructions.png"]
    save_image(samples, paths[0], nrow=8)
    save_image(torch.cat([originals, reconstructions]), paths[1], nrow=8)
    return paths
