"""The von Mises-Fisher distribution on the unit hypersphere, with an exact rejection sampler."""

from __future__ import annotations

from fractions import Fraction
from functools import cache
from math import comb, factorial

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.score_parts import ScoreParts
from torch import Tensor
from torch._C._functorch import TransformType, get_interpreter_stack
from torch.distributions.utils import lazy_property

from pyro_dgm._fused import cache_forward_signature, needs_reference, reference_vjp
from pyro_dgm.distributions.hyperspherical_uniform import log_sphere_surface_area
from pyro_dgm.distributions.scoring import ScoredIndependent, ScoredMasked, warn_if_score_dropped
from pyro_dgm.special import (
    _bessel_parts,
    _bessel_parts_values,
    _sum_to_shape,
    bessel_iv_ratio,
    log_bessel_iv_normalized,
    log_bessel_iv_normalized_and_ratio,
    log_bessel_iv_normalized_and_ratio_values,
)

__all__ = ["VonMisesFisher"]

_GRADIENTS = ("rsvi", "pathwise")


class VonMisesFisher(TorchDistribution):
    """von Mises-Fisher distribution on the unit sphere :math:`S^{m-1} \\subset \\mathbb{R}^m`.

    .. math::

        q(z \\mid \\mu, \\kappa) = C_m(\\kappa) \\exp(\\kappa \\mu^\\top z), \\qquad
        C_m(\\kappa) = \\frac{\\kappa^{m/2-1}}{(2\\pi)^{m/2} I_{m/2-1}(\\kappa)}.

    **Sampling** is exact. The component :math:`w = \\mu^\\top z` is drawn by Wood's (1994)
    rejection sampler with proposal :math:`\\varepsilon \\sim \\mathrm{Beta}((m-1)/2, (m-1)/2)`
    (from two gamma variates in small rounds, from one gamma and one normal variate through
    Student's t in large ones),
    :math:`w = h(\\varepsilon, \\kappa) = (1 - (1+b)\\varepsilon) / (1 - (1-b)\\varepsilon)`
    and the envelope parameter written without cancellation,
    :math:`b = (m-1) / (2\\kappa + \\sqrt{4\\kappa^2 + (m-1)^2})`; the acceptance test and
    :math:`1 - w^2` are rewritten in :math:`\\varepsilon` so that nothing of size
    :math:`\\kappa` is subtracted. For :math:`m = 3`, :math:`w` is drawn by exact inversion of its
    CDF. Rejection runs batched, with several proposals per element per round and only the
    still-rejected elements carried to the next round (one host synchronisation per round; a
    batch of 64 takes one round with probability above 0.99). The
    tangent direction is a normalized Gaussian; the Householder reflection that maps
    :math:`e_1` to :math:`\\mu` uses :math:`u = e_1 \\pm \\mu` with the sign of :math:`\\mu_1`, so
    :math:`\\|u\\|^2 \\ge 2` and no epsilon is needed: samples lie on the sphere to rounding.

    **Gradients** (``gradient="rsvi"``, the default) are the rejection-sampling
    reparameterization of Naesseth et al. (2017): ``rsample`` is differentiable through the
    accepted proposal (:math:`g_\\mathrm{rep}`), and :meth:`score_parts` returns as score function
    the log-density of the accepted :math:`\\varepsilon`,
    :math:`\\log q(h(\\varepsilon,\\kappa)) + \\log|\\partial h / \\partial \\varepsilon|`,
    which Pyro's
    ELBOs (``Trace_ELBO``, ``TraceGraph_ELBO``, and
    :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO`) turn into the correction term
    :math:`g_\\mathrm{cor}`; together they are unbiased. ``gradient="pathwise"`` drops
    :math:`g_\\mathrm{cor}`, as the S-VAE reference code does: **biased** (at :math:`m=5,
    \\kappa=2` it estimates :math:`d\\,E[\\mu^\\top z]/d\\kappa` as about 0.128 instead of 0.147),
    offered only for comparison. For :math:`m = 3` both are the same, fully reparameterized.

    **Numerics**: the log-normalizer is :math:`\\log C_m(\\kappa) = -\\log|S^{m-1}| -
    \\log {}_0F_1(; m/2; \\kappa^2/4)` (:func:`~pyro_dgm.special.log_bessel_iv_normalized`), finite
    and smooth down to :math:`\\kappa = 0`, where the distribution is the uniform one.
    Bessel functions are evaluated once per instance on the parameters' device, with float64
    results (for float32 parameters from :mod:`pyro_dgm.special`'s octave tables, accurate to
    about :math:`10^{-11}`), and shared by ``log_prob``, ``entropy``, the score function and the
    KL divergences.

    :param torch.Tensor loc: mean direction :math:`\\mu`, shape ``(..., m)`` with :math:`m \\ge 2`,
        unit norm.
    :param concentration: :math:`\\kappa \\ge 0`, a tensor of shape ``(...)`` (broadcast with
        ``loc.shape[:-1]``) or a float.
    :param str gradient: ``"rsvi"`` (unbiased, default) or ``"pathwise"`` (biased, see above).
    :param validate_args: check that ``loc`` is unit-norm, ``concentration`` non-negative and
        not NaN, and that ``log_prob``'s argument lies on the sphere.
    :raises ValueError: if ``loc`` has fewer than one dimension or ``m < 2``; if the shapes of
        ``loc`` and ``concentration`` do not broadcast; for an unknown ``gradient``; and, when
        validating, for ``loc`` off the unit sphere or a negative or NaN ``concentration``.

    Batch shape: ``broadcast(loc.shape[:-1], concentration.shape)``; event shape ``(m,)``.

    Example::

        >>> loc = torch.tensor([0.0, 0.0, 1.0])
        >>> q = VonMisesFisher(loc, torch.tensor(10.0))
        >>> q.rsample((5,)).shape
        torch.Size([5, 3])

    References:

    1. A. T. A. Wood, "Simulation of the von Mises Fisher distribution", Communications in
       Statistics - Simulation and Computation 23 (1994).
    2. C. A. Naesseth, F. J. R. Ruiz, S. W. Linderman, D. M. Blei, "Reparameterization Gradients
       through Acceptance-Rejection Sampling Algorithms", AISTATS 2017.
    3. T. R. Davidson, L. Falorsi, N. De Cao, T. Kipf, J. M. Tomczak, "Hyperspherical Variational
       Auto-Encoders", UAI 2018.
    """

    arg_constraints = {"loc": constraints.sphere, "concentration": constraints.nonnegative}
    support = constraints.sphere
    has_rsample = True

    def __init__(
        self,
        loc: Tensor,
        concentration: Tensor | float,
        gradient: str = "rsvi",
        validate_args: bool | None = None,
    ) -> None:
        if not torch.is_tensor(loc) or loc.dim() < 1 or loc.shape[-1] < 2:
            shape = tuple(loc.shape) if torch.is_tensor(loc) else type(loc).__name__
            raise ValueError(f"loc must be a tensor of shape (..., m) with m >= 2, got {shape}")
        if gradient not in _GRADIENTS:
            raise ValueError(f"gradient must be one of {_GRADIENTS}, got {gradient!r}")
        concentration = torch.as_tensor(concentration, dtype=loc.dtype, device=loc.device)
        try:
            batch_shape = loc.shape[:-1]
            if concentration.shape != batch_shape:
                batch_shape = torch.broadcast_shapes(batch_shape, concentration.shape)
        except RuntimeError:
            raise ValueError(
                f"loc of shape {tuple(loc.shape)} (batch shape {tuple(loc.shape[:-1])}) and "
                f"concentration of shape {tuple(concentration.shape)} do not broadcast"
            ) from None
        event_shape = loc.shape[-1:]
        # expand only where needed: an expand to the same shape is a graph node all the same
        if loc.shape[:-1] != batch_shape:
            loc = loc.expand(batch_shape + event_shape)
        if concentration.shape != batch_shape:
            concentration = concentration.expand(batch_shape)
        self.loc, self.concentration = loc, concentration
        self.gradient = gradient
        self._sample_cache: tuple[Tensor, Tensor] | None = None
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @staticmethod
    def infer_shapes(loc, concentration=()) -> tuple[torch.Size, torch.Size]:
        """``(batch_shape, event_shape)`` of a distribution built from parameters of these
        shapes (Pyro's convention: shapes, not tensors; a float ``concentration`` has shape
        ``()``): ``broadcast(loc[:-1], concentration)`` and ``loc[-1:]``.

        :raises ValueError: as the constructor, if ``loc`` has no last dimension :math:`m \\ge 2`
            or the shapes do not broadcast.
        """
        loc, concentration = torch.Size(loc), torch.Size(concentration)
        if len(loc) < 1 or loc[-1] < 2:
            raise ValueError(f"loc must have shape (..., m) with m >= 2, got {tuple(loc)}")
        try:
            batch_shape = torch.broadcast_shapes(loc[:-1], concentration)
        except RuntimeError:
            raise ValueError(
                f"loc of shape {tuple(loc)} and concentration of shape {tuple(concentration)} "
                "do not broadcast"
            ) from None
        return batch_shape, loc[-1:]

    def expand(self, batch_shape, _instance=None) -> VonMisesFisher:
        """As :meth:`torch.Tensor.expand` of the batch shape (only dimensions of size 1 grow,
        new ones are added on the left); the parameters are expanded, not copied.

        :raises RuntimeError: otherwise, as torch's distributions raise it.
        """
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape and _instance is None:
            return self  # immutable (Pyro's plates expand every site to its own shape)
        new = self._get_checked_instance(VonMisesFisher, _instance)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape)
        new.gradient = self.gradient
        new._sample_cache = None
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> TorchDistribution:
        """As Pyro's ``to_event``, but the :class:`~pyro.distributions.Independent` it returns
        keeps the score function (Pyro's inherits the default ``score_parts``, which would drop
        the rejection-sampling correction term and bias the gradients)."""
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims < 0:
            raise ValueError(f"cannot remove event dimensions from {type(self).__name__}")
        if reinterpreted_batch_ndims == 0:
            return self
        return ScoredIndependent(self, reinterpreted_batch_ndims)

    def mask(self, mask: Tensor | bool) -> TorchDistribution:
        """As Pyro's ``mask``, but the :class:`~pyro.distributions.MaskedDistribution` it
        returns keeps the score function also for a boolean mask (Pyro's would drop it)."""
        return ScoredMasked(self, mask)

    @property
    def _dim(self) -> int:
        return self.event_shape[0]

    @property
    def _order(self) -> float:
        """The Bessel order m/2 - 1 of the normalizer."""
        return 0.5 * self._dim - 1

    @lazy_property
    def _bessel_values(self) -> tuple[Tensor, Tensor]:
        """(log 0F1(; m/2; kappa^2/4), A_m(kappa)) in float64, evaluated once per instance, with
        no graph: the sampler's score and the KL to the uniform write their derivatives
        themselves."""
        return log_bessel_iv_normalized_and_ratio_values(self._order, self.concentration)

    @lazy_property
    def _bessel_terms(self) -> tuple[Tensor, Tensor]:
        """:attr:`_bessel_values`, differentiable in kappa to any order (no second evaluation;
        under ``torch.func`` transforms, the reference of :mod:`pyro_dgm.special`)."""
        kappa = self.concentration.double()
        if needs_reference(kappa):
            return log_bessel_iv_normalized_and_ratio(self._order, kappa)
        return log_bessel_iv_normalized_and_ratio(self._order, kappa, values=self._bessel_values)

    def _scaled_bessel(self, kinds: tuple[str, ...]) -> tuple[Tensor, ...]:
        """The ``kinds`` among ``"scaled"`` :math:`\\log {}_0F_1(; m/2; \\kappa^2/4) - \\kappa`,
        ``"complement"`` :math:`1 - A_m(\\kappa)` and ``"intercept"``
        :math:`\\log {}_0F_1 - \\kappa A_m(\\kappa)` (:func:`pyro_dgm.special._bessel_parts`),
        differentiable in kappa to any order. For float64 parameters they are
        evaluated free of the cancellations of those formulas (to about 1e-14 relative up to
        kappa = 1e6); for lower precisions they follow in float64 from :attr:`_bessel_values`
        (the octave tables, shared with the sampler), far below the parameters' rounding, and
        are returned in the parameters' dtype."""
        kappa = self.concentration
        if needs_reference(kappa):
            return _bessel_parts(self._order, kappa.double(), kinds)
        if kappa.dtype == torch.float64:
            return _bessel_parts(self._order, kappa, kinds, self._scaled_bessel_values)
        normalized, ratio = self._bessel_values
        kappa64 = kappa.detach().double()
        values = {"ratio": ratio, "complement": 1 - ratio}  # and the derivative of "scaled"
        if "scaled" in kinds:
            values["scaled"] = normalized - kappa64
        if "intercept" in kinds:
            values["intercept"] = normalized - kappa64 * ratio
        # in kappa's dtype: a derivative factor not among the values (A') is then evaluated
        # to that precision
        return _bessel_parts(self._order, kappa, kinds, values)

    @lazy_property
    def _scaled_bessel_values(self) -> dict[str, Tensor]:
        """For float64 parameters: the values of :meth:`_scaled_bessel`'s kinds and of their
        derivative A' (float64, no graph), from one evaluation per instance (intercept
        = scaled + kappa complement takes the others anyway)."""
        return _bessel_parts_values(
            self._order, self.concentration, ("scaled", "complement", "intercept", "slope")
        )

    @lazy_property
    def _scaled_log_normalizer_negated(self) -> Tensor:
        """:math:`-\\log C_m(\\kappa) - \\kappa = \\log|S^{m-1}| + \\log {}_0F_1(; m/2;
        \\kappa^2/4) - \\kappa` in the parameters' dtype, differentiable, once per instance."""
        (scaled,) = self._scaled_bessel(("scaled",))
        return (scaled + log_sphere_surface_area(self._dim)).to(self.loc.dtype)

    @lazy_property
    def _log_normalizer_negated(self) -> Tensor:
        """:math:`-\\log C_m(\\kappa) = \\log|S^{m-1}| + \\log {}_0F_1(; m/2; \\kappa^2/4)` in
        the parameters' dtype, differentiable, once per instance."""
        log_area = log_sphere_surface_area(self._dim)
        return (self._bessel_terms[0] + log_area).to(self.loc.dtype)

    @property
    def mean(self) -> Tensor:
        """:math:`A_m(\\kappa) \\mu`, with :math:`A_m = I_{m/2} / I_{m/2-1}`."""
        return self._bessel_terms[1].to(self.loc.dtype).unsqueeze(-1) * self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        """Per-coordinate variance, the diagonal of :attr:`covariance_matrix`,
        :math:`\\operatorname{Var} z_i = \\frac{A_m}{\\kappa} (1 - \\mu_i^2) + A_m'(\\kappa)
        \\mu_i^2`, with :math:`1 - \\mu_i^2` summed as :math:`\\sum_{j \\ne i} \\mu_j^2`;
        shape ``batch_shape + (m,)``, in the parameters' dtype, differentiable in both."""
        perpendicular, axial = _second_moments(self.concentration, self._dim)
        square = self.loc.to(torch.float64).square()
        variance = (
            perpendicular.unsqueeze(-1) * _sum_of_others(square) + axial.unsqueeze(-1) * square
        )
        return variance.to(self.loc.dtype)

    @property
    def covariance_matrix(self) -> Tensor:
        """The covariance of :math:`z`, shape ``batch_shape + (m, m)``, in the parameters'
        dtype (float64 inside), differentiable in both:

        .. math::

            \\operatorname{Cov} z = \\frac{A_m}{\\kappa} (I - \\mu\\mu^\\top)
            + A_m'(\\kappa)\\, \\mu\\mu^\\top, \\qquad
            E[z z^\\top] = \\frac{A_m}{\\kappa} I + A_m A_{m+2}\\, \\mu\\mu^\\top,

        :math:`A_m = I_{m/2} / I_{m/2-1}`, :math:`A_m' = 1 - A_m^2 - (m - 1) A_m / \\kappa`.
        Derivation: :math:`z = w \\mu + \\sqrt{1 - w^2}\\, v`, with :math:`v` uniform on the
        unit sphere of :math:`\\mu^\\perp` and independent of :math:`w = \\mu^\\top z`;
        :math:`E w = A_m` and :math:`\\operatorname{Var} w = A_m'`, the first two derivatives
        of the log-normalizer in :math:`\\kappa` (:math:`w` is the sufficient statistic), and
        the :math:`m - 1` perpendicular directions share :math:`E[1 - w^2] = (m - 1) A_m /
        \\kappa` equally. The recurrence :math:`I_{v-1} - I_{v+1} = (2v / \\kappa) I_v`
        [DLMF 10.29.1] gives :math:`A_m / \\kappa = 1 / (m + \\kappa A_{m+2})`, with no 0/0:
        at :math:`\\kappa = 0` it is :math:`1/m` and :math:`\\operatorname{Cov} z = I / m`, the
        uniform distribution's, and :math:`A_m A_{m+2} = 1 - m A_m / \\kappa`.

        Numerics: :math:`\\operatorname{Var} w = A_m / \\kappa - A_m (A_m - A_{m+2})` for
        :math:`\\kappa < \\max(20, (m/2 - 1)^2 / 8)`; above, where the two terms (each about
        :math:`1/\\kappa`) cancel to about :math:`(m - 1) / (2 \\kappa^2)`, from Hankel's
        expansion of :math:`\\log I_{m/2-1}` [DLMF 10.40.1], :math:`A_m' = ((m-1)/2 +
        2 t L'(t) + t^2 L''(t))\\, t^2` with :math:`t = 1/\\kappa` and :math:`L` the logarithm of
        the expansion's series, 40 terms. Against 80-digit arithmetic the relative error is below
        about 3e-13 for :math:`m \\le 65` (about 5e-12 at :math:`m = 201`, that of the Bessel
        ratios), for float32 parameters too.
        """
        perpendicular, axial = _second_moments(self.concentration, self._dim)
        loc = self.loc.to(torch.float64)
        outer = loc.unsqueeze(-1) * loc.unsqueeze(-2)
        diagonal = torch.eye(self._dim, dtype=torch.bool, device=loc.device)
        projector = torch.where(diagonal, torch.diag_embed(_sum_of_others(loc.square())), -outer)
        covariance = perpendicular[..., None, None] * projector + axial[..., None, None] * outer
        return covariance.to(self.loc.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density in nats with respect to the surface measure of the sphere.

        :param value: points of shape ``(..., m)`` broadcastable with the batch shape.
        :returns: tensor of shape ``broadcast(value.shape[:-1], batch_shape)``.
        """
        if self._validate_args:
            self._validate_sample(value)
        if self.gradient == "rsvi" and self._dim != 3:
            warn_if_score_dropped(self)
        # kappa mu^T z + log C_m = kappa (mu^T z - 1) - (-log C_m - kappa), with
        # mu^T z - 1 = -|mu - z|^2 / 2 on the sphere: no two terms of size kappa cancel
        distance = (self.loc - value).square().sum(-1)
        return -0.5 * self.concentration * distance - self._scaled_log_normalizer_negated

    def entropy(self) -> Tensor:
        """:math:`\\log|S^{m-1}| + \\log {}_0F_1(; m/2; \\kappa^2/4) - \\kappa A_m(\\kappa)`,
        nats, computed in float64 as :math:`\\log|S^{m-1}|` plus the ``"intercept"`` of
        :func:`pyro_dgm.special._bessel_parts` (no two terms of size kappa cancel), with
        derivative :math:`-\\kappa A_m'(\\kappa)` (differentiable to any order)."""
        (intercept,) = self._scaled_bessel(("intercept",))
        return (log_sphere_surface_area(self._dim) + intercept).to(self.concentration.dtype)

    # Sampling -------------------------------------------------------------------------------

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draw exactly from the distribution, differentiably in ``loc`` and ``concentration``.

        Differentiable to any order, and under ``torch.func`` transforms (``grad``, ``vjp``,
        ``jvp``, ``jacrev``) and forward-mode AD: higher derivatives and transforms go through
        plain-torch references of the fused autograd Functions (:mod:`pyro_dgm._fused`). The
        accepted proposals and the tangent directions are drawn without derivatives: the
        gradient is that of the rejection reparameterization (class docstring).

        :returns: tensor of shape ``sample_shape + batch_shape + (m,)``, on the sphere.
        :raises RuntimeError: for :math:`m \\ne 3` under ``torch.func.vmap`` when the rejection
            loop cannot be batched (a batched ``concentration``, or random draws that differ
            between the batch's elements): the number of rounds of Wood's sampler depends on
            the values drawn. For :math:`m = 3` (sampling by inversion) ``vmap`` works.
        """
        shape = self._extended_shape(sample_shape)
        loc, concentration = self.loc, self.concentration
        if loc.shape != shape or loc.dim() != 2:  # no graph nodes for the usual (B, m)
            loc = loc.expand(shape).reshape(-1, self._dim)
            concentration = concentration.expand(shape[:-1]).reshape(-1)
        reference = needs_reference(loc, concentration)
        if self._dim == 3:
            w, sqrt_one_minus_w2 = _sample_w_by_inversion(concentration)
            tangent = _unit_normal(loc.shape[0], 2, loc)
            if reference:
                sample = _rotate_reference(loc, w, sqrt_one_minus_w2, tangent)
            else:
                sample = _RotateFromPole.apply(loc, w, sqrt_one_minus_w2, tangent)[0]
            return sample if sample.shape == shape else sample.reshape(shape)
        with torch.no_grad():
            # forward-mode AD is on under no_grad: the draws must not carry tangents
            fixed = concentration.detach() if reference else concentration
            b = _envelope_b(fixed, self._dim)
            try:
                proposal, complement = _accepted_proposals(b, fixed, self._dim)
            except RuntimeError as error:
                if _under_vmap():
                    raise RuntimeError(_VMAP_MESSAGE.format(error=error)) from error
                raise
            tangent = _unit_normal(loc.shape[0], self._dim - 1, loc)
        if reference:
            sample, score = _reparameterized_sample_reference(
                loc, concentration, proposal, complement, b, tangent, self._dim
            )
        else:
            sample, score, _ = _ReparameterizedSample.apply(
                loc, concentration, proposal, complement, b, tangent, self._dim
            )
        if sample.shape != shape:  # a reshape to the same shape is a graph node all the same
            sample, score = sample.reshape(shape), score.reshape(shape[:-1])
        # Remember the accepted proposals' score (attached to the graph, without the
        # normalizer) for score_function(sample); see its docstring.
        self._sample_cache = (sample, score)
        return sample

    def score_parts(self, value: Tensor) -> ScoreParts:
        """Pyro's ``(log_prob, score_function, entropy_term)`` for the rejection gradient:
        ``entropy_term`` is ``log_prob``, and ``score_function`` that of
        :meth:`score_function` (0 with ``gradient="pathwise"`` and for :math:`m = 3`)."""
        log_prob = self.log_prob(value)
        return ScoreParts(log_prob=log_prob, score_function=self.score_function(value),
                          entropy_term=log_prob)

    def score_function(self, value: Tensor) -> Tensor | int:
        """The score function of :meth:`score_parts` alone, without the log-density: what
        :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` asks of a site whose KL is analytic.

        It is :math:`\\log \\pi(\\varepsilon \\mid \\kappa)`, the density of the accepted
        proposal :math:`\\varepsilon` held fixed:
        :math:`\\log C_m(\\kappa) + \\kappa w + \\frac{m-1}{2} \\log b - (m-1) \\log(1 - (1-b)
        \\varepsilon)` with :math:`w = h(\\varepsilon, \\kappa)` [Naesseth et al. 2017, eq. 7]
        (up to a constant), of shape ``value.shape[:-1]`` broadcast with the batch shape; its
        gradient has expectation zero. When ``value`` is the last :meth:`rsample`, the score
        computed there (by :class:`_ReparameterizedSample`) is reused; otherwise
        :math:`\\varepsilon` is recovered from :math:`\\mu^\\top` ``value`` (less precise for
        large :math:`\\kappa` in float32). 0 (an int, as Pyro's convention) with
        ``gradient="pathwise"`` and for :math:`m = 3`, where the sample is fully
        reparameterized. Differentiable to any order and under ``torch.func`` transforms, as
        :meth:`rsample`.
        """
        if self.gradient == "pathwise" or self._dim == 3:
            return 0
        reference = needs_reference(self.concentration)
        if self._sample_cache is not None and self._sample_cache[0] is value:
            score = self._sample_cache[1]
        else:
            proposal, complement, b = self._recover_proposal(value)
            concentration = self.concentration.expand(proposal.shape)
            if reference:
                score = _wood_map_reference(concentration, proposal, complement, self._dim)[2]
            else:
                score = _WoodTransform.apply(
                    concentration, proposal, complement, self._dim, b.expand(proposal.shape)
                )[2]
        log_area = log_sphere_surface_area(self._dim)
        if reference:
            return _subtract_normalizer_reference(
                score, self.concentration, None, None, log_area, self._order
            )
        log_normalized, ratio = self._bessel_values
        return _SubtractNormalizer.apply(
            score, self.concentration, log_normalized, ratio, log_area, self._order
        )

    @torch.no_grad()
    def _recover_proposal(self, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Invert w = h(eps, kappa) for the proposal that would have produced ``value``:
        (eps, 1 - eps, b), b of the batch shape; held fixed (no derivatives, also in forward
        mode, which no_grad leaves on)."""
        w = (self.loc.detach() * value.detach()).sum(-1).clamp(-1, 1)
        b = _envelope_b(self.concentration.detach(), self._dim)
        denominator = (1 + b) - (1 - b) * w
        return (1 - w) / denominator, b * (1 + w) / denominator, b


_VMAP_MESSAGE = (
    "VonMisesFisher.rsample cannot draw under torch.func.vmap here: Wood's rejection sampler "
    "(m != 3) repeats rounds of proposals until every element has accepted one, a loop whose "
    "length depends on the values drawn, which vmap cannot batch when the concentration is "
    "batched or the draws differ between its elements. Give the distribution batched loc and "
    "concentration instead of vmapping over them; torch.func.grad, vjp, jvp and jacrev work. "
    "(vmap: {error})"
)


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` transform is active (at any level)."""
    stack = get_interpreter_stack()
    return stack is not None and any(level.key() == TransformType.Vmap for level in stack)


def _envelope_b(concentration: Tensor, dim: int) -> Tensor:
    """Wood's b = (m - 1) / (2 kappa + sqrt(4 kappa^2 + (m - 1)^2)), free of cancellation."""
    two_kappa = 2 * concentration
    # full_like fills on the device: no host-to-device copy of the constant in a training step
    return (dim - 1) / (two_kappa + torch.hypot(two_kappa, torch.full_like(two_kappa, dim - 1)))


def _unit_normal(count: int, dim: int, like: Tensor) -> Tensor:
    """``count`` directions uniform on the sphere in R^dim, of ``like``'s dtype and device."""
    normal = torch.randn(count, dim, dtype=like.dtype, device=like.device)
    return normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True)


# m = 3 draws w by inverting its CDF (below). Under this concentration 1 - w comes from its
# Taylor series in kappa, whose _INVERSION_TERMS terms are exact to float64 there (the series
# converges for |kappa| < pi / 2); above it, from the closed form, whose derivative in kappa is
# a difference of two terms of size 1 / kappa and loses about eps / kappa of itself to
# cancellation (at kappa = 1/8 about 1e-15 in float64; in float32, at kappa = 1e-6, all of it).
_INVERSION_SERIES_BELOW = 0.125
_INVERSION_TERMS = 16


@cache
def _inversion_series(device: torch.device) -> tuple[Tensor, Tensor]:
    """The coefficients of the Taylor series of m = 3's inverse CDF, float64 on ``device``:
    the (T, T) matrix S, T = ``_INVERSION_TERMS``, and the exponents 1 .. T, with

        1 - w = 2a - a u sum_{k=1}^{T} kappa^k sum_{j<k} S[j, k - 1] d^j,   a = 1 - u, d = a - u.

    Derivation (exact rationals, rounded once): with E = expm1(-2 kappa) = sum_{j>=1}
    (-2 kappa)^j / j!, 1 - w = -log1p(a E) / kappa = sum_{i>=1} (-1)^i a^i E^i / (i kappa), so
    the coefficient of kappa^k is a polynomial c_k(a) of degree k + 1; for k >= 1 it vanishes
    at a = 0 and a = 1, the quotient -c_k(a) / (a u) = c_k(a) / (a (a - 1)) has degree k - 1,
    and it is written in d = 2a - 1, on [-1, 1] (c_1 = -2 a u, c_2 = -(4/3) a u d, ...).
    Factoring a u out keeps 1 - w and its derivative accurate relative to themselves as
    u -> 0 or a -> 0.
    """
    terms = _INVERSION_TERMS
    length = terms + 2  # powers of kappa kept in E and its powers
    expm1 = [Fraction(0)] + [Fraction((-2) ** j, factorial(j)) for j in range(1, length)]
    power = [Fraction(1)] + [Fraction(0)] * (length - 1)  # E^i, from i = 0
    by_power = [[Fraction(0)] * (terms + 2) for _ in range(terms + 1)]  # [k][i]: kappa^k a^i
    for i in range(1, terms + 2):
        power = [sum(power[p] * expm1[q - p] for p in range(q + 1)) for q in range(length)]
        for k in range(terms + 1):
            by_power[k][i] = Fraction((-1) ** i, i) * power[k + 1]
    matrix = [[Fraction(0)] * terms for _ in range(terms)]
    for k in range(1, terms + 1):
        dividend = by_power[k][1 : k + 2]  # c_k(a) / a, degree k
        quotient, carry = [Fraction(0)] * k, Fraction(0)
        for j in range(k, 0, -1):  # synthetic division by a - 1
            carry += dividend[j]
            quotient[j - 1] = carry
        assert dividend[0] + carry == 0  # c_k(1) = 0
        for j, coefficient in enumerate(quotient):  # a = (1 + d) / 2
            for i in range(j + 1):
                matrix[i][k - 1] += coefficient * comb(j, i) / 2**j
    rows = [[float(x) for x in row] for row in matrix]
    return (
        torch.tensor(rows, dtype=torch.float64, device=device),
        torch.arange(1, terms + 1, dtype=torch.float64, device=device),
    )


def _sample_w_by_inversion(concentration: Tensor) -> tuple[Tensor, Tensor]:
    """m = 3: (w, sqrt(1 - w^2)) by :func:`_w_by_inversion` of a float64 uniform variate."""
    uniform = torch.rand(concentration.shape, dtype=torch.float64, device=concentration.device)
    return _w_by_inversion(concentration, uniform)


def _w_by_inversion(concentration: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
    """m = 3: w = F^{-1}(u) for the CDF F of w = mu^T z, whose density is kappa e^{kappa w} /
    (2 sinh kappa) on [-1, 1], and sqrt(1 - w^2); both of shape and dtype ``concentration``'s
    (float64 inside), differentiable in ``concentration`` to any order (plain torch).

    With a = 1 - u (``uniform`` is float64 in [0, 1), so a is exact), 1 - w = -log1p(a
    expm1(-2 kappa)) / kappa = -log(u + a e^{-2 kappa}) / kappa: below kappa = 1/8 from its
    Taylor series (:func:`_inversion_series`), up to kappa = 1 from the log1p form, above
    through logsumexp (which keeps u's digits where a e^{-2 kappa} is below them). Against
    40-digit arithmetic, w is exact to 6e-16 and dw/dkappa to 3e-15 (tests).

    Differentiating F(w) = u at fixed u gives dw/dkappa = int_{-1}^{w} (A - t) e^{kappa (t - w)}
    dt with A = E[w] = coth kappa - 1/kappa; it is nonnegative (the mean of t <= w is below A)
    and at most int_{-1}^{A} (A - t) dt = (1 + A)^2 / 2 <= 2 (the integrand is positive only
    below A, and e^{kappa (t - w)} <= 1), which is 1/2, reached at u = 1/2, when kappa = 0,
    where dw/dkappa = 2 u (1 - u) and its mean is dA/dkappa(0) = 1/3.
    """
    kappa = concentration.to(torch.float64)
    complement = 1 - uniform
    below = kappa < _INVERSION_SERIES_BELOW
    series_matrix, exponents = _inversion_series(kappa.device)
    d = (complement - uniform).reshape(-1)  # vander wants one dimension
    coefficients = torch.linalg.vander(d, N=_INVERSION_TERMS) @ series_matrix
    # only where the series is used (kappa^16 of a large kappa would overflow)
    small = torch.where(below, kappa, 0.0).reshape(-1, 1)
    series = torch.linalg.vecdot(coefficients, small.pow(exponents)).reshape(kappa.shape)
    near_zero = torch.addcmul(2 * complement, complement * uniform, series, value=-1)
    # Each branch is evaluated where it is finite, as the unused branch's zero gradient times an
    # infinite derivative is NaN: the closed form not at 0, log1p not at log1p(-1) (u = 0 and
    # large kappa).
    safe = torch.where(below, 1.0, kappa)
    moderate = torch.log1p(complement * torch.expm1(-2 * safe.clamp(max=1)))
    # logsumexp, not logaddexp: the latter's second derivative is inf / inf far in the tail
    large = torch.stack([uniform.log(), complement.log() - 2 * safe]).logsumexp(0)
    closed_form = -torch.where(safe < 1, moderate, large) / safe
    one_minus_w = torch.where(below, near_zero, closed_form).clamp(0, 2)
    root = (one_minus_w * (2 - one_minus_w)).sqrt()
    return (1 - one_minus_w).to(concentration.dtype), root.to(concentration.dtype)


# Second moments (VonMisesFisher.covariance_matrix): Hankel's expansion of log I_v serves from
# kappa = max(_HANKEL_FROM, v^2 / 8): there its terms fall at least as fast as 4^k / k!, and
# what it omits, about e^{-2 kappa}, is below float64's rounding.
_HANKEL_FROM = 20.0
_HANKEL_TERMS = 40


def _hankel_start(dim: int) -> float:
    order = 0.5 * dim - 1
    return max(_HANKEL_FROM, order * order / 8)


@cache
def _hankel_matrix(dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(K, 3) float64 on ``device``, K = ``_HANKEL_TERMS``, and the exponents 0 .. K - 1: with
    s = kappa_0 / kappa (kappa_0 = :func:`_hankel_start`), the columns' dot products with
    (1, s, ..., s^(K-1)) are
    S, t S' and t^2 S'' for Hankel's series S(t) = sum_k (-1)^k a_k(v) t^k, t = 1 / kappa,
    a_k(v) = prod_{j<=k} (4 v^2 - (2j - 1)^2) / (k! 8^k) [DLMF 10.40.1] (I_v(kappa) =
    e^kappa S(1/kappa) / sqrt(2 pi kappa)); scaled by kappa_0^-k, so no coefficient overflows
    for large orders."""
    four_v2 = (dim - 2) ** 2
    start = _hankel_start(dim)
    rows, coefficient = [], 1.0
    for k in range(_HANKEL_TERMS):
        if k:
            coefficient *= -(four_v2 - (2 * k - 1) ** 2) / (8 * k * start)
        rows.append([coefficient, k * coefficient, k * (k - 1) * coefficient])
    return (
        torch.tensor(rows, dtype=torch.float64, device=device),
        torch.arange(_HANKEL_TERMS, dtype=torch.float64, device=device),
    )


def _second_moments(concentration: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(A_m / kappa, A_m'(kappa)) in float64, of ``concentration``'s shape, differentiable in
    it (see :attr:`VonMisesFisher.covariance_matrix`)."""
    kappa = concentration.to(torch.float64)
    next_ratio = bessel_iv_ratio(0.5 * dim, kappa)  # A_{m+2}, float64 arithmetic
    perpendicular = 1 / torch.addcmul(torch.full_like(kappa, float(dim)), kappa, next_ratio)
    ratio = kappa * perpendicular  # A_m
    near = torch.addcmul(perpendicular, ratio, next_ratio - ratio)
    start = _hankel_start(dim)
    far = kappa >= start
    scaled = start / torch.where(far, kappa, start)  # s <= 1; 1 where unused
    matrix, exponents = _hankel_matrix(dim, kappa.device)
    # pow, not vander: the backward pass of vander's cumprod asks the host about zeros
    powers = scaled.unsqueeze(-1).pow(exponents)
    series, first, second = (powers @ matrix).unbind(-1)
    first = first / series  # t L'(t)
    second = second / series - first.square()  # t^2 L''(t)
    t = scaled / start
    hankel = t.square() * (0.5 * (dim - 1) + second + 2 * first)
    return perpendicular, torch.where(far, hankel, near)


def _sum_of_others(square: Tensor) -> Tensor:
    """sum_{j != i} x_j along the last dimension, for each i: the exclusive prefix and suffix
    sums added, free of the cancellation of sum_j x_j - x_i (1 - mu_i^2 for mu_i near +-1)."""
    zero = square[..., :1] * 0
    before = torch.cat([zero, square[..., :-1].cumsum(-1)], -1)
    after = torch.cat([square[..., 1:].flip(-1).cumsum(-1).flip(-1), zero], -1)
    return before + after


# Wood's map and the rotation from the pole: the math of the four autograd Functions below,
# written once as their fused forward and backward passes and once in plain torch (the
# references, differentiable to any order and under torch.func; see pyro_dgm._fused).


def _wood_map(
    concentration: Tensor, proposal: Tensor, complement: Tensor, b: Tensor, dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w, sqrt(1 - w^2), the proposal's score without its normalizer, D); see
    :class:`_WoodTransform`."""
    denominator = torch.addcmul(complement, b, proposal)  # D = 1 - (1 - b) eps, no cancellation
    b_proposal = b * proposal
    w = (b_proposal / denominator).mul_(-2).add_(1)
    sqrt_one_minus_w2 = (b_proposal * complement).sqrt_().mul_(2).div_(denominator)
    # kappa w + (m - 1) (log(b) / 2 - log D)
    score = torch.add(concentration * w, (b.sqrt() / denominator).log_(), alpha=dim - 1)
    return w, sqrt_one_minus_w2, score, denominator


def _wood_map_backward(
    dim: int,
    concentration: Tensor,
    b: Tensor,
    w: Tensor,
    root: Tensor,
    grad_w: Tensor | None,
    grad_root: Tensor | None,
    grad_score: Tensor | None,
) -> Tensor:
    """The gradient with respect to kappa of :func:`_wood_map`'s first three outputs w,
    ``root`` = sqrt(1 - w^2) and the score, from kappa, b, w and ``root`` (formulas in
    :class:`_WoodTransform`); at least one incoming gradient is not None."""
    # the incoming gradients gathered on dw/dkappa and on d log(root)/dkappa (which the
    # score's (m - 1) (log(b) / 2 - log D) shares); the score's kappa w adds w itself
    through_w, through_root = grad_w, None if grad_root is None else grad_root * root
    if grad_score is not None:
        through_w = (grad_score * concentration if through_w is None
                     else torch.addcmul(through_w, grad_score, concentration))
        through_root = (grad_score * (dim - 1) if through_root is None
                        else through_root.add_(grad_score, alpha=dim - 1))
    # H dkappa/d. = through_w root^2 - through_root w
    numerator = None if through_w is None else (through_w * root).mul_(root)
    if through_root is not None:
        numerator = (through_root * w).neg_() if numerator is None else (
            numerator.addcmul_(through_root, w, value=-1))
    # H = sqrt(4 kappa^2 + (m - 1)^2) = (m - 1) / b - 2 kappa: at most half of the first term
    # is subtracted, so no cancellation
    grad = numerator.div_(torch.sub((dim - 1) / b, concentration, alpha=2))
    return grad if grad_score is None else grad.addcmul_(grad_score, w)


def _wood_map_reference(
    concentration: Tensor, proposal: Tensor, complement: Tensor, dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(w, sqrt(1 - w^2), the proposal's score without its normalizer) of :func:`_wood_map`
    in plain torch, with Wood's b recomputed from kappa: differentiable in kappa to any order
    and under torch.func (eps and 1 - eps are held fixed by the caller)."""
    b = _envelope_b(concentration, dim)
    denominator = complement + b * proposal
    w = 1 - 2 * b * proposal / denominator
    root = 2 * torch.sqrt(b * proposal * complement) / denominator
    score = concentration * w + (dim - 1) * (0.5 * torch.log(b) - torch.log(denominator))
    return w, root, score


def _rotate(
    loc: Tensor, w: Tensor, root: Tensor, tangent: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """:math:`z = -s H_u x` (see :class:`_RotateFromPole`) and what its backward pass needs,
    ``[p, s, 1 + |mu_1|, c, c - w]``, in the closed form of :class:`_RotateFromPole`: only
    per-row scalars times rows, no reflection vector."""
    mu_1, mu_rest = loc[..., 0], loc[..., 1:]
    p = torch.linalg.vecdot(mu_rest, tangent)  # mu_{2:}^T t
    sign = torch.copysign(torch.ones_like(mu_1), mu_1)  # s, with s mu_1 = |mu_1|
    one_plus_a = mu_1.abs().add_(1)  # 1 + |mu_1| >= 1
    signed_root = sign * root
    shift = (signed_root * p).div_(one_plus_a)  # c - w
    c = w + shift
    z = torch.empty_like(loc)
    torch.mul(mu_rest, c.unsqueeze(-1), out=z[..., 1:])
    z[..., 1:].addcmul_(tangent, signed_root.unsqueeze(-1), value=-1)
    torch.addcmul(mu_1 * w, root, p, out=z[..., 0])
    return z, [p, sign, one_plus_a, c, shift]


def _rotate_backward(
    needs: tuple[bool, bool, bool],
    loc: Tensor,
    w: Tensor,
    root: Tensor,
    tangent: Tensor,
    p: Tensor,
    sign: Tensor,
    one_plus_a: Tensor,
    c: Tensor,
    shift: Tensor,
    grad: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients with respect to loc, w and sqrt(1 - w^2) of :func:`_rotate`, given its
    inputs and saved tensors (formulas in :class:`_RotateFromPole`); only those flagged in
    ``needs`` (the others are None)."""
    need_loc, need_w, need_root = needs
    mu_1, mu_rest = loc[..., 0], loc[..., 1:]
    grad_1, grad_rest = grad[..., 0], grad[..., 1:]
    grad_c = torch.linalg.vecdot(grad_rest, mu_rest)
    q = (grad_c * sign).div_(one_plus_a)
    through_p = grad_1 + q  # dL/dp = root (g_1 + q)
    grad_loc = grad_w = grad_root = None
    if need_root:
        grad_root = torch.addcmul(p * through_p, sign, torch.linalg.vecdot(grad_rest, tangent),
                                  value=-1)
    if need_w:
        grad_w = torch.addcmul(grad_c, grad_1, mu_1)
    if need_loc:
        grad_loc = torch.empty_like(loc)
        torch.mul(grad_rest, c.unsqueeze(-1), out=grad_loc[..., 1:])
        grad_loc[..., 1:].addcmul_(tangent, (root * through_p).unsqueeze(-1))
        torch.addcmul(grad_1 * w, q, shift, value=-1, out=grad_loc[..., 0])
    return grad_loc, grad_w, grad_root


def _rotate_reference(loc: Tensor, w: Tensor, root: Tensor, tangent: Tensor) -> Tensor:
    """:func:`_rotate`'s :math:`z = -s H_u x` in plain torch, in the same closed form:
    differentiable in ``loc``, ``w`` and ``root`` to any order and under torch.func (away from
    :math:`\\mu_1 = 0`, where the reflection changes sides)."""
    mu_1, mu_rest = loc[..., 0], loc[..., 1:]
    p = (mu_rest * tangent).sum(-1)
    sign = torch.copysign(torch.ones_like(mu_1), mu_1)
    signed_root = sign * root
    c = w + signed_root * p / (1 + mu_1.abs())
    first = mu_1 * w + root * p
    rest = c.unsqueeze(-1) * mu_rest - signed_root.unsqueeze(-1) * tangent
    return torch.cat([first.unsqueeze(-1), rest], -1)


def _reparameterized_sample_reference(
    loc: Tensor,
    concentration: Tensor,
    proposal: Tensor,
    complement: Tensor,
    b: Tensor | None,
    tangent: Tensor,
    dim: int,
) -> tuple[Tensor, Tensor]:
    """(z, score) of :class:`_ReparameterizedSample` in plain torch, from its inputs (``b`` is
    not used: it is recomputed from kappa, differentiably)."""
    w, root, score = _wood_map_reference(concentration, proposal, complement, dim)
    return _rotate_reference(loc, w, root, tangent), score


def _subtract_normalizer_reference(
    score: Tensor,
    concentration: Tensor,
    log_normalized: Tensor | None,
    ratio: Tensor | None,
    log_area: float,
    order: float,
) -> Tensor:
    """:class:`_SubtractNormalizer` in plain torch, from its inputs: ``log_normalized`` and
    ``ratio`` are not used, :math:`\\log {}_0F_1(; m/2; \\kappa^2/4)` is evaluated again by
    :func:`~pyro_dgm.special.log_bessel_iv_normalized` (in float64), differentiable in kappa to
    any order."""
    log_normalizer = log_bessel_iv_normalized(order, concentration.double()) + log_area
    return (score - log_normalizer).to(score.dtype)


def _wood_transform_reference(
    concentration: Tensor, proposal: Tensor, complement: Tensor, dim: int, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_wood_map_reference` with the arguments of :class:`_WoodTransform`."""
    return _wood_map_reference(concentration, proposal, complement, dim)


@cache_forward_signature
class _WoodTransform(torch.autograd.Function):
    """Wood's map from an accepted proposal :math:`\\varepsilon` to the sample, as a function of
    :math:`\\kappa` with :math:`\\varepsilon` held fixed (the rejection reparameterization of
    Naesseth et al. 2017), with a hand-written backward pass.

    Inputs: ``concentration`` :math:`\\kappa`, the accepted ``proposal`` :math:`\\varepsilon` and
    its ``complement`` :math:`1 - \\varepsilon` (no gradient), shape (n,), the dimension
    :math:`m`, and Wood's envelope parameter :math:`b` at :math:`\\kappa` (:func:`_envelope_b`,
    computed once for the rejection loop; no gradient). With
    :math:`D = 1 - (1 - b) \\varepsilon`, the outputs are

    * :math:`w = 1 - 2 b \\varepsilon / D`,
    * :math:`\\sqrt{1 - w^2} = 2 \\sqrt{b \\varepsilon (1 - \\varepsilon)} / D` (no
      cancellation), and
    * the proposal's log-density up to its normalizer,
      :math:`\\kappa w + \\tfrac{m-1}{2} \\log b - (m - 1) \\log D`.

    Their derivatives in :math:`\\kappa` go through :math:`b` (and :math:`\\kappa w`): with
    :math:`H = \\sqrt{4 \\kappa^2 + (m-1)^2} = (m - 1) / b - 2 \\kappa`,
    :math:`db/d\\kappa = -2 b / H`, :math:`dw/db = -2 \\varepsilon (1 - \\varepsilon) / D^2 =
    -(1 - w^2) / (2 b)` and :math:`d \\log \\sqrt{1-w^2}/db = 1 / (2b) - \\varepsilon / D`, the
    derivative in :math:`b` of :math:`\\tfrac12 \\log b - \\log D` too; with
    :math:`2 b \\varepsilon / D = 1 - w` they are :math:`dw/d\\kappa = (1 - w^2) / H` and
    :math:`d \\log \\sqrt{1-w^2} / d\\kappa = -w / H`, so that the backward pass is a handful
    of operations where autograd's graph of the formulas took twenty-odd. Higher derivatives
    come from the reference :func:`_wood_map_reference` (:func:`pyro_dgm._fused.reference_vjp`).
    """

    @staticmethod
    def forward(
        concentration: Tensor, proposal: Tensor, complement: Tensor, dim: int, b: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _wood_map(concentration, proposal, complement, b, dim)[:3]

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        concentration, proposal, complement, dim, b = inputs
        w, root, _ = output
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(concentration, proposal, complement, b, w, root)

    @staticmethod
    def backward(ctx, grad_w: Tensor | None, grad_root: Tensor | None,
                 grad_score: Tensor | None) -> tuple[Tensor | None, ...]:
        concentration, proposal, complement, b, w, root = ctx.saved_tensors
        # only kappa is differentiated: eps, 1 - eps and b are held fixed
        needs = (ctx.needs_input_grad[0], False, False, False, False)
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(
                _wood_transform_reference,
                (concentration, proposal, complement, ctx.dim, b),
                (grad_w, grad_root, grad_score),
                needs,
            )
        if not needs[0] or (grad_w is None and grad_root is None and grad_score is None):
            return None, None, None, None, None
        grad = _wood_map_backward(ctx.dim, concentration, b, w, root, grad_w, grad_root,
                                  grad_score)
        return grad, None, None, None, None


# Faster than the reflection written with u, whose sign selections broadcast over short rows,
# at large n (figures in benchmarks/README.md); at n = 64 both cost the same.
@cache_forward_signature
class _RotateFromPole(torch.autograd.Function):
    """The point :math:`x = (w, \\sqrt{1 - w^2}\\, t)` at cosine :math:`w` from :math:`e_1` and
    unit tangent direction :math:`t` (n, m - 1), carried to the mean direction ``loc`` (n, m) by
    an orthogonal map :math:`R` with :math:`R e_1 = \\mu`: :math:`z = -s H_u x`, :math:`H_u` the
    Householder reflection with :math:`u = e_1 + s \\mu` and :math:`s = \\pm 1` with
    :math:`s \\mu_1 = \\lvert \\mu_1 \\rvert`, so that :math:`\\lVert u \\rVert^2 = 2 (1 +
    \\lvert \\mu_1 \\rvert) \\ge 2` and no epsilon is needed near :math:`\\mu = \\pm e_1`;
    differentiable in ``loc``, :math:`w` and :math:`r = \\sqrt{1 - w^2}` (not in :math:`t`).
    Returns :math:`z` (n, m) and a list of tensors for the backward pass (not an autograd
    output).

    Expanded, with :math:`p = \\mu_{2:}^\\top t` and :math:`c = w + s r p / (1 + \\lvert \\mu_1
    \\rvert)`, the map is :math:`z_1 = \\mu_1 w + r p` and :math:`z_{2:} = c \\mu_{2:} - s r t`,
    and its backward pass, for the incoming gradient :math:`g`, with :math:`g_c = g_{2:}^\\top
    \\mu_{2:}` and :math:`q = s g_c / (1 + \\lvert \\mu_1 \\rvert)`:
    :math:`\\partial_w = g_1 \\mu_1 + g_c`, :math:`\\partial_r = p (g_1 + q) - s g_{2:}^\\top t`,
    :math:`\\partial_{\\mu_{2:}} = c g_{2:} + r (g_1 + q) t` and :math:`\\partial_{\\mu_1} = g_1 w
    - q (c - w)`. Every operation is a per-row scalar times a row or a row's dot product.
    Higher derivatives come from the reference :func:`_rotate_reference`.
    """

    @staticmethod
    def forward(
        loc: Tensor, w: Tensor, root: Tensor, tangent: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        return _rotate(loc, w, root, tangent)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        loc, w, root, tangent = inputs
        _, (p, sign, one_plus_a, c, shift) = output
        ctx.save_for_backward(loc, w, root, tangent, p, sign, one_plus_a, c, shift)

    @staticmethod
    def backward(ctx, grad: Tensor, _: None) -> tuple[Tensor | None, ...]:
        loc, w, root, tangent, p, sign, one_plus_a, c, shift = ctx.saved_tensors
        needs = (*ctx.needs_input_grad[:3], False)  # the tangent is held fixed
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(_rotate_reference, (loc, w, root, tangent), (grad,), needs)
        grads = _rotate_backward(needs[:3], loc, w, root, tangent, p, sign, one_plus_a, c,
                                 shift, grad)
        return (*grads, None)


@cache_forward_signature
class _ReparameterizedSample(torch.autograd.Function):
    """The whole differentiable part of :meth:`VonMisesFisher.rsample` as one node: Wood's map
    of the accepted proposals (:class:`_WoodTransform`) followed by the rotation from the pole
    (:class:`_RotateFromPole`), returning the sample :math:`z` (n, m), the accepted
    proposals' score without its normalizer (n,), and a list of tensors for the backward pass
    (not an autograd output). One node and one hand-written backward pass where the two
    Functions took two (training steps at n = 64 are bound by the count of small operations).
    Higher derivatives come from the reference :func:`_reparameterized_sample_reference`.
    """

    @staticmethod
    def forward(
        loc: Tensor,
        concentration: Tensor,
        proposal: Tensor,
        complement: Tensor,
        b: Tensor,
        tangent: Tensor,
        dim: int,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        w, root, score, _ = _wood_map(concentration, proposal, complement, b, dim)
        z, rotation = _rotate(loc, w, root, tangent)
        return z, score, [w, root, *rotation]

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        loc, concentration, proposal, complement, b, tangent, dim = inputs
        _, _, (w, root, p, sign, one_plus_a, c, shift) = output
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(loc, concentration, proposal, complement, b, tangent,
                              w, root, p, sign, one_plus_a, c, shift)

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_score: Tensor | None,
                 _: None) -> tuple[Tensor | None, ...]:
        (loc, concentration, proposal, complement, b, tangent,
         w, root, p, sign, one_plus_a, c, shift) = ctx.saved_tensors
        need_loc, need_concentration = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(
                _reparameterized_sample_reference,
                (loc, concentration, proposal, complement, b, tangent, ctx.dim),
                (grad_z, grad_score),
                (need_loc, need_concentration, False, False, False, False, False),
            )
        grad_loc = grad_w = grad_root = None
        if grad_z is not None:
            grad_loc, grad_w, grad_root = _rotate_backward(
                (need_loc, need_concentration, need_concentration), loc, w, root, tangent,
                p, sign, one_plus_a, c, shift, grad_z,
            )
        grad_concentration = None
        if need_concentration and (grad_w is not None or grad_score is not None):
            grad_concentration = _wood_map_backward(
                ctx.dim, concentration, b, w, root, grad_w, grad_root, grad_score
            )
        return grad_loc, grad_concentration, None, None, None, None, None


@cache_forward_signature
class _SubtractNormalizer(torch.autograd.Function):
    """The proposal's score less the vMF normalizer, :math:`\\mathrm{score} - \\log
    {}_0F_1(; m/2; \\kappa^2/4) - \\log|S^{m-1}|`, from the float64 ``log_normalized`` and
    ``ratio`` :math:`A_m(\\kappa)` already evaluated at the Bessel ``order`` :math:`m/2 - 1`
    (no gradient): the derivative in :math:`\\kappa` of the subtracted part is :math:`-A_m`.
    Returned in the score's dtype; one node where attaching the Bessel terms' derivatives and
    subtracting took several. Higher derivatives come from the reference
    :func:`_subtract_normalizer_reference`, which evaluates the Bessel term again."""

    @staticmethod
    def forward(score: Tensor, concentration: Tensor, log_normalized: Tensor, ratio: Tensor,
                log_area: float, order: float) -> Tensor:
        return score.sub(log_normalized).sub_(log_area).to(score.dtype)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        score, concentration, _, ratio, log_area, order = inputs
        ctx.log_area, ctx.order = log_area, order
        ctx.save_for_backward(score, concentration, ratio)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        score, concentration, ratio = ctx.saved_tensors
        need_score, need_concentration = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(
                _subtract_normalizer_reference,
                (score, concentration, None, None, ctx.log_area, ctx.order),
                (grad,),
                (need_score, need_concentration, False, False, False, False),
            )
        grad_concentration = None
        if need_concentration:
            grad_concentration = (grad * ratio).neg_().to(grad.dtype)
            if grad_concentration.shape != concentration.shape:  # a sample shape or broadcast
                grad_concentration = _sum_to_shape(grad_concentration, concentration.shape)
        return grad if need_score else None, grad_concentration, None, None, None, None


def _accepted_proposals(b: Tensor, concentration: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Batched rejection: returns the first accepted eps ~ Beta((m-1)/2, (m-1)/2) per element,
    and 1 - eps.

    Proposals come as pairs (P_1, P_2) with eps = P_1 / (P_1 + P_2) (:func:`_proposal_pairs`).
    Wood's test log u <= kappa w + (m-1) log(1 - x0 w) - c, with x0 = (1-b)/(1+b), is
    rewritten in them so that nothing of size kappa cancels and no division by P_1 + P_2 is
    needed before a proposal is accepted:

        log u <= s (P_2 - P_1) / E + (m-1) log((1 + b) (P_1 + P_2) / (2 E)),
        E = P_2 + b P_1 = (P_1 + P_2) (1 - (1 - b) eps),   s = 2 kappa b / (1 + b),

    with the per-element s and (1 + b) / 2 computed once. Each round draws several proposals
    for every element still rejected (about 512 in all in the first round, then twice as many
    per element each round), so that stragglers finish in few rounds; only those elements are
    carried on (one host synchronisation per round). Which accepted proposal an element takes
    depends only on which were accepted, not on their values, so it is distributed exactly.
    """
    count = b.shape[0]
    half = 0.5 * (dim - 1)
    one_plus_b = 1 + b
    scale = (concentration * b).mul_(2).div_(one_plus_b)
    half_one_plus_b = one_plus_b.mul_(0.5)
    # Small batches cost about the same per round whatever the proposal count, so ask for
    # about 512 proposals in the first round: usually the only one. Wood's acceptance rate
    # measured at least 0.68 (m from 4 to 65, kappa up to 1e5; it levels off by 1000), so with 8
    # proposals each (a batch of 64) one round suffices with probability 1 - 64 * 0.32^8 > 0.99.
    per_element = max(1, min(16, 512 // max(count, 1)))
    accepted_pair = pending = None  # (count, 2): eps and 1 - eps
    b_pending, scale_pending, half_pending = b, scale, half_one_plus_b
    while True:
        pairs = _proposal_pairs(b, (b_pending.shape[0], per_element), half)  # (n, k, 2)
        first, second = pairs.unbind(-1)
        denominator = torch.addcmul(second, b_pending.unsqueeze(-1), first)  # E
        log_accept = torch.addcmul(
            (first + second).mul_(half_pending.unsqueeze(-1)).div_(denominator).log_()
            .mul_(dim - 1),
            scale_pending.unsqueeze(-1),
            (second - first).div_(denominator),
        )
        accepted = log_accept >= torch.rand_like(log_accept).log_()  # log u, u ~ U(0, 1)
        if per_element == 1:
            chosen, done = pairs[:, 0], accepted[:, 0]
        else:
            which = accepted.to(torch.uint8).argmax(-1, keepdim=True)
            chosen = pairs.gather(1, which.unsqueeze(-1).expand(-1, -1, 2)).squeeze(1)
            done = accepted.any(-1)
        chosen = chosen / chosen.sum(-1, keepdim=True)  # (eps, 1 - eps)
        if pending is None:  # first round: every element, no indexing needed
            if bool(done.all()):  # the usual case: a single round, no bookkeeping
                return chosen.unbind(-1)
            accepted_pair = chosen
            pending = torch.arange(count, device=b.device)
        else:
            accepted_pair[pending] = torch.where(done.unsqueeze(-1), chosen,
                                                 accepted_pair[pending])
        still = (~done).nonzero().squeeze(-1)
        if still.numel() == 0:
            return accepted_pair.unbind(-1)
        pending = pending[still]
        b_pending, scale_pending, half_pending = (
            t[still] for t in (b_pending, scale_pending, half_pending)
        )
        per_element = min(2 * per_element, 64)


# Up to this many proposals a round, two gamma variates per proposal (one operation, and no
# normalization before the test) take less time than one gamma and one normal variate and the
# dozen operations of the t construction; beyond, the variates' own cost dominates.
_TWO_GAMMA_PROPOSALS = 1024


def _proposal_pairs(like: Tensor, shape: tuple[int, int], half: float) -> Tensor:
    """Proposals eps ~ Beta(a, a), a = ``half``, as pairs (P_1, P_2) of shape ``shape + (2,)``
    with eps = P_1 / (P_1 + P_2) and 1 - eps = P_2 / (P_1 + P_2), both free of cancellation:
    two Gamma(a) variates for small rounds, else :func:`_symmetric_beta_pair` (P_1 + P_2 = 1).
    """
    if shape[0] * shape[1] <= _TWO_GAMMA_PROPOSALS:
        return torch._standard_gamma(like.new_full((*shape, 2), half))
    return _symmetric_beta_pair(like.new_full(shape, half))


def _symmetric_beta_pair(half: Tensor) -> Tensor:
    """Draws eps ~ Beta(a, a) for a = ``half`` (any shape), returned stacked with 1 - eps as
    (..., 2), both without cancellation.

    With Z ~ N(0, 1) and G ~ Gamma(a) independent, Z / sqrt(G / a) is Student's t with 2a
    degrees of freedom and eps = (1 + Z / s) / 2, s = sqrt(2 G + Z^2), is Beta(a, a): one gamma
    variate per draw instead of the two of G1 / (G1 + G2). The smaller of eps and 1 - eps is
    written G / (s (s + |Z|)), and the larger is 1 minus it (at least 1/2, so as accurate).
    """
    gamma = torch._standard_gamma(half)
    normal = torch.randn_like(half)
    root = torch.addcmul(gamma, normal, normal, value=0.5).mul_(2).sqrt_()
    smaller = gamma / (root * (root + normal.abs()))
    larger = 1 - smaller
    positive = normal >= 0  # eps is the larger of the two
    return torch.stack(
        [torch.where(positive, larger, smaller), torch.where(positive, smaller, larger)], -1
    )
