"""The VAE built from parts: user modules in every place, zuko flows as posterior and prior,
PixelCNN likelihoods, presets and the checkpoints of the string-built VAE."""

import ast
from pathlib import Path

import pyro
import pyro.distributions as pyro_dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_dgm.distributions import VonMisesFisher
from pyro_dgm.infer import TraceAnalyticKL_ELBO
from pyro_dgm.models import (
    VAE,
    GatedDense,
    GaussianLatent,
    PixelCNNDecoder,
    PixelCNNLikelihood,
    VampPriorModule,
    VonMisesFisherLatent,
)

zuko = pytest.importorskip("zuko")

INPUT_DIM, FEATURES, LATENT_DIM, BATCH = 16, 12, 3, 6


def binary_batch(size: int = BATCH, dim: int = INPUT_DIM) -> torch.Tensor:
    return torch.bernoulli(torch.full((size, dim), 0.35),
                           generator=torch.Generator().manual_seed(3))


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(INPUT_DIM, FEATURES), nn.Tanh())


def decoder(code_size: int = LATENT_DIM) -> nn.Module:
    return nn.Sequential(nn.Linear(code_size, FEATURES), nn.Tanh(),
                         nn.Linear(FEATURES, INPUT_DIM))


def standard_normal(size: int = LATENT_DIM):
    return pyro_dist.Normal(torch.zeros(size), torch.ones(size)).to_event(1)


def same_draw_losses(vae, x, seed=0):
    """Both objectives' losses and gradients for one draw of the guide (the same seed)."""
    results = []
    for elbo in (TraceAnalyticKL_ELBO(), Trace_ELBO()):
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        parameters = [p for p in vae.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        results.append((loss.detach(), [g for g in grads if g is not None]))
    return results


def train(vae, x, steps=5, elbo=None):
    elbo = elbo or TraceAnalyticKL_ELBO()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        optimizer.step()
    return loss


def test_zuko_flow_as_posterior_trains_and_its_elbo_is_trace_elbos():
    """A conditional zuko NSF in the latent's place (wrapped in ZukoToPyro): a few steps of
    training move it, and on one draw the ELBO and its gradients equal Trace_ELBO's (the KL
    has no closed form: both are log p(x, z) - log q(z | x) at the same sample)."""
    torch.manual_seed(0)
    flow = zuko.flows.NSF(LATENT_DIM, context=FEATURES, transforms=2, hidden_features=(16,))
    vae = VAE(encoder(), flow, decoder(), prior=standard_normal(), param_store=False)
    x = binary_batch()
    before = [p.detach().clone() for p in flow.parameters()]
    train(vae, x)
    assert any(not torch.equal(b, p) for b, p in zip(before, flow.parameters(), strict=True))
    (ours, our_grads), (pyros, pyro_grads) = same_draw_losses(vae, x)
    torch.testing.assert_close(ours, pyros, rtol=1e-6, atol=1e-5)
    for mine, theirs in zip(our_grads, pyro_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert vae.reconstruct(x).shape == x.shape and vae.generate(2, x).shape == (2, INPUT_DIM)


def test_zuko_flow_as_prior_trains_and_its_elbo_is_trace_elbos():
    """An unconditional zuko MAF as the prior of Gaussian codes: its parameters train with the
    VAE, and the ELBO equals Trace_ELBO's on the same draw."""
    torch.manual_seed(0)
    flow = zuko.flows.MAF(LATENT_DIM, transforms=2, hidden_features=(16,))
    vae = VAE(encoder(), GaussianLatent(FEATURES, LATENT_DIM), decoder(), prior=flow,
              param_store=False)
    assert vae.prior_module is flow
    x = binary_batch()
    before = [p.detach().clone() for p in flow.parameters()]
    train(vae, x)
    assert all(not torch.equal(b, p) for b, p in zip(before, flow.parameters(), strict=True))
    (ours, our_grads), (pyros, pyro_grads) = same_draw_losses(vae, x)
    torch.testing.assert_close(ours, pyros, rtol=1e-6, atol=1e-5)
    for mine, theirs in zip(our_grads, pyro_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert vae.prior(4, x).batch_shape == (4,)


def test_user_modules_take_every_place():
    """Plain user modules as encoder and decoder, a user latent head returning a vMF, and a
    VampPrior on it: the ELBO equals log p(x|z) + log p(z) - log q(z|x) computed by hand."""
    torch.manual_seed(0)

    class MyHead(nn.Module):  # any module returning the distribution: no fixed_prior needed
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(FEATURES, LATENT_DIM + 2)

        def forward(self, h):
            loc, raw = self.linear(h).split([LATENT_DIM + 1, 1], -1)
            return VonMisesFisher(nn.functional.normalize(loc, dim=-1),
                                  nn.functional.softplus(raw.squeeze(-1)) + 1)

    with pytest.raises(ValueError, match="prior must be given"):
        VAE(encoder(), MyHead(), decoder(LATENT_DIM + 1))
    vae = VAE(encoder(), MyHead(), decoder(LATENT_DIM + 1), prior=VampPriorModule(4, INPUT_DIM),
              param_store=False)
    x = binary_batch()
    pyro.set_rng_seed(1)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    z = vae.posterior(x).rsample()
    log_lik = pyro_dist.Bernoulli(logits=vae.decoder(z)).to_event(1).log_prob(x)
    expected = -(log_lik + vae.prior(BATCH, x).log_prob(z) - vae.posterior(x).log_prob(z)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    loss.backward()
    assert vae.prior_module.raw_pseudo_inputs.grad.abs().sum() > 0


def test_pixelcnn_likelihood_in_the_one_level_vae():
    """A PixelCNN decoder in the decoder's place: log p(x | z) is the sum of the Bernoulli
    log-densities of the decoder's logits on x itself."""
    torch.manual_seed(0)
    pixelcnn = PixelCNNDecoder(LATENT_DIM, (1, 4, 4), channels=8, num_layers=2)
    vae = VAE(encoder(), GaussianLatent(FEATURES, LATENT_DIM),
              PixelCNNLikelihood(pixelcnn, event_shape=(INPUT_DIM,)), param_store=False)
    x = binary_batch()
    z = torch.randn(BATCH, LATENT_DIM)
    likelihood = vae.likelihood(z, x)
    logits = pixelcnn(x.reshape(BATCH, 1, 4, 4), z).reshape(BATCH, INPUT_DIM)
    torch.testing.assert_close(likelihood.log_prob(x),
                               pyro_dist.Bernoulli(logits=logits).to_event(1).log_prob(x))
    particles = torch.randn(5, BATCH, LATENT_DIM)  # vectorized particles broadcast against x
    assert vae.likelihood(particles, x).log_prob(x).shape == (5, BATCH)
    loss = TraceAnalyticKL_ELBO(num_particles=3, vectorize_particles=True).differentiable_loss(
        vae.model, vae.guide, x)
    loss.backward()
    assert all(p.grad is not None for p in pixelcnn.parameters())
    samples = vae.generate(2, x)
    assert samples.shape == (2, INPUT_DIM) and set(samples.unique().tolist()) <= {0.0, 1.0}


def test_presets_are_thin_constructors():
    torch.manual_seed(0)
    by_string = VAE("vmf", 4, INPUT_DIM, (8,))
    torch.manual_seed(0)
    by_name = VAE.svae(4, input_dim=INPUT_DIM, hidden_dims=(8,))
    assert isinstance(by_name.latent, VonMisesFisherLatent)
    assert by_name.event_dim == 5
    for (key, a), (other, b) in zip(by_string.state_dict().items(),
                                    by_name.state_dict().items(), strict=True):
        assert key == other and torch.equal(a, b)
    assert isinstance(VAE.nvae(4, input_dim=INPUT_DIM, hidden_dims=(8,)).latent, GaussianLatent)
    with pytest.raises(ValueError, match="string presets"):
        VAE(encoder(), GaussianLatent(FEATURES, 2), decoder(2), num_flows=3)
    with pytest.raises(ValueError, match="encoder must be an nn.Module"):
        VAE(None, GaussianLatent(FEATURES, 2), decoder(2))


@pytest.mark.parametrize("options", [{}, {"prior": "vamp", "num_pseudo_inputs": 5},
                                     {"flow": "householder", "num_flows": 2}])
def test_checkpoints_of_the_string_built_vae_load(options):
    """Earlier versions stored the posterior head as ``posterior_head.*``: such a state dict
    loads into today's VAE, every tensor in its place."""
    torch.manual_seed(0)
    latent = "normal" if "flow" in options else "vmf"
    trained = VAE(latent, 3, INPUT_DIM, (8,), **options)
    old_state = {key.replace("latent.head.", "posterior_head."): value
                 for key, value in trained.state_dict().items()}
    assert any(key.startswith("posterior_head.") for key in old_state)
    fresh = VAE(latent, 3, INPUT_DIM, (8,), **options)
    fresh.load_state_dict(old_state)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


VAE_ZOO = ["vae.py", "hvae.py", "latents.py", "likelihoods.py", "priors.py", "networks.py",
           "pixelcnn.py"]


def test_vae_zoo_does_not_import_infer():
    """The dependency direction: infer -> models, never back (the VAE zoo's modules)."""
    models = Path(__file__).resolve().parents[1] / "pyro_dgm" / "models"
    offenders = []
    for path in (models / name for name in VAE_ZOO):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "pyro_dgm.infer"):
                offenders.append(path.name)
            elif isinstance(node, ast.Import) and any(
                    alias.name.startswith("pyro_dgm.infer") for alias in node.names):
                offenders.append(path.name)
    assert not offenders


def test_gated_vae_is_the_papers_one_level_model():
    """VAE.gated: the VampPrior paper's one-level VAE (gated 784-300-300 encoder, 40-300-300-784
    decoder, K = 500 pseudo-inputs), and its PixelVAE and vMF variants."""
    vae = VAE.gated()
    assert [(layer.input_dim, layer.output_dim) for layer in vae.encoder] == [(784, 300),
                                                                             (300, 300)]
    assert isinstance(vae.decoder[0], GatedDense) and vae.decoder[0].input_dim == 40
    assert vae.decoder[-1].out_features == 784
    assert vae.prior_module.num_pseudo_inputs == 500 and vae.event_dim == 40
    pixel = VAE.gated(INPUT_DIM, 3, latent="vmf", prior="fixed", decoder="pixelcnn",
                      image_shape=(1, 4, 4), hidden_dim=8, pixelcnn_channels=4,
                      pixelcnn_layers=1, param_store=False)
    assert isinstance(pixel.decoder, PixelCNNLikelihood) and pixel.prior_module is None
    x = binary_batch()
    TraceAnalyticKL_ELBO().differentiable_loss(pixel.model, pixel.guide, x).backward()
    assert all(p.grad is not None for p in pixel.parameters())
    with pytest.raises(ValueError, match="decoder"):
        VAE.gated(decoder="made")
