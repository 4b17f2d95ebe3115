"""A small real MNIST subset shipped inside the package, for machines without the data set.

The package holds 10,000 training and 2,000 test images of MNIST with their labels, a uniformly
random subset (fixed seed) of each split, kept in MNIST's own order, as gzip-compressed IDX files
in ``pyro_dgm/data/mnist_subset/``. Alongside are the positions of the chosen images in the full
splits, so the subset can be checked against, or mapped back to, the original. It is rebuilt by
a tool outside the package::

    python tools/build_mnist_subset.py --data-dir ../shared/data
"""

__all__ = [
    "load_embedded_mnist_subset",
    "load_embedded_mnist_subset_indices",
]

import gzip
import importlib.resources
import os
from pathlib import Path

import torch
from torch import Tensor

from .idx import read_idx

_FOLDER = "mnist_subset"
_SPLITS = (("train", True), ("t10k", False))  # MNIST's file prefixes
_REBUILD = "python tools/build_mnist_subset.py --data-dir <folder containing MNIST/raw>"


def load_embedded_mnist_subset(
    directory: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the MNIST subset shipped with the package.

    :param directory: a folder written by ``tools/build_mnist_subset.py``; ``None`` (default) reads
        the subset inside the installed package.
    :returns: ``(train_images, train_labels, test_images, test_labels)``: images ``uint8`` of
        shape ``(n, 28, 28)`` with intensities in [0, 255], labels ``int64`` of shape ``(n,)``
        in 0..9, with n = 10,000 for train and 2,000 for test in the shipped subset.
    :raises FileNotFoundError: if a file of the subset is missing.
    :raises ValueError: if a file is corrupt or the images and labels do not match.
    """
    tensors: list[Tensor] = []
    for prefix, _ in _SPLITS:
        images = _read(directory, f"{prefix}-images-idx3-ubyte.gz")
        labels = _read(directory, f"{prefix}-labels-idx1-ubyte.gz")
        if images.dtype != torch.uint8 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{prefix} images: expected uint8 (n, 28, 28), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{prefix}: {len(labels)} labels for {len(images)} images")
        tensors += [images, labels.long()]
    train_images, train_labels, test_images, test_labels = tensors
    return train_images, train_labels, test_images, test_labels


def load_embedded_mnist_subset_indices(
    directory: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Positions of the subset's images in the full MNIST splits.

    :param directory: as for :func:`load_embedded_mnist_subset`.
    :returns: ``(train_indices, test_indices)``, ``int64``, increasing: image ``i`` of the subset
        is image ``indices[i]`` of the full training (60,000) or test (10,000) split.
    :raises FileNotFoundError: if a file of the subset is missing.
    """
    train, test = (
        _read(directory, f"{prefix}-indices-idx1-int.gz").long() for prefix, _ in _SPLITS
    )
    return train, test


def _read(directory: str | os.PathLike[str] | None, name: str) -> Tensor:
    if directory is None:
        source = importlib.resources.files(__package__) / _FOLDER / name
    else:
        source = Path(directory) / name
    try:
        compressed = source.read_bytes()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"MNIST subset file {source} is missing; rebuild with: {_REBUILD}"
        ) from error
    return read_idx(gzip.decompress(compressed))
