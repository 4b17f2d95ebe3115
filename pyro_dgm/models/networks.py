"""Gated building blocks of the VampPrior paper's encoders and decoders.

Tomczak & Welling (2018) build every MLP of their VAEs and HVAEs from gated dense layers and
every convolutional encoder from gated convolutions: a linear (or convolutional) map whose output
is multiplied elementwise by a sigmoid gate computed from the same input, the gated linear unit
of Dauphin et al. (2017),

.. math:: h = (W x + b) \\odot \\sigma(V x + c).

Both halves are computed by one ``Linear`` (``Conv2d``) layer with twice the outputs, split by
:func:`torch.nn.functional.glu`; this is the same map and the same default initialisation
(PyTorch's, which depends only on the fan-in) as two separate layers, with one matrix product.

The authors' code (``utils/nn.py`` of github.com/jmtomczak/vae_vampprior, classes
``GatedDense`` and ``GatedConv2d``) applies no activation to :math:`W x + b` by default, and its
MLPs are two gated layers of 300 units (``models/VAE.py``, ``models/HVAE_2level.py``); these
are the defaults here. That code draws every ``Linear`` weight from
:math:`\\mathcal N(0, 2 / \\text{fan-in})` (He initialisation); these modules keep PyTorch's
default initialisation.

References:

1. J. M. Tomczak, M. Welling. VAE with a VampPrior. AISTATS 2018, arXiv:1705.07120.
2. Y. N. Dauphin, A. Fan, M. Auli, D. Grangier. Language Modeling with Gated Convolutional
   Networks. ICML 2017, arXiv:1612.08083.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedConv2d", "GatedDense", "GatedMLP"]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class GatedDense(nn.Module):
    """A gated dense layer :math:`h = a(W x + b) \\odot \\sigma(V x + c)` (Tomczak & Welling
    2018, after Dauphin et al. 2017), with :math:`a` the identity unless ``activation`` is
    given.

    :param int input_dim: size :math:`d_{in}` of the input's last dimension.
    :param int output_dim: number :math:`d_{out}` of gated units.
    :param activation: optional elementwise function applied to :math:`W x + b` before gating
        (the authors' ``GatedDense(..., activation=None)`` default is the identity).
    :param device: where to create the parameters (default: torch's default device).
    :param dtype: dtype of the parameters (default: torch's default dtype).
    :raises ValueError: if ``input_dim`` or ``output_dim`` is not a positive int.

    ``forward(x)`` maps ``x`` of shape ``(..., input_dim)`` to shape ``(..., output_dim)``.

    Example::

        >>> layer = GatedDense(784, 300)
        >>> layer(torch.rand(5, 784)).shape
        torch.Size([5, 300])
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        activation: Callable[[Tensor], Tensor] | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.input_dim = _positive_int(input_dim, "input_dim")
        self.output_dim = _positive_int(output_dim, "output_dim")
        self.activation = activation
        # Rows [0, output_dim) give W x + b, rows [output_dim, 2 output_dim) the gate V x + c.
        self.linear = nn.Linear(input_dim, 2 * output_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1:] != (self.input_dim,):
            raise ValueError(f"x must have shape (..., {self.input_dim}), got {tuple(x.shape)}")
        hidden = self.linear(x)
        if self.activation is None:
            return F.glu(hidden, dim=-1)
        value, gate = hidden.chunk(2, dim=-1)
        return self.activation(value) * gate.sigmoid()

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, output_dim={self.output_dim}"


class GatedMLP(nn.Sequential):
    """A stack of :class:`GatedDense` layers, optionally followed by a plain ``Linear`` output
    layer: the MLP of the VampPrior paper's VAE and HVAE (two gated layers of 300 units).

    :param int input_dim: size of the input's last dimension.
    :param hidden_dims: widths of the gated layers, default ``(300, 300)`` (Tomczak & Welling
        2018, ``models/VAE.py`` of the authors' code). May be empty only if ``output_dim`` is
        given.
    :param output_dim: if given, a final ``nn.Linear(hidden_dims[-1], output_dim)`` without
        gate or activation (the authors' mean heads, for instance); otherwise the output is the
        last gated layer's.
    :param activation: passed to every :class:`GatedDense` (default: identity).
    :param device: where to create the parameters.
    :param dtype: dtype of the parameters.
    :raises ValueError: if a dimension is not a positive int, or if there would be no layer.

    ``forward(x)`` maps shape ``(..., input_dim)`` to ``(..., self.output_dim)``, where
    ``self.output_dim`` is ``output_dim`` if given, else ``hidden_dims[-1]``.

    Example::

        >>> mlp = GatedMLP(40, (300, 300), output_dim=784)
        >>> mlp(torch.randn(5, 40)).shape
        torch.Size([5, 784])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (300, 300),
        output_dim: int | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        _positive_int(input_dim, "input_dim")
        hidden_dims = tuple(hidden_dims)
        for width in hidden_dims:
            _positive_int(width, "hidden_dims entries")
        if output_dim is not None:
            _positive_int(output_dim, "output_dim")
        if not hidden_dims and output_dim is None:
            raise ValueError("hidden_dims must be non-empty when output_dim is None")
        widths = (input_dim, *hidden_dims)
        layers: list[nn.Module] = [
            GatedDense(width_in, width_out, activation, device=device, dtype=dtype)
            for width_in, width_out in zip(widths[:-1], widths[1:])
        ]
        if output_dim is not None:
            layers.append(nn.Linear(widths[-1], output_dim, device=device, dtype=dtype))
        super().__init__(*layers)
        self.input_dim = input_dim
        self.hidden_dims = hidden_dims
        self.output_dim = output_dim if output_dim is not None else hidden_dims[-1]


class GatedConv2d(nn.Module):
    """A gated convolution :math:`h = a(W * x + b) \\odot \\sigma(V * x + c)` (the authors'
    ``GatedConv2d``, the layer of their convolutional HVAE encoders), with :math:`a` the
    identity unless ``activation`` is given.

    The arguments ``in_channels, out_channels, kernel_size, stride, padding, dilation`` mean
    what they mean for :class:`torch.nn.Conv2d`; both convolutions share them.

    :param activation: optional elementwise function applied to :math:`W * x + b`.
    :param device: where to create the parameters.
    :param dtype: dtype of the parameters.
    :raises ValueError: if ``in_channels`` or ``out_channels`` is not a positive int.

    ``forward(x)`` maps ``(N, in_channels, H, W)`` to ``(N, out_channels, H', W')`` with
    ``H', W'`` as for ``nn.Conv2d``.

    Example::

        >>> conv = GatedConv2d(1, 32, 7, padding=3)
        >>> conv(torch.rand(5, 1, 28, 28)).shape
        torch.Size([5, 32, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        activation: Callable[[Tensor], Tensor] | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.activation = activation
        # Channels [0, out_channels) give W * x + b, the others the gate V * x + c.
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, kernel_size, stride, padding,
                              dilation, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.conv(x)
        if self.activation is None:
            return F.glu(hidden, dim=-3)
        value, gate = hidden.chunk(2, dim=-3)
        return self.activation(value) * gate.sigmoid()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"
