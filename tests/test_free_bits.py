"""Free bits (Kingma et al. 2016): the objective's value and gradients, every latent family,
and posterior collapse of a PixelCNN-decoder VAE measured and countered."""

import pyro
import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

from pyro_dgm.infer import (
    FreeBitsELBO,
    TraceAnalyticKL_ELBO,
    kl_per_unit,
    latent_diagnostics,
    make_objective,
)
from pyro_dgm.models import (
    VAE,
    GaussianLatent,
    HierarchicalVAE,
    PixelCNNDecoder,
    PixelCNNLikelihood,
)


def binary_batch(size=6, dim=12):
    return torch.bernoulli(torch.full((size, dim), 0.4),
                           generator=torch.Generator().manual_seed(2))


def loss_and_grads(elbo, model, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    x = kwargs.pop("x")
    loss = elbo.differentiable_loss(model.model, model.guide, x, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


MODELS = {
    "gaussian": lambda: VAE("normal", 3, 12, (8,), param_store=False),
    "vmf": lambda: VAE("vmf", 3, 12, (8,), param_store=False),
    "vamp": lambda: VAE("normal", 3, 12, (8,), prior="vamp", num_pseudo_inputs=4,
                        param_store=False),
    "vmf-vamp": lambda: VAE("vmf", 3, 12, (8,), prior="vamp", num_pseudo_inputs=4,
                            param_store=False),
    "hvae-vmf": lambda: HierarchicalVAE.preset(12, (2, 3), top_latent="vmf", prior="fixed",
                                               hidden_dim=8, param_store=False),
}


@pytest.mark.parametrize("name", MODELS)
def test_zero_floor_is_the_elbo(name):
    """With lambda = 0 the value and the gradients are TraceAnalyticKL_ELBO's (closed-form
    KLs are never negative; the VampPrior's Monte Carlo KL is one group whose batch mean is
    positive here)."""
    torch.manual_seed(0)
    model, x = MODELS[name](), binary_batch()
    reference = loss_and_grads(TraceAnalyticKL_ELBO(), model, x=x)
    ours = loss_and_grads(FreeBitsELBO(0.0), model, x=x)
    torch.testing.assert_close(ours[0], reference[0])
    for mine, theirs in zip(ours[1], reference[1], strict=True):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs)


def test_value_is_the_elbo_minus_the_shortfalls_per_unit_and_per_site():
    """Gaussian codes: one group per unit; vMF codes: one group per site. The loss exceeds
    -ELBO by B * sum_g max(0, lambda - mean_i KL_g(x_i)) (times num_data / B when
    subsampling), computed here by hand from the closed-form KLs; the floor lies among the
    groups' KLs, so that some groups are below it and some above."""
    x = binary_batch()
    for name, per_unit in (("gaussian", True), ("vmf", False)):
        torch.manual_seed(0)
        vae = MODELS[name]()
        q, p = vae.posterior(x), vae.prior(len(x), x)
        kl = kl_divergence(q.base_dist, p.base_dist) if per_unit else kl_divergence(q, p)
        kl = kl.reshape(len(x), -1).mean(0).detach()
        floor = float(kl.median()) if per_unit else float(kl) + 0.2
        shortfall = (floor - kl).clamp(min=0).sum()
        assert shortfall > 0 and (not per_unit or (kl > floor).any())
        for kwargs, weight in (({}, len(x)), ({"indices": torch.arange(len(x)),
                                               "num_data": 60}, 60)):
            elbo = loss_and_grads(TraceAnalyticKL_ELBO(), vae, x=x, **kwargs)[0]
            ours = loss_and_grads(FreeBitsELBO(floor), vae, x=x, **kwargs)[0]
            torch.testing.assert_close(ours - elbo, weight * shortfall)
        site_kl = kl_divergence(q, p).mean().detach()
        site_floor = float(site_kl) + 0.2
        site_groups = loss_and_grads(FreeBitsELBO(site_floor, per_unit=False), vae, x=x)[0]
        elbo = loss_and_grads(TraceAnalyticKL_ELBO(), vae, x=x)[0]
        torch.testing.assert_close(site_groups - elbo, len(x) * (site_floor - site_kl))


@pytest.mark.parametrize("name", ["gaussian", "vamp", "vmf-vamp", "hvae-vmf"])
def test_below_the_floor_the_kl_has_no_gradient(name):
    """With every group below a high floor the gradient is that of the reconstruction term
    alone (the ELBO with a KL weight of 1e-12), to rounding: the penalty's KL is the ELBO's,
    with the same score-function terms for a rejection-sampled site whose KL is Monte Carlo
    (vMF against a VampPrior) or depends on its sample (the HVAE's lower level)."""
    torch.manual_seed(0)
    model, x = MODELS[name](), binary_batch()
    floored = loss_and_grads(FreeBitsELBO(50.0), model, x=x)[1]
    reconstruction_only = loss_and_grads(TraceAnalyticKL_ELBO(), model, x=x, kl_scale=1e-12)[1]
    compared = 0
    for mine, theirs in zip(floored, reconstruction_only, strict=True):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
            compared += 1
    assert compared > 4


def test_make_objective_and_bad_arguments():
    assert isinstance(make_objective("elbo", 1, free_bits=0.5), FreeBitsELBO)
    assert make_objective("elbo", 3, free_bits=0.5).num_particles == 3
    with pytest.raises(ValueError, match="free_bits"):
        make_objective("iwae", 5, free_bits=0.5)
    with pytest.raises(ValueError, match="free_bits"):
        FreeBitsELBO(-1.0)


# Posterior collapse. Images of 8 x 8 binary pixels whose rows are Markov chains (each pixel
# flips its left neighbour with probability 0.1): every dependence is local, so a PixelCNN
# decoder models the data without z, and the ELBO pushes q(z | x) onto the prior. 256 images,
# batches of 64, Adam at 1e-2, 150 steps; 4 Gaussian units.
STEPS, UNITS, FLOOR = 150, 4, 0.5


def markov_rows(num_images=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    first = torch.bernoulli(torch.full((num_images, 8, 1), 0.5), generator=generator)
    flips = torch.bernoulli(torch.full((num_images, 8, 7), 0.1), generator=generator)
    return (torch.cat([first, flips], -1).cumsum(-1) % 2).flatten(1)


def train_pixelcnn_vae(objective, data, seed=0):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = VAE(nn.Sequential(nn.Linear(64, 32), nn.ReLU()), GaussianLatent(32, UNITS),
              PixelCNNLikelihood(PixelCNNDecoder(UNITS, (1, 8, 8), channels=8, num_layers=2),
                                 event_shape=(64,)), param_store=False)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        batch = data[torch.randint(len(data), (64,), generator=generator)]
        optimizer.zero_grad()
        objective.differentiable_loss(vae.model, vae.guide, batch).backward()
        optimizer.step()
    kl = kl_per_unit(vae.model, vae.guide, data)["z"]
    return kl, latent_diagnostics(vae.posterior, None, data)["active_units"]


def test_pixelcnn_vae_collapses_and_free_bits_keep_every_unit_active():
    """Without countermeasures the KL falls below 0.1 nats in all (measured: 0.04); with
    free bits of 0.5 nats per unit all 4 units stay active (AU = 4, each unit's KL above
    0.3 nats; measured: 0.41 to 0.60)."""
    data = markov_rows()
    kl, _ = train_pixelcnn_vae(TraceAnalyticKL_ELBO(), data)
    assert kl.shape == (UNITS,)
    assert kl.sum() < 0.1, kl
    kl, active = train_pixelcnn_vae(FreeBitsELBO(FLOOR), data)
    assert active == UNITS
    assert kl.min() > 0.3, kl
