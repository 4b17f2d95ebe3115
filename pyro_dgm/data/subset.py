"""A small real MNIST subset shipped inside the package, for machines without the data set.

The package holds 10,000 training and 2,000 test images of MNIST with their labels, a uniformly
random subset (fixed seed) of each split, kept in MNIST's own order, as gzip-compressed IDX files
in ``pyro_dgm/data/mnist_subset/``. Alongside are the positions of the chosen images in the full
splits, so the subset can be checked against, or mapped back to, the original. Rebuild with::

    python -m pyro_dgm.data.subset --data-dir ../shared/data
"""

__all__ = [
    "build_mnist_subset",
    "load_embedded_mnist_subset",
    "load_embedded_mnist_subset_indices",
]

import argparse
import gzip
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .idx import read_idx, write_idx

_FOLDER = "mnist_subset"
_SPLITS = (("train", True), ("t10k", False))  # MNIST's file prefixes
_REBUILD = "python -m pyro_dgm.data.subset --data-dir <folder containing MNIST/raw>"


def load_embedded_mnist_subset(
    directory: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the MNIST subset shipped with the package.

    :param directory: a folder written by :func:`build_mnist_subset`; ``None`` (default) reads
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


def build_mnist_subset(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    num_train: int = 10_000,
    num_test: int = 2_000,
    seed: int = 0,
) -> list[Path]:
    """Write a random subset of MNIST as gzip-compressed IDX files.

    For each split (``train``, ``t10k``) three files: ``{split}-images-idx3-ubyte.gz``,
    ``{split}-labels-idx1-ubyte.gz`` and ``{split}-indices-idx1-int.gz`` (the positions in the
    full split, int32). The images are a uniformly random subset drawn with a CPU generator
    seeded with ``seed``, so the classes keep their natural, near-uniform proportions; they are
    stored in MNIST's order. The gzip streams carry no time stamp, so the bytes depend only on
    the arguments (and zlib).

    :param data_dir: folder containing ``MNIST/raw`` (see :func:`~pyro_dgm.data.load_mnist`).
    :param out_dir: folder to write into, created if missing.
    :param num_train: number of training images, at most 60,000.
    :param num_test: number of test images, at most 10,000.
    :param seed: seed of the random subset.
    :returns: the paths written.
    :raises FileNotFoundError: if MNIST is not in ``data_dir``.
    :raises ValueError: for a count that is not in 1..size of the split.
    """
    # Imported here: mnist.py imports this module for its fallback.
    from .mnist import load_mnist

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    written = []
    for (prefix, train), count in zip(_SPLITS, (num_train, num_test), strict=True):
        images, labels = load_mnist(data_dir, train=train)
        if not 0 < count <= len(images):
            raise ValueError(f"{prefix}: cannot take {count} of {len(images)} images")
        # Sorted, so that the subset keeps MNIST's order.
        indices = torch.randperm(len(images), generator=generator)[:count].sort().values
        contents = {
            "images-idx3-ubyte": images[indices],
            "labels-idx1-ubyte": labels[indices].to(torch.uint8),
            "indices-idx1-int": indices.to(torch.int32),
        }
        for suffix, tensor in contents.items():
            path = out / f"{prefix}-{suffix}.gz"
            path.write_bytes(gzip.compress(write_idx(tensor), compresslevel=9, mtime=0))
            written.append(path)
    return written


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


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: rebuild the package's subset (or write one elsewhere)."""
    parser = argparse.ArgumentParser(
        prog="python -m pyro_dgm.data.subset", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data-dir", required=True, help="folder containing MNIST/raw")
    parser.add_argument(
        "--out-dir",
        default=Path(__file__).with_name(_FOLDER),
        type=Path,
        help="where to write (default: the package's %(default)s)",
    )
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--num-test", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_mnist_subset(
        args.data_dir, args.out_dir, args.num_train, args.num_test, args.seed
    )
    for path in paths:
        print(f"{path.stat().st_size:>12,d}  {path}")
    print(f"{sum(path.stat().st_size for path in paths):>12,d}  bytes in total")


if __name__ == "__main__":
    main()
