"""The ELBO with closed-form KL terms, correct for partially reparameterized guides."""

from __future__ import annotations

import pyro.poutine as poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.util import (
    MultiFrameTensor,
    get_plate_stacks,
    is_validation_enabled,
    torch_item,
)
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import (
    check_if_enumerated,
    check_model_guide_match,
    check_site_shape,
    warn_if_nan,
)
from torch import Tensor
from torch.distributions import kl_divergence

from pyro_dgm.distributions.scoring import score_function_of, score_parts_of

__all__ = ["TraceAnalyticKL_ELBO"]


class TraceAnalyticKL_ELBO(Trace_ELBO):
    """ELBO that uses the closed-form :math:`\\mathrm{KL}(q(z) \\| p(z))` of every latent site
    where one is registered, with unbiased gradients for rejection-sampled guides.

    .. math::

        \\mathcal{L} = \\mathbb{E}_{q}[\\log p(x \\mid z)] - \\mathrm{KL}(q(z \\mid x) \\| p(z)).

    This is the S-VAE paper's objective. Pyro's ``TraceMeanField_ELBO`` computes the same value
    but refuses (under validation) or silently mishandles (without it) a partially
    reparameterized site such as :class:`~pyro_dgm.distributions.VonMisesFisher`: the
    reconstruction term :math:`\\mathbb{E}_q[\\log p(x \\mid z)]` of such a site needs the
    correction term of Naesseth et al. (2017) besides the pathwise gradient. Here every guide
    site whose score parts carry a score function adds
    :math:`\\mathrm{cost} \\cdot \\nabla \\mathrm{score}`, where the cost is

    * every Monte Carlo term in the site's plates (log-likelihoods of observed sites, and
      :math:`\\log p - \\log q` of latent sites without a closed-form KL), Rao-Blackwellized
      by plates as in ``Trace_ELBO``, and
    * :math:`-\\mathrm{KL}` of every latent site with a closed-form KL that the guide samples
      **after** it: such a KL is a function of the earlier samples (in a hierarchical VAE,
      :math:`\\mathrm{KL}(q(z_1 \\mid x, z_2) \\| p(z_1 \\mid z_2))` is a function of
      :math:`z_2`), so its expectation's gradient needs the earlier sites' correction terms.

    So the gradients equal ``Trace_ELBO``'s in expectation for every model/guide dependency
    structure. The closed form replaces the Monte Carlo term of a site only when the model
    samples no latent before it that the guide samples after it (the mean-field condition,
    judged by the order of the sample statements); otherwise that site falls back to the
    Monte Carlo KL. A one-latent VAE pays nothing for this. Score parts are taken through
    Pyro's ``Independent`` and ``MaskedDistribution``, which would drop them
    (:func:`~pyro_dgm.distributions.scoring.score_parts_of`). The score terms are
    zero-valued, so :meth:`differentiable_loss` is exactly the negative ELBO estimate, and it
    makes no host synchronisation.

    Which estimator when:

    * this one: the paper's objective, lowest variance when KLs are closed-form
      (Normal-Normal, vMF-uniform, vMF-vMF);
    * ``pyro.infer.Trace_ELBO``: any model, Monte Carlo KL, also unbiased with
      ``VonMisesFisher`` (it uses ``score_parts`` too, but not through Pyro's ``Independent``:
      use ``.to_event``), and its ``differentiable_loss`` reads the loss on the host every
      step;
    * with a learned prior (no closed form), this class falls back to the Monte Carlo KL per
      site automatically.

    Subsampling scales (``pyro.plate(..., subsample=...)``) and ``poutine.scale`` (KL warm-up)
    apply to the KL terms as to log-densities.

    :param num_particles: number of samples per data point; ``vectorize_particles=True`` draws
        them in one pass under an extra plate.
    """

    def _get_trace(self, model, guide, args, kwargs):
        """The guide's trace and the model's replayed against it, as bare traces:
        :meth:`_particle_elbo` computes only the log-densities it uses (none for a latent site
        whose KL is analytic, nor a score for a fully reparameterized one; in a VAE, the
        prior's and the posterior's log-densities are never evaluated), and its score parts
        see through Pyro's wrappers (:func:`~pyro_dgm.distributions.scoring.score_parts_of`).
        With Pyro's validation on, Pyro's checks run as in ``Trace_ELBO`` (model and guide
        match, site shapes, no enumeration)."""
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
            for site in guide_trace.nodes.values():  # Pyro's score parts may drop a score
                if site["type"] == "sample":
                    site.pop("score_parts", None)
            return model_trace, guide_trace
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(model, trace=guide_trace), graph_type="flat"
        ).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            guide_trace = prune_subsample_sites(guide_trace)
            model_trace = prune_subsample_sites(model_trace)
            model_trace.compute_log_prob()  # the shape checks read every log-density
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    _score_parts(site)
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _particle_elbo(self, model_trace, guide_trace) -> Tensor:
        terms = _Sum()  # the ELBO estimate, term by term
        cost = MultiFrameTensor()  # detached terms that multiply every score function
        stacks = get_plate_stacks(model_trace)
        guide_sites = [
            site for site in guide_trace.nodes.values()
            if site["type"] == "sample" and not site_is_subsample(site)
        ]
        # With several latent sites, an analytic KL may depend on guide samples drawn before
        # its own: it then joins the cost of their score functions (kl_costs), and if the
        # model's prior of the site may depend on a sample the guide draws after it (the
        # mean-field condition fails), the site falls back to the Monte Carlo KL.
        order = _guide_order(guide_sites) if len(guide_sites) > 1 else None
        kl_costs = []  # (guide position, plate stack, -KL detached)
        model_latents_so_far = []
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample" or site_is_subsample(model_site):
                continue
            if model_site["is_observed"]:
                log_prob = _log_prob(model_site)
                terms.add(model_site["log_prob_sum"])
                cost.add((stacks[name], log_prob.detach()))
                continue
            guide_site = guide_trace.nodes[name]
            kl = None
            if order is None or _mean_field_holds(name, model_latents_so_far, order):
                kl = _analytic_kl(guide_site, model_site)
            model_latents_so_far.append(name)
            if kl is not None:
                terms.subtract(kl.sum())
                if order is not None and order[name] > 0:
                    kl_costs.append((order[name], stacks[name], kl.detach().neg()))
                continue
            guide_log_prob = _score_parts(guide_site).log_prob
            entropy_term = guide_site["score_parts"].entropy_term
            if is_identically_zero(entropy_term):  # not reparameterized: value only
                entropy_term = guide_log_prob.detach()
            log_prob = _log_prob(model_site)
            terms.add(model_site["log_prob_sum"])
            terms.subtract(entropy_term.sum())
            cost.add((stacks[name], (log_prob - guide_log_prob).detach()))

        for guide_site in guide_sites:
            if guide_site["name"] in model_trace.nodes:
                continue
            # auxiliary guide sites: -log q, Monte Carlo
            parts = _score_parts(guide_site)
            terms.subtract(parts.entropy_term.sum())
            frames = [f for f in guide_site["cond_indep_stack"] if f.vectorized]
            cost.add((frames, -parts.log_prob.detach()))

        for guide_site in guide_sites:
            score = _score_function(guide_site)
            if is_identically_zero(score):
                continue
            site_cost = cost
            if kl_costs:  # the analytic KLs of the sites drawn after this one in the guide
                position = order[guide_site["name"]]
                site_cost = MultiFrameTensor(*cost.items())
                site_cost.add(*((s, kl) for after, s, kl in kl_costs if after > position))
            downstream = site_cost.sum_to(guide_site["cond_indep_stack"])
            # zero-valued: contributes the gradient cost * d score, nothing to the value
            terms.add((downstream * (score - score.detach())).sum())
        return terms.total

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative ELBO estimate (nats, summed over the data in the plates, scaled by
        subsampling), differentiable with unbiased gradients; no host synchronisation."""
        elbo = _Sum()
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo.add(self._particle_elbo(model_trace, guide_trace))
        if self.num_particles == 1:
            return -elbo.total
        return elbo.total / -self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative ELBO estimate as a Python float."""
        loss = torch_item(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backpropagates the negative ELBO estimate and returns it as a float (for ``SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss


def _guide_order(guide_sites: list[dict]) -> dict[str, int]:
    """Each guide sample site's position in the guide's order of execution."""
    return {site["name"]: position for position, site in enumerate(guide_sites)}


def _mean_field_holds(name: str, model_latents_before: list[str], order: dict[str, int]) -> bool:
    """Whether the model's prior of latent ``name`` can depend only on samples the guide drew
    before it: every latent the model sampled earlier was drawn earlier by the guide too. (By
    order alone; then KL(q || p) of the site is a function of those earlier samples, and the
    analytic KL is exact.)"""
    position = order.get(name)
    return position is not None and all(
        order.get(other, -1) < position for other in model_latents_before
    )


def _analytic_kl(guide_site: dict, model_site: dict) -> Tensor | None:
    """Scaled and masked KL(q || p) of one latent site, or None if no closed form exists."""
    try:
        kl = kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    return scale_and_mask(kl, guide_site["scale"], guide_site["mask"])


class _Sum:
    """A running sum of tensors that starts from its first term (not from 0.0, which would
    cost an operation and a graph node)."""

    def __init__(self) -> None:
        self.total: Tensor | float = 0.0

    def add(self, term: Tensor) -> None:
        self.total = term if isinstance(self.total, float) else self.total + term

    def subtract(self, term: Tensor) -> None:
        self.total = -term if isinstance(self.total, float) else self.total - term


def _log_prob(site: dict) -> Tensor:
    """A trace site's scaled and masked log-density, computed once and kept in the site as
    ``Trace.compute_log_prob`` keeps it (``log_prob``, ``log_prob_sum``)."""
    if "log_prob" not in site:
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["unscaled_log_prob"] = log_prob
        site["log_prob"] = scale_and_mask(log_prob, site["scale"], site["mask"])
        site["log_prob_sum"] = site["log_prob"].sum()
    return site["log_prob"]


def _score_parts(site: dict) -> ScoreParts:
    """A guide site's scaled and masked score parts, computed once and kept in the site as
    ``Trace.compute_score_parts`` keeps them."""
    if "score_parts" not in site:
        parts = score_parts_of(site["fn"], site["value"])
        site["unscaled_log_prob"] = parts.log_prob
        site["score_parts"] = parts = parts.scale_and_mask(site["scale"], site["mask"])
        site["log_prob"] = parts.log_prob
        site["log_prob_sum"] = parts.log_prob.sum()
    return site["score_parts"]


def _score_function(site: dict) -> Tensor | int:
    """A guide site's score function (not scaled: Pyro scales the cost it multiplies), without
    its log-density where the distribution can give it alone (a ``score_function(value)``
    method, as :class:`~pyro_dgm.distributions.VonMisesFisher` has); 0 for a reparameterized
    distribution with the default ``score_parts`` (whose score function is 0)."""
    if "score_parts" in site:
        return site["score_parts"].score_function
    return score_function_of(site["fn"], site["value"])
