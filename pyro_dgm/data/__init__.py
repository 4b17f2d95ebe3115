"""Data sets for deep generative models: MNIST, statically binarized MNIST, minibatching.

The only part of :mod:`pyro_dgm` that uses torchvision (imported lazily, when MNIST is loaded).
"""

__all__ = [
    "BINARIZED_MNIST_SPLITS",
    "MNISTSplits",
    "MinibatchLoader",
    "binarize",
    "binarize_fixed",
    "load_binarized_mnist",
    "load_embedded_mnist_subset",
    "load_embedded_mnist_subset_indices",
    "load_mnist",
    "load_mnist_or_fallback",
    "read_idx",
    "write_idx",
]

from .binarization import binarize, binarize_fixed
from .binarized_mnist import BINARIZED_MNIST_SPLITS, load_binarized_mnist
from .idx import read_idx, write_idx
from .minibatch import MinibatchLoader
from .mnist import MNISTSplits, load_mnist, load_mnist_or_fallback
from .subset import (
    load_embedded_mnist_subset,
    load_embedded_mnist_subset_indices,
)
