"""The end of a run: test figures, a table, ``metrics.json`` first and the pictures after it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pyro_dgm.infer import evaluate_dataset, kl_per_unit, latent_diagnostics

from .fit import write_metrics

__all__ = ["evaluate_vae", "format_table", "latent_probe", "latent_report", "save_results"]


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
    (:func:`~pyro_dgm.infer.evaluate_dataset`), active units, mutual information, the ELBO
    surgery and the KL of each latent level (:func:`latent_report`, on ``surgery_points``
    test images; none with 0), and the seconds it took. The chunks of data points and samples
    are chosen to fit the default memory budget (:func:`~pyro_dgm.infer.evaluate_dataset`)."""
    started = time.perf_counter()
    result = evaluate_dataset(vae.model, vae.guide, test, num_samples=num_samples,
                              progress=progress, description="test log-likelihood")
    latents = latent_report(vae, test, num_points=surgery_points, seed=seed) if (
        surgery_points) else {}
    return {**result.as_dict(), **latents, "test_images": len(test),
            "seconds": time.perf_counter() - started}


def latent_report(
    vae: Any,
    data: torch.Tensor,
    *,
    num_points: int = 1000,
    seed: int = 0,
    per_unit: bool = False,
) -> dict[str, Any]:
    """How a model uses its latent levels on ``data`` (at most ``num_points`` rows are used),
    as JSON-ready values: for each level ``(name, posterior, prior)`` of
    ``vae.latent_levels(data)``, :func:`~pyro_dgm.infer.latent_diagnostics` (active units;
    with a prior, mutual information and the ELBO surgery) and the level's KL in nats per data
    point, ``kl_<name>`` (:func:`~pyro_dgm.infer.kl_per_unit` summed). One level: the keys
    ``active_units``, ``mutual_information``, ... as they are; several: suffixed ``_<name>``,
    with ``active_units`` their sum and ``mutual_information`` the first (top) level's. With
    ``per_unit``, ``kl_per_unit`` holds each level's list of per-unit KLs (a collapse shows as
    a curve of zeros, epoch after epoch)."""
    data = data[:num_points]
    kls = kl_per_unit(vae.model, vae.guide, data, seed=seed)
    levels = vae.latent_levels(data)
    report: dict[str, Any] = {}
    for name, posterior, prior in levels:
        figures = latent_diagnostics(posterior, prior, data, num_points=num_points, seed=seed)
        suffix = "" if len(levels) == 1 else f"_{name}"
        report.update({f"{key}{suffix}": value for key, value in figures.items()})
        report[f"kl_{name}"] = float(kls[name].sum())
    if len(levels) > 1:
        report["active_units"] = sum(report[f"active_units_{name}"] for name, _, _ in levels)
        top = levels[0][0]
        if f"mutual_information_{top}" in report:
            report["mutual_information"] = report[f"mutual_information_{top}"]
    if per_unit:
        report["kl_per_unit"] = {name: [round(float(value), 5) for value in kl]
                                 for name, kl in kls.items()}
    return report


def latent_probe(
    vae: Any, data: torch.Tensor | None, *, num_points: int = 500, seed: int = 0
) -> Callable[[], dict[str, Any]] | None:
    """An ``epoch_metrics`` hook for :func:`~pyro_dgm.experiments.fit`: each epoch,
    ``{"latents": latent_report(vae, data[:num_points], per_unit=True)}`` (KL per unit, active
    units and MI of every level, on a fixed validation subset), so that a posterior collapse
    shows in ``metrics.json`` as a curve. ``None`` (no hook) when ``data`` is ``None``."""
    if data is None or num_points < 1:
        return None
    probe = data[:num_points]
    return lambda: {"latents": latent_report(vae, probe, seed=seed, per_unit=True)}


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
