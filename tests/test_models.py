"""The VAE model zoo entry: shapes, sites, and that training improves it on real MNIST."""

import functools

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_dgm.data import MinibatchLoader, binarize_fixed, load_mnist
from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher
from pyro_dgm.experiments import train_epoch
from pyro_dgm.infer import TraceAnalyticKL_ELBO, elbo_terms
from pyro_dgm.models import VAE


@pytest.mark.parametrize("latent, event_dim", [("vmf", 6), ("normal", 5)])
def test_sites_and_shapes(latent, event_dim):
    torch.manual_seed(0)
    vae = VAE(latent, latent_dim=5, input_dim=20, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((7, 20), 0.4))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z = guide_trace.nodes["z"]
    assert z["value"].shape == (7, event_dim)
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]
    assert model_trace.nodes["x"]["is_observed"]
    if latent == "vmf":
        assert isinstance(z["fn"], VonMisesFisher) and (z["fn"].concentration >= 1).all()
        assert isinstance(model_trace.nodes["z"]["fn"], HypersphericalUniform)
    assert vae.reconstruct(x).shape == (7, 20)
    assert vae.generate(3, x).shape == (3, 20)


def test_subsampling_and_kl_scale_enter_the_loss():
    vae = VAE("vmf", latent_dim=3, input_dim=10, hidden_dims=(8,))
    x = torch.bernoulli(torch.full((4, 10), 0.5))
    indices = torch.arange(4)
    elbo = TraceAnalyticKL_ELBO()
    pyro.set_rng_seed(0)
    plain = elbo.differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(0)
    scaled = elbo.differentiable_loss(vae.model, vae.guide, x, indices, num_data=40)
    torch.testing.assert_close(scaled, 10 * plain)
    pyro.set_rng_seed(0)
    half_kl = elbo.differentiable_loss(vae.model, vae.guide, x, kl_scale=0.5)
    pyro.set_rng_seed(0)
    terms = elbo_terms(vae.model, vae.guide, x)  # same draw: the KL is closed-form anyway
    torch.testing.assert_close(plain - half_kl, 0.5 * terms.kl.sum())
    with pytest.raises(ValueError, match="indices"):
        vae.model(x, num_data=40)


def test_svi_with_pyro_optimizer_trains_every_network():
    """SVI finds the parameters through Pyro's param store and updates all of them."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE("vmf", latent_dim=3, input_dim=12, hidden_dims=(8,))
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    x = torch.bernoulli(torch.full((16, 12), 0.3))
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}),
                         TraceAnalyticKL_ELBO())
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < losses[0] - 1
    assert len(pyro.get_param_store()) == len(before)
    for name, parameter in vae.named_parameters():
        assert not torch.equal(parameter.detach(), before[name]), name


def test_two_models_in_one_process_keep_their_own_parameters():
    """Pyro's param store is global: each VAE registers under a name of its own."""
    pyro.clear_param_store()
    x = torch.bernoulli(torch.full((8, 12), 0.3))
    first, second = (VAE("vmf", 2, input_dim=12, hidden_dims=(8,)) for _ in range(2))
    elbo = TraceAnalyticKL_ELBO()
    for vae in (first, second, first):
        optimizer = torch.optim.Adam(vae.parameters(), lr=0.01)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        optimizer.step()
    assert len(pyro.get_param_store()) == 2 * len(list(first.parameters()))
    assert not torch.equal(first.decoder.layers[0].weight, second.decoder.layers[0].weight)


@pytest.mark.parametrize("latent", ["bernoulli", "gaussian"])
def test_rejects_unknown_latent(latent):
    with pytest.raises(ValueError, match="latent must be one of"):
        VAE(latent)


@pytest.mark.parametrize("latent", ["vmf", "normal"])
def test_one_epoch_on_real_mnist_improves_the_elbo(latent, data_dir):
    """A 2000-image epoch lifts the test ELBO of 500 held-out images by more than 60 nats
    (from about -540 at initialisation)."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    images, _ = load_mnist(data_dir, train=True)
    test = binarize_fixed(load_mnist(data_dir, train=False)[0][:500]).flatten(1)
    vae = VAE(latent, latent_dim=5)
    before = float(elbo_terms(vae.model, vae.guide, test).elbo.mean())
    loader = MinibatchLoader(images[:2000], 64, return_indices=True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    loss_fn = functools.partial(TraceAnalyticKL_ELBO().differentiable_loss, vae.model, vae.guide)
    train_epoch(loss_fn, optimizer, loader, progress=False, num_data=loader.num_examples)
    after = float(elbo_terms(vae.model, vae.guide, test).elbo.mean())
    assert after > before + 60


def test_pictures_are_labelled_and_drawn_from_a_spread_of_few_images(tmp_path):
    from PIL import Image

    from pyro_dgm.experiments.plotting import save_reconstructions, save_samples, spread

    vae = VAE("vmf", latent_dim=2, input_dim=16, hidden_dims=(8,))
    images = torch.bernoulli(torch.full((10, 16), 0.5))  # fewer than the 32 a grid shows
    samples = save_samples(vae, images, tmp_path / "samples.png", "samples",
                           image_shape=(1, 4, 4))
    pairs = save_reconstructions(vae, images, tmp_path / "reconstructions.png", "pairs",
                                 image_shape=(1, 4, 4))
    assert Image.open(samples).size[0] > 0 and Image.open(pairs).size[1] > 0
    # sorted data (statically binarized MNIST's test file): the spread reaches the last image
    assert spread(32, 10_000).tolist()[:2] == [0, 323] and spread(32, 10_000)[-1] == 9_999
    assert spread(32, 10).tolist() == list(range(10))


PRIORS = [("normal", "standard"), ("normal", "vamp"), ("normal", "flow"), ("normal", "mog"),
          ("vmf", "uniform"), ("vmf", "vamp")]


@pytest.mark.parametrize("latent, prior", PRIORS)
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_learned_priors_train_with_both_objectives(latent, prior, objective):
    """Every parameter (encoder, decoder, prior) gets a gradient; the VampPrior's components
    are computed once per step: the encoder runs once on the data and once on the
    pseudo-inputs, whatever the number of particles."""
    from pyro_dgm.infer import make_objective

    torch.manual_seed(0)
    vae = VAE(latent, latent_dim=3, input_dim=20, hidden_dims=(16,), prior=prior,
              num_pseudo_inputs=7, param_store=False)
    x = torch.bernoulli(torch.full((5, 20), 0.4))
    loss_fn = make_objective(objective, 4).differentiable_loss
    loss_fn(vae.model, vae.guide, x)  # the first call also runs both once to count the plates
    calls = []
    vae.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    loss = loss_fn(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in vae.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert sorted(calls) == ([5, 7] if prior == "vamp" else [5])
    if prior == "vamp":
        assert vae.prior_module.pseudo_inputs.min() >= 0
        assert vae.prior_module.pseudo_inputs.max() <= 1
    assert vae.generate(3, x).shape == (3, 20)


def test_vamp_prior_is_the_mixture_of_the_current_posteriors_and_cached_in_eval():
    torch.manual_seed(0)
    vae = VAE("vmf", latent_dim=2, input_dim=20, hidden_dims=(16,), prior="vamp",
              num_pseudo_inputs=4)
    x = torch.bernoulli(torch.full((6, 20), 0.4))
    z = vae.posterior(x).sample()
    components = vae.posterior(vae.prior_module.pseudo_inputs)
    expected = torch.logsumexp(torch.stack([components.log_prob(z[:, None].expand(6, 4, 3))
                                            [:, k] for k in range(4)]), 0) - torch.log(
        torch.tensor(4.0))
    torch.testing.assert_close(vae.prior(6, x).log_prob(z), expected)
    vae.eval()
    assert vae.prior(None, x) is vae.prior(None, x)
    vae.train()
    assert vae.prior(None, x) is not vae.prior(None, x)


@pytest.mark.parametrize("latent, prior, flow", [
    ("vmf", "standard", None), ("normal", "uniform", None), ("normal", "vamp", "planar"),
    ("normal", "gaussian", None)])
def test_bad_prior_raises(latent, prior, flow):
    with pytest.raises(ValueError, match="prior"):
        VAE(latent, latent_dim=3, input_dim=20, hidden_dims=(16,), prior=prior, flow=flow)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("latent, prior", PRIORS)
def test_every_prior_and_objective_runs_on_cuda(latent, prior):
    """Nothing is created on the default device: training, evaluation and diagnostics on CUDA
    give finite values with every tensor on the GPU."""
    from pyro_dgm.infer import importance_log_likelihood, make_objective

    torch.manual_seed(0)
    vae = VAE(latent, latent_dim=3, input_dim=20, hidden_dims=(16,), prior=prior,
              num_pseudo_inputs=7, param_store=False).cuda()
    x = torch.bernoulli(torch.full((5, 20), 0.4, device="cuda"))
    for objective in ("elbo", "iwae"):
        loss = make_objective(objective, 4).differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        assert loss.device.type == "cuda" and torch.isfinite(loss)
    vae.eval()
    estimate = importance_log_likelihood(vae.model, vae.guide, x, num_samples=10)
    assert estimate.log_likelihood.device.type == "cuda"
    assert torch.isfinite(estimate.log_likelihood).all()
    from pyro_dgm.infer import latent_diagnostics

    diagnostics = latent_diagnostics(vae.posterior, vae.prior(None, x), x, num_points=5)
    assert diagnostics["mutual_information"] <= diagnostics["log_num_data"] + 1e-9
