"""Score parts that survive Pyro's distribution wrappers.

A partially reparameterized distribution such as
:class:`~pyro_dgm.distributions.VonMisesFisher` has unbiased gradients only together with the
score function of its ``score_parts`` (the correction term of Naesseth et al. 2017). Pyro's
:class:`~pyro.distributions.Independent` (built directly, not by ``.to_event``) and
:class:`~pyro.distributions.MaskedDistribution` with a boolean mask inherit the default
``score_parts`` of a reparameterized distribution, whose score function is 0: every ELBO that
asks them gets biased gradients, silently. :class:`~pyro.distributions.ExpandedDistribution`
and a tensor-masked ``MaskedDistribution`` pass the base's score parts on and are correct.

* :func:`score_parts_of` and :func:`score_function_of` see through those wrappers to the base
  distribution; pyro_dgm's objectives use them, so they are unbiased whichever wrapper a user
  chose.
* :func:`warn_if_score_dropped` is called by a distribution's ``log_prob``: when Pyro's default
  ``score_parts`` of a wrapper is what asked (so a Pyro ELBO is about to drop the correction),
  it warns, once per call site, and names the alternatives.
"""

from __future__ import annotations

import sys
import warnings

import torch
from pyro.distributions import Independent, MaskedDistribution
from pyro.distributions.distribution import Distribution
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import is_identically_zero, sum_rightmost
from torch import Tensor

__all__ = ["score_function_of", "score_parts_of", "warn_if_score_dropped"]


def _drops_score(fn: Distribution) -> bool:
    """Whether ``fn.score_parts`` is Pyro's default for a reparameterized distribution (score
    function 0) although ``fn`` wraps a distribution that may have one."""
    if isinstance(fn, MaskedDistribution):
        return isinstance(fn._mask, bool)
    return type(fn).score_parts is Distribution.score_parts and isinstance(
        fn, torch.distributions.Independent
    )


def score_function_of(fn: Distribution, value: Tensor) -> Tensor | int:
    """The score-function part of ``fn``'s score parts at ``value``, seen through
    ``Independent``, ``MaskedDistribution`` and ``ExpandedDistribution`` to the base
    distribution's; 0 (Pyro's convention) for a fully reparameterized distribution.

    A distribution with a ``score_function(value)`` method (as
    :class:`~pyro_dgm.distributions.VonMisesFisher`) gives it without its log-density.

    :param fn: a distribution, possibly wrapped.
    :param value: a sample of ``fn``, shape ``sample_shape + fn.batch_shape + fn.event_shape``.
    :returns: a tensor of shape ``value.shape[:value.dim() - fn.event_dim]`` (not scaled or
        masked by the trace site), or the integer 0.
    """
    own = getattr(fn, "score_function", None)
    if own is not None:
        return own(value)
    if isinstance(fn, torch.distributions.Independent) and _drops_score(fn):
        score = score_function_of(fn.base_dist, value)
        if is_identically_zero(score):
            return score
        return sum_rightmost(score, fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        # not masked, as Pyro's ScoreParts.scale_and_mask leaves it: a masked-out sample still
        # feeds the sites downstream, whose cost the score function multiplies
        return score_function_of(fn.base_dist, value)
    if isinstance(fn, ExpandedDistribution):
        score = score_function_of(fn.base_dist, value)
        if is_identically_zero(score) or fn.batch_shape == fn.base_dist.batch_shape:
            return score
        return score.expand(
            torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])
        )
    if fn.has_rsample and type(fn).score_parts is Distribution.score_parts:
        return 0  # fully reparameterized
    return fn.score_parts(value).score_function


def score_parts_of(fn: Distribution, value: Tensor) -> ScoreParts:
    """``fn.score_parts(value)``, except that where a wrapper of Pyro's would drop its base
    distribution's score function (see the module docstring), the score function is taken from
    the base: ``(log_prob, score_function, entropy_term)`` with ``entropy_term = log_prob``.

    :returns: Pyro's :class:`~pyro.distributions.score_parts.ScoreParts`, unscaled.
    """
    if fn.has_rsample and _drops_score(fn):
        log_prob = fn.log_prob(value)
        return ScoreParts(log_prob, score_function_of(fn, value), log_prob)
    return fn.score_parts(value)


_DEFAULT_SCORE_PARTS = Distribution.score_parts.__code__


def warn_if_score_dropped(distribution: Distribution) -> None:
    """Warn when the caller's ``log_prob`` was reached from Pyro's default ``score_parts`` of a
    wrapper (``Independent``, boolean-masked ``MaskedDistribution``), which drops
    ``distribution``'s score function. Call it from ``log_prob`` of a distribution whose score
    function is not 0; it inspects a few stack frames and costs about a microsecond."""
    frame = sys._getframe(2)  # 0: here, 1: the distribution's log_prob
    for _ in range(8):  # through nested wrappers' log_prob
        if frame is None or frame.f_code.co_name != "log_prob":
            break
        frame = frame.f_back
    if frame is None or frame.f_code is not _DEFAULT_SCORE_PARTS:
        return
    wrapper = type(frame.f_locals.get("self")).__name__
    warnings.warn(
        f"{type(distribution).__name__} is wrapped in Pyro's {wrapper}, whose score_parts drops "
        "its score function (the rejection sampler's correction term): gradients from Pyro's "
        "ELBOs are biased for this site. Use the distribution's own .to_event(n) / .mask(mask) "
        "(which keep the term), or pyro_dgm.infer.TraceAnalyticKL_ELBO / "
        "ImportanceWeightedELBO (which see through the wrapper).",
        UserWarning,
        stacklevel=2,
    )


class ScoredIndependent(Independent):
    """:class:`~pyro.distributions.Independent` that keeps its base distribution's score
    function, summed over the reinterpreted dimensions as the log-density is (what
    ``VonMisesFisher.to_event`` returns)."""

    def score_function(self, value: Tensor) -> Tensor | int:
        score = score_function_of(self.base_dist, value)
        if is_identically_zero(score):
            return score
        return sum_rightmost(score, self.reinterpreted_batch_ndims)

    def score_parts(self, value: Tensor) -> ScoreParts:
        log_prob = self.log_prob(value)
        return ScoreParts(log_prob, self.score_function(value), log_prob)

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> Distribution:
        """As Pyro's ``to_event`` (all batch dimensions when ``None``), returning a
        :class:`ScoredIndependent`, which keeps the score function."""
        return _scored_to_event(self, reinterpreted_batch_ndims)

    def mask(self, mask: Tensor | bool) -> Distribution:
        """As Pyro's ``mask``, returning a :class:`ScoredMasked`, which keeps the score
        function."""
        return ScoredMasked(self, mask)


class ScoredMasked(MaskedDistribution):
    """:class:`~pyro.distributions.MaskedDistribution` that keeps its base distribution's score
    function for a boolean mask too (Pyro's passes it on only for a tensor mask)."""

    def score_function(self, value: Tensor) -> Tensor | int:
        return score_function_of(self.base_dist, value)

    def score_parts(self, value: Tensor) -> ScoreParts:
        if isinstance(self._mask, bool):
            log_prob = self.log_prob(value)
            return ScoreParts(log_prob, self.score_function(value), log_prob)
        return score_parts_of(self.base_dist, value).scale_and_mask(mask=self._mask)

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> Distribution:
        """As Pyro's ``to_event`` (all batch dimensions when ``None``), returning a
        :class:`ScoredIndependent`, which keeps the score function."""
        return _scored_to_event(self, reinterpreted_batch_ndims)


def _scored_to_event(
    distribution: ScoredIndependent | ScoredMasked, reinterpreted_batch_ndims: int | None
) -> Distribution:
    """``to_event`` of the two classes above: a :class:`ScoredIndependent`, one level deep."""
    if reinterpreted_batch_ndims is None:
        reinterpreted_batch_ndims = len(distribution.batch_shape)
    if reinterpreted_batch_ndims == 0:
        return distribution
    if isinstance(distribution, ScoredIndependent):
        return ScoredIndependent(
            distribution.base_dist,
            reinterpreted_batch_ndims + distribution.reinterpreted_batch_ndims,
        )
    return ScoredIndependent(distribution, reinterpreted_batch_ndims)
