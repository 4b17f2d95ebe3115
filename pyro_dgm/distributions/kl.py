"""Closed-form KL divergences for the hyperspherical distributions, registered with torch."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import register_kl

from pyro_dgm._fused import cache_forward_signature, needs_reference
from pyro_dgm.distributions.hyperspherical_uniform import HypersphericalUniform
from pyro_dgm.distributions.von_mises_fisher import VonMisesFisher
from pyro_dgm.special import _bessel_parts, _reference_parts

__all__: list[str] = []


@cache_forward_signature
class _KLToUniform(torch.autograd.Function):
    """KL(vMF(mu, kappa) || U(S^{m-1})) = kappa A - log 0F1 for parameters below float64 (the
    training hot path), from kappa and the float64 ``log_normalized`` = log 0F1(; m/2;
    kappa^2/4) and ``ratio`` = A_m(kappa) already evaluated (no gradient), returned in kappa's
    dtype, with the hand-written derivative, in float64,

        d KL / d kappa = A + kappa A' - A = kappa (1 - A^2) - (m - 1) A

    (A' = 1 - A^2 - (m - 1) A / kappa), which is 0 at kappa = 0 and divides by nothing: one
    node where autograd's graph of the formula and of the Bessel function took six. A backward
    pass that finds grad mode on (a derivative of the gradient is being taken) returns
    kappa A'(kappa) with A' from :func:`pyro_dgm.special._bessel_parts`, differentiable to any
    order. Its plain-torch reference is :func:`_kl_to_uniform_reference`.
    """

    @staticmethod
    def forward(concentration: Tensor, log_normalized: Tensor, ratio: Tensor, dim: int):
        # float32 kappa times the float64 ratio promotes inside the multiplication
        return (concentration * ratio - log_normalized).to(concentration.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        concentration, _, ratio, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(concentration, ratio)

    @staticmethod
    def backward(ctx, grad: Tensor):
        concentration, ratio = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if torch.is_grad_enabled():
            (slope,) = _bessel_parts(0.5 * ctx.dim - 1, concentration, ("slope",))
            return grad * concentration * slope, None, None, None
        kappa_ratio = concentration * ratio  # float64
        slope = torch.addcmul(concentration, kappa_ratio, ratio, value=-1)
        slope.sub_(ratio, alpha=ctx.dim - 1)
        return (grad * slope).to(grad.dtype), None, None, None


def _kl_to_uniform_reference(concentration: Tensor, dim: int) -> Tensor:
    """Plain-torch reference of :class:`_KLToUniform` (and the path under ``torch.func``
    transforms): KL = -(log 0F1 - kappa A_m), the ``"intercept"`` of
    :func:`pyro_dgm.special._reference_parts`, differentiated by autograd; in kappa's
    dtype."""
    parts = _reference_parts(0.5 * dim - 1, concentration, frozenset({"intercept"}))
    return (-parts["intercept"]).to(concentration.dtype)


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
    exactly 0 at kappa = 0 and smooth there, differentiable in kappa to any order. Float64
    parameters take -(log 0F1 - kappa A_m) evaluated without cancellation (about 1e-14
    relative up to kappa = 1e6, its derivative kappa A_m' to about 1e-13); lower precisions
    take :class:`_KLToUniform`, computed in float64 so that the two terms, each about kappa,
    do not cancel catastrophically in float32. Under ``torch.func`` transforms, the reference.
    """
    _check_same_sphere(p, q)
    concentration = p.concentration
    if needs_reference(concentration):
        kl = _kl_to_uniform_reference(concentration, p.event_shape[0])
    elif concentration.dtype == torch.float64:
        (intercept,) = p._scaled_bessel(("intercept",))  # derivative -kappa A_m'
        kl = -intercept
    else:
        log_normalized, ratio = p._bessel_values  # no graph: _KLToUniform has the derivative
        kl = _KLToUniform.apply(concentration, log_normalized, ratio, p.event_shape[0])
    if q.batch_shape == p.batch_shape:
        return kl
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@register_kl(VonMisesFisher, VonMisesFisher)
def _kl_von_mises_fisher_von_mises_fisher(p: VonMisesFisher, q: VonMisesFisher) -> Tensor:
    """KL(vMF(mu_p, kappa_p) || vMF(mu_q, kappa_q))
    = A_m(kappa_p) (kappa_p - kappa_q mu_p^T mu_q) - log 0F1(kappa_p) + log 0F1(kappa_q),

    computed in float64 as

        (log 0F1(kappa_q) - kappa_q) - (log 0F1(kappa_p) - kappa_p A_m(kappa_p))
        + kappa_q ((1 - A_m(kappa_p)) + A_m(kappa_p) |mu_p - mu_q|^2 / 2)

    (1 - mu_p^T mu_q = |mu_p - mu_q|^2 / 2 on the sphere), in which no two terms of size kappa
    cancel and whose derivative in kappa_p, A_m'(kappa_p) (kappa_p - kappa_q mu_p^T mu_q), is
    not formed as a difference of terms of size A_m; differentiable to any order.
    """
    _check_same_sphere(p, q)
    complement_p, intercept_p = p._scaled_bessel(("complement", "intercept"))
    (scaled_q,) = q._scaled_bessel(("scaled",))
    distance = (p.loc.double() - q.loc.double()).square().sum(-1)
    kl = scaled_q - intercept_p + q.concentration.double() * (
        complement_p + (1 - complement_p) * (0.5 * distance)
    )
    return kl.to(torch.promote_types(p.loc.dtype, q.loc.dtype))
