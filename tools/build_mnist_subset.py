"""Rebuild the MNIST subset shipped in ``pyro_dgm/data/mnist_subset/`` (or write one elsewhere).

    python tools/build_mnist_subset.py --data-dir ../shared/data

A uniformly random subset (fixed seed) of each MNIST split, kept in MNIST's order, as gzip IDX
files without time stamps, so that the bytes depend only on the arguments (and zlib).
"""

from __future__ import annotations

import argparse
import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from pyro_dgm.data import load_mnist, write_idx

_SPLITS = (("train", True), ("t10k", False))  # MNIST's file prefixes
_PACKAGE_FOLDER = Path(__file__).resolve().parents[1] / "pyro_dgm" / "data" / "mnist_subset"


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

    :param data_dir: folder containing ``MNIST/raw`` (see :func:`pyro_dgm.data.load_mnist`).
    :param out_dir: folder to write into, created if missing.
    :param num_train: number of training images, at most 60,000.
    :param num_test: number of test images, at most 10,000.
    :param seed: seed of the random subset.
    :returns: the paths written.
    :raises FileNotFoundError: if MNIST is not in ``data_dir``.
    :raises ValueError: for a count that is not in 1..size of the split.
    """
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


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: rebuild the package's subset (or write one elsewhere)."""
    parser = argparse.ArgumentParser(
        prog="python tools/build_mnist_subset.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data-dir", required=True, help="folder containing MNIST/raw")
    parser.add_argument(
        "--out-dir",
        default=_PACKAGE_FOLDER,
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
