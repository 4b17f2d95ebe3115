r"""The logit preprocessing of Real NVP: pixel intensities in :math:`[0, 1]` to real numbers."""

from __future__ import annotations

__all__ = ["LogitPreprocessing", "logit_preprocessing"]

import math

import torch
from torch import Tensor
from torch.distributions import Transform, constraints
from torch.distributions.utils import _sum_rightmost
from torch.nn import functional as F


class LogitPreprocessing(Transform):
    r"""Logit preprocessing [1, Sec. 4.1]: intensities :math:`x \in [0, 1]` to
    :math:`y = \operatorname{logit}(\alpha + (1 - 2\alpha) x)`, elementwise.

    .. math::

        \log \lvert \det J \rvert = \sum \Bigl(\log(1 - 2\alpha) + \operatorname{softplus}(y)
        + \operatorname{softplus}(-y)\Bigr),

    the sum over the last ``event_dim`` dimensions of :math:`\log(1 - 2\alpha) - \log s -
    \log(1 - s)`, :math:`s = \alpha + (1 - 2\alpha) x`, written in :math:`y` so that it stays
    accurate near the ends. The inverse is
    :math:`x = (\operatorname{sigmoid}(y) - \alpha) / (1 - 2\alpha)`. The shrink by
    :math:`\alpha` keeps the logit of intensities 0 and 1 finite.

    **Domain**: the bijection is between the reals and
    :math:`(-\alpha / (1 - 2\alpha), (1 - \alpha) / (1 - 2\alpha))`, an interval a little
    wider than :math:`[0, 1]`; a flow whose last map (towards the data) is the inverse of this
    one puts a little mass outside :math:`[0, 1]`, so its density restricted to :math:`[0, 1]`
    integrates to less than 1 and log-likelihoods computed with it are lower bounds.

    **Units**: with 8-bit data :math:`k \in \{0, \ldots, 255\}^D` dequantized as
    :math:`x = (k + u) / 256`, :math:`u \sim U[0, 1)^D`, a density :math:`p` on the
    :math:`[0, 1]` scale gives :math:`\log P(k) \ge \mathbb{E}_u[\log p(x)] - D \log 256`;
    [1] writes the preprocessing on the :math:`[0, 256]` scale as
    :math:`\operatorname{logit}(\alpha + (1 - \alpha) x / 256)` (verify; the symmetric
    :math:`1 - 2\alpha` used here is the form common to later code and keeps both ends
    finite). :math:`\alpha = 0.05`, the default, is the value of [1], whose experiments did not
    include MNIST; its use for MNIST is to be verified.

    :param alpha: the shrink :math:`\alpha \in [0, 1/2)`.
    :type alpha: float
    :param event_dim: the number of rightmost dimensions forming an event (3 for images
        ``(C, H, W)``).
    :type event_dim: int
    :raises ValueError: if ``alpha`` is not in :math:`[0, 1/2)` or ``event_dim`` is negative.

    References:

    1. L\. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP", ICLR 2017.
    """

    bijective = True
    sign = +1

    def __init__(self, alpha: float = 0.05, event_dim: int = 3) -> None:
        # Cached for the same reason as Squeeze2d: a ComposeTransform recomputes the chain.
        super().__init__(cache_size=1)
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        if event_dim < 0:
            raise ValueError(f"event_dim must be non-negative, got {event_dim}")
        self.alpha = float(alpha)
        self._event_dim = event_dim

    @property
    def event_dim(self) -> int:
        return self._event_dim

    @property
    def _interval(self) -> constraints.Constraint:
        width = 1 - 2 * self.alpha
        return constraints.interval(-self.alpha / width, (1 - self.alpha) / width)

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return constraints.independent(self._interval, self._event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self._event_dim)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LogitPreprocessing) and other.alpha == self.alpha
                and other.event_dim == self.event_dim)

    def __hash__(self) -> int:
        return hash((LogitPreprocessing, self.alpha, self._event_dim))

    def _call(self, x: Tensor) -> Tensor:
        return torch.logit(self.alpha + (1 - 2 * self.alpha) * x)

    def _inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """The sum above, of shape ``x.shape[:-event_dim]``."""
        elementwise = math.log1p(-2 * self.alpha) + F.softplus(y) + F.softplus(-y)
        return _sum_rightmost(elementwise, self._event_dim)


def logit_preprocessing(alpha: float = 0.05, event_dim: int = 3) -> LogitPreprocessing:
    """Build a :class:`LogitPreprocessing` transform, in the manner of Pyro's helpers.

    :param alpha: the shrink :math:`\\alpha \\in [0, 1/2)`.
    :type alpha: float
    :param event_dim: the number of rightmost dimensions forming an event.
    :type event_dim: int
    """
    return LogitPreprocessing(alpha, event_dim)
