"""Per-data-point evaluation of Pyro model/guide pairs: importance-sampled log-likelihood and
the ELBO split into reconstruction and KL."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import kl_divergence
from torch.utils._python_dispatch import TorchDispatchMode
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


#: The default memory budget of one evaluation chunk on the CPU, bytes: chunks whose working
#: set stays in the last-level cache run faster than larger ones (and large tensors pay page
#: faults on every fresh allocation); ``benchmarks/bench_evaluation.py`` measures this.
_CPU_MEMORY_BUDGET = 48 * 2**20
#: The largest default budget on CUDA, bytes (at most half the free memory is used).
_CUDA_MEMORY_BUDGET = 2**30
#: Bytes budgeted per (data point x particle) pair, in units of the growth of the bytes that
#: operations allocate per pair: the margin covers temporaries inside fused kernels, which the
#: probe does not see (``binary_cross_entropy_with_logits`` allocates three of its output's
#: size).
_BUDGET_PER_ALLOCATED_BYTE = 2
#: Particles of the probe chunks: an unmeasured first one (one-time work such as cached
#: tables), then the two whose allocations give the growth per particle.
_PROBE_PARTICLES = (1, 1, 4)
#: Data points of the probe chunks of :func:`evaluate_dataset`.
_PROBE_DATA_POINTS = 64


def _default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(_CUDA_MEMORY_BUDGET, free // 2)
    return _CPU_MEMORY_BUDGET


class _AllocatedBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that operations allocate while active. Outputs that
    share storage with an input (views such as ``expand`` or ``t``, in-place results) allocate
    nothing and are not counted; neither are temporaries inside a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [value for value in _tensors(out) if value.untyped_storage().nbytes()]
        if outputs:
            inputs = {value.untyped_storage().data_ptr() for value in _tensors((args, kwargs))}
            self.total += sum(value.untyped_storage().nbytes() for value in outputs
                              if value.untyped_storage().data_ptr() not in inputs)
        return out


def _tensors(tree) -> list[Tensor]:
    """The tensors in nested tuples, lists and dict values."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = tree.values()
    elif not isinstance(tree, (tuple, list)):
        return []
    return [tensor for item in tree for tensor in _tensors(item)]


def _log_weights(model, guide, num_particles, particle_dim, data_plate, args, kwargs):
    """:math:`\\log p(x, z_s) - \\log q(z_s \\mid x)` of ``num_particles`` draws per data point,
    shape ``(num_particles, B)``, in the model's dtype."""
    model_trace, guide_trace = _traces(model, guide, num_particles, particle_dim, args, kwargs)
    log_weight = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                term = per_data_point(site, unscaled_log_prob(site), data_plate, particle_dim)
                log_weight = log_weight + sign * term
    return log_weight


def _probe(model, guide, particle_dim, data_plate, args, kwargs) -> tuple[list[Tensor], int]:
    """Chunks of ``_PROBE_PARTICLES`` particles on the ``B`` data points of ``args``: their log
    weights (shapes ``(particles, B)``) and the bytes to budget per (data point x particle)
    pair, ``_BUDGET_PER_ALLOCATED_BYTE`` times the growth of the allocated bytes per pair
    between the last two chunks. Work that does not grow with the particles (the encoder, a
    VampPrior's pseudo-inputs, cached tables) cancels in the growth."""
    chunks, allocated = [], []
    for count in _PROBE_PARTICLES:
        with _AllocatedBytes() as counter:
            chunks.append(_log_weights(model, guide, count, particle_dim, data_plate, args,
                                       kwargs))
        allocated.append(counter.total)
    (small, large), num_points = _PROBE_PARTICLES[-2:], chunks[-1].shape[-1]
    growth = (allocated[-1] - allocated[-2]) / ((large - small) * num_points)
    if growth <= 0:  # nothing grew (or a random loop ran shorter): all of the chunk per pair
        growth = allocated[-1] / (large * num_points)
    return chunks, max(1, math.ceil(_BUDGET_PER_ALLOCATED_BYTE * growth))


def _positive(name: str, value: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _plan_chunks(bytes_per_pair: int, memory_budget: int, num_data: int, num_samples: int,
                 batch_size: int | None = None, chunk_size: int | None = None
                 ) -> tuple[int, int]:
    """Data points and particles per chunk, ``(batch_size, chunk_size)``, for those not given.
    The particles: as many as fit in ``memory_budget`` with ``batch_size`` data points (or
    with ``min(num_data, 16)``: a batch big enough that the calls per batch, such as
    :func:`elbo_terms`, cost little), at most ``num_samples``, then evened out over the chunks
    a data point needs (5000 in chunks of 2400 become chunks of 1667). The data points: as
    many as fit with those particles, at most ``num_data``. At least one of each, even if one
    pair exceeds the budget."""
    pairs = max(1, memory_budget // bytes_per_pair)
    if chunk_size is None:
        chunk_size = min(num_samples, max(1, pairs // (batch_size or min(num_data, 16))))
        chunk_size = -(-num_samples // -(-num_samples // chunk_size))
    if batch_size is None:
        batch_size = min(num_data, max(1, pairs // chunk_size))
    return batch_size, chunk_size


class _LogWeightSums:
    """:math:`\\log \\sum_s w_s` and :math:`\\log \\sum_s w_s^2` per data point, accumulated
    over chunks of particles in float64 (a chunk's logsumexp, then ``logaddexp``: stable for
    any spread of the log weights, and exact for weights of zero, ``-inf``)."""

    def __init__(self) -> None:
        self.count = 0
        self.dtype: torch.dtype | None = None
        self.log_sum: Tensor | None = None
        self.log_sum_squares: Tensor | None = None

    def add(self, log_weight: Tensor) -> None:
        """Add a chunk of log weights of shape ``(particles, B)``."""
        self.dtype = log_weight.dtype
        log_weight = log_weight.double()
        chunk_sum = torch.logsumexp(log_weight, 0)
        chunk_sum_squares = torch.logsumexp(2 * log_weight, 0)
        self.count += log_weight.shape[0]
        if self.log_sum is None:
            self.log_sum, self.log_sum_squares = chunk_sum, chunk_sum_squares
        else:
            self.log_sum = torch.logaddexp(self.log_sum, chunk_sum)
            self.log_sum_squares = torch.logaddexp(self.log_sum_squares, chunk_sum_squares)

    def estimate(self) -> LogLikelihoodEstimate:
        """The estimate from the ``count`` weights added, float64."""
        num_samples = self.count
        log_likelihood = self.log_sum - math.log(num_samples)
        # ESS = (sum w)^2 / sum w^2; relative variance of the mean weight = (S / ESS - 1) / S.
        effective_sample_size = torch.exp(2 * self.log_sum - self.log_sum_squares)
        relative_variance = (num_samples / effective_sample_size - 1).clamp(min=0) / max(
            num_samples - 1, 1
        )
        return LogLikelihoodEstimate(
            log_likelihood, relative_variance.sqrt(), effective_sample_size
        )


def _importance_sums(model, guide, args, kwargs, *, num_samples, chunk_size, particle_dim,
                     data_plate, chunks: Sequence[Tensor] = ()) -> _LogWeightSums:
    """The weight sums of ``num_samples`` particles per data point: the log weights of
    ``chunks`` already evaluated, then new chunks of ``chunk_size`` particles. No host
    synchronisation."""
    sums = _LogWeightSums()
    for chunk in chunks:
        sums.add(chunk)
    while sums.count < num_samples:
        count = min(chunk_size, num_samples - sums.count)
        sums.add(_log_weights(model, guide, count, particle_dim, data_plate, args, kwargs))
    return sums


@torch.no_grad()
def importance_log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 500,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
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
    left. Particles are vectorized, ``chunk_size`` at a time, and the chunks combined by a
    logsumexp accumulated in float64, so 5000 samples fit in memory; the whole computation
    stays on the data's device (no host synchronisation). Log-densities are taken unscaled:
    subsampling scales and ``poutine.scale`` (KL warm-up) do not enter the estimate.

    Automatic chunks (``chunk_size=None``, :math:`S > 6`): probe chunks of 1, 1 and 4
    particles (their weights count towards the :math:`S`) are evaluated while the bytes that
    operations allocate are counted; the memory of a (data point x particle) pair is taken as
    twice the growth of those bytes per pair from the second chunk to the third (an upper
    bound on the memory it holds at once: not every allocation is alive at the same time; the
    factor 2 covers temporaries inside fused kernels, which are not counted). Work that does
    not grow with the particles (the encoder, a VampPrior's pseudo-inputs) cancels. Each
    further chunk holds as many particles as fit in ``memory_budget`` with the :math:`B` data
    points (at least one; evened out over the chunks needed). The data points are not split:
    pass smaller batches, or use :func:`evaluate_dataset`, which chooses them too.

    :param model: the model, called as ``model(*args, **kwargs)``.
    :param guide: the guide, called the same way.
    :param int num_samples: :math:`S`, importance samples per data point.
    :param chunk_size: particles drawn per vectorized pass; ``None``: from ``memory_budget``.
    :type chunk_size: int or None
    :param memory_budget: bytes one chunk may use, for ``chunk_size=None``; ``None``: 48 MiB
        on the CPU, on CUDA half the free memory up to 1 GiB.
    :type memory_budget: int or None
    :param str data_plate: name of the plate over data points.
    :param max_plate_nesting: plates nested in the model; guessed by one run if ``None``.
    :returns: :class:`LogLikelihoodEstimate` of shapes ``(B,)``, nats, in the dtype of the
        model's log-densities.
    :raises ValueError: if ``num_samples``, ``chunk_size`` or ``memory_budget`` is not a
        positive int, or a sample site lies outside the data plate.
    """
    _positive("num_samples", num_samples)
    _positive("chunk_size", chunk_size, optional=True)
    _positive("memory_budget", memory_budget, optional=True)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    particle_dim = -max_plate_nesting - 1
    chunks: list[Tensor] = []
    if chunk_size is None and num_samples <= sum(_PROBE_PARTICLES):
        chunk_size = num_samples  # fewer than the probe would draw: one chunk
    elif chunk_size is None:
        chunks, bytes_per_pair = _probe(model, guide, particle_dim, data_plate, args, kwargs)
        budget = memory_budget or _default_memory_budget(chunks[0].device)
        _, chunk_size = _plan_chunks(bytes_per_pair, budget, chunks[0].shape[-1], num_samples,
                                     batch_size=chunks[0].shape[-1])
    sums = _importance_sums(model, guide, args, kwargs, num_samples=num_samples,
                            chunk_size=chunk_size, particle_dim=particle_dim,
                            data_plate=data_plate, chunks=chunks)
    return LogLikelihoodEstimate(*(value.to(sums.dtype) for value in sums.estimate()))


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


@torch.no_grad()
def evaluate_dataset(
    model: Callable,
    guide: Callable,
    data: Tensor,
    *,
    batch_size: int | None = None,
    num_samples: int = 500,
    num_particles: int = 10,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    data_plate: str = "data",
    progress: bool = False,
    description: str = "evaluate",
) -> DatasetEvaluation:
    """:func:`importance_log_likelihood` and :func:`elbo_terms` averaged over ``data``.

    The data set is evaluated in chunks of ``batch_size`` data points times ``chunk_size``
    particles; those not given are chosen to fit ``memory_budget``. Probe chunks of 1, 1 and
    4 particles on the first 64 data points (not held to the budget) estimate the bytes per
    (data point x particle) pair as :func:`importance_log_likelihood` does; a chunk then
    holds as many particles as fit with ``batch_size`` data points, or with
    ``min(N, 16)`` if ``batch_size`` is ``None`` (at most ``num_samples``, evened out over the
    chunks each data point needs: 5000 in chunks of at most 2400 become 3 chunks of 1667),
    and as many data points as fit with those particles (at most ``N``). There is no loop
    over single data points unless one pair per chunk is all the budget allows. Sums over
    the data set are kept in float64 on the data's device and read once, at the end.

    :param data: tensor of shape ``(N, ...)``, ``N >= 1``; the model and guide are called on
        slices ``data[i : i + batch_size]``.
    :param batch_size: data points per call; ``None``: from ``memory_budget``.
    :type batch_size: int or None
    :param int num_samples: importance samples per data point.
    :param int num_particles: samples per data point for the ELBO terms.
    :param chunk_size: importance samples drawn per vectorized pass; ``None``: from
        ``memory_budget``.
    :type chunk_size: int or None
    :param memory_budget: bytes one chunk may use; ``None``: 48 MiB on the CPU, on CUDA half
        the free memory up to 1 GiB.
    :type memory_budget: int or None
    :param progress: show a tqdm progress bar over the batches, labelled ``description``
        (removed when done).
    :returns: :class:`DatasetEvaluation`.
    :raises ValueError: if ``data`` is empty, or ``batch_size``, ``num_samples``,
        ``num_particles``, ``chunk_size`` or ``memory_budget`` is not a positive int.
    """
    _positive("num_samples", num_samples)
    _positive("num_particles", num_particles)
    _positive("batch_size", batch_size, optional=True)
    _positive("chunk_size", chunk_size, optional=True)
    _positive("memory_budget", memory_budget, optional=True)
    if data.dim() == 0 or data.shape[0] == 0:
        raise ValueError(f"data must hold at least one data point, got shape "
                         f"{tuple(data.shape)}")
    max_plate_nesting = guess_max_plate_nesting(model, guide, (data[:1],), {})
    particle_dim = -max_plate_nesting - 1
    if batch_size is None or chunk_size is None:
        _, bytes_per_pair = _probe(model, guide, particle_dim, data_plate,
                                   (data[:_PROBE_DATA_POINTS],), {})
        budget = memory_budget or _default_memory_budget(data.device)
        batch_size, chunk_size = _plan_chunks(bytes_per_pair, budget, data.shape[0],
                                              num_samples, batch_size, chunk_size)
    totals = {"ll": 0.0, "ll_var": 0.0, "elbo": 0.0, "re": 0.0, "kl": 0.0, "ess": 0.0}
    starts = range(0, data.shape[0], batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        batch = data[start : start + batch_size]
        estimate = _importance_sums(model, guide, (batch,), {}, num_samples=num_samples,
                                    chunk_size=chunk_size, particle_dim=particle_dim,
                                    data_plate=data_plate).estimate()
        terms = elbo_terms(model, guide, batch, num_particles=num_particles,
                           data_plate=data_plate, max_plate_nesting=max_plate_nesting)
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
