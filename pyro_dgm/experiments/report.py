"""The end of a run: test figures, a table, ``metrics.json`` first and the pictures after it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pyro_dgm.infer import evaluate_dataset

from .fit import write_metrics

__all__ = ["evaluate_vae", "format_table", "save_results"]


def evaluate_vae(
    vae: Any,
    test: torch.Tensor,
    *,
    num_samples: int,
    surgery_points: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Test figures of a VAE, in nats per data point: the importance-sampled log-likelihood
    with ``num_samples`` samples and its standard error, the ELBO, RE and KL
    (:func:`~pyro_dgm.infer.evaluate_dataset`), active units, mutual information and the
    ELBO surgery on ``surgery_points`` test images, and the seconds it took."""
    started = time.perf_counter()
    result = evaluate_dataset(vae.model, vae.guide, test, batch_size=100,
                              num_samples=num_samples, progress=progress,
                              description="test log-likelihood")
    latents = vae.latent_diagnostics(test, num_points=surgery_points, seed=seed)
    return {**result.as_dict(), **latents, "test_images": len(test),
            "seconds": time.perf_counter() - started}


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table: ``columns`` holds ``(header, key, format)`` triples, e.g.
    ``("LL", "log_likelihood", "9.2f")``. Text is aligned left, numbers right; a missing value
    prints as ``-``."""
    cells = [[("-" if row.get(key) is None else format(row[key], fmt)).strip()
              for _, key, fmt in columns] for row in rows]
    widths = [max([len(header)] + [len(line[k]) for line in cells])
              for k, (header, _, _) in enumerate(columns)]
    left = [fmt == "s" for _, _, fmt in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{value:<{width}}" if is_left else f"{value:>{width}}"
                         for value, width, is_left in zip(values, widths, left)).rstrip()

    return "\n".join([line([header for header, _, _ in columns]), *map(line, cells)])


def save_results(
    out: str | Path,
    metrics: dict[str, Any],
    pictures: dict[str, Callable[[Path], Any]] | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Write ``metrics.json`` in ``out``, then draw each picture ``draw(out / name)``. A
    picture that fails is reported in one line and never costs the numbers.

    :returns: the names of the files written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", **metrics)
    written = ["metrics.json"]
    for name, draw in (pictures or {}).items():
        try:
            draw(out / name)
            written.append(name)
        except Exception as error:  # a picture must never cost the numbers
            log(f"warning: {name} was not drawn: {type(error).__name__}: {error}")
    return written
