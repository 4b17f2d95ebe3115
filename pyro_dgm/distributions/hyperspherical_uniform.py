"""The uniform distribution on the unit hypersphere."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

__all__ = ["HypersphericalUniform", "log_sphere_surface_area"]


def log_sphere_surface_area(dim: int) -> float:
    """:math:`\\log |S^{m-1}| = \\log\\left(2 \\pi^{m/2} / \\Gamma(m/2)\\right)`, in nats.

    :param dim: the ambient dimension :math:`m \\ge 1` of the sphere :math:`S^{m-1} \\subset
        \\mathbb{R}^m`.
    """
    return math.log(2) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


class HypersphericalUniform(TorchDistribution):
    """Uniform distribution on the unit sphere :math:`S^{m-1} = \\{z \\in \\mathbb{R}^m :
    \\|z\\| = 1\\}`, the S-VAE's prior.

    ``dim`` is the **ambient** dimension :math:`m` (the event shape is ``(m,)``), as for
    :class:`~pyro_dgm.distributions.VonMisesFisher`; the S-VAE reference code passes the
    manifold dimension :math:`m - 1` instead.

    .. math:: p(z) = 1 / |S^{m-1}|, \\qquad |S^{m-1}| = 2 \\pi^{m/2} / \\Gamma(m/2).

    Samples are normalized standard normal vectors.

    :param int dim: ambient dimension :math:`m \\ge 2`.
    :param batch_shape: batch shape, default ``()``.
    :param dtype: floating-point dtype of samples and densities (default: torch's default).
    :param device: device of samples and densities (default: CPU).
    :param validate_args: whether ``log_prob`` checks that its argument lies on the sphere.
    :raises ValueError: if ``dim`` is not an integer of at least 2.

    Example::

        >>> prior = HypersphericalUniform(3).expand([64])
        >>> prior.sample().shape
        torch.Size([64, 3])
    """

    arg_constraints: dict = {}
    support = constraints.sphere
    has_rsample = True

    def __init__(
        self,
        dim: int,
        batch_shape: torch.Size | tuple[int, ...] = torch.Size(),
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ) -> None:
        _check_dim(dim)
        self.dim = dim
        # A 0-dim tensor that carries dtype and device, as distribution parameters would; filled
        # on the device (torch.full), not copied from the host, as it is built every step.
        self._log_normalizer = torch.full(
            (), -log_sphere_surface_area(dim), dtype=dtype or torch.get_default_dtype(),
            device=device,
        )
        super().__init__(torch.Size(batch_shape), torch.Size([dim]), validate_args=validate_args)

    @property
    def dtype(self) -> torch.dtype:
        return self._log_normalizer.dtype

    @property
    def device(self) -> torch.device:
        return self._log_normalizer.device

    @staticmethod
    def infer_shapes(dim: int, batch_shape: torch.Size | tuple[int, ...] = ()):
        """``(batch_shape, event_shape)`` of ``HypersphericalUniform(dim, batch_shape)``.

        Unlike distributions with tensor parameters, whose ``infer_shapes`` takes the
        parameters' shapes, this takes the constructor's own arguments: the event shape
        ``(dim,)`` depends on the integer ``dim`` itself.

        :raises ValueError: if ``dim`` is not an integer of at least 2.
        """
        _check_dim(dim)
        return torch.Size(batch_shape), torch.Size([dim])

    def expand(self, batch_shape, _instance=None) -> HypersphericalUniform:
        """As :meth:`torch.Tensor.expand` of the batch shape: only singleton dimensions grow,
        and new dimensions are added on the left.

        :raises RuntimeError: if ``batch_shape`` is not such an expansion of
            :attr:`batch_shape` (as torch's distributions raise it).
        """
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape and _instance is None:
            return self  # immutable (Pyro's plates expand every site to its own shape)
        _check_expansion(self.batch_shape, batch_shape)
        new = self._get_checked_instance(HypersphericalUniform, _instance)
        new.dim = self.dim
        new._log_normalizer = self._log_normalizer
        super(HypersphericalUniform, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        normal = torch.randn(shape, dtype=self.dtype, device=self.device)
        return normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True)

    def log_prob(self, value: Tensor) -> Tensor:
        """:math:`-\\log |S^{m-1}|` for every ``value`` on the sphere; shape
        ``broadcast(value.shape[:-1], batch_shape)``, in nats."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return self._log_normalizer.expand(shape)

    def entropy(self) -> Tensor:
        return (-self._log_normalizer).expand(self.batch_shape)

    @property
    def mean(self) -> Tensor:
        return self._log_normalizer.new_zeros(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> Tensor:
        """:math:`1/m` per coordinate; shape ``batch_shape + (m,)``."""
        return self._log_normalizer.new_full(self.batch_shape + self.event_shape, 1 / self.dim)

    @property
    def covariance_matrix(self) -> Tensor:
        """:math:`I / m`; shape ``batch_shape + (m, m)``."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device) / self.dim
        return eye.expand(self.batch_shape + eye.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim: {self.dim}, batch_shape: {self.batch_shape})"


def _check_dim(dim: object) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (the ambient dimension), got {dim!r}")


def _check_expansion(old: torch.Size, new: torch.Size) -> None:
    """Raise as :meth:`torch.Tensor.expand` would for a tensor of shape ``old`` expanded to
    ``new``, without creating one."""
    if len(new) < len(old) or any(
        size != 1 and size != target for size, target in zip(old, new[len(new) - len(old):])
    ):
        raise RuntimeError(
            f"cannot expand batch shape {tuple(old)} to {tuple(new)}: only dimensions of size 1 "
            "can grow, and new dimensions are added on the left"
        )
