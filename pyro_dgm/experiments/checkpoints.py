"""Checkpoints that survive interruption, and the run they belong to.

A run keeps two files in its output folder:

* ``checkpoint.pt``: everything needed to continue (model, optimizer, random states, the last
  finished epoch, the per-epoch history, the best validation score so far), rewritten after
  every epoch;
* ``best.pt``: the model at the best validation score.

Both carry the run's ``run_id``. A ``best.pt`` is only ever loaded by the run that wrote it, so
a stale file from an earlier run in the same folder cannot be evaluated by mistake.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_checkpoint",
    "new_run_id",
    "random_state",
    "save_checkpoint",
    "set_random_state",
]


def new_run_id() -> str:
    """A fresh identifier for a training run (32 hexadecimal digits)."""
    return uuid.uuid4().hex


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    """Save ``state`` with :func:`torch.save` atomically: a run interrupted while saving leaves
    the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """Load a file written by :func:`save_checkpoint`.

    :raises FileNotFoundError: naming the path when there is none.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def random_state() -> dict[str, Any]:
    """The random states a run draws from, to checkpoint: torch's CPU generator, Python's and
    NumPy's (as :func:`pyro.util.get_rng_state` gathers them) and every CUDA device's."""
    import pyro.util

    return {"pyro": pyro.util.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_random_state(state: dict[str, Any]) -> None:
    """Restore what :func:`random_state` returned (CUDA's only where CUDA is present)."""
    import pyro.util

    pyro.util.set_rng_state(state["pyro"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
