"""The von Mises-Fisher distribution on the unit hypersphere, with an exact rejection sampler."""

from __future__ import annotations

import torch
from pyro.distributions import Independent, TorchDistribution, constraints
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import is_identically_zero, sum_rightmost
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions.utils import lazy_property

from pyro_dgm.distributions.hyperspherical_uniform import log_sphere_surface_area
from pyro_dgm.special import (
    _sum_to_shape,
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

    def expand(self, batch_shape, _instance=None) -> VonMisesFisher:
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
        return _ScoredIndependent(self, reinterpreted_batch_ndims)

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
        """:attr:`_bessel_values`, differentiable in kappa (no second evaluation)."""
        return log_bessel_iv_normalized_and_ratio(
            self._order, self.concentration.double(), values=self._bessel_values
        )

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

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density in nats with respect to the surface measure of the sphere.

        :param value: points of shape ``(..., m)`` broadcastable with the batch shape.
        :returns: tensor of shape ``broadcast(value.shape[:-1], batch_shape)``.
        """
        if self._validate_args:
            self._validate_sample(value)
        return self.concentration * (self.loc * value).sum(-1) - self._log_normalizer_negated

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
        loc, concentration = self.loc, self.concentration
        if loc.shape != shape or loc.dim() != 2:  # no graph nodes for the usual (B, m)
            loc = loc.expand(shape).reshape(-1, self._dim)
            concentration = concentration.expand(shape[:-1]).reshape(-1)
        if self._dim == 3:
            w, sqrt_one_minus_w2 = _sample_w_by_inversion(concentration)
            tangent = _unit_normal(loc.shape[0], 2, loc)
            return _RotateFromPole.apply(loc, w, sqrt_one_minus_w2, tangent).reshape(shape)
        with torch.no_grad():
            b = _envelope_b(concentration, self._dim)
            proposal, complement = _accepted_proposals(b, concentration, self._dim)
            tangent = _unit_normal(loc.shape[0], self._dim - 1, loc)
        sample, score = _ReparameterizedSample.apply(
            loc, concentration, proposal, complement, b, tangent, self._dim
        )
        sample = sample.reshape(shape)
        # Remember the accepted proposals' score (attached to the graph, without the
        # normalizer) for score_function(sample); see its docstring.
        self._sample_cache = (sample, score.reshape(shape[:-1]))
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
        reparameterized.
        """
        if self.gradient == "pathwise" or self._dim == 3:
            return 0
        if self._sample_cache is not None and self._sample_cache[0] is value:
            score = self._sample_cache[1]
        else:
            proposal, complement, b = self._recover_proposal(value)
            concentration = self.concentration.expand(proposal.shape)
            score = _WoodTransform.apply(
                concentration, proposal, complement, self._dim, b.expand(proposal.shape)
            )[2]
        log_normalized, ratio = self._bessel_values
        return _SubtractNormalizer.apply(
            score, self.concentration, log_normalized, ratio, log_sphere_surface_area(self._dim)
        )

    @torch.no_grad()
    def _recover_proposal(self, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Invert w = h(eps, kappa) for the proposal that would have produced ``value``:
        (eps, 1 - eps, b), b of the batch shape."""
        w = (self.loc * value).sum(-1).clamp(-1, 1)
        b = _envelope_b(self.concentration, self._dim)
        denominator = (1 + b) - (1 - b) * w
        return (1 - w) / denominator, b * (1 + w) / denominator, b


class _ScoredIndependent(Independent):
    """:class:`~pyro.distributions.Independent` over a :class:`VonMisesFisher` that keeps its
    score function, summed over the reinterpreted dimensions as the log-density is."""

    def score_function(self, value: Tensor) -> Tensor | int:
        score = self.base_dist.score_function(value)
        if is_identically_zero(score):
            return score
        return sum_rightmost(score, self.reinterpreted_batch_ndims)

    def score_parts(self, value: Tensor) -> ScoreParts:
        log_prob = self.log_prob(value)
        return ScoreParts(log_prob=log_prob, score_function=self.score_function(value),
                          entropy_term=log_prob)

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> TorchDistribution:
        if reinterpreted_batch_ndims is None:
            reinterpreted_batch_ndims = len(self.batch_shape)
        if reinterpreted_batch_ndims == 0:
            return self
        return self.base_dist.to_event(reinterpreted_batch_ndims + self.reinterpreted_batch_ndims)


def _envelope_b(concentration: Tensor, dim: int) -> Tensor:
    """Wood's b = (m - 1) / (2 kappa + sqrt(4 kappa^2 + (m - 1)^2)), free of cancellation."""
    two_kappa = 2 * concentration
    # full_like fills on the device: no host-to-device copy of the constant in a training step
    return (dim - 1) / (two_kappa + torch.hypot(two_kappa, torch.full_like(two_kappa, dim - 1)))


def _unit_normal(count: int, dim: int, like: Tensor) -> Tensor:
    """``count`` directions uniform on the sphere in R^dim, of ``like``'s dtype and device."""
    normal = torch.randn(count, dim, dtype=like.dtype, device=like.device)
    return normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True)


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


# Wood's map and the rotation from the pole, forward and backward: the math of the three
# autograd Functions below, each written once.


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
    saved: tuple[Tensor, ...],
    dim: int,
    grad_w: Tensor | None,
    grad_root: Tensor | None,
    grad_score: Tensor | None,
) -> Tensor:
    """The gradient with respect to kappa of :func:`_wood_map`'s first three outputs, from
    ``saved`` = (kappa, eps, 1 - eps, b, D, w, sqrt(1 - w^2)); any gradient may be None."""
    concentration, proposal, complement, b, denominator, w, root = saved
    two_kappa = 2 * concentration
    db = -2 * b / torch.hypot(two_kappa, torch.full_like(two_kappa, dim - 1.0))
    shift = 0.5 / b - proposal / denominator  # d log sqrt(b eps (1 - eps)) / D / db
    through_w = torch.zeros_like(b) if grad_w is None else grad_w
    through_root = torch.zeros_like(b) if grad_root is None else grad_root * root
    if grad_score is not None:
        through_w = through_w + grad_score * concentration
        through_root = through_root + grad_score * (dim - 1)
    dw_db = -2 * proposal * complement / denominator.square()
    grad_b = through_w * dw_db + through_root * shift
    grad = grad_b * db
    return grad if grad_score is None else grad + grad_score * w


def _rotate(
    loc: Tensor, w: Tensor, root: Tensor, tangent: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """:math:`z = -s H_u x` (see :class:`_RotateFromPole`) and what its backward pass needs,
    in the closed form of :class:`_RotateFromPole`: only per-row scalars times rows, no
    reflection vector."""
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
    return z, (p, sign, one_plus_a, c, shift)


def _rotate_backward(
    loc: Tensor, w: Tensor, root: Tensor, tangent: Tensor, saved: tuple[Tensor, ...],
    grad: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients with respect to loc, w and sqrt(1 - w^2) of :func:`_rotate`, whose
    ``saved`` tensors are given (formulas in :class:`_RotateFromPole`)."""
    p, sign, one_plus_a, c, shift = saved
    mu_1, mu_rest = loc[..., 0], loc[..., 1:]
    grad_1, grad_rest = grad[..., 0], grad[..., 1:]
    grad_c = torch.linalg.vecdot(grad_rest, mu_rest)
    q = (grad_c * sign).div_(one_plus_a)
    through_p = grad_1 + q  # dL/dp = root (g_1 + q)
    grad_root = torch.addcmul(p * through_p, sign, torch.linalg.vecdot(grad_rest, tangent),
                              value=-1)
    grad_w = torch.addcmul(grad_c, grad_1, mu_1)
    grad_loc = torch.empty_like(loc)
    torch.mul(grad_rest, c.unsqueeze(-1), out=grad_loc[..., 1:])
    grad_loc[..., 1:].addcmul_(tangent, (root * through_p).unsqueeze(-1))
    torch.addcmul(grad_1 * w, q, shift, value=-1, out=grad_loc[..., 0])
    return grad_loc, grad_w, grad_root


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

    Their derivatives in :math:`\\kappa` go through :math:`b` alone (and :math:`\\kappa w`):
    :math:`db/d\\kappa = -2 b / \\sqrt{4 \\kappa^2 + (m-1)^2}`,
    :math:`dw/db = -2 \\varepsilon (1 - \\varepsilon) / D^2` and
    :math:`d\\sqrt{1-w^2}/db = \\sqrt{1-w^2}\\,(1 / (2b) - \\varepsilon / D)`. One node in
    place of the twenty-odd of autograd's graph of these formulas. Not itself differentiable.
    """

    @staticmethod
    def forward(
        ctx, concentration: Tensor, proposal: Tensor, complement: Tensor, dim: int, b: Tensor
    ):
        w, root, score, denominator = _wood_map(concentration, proposal, complement, b, dim)
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(concentration, proposal, complement, b, denominator, w, root)
        return w, root, score

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w: Tensor, grad_root: Tensor, grad_score: Tensor):
        grad = _wood_map_backward(ctx.saved_tensors, ctx.dim, grad_w, grad_root, grad_score)
        return grad, None, None, None, None


class _RotateFromPole(torch.autograd.Function):
    """The point :math:`x = (w, \\sqrt{1 - w^2}\\, t)` at cosine :math:`w` from :math:`e_1` and
    unit tangent direction :math:`t` (n, m - 1), carried to the mean direction ``loc`` (n, m) by
    an orthogonal map :math:`R` with :math:`R e_1 = \\mu`: :math:`z = -s H_u x`, :math:`H_u` the
    Householder reflection with :math:`u = e_1 + s \\mu` and :math:`s = \\pm 1` with
    :math:`s \\mu_1 = \\lvert \\mu_1 \\rvert`, so that :math:`\\lVert u \\rVert^2 = 2 (1 +
    \\lvert \\mu_1 \\rvert) \\ge 2` and no epsilon is needed near :math:`\\mu = \\pm e_1`;
    differentiable in ``loc``, :math:`w` and :math:`r = \\sqrt{1 - w^2}`.

    Expanded, with :math:`p = \\mu_{2:}^\\top t` and :math:`c = w + s r p / (1 + \\lvert \\mu_1
    \\rvert)`, the map is :math:`z_1 = \\mu_1 w + r p` and :math:`z_{2:} = c \\mu_{2:} - s r t`,
    and its backward pass, for the incoming gradient :math:`g`, with :math:`g_c = g_{2:}^\\top
    \\mu_{2:}` and :math:`q = s g_c / (1 + \\lvert \\mu_1 \\rvert)`:
    :math:`\\partial_w = g_1 \\mu_1 + g_c`, :math:`\\partial_r = p (g_1 + q) - s g_{2:}^\\top t`,
    :math:`\\partial_{\\mu_{2:}} = c g_{2:} + r (g_1 + q) t` and :math:`\\partial_{\\mu_1} = g_1 w
    - q (c - w)`. Every operation is a per-row scalar times a row or a row's dot product. At
    n = 4096 on the CPU, forward and backward took 108 and 211 us (m = 11) and 207 and 289 us
    (m = 65), against 303 and 277 us and 3.6 and 4.3 ms for the reflection written with
    :math:`u`, whose sign selections broadcast over short rows; at n = 64 both cost about the
    same.
    """

    @staticmethod
    def forward(ctx, loc: Tensor, w: Tensor, root: Tensor, tangent: Tensor) -> Tensor:
        z, saved = _rotate(loc, w, root, tangent)
        ctx.save_for_backward(loc, w, root, tangent, *saved)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        loc, w, root, tangent, *saved = ctx.saved_tensors
        return (*_rotate_backward(loc, w, root, tangent, saved, grad), None)


class _ReparameterizedSample(torch.autograd.Function):
    """The whole differentiable part of :meth:`VonMisesFisher.rsample` as one node: Wood's map
    of the accepted proposals (:class:`_WoodTransform`) followed by the rotation from the pole
    (:class:`_RotateFromPole`), returning the sample :math:`z` (n, m) and the accepted
    proposals' score without its normalizer (n,). One node and one hand-written backward pass
    where the two Functions took two (training steps at n = 64 are bound by the count of small
    operations). Not itself differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        loc: Tensor,
        concentration: Tensor,
        proposal: Tensor,
        complement: Tensor,
        b: Tensor,
        tangent: Tensor,
        dim: int,
    ) -> tuple[Tensor, Tensor]:
        w, root, score, denominator = _wood_map(concentration, proposal, complement, b, dim)
        z, rotation = _rotate(loc, w, root, tangent)
        ctx.dim = dim
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(concentration, proposal, complement, b, denominator, w, root,
                              loc, tangent, *rotation)
        return z, score

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: Tensor | None, grad_score: Tensor | None):
        saved = ctx.saved_tensors
        wood, (loc, tangent), rotation = saved[:7], saved[7:9], saved[9:]
        grad_loc = grad_w = grad_root = None
        if grad_z is not None:
            w, root = wood[5:]
            grad_loc, grad_w, grad_root = _rotate_backward(
                loc, w, root, tangent, rotation, grad_z
            )
        if grad_w is None and grad_score is None:
            return grad_loc, None, None, None, None, None, None
        grad_concentration = _wood_map_backward(wood, ctx.dim, grad_w, grad_root, grad_score)
        return grad_loc, grad_concentration, None, None, None, None, None


class _SubtractNormalizer(torch.autograd.Function):
    """The proposal's score less the vMF normalizer, :math:`\\mathrm{score} - \\log
    {}_0F_1(; m/2; \\kappa^2/4) - \\log|S^{m-1}|`, from the float64 ``log_normalized`` and
    ``ratio`` :math:`A_m(\\kappa)` already evaluated (no gradient): the derivative in
    :math:`\\kappa` of the subtracted part is :math:`-A_m`. Returned in the score's dtype; one
    node where attaching the Bessel terms' derivatives and subtracting took several. Not
    itself differentiable."""

    @staticmethod
    def forward(ctx, score: Tensor, concentration: Tensor, log_normalized: Tensor,
                ratio: Tensor, log_area: float) -> Tensor:
        ctx.save_for_backward(ratio)
        ctx.concentration_shape = concentration.shape
        return score.sub(log_normalized).sub_(log_area).to(score.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (ratio,) = ctx.saved_tensors
        concentration_shape = ctx.concentration_shape
        grad_concentration = (grad * ratio).neg_().to(grad.dtype)
        if grad_concentration.shape != concentration_shape:  # a sample shape or broadcast
            grad_concentration = _sum_to_shape(grad_concentration, concentration_shape)
        return grad, grad_concentration, None, None, None


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
