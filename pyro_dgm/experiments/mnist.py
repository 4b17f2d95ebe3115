"""MNIST as the papers' protocols split it: dynamically binarized training batches, a validation
split held out of the training set, and test (and validation) sets binarized once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_dgm.data import MinibatchLoader, binarize_fixed, load_binarized_mnist
from pyro_dgm.data import load_mnist_or_fallback as _load_mnist

from .distributed import Distributed

__all__ = ["ImageData", "dynamic_mnist", "static_mnist"]


@dataclass
class ImageData:
    """The splits of an experiment, on its device. ``valid`` and ``test`` are fixed ``(N,
    784)`` float tensors in {0, 1}; ``train_images`` the training images as loaded (``uint8``
    intensities for dynamic MNIST), e.g. to initialise pseudo-inputs."""

    train: MinibatchLoader
    valid: Tensor | None
    test: Tensor
    test_labels: Tensor | None
    train_images: Tensor
    source: str

    def describe(self) -> str:
        valid = 0 if self.valid is None else len(self.valid)
        return (f"{self.train.num_examples:,} training / {valid:,} validation / "
                f"{len(self.test):,} test images")


def dynamic_mnist(
    data_dir: str,
    *,
    batch_size: int,
    valid_images: int = 0,
    train_images: int | None = None,
    test_images: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    fallback: bool = True,
    distributed: Distributed | None = None,
) -> ImageData:
    """Dynamically binarized MNIST: every training batch is a fresh Bernoulli draw of the
    intensities; the last ``valid_images`` of the (first ``train_images``) training images are
    held out and binarized once with ``seed + 1``, the (first ``test_images``) test images once
    with ``seed``.

    :param fallback: without MNIST in ``data_dir``, use the subset shipped with pyro_dgm;
        ``False`` (a folder the user named) raises instead.
    :raises ValueError: if the validation split leaves no training image.
    :raises FileNotFoundError: without ``fallback`` when ``data_dir`` holds no MNIST.
    """
    data = _load_mnist(data_dir, fallback=fallback)
    images = data.train_images[:train_images]
    if not 0 <= valid_images < len(images):
        raise ValueError(f"valid_images must lie in [0, {len(images)}) (the training images), "
                         f"got {valid_images}")
    split = len(images) - valid_images
    valid = (binarize_fixed(images[split:].to(device), seed=seed + 1).flatten(1)
             if valid_images else None)
    test = binarize_fixed(data.test_images[:test_images].to(device), seed=seed).flatten(1)
    distributed = distributed or Distributed()
    generator = None
    if distributed.active:  # the order and noise alike on every rank (see MinibatchLoader)
        generator = torch.Generator(device=device).manual_seed(seed)
    train = MinibatchLoader(images[:split], batch_size, return_indices=True, device=device,
                            generator=generator, rank=distributed.rank,
                            num_replicas=distributed.world_size)
    return ImageData(train, valid, test, data.test_labels[:test_images].to(device),
                     images[:split], data.source)


def static_mnist(
    data_dir: str,
    *,
    batch_size: int,
    train_images: int | None = None,
    valid_images: int | None = None,
    test_images: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    distributed: Distributed | None = None,
) -> ImageData:
    """Statically binarized MNIST (Larochelle & Murray 2011): its fixed 50,000 / 10,000 /
    10,000 split. ``train_images`` takes the first images of the training file; ``valid_images``
    and ``test_images`` a fixed random subset (``seed``) of theirs, since the test file is sorted
    by digit.

    :raises FileNotFoundError: naming the missing ``.amat`` file.
    """
    def split(name: str, count: int | None, shuffle: bool = True) -> Tensor:
        images = load_binarized_mnist(data_dir, name)
        if shuffle and count is not None and count < len(images):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
            images = images[order[:count]]
        return images[:count].to(device)

    train_set = split("train", train_images, shuffle=False)
    distributed = distributed or Distributed()
    generator = None
    if distributed.active:
        generator = torch.Generator(device=device).manual_seed(seed)
    train = MinibatchLoader(train_set, batch_size, binarize=False, return_indices=True,
                            device=device, generator=generator, rank=distributed.rank,
                            num_replicas=distributed.world_size)
    return ImageData(train, split("valid", valid_images), split("test", test_images), None,
                     train_set, f"statically binarized MNIST from {data_dir}")
