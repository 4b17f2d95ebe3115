"""VAEs with normalizing-flow posteriors: objectives, gradients, likelihoods, exact densities."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_dgm.infer import TraceAnalyticKL_ELBO, elbo_terms, importance_log_likelihood
from pyro_dgm.models import VAE

FLOWS = ["planar", "iaf", "householder", "orthogonal-sylvester", "householder-sylvester",
         "triangular-sylvester"]
INPUT_DIM, LATENT_DIM, BATCH = 20, 4, 5


def small_vae(flow: str, num_flows: int = 2) -> VAE:
    torch.manual_seed(0)
    return VAE("normal", LATENT_DIM, INPUT_DIM, (16, 12), flow=flow, num_flows=num_flows)


def binary_batch(size: int = BATCH) -> torch.Tensor:
    return torch.bernoulli(torch.full((size, INPUT_DIM), 0.3),
                           generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("flow", FLOWS)
def test_flow_vae_trains_and_evaluates(flow):
    pyro.clear_param_store()
    vae, x = small_vae(flow), binary_batch()
    loss = TraceAnalyticKL_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for name, parameter in [*vae.flows.named_parameters(), *vae.encoder.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert any(key.startswith(f"{vae.pyro_name}.flows") for key in pyro.get_param_store())

    assert torch.isfinite(torch.tensor(Trace_ELBO().loss(vae.model, vae.guide, x)))
    estimate = importance_log_likelihood(vae.model, vae.guide, x, num_samples=7, chunk_size=3)
    assert estimate.log_likelihood.shape == (BATCH,)
    assert torch.isfinite(estimate.log_likelihood).all()
    terms = elbo_terms(vae.model, vae.guide, x, num_particles=3)
    assert terms.elbo.shape == (BATCH,)
    # the IWAE bound with 7 samples is, up to Monte Carlo error, above the ELBO
    assert estimate.log_likelihood.mean() > terms.elbo.mean() - 5.0
    assert vae.reconstruct(x).shape == x.shape
    assert vae.generate(3, x).shape == (3, INPUT_DIM)


@pytest.mark.parametrize("flow", FLOWS)
def test_guide_density_is_change_of_variables(flow):
    """log q(z_K) = log q0(z0) - log|det dz_K/dz0|, the Jacobian taken by autograd."""
    vae, x = small_vae(flow), binary_batch(3)
    with torch.no_grad():  # the parameters are fixed; autograd only differentiates in z0
        q = vae.posterior(x)
        z0 = q.base_dist.sample()

    def push(z):
        for transform in q.transforms:
            z = transform(z)
        return z

    jacobian = torch.autograd.functional.jacobian(push, z0)  # (B, D, B, D), block diagonal
    blocks = torch.stack([jacobian[i, :, i] for i in range(z0.shape[0])])
    expected = q.base_dist.log_prob(z0) - torch.linalg.slogdet(blocks).logabsdet
    with torch.no_grad():
        z = push(z0)  # fills the transforms' caches, as sampling does
        assert torch.allclose(q.log_prob(z), expected, atol=1e-4)


def test_guide_site_log_prob_matches_a_fresh_inverse():
    """The guide's cached density of its own sample equals the density through the exact
    inverse of the Sylvester flow (no cache: a copy of the sample)."""
    vae, x = small_vae("triangular-sylvester", num_flows=3), binary_batch()
    with torch.no_grad():
        site = poutine.trace(vae.guide).get_trace(x).nodes["z"]
        cached = site["fn"].log_prob(site["value"])
        fresh = site["fn"].log_prob(site["value"].clone())
    assert site["value"].shape == (BATCH, LATENT_DIM)
    assert torch.allclose(cached, fresh, atol=1e-4)


def test_without_flow_the_vae_is_unchanged():
    torch.manual_seed(0)
    plain = VAE("normal", LATENT_DIM, INPUT_DIM, (16, 12))
    assert len(plain.flows) == 0
    assert not any(key.startswith("flows") for key in plain.state_dict())
    assert isinstance(plain.posterior(binary_batch()).base_dist, torch.distributions.Normal)


def test_householder_flow_is_one_chain_of_reflections():
    vae = small_vae("householder", num_flows=5)
    assert len(vae.flows) == 1 and vae.flows[0].count_transforms == 5


@pytest.mark.parametrize("flow", ["orthogonal-sylvester", "householder-sylvester",
                                  "triangular-sylvester"])
def test_sylvester_flows_are_one_stack(flow):
    """K Sylvester flows are one module of num_flows=K (its factors from one linear map of
    h(x)), not K modules."""
    vae = small_vae(flow, num_flows=4)
    assert len(vae.flows) == 1 and vae.flows[0].num_flows == 4


def test_triangular_sylvester_alternates_permutations():
    """Q of the stack's flows: the identity, then the reversal, alternately."""
    vae = small_vae("triangular-sylvester", num_flows=4)
    with torch.no_grad():
        (transform,) = vae.posterior(binary_batch()).transforms
    eye = torch.eye(LATENT_DIM)
    assert torch.equal(transform.q(), torch.stack([eye, eye.flip(0), eye, eye.flip(0)]))


def test_bad_flow_arguments():
    with pytest.raises(ValueError, match="flow must be None or one of"):
        VAE("normal", 4, 20, (8,), flow="radial")
    with pytest.raises(ValueError, match="latent='normal'"):
        VAE("vmf", 4, 20, (8,), flow="planar")
    with pytest.raises(ValueError, match="num_flows"):
        VAE("normal", 4, 20, (8,), flow="planar", num_flows=0)
