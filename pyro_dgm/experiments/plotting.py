"""Labelled pictures of what a generative model of images learned (matplotlib and torchvision,
imported when a picture is drawn)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["save_image_grid", "save_latent_scatter", "save_reconstructions", "save_samples",
           "spread", "vae_pictures"]


def spread(count: int, size: int, device: torch.device | None = None) -> Tensor:
    """``min(count, size)`` indices spaced evenly over ``range(size)``: a sample of a data set
    that may be sorted (statically binarized MNIST's test file is sorted by digit)."""
    count = min(count, size)
    return torch.linspace(0, size - 1, count, device=device).round().long()


@torch.no_grad()
def save_image_grid(
    images: Tensor,
    path: str | Path,
    title: str,
    *,
    image_shape: tuple[int, ...] = (1, 28, 28),
    nrow: int = 8,
    rescale: bool = False,
    row_labels: list[str] | None = None,
) -> Path:
    """Save ``images`` as a titled grid.

    :param images: ``(N, D)`` or ``(N, C, H, W)`` values in [0, 1] (any range with
        ``rescale``).
    :param rescale: stretch each image to the full range [0, 1] (min to max), for values that
        occupy a small part of it, such as learned pseudo-inputs.
    :param row_labels: a label for each row of the grid, written at its left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().reshape(-1, *image_shape)
    if rescale:
        low = images.flatten(1).min(1).values.view(-1, 1, 1, 1)
        high = images.flatten(1).max(1).values.view(-1, 1, 1, 1)
        images = (images - low) / (high - low).clamp_min(1e-12)
    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2, pad_value=0.5)
    rows = -(-len(images) // nrow)
    figure, axes = plt.subplots(figsize=(nrow * 0.55 + (1.6 if row_labels else 0.3),
                                         rows * 0.55 + 0.6))
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.set_xticks([])
    if row_labels:
        height = image_shape[1] + 2
        axes.set_yticks([2 + height * (k + 0.5) for k in range(len(row_labels))], row_labels,
                        fontsize=7)
    else:
        axes.set_yticks([])
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


@torch.no_grad()
def save_samples(model, like: Tensor, path: str | Path, title: str,
                 image_shape: tuple[int, ...] = (1, 28, 28), num_samples: int = 64) -> Path:
    """Save a grid of ``num_samples`` draws from ``model.generate(num_samples, like)``
    (pixel means in [0, 1], such as :meth:`pyro_dgm.models.VAE.generate`)."""
    return save_image_grid(model.generate(num_samples, like), path, title,
                           image_shape=image_shape)


@torch.no_grad()
def save_reconstructions(model, images: Tensor, path: str | Path, title: str,
                         image_shape: tuple[int, ...] = (1, 28, 28), count: int = 32) -> Path:
    """Save ``count`` images spread over ``images`` (``(N, D)``, any ``N >= 1``) and
    ``model.reconstruct`` of them: each row of originals is followed by a row of their
    reconstructions, labelled at the left."""
    chosen = images[spread(count, len(images), images.device)]
    reconstructions = model.reconstruct(chosen)
    pairs, labels = [], []
    for start in range(0, len(chosen), 8):
        pairs += [chosen[start:start + 8], reconstructions[start:start + 8]]
        labels += ["test images", "reconstructed"]
    return save_image_grid(torch.cat(pairs), path, title, image_shape=image_shape,
                           row_labels=labels)


def vae_pictures(model, images: Tensor, title: str, pseudo_inputs: Tensor | None = None
                 ) -> dict[str, Callable[[Path], Path]]:
    """The pictures of a VAE example, as ``{file name: draw(path)}`` for
    :func:`~pyro_dgm.experiments.save_results`: ``samples.png``, ``reconstructions.png`` of
    ``images``, and with ``pseudo_inputs`` (a VampPrior's) ``pseudo_inputs.png`` of the first 100,
    each rescaled to its own range."""
    pictures = {
        "samples.png": lambda path: save_samples(model, images, path, f"{title}: samples"),
        "reconstructions.png": lambda path: save_reconstructions(
            model, images, path, f"{title}: test images and reconstructions"),
    }
    if pseudo_inputs is not None:
        pictures["pseudo_inputs.png"] = lambda path: save_image_grid(
            pseudo_inputs[:100], path, "100 learned pseudo-inputs, each rescaled to its own "
            "range", nrow=10, rescale=True)
    return pictures


def save_latent_scatter(points: Tensor, labels: Tensor, path: str | Path, title: str) -> Path:
    """Scatter 2-D points in the plane, or 3-D points on the sphere, coloured by digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, labels = points.detach().cpu(), labels.cpu()
    figure = plt.figure(figsize=(6, 6))
    if points.shape[1] == 3:
        axes = figure.add_subplot(projection="3d")
        drawn = axes.scatter(points[:, 0], points[:, 1], points[:, 2], c=labels, cmap="tab10",
                             s=2)
        axes.set_box_aspect((1, 1, 1))
    else:
        axes = figure.add_subplot()
        drawn = axes.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=2)
        axes.set_aspect("equal")
    figure.colorbar(drawn, ax=axes, ticks=range(10), shrink=0.7, label="digit")
    axes.set_title(title)
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
