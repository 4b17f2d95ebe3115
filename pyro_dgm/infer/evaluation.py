"""Per-data-point evaluation of Pyro model/guide pairs: importance-sampled log-likelihood and
the ELBO split into reconstruction and KL."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from pyro_dgm.infer._sites import (
    guess_max_plate_nesting,
    per_data_point,
    unscaled_log_prob,
)
from pyro_dgm.infer.diagnostics import bits_per_dim

__all__ = [
    "DatasetEvaluation",
    "ElboTerms",
    "LogLikelihoodEstimate",
    "dataset_elbo",
    "elbo_terms",
    "evaluate_dataset",
    "importance_log_likelihood",
]


class LogLikelihoodEstimate(NamedTuple):
    """Importance-sampling estimate of :math:`\\log p(x)` per data point, shapes ``(B,)``.

    :ivar log_likelihood: :math:`\\log \\frac{1}{S} \\sum_s w_s`, nats.
    :ivar standard_error: delta-method Monte Carlo standard error of ``log_likelihood``,
        :math:`\\hat\\sigma_w / (\\sqrt{S} \\bar w)`, nats.
    :ivar effective_sample_size: :math:`(\\sum_s w_s)^2 / \\sum_s w_s^2`, in ``[1, S]``.
    """

    log_likelihood: Tensor
    standard_error: Tensor
    effective_sample_size: Tensor

    def bits_per_dim(self, num_dims: int) -> Tensor:
        """The negative log-likelihood per data point in bits per dimension,
        :math:`-\\log p(x) / (D \\ln 2)` for data points of ``num_dims`` :math:`= D` dimensions,
        shape ``(B,)``; the standard error converts the same way (divide by :math:`D \\ln 2`)."""
        return bits_per_dim(self.log_likelihood, num_dims)


class ElboTerms(NamedTuple):
    """Per-data-point ELBO and its parts, shapes ``(B,)``, nats:
    ``elbo = reconstruction - kl``, ``reconstruction`` :math:`= \\mathbb{E}_q[\\log p(x|z)]`,
    ``kl`` :math:`= \\mathrm{KL}(q(z|x) \\| p(z))` (closed form where registered, else Monte
    Carlo)."""

    elbo: Tensor
    reconstruction: Tensor
    kl: Tensor


def _traces(model, guide, num_particles, particle_dim, args, kwargs):
    plate = pyro.plate("_evaluation_particles", num_particles, dim=particle_dim)
    guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


@torch.no_grad()
def importance_log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 500,
    chunk_size: int = 100,
    data_plate: str = "data",
    max_plate_nesting: int | None = None,
    **kwargs,
) -> LogLikelihoodEstimate:
    """Importance-sampled :math:`\\log p(x_i)` for every data point, with the guide as proposal.

    .. math::

        \\log p(x_i) \\approx \\log \\frac{1}{S} \\sum_{s=1}^S
        \\frac{p(x_i, z_s)}{q(z_s \\mid x_i)}, \\qquad z_s \\sim q(z \\mid x_i),

    the IWAE bound :math:`\\mathcal{L}_S` (Burda et al. 2016), which increases to
    :math:`\\log p(x_i)` as :math:`S` grows. Works for any Pyro model/guide pair whose sample
    sites sit inside a plate named ``data_plate`` and that broadcast over one extra plate on the
    left (particles are vectorized, ``chunk_size`` at a time, so 5000 samples fit in memory).
    Log-densities are taken unscaled: subsampling scales and ``poutine.scale`` (KL warm-up) do
    not enter the estimate.

    :param model: the model, called as ``model(*args, **kwargs)``.
    :param guide: the guide, called the same way.
    :param int num_samples: :math:`S`, importance samples per data point.
    :param int chunk_size: particles drawn per vectorized pass.
    :param str data_plate: name of the plate over data points.
    :param max_plate_nesting: plates nested in the model; guessed by one run if ``None``.
    :returns: :class:`LogLikelihoodEstimate` of shapes ``(B,)``, nats.
    :raises ValueError: if ``num_samples`` or ``chunk_size`` is not positive, or a sample site
        lies outside the data plate.
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(
            f"num_samples and chunk_size must be positive, got {num_samples}, {chunk_size}"
        )
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    log_sum = log_sum_squares = None
    remaining = num_samples
    while remaining > 0:
        count = min(chunk_size, remaining)
        remaining -= count
        model_trace, guide_trace = _traces(model, guide, count, particle_dim, args, kwargs)
        log_weight = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    term = per_data_point(site, unscaled_log_prob(site), data_plate,
                                           particle_dim)
                    log_weight = log_weight + sign * term
        chunk_sum = torch.logsumexp(log_weight, 0)
        chunk_sum_squares = torch.logsumexp(2 * log_weight, 0)
        if log_sum is None:
            log_sum, log_sum_squares = chunk_sum, chunk_sum_squares
        else:
            log_sum = torch.logaddexp(log_sum, chunk_sum)
            log_sum_squares = torch.logaddexp(log_sum_squares, chunk_sum_squares)
    log_likelihood = log_sum - math.log(num_samples)
    # ESS = (sum w)^2 / sum w^2; relative variance of the mean weight = (S / ESS - 1) / S.
    effective_sample_size = torch.exp(2 * log_sum - log_sum_squares)
    relative_variance = (num_samples / effective_sample_size - 1).clamp(min=0) / max(
        num_samples - 1, 1
    )
    return LogLikelihoodEstimate(
        log_likelihood, relative_variance.sqrt(), effective_sample_size
    )


@torch.no_grad()
def elbo_terms(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    data_plate: str = "data",
    max_plate_nesting: int | None = None,
    **kwargs,
) -> ElboTerms:
    """The ELBO per data point, split into reconstruction :math:`\\mathbb{E}_q[\\log p(x|z)]`
    (observed sites) and :math:`\\mathrm{KL}(q(z|x) \\| p(z))` (latent sites: closed form when
    registered with ``torch.distributions.kl_divergence``, otherwise Monte Carlo), averaged over
    ``num_particles`` vectorized samples. Unscaled, like :func:`importance_log_likelihood`.

    :returns: :class:`ElboTerms` of shapes ``(B,)``, nats.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be positive, got {num_particles}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    model_trace, guide_trace = _traces(model, guide, num_particles, particle_dim, args, kwargs)
    reconstruction = kl = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            reconstruction = reconstruction + per_data_point(
                site, unscaled_log_prob(site), data_plate, particle_dim
            )
            continue
        guide_site = guide_trace.nodes[name]
        try:
            site_kl = kl_divergence(guide_site["fn"], site["fn"])
        except NotImplementedError:
            site_kl = unscaled_log_prob(guide_site) - unscaled_log_prob(site)
        kl = kl + per_data_point(guide_site, site_kl, data_plate, particle_dim)
    reconstruction = torch.as_tensor(reconstruction).mean(0)
    kl = torch.as_tensor(kl).mean(0)
    return ElboTerms(reconstruction - kl, reconstruction, kl)


@torch.no_grad()
def dataset_elbo(
    model: Callable, guide: Callable, data: Tensor, *, batch_size: int = 500,
    data_plate: str = "data",
) -> float:
    """The ELBO per data point averaged over ``data`` (shape ``(N, ...)``), one sample each,
    nats: :func:`elbo_terms` over slices of ``batch_size``, summed in float64. Cheap enough for
    a validation score every epoch."""
    total = sum(elbo_terms(model, guide, batch, data_plate=data_plate).elbo.double().sum()
                for batch in data.split(batch_size))  # on the device: one read at the end
    return float(total) / data.shape[0]


@dataclass
class DatasetEvaluation:
    """Averages over a data set, in nats per data point (the S-VAE paper's table columns).

    :ivar log_likelihood: importance-sampled :math:`\\log p(x)` (``LL``).
    :ivar log_likelihood_standard_error: Monte Carlo standard error of that average.
    :ivar elbo: :math:`\\mathcal{L}[q]`; ``reconstruction`` :math:`\\mathbb{E}_q \\log p(x|z)`
        (``RE``); ``kl``: :math:`\\mathrm{KL}(q \\| p)`. ``elbo = reconstruction - kl``.
    :ivar effective_sample_size: mean ESS of the importance weights.
    :ivar num_samples: importance samples per data point.
    :ivar bits_per_dim: :math:`-\\mathrm{LL} / (D \\ln 2)` for data points of :math:`D`
        dimensions.
    """

    log_likelihood: float
    log_likelihood_standard_error: float
    elbo: float
    reconstruction: float
    kl: float
    effective_sample_size: float
    num_samples: int
    bits_per_dim: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_dataset(
    model: Callable,
    guide: Callable,
    data: Tensor,
    *,
    batch_size: int = 100,
    num_samples: int = 500,
    num_particles: int = 10,
    chunk_size: int = 100,
    data_plate: str = "data",
    progress: bool = False,
    description: str = "evaluate",
) -> DatasetEvaluation:
    """:func:`importance_log_likelihood` and :func:`elbo_terms` averaged over ``data``.

    :param data: tensor of shape ``(N, ...)``; the model and guide are called on slices
        ``data[i : i + batch_size]``.
    :param progress: show a tqdm progress bar over the batches, labelled ``description``
        (removed when done).
    :returns: :class:`DatasetEvaluation`.
    """
    totals = {"ll": 0.0, "ll_var": 0.0, "elbo": 0.0, "re": 0.0, "kl": 0.0, "ess": 0.0}
    starts = range(0, data.shape[0], batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        batch = data[start : start + batch_size]
        estimate = importance_log_likelihood(model, guide, batch, num_samples=num_samples,
                                             chunk_size=chunk_size, data_plate=data_plate)
        terms = elbo_terms(model, guide, batch, num_particles=num_particles,
                           data_plate=data_plate)
        for key, value in (("ll", estimate.log_likelihood),
                           ("ll_var", estimate.standard_error.square()),
                           ("ess", estimate.effective_sample_size), ("elbo", terms.elbo),
                           ("re", terms.reconstruction), ("kl", terms.kl)):
            totals[key] += value.double().sum()  # float64 sums over the whole data set
    count = data.shape[0]
    means = {key: float(value) / count for key, value in totals.items()}
    return DatasetEvaluation(
        log_likelihood=means["ll"],
        log_likelihood_standard_error=math.sqrt(means["ll_var"] / count),
        elbo=means["elbo"],
        reconstruction=means["re"],
        kl=means["kl"],
        effective_sample_size=means["ess"],
        num_samples=num_samples,
        bits_per_dim=bits_per_dim(means["ll"], data[0].numel()),
    )
