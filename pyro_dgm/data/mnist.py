"""MNIST (LeCun, Cortes & Burges): loading through torchvision, with an offline fallback."""

__all__ = ["MNISTSplits", "load_mnist", "load_mnist_or_fallback"]

import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from torch import Tensor

from .subset import load_embedded_mnist_subset

_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# torchvision's download has no time limit of its own: without these an unreachable network
# (packets dropped rather than refused) stalls for minutes per mirror and file.
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0


class MNISTSplits(NamedTuple):
    """MNIST training and test splits, and where they came from.

    Images are ``uint8`` tensors of shape ``(n, 28, 28)`` with intensities in [0, 255] (0 is
    background), labels ``int64`` tensors of shape ``(n,)`` with the digits 0..9.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str
    """In words, which data these are, e.g. to print at the start of an experiment."""


def load_mnist(
    data_dir: str | os.PathLike[str],
    train: bool = True,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load one split of MNIST with :class:`torchvision.datasets.MNIST`.

    :param data_dir: the root folder in torchvision's layout: the raw, uncompressed IDX files
        ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
        and ``t10k-labels-idx1-ubyte`` in ``data_dir/MNIST/raw/``.
    :param train: the 60,000 training images if true, else the 10,000 test images.
    :param download: if the files are missing, let torchvision download them into
        ``data_dir/MNIST/raw/``. A mirror that cannot be reached within 5 s is skipped, and a
        stalled transfer fails after 10 s without data.
    :returns: ``(images, labels)``: images ``uint8`` of shape ``(N, 28, 28)``, intensities in
        [0, 255]; labels ``int64`` of shape ``(N,)``, digits 0..9.
    :raises FileNotFoundError: if files are missing and ``download`` is false.
    :raises Exception: whatever the download raises when it fails (``ConnectionError`` if no
        mirror is reachable, ``RuntimeError`` from torchvision, ``OSError``, ...).
    """
    from torchvision.datasets import MNIST  # a second of import time, only when loading

    root = Path(data_dir)
    missing = [name for name in _RAW_FILES if not (root / "MNIST" / "raw" / name).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(
                f"MNIST not found in {root}: expected the uncompressed IDX files "
                f"{', '.join(_RAW_FILES)} in {root / 'MNIST' / 'raw'} (torchvision's layout); "
                f"missing: {', '.join(missing)}. Pass download=True to fetch them."
            )
        _download_mnist(root)
    dataset = MNIST(root=root, train=train, download=False)
    return dataset.data, dataset.targets


def load_mnist_or_fallback(
    data_dir: str | os.PathLike[str],
    download: bool = True,
    fallback: bool = True,
) -> MNISTSplits:
    """Load MNIST from wherever it can be had, saying which data were used.

    Tries, in order: the files in ``data_dir/MNIST/raw/`` (see :func:`load_mnist`);
    torchvision's download into that folder, if ``download`` (it fails within seconds when
    offline); the real 10,000 / 2,000 image subset shipped with the package
    (:func:`~pyro_dgm.data.load_embedded_mnist_subset`). Files that are present but corrupt raise
    instead of falling back.

    :param data_dir: root folder in torchvision's layout.
    :param download: whether to try downloading when the files are missing.
    :param fallback: use the embedded subset when the files are missing and cannot be
        downloaded; ``False`` raises instead (for a folder the user named).
    :returns: :class:`MNISTSplits`, whose ``source`` reads e.g. ``"MNIST from ../shared/data
        (60,000 train / 10,000 test)"`` or ``"embedded MNIST subset (10,000 train / 2,000
        test) — torchvision download failed: <reason>"``.
    :raises FileNotFoundError: without ``fallback``, naming the folder and why the download
        failed.
    """
    try:
        return _splits(data_dir, download=False, origin=f"MNIST from {data_dir}")
    except FileNotFoundError:
        pass
    if not download:
        reason = f"no MNIST files in {data_dir} and download=False"
    else:
        try:
            return _splits(
                data_dir, download=True, origin=f"MNIST downloaded by torchvision into {data_dir}"
            )
        except Exception as error:  # offline, mirror down, disk full...: all mean the subset
            reason = f"torchvision download failed: {type(error).__name__}: {_one_line(error)}"
    if not fallback:
        raise FileNotFoundError(f"no MNIST in {Path(data_dir) / 'MNIST' / 'raw'} ({reason})")
    return _describe(*load_embedded_mnist_subset(), origin="embedded MNIST subset", note=reason)


def _splits(data_dir: str | os.PathLike[str], download: bool, origin: str) -> MNISTSplits:
    train = load_mnist(data_dir, train=True, download=download)
    test = load_mnist(data_dir, train=False, download=download)
    return _describe(*train, *test, origin=origin)


def _describe(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    origin: str,
    note: str = "",
) -> MNISTSplits:
    source = f"{origin} ({len(train_images):,} train / {len(test_images):,} test)"
    if note:
        source += f" \N{EM DASH} {note}"
    return MNISTSplits(train_images, train_labels, test_images, test_labels, source)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _download_mnist(root: Path) -> None:
    """Download MNIST into ``root/MNIST/raw`` with torchvision, failing fast when offline."""
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    # With the .gz archives already there torchvision only checks and unpacks them, offline.
    if not all((raw / archive).is_file() for archive, _ in MNIST.resources):
        _check_a_mirror_is_reachable(MNIST.mirrors)
    with _socket_timeout(_SOCKET_TIMEOUT_S):
        MNIST(root=root, train=True, download=True)  # fetches both splits


def _check_a_mirror_is_reachable(mirrors: list[str]) -> None:
    """Raise ``ConnectionError`` unless a TCP connection to some mirror opens in a few seconds."""
    if urllib.request.getproxies():
        return  # connections go through the proxy; the socket timeout still bounds them
    failures = []
    for mirror in mirrors:
        url = urllib.parse.urlsplit(mirror)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname, port), timeout=_CONNECT_TIMEOUT_S):
                return
        except OSError as error:
            failures.append(f"{url.hostname}:{port}: {error}")
    raise ConnectionError(f"no MNIST mirror reachable ({'; '.join(failures)})")


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # urllib, which torchvision uses, takes the process-wide default; restore it afterwards.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
