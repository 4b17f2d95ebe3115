"""A lean SVI training loop with KL warm-up, and checkpoints that survive interruption."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyro_dgm.infer.elbo import TraceAnalyticKL_ELBO
from pyro_dgm.infer.iwae import ImportanceWeightedELBO

#: the training objectives :func:`make_objective` builds
OBJECTIVES = ("elbo", "iwae")

__all__ = [
    "OBJECTIVES",
    "kl_warmup",
    "make_objective",
    "run_until_interrupted",
    "start_run",
    "load_checkpoint",
    "resume_run",
    "resume_training_state",
    "save_checkpoint",
    "save_training_state",
    "train_epoch",
]


def kl_warmup(step: int, warmup_steps: int) -> float:
    """Linear KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): :math:`\\beta = \\min(1,
    (\\mathrm{step} + 1) / \\mathrm{warmup\\_steps})`, and 1 when ``warmup_steps`` is 0.

    :raises ValueError: for negative ``step`` or ``warmup_steps``.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step}, {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def make_objective(
    objective: str = "elbo", num_particles: int = 1, gradient: str = "reparam"
) -> TraceAnalyticKL_ELBO | ImportanceWeightedELBO:
    """The training objective an example's ``--objective``, ``--num-particles`` and
    ``--gradient`` name, for models whose sample sites lie in a plate named ``"data"``:

    * ``"elbo"``: :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` (closed-form KL where one
      exists) averaged over ``num_particles`` vectorized samples;
    * ``"iwae"``: :class:`~pyro_dgm.infer.ImportanceWeightedELBO` with ``num_particles``
      :math:`= K` and the gradient estimator ``gradient``.

    :raises ValueError: for an unknown ``objective``, ``num_particles < 1``, or a ``gradient``
        other than ``"reparam"`` with the ELBO.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be positive, got {num_particles}")
    if objective == "iwae":
        return ImportanceWeightedELBO(num_particles, gradient=gradient)
    if gradient != "reparam":
        raise ValueError(f"gradient={gradient!r} is for objective='iwae'; the ELBO uses "
                         "gradient='reparam'")
    if num_particles == 1:
        return TraceAnalyticKL_ELBO()
    return TraceAnalyticKL_ELBO(num_particles=num_particles, vectorize_particles=True)


def train_epoch(
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    *,
    first_step: int = 0,
    warmup_steps: int = 0,
    num_batches: int | None = None,
    description: str = "train",
    progress: bool = True,
    loss_scale: float = 1.0,
    **loss_kwargs: Any,
) -> float:
    """One pass of stochastic gradient descent on a differentiable loss.

    ``loss_fn(*batch, kl_scale=beta, **loss_kwargs)`` must return the loss to minimise, e.g.
    ``functools.partial(elbo.differentiable_loss, model, guide)``: this is Pyro's ``SVI.step``
    without its per-step host synchronisation (the loss is summed on the device and read once
    per epoch, and every 100 steps for the progress bar).

    :param batches: iterable of tuples of tensors, passed positionally to ``loss_fn``.
    :param first_step: global step number of the first batch (for the warm-up schedule).
    :param warmup_steps: steps of linear KL warm-up (:func:`kl_warmup`).
    :param loss_scale: divisor of the reported loss, e.g. the number of data points when the
        loss is scaled to the whole data set, to report nats per data point.
    :returns: the mean loss per batch over the epoch divided by ``loss_scale``, as a float.
    """
    total = None
    step = first_step
    bar = tqdm(batches, total=num_batches, desc=description, disable=not progress,
               leave=False, dynamic_ncols=True)
    for count, batch in enumerate(bar, start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*batch, kl_scale=kl_warmup(step, warmup_steps), **loss_kwargs)
        loss.backward()
        optimizer.step()
        total = loss.detach() if total is None else total + loss.detach()
        step += 1
        if progress and count % 100 == 0:
            bar.set_postfix(loss=f"{total.item() / (count * loss_scale):.2f}")
    if total is None:
        raise ValueError("batches is empty")
    return total.item() / ((step - first_step) * loss_scale)


def save_checkpoint(path: str | os.PathLike, **state: Any) -> None:
    """Save ``state`` with :func:`torch.save` atomically: a run interrupted while saving leaves
    the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    :raises FileNotFoundError: naming the path when there is none.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def save_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    history: list,
    **extra: Any,
) -> None:
    """Checkpoint everything a training run needs to continue: the model's and optimizer's
    state, torch's CPU random state, the last finished ``epoch`` (0-based), the ``history`` of
    per-epoch records, and any ``extra`` entries (e.g. the best validation score). Atomic, as
    :func:`save_checkpoint`."""
    save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                    rng=torch.get_rng_state(), epoch=epoch, history=history, **extra)


def resume_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    map_location: Any = None,
) -> dict[str, Any] | None:
    """Restore a run saved by :func:`save_training_state` into ``model`` and ``optimizer``
    (and torch's CPU random state).

    :returns: the checkpoint (``epoch``, ``history`` and the extra entries), or ``None`` if
        there is no file at ``path``.
    """
    if not Path(path).is_file():
        return None
    state = load_checkpoint(path, map_location=map_location)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


def start_run(device: str = "auto", seed: int = 0) -> torch.device:
    """Prepare a training run: seed torch and Pyro with ``seed``, turn Pyro's validation off
    (its argument checks read tensors on the host every step), and return the device
    (``"auto"``: CUDA when available, else the CPU)."""
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    pyro.enable_validation(False)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def run_until_interrupted(main: Callable[[], Any]) -> Any:
    """Call ``main()``; on Ctrl-C, say that the checkpoint holds the last finished epoch and
    exit with status 130 instead of printing a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is in the checkpoint; rerun with --resume",
              file=sys.stderr)
        sys.exit(130)


def resume_run(
    resume: bool,
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    map_location: Any = None,
    **defaults: Any,
) -> dict[str, Any]:
    """Where a training run starts: ``{"history": [], "first_epoch": 0, **defaults}`` for a
    fresh run, or, with ``resume`` and a checkpoint at ``path``, the state restored by
    :func:`resume_training_state` (``first_epoch`` the one after the last finished, and the
    checkpoint's values of the ``defaults``' keys). Prints which of the two it is."""
    start = {"history": [], "first_epoch": 0, **defaults}
    if not resume:
        return start
    state = resume_training_state(path, model, optimizer, map_location=map_location)
    if state is None:
        print(f"no checkpoint at {path}; starting afresh")
        return start
    start.update({key: state[key] for key in defaults}, history=state["history"],
                 first_epoch=state["epoch"] + 1)
    print(f"resumed from {path} after epoch {start['first_epoch']}")
    return start
