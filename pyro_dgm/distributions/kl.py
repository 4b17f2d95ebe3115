"""Closed-form KL divergences for the hyperspherical distributions, registered with torch."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import register_kl

from pyro_dgm.distributions.hyperspherical_uniform import HypersphericalUniform
from pyro_dgm.distributions.von_mises_fisher import VonMisesFisher

__all__: list[str] = []


class _KLToUniform(torch.autograd.Function):
    """KL(vMF(mu, kappa) || U(S^{m-1})) = kappa A - log 0F1 from kappa (any dtype) and the
    float64 ``log_normalized`` = log 0F1(; m/2; kappa^2/4) and ``ratio`` = A_m(kappa), returned
    in kappa's dtype, with the hand-written derivative, in float64,

        d KL / d kappa = A + kappa A' - A = kappa (1 - A^2) - (m - 1) A

    (A' = 1 - A^2 - (m - 1) A / kappa), which is 0 at kappa = 0 and divides by nothing: one
    node where autograd's graph of the formula and of the Bessel function took six. The Bessel
    terms get no gradient from here (their derivatives are in the formula). Not itself
    differentiable.
    """

    @staticmethod
    def forward(ctx, concentration: Tensor, log_normalized: Tensor, ratio: Tensor, dim: int):
        kappa = concentration.double()
        ctx.dim = dim
        ctx.save_for_backward(kappa, ratio)
        return (kappa * ratio - log_normalized).to(concentration.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        kappa, ratio = ctx.saved_tensors
        slope = torch.addcmul(kappa, kappa * ratio, ratio, value=-1)
        slope.sub_(ratio, alpha=ctx.dim - 1)
        return (grad * slope).to(grad.dtype), None, None, None


def _check_same_sphere(p, q) -> None:
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"KL divergence between distributions on different spheres: event shapes "
            f"{tuple(p.event_shape)} and {tuple(q.event_shape)}"
        )


@register_kl(VonMisesFisher, HypersphericalUniform)
def _kl_von_mises_fisher_uniform(p: VonMisesFisher, q: HypersphericalUniform) -> Tensor:
    """KL(vMF(mu, kappa) || U(S^{m-1})) = kappa A_m(kappa) - log 0F1(; m/2; kappa^2/4).

    Davidson et al. (2018), with log C_m written through the normalized Bessel function:
    exactly 0 at kappa = 0 and smooth there. Computed in float64 so that the two terms, each
    about kappa, do not cancel catastrophically for large kappa in float32 (see
    :class:`_KLToUniform`).
    """
    _check_same_sphere(p, q)
    log_normalized, ratio = p._bessel_values  # no graph: _KLToUniform has the derivative
    kl = _KLToUniform.apply(p.concentration, log_normalized, ratio, p.event_shape[0])
    if q.batch_shape == p.batch_shape:
        return kl
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@register_kl(VonMisesFisher, VonMisesFisher)
def _kl_von_mises_fisher_von_mises_fisher(p: VonMisesFisher, q: VonMisesFisher) -> Tensor:
    """KL(vMF(mu_p, kappa_p) || vMF(mu_q, kappa_q))
    = A_m(kappa_p) (kappa_p - kappa_q mu_p^T mu_q) - log 0F1(kappa_p) + log 0F1(kappa_q)."""
    _check_same_sphere(p, q)
    log_normalized_p, ratio_p = p._bessel_terms
    log_normalized_q, _ = q._bessel_terms
    cosine = (p.loc.double() * q.loc.double()).sum(-1)
    kl = (
        ratio_p * (p.concentration.double() - q.concentration.double() * cosine)
        - log_normalized_p
        + log_normalized_q
    )
    return kl.to(torch.promote_types(p.loc.dtype, q.loc.dtype))
