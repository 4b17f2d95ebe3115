"""The training loop the examples share: KL warm-up, early stopping on a validation split, the
best model kept and reloaded, ``--resume``, tqdm progress and a metrics file per epoch.

:func:`fit` trains any ``torch.nn.Module`` whose loss is a function of a batch, such as
``functools.partial(elbo.differentiable_loss, vae.model, vae.guide)`` for a Pyro model/guide
pair. It is Pyro's ``SVI.step`` loop without its per-step host synchronisation: losses are summed
on the device and read once per epoch (and every 100 steps for the progress bar).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoints import (
    load_checkpoint,
    new_run_id,
    random_state,
    save_checkpoint,
    set_random_state,
)
from .distributed import Distributed

__all__ = ["WARMUP_UNITS", "FitResult", "TrainingInterrupted", "fit", "kl_warmup", "train_epoch",
           "write_metrics"]

#: how the KL weight of :func:`kl_warmup` advances: after every step, or once per epoch
WARMUP_UNITS = ("step", "epoch")


def kl_warmup(epoch: int, step: int, steps_per_epoch: int, warmup_epochs: float,
              unit: str = "step") -> float:
    """The KL weight beta of a linear warm-up (Bowman et al. 2016; Sønderby et al. 2016) that
    reaches 1 at the end of epoch ``warmup_epochs``, whichever the unit:

    * ``unit="step"``: :math:`\\beta = \\min(1, (e S + s + 1) / (W S))` at step ``s`` of the
      ``S`` steps of epoch ``e`` (0-based), a ramp over every step;
    * ``unit="epoch"``: :math:`\\beta = \\min(1, (e + 1) / W)`, constant within an epoch (the
      Sylvester-flow paper's ``min(epoch / warmup, 1)`` with 1-based epochs).

    ``warmup_epochs`` :math:`W = 0` means no warm-up (beta = 1).

    :raises ValueError: for a negative ``epoch``, ``step`` or ``warmup_epochs``, a
        non-positive ``steps_per_epoch``, or an unknown ``unit``.
    """
    if unit not in WARMUP_UNITS:
        raise ValueError(f"unit must be one of {WARMUP_UNITS}, got {unit!r}")
    if epoch < 0 or step < 0 or warmup_epochs < 0 or steps_per_epoch < 1:
        raise ValueError("epoch, step and warmup_epochs must be >= 0 and steps_per_epoch >= 1, "
                         f"got {epoch}, {step}, {warmup_epochs}, {steps_per_epoch}")
    if warmup_epochs == 0:
        return 1.0
    if unit == "epoch":
        return min(1.0, (epoch + 1) / warmup_epochs)
    return min(1.0, (epoch * steps_per_epoch + step + 1) / (warmup_epochs * steps_per_epoch))


def train_epoch(
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    *,
    kl_scale: Callable[[int], float] | None = None,
    num_batches: int | None = None,
    description: str = "train",
    progress: bool = True,
    loss_scale: float = 1.0,
    **loss_kwargs: Any,
) -> float:
    """One pass of stochastic gradient descent on a differentiable loss.

    ``loss_fn(*batch, kl_scale=beta, **loss_kwargs)`` must return the loss to minimise, e.g.
    ``functools.partial(elbo.differentiable_loss, model, guide)``.

    :param batches: iterable of tuples of tensors, passed positionally to ``loss_fn``.
    :param kl_scale: the KL weight at each step of the epoch (0-based), e.g. from
        :func:`kl_warmup`; ``None`` passes no ``kl_scale`` at all.
    :param loss_scale: divisor of the reported loss, e.g. the number of data points when the
        loss is scaled to the whole data set, to report nats per data point.
    :returns: the mean loss per batch over the epoch divided by ``loss_scale``, as a float.
    :raises ValueError: if ``batches`` is empty.
    """
    total = None
    bar = tqdm(batches, total=num_batches, desc=description, disable=not progress,
               leave=False, dynamic_ncols=True)
    count = 0
    for count, batch in enumerate(bar, start=1):
        optimizer.zero_grad(set_to_none=True)
        if kl_scale is not None:
            loss_kwargs["kl_scale"] = kl_scale(count - 1)
        loss = loss_fn(*batch, **loss_kwargs)
        loss.backward()
        optimizer.step()
        total = loss.detach() if total is None else total + loss.detach()
        if progress and count % 100 == 0:
            bar.set_postfix(loss=f"{total.item() / (count * loss_scale):.2f}")
    if total is None:
        raise ValueError("batches is empty")
    return total.item() / (count * loss_scale)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`; the message says what the checkpoint holds."""


@dataclass
class FitResult:
    """What :func:`fit` did. ``history`` holds one record per finished epoch (this run and the
    one it resumed): ``epoch`` (1-based), ``train_objective`` (nats per data point, the
    negated loss), ``kl_scale`` (beta at the epoch's last step), ``seconds``, and when there is
    a validation split ``valid_score``, plus whatever ``epoch_metrics`` returned."""

    run_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None
    stopped_early: bool = False
    checkpoint: Path | None = None

    @property
    def epochs(self) -> int:
        """Number of finished epochs."""
        return len(self.history)


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    train: Any,
    out: str | Path,
    *,
    epochs: int,
    warmup_epochs: float = 0.0,
    warmup_unit: str = "step",
    validate: Callable[[], float] | None = None,
    patience: int | None = None,
    epoch_metrics: Callable[[], dict[str, Any]] | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    objective_name: str = "ELBO",
    loss_scale: float = 1.0,
    progress: bool = True,
    distributed: Distributed | None = None,
    log: Callable[[str], None] = print,
    **loss_kwargs: Any,
) -> FitResult:
    """Train ``model`` for at most ``epochs`` epochs and leave it at its best validation score.

    Every epoch: one pass over ``train`` with :func:`train_epoch` (the KL weight from
    :func:`kl_warmup`), then ``validate()`` (higher is better, e.g. the validation ELBO in nats
    per data point), ``epoch_metrics()``, a line of log, ``checkpoint.pt``, and
    ``metrics.json`` (``config``, ``run_id``, ``history``, ``best_epoch``) in ``out``. A better
    validation score saves ``best.pt``. Training stops early when ``patience`` epochs after the
    warm-up have brought no better score. At the end the model holds the parameters of this
    run's ``best.pt`` (the last epoch's without ``validate``).

    :param model: the module holding every trained parameter (checkpointed whole).
    :param loss_fn: called as ``loss_fn(*batch, kl_scale=beta, **loss_kwargs)``; the loss to
        minimise.
    :param train: an iterable of batches with ``len()``, such as
        :class:`~pyro_dgm.data.MinibatchLoader` (sharded across ranks under ``distributed``).
    :param out: output folder (created).
    :param epochs: the largest number of epochs (counting those of a resumed run).
    :param warmup_epochs: length of the linear KL warm-up in epochs, and ``warmup_unit`` how it
        advances (:func:`kl_warmup`).
    :param patience: early stopping: epochs without a better ``validate()`` score, counted
        from the end of the warm-up; ``None`` trains all ``epochs``. Needs ``validate``.
    :param resume: continue the run saved in ``out/checkpoint.pt`` (a fresh run if none).
        Without it, a fresh run starts and removes the ``best.pt`` of an earlier one.
    :param config: JSON-serialisable settings of the run, saved in the checkpoint and the
        metrics.
    :param loss_scale: divisor of the reported loss (the number of data points for a loss
        scaled to the whole data set).
    :param distributed: data-parallel training (:class:`~pyro_dgm.experiments.Distributed`);
        only rank 0 writes files and logs.
    :returns: :class:`FitResult`.
    :raises ValueError: for a negative ``epochs`` or ``warmup_epochs``, ``patience`` without
        ``validate``, or a non-finite training loss (naming the epoch).
    :raises TrainingInterrupted: on Ctrl-C, saying whether a finished epoch is saved.
    """
    if epochs < 0 or warmup_epochs < 0:
        raise ValueError(f"epochs and warmup_epochs must be >= 0, got {epochs}, "
                         f"{warmup_epochs}")
    if patience is not None and (validate is None or patience < 1):
        raise ValueError("patience needs validate and must be a positive number of epochs, "
                         f"got patience={patience}")
    if warmup_unit not in WARMUP_UNITS:
        raise ValueError(f"warmup_unit must be one of {WARMUP_UNITS}, got {warmup_unit!r}")
    distributed = distributed or Distributed()
    writer = distributed.is_main
    out = Path(out)
    checkpoint_path, best_path = out / "checkpoint.pt", out / "best.pt"
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    say = log if writer else (lambda line: None)

    result = FitResult(run_id=new_run_id())
    first_epoch = 0
    device = next(model.parameters()).device
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if distributed.rank == 0:
            set_random_state(state["random_state"])
        result = FitResult(run_id=state["run_id"], history=state["history"],
                           best_epoch=state["best_epoch"], best_score=state["best_score"],
                           checkpoint=checkpoint_path)
        first_epoch = state["epoch"] + 1
        say(f"resumed run {result.run_id[:8]} from {checkpoint_path} after epoch {first_epoch}")
    else:
        if resume:
            say(f"no checkpoint in {out}; starting a fresh run")
        if writer and best_path.exists():
            best_path.unlink()
            say(f"removed {best_path}, left by an earlier run")
    result.run_id = distributed.broadcast_object(result.run_id)

    step_model = distributed.wrap(model, loss_fn)
    steps = len(train)
    since_best = _epochs_since_best(result, warmup_epochs)
    epoch = first_epoch
    try:
        for epoch in range(first_epoch, epochs):
            if patience is not None and since_best >= patience:
                result.stopped_early = True
                say(f"early stop: no better validation score in the {patience} epochs after "
                    f"epoch {result.best_epoch}")
                break
            if hasattr(train, "set_epoch"):
                train.set_epoch(epoch)
            model.train()
            started = _now(device)

            def beta(step: int, epoch: int = epoch) -> float:
                return kl_warmup(epoch, step, steps, warmup_epochs, warmup_unit)

            loss = train_epoch(step_model, optimizer, train, kl_scale=beta, num_batches=steps,
                               description=f"epoch {epoch + 1}/{epochs}",
                               progress=progress and writer, loss_scale=loss_scale,
                               **loss_kwargs)
            loss = distributed.mean(loss)
            if not math.isfinite(loss):
                raise ValueError(f"the training loss of epoch {epoch + 1} is {loss}: not finite")
            record = {"epoch": epoch + 1, "train_objective": -loss,
                      "kl_scale": beta(steps - 1), "seconds": _now(device) - started}
            model.eval()
            line = f"epoch {epoch + 1:4d}  train {objective_name} {-loss:9.3f}"
            if validate is not None:
                score = distributed.broadcast_object(validate() if writer else None)
                record["valid_score"] = score
                improved = result.best_score is None or score > result.best_score
                if improved:
                    result.best_score, result.best_epoch = score, epoch + 1
                    if writer:
                        save_checkpoint(best_path, model=model.state_dict(), epoch=epoch,
                                        run_id=result.run_id, score=score, config=config)
                line += f"  valid {objective_name} {score:9.3f}{' *' if improved else '  '}"
            if epoch_metrics is not None:
                record.update(epoch_metrics())
            record["seconds"] = _now(device) - started
            result.history.append(record)
            say(f"{line}  ({record['seconds']:.1f} s)")
            if writer:
                save_checkpoint(checkpoint_path, model=model.state_dict(),
                                optimizer=optimizer.state_dict(), random_state=random_state(),
                                epoch=epoch, history=result.history, run_id=result.run_id,
                                best_epoch=result.best_epoch, best_score=result.best_score,
                                config=config)
                write_metrics(out / "metrics.json", config=config, run_id=result.run_id,
                              best_epoch=result.best_epoch, history=result.history)
            result.checkpoint = checkpoint_path
            since_best = _epochs_since_best(result, warmup_epochs)
    except KeyboardInterrupt as interrupt:
        saved = (f"epoch {result.epochs} is saved in {checkpoint_path}; rerun with --resume "
                 "to continue" if result.epochs else "no epoch finished, so there is nothing "
                 "to resume")
        raise TrainingInterrupted(f"interrupted during epoch {epoch + 1}: {saved}") from interrupt

    distributed.barrier()
    if validate is not None and best_path.is_file():
        best = load_checkpoint(best_path, map_location=device)
        if best["run_id"] == result.run_id:
            model.load_state_dict(best["model"])
            say(f"loaded the best epoch ({result.best_epoch}, valid {objective_name} "
                f"{result.best_score:.3f}) from {best_path}")
    model.eval()
    return result


def write_metrics(path: str | Path, **metrics: Any) -> None:
    """Write ``metrics`` as indented JSON, atomically (NaN and infinities as JSON's
    extensions, as :func:`json.dumps` writes them)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(metrics, indent=2, default=str))
    temporary.replace(path)


def _epochs_since_best(result: FitResult, warmup_epochs: float) -> int:
    """Finished epochs after both the best one and the end of the warm-up."""
    if result.best_epoch is None:
        return 0
    return result.epochs - max(result.best_epoch, math.ceil(warmup_epochs))


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
