"""The importance-weighted ELBO (IWAE bound) per data point, for every latent family we ship."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan
from torch import Tensor

from pyro_dgm.distributions.scoring import score_parts_of
from pyro_dgm.infer._sites import (
    guess_max_plate_nesting,
    per_data_point,
    plate_subsample_scale,
)

__all__ = ["ImportanceWeightedELBO", "RenyiELBO"]

_GRADIENTS = ("reparam", "stl", "dreg")


class RenyiELBO(ELBO):
    """The Rényi bound of Li & Turner (2016) per data point, of which the importance-weighted
    bound of Burda, Grosse & Salakhutdinov (2016) is the case :math:`\\alpha = 0`; a drop-in
    for Pyro's ``RenyiELBO`` (the same arguments in the same order), that also accepts
    partially reparameterized sites and scales subsampled data correctly:
    ``SVI(model, guide, optim, loss=RenyiELBO(alpha=0.5, num_particles=K))``.

    .. math::

        \\mathcal{L}_{\\alpha,K}(x_i) = \\frac{1}{1 - \\alpha}
        \\log \\frac{1}{K} \\sum_{k=1}^K w_{k,i}^{1 - \\alpha}, \\qquad
        0 \\le \\alpha < 1,

    decreasing in :math:`\\alpha`, tending to the ELBO :math:`\\frac1K \\sum_k \\log
    w_{k,i}` as :math:`\\alpha \\to 1`, and for :math:`\\alpha = 0` the IWAE bound

    .. math::

        \\mathcal{L}_K(x_i) = \\log \\frac{1}{K} \\sum_{k=1}^K w_{k,i}, \\qquad
        \\log w_{k,i} = \\log p(x_i, z_{k,i}) - \\log q(z_{k,i} \\mid x_i), \\qquad
        z_{k,i} \\sim q(z \\mid x_i),

    with :math:`\\mathcal{L}_1 = \\mathrm{ELBO} \\le \\mathcal{L}_K \\le \\mathcal{L}_{K+1}
    \\le \\log p(x_i)`. The objective is :math:`\\sum_i s\\, \\mathcal{L}_K(x_i)`, where
    :math:`s` is the subsampling scale ``size / subsample_size`` of the data plate, applied
    **after** the log-sum-exp (Pyro's ``RenyiELBO`` applies it inside, which is a different,
    wrong bound under ``pyro.plate(..., subsample_size=...)``). Any other scale of a site, such
    as ``poutine.scale(beta)`` for KL warm-up, multiplies its log-density inside
    :math:`\\log w` (the warm-up bound :math:`\\log \\frac1K \\sum_k p(x \\mid z_k)
    (p(z_k) / q(z_k \\mid x))^\\beta`). The :math:`K` particles are drawn in one vectorized
    pass under an extra plate on the left of the model's plates.

    **Global latents.** A sample site outside the plate named ``data_plate`` is shared by the
    whole batch, so the batch has one weight per particle, as in Pyro's ``RenyiELBO``:
    :math:`\\log w_k = \\sum_i \\log w_{k,i} + \\log p(\\beta_k) - \\log q(\\beta_k)` for the
    global sites :math:`\\beta`, with every scale (subsampling included) inside the weight, and
    the bound is that of the batch (``bound`` then returns one value, shape ``(1,)``).

    For :math:`K = 1` the value and, for fully or partially reparameterized guides with one
    data plate, the gradient equal those of Pyro's ``Trace_ELBO`` on the same samples.

    **Gradients** (``gradient``):

    * ``"reparam"`` (default): the pathwise gradient of :math:`\\mathcal{L}_K`, plus, for every
      guide site whose ``score_parts`` carries a score function (a rejection sampler such as
      :class:`~pyro_dgm.distributions.VonMisesFisher`, whose gradient is partially
      reparameterized, or a discrete site), the score-function term
      :math:`\\sum_k (\\mathcal{L} - b_k) \\nabla \\log \\pi(\\varepsilon_k)` with the
      leave-one-out baseline of VIMCO (Mnih & Rezende 2016): :math:`b_k` is the bound with
      :math:`w_k` replaced by :math:`\\hat w_{-k}`, :math:`\\hat w_{-k}`
      the geometric mean of the other weights; :math:`b_k` does not depend on particle
      :math:`k`, so the estimate stays unbiased (no baseline when :math:`K = 1`). Pyro's
      ``RenyiELBO`` raises ``NotImplementedError`` on such sites.
    * ``"stl"``: sticking the landing (Roeder, Wu & Duvenaud 2017): the score term
      :math:`\\sum_k \\tilde w_k \\partial \\log q_\\phi(z_k) / \\partial \\phi` at fixed
      :math:`z_k` is dropped, which removes the guide gradient's variance at the exact
      posterior. It is unbiased for :math:`K = 1` only, where the dropped term has expectation
      zero; for :math:`K > 1` the normalized weights make its expectation non-zero and the
      estimate is biased (Tucker et al. 2019, section 3; ``tests/test_iwae.py`` measures the
      bias at :math:`K = 20`). ``"dreg"`` is the unbiased estimator with the same property.
    * ``"dreg"``: doubly reparameterized gradients (Tucker, Lawson, Gu & Maddison 2019): the
      guide's parameters get :math:`\\sum_k \\tilde w_k^2 \\,\\partial \\log w_k / \\partial
      z_k \\cdot \\partial z_k / \\partial \\phi` (:math:`\\tilde w` the normalized weights, the
      log-density of :math:`q` differentiated through :math:`z` only), the model's parameters the
      usual :math:`\\sum_k \\tilde w_k \\nabla_\\theta \\log w_k`; the guide's
      signal-to-noise ratio no longer decays as :math:`K` grows.

    ``"stl"`` and ``"dreg"`` need fully reparameterized guide sites and their ``log_prob`` at a
    value detached from the graph (for a flow posterior: an invertible flow); otherwise they
    raise ``ValueError``; ``"dreg"`` is the estimator of the IWAE bound and needs
    :math:`\\alpha = 0`. ``"dreg"`` implements the model/guide split by scaling the gradient
    that reaches each guide sample from the model by :math:`\\tilde w_k` (a hook on a copy of
    the sample that only the model sees), so it holds for guides with several latent sites,
    dependent or not.

    :param float alpha: :math:`\\alpha \\in [0, 1)`.
    :param int num_particles: :math:`K \\ge 1`, importance samples per data point.
    :param max_plate_nesting: the model's plate nesting; guessed by one run if not given
        (``float("inf")``, Pyro's default, also means: guess).
    :param max_iarange_nesting: Pyro's deprecated name of ``max_plate_nesting``.
    :param bool vectorize_particles: accepted for Pyro's signature; the particles are always
        drawn in one vectorized pass.
    :param bool strict_enumeration_warning: accepted for Pyro's signature (no enumeration
        here).
    :param str gradient: ``"reparam"``, ``"stl"`` or ``"dreg"`` (keyword only).
    :param str data_plate: name of the plate over data points (keyword only).
    :raises ValueError: for ``alpha`` outside :math:`[0, 1)`, ``num_particles < 1``, an unknown
        ``gradient`` or ``"dreg"`` with :math:`\\alpha \\ne 0`; when the loss is computed, for
        ``"stl"``/``"dreg"`` with a site that is not fully reparameterized or has no
        ``log_prob`` at a detached value.

    References: Y. Li, R. E. Turner, "Rényi Divergence Variational Inference", NeurIPS 2016;
    Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders",
    ICLR 2016; A. Mnih, D. J. Rezende, "Variational inference for Monte Carlo objectives",
    ICML 2016; C. A. Naesseth et al., "Reparameterization Gradients through
    Acceptance-Rejection Sampling Algorithms", AISTATS 2017; G. Roeder, Y. Wu, D. Duvenaud,
    "Sticking the Landing", NeurIPS 2017; G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly
    Reparameterized Gradient Estimators for Monte Carlo Objectives", ICLR 2019.

    Example::

        >>> vae = VAE("vmf", latent_dim=10)
        >>> renyi = RenyiELBO(alpha=0.5, num_particles=5)
        >>> x = torch.bernoulli(torch.full((64, 784), 0.3))
        >>> renyi.bound(vae.model, vae.guide, x).shape
        torch.Size([64])
    """

    def __init__(
        self,
        alpha: float = 0,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        max_iarange_nesting: int | None = None,
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        *,
        gradient: str = "reparam",
        data_plate: str = "data",
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha < 1:
            raise ValueError(f"alpha must be a number in [0, 1), got {alpha!r}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if gradient not in _GRADIENTS:
            raise ValueError(f"gradient must be one of {_GRADIENTS}, got {gradient!r}")
        if gradient == "dreg" and alpha != 0:
            raise ValueError(f"gradient='dreg' is the IWAE bound's (alpha = 0), got alpha={alpha}")
        if max_iarange_nesting is not None:
            max_plate_nesting = max_iarange_nesting
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
            # the particles are always vectorized, under a plate of our own
            vectorize_particles=False,
            strict_enumeration_warning=strict_enumeration_warning,
        )
        self.alpha = float(alpha)
        self.gradient = gradient
        self.data_plate = data_plate

    def _traces(self, model: Callable, guide: Callable, args, kwargs):
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        particle_dim = -self.max_plate_nesting - 1
        plate = pyro.plate("_iwae_particles", self.num_particles, dim=particle_dim)
        guide_trace = prune_subsample_sites(poutine.trace(plate(guide)).get_trace(*args, **kwargs))
        replay_trace, aliases = guide_trace, {}
        if self.gradient == "dreg":
            # The model sees an alias of each guide sample; a hook on the alias will scale the
            # gradient that comes from the model alone.
            replay_trace = guide_trace.copy()
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and site["value"].requires_grad:
                    aliases[name] = site["value"].view_as(site["value"])
                    replay_trace.nodes[name] = dict(site, value=aliases[name])
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(plate(model), trace=replay_trace)).get_trace(
                *args, **kwargs
            )
        )
        return model_trace, guide_trace, aliases, particle_dim

    def _get_trace(self, model: Callable, guide: Callable, args, kwargs):
        """The model and guide traces of one vectorized draw of the particles."""
        model_trace, guide_trace, _, _ = self._traces(model, guide, args, kwargs)
        return model_trace, guide_trace

    def _log_densities(self, model_trace, guide_trace, particle_dim):
        """Per-particle, per-data-point terms of log w, shapes (K, B) or broadcastable (B is 1
        when a global site makes the batch one weight): the model's log p(x, z), the guide's
        log q(z | x), log q differentiated through z only (for STL/DReG, else None), the
        guide's score functions, and the subsampling scale applied after the bound."""
        sites = [
            (site, is_guide)
            for trace, is_guide in ((model_trace, False), (guide_trace, True))
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ]
        batch_weight = any(not _in_plate(site, self.data_plate) for site, _ in sites)
        data_scale = 1.0
        if not batch_weight and sites:
            data_scale = plate_subsample_scale(sites[0][0], self.data_plate)
        log_p = log_q = score = 0.0
        stl_log_q = None if self.gradient == "reparam" else 0.0
        for site, is_guide in sites:
            # every scale but the data plate's subsampling (KL warm-up, subsampling of a plate
            # nested in the data plate) acts inside log w; with a batch weight, all of them
            inner_scale = site["scale"] / data_scale
            if not is_guide:
                log_prob = site["fn"].log_prob(site["value"])
                log_p = log_p + self._reduce(site, log_prob, inner_scale, particle_dim,
                                             batch_weight)
                continue
            parts = score_parts_of(site["fn"], site["value"])
            site_log_q = self._reduce(site, parts.log_prob, inner_scale, particle_dim,
                                      batch_weight)
            log_q = log_q + site_log_q
            if not is_identically_zero(parts.score_function):
                if stl_log_q is not None:
                    raise ValueError(
                        f"gradient={self.gradient!r} needs fully reparameterized guide "
                        f"sites, but site {site['name']!r} ({type(site['fn']).__name__}) has a "
                        "score-function term; use gradient='reparam'"
                    )
                score = score + self._reduce(site, parts.score_function, 1.0, particle_dim,
                                             batch_weight, mask=False)
            if stl_log_q is not None:
                # d/dphi at fixed z, removed from log q's gradient: value unchanged
                at_fixed_z = self._reduce(site, _log_prob_at_detached(site), inner_scale,
                                          particle_dim, batch_weight)
                stl_log_q = stl_log_q + site_log_q - (at_fixed_z - at_fixed_z.detach())
        return log_p, log_q, stl_log_q, score, data_scale

    def _reduce(self, site: dict, log_prob: Tensor, inner_scale, particle_dim: int,
                batch_weight: bool, mask: bool = True) -> Tensor:
        """A site's term summed to (K, B), or to (K, 1) for one weight per batch."""
        if mask and site["mask"] is not None:
            log_prob = log_prob.masked_fill(~site["mask"], 0.0)
        if not (isinstance(inner_scale, float) and inner_scale == 1.0):
            log_prob = log_prob * inner_scale
        if batch_weight:
            return per_particle(log_prob, particle_dim)
        return per_data_point(site, log_prob, self.data_plate, particle_dim)

    def _bound(self, log_weight: Tensor) -> Tensor:
        """(1 / (1 - alpha)) log mean_k w_k^(1 - alpha) over the particle dimension 0."""
        if self.alpha == 0:
            return torch.logsumexp(log_weight, 0) - math.log(log_weight.shape[0])
        power = 1 - self.alpha
        return (torch.logsumexp(power * log_weight, 0) - math.log(log_weight.shape[0])) / power

    def _surrogate(self, model: Callable, guide: Callable, args, kwargs) -> tuple[Tensor, Tensor]:
        """The bound per data point (B,) and a scalar surrogate whose value is the scaled sum of
        the bounds and whose gradient is the chosen estimator."""
        model_trace, guide_trace, aliases, particle_dim = self._traces(model, guide, args, kwargs)
        log_p, log_q, stl_log_q, score, data_scale = self._log_densities(
            model_trace, guide_trace, particle_dim
        )
        log_weight = (log_p - log_q).expand(self.num_particles, -1)
        bound = self._bound(log_weight)
        if self.gradient == "reparam":
            surrogate = bound.sum()
            if not is_identically_zero(score):
                signal = bound.detach() - _leave_one_out_baseline(log_weight.detach(), self._bound)
                surrogate = surrogate + (signal * (score - score.detach())).sum()
            return bound, data_scale * surrogate
        normalized = torch.softmax((1 - self.alpha) * log_weight.detach(), 0)
        if self.gradient == "stl":
            surrogate = (normalized * (log_p - stl_log_q)).sum()
        else:
            # the model's terms reach the guide through the hooked aliases (w~ once more);
            # the guide's own term is weighted by w~^2 here and never meets a hook
            _scale_gradients(aliases, normalized, model_trace, self.data_plate, particle_dim)
            surrogate = (normalized * log_p).sum() - (normalized.square() * stl_log_q).sum()
        surrogate = bound.detach().sum() + surrogate - surrogate.detach()
        return bound, data_scale * surrogate

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """:math:`-\\sum_i s\\,\\mathcal{L}_K(x_i)` (nats), with the gradient estimator chosen
        by ``gradient``; no host synchronisation."""
        return -self._surrogate(model, guide, args, kwargs)[1]

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """:math:`-\\sum_i s\\,\\mathcal{L}_K(x_i)` as a float (nats)."""
        with torch.no_grad():
            loss = torch_item(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Backpropagates the loss (for ``SVI``) and returns it as a float."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    @torch.no_grad()
    def bound(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """:math:`\\mathcal{L}_K(x_i)` for every data point, shape ``(B,)``, nats, unscaled by
        subsampling (warm-up scales still act inside the weights)."""
        return self._surrogate(model, guide, args, kwargs)[0]


class ImportanceWeightedELBO(RenyiELBO):
    """The importance-weighted (IWAE) bound, :class:`RenyiELBO` at :math:`\\alpha = 0`:
    :math:`\\mathcal{L}_K(x_i) = \\log \\frac1K \\sum_k w_{k,i}` per data point, with the
    estimators, subsampling and global-latent rules described there.

    :param int num_particles: :math:`K \\ge 1`.
    :param str gradient: ``"reparam"``, ``"stl"`` or ``"dreg"``.
    :param str data_plate: name of the plate over data points.
    :param max_plate_nesting: the model's plate nesting; guessed by one run if not given.
    :raises ValueError: as :class:`RenyiELBO`.

    Example::

        >>> vae = VAE("vmf", latent_dim=10)
        >>> iwae = ImportanceWeightedELBO(num_particles=5)
        >>> x = torch.bernoulli(torch.full((64, 784), 0.3))
        >>> iwae.bound(vae.model, vae.guide, x).shape
        torch.Size([64])
    """

    def __init__(
        self,
        num_particles: int = 5,
        *,
        gradient: str = "reparam",
        data_plate: str = "data",
        max_plate_nesting: int | None = None,
    ) -> None:
        super().__init__(
            alpha=0,
            num_particles=num_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
            gradient=gradient,
            data_plate=data_plate,
        )


def _log_prob_at_detached(site: dict) -> Tensor:
    """log q at the sample detached from the graph: the part of log q's gradient that does not
    go through z."""
    try:
        return site["fn"].log_prob(site["value"].detach())
    except (NotImplementedError, KeyError) as error:  # Pyro's planar flow: KeyError
        raise ValueError(
            f"gradient='stl'/'dreg' evaluates log q of site {site['name']!r} at a detached "
            f"value, which {type(site['fn']).__name__} cannot ({error}); use an invertible "
            "posterior or gradient='reparam'"
        ) from error


def _leave_one_out_baseline(log_weight: Tensor, bound: Callable[[Tensor], Tensor]) -> Tensor:
    """VIMCO's baselines (K, B): the bound with particle k's log weight replaced by the mean of
    the others'. Zero for K = 1 (no baseline)."""
    num_particles = log_weight.shape[0]
    if num_particles == 1:
        return torch.zeros_like(log_weight)
    others_mean = (log_weight.sum(0, keepdim=True) - log_weight) / (num_particles - 1)
    # the bound over j of log w_j with entry k replaced: expand to (K, K, B) only over K
    replaced = log_weight.unsqueeze(0).expand(num_particles, -1, -1).clone()
    index = torch.arange(num_particles, device=log_weight.device)
    replaced[index, index] = others_mean
    return bound(replaced.transpose(0, 1))


def _in_plate(site: dict, plate: str) -> bool:
    return any(f.name == plate for f in site["cond_indep_stack"] if f.vectorized)


def per_particle(value: Tensor, particle_dim: int) -> Tensor:
    """A site's term summed over every dimension but the particles', shape (K, 1)."""
    value = value.reshape((1,) * (-particle_dim - value.dim()) + value.shape)
    axis = value.dim() + particle_dim
    return value.movedim(axis, 0).reshape(value.shape[axis], -1).sum(-1, keepdim=True)


def _scale_gradients(
    aliases: dict, normalized: Tensor, model_trace, data_plate: str, particle_dim: int
) -> None:
    """Multiply the gradient that reaches each aliased guide sample (from the model) by the
    normalized weight of its particle and data point."""
    for name, alias in aliases.items():
        site = model_trace.nodes[name]
        frames = {f.name: f.dim for f in site["cond_indep_stack"] if f.vectorized}
        batch_dims = alias.dim() - site["fn"].event_dim
        shape = [1] * alias.dim()
        shape[batch_dims + particle_dim] = normalized.shape[0]
        shape[batch_dims + frames[data_plate]] = normalized.shape[1]
        weights = normalized.reshape(shape)
        alias.register_hook(lambda grad, weights=weights: grad * weights)
