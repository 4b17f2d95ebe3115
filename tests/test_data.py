"""Tests of pyro_dgm.data on the real data in ../shared/data; nothing is ever downloaded."""

import gzip
import importlib.resources
import os
from pathlib import Path

import pytest
import torch

from pyro_dgm.data import (
    BINARIZED_MNIST_SPLITS,
    MinibatchLoader,
    binarize,
    binarize_fixed,
    load_binarized_mnist,
    load_embedded_mnist_subset,
    load_embedded_mnist_subset_indices,
    load_mnist,
    load_mnist_or_fallback,
    read_idx,
    write_idx,
)
from pyro_dgm.data import mnist as mnist_module

TOOLS = Path(__file__).resolve().parents[1] / "tools"

DATA_DIR = Path(
    os.environ.get("PYRO_DGM_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared/data")
)
requires_mnist = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw").is_dir(),
    reason=f"no MNIST in {DATA_DIR}/MNIST/raw (set PYRO_DGM_DATA_DIR to the data folder)",
)
requires_binarized_mnist = pytest.mark.skipif(
    not (DATA_DIR / "BinarizedMNIST").is_dir(),
    reason=f"no {DATA_DIR}/BinarizedMNIST (set PYRO_DGM_DATA_DIR to the data folder)",
)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]

# Digits 0..9 in the standard MNIST splits.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST in {DATA_DIR}/MNIST/raw (set PYRO_DGM_DATA_DIR)")
    return {"train": load_mnist(DATA_DIR, train=True), "test": load_mnist(DATA_DIR, train=False)}


# ---------------------------------------------------------------------------------------------
# MNIST through torchvision, and the fallback


@pytest.mark.parametrize("split, counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_load_mnist_shapes_dtypes_and_label_counts(mnist, split, counts):
    images, labels = mnist[split]
    n = sum(counts)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == counts
    assert images.min() == 0 and images.max() == 255


@requires_mnist
def test_idx_reader_agrees_with_torchvision(mnist):
    raw = DATA_DIR / "MNIST" / "raw"
    assert torch.equal(read_idx((raw / "t10k-images-idx3-ubyte").read_bytes()), mnist["test"][0])
    labels = read_idx((raw / "t10k-labels-idx1-ubyte").read_bytes())
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), mnist["test"][1])


def test_load_mnist_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_mnist(tmp_path / "nowhere", train=True)
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message
    assert str(Path("MNIST", "raw")) in message and "train-images-idx3-ubyte" in message
    assert not (tmp_path / "nowhere").exists()


@requires_mnist
def test_fallback_prefers_the_folder(mnist):
    splits = load_mnist_or_fallback(DATA_DIR, download=False)
    assert splits.source == f"MNIST from {DATA_DIR} (60,000 train / 10,000 test)"
    assert torch.equal(splits.train_images, mnist["train"][0])
    assert torch.equal(splits.test_labels, mnist["test"][1])


def test_fallback_to_embedded_subset_without_download(tmp_path):
    train_images, train_labels, test_images, test_labels, source = load_mnist_or_fallback(
        tmp_path, download=False
    )
    assert source.startswith("embedded MNIST subset (10,000 train / 2,000 test)")
    assert "download=False" in source
    assert train_images.shape == (10_000, 28, 28) and test_labels.shape == (2_000,)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_fallback_to_embedded_subset_when_download_fails(tmp_path, monkeypatch):
    def no_network(root):
        raise OSError("network is unreachable")

    monkeypatch.setattr(mnist_module, "_download_mnist", no_network)
    splits = load_mnist_or_fallback(tmp_path, download=True)
    assert splits.source.startswith("embedded MNIST subset (10,000 train / 2,000 test)")
    assert splits.source.endswith("torchvision download failed: OSError: network is unreachable")
    # a folder the user named is never replaced by the subset
    with pytest.raises(FileNotFoundError, match=f"no MNIST in {tmp_path}.*network is unreachable"):
        load_mnist_or_fallback(tmp_path, download=True, fallback=False)


# ---------------------------------------------------------------------------------------------
# Binarization


def test_binarize_is_bernoulli_with_probability_pixel_over_255(mnist):
    images = mnist["test"][0]
    generator = torch.Generator().manual_seed(0)
    x = binarize(images, generator)
    assert x.shape == images.shape and x.dtype == torch.float32
    assert torch.all((x == 0) | (x == 1))
    assert torch.all(x[images == 0] == 0) and torch.all(x[images == 255] == 1)
    # 7.84 million draws: the standard error of the mean is below 1.8e-4.
    assert abs(x.mean().item() - images.double().mean().item() / 255) < 1e-3
    assert not torch.equal(binarize(images, generator), x)


def test_binarize_probability_of_every_intensity():
    draws = 4_000
    images = torch.arange(256, dtype=torch.uint8).expand(draws, 256)
    frequency = binarize(images, torch.Generator().manual_seed(1), torch.float64).mean(0)
    p = torch.arange(256, dtype=torch.float64) / 255
    # Five standard errors of a frequency of 4,000 draws, at most 0.04.
    assert torch.all((frequency - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-12)


def test_binarize_float_input_matches_uint8_and_dtype_option():
    images = torch.randint(0, 256, (64, 784), dtype=torch.uint8)
    from_bytes = binarize(images, torch.Generator().manual_seed(2))
    from_floats = binarize(images.float() / 255, torch.Generator().manual_seed(2))
    assert torch.equal(from_bytes, from_floats)
    as_bf16 = binarize(images, torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16.float(), from_bytes)
    with pytest.raises(TypeError, match="uint8 or floating"):
        binarize(images.long())


@pytest.mark.parametrize("device", DEVICES)
def test_binarize_fixed_is_reproducible_on_every_device(device):
    images = torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8, device=device)
    fixed = binarize_fixed(images, seed=3)
    assert fixed.device == images.device and fixed.shape == images.shape
    assert torch.equal(fixed, binarize_fixed(images, seed=3))
    assert torch.equal(fixed.cpu(), binarize_fixed(images.cpu(), seed=3))
    assert not torch.equal(fixed, binarize_fixed(images, seed=4))


# ---------------------------------------------------------------------------------------------
# Minibatches


@pytest.mark.parametrize("device", DEVICES)
def test_loader_epoch_visits_every_example_once_on_the_data_device(device):
    images = torch.randint(0, 256, (103, 28, 28), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    loader = MinibatchLoader(images, batch_size=10, return_indices=True, generator=generator)
    assert len(loader) == 11 and loader.num_examples == 103
    flat = images.reshape(103, 784)
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert [len(x) for x, _ in batches] == [10] * 10 + [3]
        for x, indices in batches:
            assert x.device == images.device and indices.device == images.device
            assert x.dtype == torch.float32 and indices.dtype == torch.int64
            pixels = flat[indices]
            assert torch.all((x == 0) | (x == 1))
            assert torch.all(x[pixels == 0] == 0) and torch.all(x[pixels == 255] == 1)
        order = torch.cat([indices for _, indices in batches])
        assert torch.equal(order.sort().values, torch.arange(103, device=device))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch


def test_loader_drop_last_and_unshuffled_order():
    images = torch.randint(0, 256, (103, 784), dtype=torch.uint8)
    loader = MinibatchLoader(images, batch_size=10, drop_last=True, return_indices=True)
    assert len(loader) == 10
    batches = list(loader)
    assert [len(x) for x, _ in batches] == [10] * 10
    assert len(torch.cat([indices for _, indices in batches]).unique()) == 100

    in_order = MinibatchLoader(images, batch_size=10, shuffle=False, return_indices=True)
    assert torch.equal(torch.cat([indices for _, indices in in_order]), torch.arange(103))
    assert len(MinibatchLoader(images, batch_size=200, drop_last=True)) == 0
    with pytest.raises(ValueError, match="batch_size"):
        MinibatchLoader(images, batch_size=0)


def test_loader_is_reproducible_and_can_skip_binarization():
    images = torch.randint(0, 256, (50, 784), dtype=torch.uint8)

    def epoch(seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.cat(list(MinibatchLoader(images, batch_size=16, generator=generator)))

    assert torch.equal(epoch(5), epoch(5)) and not torch.equal(epoch(5), epoch(6))
    intensities = MinibatchLoader(images, batch_size=16, shuffle=False, binarize=False)
    assert torch.equal(torch.cat(list(intensities)), images.float() / 255)


# ---------------------------------------------------------------------------------------------
# The embedded subset and the IDX format


def test_embedded_subset_shapes_and_class_balance():
    train_images, train_labels, test_images, test_labels = load_embedded_mnist_subset()
    assert train_images.shape == (10_000, 28, 28) and train_images.dtype == torch.uint8
    assert test_images.shape == (2_000, 28, 28) and test_images.dtype == torch.uint8
    assert train_labels.dtype == test_labels.dtype == torch.int64
    # A uniform random subset: about 1,000 (200) per class, give or take 3% (6%).
    assert all(800 <= count <= 1_300 for count in torch.bincount(train_labels, minlength=10))
    assert all(140 <= count <= 270 for count in torch.bincount(test_labels, minlength=10))


def test_embedded_subset_is_a_byte_identical_part_of_mnist(mnist):
    subset = load_embedded_mnist_subset()
    for (images, labels), indices, full in zip(
        (subset[:2], subset[2:]), load_embedded_mnist_subset_indices(), mnist.values(), strict=True
    ):
        assert torch.all(indices[1:] > indices[:-1]) and indices[-1] < len(full[0])
        assert torch.equal(images, full[0][indices]) and torch.equal(labels, full[1][indices])


def test_embedded_subset_size_at_most_3_mb():
    folder = importlib.resources.files("pyro_dgm.data") / "mnist_subset"
    files = [entry for entry in folder.iterdir() if entry.name.endswith(".gz")]
    assert len(files) == 6
    assert sum(len(entry.read_bytes()) for entry in files) <= 3_000_000


@requires_mnist
def test_build_mnist_subset_round_trip(tmp_path, mnist):
    import runpy

    build_mnist_subset = runpy.run_path(str(TOOLS / "build_mnist_subset.py"))["build_mnist_subset"]
    paths = build_mnist_subset(DATA_DIR, tmp_path, num_train=30, num_test=20, seed=1)
    assert sorted(path.name for path in paths) == sorted(path.name for path in tmp_path.iterdir())
    train_images, train_labels, test_images, test_labels = load_embedded_mnist_subset(tmp_path)
    train_indices, test_indices = load_embedded_mnist_subset_indices(tmp_path)
    assert len(train_images) == 30 and len(test_labels) == 20
    assert torch.equal(train_images, mnist["train"][0][train_indices])
    assert torch.equal(test_labels, mnist["test"][1][test_indices])
    with pytest.raises(ValueError, match="cannot take"):
        build_mnist_subset(DATA_DIR, tmp_path, num_train=60_001)


def test_embedded_subset_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="rebuild"):
        load_embedded_mnist_subset(tmp_path)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]
)
def test_idx_round_trip(dtype):
    tensor = (torch.randn(3, 4, 5) * 100).to(dtype)
    data = write_idx(tensor)
    assert len(data) == 4 + 3 * 4 + tensor.numel() * tensor.element_size()
    assert torch.equal(read_idx(data), tensor) and read_idx(data).dtype == dtype


def test_idx_rejects_bad_input():
    data = write_idx(torch.arange(10, dtype=torch.int32))
    assert data[:4] == bytes([0, 0, 0x0C, 1]) and data[4:8] == (10).to_bytes(4, "big")
    with pytest.raises(ValueError, match="bytes"):
        read_idx(data[:-1])
    with pytest.raises(ValueError, match="first two bytes"):
        read_idx(b"\x01" + data[1:])
    with pytest.raises(ValueError, match="type code"):
        read_idx(data[:2] + b"\x07" + data[3:])
    with pytest.raises(TypeError, match="int64"):
        write_idx(torch.arange(10))
    assert gzip.decompress(gzip.compress(data)) == data


# ---------------------------------------------------------------------------------------------
# Statically binarized MNIST


@requires_binarized_mnist
@pytest.mark.parametrize(
    "split, n", list(zip(BINARIZED_MNIST_SPLITS, [50_000, 10_000, 10_000], strict=True))
)
def test_load_binarized_mnist(split, n):
    x = load_binarized_mnist(DATA_DIR, split)
    assert x.shape == (n, 784) and x.dtype == torch.float32
    assert torch.all((x == 0) | (x == 1))
    assert 0.12 < x.mean().item() < 0.14  # the fraction of ink, as in dynamic binarization


def _write_amat(data_dir: Path, split: str, text: str) -> None:
    (data_dir / "BinarizedMNIST").mkdir(exist_ok=True)
    (data_dir / "BinarizedMNIST" / f"binarized_mnist_{split}.amat").write_bytes(text.encode())


def test_binarized_mnist_other_whitespace_and_malformed_files(tmp_path):
    rows = torch.randint(0, 2, (3, 784))
    lines = [" ".join(map(str, row.tolist())) for row in rows]
    _write_amat(tmp_path, "valid", "\r\n".join(lines) + "\r\n\r\n")
    assert torch.equal(load_binarized_mnist(tmp_path, "valid"), rows.float())

    _write_amat(tmp_path, "valid", "\n".join([lines[0], lines[1][2:], lines[2]]))
    with pytest.raises(ValueError, match="line 2: 783 values"):
        load_binarized_mnist(tmp_path, "valid")
    _write_amat(tmp_path, "test", "\n".join([lines[0], "2" + lines[1][1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2: values must be the digits 0 and 1"):
        load_binarized_mnist(tmp_path, "test")


def test_binarized_mnist_bad_split_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_binarized_mnist(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="binarized_mnist_train.amat"):
        load_binarized_mnist(tmp_path, "train")
