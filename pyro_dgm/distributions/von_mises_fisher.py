"""The von Mises-Fisher distribution on the unit hypersphere, with an exact rejection sampler."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.score_parts import ScoreParts
from torch import Tensor
from torch.distributions.utils import lazy_property

from pyro_dgm.distributions.hyperspherical_uniform import log_sphere_surface_area
from pyro_dgm.special import log_bessel_iv_normalized_and_ratio

__all__ = ["VonMisesFisher"]

_GRADIENTS = ("rsvi", "pathwise")


class VonMisesFisher(TorchDistribution):
    """von Mises-Fisher distribution on the unit sphere :math:`S^{m-1} \\subset \\mathbb{R}^m`.

    .. math::

        q(z \\mid \\mu, \\kappa) = C_m(\\kappa) \\exp(\\kappa \\mu^\\top z), \\qquad
        C_m(\\kappa) = \\frac{\\kappa^{m/2-1}}{(2\\pi)^{m/2} I_{m/2-1}(\\kappa)}.

    **Sampling** is exact. The component :math:`w = \\mu^\\top z` is drawn by Wood's (1994)
    rejection sampler with proposal :math:`\\varepsilon \\sim \\mathrm{Beta}((m-1)/2, (m-1)/2)`
    (drawn from one gamma and one normal variate, through Student's t),
    :math:`w = h(\\varepsilon, \\kappa) = (1 - (1+b)\\varepsilon) / (1 - (1-b)\\varepsilon)`
    and the envelope parameter written without cancellation,
    :math:`b = (m-1) / (2\\kappa + \\sqrt{4\\kappa^2 + (m-1)^2})`; the acceptance test and
    :math:`1 - w^2` are rewritten in :math:`\\varepsilon` so that nothing of size
    :math:`\\kappa` is subtracted. For :math:`m = 3`, :math:`w` is drawn by exact inversion of its
    CDF. Rejection runs batched, with several proposals per element per round and only the
    still-rejected elements carried to the next round (one host synchronisation per round). The
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
    Bessel functions are evaluated in float64 on the parameters' device.

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
            batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        except RuntimeError:
            raise ValueError(
                f"loc of shape {tuple(loc.shape)} (batch shape {tuple(loc.shape[:-1])}) and "
                f"concentration of shape {tuple(concentration.shape)} do not broadcast"
            ) from None
        event_shape = loc.shape[-1:]
        self.loc = loc.expand(batch_shape + event_shape)
        self.concentration = concentration.expand(batch_shape)
        self.gradient = gradient
        self._sample_cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> VonMisesFisher:
        new = self._get_checked_instance(VonMisesFisher, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape)
        new.gradient = self.gradient
        new._sample_cache = None
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _dim(self) -> int:
        return self.event_shape[0]

    @property
    def _order(self) -> float:
        """The Bessel order m/2 - 1 of the normalizer."""
        return 0.5 * self._dim - 1

    @lazy_property
    def _bessel_terms(self) -> tuple[Tensor, Tensor]:
        """(log 0F1(; m/2; kappa^2/4), A_m(kappa)) in float64, evaluated once per instance."""
        return log_bessel_iv_normalized_and_ratio(self._order, self.concentration.double())

    @property
    def mean(self) -> Tensor:
        """:math:`A_m(\\kappa) \\mu`, with :math:`A_m = I_{m/2} / I_{m/2-1}`."""
        return self._bessel_terms[1].to(self.loc.dtype).unsqueeze(-1) * self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density in nats with respect to the surface measure of the sphere.

        :param value: points of shape ``(..., m)`` broadcastable with the batch shape.
        :returns: tensor of shape ``broadcast(value.shape[:-1], batch_shape)``.
        """
        if self._validate_args:
            self._validate_sample(value)
        log_normalizer = -log_sphere_surface_area(self._dim) - self._bessel_terms[0]
        return self.concentration * (self.loc * value).sum(-1) + log_normalizer.to(value.dtype)

    def entropy(self) -> Tensor:
        """:math:`\\log|S^{m-1}| + \\log {}_0F_1(; m/2; \\kappa^2/4) - \\kappa A_m(\\kappa)`,
        nats, computed in float64."""
        log_normalized, ratio = self._bessel_terms
        entropy = log_normalized - self.concentration.double() * ratio
        return (log_sphere_surface_area(self._dim) + entropy).to(self.concentration.dtype)

    # Sampling -------------------------------------------------------------------------------

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Draw exactly from the distribution, differentiably in ``loc`` and ``concentration``.

        :returns: tensor of shape ``sample_shape + batch_shape + (m,)``, on the sphere.
        """
        shape = self._extended_shape(sample_shape)
        loc = self.loc.expand(shape).reshape(-1, self._dim)
        concentration = self.concentration.expand(shape[:-1]).reshape(-1)
        if self._dim == 3:
            w, sqrt_one_minus_w2 = _sample_w_by_inversion(concentration)
            envelope = None
        else:
            w, sqrt_one_minus_w2, envelope = _sample_w_by_rejection(concentration, self._dim)
        tangent = torch.randn(
            loc.shape[0], self._dim - 1, dtype=loc.dtype, device=loc.device
        )
        tangent = tangent / torch.linalg.vector_norm(tangent, dim=-1, keepdim=True)
        about_e1 = torch.cat([w.unsqueeze(-1), sqrt_one_minus_w2.unsqueeze(-1) * tangent], -1)
        sample = _reflect_e1_to(loc, about_e1).reshape(shape)
        if envelope is not None:
            # Remember w, b and D of the accepted proposals (attached to the graph) for
            # score_parts(sample); see its docstring.
            self._sample_cache = (sample, *(t.reshape(shape[:-1]) for t in (w, *envelope)))
        return sample

    def score_parts(self, value: Tensor) -> ScoreParts:
        """Pyro's ``(log_prob, score_function, entropy_term)`` for the rejection gradient.

        ``score_function`` is :math:`\\log \\pi(\\varepsilon \\mid \\kappa)` up to a constant, the
        density of the accepted proposal :math:`\\varepsilon` held fixed:
        :math:`-\\log {}_0F_1 + \\kappa w + \\frac{m-1}{2} \\log b - (m-1) \\log(1 - (1-b)
        \\varepsilon)` with :math:`w = h(\\varepsilon, \\kappa)` [Naesseth et al. 2017, eq. 7]. Its
        expectation is zero. When ``value`` is the last :meth:`rsample`, its :math:`w`,
        :math:`b` and denominator are reused from it; otherwise :math:`\\varepsilon` is recovered
        from :math:`\\mu^\\top` ``value`` (less precise for large :math:`\\kappa` in float32).
        """
        log_prob = self.log_prob(value)
        if self.gradient == "pathwise" or self._dim == 3:
            return ScoreParts(log_prob=log_prob, score_function=0, entropy_term=log_prob)
        if self._sample_cache is not None and self._sample_cache[0] is value:
            _, w, b, denominator = self._sample_cache
            concentration = self.concentration.expand(w.shape)
        else:
            proposal, proposal_complement = self._recover_proposal(value)
            concentration = self.concentration.expand(proposal.shape)
            b = _envelope_b(concentration, self._dim)
            denominator = proposal_complement + b * proposal  # 1 - (1 - b) eps
            w = 1 - 2 * b * proposal / denominator
        score = (
            concentration * w
            + 0.5 * (self._dim - 1) * b.log()
            - (self._dim - 1) * denominator.log()
            - self._bessel_terms[0].to(concentration.dtype)
        )
        return ScoreParts(log_prob=log_prob, score_function=score, entropy_term=log_prob)

    @torch.no_grad()
    def _recover_proposal(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """Invert w = h(eps, kappa) for the proposal that would have produced ``value``."""
        w = (self.loc * value).sum(-1).clamp(-1, 1)
        b = _envelope_b(self.concentration, self._dim)
        denominator = (1 + b) - (1 - b) * w
        return (1 - w) / denominator, b * (1 + w) / denominator


def _envelope_b(concentration: Tensor, dim: int) -> Tensor:
    """Wood's b = (m - 1) / (2 kappa + sqrt(4 kappa^2 + (m - 1)^2)), free of cancellation."""
    two_kappa = 2 * concentration
    return (dim - 1) / (two_kappa + torch.hypot(two_kappa, two_kappa.new_tensor(dim - 1.0)))


def _sample_w_by_inversion(concentration: Tensor) -> tuple[Tensor, Tensor]:
    """m = 3: w has density proportional to exp(kappa w) on [-1, 1]; invert its CDF.

    1 - w = -log(u + (1 - u) exp(-2 kappa)) / kappa, written with log1p/expm1 for small kappa
    and logaddexp for large kappa.
    """
    uniform = torch.rand_like(concentration)
    kappa = concentration.clamp(min=torch.finfo(concentration.dtype).tiny)
    small = torch.log1p((1 - uniform) * torch.expm1(-2 * kappa))
    large = torch.logaddexp(uniform.log(), torch.log1p(-uniform) - 2 * kappa)
    one_minus_w = -torch.where(kappa < 1, small, large) / kappa
    one_minus_w = one_minus_w.clamp(0, 2)
    return 1 - one_minus_w, (one_minus_w * (2 - one_minus_w)).sqrt()


def _sample_w_by_rejection(
    concentration: Tensor, dim: int
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Wood's rejection sampler for w, reparameterized through the accepted proposal eps.

    Returns w, sqrt(1 - w^2) and (b, D = 1 - (1 - b) eps), all differentiable in kappa with eps
    held fixed (what the score function of the accepted proposal needs).
    """
    b = _envelope_b(concentration, dim)
    proposal, proposal_complement = _accepted_proposals(b.detach(), concentration.detach(), dim)
    denominator = torch.addcmul(proposal_complement, b, proposal)  # no cancellation
    w = 1 - 2 * b * proposal / denominator
    sqrt_one_minus_w2 = 2 * (b * proposal * proposal_complement).sqrt() / denominator
    return w, sqrt_one_minus_w2, (b, denominator)


def _accepted_proposals(b: Tensor, concentration: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Batched rejection: returns the first accepted eps ~ Beta((m-1)/2, (m-1)/2) per element,
    and 1 - eps.

    Wood's test log u <= kappa w + (m-1) log(1 - x0 w) - c, with x0 = (1-b)/(1+b), is
    rewritten in eps so that nothing of size kappa cancels:

        log u <= s (1 - 2 eps) / D - (m-1) log D + o,   D = 1 - (1 - b) eps,
        s = 2 kappa b / (1 + b),   o = (m-1) log((1 + b) / 2),

    with the per-element s and o computed once. Each round draws several proposals for every
    element still rejected (about 1024 in all in the first round, then twice as many per
    element each round), so that stragglers finish in few rounds; only those elements are
    carried on (one host synchronisation per round).
    """
    count = b.shape[0]
    half = 0.5 * (dim - 1)
    scale = 2 * concentration * b / (1 + b)
    offset = (dim - 1) * (torch.log1p(b) - math.log(2))
    # Small batches cost the same per round whatever the proposal count, so ask for about a
    # thousand proposals in the first round: usually the only one.
    per_element = max(1, min(16, 1024 // max(count, 1)))
    accepted_pair = pending = None  # (2, count): eps and 1 - eps
    b_pending, scale_pending, offset_pending = b, scale, offset
    while True:
        pair = _symmetric_beta_pair(b.new_full((b_pending.shape[0], per_element), half))
        eps, eps_complement = pair
        denominator = torch.addcmul(eps_complement, b_pending.unsqueeze(-1), eps)
        log_accept = torch.addcmul(
            offset_pending.unsqueeze(-1),
            scale_pending.unsqueeze(-1),
            (eps_complement - eps) / denominator,
        ).sub_(denominator.log_(), alpha=dim - 1)
        accepted = log_accept >= -torch.empty_like(eps).exponential_()  # log u, u ~ U(0, 1)
        if per_element == 1:
            chosen, done = pair[..., 0], accepted[..., 0]
        else:
            first = accepted.to(torch.uint8).argmax(-1, keepdim=True)
            chosen = pair.gather(-1, first.expand(2, -1, -1)).squeeze(-1)
            done = accepted.any(-1)
        if pending is None:  # first round: every element, no indexing needed
            accepted_pair = chosen
            pending = torch.arange(count, device=b.device)
        else:
            accepted_pair[:, pending] = torch.where(done, chosen, accepted_pair[:, pending])
        still = (~done).nonzero().squeeze(-1)
        if still.numel() == 0:
            return accepted_pair[0], accepted_pair[1]
        pending = pending[still]
        b_pending, scale_pending, offset_pending = (
            t[still] for t in (b_pending, scale_pending, offset_pending)
        )
        per_element = min(2 * per_element, 64)


def _symmetric_beta_pair(half: Tensor) -> Tensor:
    """Draws eps ~ Beta(a, a) for a = ``half`` (any shape), returned stacked with 1 - eps as
    (2, ...), both without cancellation.

    With Z ~ N(0, 1) and V ~ chi^2_{2a} = 2 Gamma(a) independent, Z / sqrt(V / 2a) is Student's
    t with 2a degrees of freedom and eps = (1 + Z / s) / 2, s = sqrt(V + Z^2), is Beta(a, a):
    one gamma variate per draw instead of the two of G1 / (G1 + G2). The smaller of eps and
    1 - eps is written V / (2 s (s + |Z|)), the larger (s + |Z|) / (2 s).
    """
    chi_square = 2 * torch._standard_gamma(half)
    normal = torch.randn_like(half)
    root = torch.sqrt(chi_square + normal.square())
    larger_numerator = root + normal.abs()
    larger = larger_numerator / (2 * root)
    smaller = chi_square / (2 * root * larger_numerator)
    positive = normal >= 0
    return torch.stack([torch.where(positive, larger, smaller),
                        torch.where(positive, smaller, larger)])


def _reflect_e1_to(loc: Tensor, x: Tensor) -> Tensor:
    """Apply an orthogonal R with R e_1 = loc to x (both (n, m)).

    R = -s H_u with u = e_1 + s loc and s = sign(loc_1) (+1 at 0), H_u the Householder
    reflection: ||u||^2 = 2 (1 + |loc_1|) >= 2, so no epsilon is needed near loc = +-e_1.
    """
    sign = torch.where(loc[..., :1] >= 0, 1.0, -1.0).to(loc.dtype)
    u = torch.cat([1 + sign * loc[..., :1], sign * loc[..., 1:]], -1)
    coefficient = 2 * (u * x).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True)
    return -sign * (x - coefficient * u)

