"""Shuffled minibatches from a data set held on the device as one tensor."""

__all__ = ["MinibatchLoader"]

from collections.abc import Iterator

import torch
from torch import Tensor

from .binarization import binarize as _binarize


class MinibatchLoader:
    """Iterate over shuffled minibatches of a data set kept whole on one device.

    For data sets that fit in device memory (MNIST as ``uint8`` is 47 MB) this replaces
    :class:`torch.utils.data.DataLoader` without any per-example Python work: an epoch is one
    :func:`torch.randperm` on the data's device, and a batch is one ``index_select`` followed by
    one Bernoulli draw, so no data cross the host-device boundary during training.

    Example::

        loader = MinibatchLoader(train_images, batch_size=128, return_indices=True)
        for x, idx in loader:  # x: (128, 784) float32 in {0, 1}, idx: (128,) int64
            svi.step(x, idx)  # the model may use pyro.plate("data", loader.num_examples,
                              # subsample=idx) to scale the likelihood by N / batch size

    :param images: the data set, shape ``(N, ...)``, flattened to ``(N, D)`` (``(N, 784)`` for
        MNIST) and stored as given: ``uint8`` intensities in [0, 255] (preferred: four times
        smaller than float) or floating point values in [0, 1].
    :param batch_size: number of examples per batch.
    :param shuffle: draw a new random order every epoch; ``False`` keeps the data set's order.
    :param drop_last: skip the final batch if it has fewer than ``batch_size`` examples.
    :param binarize: yield a fresh Bernoulli draw of every batch (dynamic binarization, a new
        one every epoch); ``False`` yields the values themselves in [0, 1] (``uint8`` divided by
        255; floating point data, e.g. statically binarized MNIST, as they are).
    :param return_indices: yield ``(batch, indices)`` pairs, ``indices`` being the ``int64``
        positions of the batch's examples in ``images`` (e.g. to look up labels or for
        ``pyro.plate(..., subsample=indices)``), instead of the batch alone.
    :param dtype: floating dtype of the batches.
    :param device: where to keep the data; ``None`` keeps the images' device.
    :param generator: generator on the data's device for both the order and the Bernoulli
        draws; a seeded one makes the whole sequence of epochs reproducible. ``None`` uses
        torch's global generator.
    :param rank: this process's rank in data-parallel training: every global batch of
        ``batch_size * num_replicas`` examples is cut into ``num_replicas`` shards of
        ``batch_size``, and this loader yields shard ``rank``. The binarization noise is drawn for
        the whole global batch and sliced, so every rank must pass a ``generator`` seeded alike;
        then the shards together are exactly the batches of a single loader with the global
        batch size. A global batch that cannot be cut evenly is dropped.
    :param num_replicas: number of ranks (1: no sharding).
    :raises ValueError: for a non-positive ``batch_size``, an empty data set, a generator on
        another device type than the data, a ``rank`` outside ``[0, num_replicas)``, or
        sharding without a ``generator``.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        binarize: bool = True,
        return_indices: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, num_replicas), got rank={rank}, "
                             f"num_replicas={num_replicas}")
        if num_replicas > 1 and generator is None:
            raise ValueError("sharding (num_replicas > 1) needs a generator seeded alike on "
                             "every rank, got generator=None")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if images.dim() < 1 or images.shape[0] == 0:
            raise ValueError(
                f"images must be a non-empty batch (N, ...), got {tuple(images.shape)}"
            )
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        self.data = images.reshape(images.shape[0], -1).to(device).contiguous()
        if generator is not None and generator.device.type != self.data.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the data are on {self.data.device}"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.binarize = binarize
        self.return_indices = return_indices
        self.dtype = dtype
        self.generator = generator
        self.rank, self.num_replicas = rank, num_replicas

    @property
    def num_examples(self) -> int:
        """Number of examples N in the data set (the full size for ``pyro.plate``)."""
        return self.data.shape[0]

    def __len__(self) -> int:
        """Number of batches per epoch."""
        size = self.batch_size * self.num_replicas
        if self.drop_last or self.num_replicas > 1:
            return self.num_examples // size
        return -(-self.num_examples // size)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """One epoch: ``len(self)`` batches of shape ``(batch_size, D)`` (the last one possibly
        smaller), each example exactly once, all on the data's device."""
        n, device = self.num_examples, self.data.device
        if self.shuffle:
            order = torch.randperm(n, device=device, generator=self.generator)
        else:
            order = torch.arange(n, device=device)
        size = self.batch_size * self.num_replicas
        batches = order.split(size)[: len(self)]
        shard = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for indices in batches:
            batch = self._prepare(self.data.index_select(0, indices), shard)
            indices = indices[shard]
            yield (batch, indices) if self.return_indices else batch

    def _prepare(self, batch: Tensor, shard: slice) -> Tensor:
        if self.binarize:  # noise for the global batch, then this rank's rows
            return _binarize(batch, self.generator, self.dtype)[shard]
        batch = batch[shard]
        if batch.dtype == torch.uint8:
            return batch.to(self.dtype).div_(255)
        return batch.to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_examples={self.num_examples}, "
            f"dim={self.data.shape[1]}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, binarize={self.binarize}, device={self.data.device}"
            + (f", rank={self.rank}, num_replicas={self.num_replicas})" if self.num_replicas > 1
               else ")")
        )
