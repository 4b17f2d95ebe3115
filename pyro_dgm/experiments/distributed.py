"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

Each rank holds a replica of the model and a shard of every global batch
(:class:`~pyro_dgm.data.MinibatchLoader` with ``rank`` and ``num_replicas``). The loss is
computed through :class:`torch.nn.parallel.DistributedDataParallel`, whose backward averages
the gradients over the ranks while it runs. A Pyro loss scaled to the whole data set (a
``pyro.plate("data", N, subsample=...)``) is an unbiased estimate of the full-data loss on every
rank, so the average is the estimate of the global batch: the update equals single-process
training on the global batch.

Why DDP rather than an engine such as Lightning (Pyro's ``examples/svi_lightning.py``): the
training loop is a dozen lines that the examples share already (:func:`~pyro_dgm.experiments.fit`),
and DDP is the one piece that has to be exact. Wrapping the loss in a module is the only
change it needs; a second dependency would add its own checkpoint format and loop.

Random streams: every rank seeds torch with ``seed + rank``, so the latent samples (and the
rejection sampler's proposals) of different ranks are independent. The data order and the
binarization noise come from a generator seeded alike on every rank, drawn for the global batch
and sliced, so the data each rank sees does not depend on the number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Distributed"]


class _Loss(torch.nn.Module):
    """A loss as a module, so that DDP's gradient hooks see the model's parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.loss_fn(*args, **kwargs)


class Distributed:
    """Where this process stands in a data-parallel run; one process of one rank by default.

    :param rank: this process's rank in ``[0, world_size)``.
    :param world_size: number of processes.
    :raises ValueError: for a rank outside ``[0, world_size)``.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, "
                             f"world_size={world_size}")
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_environment(cls, backend: str | None = None) -> Distributed:
        """Join the process group that ``torchrun`` describes in the environment (``RANK``,
        ``WORLD_SIZE``, ``MASTER_ADDR``, ...), or a single-process run when there is none.
        ``backend`` defaults to NCCL with CUDA, else gloo."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        """Rank 0, which writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    def device(self, device: str) -> str:
        """This rank's device: ``cuda:LOCAL_RANK`` for a ``cuda`` run under several ranks,
        else ``device`` itself."""
        if self.active and torch.device(device).type == "cuda":
            return f"cuda:{os.environ.get('LOCAL_RANK', self.rank)}"
        return device

    def wrap(self, model: torch.nn.Module, loss_fn: Callable[..., Tensor]
             ) -> Callable[..., Tensor]:
        """``loss_fn`` itself, or under several ranks the same loss through
        :class:`~torch.nn.parallel.DistributedDataParallel` over ``model``'s parameters."""
        if not self.active:
            return loss_fn
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(
            _Loss(model, loss_fn), device_ids=[device] if device.type == "cuda" else None)

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks."""
        if not self.active:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"
