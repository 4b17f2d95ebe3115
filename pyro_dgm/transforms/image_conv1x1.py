r"""The invertible 1x1 convolution of Glow, in its LU-decomposed parameterisation.

Pyro's :class:`~pyro.distributions.transforms.GeneralizedChannelPermute` is the same map, but
keeps :math:`U`'s diagonal as a free parameter, which training may drive through zero (a
singular :math:`W`, an infinite log-determinant); Glow's parameterisation [1, Sec. 3.2], used
here, keeps the diagonal's signs fixed and learns :math:`\log \lvert s \rvert`, so :math:`W`
stays invertible for every value of the parameters.

References:

1. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018.
"""

from __future__ import annotations

__all__ = ["InvertibleConv1x1", "invertible_conv1x1"]

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn

from .image_base import check_image, real_image


class InvertibleConv1x1(TransformModule):
    r"""Invertible 1x1 convolution [1]: the same learned :math:`C \times C` matrix applied to the
    channels of every pixel, LU-decomposed.

    .. math::

        \mathbf{y}_{:,h,w} = W \mathbf{x}_{:,h,w}, \qquad
        W = P L \bigl(U + \operatorname{diag}(\boldsymbol{\sigma} \odot e^{\mathbf{l}})\bigr),
        \qquad \log \lvert \det J \rvert = H W \sum_{c=1}^{C} l_c,

    on images of shape ``(..., C, H, W)`` (``event_dim = 3``), with :math:`P` a fixed
    permutation, :math:`L` unit lower triangular, :math:`U` strictly upper triangular,
    :math:`\boldsymbol{\sigma} \in \{-1, 1\}^C` fixed signs and :math:`\mathbf{l}` the learned
    :math:`\log \lvert s \rvert` ([1, Sec. 3.2]; the parameters are :attr:`lower`,
    :attr:`upper` and :attr:`log_abs_diag`, of which only the strict triangles of the first two
    are used). The inverse is two triangular solves,
    :math:`\mathbf{x} = U_s^{-1} L^{-1} P^T \mathbf{y}`, not an inverted matrix.

    **Initialisation** [1]: :math:`W` is a random rotation, the Q factor of the QR
    decomposition of a standard normal :math:`C \times C` matrix drawn in float64 on the CPU
    from ``generator`` (a CPU :class:`torch.Generator`), or from torch's global CPU generator
    when ``generator`` is ``None``; its LU decomposition with partial pivoting gives :math:`P`,
    :math:`\boldsymbol{\sigma}` (buffers) and the initial parameters. The same seed gives the
    same :math:`W` whatever the default device and dtype.

    :param channels: the number of channels :math:`C`.
    :type channels: int
    :param generator: the source of the initial rotation.
    :type generator: torch.Generator or None
    :raises ValueError: if ``channels`` is not positive, or an input is not of shape
        ``(..., C, H, W)``.

    Example::

        conv = InvertibleConv1x1(4, generator=torch.Generator().manual_seed(0))
        y = conv(x)  # x: (B, 4, 16, 16)
        assert torch.allclose(conv.inv(y), x, atol=1e-5)

    References:

    1. D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
       NeurIPS 2018.
    """

    domain = real_image
    codomain = real_image
    bijective = True

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__(cache_size=1)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        rotation, _ = torch.linalg.qr(
            torch.randn(channels, channels, generator=generator, dtype=torch.float64,
                        device="cpu")
        )
        permutation, lower, upper = torch.linalg.lu(rotation)
        diag = upper.diagonal()
        # Parameters and buffers follow the default device and dtype, as torch.nn's layers do.
        self.lower = nn.Parameter(torch.empty(channels, channels))
        self.upper = nn.Parameter(torch.empty(channels, channels))
        self.log_abs_diag = nn.Parameter(torch.empty(channels))
        self.register_buffer("sign_diag", torch.empty(channels))
        # rotation = permutation @ lower @ upper, and permutation @ A = A[index]
        self.register_buffer("index", torch.empty(channels, dtype=torch.long))
        self.register_buffer("inverse_index", torch.empty(channels, dtype=torch.long))
        with torch.no_grad():
            self.lower.copy_(lower)
            self.upper.copy_(upper)
            self.log_abs_diag.copy_(diag.abs().log())
            self.sign_diag.copy_(diag.sign())
            index = permutation.argmax(dim=1)
            self.index.copy_(index)
            self.inverse_index.copy_(index.argsort())

    def _factors(self) -> tuple[Tensor, Tensor]:
        """:math:`L` (unit diagonal) and :math:`U_s = U + \\operatorname{diag}(\\sigma e^l)`."""
        diag = self.sign_diag * self.log_abs_diag.exp()
        lower = self.lower.tril(-1) + torch.diag_embed(torch.ones_like(diag))
        upper = self.upper.triu(1) + torch.diag_embed(diag)
        return lower, upper

    @property
    def weight(self) -> Tensor:
        """The matrix :math:`W = P L U_s`, shape ``(C, C)``."""
        lower, upper = self._factors()
        return (lower @ upper)[self.index]

    def _call(self, x: Tensor) -> Tensor:
        check_image(x, self.channels)
        return torch.einsum("ij,...jhw->...ihw", self.weight, x)

    def _inverse(self, y: Tensor) -> Tensor:
        check_image(y, self.channels)
        lower, upper = self._factors()
        # P^T y is y with its channels put back in place: (P^T y)[index] = y.
        rows = y[..., self.inverse_index, :, :].flatten(-2)
        rows = torch.linalg.solve_triangular(lower, rows, upper=False, unitriangular=True)
        rows = torch.linalg.solve_triangular(upper, rows, upper=True)
        return rows.unflatten(-1, y.shape[-2:])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`H W \\sum_c l_c`, of shape ``x.shape[:-3]``."""
        height, width = x.shape[-2:]
        return (height * width * self.log_abs_diag.sum()).expand(x.shape[:-3])


def invertible_conv1x1(
    channels: int, generator: torch.Generator | None = None
) -> InvertibleConv1x1:
    """Build an :class:`InvertibleConv1x1` transform, in the manner of Pyro's helpers.

    :param channels: the number of channels :math:`C`.
    :type channels: int
    :param generator: the source of the initial rotation (torch's global CPU generator when
        ``None``).
    :type generator: torch.Generator or None
    """
    return InvertibleConv1x1(channels, generator)
