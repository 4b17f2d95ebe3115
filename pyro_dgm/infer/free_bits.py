"""The free-bits objective of Kingma et al. (2016): a KL floor per group of latent units, against
posterior collapse."""

from __future__ import annotations

import torch
from pyro.distributions import MaskedDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import is_identically_zero
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Distribution, Independent, kl_divergence

from pyro_dgm.infer.elbo import TraceAnalyticKL_ELBO, _score_function

__all__ = ["FreeBitsELBO"]


class FreeBitsELBO(TraceAnalyticKL_ELBO):
    """The ELBO with free bits (Kingma et al. 2016, appendix C.8): the KL of each group of
    latent units, averaged over the minibatch, counts as at least :math:`\\lambda` nats,

    .. math::

        \\widetilde{\\mathcal{L}} = \\mathbb{E}_q[\\log p(x \\mid z)]
        - \\sum_g \\max\\bigl(\\lambda, \\overline{\\mathrm{KL}}_g\\bigr), \\qquad
        \\overline{\\mathrm{KL}}_g = \\frac1B \\sum_{i=1}^B \\mathrm{KL}_g(x_i),

    written as :math:`\\mathcal{L} - \\sum_g \\max(0, \\lambda - \\overline{\\mathrm{KL}}_g)`
    (times the minibatch's weight: its size, the data plate's subsampling scale and the KL
    warm-up scale), where :math:`\\mathcal{L}` is
    :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO`'s estimate. Below the floor, a group's KL
    thus gets no gradient: the decoder can use those nats for free, and the encoder is not
    pushed to the prior (posterior collapse, which a strong decoder such as a PixelCNN
    otherwise drives to).

    Groups, for every latent family: a site whose posterior and prior are both ``Independent``
    over one dimension with a closed-form KL between their base distributions (diagonal
    Gaussians, also the lower level :math:`p(z_1 \\mid z_2)` of a hierarchical VAE) gives one
    group per unit (``per_unit=True``, the default); any other site (vMF, a learned prior, a
    flow posterior) is one group, its KL the closed form where registered, else
    :math:`\\log q(z) - \\log p(z)` at the guide's sample. Gradients of the penalty are
    unbiased for rejection-sampled sites as the ELBO's are: a KL that depends on guide samples
    (its own for the Monte Carlo form, the earlier levels' for a conditional prior) adds their
    score-function terms.

    **Effect on the bound.** :math:`\\max(\\lambda, \\overline{\\mathrm{KL}}) \\ge
    \\overline{\\mathrm{KL}}`, so the value never exceeds the ELBO and remains a lower bound
    on :math:`\\log p(x)` (a looser one, by :math:`\\sum_g \\max(0, \\lambda -
    \\overline{\\mathrm{KL}}_g)`), but it is not the ELBO: its maximiser differs, and the
    training objective reported with it is not the model's ELBO. Evaluate, validate and early
    stop with the true ELBO (:func:`~pyro_dgm.infer.dataset_elbo`,
    :func:`~pyro_dgm.infer.evaluate_dataset`), which the examples always do. With
    :math:`\\lambda = 0` the objective is the ELBO whenever no group's KL estimate is negative
    (always for closed forms).

    :param float free_bits: :math:`\\lambda \\ge 0`, nats per group.
    :param bool per_unit: one group per unit where the KL splits into units (see above);
        ``False``: one group per latent site.
    :param kwargs: as :class:`~pyro_dgm.infer.TraceAnalyticKL_ELBO` (``num_particles``,
        ``vectorize_particles``, ...).
    :raises ValueError: for a negative or non-finite ``free_bits``.

    Example::

        >>> elbo = FreeBitsELBO(free_bits=0.25)
        >>> loss = elbo.differentiable_loss(vae.model, vae.guide, x)

    Reference: D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling,
    "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
    """

    def __init__(self, free_bits: float, *, per_unit: bool = True, **kwargs) -> None:
        if not (isinstance(free_bits, (int, float)) and 0 <= free_bits < float("inf")):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}")
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)
        self.per_unit = per_unit

    def _particle_elbo(self, model_trace, guide_trace) -> Tensor:
        elbo = super()._particle_elbo(model_trace, guide_trace)
        penalty = self._penalty(model_trace, guide_trace)
        return elbo if penalty is None else elbo - penalty

    def _penalty(self, model_trace, guide_trace) -> Tensor | None:
        guide_sites = [site for site in guide_trace.nodes.values()
                       if site["type"] == "sample" and not site_is_subsample(site)]
        scores = [(site["name"], _score_function(site)) for site in guide_sites]
        position = {name: index for index, (name, _) in enumerate(scores)}
        penalty = None
        for name, model_site in model_trace.nodes.items():
            if (model_site["type"] != "sample" or model_site["is_observed"]
                    or site_is_subsample(model_site) or name not in position):
                continue
            guide_site = guide_trace.nodes[name]
            kl, by_unit, monte_carlo = self._group_kl(guide_site, model_site)
            # score terms of the samples this KL depends on: zero-valued, unbiased gradient
            last = position[name] + (1 if monte_carlo else 0)
            surrogate = kl
            for _, score in scores[:last]:
                if is_identically_zero(score):
                    continue
                score = score - score.detach()
                if by_unit:
                    score = score.unsqueeze(-1)
                surrogate = surrogate + kl.detach() * score
            units = surrogate.shape[-1] if by_unit else 1
            flat = surrogate.reshape(-1, units)
            scale = guide_site["scale"]
            weight = (torch.as_tensor(scale, dtype=kl.dtype, device=kl.device)
                      .expand(kl.shape[:kl.dim() - (1 if by_unit else 0)]).sum())
            term = (self.free_bits - flat.mean(0)).clamp(min=0).sum() * weight
            penalty = term if penalty is None else penalty + term
        return penalty

    def _group_kl(self, guide_site: dict, model_site: dict) -> tuple[Tensor, bool, bool]:
        """``(kl, by_unit, monte_carlo)``: the site's KL per data point, shape ``batch +
        (units,)`` when ``by_unit``, else ``batch``."""
        q, p = guide_site["fn"], model_site["fn"]
        if self.per_unit:
            q_base, p_base = _unit_base(q), _unit_base(p)
            if q_base is not None and p_base is not None:
                try:
                    kl = kl_divergence(q_base, p_base)
                except NotImplementedError:
                    pass
                else:
                    shape = guide_site["value"].shape
                    return kl.expand(shape), True, False
        try:
            return kl_divergence(q, p), False, False
        except NotImplementedError:
            pass
        log_q = guide_site.get("unscaled_log_prob")
        if log_q is None:
            log_q = q.log_prob(guide_site["value"])
        return log_q - p.log_prob(model_site["value"]), False, True


def _unit_base(fn: Distribution) -> Distribution | None:
    """The base of an ``Independent`` over one dimension (seen through expansion and masks),
    whose KL splits into units; else None."""
    while isinstance(fn, (ExpandedDistribution, MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1:
        return fn.base_dist
    return None
