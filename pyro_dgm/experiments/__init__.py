"""The experiment harness the examples share: command lines with presets, data splits, the
training loop with early stopping and checkpoints, data-parallel training, reports and pictures.

The library proper (:mod:`pyro_dgm.special`, :mod:`~pyro_dgm.distributions`,
:mod:`~pyro_dgm.transforms`, :mod:`~pyro_dgm.infer`, :mod:`~pyro_dgm.models`) imports none of
this: files, seeding, progress bars and process exits live here only.
"""

from .checkpoints import load_checkpoint, save_checkpoint
from .cli import (
    ExampleParser,
    check_device,
    dynamic_mnist_from_args,
    run_until_interrupted,
    seed_everything,
    start_run,
)
from .distributed import Distributed
from .fit import (
    WARMUP_UNITS,
    FitResult,
    TrainingInterrupted,
    fit,
    kl_warmup,
    train_epoch,
    write_metrics,
)
from .mnist import ImageData, dynamic_mnist, static_mnist
from .report import evaluate_vae, format_table, latent_probe, latent_report, save_results

__all__ = [
    "WARMUP_UNITS",
    "Distributed",
    "ExampleParser",
    "FitResult",
    "ImageData",
    "TrainingInterrupted",
    "check_device",
    "dynamic_mnist",
    "dynamic_mnist_from_args",
    "evaluate_vae",
    "fit",
    "format_table",
    "kl_warmup",
    "latent_probe",
    "latent_report",
    "load_checkpoint",
    "run_until_interrupted",
    "save_checkpoint",
    "save_results",
    "seed_everything",
    "start_run",
    "static_mnist",
    "train_epoch",
    "write_metrics",
]
