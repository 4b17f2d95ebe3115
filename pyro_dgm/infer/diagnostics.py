"""Diagnostics of a trained VAE's latent space: the ELBO-surgery split of the average KL into
mutual information and marginal KL, active units, and bits per dimension."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

__all__ = [
    "ActiveUnits",
    "ElboSurgery",
    "active_units",
    "bits_per_dim",
    "elbo_surgery",
    "kl_per_unit",
    "latent_diagnostics",
]


class ElboSurgery(NamedTuple):
    """The average KL of a data set split as in Hoffman & Johnson (2016), floats in nats:
    ``average_kl`` :math:`= \\mathbb{E}_n \\mathrm{KL}(q(z|x_n) \\| p(z))`, ``mutual_information``
    :math:`= I_q[x, z]`, ``marginal_kl`` :math:`= \\mathrm{KL}(q_\\mathrm{agg}(z) \\| p(z))`,
    with ``average_kl = mutual_information + marginal_kl`` in expectation.

    :ivar log_num_data: :math:`\\log N`, the upper bound of ``mutual_information``.
    :ivar num_samples: :math:`M`, the number of draws of :math:`z` behind the two Monte Carlo
        estimates (points used times samples per point).
    """

    average_kl: float
    mutual_information: float
    marginal_kl: float
    log_num_data: float
    num_samples: int


class ActiveUnits(NamedTuple):
    """Active latent units (Burda et al. 2016, section 5.2).

    :ivar count: number of units :math:`u` with ``variances[u] > threshold``.
    :ivar variances: :math:`\\mathrm{Cov}_x(\\mathbb{E}_{q(z|x)}[z_u])`, shape ``(m,)``, float64,
        on the data's device.
    :ivar threshold: the activity threshold used.
    """

    count: int
    variances: Tensor
    threshold: float


def _check_data(data: Tensor) -> None:
    if not torch.is_tensor(data) or data.dim() == 0 or data.shape[0] == 0:
        shape = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
        raise ValueError(f"data must be a non-empty tensor of shape (N, ...), got {shape}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def _encode(posterior: Callable[[Tensor], Distribution], batch: Tensor) -> Distribution:
    """``posterior(batch)``, checked to be one distribution per row of ``batch``."""
    q = posterior(batch)
    if not isinstance(q, Distribution) or q.batch_shape != batch.shape[:1]:
        got = tuple(q.batch_shape) if isinstance(q, Distribution) else type(q).__name__
        raise ValueError(
            f"posterior must return a distribution of batch shape ({batch.shape[0]},) for a "
            f"batch of {batch.shape[0]} data points, got batch shape {got}"
        )
    return q


def _encode_all(
    posterior: Callable[[Tensor], Distribution], data: Tensor, batch_size: int
) -> list[Distribution]:
    return [_encode(posterior, batch) for batch in data.split(batch_size)]


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator and the data's CUDA device's generator, restoring both after."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    index = None
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _log_aggregate(z: Tensor, components: list[Distribution], log_num_data: float) -> Tensor:
    """:math:`\\log q_\\mathrm{agg}(z) = \\log \\frac1N \\sum_n q(z|x_n)` for ``z`` of shape
    ``(M, *event)``: shape ``(M,)``, float64, one ``(M, N_b)`` block of log-densities at a
    time."""
    total = None
    for q in components:
        # Expanded rather than broadcast: a conditional flow expands its context to the value's
        # batch shape, which must then be (M, N_b). A view; Normal and vMF log-densities build
        # an (M, N_b, m) intermediate either way.
        value = z.unsqueeze(1).expand(z.shape[:1] + q.batch_shape + z.shape[1:])
        try:
            log_prob = q.log_prob(value)
        except (NotImplementedError, KeyError) as error:
            raise NotImplementedError(
                "elbo_surgery evaluates every posterior at every other posterior's samples, so "
                f"its log_prob must work at arbitrary points; {type(q).__name__}.log_prob "
                f"failed ({type(error).__name__}: {error}). A flow posterior needs transforms "
                "with an inverse (Pyro's planar flow has none)."
            ) from error
        block = torch.logsumexp(log_prob.double(), dim=1)
        total = block if total is None else torch.logaddexp(total, block)
    return total - log_num_data


@torch.no_grad()
def elbo_surgery(
    posterior: Callable[[Tensor], Distribution],
    prior: Distribution | Callable[[], Distribution],
    data: Tensor,
    *,
    num_samples: int = 1,
    num_points: int | None = None,
    batch_size: int = 256,
    seed: int | None = None,
) -> ElboSurgery:
    """The ELBO's average KL split into mutual information and marginal KL (Hoffman & Johnson
    2016). With the aggregate posterior :math:`q_\\mathrm{agg}(z) = \\frac1N \\sum_{n=1}^N
    q(z \\mid x_n)` of the data set,

    .. math::

        \\frac1N \\sum_n \\mathrm{KL}(q(z \\mid x_n) \\| p(z))
        = \\underbrace{\\frac1N \\sum_n \\mathbb{E}_{q(z \\mid x_n)}
          \\left[\\log q(z \\mid x_n) - \\log q_\\mathrm{agg}(z)\\right]}_{I_q[x, z]}
        + \\underbrace{\\mathbb{E}_{q_\\mathrm{agg}}\\left[\\log q_\\mathrm{agg}(z)
          - \\log p(z)\\right]}_{\\mathrm{KL}(q_\\mathrm{agg} \\| p)},

    with :math:`0 \\le I_q[x, z] \\le \\log N`: the KL term of the ELBO pays for the information
    the code carries about the data point (up to :math:`\\log N` nats) and for the mismatch
    between the aggregate posterior and the prior. A large marginal KL says the prior is a poor
    fit of the codes actually used, which a richer (learned) prior could remove.

    **Estimators.** ``average_kl`` is exact where :func:`torch.distributions.kl_divergence` has a
    closed form for the pair (Normal-Normal, vMF-uniform, ...), else the Monte Carlo mean of
    :math:`\\log q(z|x_n) - \\log p(z)` over ``num_samples`` draws per data point. The two other
    terms are Monte Carlo means over the same :math:`M` draws :math:`z \\sim q(z \\mid x_n)`
    (``num_samples`` for each of ``num_points`` data points), of :math:`\\log q(z|x_n) - \\log
    q_\\mathrm{agg}(z)` and :math:`\\log q_\\mathrm{agg}(z) - \\log p(z)`. The mixture
    :math:`q_\\mathrm{agg}(z)` itself is evaluated exactly, a ``logsumexp`` over all :math:`N`
    posteriors, :math:`z`'s own included (the standard plug-in estimate): so both estimates are
    unbiased, each term of the first is at most :math:`\\log N`, and their sum is the Monte
    Carlo estimate of the average KL from the same draws. The identity above therefore holds
    exactly in expectation and, for the estimates, up to Monte Carlo error (exactly when the KL
    has no closed form and every data point is used, since the same draws then serve all three).

    **Cost.** :math:`O(M N m)` time for :math:`M` draws of dimension :math:`m` against :math:`N`
    posteriors, with memory bounded by ``batch_size`` (blocks of ``batch_size`` draws against
    blocks of ``batch_size`` posteriors, plus the :math:`N` posteriors' parameters, built once).
    The encoder runs once over ``data`` (twice for the chosen subset when ``num_points < N``).
    All work is done without gradients, on the device of the posterior's parameters (normally
    ``data``'s); sums are accumulated in float64.

    ``posterior``'s ``log_prob`` must accept arbitrary points of shape ``(M, N_b, m)`` for its
    batch shape ``(N_b,)``: true of Normal and :class:`~pyro_dgm.distributions.VonMisesFisher`
    posteriors, and of flows whose transforms have an inverse (Householder; Sylvester, solved
    numerically; IAF, :math:`m` network passes); Pyro's planar flow has none. A flow posterior
    thus costs its inverse per evaluation, :math:`M N` of them.

    :param posterior: callable ``x_batch -> q(z | x_batch)``, a distribution of batch shape
        ``(B,)`` and event shape ``(m,)``, e.g. :meth:`pyro_dgm.models.VAE.posterior`.
    :param prior: :math:`p(z)`, a distribution of batch shape ``()`` and event shape ``(m,)``
        (e.g. ``Normal(0, 1).expand([m]).to_event(1)``,
        :class:`~pyro_dgm.distributions.HypersphericalUniform`, a mixture), or a callable with
        no arguments returning one (a learned prior).
    :param data: tensor of shape ``(N, ...)``; ``posterior`` is called on slices of it.
    :param int num_samples: draws of :math:`z` per data point.
    :param num_points: number of data points to draw :math:`z` for, a uniformly random subset
        without replacement (``None``: all :math:`N`). :math:`q_\\mathrm{agg}` always uses all
        :math:`N`.
    :param int batch_size: data points per call of ``posterior``, and draws per block.
    :param seed: if given, the draws use a generator seeded with it (the CPU's, and the CUDA
        device's for CUDA data), and the global random state is left as it was.
    :returns: :class:`ElboSurgery`, floats in nats.
    :raises ValueError: for empty ``data``; non-positive ``num_samples`` or ``batch_size``;
        ``num_points`` outside ``[1, N]``; a ``posterior`` whose batch shape is not ``(B,)``;
        a ``prior`` with a batch shape or an event shape other than the posterior's.
    :raises NotImplementedError: if the posterior's ``log_prob`` cannot be evaluated at other
        posteriors' draws (see above).

    Example::

        >>> vae = VAE("vmf", latent_dim=4)
        >>> split = elbo_surgery(vae.posterior, HypersphericalUniform(5), x_test, seed=0)
        >>> split.mutual_information <= split.log_num_data
        True

    Reference: M. D. Hoffman, M. J. Johnson, "ELBO surgery: yet another way to carve up the
    variational evidence lower bound", NIPS Workshop in Advances in Approximate Bayesian
    Inference (2016).
    """
    _check_data(data)
    _check_positive(num_samples=num_samples, batch_size=batch_size)
    num_data = data.shape[0]
    if num_points is not None and not 1 <= num_points <= num_data:
        raise ValueError(f"num_points must be in [1, {num_data}] (the data size), got "
                         f"{num_points}")
    if not isinstance(prior, Distribution) and callable(prior):
        prior = prior()
    if not isinstance(prior, Distribution) or prior.batch_shape != torch.Size():
        got = tuple(prior.batch_shape) if isinstance(prior, Distribution) else type(prior).__name__
        raise ValueError(f"prior must be a distribution of batch shape (), got {got}")
    log_num_data = math.log(num_data)
    components = _encode_all(posterior, data, batch_size)
    if components[0].event_shape != prior.event_shape:
        raise ValueError(
            f"prior has event shape {tuple(prior.event_shape)}, the posterior "
            f"{tuple(components[0].event_shape)}"
        )
    use_all = num_points is None or num_points == num_data
    totals = {"kl": 0.0, "mi": 0.0, "marginal": 0.0}
    with _seeded(seed, data.device):

        def draw(q: Distribution) -> tuple[Tensor, Tensor, Tensor]:
            """z ~ q of shape (num_samples, B, *event), log q(z) and log p(z) in float64."""
            z = q.sample((num_samples,))
            # log q(z) before any other evaluation: a flow reads it from its transforms' cache
            return z, q.log_prob(z).double(), prior.log_prob(z).double()

        def add_split(z: Tensor, log_q: Tensor, log_p: Tensor) -> None:
            """Add the draws' terms to the mutual-information and marginal-KL sums."""
            blocks = zip(z.flatten(0, 1).split(batch_size), log_q.flatten().split(batch_size),
                         log_p.flatten().split(batch_size), strict=True)
            for z_block, log_q_block, log_p_block in blocks:
                log_aggregate = _log_aggregate(z_block, components, log_num_data)
                totals["mi"] += (log_q_block - log_aggregate).sum()
                totals["marginal"] += (log_aggregate - log_p_block).sum()

        for q in components:
            try:
                totals["kl"] += kl_divergence(q, prior).double().sum()
                closed_form = True
            except NotImplementedError:
                closed_form = False
            if use_all:
                z, log_q, log_p = draw(q)
                if not closed_form:
                    totals["kl"] += (log_q - log_p).mean(0).sum()
                add_split(z, log_q, log_p)
            elif not closed_form:
                _, log_q, log_p = draw(q)
                totals["kl"] += (log_q - log_p).mean(0).sum()
        if not use_all:
            chosen = torch.randperm(num_data, device=data.device)[:num_points].sort().values
            for batch in data[chosen].split(batch_size):
                add_split(*draw(_encode(posterior, batch)))
    num_draws = num_samples * (num_data if use_all else num_points)
    return ElboSurgery(
        average_kl=float(totals["kl"]) / num_data,
        mutual_information=float(totals["mi"]) / num_draws,
        marginal_kl=float(totals["marginal"]) / num_draws,
        log_num_data=log_num_data,
        num_samples=num_draws,
    )


@torch.no_grad()
def active_units(
    posterior: Callable[[Tensor], Distribution],
    data: Tensor,
    *,
    threshold: float = 0.01,
    batch_size: int = 256,
    num_samples: int = 100,
    seed: int | None = None,
) -> ActiveUnits:
    """Count the latent units the encoder uses (Burda, Grosse & Salakhutdinov 2016): unit
    :math:`u` is active when

    .. math:: A_u = \\mathrm{Cov}_x\\left(\\mathbb{E}_{q(z \\mid x)}[z_u]\\right) > \\delta,

    the variance over the data set (unbiased, :math:`1/(N-1)`) of the posterior mean, with
    :math:`\\delta` = ``threshold`` (0.01 in the paper). An inactive unit's posterior mean
    hardly depends on :math:`x`: the decoder cannot read the data point from it.

    The posterior mean is the distribution's ``mean`` where it has one (Normal: ``loc``;
    :class:`~pyro_dgm.distributions.VonMisesFisher`: :math:`A_m(\\kappa) \\mu`), else the mean
    of ``num_samples`` draws (flows). Such a Monte Carlo mean adds its own variance
    :math:`\\mathrm{Var}_q(z_u) / S` to :math:`A_u` (0.01 for a unit-variance posterior and
    :math:`S = 100`: the threshold), so the mean over :math:`x` of the draws' sample variance
    divided by :math:`S` is subtracted, which makes the estimate of :math:`A_u` unbiased; for an
    inactive unit it may then be slightly negative.

    :param posterior: callable ``x_batch -> q(z | x_batch)``, a distribution of batch shape
        ``(B,)`` and event shape ``(m,)``, e.g. :meth:`pyro_dgm.models.VAE.posterior`.
    :param data: tensor of shape ``(N, ...)`` with :math:`N \\ge 2`.
    :param float threshold: :math:`\\delta \\ge 0`.
    :param int batch_size: data points per call of ``posterior``.
    :param int num_samples: :math:`S`, draws per data point for a Monte Carlo mean.
    :param seed: if given, seeds those draws as in :func:`elbo_surgery`.
    :returns: :class:`ActiveUnits`.
    :raises ValueError: for ``data`` with fewer than 2 points, a negative ``threshold``,
        non-positive ``batch_size`` or ``num_samples``, a ``posterior`` whose batch shape is
        not ``(B,)`` or whose event shape is not ``(m,)``.

    Reference: Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR
    2016, section 5.2.
    """
    _check_data(data)
    if data.shape[0] < 2:
        raise ValueError(f"data must hold at least 2 points for a variance, got {data.shape[0]}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    _check_positive(batch_size=batch_size, num_samples=num_samples)
    means, noise = [], None
    with _seeded(seed, data.device):
        for batch in data.split(batch_size):
            q = _encode(posterior, batch)
            if len(q.event_shape) != 1:
                raise ValueError(
                    f"posterior must have event shape (m,), got {tuple(q.event_shape)}"
                )
            try:
                mean = q.mean
            except (NotImplementedError, AttributeError):
                z = q.sample((num_samples,)).double()
                mean = z.mean(0)
                if num_samples > 1:
                    # E[Var of a Monte Carlo mean] = E[sample variance] / S, summed over x
                    batch_noise = z.var(0).sum(0) / num_samples
                    noise = batch_noise if noise is None else noise + batch_noise
            means.append(mean.double())
    variances = torch.cat(means).var(0)
    if noise is not None:
        variances = variances - noise / data.shape[0]
    threshold = float(threshold)
    return ActiveUnits(int((variances > threshold).sum()), variances, threshold)


def bits_per_dim(log_likelihood_nats: float | Tensor, num_dims: int) -> float | Tensor:
    """Negative log-likelihood in bits per dimension, the usual unit for image models:

    .. math:: \\mathrm{bpd} = -\\frac{\\log p(x)}{D \\ln 2},

    for a log-likelihood :math:`\\log p(x)` in nats of a data point with :math:`D` dimensions
    (784 for MNIST; :math:`32 \\cdot 32 \\cdot 3` for CIFAR-10). For discrete data a
    model's bpd is the average code length, in bits per dimension, that it achieves.

    :param log_likelihood_nats: :math:`\\log p(x)` in nats, a float or a tensor of any shape
        (e.g. :attr:`~pyro_dgm.infer.LogLikelihoodEstimate.log_likelihood`).
    :param int num_dims: :math:`D \\ge 1`.
    :returns: a float for a float, else a tensor of the same shape.
    :raises ValueError: if ``num_dims`` is not positive.
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return -log_likelihood_nats / (num_dims * math.log(2))


def latent_diagnostics(
    posterior: Callable[[Tensor], Distribution],
    prior: Distribution | None,
    data: Tensor,
    *,
    num_points: int | None = 1000,
    threshold: float = 0.01,
    seed: int | None = 0,
) -> dict[str, float]:
    """How a latent code is used on ``data`` (shape ``(N, ...)``), as floats:

    * ``active_units``: units whose posterior mean varies over the data by more than
      ``threshold`` (:func:`active_units`; for vMF codes, coordinates of
      :math:`\\mathbb{E}_q[z] = A(\\kappa)\\mu \\in \\mathbb{R}^{d+1}`);
    * with a ``prior``: ``average_kl``, ``mutual_information``, ``marginal_kl``,
      ``log_num_data``, the ELBO surgery of Hoffman & Johnson (2016) (:func:`elbo_surgery`)
      with ``num_points`` draws of :math:`z` against all :math:`N` posteriors (nats).

    :param posterior: callable ``x_batch -> q(z | x_batch)``, batch shape ``(B,)``, event
        shape ``(m,)`` (a model's ``posterior``, or a level of its ``latent_levels``).
    :param prior: :math:`p(z)`, batch shape ``()``, event shape ``(m,)``; ``None`` skips the
        surgery.
    :raises ValueError: as :func:`active_units` and :func:`elbo_surgery` raise.
    """
    units = active_units(posterior, data, threshold=threshold, seed=seed)
    result: dict[str, float] = {"active_units": units.count}
    if prior is not None:
        surgery = elbo_surgery(posterior, prior, data, seed=seed,
                               num_points=None if num_points is None else min(num_points,
                                                                               len(data)))
        result.update(average_kl=surgery.average_kl,
                      mutual_information=surgery.mutual_information,
                      marginal_kl=surgery.marginal_kl, log_num_data=surgery.log_num_data)
    return result


@torch.no_grad()
def kl_per_unit(
    model: Callable, guide: Callable, data: Tensor, *, batch_size: int = 500, seed: int | None = 0
) -> dict[str, Tensor]:
    """The KL of each latent site of a model/guide pair, per unit where it splits into units,
    averaged over ``data`` (nats per data point): for a site whose posterior and prior are
    both ``Independent`` over one dimension with a registered KL between their base
    distributions (diagonal Gaussians), :math:`\\mathrm{KL}(q(z_u \\mid x) \\| p(z_u))` for
    each unit :math:`u` (conditional on the guide's draws of the sites before it, as in the
    ELBO); else the site's closed-form KL, else :math:`\\log q(z) - \\log p(z)` at one draw,
    as a single entry. A collapsed unit's KL is near 0.

    ``model(batch)`` and ``guide(batch)`` are called on slices of ``data`` of at most
    ``batch_size`` rows; every latent site must have the batch as its leftmost batch
    dimension.

    :returns: ``{site name: tensor of shape (units,) or (1,)}``, float64, on the data's
        device.
    :raises ValueError: for empty ``data`` or a non-positive ``batch_size``.
    """
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample

    _check_data(data)
    _check_positive(batch_size=batch_size)
    totals: dict[str, Tensor] = {}
    with _seeded(seed, data.device):
        for start in range(0, len(data), batch_size):
            batch = data[start:start + batch_size]
            guide_trace = poutine.trace(guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
            for name, site in model_trace.nodes.items():
                if (site["type"] != "sample" or site["is_observed"] or site_is_subsample(site)
                        or name not in guide_trace):
                    continue
                q, p, z = guide_trace.nodes[name]["fn"], site["fn"], site["value"]
                kl = _unit_kl(q, p, z).double()
                kl = kl.reshape(len(batch), -1).sum(0)
                totals[name] = kl if name not in totals else totals[name] + kl
    return {name: total / len(data) for name, total in totals.items()}


def _unit_kl(q: Distribution, p: Distribution, z: Tensor) -> Tensor:
    """Per-unit KL ``(B, m)`` where it splits, else ``(B,)``: see :func:`kl_per_unit`."""
    from pyro.distributions import MaskedDistribution
    from pyro.distributions.torch_distribution import ExpandedDistribution
    from torch.distributions import Independent

    def base(fn: Distribution) -> Distribution | None:
        while isinstance(fn, (ExpandedDistribution, MaskedDistribution)):
            fn = fn.base_dist
        if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1:
            return fn.base_dist
        return None

    q_base, p_base = base(q), base(p)
    if q_base is not None and p_base is not None:
        try:
            return kl_divergence(q_base, p_base).expand(z.shape)
        except NotImplementedError:
            pass
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return q.log_prob(z) - p.log_prob(z)
