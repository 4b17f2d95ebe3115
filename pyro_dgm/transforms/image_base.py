"""What the image transforms share: the constraint of a real image and the check of its shape.

Every image transform acts on tensors of shape ``(..., C, H, W)``, the last three dimensions
forming one event (``event_dim = 3``), and is written in the *normalizing* direction of the
papers (data to latent); a :class:`~pyro.distributions.TransformedDistribution` uses it through
``.inv``, as :class:`~pyro_dgm.models.ImageFlow` does.
"""

from __future__ import annotations

__all__ = ["check_image", "check_image_shape", "clear_caches", "real_image"]

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import ComposeTransform, Transform, constraints
from torch.distributions.transforms import _InverseTransform

#: Real images: the last three dimensions ``(C, H, W)`` form one event.
real_image = constraints.independent(constraints.real, 3)


def check_image(x: Tensor, channels: int | None = None) -> None:
    """Raise :class:`ValueError` unless ``x`` has shape ``(..., C, H, W)``, with ``C`` equal to
    ``channels`` when that is given."""
    if x.dim() < 3:
        raise ValueError(f"expected an image of shape (..., C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[-3] != channels:
        raise ValueError(
            f"expected {channels} channels in shape (..., C, H, W), got shape {tuple(x.shape)}"
        )


def check_image_shape(image_shape: Sequence[int]) -> torch.Size:
    """``image_shape`` as a :class:`torch.Size` ``(C, H, W)``; raise :class:`ValueError` unless
    it is three positive integers."""
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"image_shape must be three positive integers (C, H, W), got {shape}")
    return torch.Size(shape)


def clear_caches(transform: Transform) -> None:
    """Empty the one-entry caches of ``transform`` and of every transform inside it (the parts
    of a :class:`~torch.distributions.ComposeTransform`, the transform an inverse stands for,
    and what transforms such as :class:`~pyro_dgm.transforms.FactorOut` hold,
    through their own ``clear_cache``).

    A cache holds the last input and output; a later call with the same input object (the same
    data batch, after an optimizer step) would otherwise return the old output, computed with
    the old parameters. Pyro's ``TransformedDistribution.clear_cache`` clears the top-level
    transforms only.
    """
    if isinstance(transform, ComposeTransform):
        for part in transform.parts:
            clear_caches(part)
    elif isinstance(transform, _InverseTransform):
        clear_caches(transform.inv)
    transform.clear_cache()
