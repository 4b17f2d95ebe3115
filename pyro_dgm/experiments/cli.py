"""Command lines of the examples: presets, the options they share, and the checks that fail fast
with one line naming the argument."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .distributed import Distributed
from .mnist import ImageData, dynamic_mnist

__all__ = [
    "ExampleParser",
    "check_device",
    "dynamic_mnist_from_args",
    "run_until_interrupted",
    "seed_everything",
    "start_run",
]

#: the data folder when ``--data-dir`` is not given: ``$PYRO_DGM_DATA_DIR``, else ``data``
DATA_DIR_VARIABLE = "PYRO_DGM_DATA_DIR"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and adds each option's default once, to options that
    have help text and a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "%(default)" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        if action.option_strings:
            return f"{help_text} (default: %(default)s)"
        return help_text


class ExampleParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` with presets: options a preset sets have ``None`` as
    their default, say so in ``--help`` ("preset default: 500; paper: 1200"), and take the
    preset's value unless given on the command line.

    :param presets: ``{preset name: {option destination: value}}``; the first is the default.
    """

    def __init__(self, description: str, presets: Mapping[str, Mapping[str, Any]],
                 **kwargs: Any) -> None:
        super().__init__(description=description, formatter_class=_Formatter, **kwargs)
        self.presets = {name: dict(values) for name, values in presets.items()}
        self.add_argument("--preset", choices=list(self.presets), default=next(iter(presets)),
                          help="a set of defaults for the options marked 'preset'; explicit "
                               "options override it")

    def add_preset_argument(self, *flags: str, help: str, **kwargs: Any) -> argparse.Action:
        """An option whose default comes from the preset."""
        action = self.add_argument(*flags, default=None, help=help, **kwargs)
        values = "; ".join(f"{name}: {_show(values[action.dest])}"
                           for name, values in self.presets.items() if action.dest in values)
        action.help = f"{help} (preset {values})"
        return action

    def add_objective_arguments(self, objectives: tuple[str, ...]) -> None:
        """``--objective`` and ``--num-particles`` (K: 1 for the ELBO and 5 for IWAE when not
        given, filled in by :meth:`parse_args`)."""
        self.add_argument("--objective", choices=objectives, default=objectives[0],
                          help="the ELBO (closed-form KL where there is one) or the IWAE bound")
        self.add_argument("--num-particles", type=int, default=None,
                          help="samples per data point in the objective, K (1 for the ELBO "
                               "and 5 for IWAE when not given)")

    def add_schedule_arguments(self) -> None:
        """The options a preset sets, for those of ``--epochs``, ``--batch-size``, ``--lr``,
        ``--warmup-epochs``, ``--warmup-unit``, ``--patience``, ``--valid-images`` and
        ``--num-samples`` that the presets name."""
        from .fit import WARMUP_UNITS

        known = set().union(*self.presets.values())
        options = [
            ("--epochs", {"type": int}, "the largest number of epochs"),
            ("--batch-size", {"type": int}, "images per step (per process under torchrun)"),
            ("--lr", {"type": float}, "the optimizer's learning rate"),
            ("--warmup-epochs", {"type": float},
             "linear KL warm-up: beta reaches 1 at the end of this epoch"),
            ("--warmup-unit", {"choices": WARMUP_UNITS},
             "beta rises at every step, or once per epoch"),
            ("--patience", {"type": int},
             "early stopping: epochs after the warm-up without a better validation ELBO"),
            ("--valid-images", {"type": int}, "training images held out for validation"),
            ("--num-samples", {"type": int}, "importance samples per test image for the LL"),
        ]
        for flag, kwargs, help_text in options:
            if flag[2:].replace("-", "_") in known:
                self.add_preset_argument(flag, help=help_text, **kwargs)

    def add_subset_arguments(self) -> None:
        """``--train-images``, ``--test-images`` (the first N of each) and
        ``--surgery-points``."""
        self.add_argument("--train-images", type=int, help="use the first N training images")
        self.add_argument("--test-images", type=int, help="evaluate on the first N test images")
        self.add_argument("--surgery-points", type=int, default=1000,
                          help="test images in the ELBO surgery (MI, KL(q||p)); 0 skips it")

    def add_run_arguments(self, out: str) -> None:
        """The options every example has: device, seed, data, output, resume, progress."""
        self.add_argument("--device", default="auto",
                          help="auto (CUDA when present), cpu, cuda or cuda:N")
        self.add_argument("--seed", type=int, default=0, help="seed of every random draw")
        self.add_argument("--data-dir", default=None,
                          help=f"folder holding MNIST/raw (torchvision's layout); default "
                               f"${DATA_DIR_VARIABLE}, else ./data, else the subset shipped "
                               f"with pyro_dgm. A folder named here must exist.")
        self.add_argument("--out", default=out, help="folder for checkpoints, metrics and "
                                                     "pictures")
        self.add_argument("--resume", action="store_true",
                          help="continue the run whose checkpoint is in --out")
        self.add_argument("--no-progress", action="store_true", help="no progress bars")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        for key, value in self.presets[parsed.preset].items():
            if getattr(parsed, key, None) is None:
                setattr(parsed, key, value)
        if "num_particles" in vars(parsed):
            parsed.num_particles = parsed.num_particles or (
                5 if parsed.objective == "iwae" else 1)
        self._check_counts(parsed)
        if hasattr(parsed, "device"):
            try:
                parsed.device = check_device(parsed.device)
            except ValueError as error:
                self.error(str(error))
        if hasattr(parsed, "data_dir"):
            parsed.data_dir_given = parsed.data_dir is not None
            if parsed.data_dir is None:
                parsed.data_dir = os.environ.get(DATA_DIR_VARIABLE, "data")
            elif not os.path.isdir(parsed.data_dir):
                self.error(f"--data-dir {parsed.data_dir}: no such folder")
        return parsed

    #: options that must be positive, and options that must not be negative, where present
    POSITIVE = ("latent_dim", "num_particles", "batch_size", "num_samples", "num_flows",
                "num_pseudo_inputs", "patience")
    NON_NEGATIVE = ("epochs", "warmup_epochs", "valid_images", "surgery_points", "train_images",
                    "test_images")

    def _check_counts(self, parsed: argparse.Namespace) -> None:
        self.require_counts(parsed, self.POSITIVE)
        self.require_counts(parsed, self.NON_NEGATIVE, low=0)
        patience, valid = vars(parsed).get("patience"), vars(parsed).get("valid_images")
        if patience is not None and valid is not None:
            self.require(valid > 0, "--patience", "unset without --valid-images (early "
                         "stopping needs a validation split)", patience)

    def require_counts(self, parsed: argparse.Namespace, names: tuple[str, ...],
                       low: int = 1) -> None:
        """Fail with a one-line error naming the option unless each of ``names`` that
        ``parsed`` holds (and is not ``None``) is at least ``low`` (1: positive, 0:
        non-negative)."""
        expected = "a positive number" if low >= 1 else "non-negative"
        for name in names:
            value = vars(parsed).get(name)
            if value is not None:
                self.require(value >= low, f"--{name.replace('_', '-')}", expected, value)

    def require(self, condition: bool, argument: str, expected: str, value: Any) -> None:
        """Fail with a one-line error naming ``argument`` unless ``condition`` holds."""
        if not condition:
            self.error(f"{argument} must be {expected}, got {value}")


def check_device(device: str) -> str:
    """The device a run can use: ``"auto"`` gives ``"cuda"`` where CUDA is present, else
    ``"cpu"``.

    :raises ValueError: naming ``--device`` for a string torch cannot read, or a CUDA device
        on a machine without one.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N"
                         ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA device "
                             "(use --device cpu or auto)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    elif parsed.type != "cpu":
        raise ValueError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return str(parsed)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, Python and NumPy through Pyro with ``seed + rank``, and turn Pyro's
    validation off (its argument checks read tensors on the host at every step)."""
    import pyro

    pyro.set_rng_seed(seed + rank)
    pyro.enable_validation(False)


def start_run(args: argparse.Namespace) -> tuple[Distributed, str]:
    """Join the ``torchrun`` process group when launched by it, give this process its device
    (``args.device``, one GPU per rank) and seed it with ``args.seed`` plus its rank.

    :returns: ``(distributed, device)``.
    """
    distributed = Distributed.from_environment()
    device = distributed.device(args.device)
    seed_everything(args.seed, distributed.rank)
    return distributed, device


def dynamic_mnist_from_args(args: argparse.Namespace, device: str,
                            distributed: Distributed) -> ImageData:
    """:func:`~pyro_dgm.experiments.dynamic_mnist` with the options of
    :meth:`ExampleParser.add_schedule_arguments` (``--batch-size``, ``--valid-images``),
    :meth:`~ExampleParser.add_subset_arguments` and :meth:`~ExampleParser.add_run_arguments`
    (``--data-dir``: a folder the user named must hold MNIST; ``--seed``)."""
    return dynamic_mnist(args.data_dir, batch_size=args.batch_size,
                         valid_images=args.valid_images, train_images=args.train_images,
                         test_images=args.test_images, seed=args.seed, device=device,
                         fallback=not args.data_dir_given, distributed=distributed)


def run_until_interrupted(main: Callable[[], Any]) -> Any:
    """Call ``main()``. On Ctrl-C print what the checkpoint holds, in one line, and exit with
    status 130 instead of a traceback."""
    try:
        return main()
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted"
        print(f"\n{message}", file=sys.stderr)
        sys.exit(130)


def _show(value: Any) -> str:
    return "none" if value is None else str(value)
