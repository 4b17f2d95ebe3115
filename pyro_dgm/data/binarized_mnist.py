"""Statically binarized MNIST (Larochelle & Murray, 2011), the benchmark of IWAE and successors.

The data are three text files, ``binarized_mnist_{train,valid,test}.amat`` with 50,000 / 10,000 /
10,000 lines, each line 784 digits ``0`` or ``1`` separated by single spaces; there are no labels.
"""

__all__ = ["BINARIZED_MNIST_SPLITS", "load_binarized_mnist"]

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BINARIZED_MNIST_SPLITS: tuple[str, ...] = ("train", "valid", "test")
_NUM_PIXELS = 784
_ZERO, _SPACE, _NEWLINE = ord("0"), ord(" "), ord("\n")


def load_binarized_mnist(
    data_dir: str | os.PathLike[str],
    split: str = "train",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Load one split of statically binarized MNIST.

    Reads ``data_dir/BinarizedMNIST/binarized_mnist_{split}.amat``. The standard layout (784
    single-space-separated digits and a ``\\n`` per line) is parsed by a vectorized pass over
    the bytes (the 78 MB training file in well under a second); other whitespace, e.g. ``\\r\\n``
    line ends, falls back to a slower line-by-line parse.

    Note that the test split is sorted by class: shuffle it before taking any subset.

    :param data_dir: folder containing ``BinarizedMNIST/``.
    :param split: ``"train"`` (50,000 images), ``"valid"`` (10,000) or ``"test"`` (10,000).
    :param dtype: floating dtype of the result.
    :returns: tensor of shape ``(N, 784)`` with values 0. and 1., on the CPU; row-major 28 x 28
        images.
    :raises ValueError: for an unknown split, or a file that is not N lines of 784 binary digits.
    :raises FileNotFoundError: if the file is missing.
    """
    if split not in BINARIZED_MNIST_SPLITS:
        raise ValueError(f"split must be one of {BINARIZED_MNIST_SPLITS}, got {split!r}")
    path = Path(data_dir) / "BinarizedMNIST" / f"binarized_mnist_{split}.amat"
    if not path.is_file():
        raise FileNotFoundError(
            f"binarized MNIST {split!r} split not found: expected the file {path} "
            f"(layout: <data_dir>/BinarizedMNIST/binarized_mnist_{{train,valid,test}}.amat)"
        )
    raw = np.fromfile(path, dtype=np.uint8)
    bits = _parse_standard_layout(raw)
    if bits is None:
        bits = _parse_any_whitespace(raw.tobytes(), path)
    return torch.from_numpy(bits).to(dtype)


def _parse_standard_layout(raw: np.ndarray) -> np.ndarray | None:
    """Bits ``(N, 784)`` uint8 if ``raw`` is exactly the standard layout, else ``None``."""
    line_length = 2 * _NUM_PIXELS  # each digit is followed by a space, or a newline at the end
    if raw.size == 0 or raw.size % line_length:
        return None
    lines = raw.reshape(-1, line_length)
    separators = lines[:, 1::2]
    if (separators[:, :-1] != _SPACE).any() or (separators[:, -1] != _NEWLINE).any():
        return None
    bits = lines[:, 0::2] - _ZERO  # uint8 arithmetic: any byte other than '0' or '1' wraps > 1
    if (bits > 1).any():
        return None
    return bits


def _parse_any_whitespace(text: bytes, path: Path) -> np.ndarray:
    """Bits ``(N, 784)`` uint8 from lines of 784 whitespace-separated 0 or 1, else ValueError."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        values = line.split()
        if not values:  # tolerate blank lines, e.g. a trailing one
            continue
        if len(values) != _NUM_PIXELS:
            raise ValueError(
                f"{path}, line {number}: {len(values)} values, expected {_NUM_PIXELS}"
            )
        row = b"".join(values)
        if len(row) != _NUM_PIXELS or row.translate(None, b"01"):
            raise ValueError(f"{path}, line {number}: values must be the digits 0 and 1")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no data")
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, _NUM_PIXELS) - _ZERO
