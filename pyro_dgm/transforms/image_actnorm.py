"""Activation normalization (ActNorm) of Glow: a per-channel affine map initialised from data."""

from __future__ import annotations

__all__ = ["ActNorm", "act_norm"]

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from .image_base import check_image, real_image


class ActNorm(TransformModule):
    r"""Activation normalization [1]: a learned affine map per channel, initialised from data.

    .. math::

        y_{c,h,w} = (x_{c,h,w} + b_c)\, e^{s_c}, \qquad
        \log \lvert \det J \rvert = H W \sum_{c=1}^{C} s_c,

    on images of shape ``(..., C, H, W)`` (``event_dim = 3``), in the normalizing direction
    (data to latent) as in [1]. The inverse is :math:`x = y e^{-s} - b`.

    **Data-dependent initialisation** [1, Sec. 3.1]: the first *forward* call sets
    :math:`b_c = -\mathrm{mean}_c(x)` and :math:`s_c = -\log(\mathrm{std}_c(x) + 10^{-6})`, the
    mean and (biased) standard deviation over every dimension but the channel one, so that this
    first output has per-channel mean 0 and variance 1 (to the :math:`10^{-6}`), and then trains
    them as free parameters. The boolean buffer :attr:`initialized` records this, so a module
    restored from a ``state_dict`` is not initialised again. In a
    :class:`~pyro_dgm.models.ImageFlow` the forward direction is the one
    ``log_prob`` takes, so the first ``log_prob`` of a data batch initialises every ActNorm on
    the activations it sees; sampling (the inverse) never initialises. On the ``meta`` device
    the initialisation is skipped (there are no values to read).

    :param channels: the number of channels :math:`C`.
    :type channels: int
    :raises ValueError: if ``channels`` is not positive, or an input is not of shape
        ``(..., C, H, W)``.

    Example::

        norm = ActNorm(3)
        y = norm(images)  # images: (B, 3, 32, 32); y has per-channel mean 0 and variance 1

    References:

    1. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
       NeurIPS 2018.
    """

    domain = real_image
    codomain = real_image
    bijective = True
    sign = +1

    def __init__(self, channels: int) -> None:
        super().__init__(cache_size=1)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # Mirrors the buffer, so that the flag is read from the device once, not at every call;
        # None means "read the buffer" (after construction or load_state_dict).
        self._known_initialized: bool | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = None

    def _initialize(self, x: Tensor) -> None:
        if self._known_initialized is None:
            self._known_initialized = bool(self.initialized)
        if self._known_initialized:
            return
        dims = [d for d in range(x.dim()) if d != x.dim() - 3]
        with torch.no_grad():
            variance, mean = torch.var_mean(x, dim=dims, correction=0)
            self.bias.copy_(-mean.view(-1, 1, 1))
            self.log_scale.copy_(-torch.log(variance.sqrt() + 1e-6).view(-1, 1, 1))
            self.initialized.fill_(True)
        self._known_initialized = True

    def _call(self, x: Tensor) -> Tensor:
        check_image(x, self.channels)
        if not (self._known_initialized or x.is_meta):
            self._initialize(x)
        return (x + self.bias) * self.log_scale.exp()

    def _inverse(self, y: Tensor) -> Tensor:
        check_image(y, self.channels)
        return y * torch.exp(-self.log_scale) - self.bias

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`H W \\sum_c s_c`, of shape ``x.shape[:-3]``."""
        height, width = x.shape[-2:]
        return (height * width * self.log_scale.sum()).expand(x.shape[:-3])


def act_norm(channels: int) -> ActNorm:
    """Build an :class:`ActNorm` transform, in the manner of Pyro's helpers.

    :param channels: the number of channels :math:`C`.
    :type channels: int
    """
    return ActNorm(channels)
