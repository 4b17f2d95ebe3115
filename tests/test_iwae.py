"""The importance-weighted ELBO against models with exact answers."""

import math

import numpy as np
import pyro
import pyro.distributions as pyro_dist
import pytest
import torch
from exact_models import F64, LinearGaussian, vmf_problem
from pyro.distributions.transforms import Planar
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher
from pyro_dgm.infer import ImportanceWeightedELBO, RenyiELBO
from pyro_dgm.models import VAE
from pyro_dgm.special import log_bessel_iv


@pytest.fixture
def problem():
    torch.manual_seed(0)
    problem = LinearGaussian()
    x = problem.marginal().sample((6,))
    return problem, x


def learnable_model(problem):
    """The linear-Gaussian model with a learnable noise scale, for model-parameter gradients."""

    def model(x, guide_scale=None, noise=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro_dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", pyro_dist.Normal(z @ problem.weight.T + problem.bias, noise)
                        .to_event(1), obs=x)

    return model


@pytest.mark.parametrize("gradient", ["reparam", "stl", "dreg"])
def test_one_particle_equals_trace_elbo_on_the_same_samples(problem, gradient):
    problem, x = problem
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
    pyro.set_rng_seed(1)
    iwae = ImportanceWeightedELBO(1, gradient=gradient, max_plate_nesting=1)
    ours = iwae.differentiable_loss(problem.model, problem.rough_guide, x, scale)
    pyro.set_rng_seed(1)
    reference = Trace_ELBO().differentiable_loss(problem.model, problem.rough_guide, x, scale)
    torch.testing.assert_close(ours, reference, rtol=1e-14, atol=1e-12)
    if gradient == "reparam":  # STL and DReG are other estimators of the same gradient
        torch.testing.assert_close(torch.autograd.grad(ours, scale),
                                   torch.autograd.grad(reference, scale))


def test_one_particle_equals_trace_elbo_with_a_rejection_sampler():
    """Value and gradient (pathwise + score terms) as Trace_ELBO's, for the vMF guide."""
    m, c, model, guide = vmf_problem()
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    kappa = torch.tensor([2.0, 7.0, 30.0], dtype=F64, requires_grad=True)
    pyro.set_rng_seed(4)
    ours = ImportanceWeightedELBO(1, max_plate_nesting=1).differentiable_loss(model, guide, x,
                                                                              kappa)
    pyro.set_rng_seed(4)
    reference = Trace_ELBO().differentiable_loss(model, guide, x, kappa)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, kappa),
                               torch.autograd.grad(reference, kappa))


def test_bounds_are_ordered_and_below_the_exact_log_likelihood(problem):
    """ELBO = L_1 < L_5 < L_50 <= log p(x), means over 2000 replicates of each data point:
    each increase exceeds 3 standard errors; L_50 exceeds log p(x) by less than 3."""
    problem, x = problem
    torch.manual_seed(1)
    exact = problem.marginal().log_prob(x)
    repeated = x.repeat(2000, 1)
    draws = [ImportanceWeightedELBO(k).bound(problem.model, problem.rough_guide, repeated)
             .reshape(2000, 6) for k in (1, 5, 50)]
    means = [d.mean(0) for d in draws]
    errors = [d.std(0) / math.sqrt(2000) for d in draws]
    assert (means[1] - means[0] > 3 * (errors[0] + errors[1])).all()
    assert (means[2] - means[1] > 3 * (errors[1] + errors[2])).all()
    assert (means[2] - exact < 3 * errors[2]).all()
    assert (exact - means[2] < 0.1).all()  # and nearly tight at K = 50


@pytest.mark.parametrize("num_particles", [1, 3, 40])
def test_exact_posterior_makes_every_bound_exact(problem, num_particles):
    problem, x = problem
    bound = ImportanceWeightedELBO(num_particles).bound(problem.model, problem.exact_guide, x)
    torch.testing.assert_close(bound, problem.marginal().log_prob(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gradient", ["stl", "dreg"])
def test_stl_and_dreg_guide_gradients_vanish_at_the_exact_posterior(problem, gradient):
    """At q = p(z|x), log w is constant in z: the STL and DReG guide gradients are exactly 0 on
    every draw, the plain reparameterization gradient only in expectation."""
    problem, x = problem
    shift = torch.zeros(2, dtype=F64, requires_grad=True)

    def guide(x):
        mean, covariance = problem.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro_dist.MultivariateNormal(mean + shift, covariance))

    for name, tolerance in ((gradient, 1e-10), ("reparam", None)):
        loss = ImportanceWeightedELBO(5, gradient=name).differentiable_loss(problem.model,
                                                                            guide, x)
        (grad,) = torch.autograd.grad(loss, shift)
        if tolerance is None:
            assert grad.abs().max() > 1e-3
        else:
            assert grad.abs().max() < tolerance


def test_reparameterized_gradient_matches_finite_differences(problem):
    """With common random numbers, the estimator's gradient is the derivative of its value, in
    the guide's and in the model's parameters (float64, central differences)."""
    problem, x = problem
    model = learnable_model(problem)
    iwae = ImportanceWeightedELBO(7, max_plate_nesting=1)

    def loss_at(scale, noise):
        pyro.set_rng_seed(3)
        return iwae.differentiable_loss(model, problem.rough_guide, x, scale, noise)

    point = [torch.tensor(1.3, dtype=F64, requires_grad=True),
             torch.tensor(0.6, dtype=F64, requires_grad=True)]
    grads = torch.autograd.grad(loss_at(*point), point)
    h = 1e-6
    for i in range(2):
        plus = [p.detach() + (h if j == i else 0) for j, p in enumerate(point)]
        minus = [p.detach() - (h if j == i else 0) for j, p in enumerate(point)]
        numeric = (loss_at(*plus) - loss_at(*minus)) / (2 * h)
        torch.testing.assert_close(grads[i], numeric, rtol=1e-6, atol=1e-8)


def _gradient_draws(problem, x, num_particles, gradient, draws=400, seed=5):
    """Independent draws (draws, 2) of the gradient in the guide's scale and the model's noise,
    in one call: every replicate of the data gets parameters of its own."""
    model = learnable_model(problem)
    iwae = ImportanceWeightedELBO(num_particles, gradient=gradient, max_plate_nesting=1)
    torch.manual_seed(seed)
    repeated = x.repeat(draws, 1)
    scale = torch.full((len(repeated), 1), 1.3, dtype=F64, requires_grad=True)
    noise = torch.full((len(repeated), 1), 0.6, dtype=F64, requires_grad=True)
    loss = iwae.differentiable_loss(model, problem.rough_guide, repeated, scale, noise)
    grads = torch.autograd.grad(loss, [scale, noise])
    return torch.cat(grads, -1).reshape(draws, len(x), 2).sum(1)


def _agree(draws, reference):
    difference = draws.mean(0) - reference.mean(0)
    error = (draws.var(0) / len(draws) + reference.var(0) / len(reference)).sqrt()
    return (difference.abs() < 4 * error).all()


def test_dreg_is_unbiased_and_has_lower_variance(problem):
    """Over 400 draws at K = 20, DReG's mean guide and model gradients agree with the
    reparameterization gradient's within 4 standard errors, and its guide gradient's variance
    is less than half."""
    problem, x = problem
    reference = _gradient_draws(problem, x, 20, "reparam")
    dreg = _gradient_draws(problem, x, 20, "dreg")
    assert _agree(dreg, reference)
    assert dreg[:, 0].var() < 0.5 * reference[:, 0].var()


def test_stl_is_unbiased_for_one_particle_and_biased_beyond():
    """STL drops a term whose expectation is 0 for the ELBO (K = 1) but not for K > 1 (Tucker
    et al. 2019, section 3): at K = 20 its mean guide gradient is off by more than 10
    standard errors, as documented."""
    problem = LinearGaussian()
    torch.manual_seed(0)
    x = problem.marginal().sample((6,))
    assert _agree(_gradient_draws(problem, x, 1, "stl"), _gradient_draws(problem, x, 1,
                                                                         "reparam"))
    stl, reference = (_gradient_draws(problem, x, 20, g, draws=200) for g in ("stl", "reparam"))
    error = (stl[:, 0].var() / 200 + reference[:, 0].var() / 200).sqrt()
    assert (stl[:, 0].mean() - reference[:, 0].mean()).abs() > 10 * error


def test_subsampling_scale_is_applied_after_the_logsumexp(problem):
    """Under pyro.plate(subsample=...), the loss is -(N/B) sum_i L_K(x_i), checked on the same
    samples, and with the exact posterior exactly -(N/B) sum_i log p(x_i). Pyro's RenyiELBO
    scales inside the log-sum-exp and differs."""
    problem, x = problem
    indices = torch.tensor([1, 4])

    def model(x, exact=False):
        with pyro.plate("data", 6, subsample=indices) as index:
            z = pyro.sample("z", pyro_dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
            pyro.sample("x", pyro_dist.Normal(z @ problem.weight.T + problem.bias,
                                              problem.noise).to_event(1), obs=x[index])

    def guide(x, exact=False):
        mean, covariance = problem.posterior(x[indices])
        q = (pyro_dist.MultivariateNormal(mean, covariance) if exact
             else pyro_dist.Normal(mean, 1.5 * covariance.diagonal().sqrt()).to_event(1))
        with pyro.plate("data", 6, subsample=indices):
            pyro.sample("z", q)

    iwae = ImportanceWeightedELBO(10, max_plate_nesting=1)
    loss = iwae.differentiable_loss(model, guide, x, exact=True)
    expected = -3 * problem.marginal().log_prob(x[indices]).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-10)
    pyro.set_rng_seed(6)
    loss = iwae.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(6)
    bound = iwae.bound(problem.model, problem.rough_guide, x[indices])
    torch.testing.assert_close(loss, -3 * bound.sum())
    pyro.set_rng_seed(6)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=10, vectorize_particles=True,
                                 max_plate_nesting=1).loss(model, guide, x)
    assert abs(renyi - float(loss)) > 1.0


def test_warmup_scale_acts_inside_the_weights():
    """poutine.scale(beta) on z: log w = log p(x|z) + beta (log p(z) - log q(z)) per particle,
    checked on the same samples."""
    m, c, model, guide = vmf_problem()
    x = torch.tensor([1.0, 2.0], dtype=F64)
    kappa = torch.tensor([3.0, 8.0], dtype=F64)
    beta = 0.3
    iwae = ImportanceWeightedELBO(4, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    bound = iwae.bound(model, guide, x, kappa, kl_scale=beta)
    pyro.set_rng_seed(2)
    _, guide_trace = iwae._get_trace(model, guide, (x, kappa), {"kl_scale": beta})
    site = guide_trace.nodes["z"]
    z = site["value"]
    direction = torch.tensor([0.0, 0.6, 0.0, 0.8], dtype=F64)
    log_p_z = HypersphericalUniform(m, dtype=F64).log_prob(z)
    log_w = c * (z @ direction) * x + beta * (log_p_z - site["fn"].log_prob(z))
    expected = torch.logsumexp(log_w, 0) - math.log(4)
    torch.testing.assert_close(bound, expected)


def _vmf_iwae_bound_k2(kappa, m, slope):
    """E[L_2] for the vMF problem, by Gauss-Chebyshev quadrature (second kind) in w = mu^T z.

    log w = slope * w - log|S^{m-1}| - log C_m(kappa) - kappa * w up to a constant, where w has
    the density exp(kappa w) (1 - w^2)^{(m-3)/2} / Z on [-1, 1]; for m = 4 the weight
    (1 - w^2)^{1/2} is integrated exactly by the rule."""
    assert m == 4
    n = 400
    j = np.arange(1, n + 1)
    nodes = np.cos(j * np.pi / (n + 1))
    weights = np.pi / (n + 1) * np.sin(j * np.pi / (n + 1)) ** 2
    density = weights * np.exp(kappa * (nodes - 1))
    density /= density.sum()
    order = m / 2 - 1
    log_c = order * math.log(kappa) - m / 2 * math.log(2 * math.pi) - float(
        log_bessel_iv(order, torch.tensor(kappa, dtype=F64)))
    log_area = math.log(2) + m / 2 * math.log(math.pi) - math.lgamma(m / 2)
    a = (slope - kappa) * nodes
    pair = np.logaddexp.outer(a, a) - math.log(2)
    return float(density @ pair @ density) - log_area - log_c


@pytest.mark.parametrize("kappa", [2.0, 12.0])
def test_rejection_sampler_gradient_is_unbiased_at_two_particles(kappa):
    """The partially reparameterized vMF path at K = 2: the mean over 40,000 data points of
    dL_2/dkappa equals the derivative of the quadrature value (finite differences), within 4
    standard errors; dropping the score term (pathwise only) is visibly biased at kappa = 2."""
    m, c, model, guide = vmf_problem()
    count = 40_000
    x = torch.ones(count, dtype=F64)
    concentration = torch.full((count,), kappa, dtype=F64, requires_grad=True)
    torch.manual_seed(7)
    loss = ImportanceWeightedELBO(2, max_plate_nesting=1).differentiable_loss(
        model, guide, x, concentration)
    (grads,) = torch.autograd.grad(-loss, concentration)
    h = 1e-5
    exact = (_vmf_iwae_bound_k2(kappa + h, m, c) - _vmf_iwae_bound_k2(kappa - h, m, c)) / (2 * h)
    error = grads.std() / math.sqrt(count)
    assert abs(float(grads.mean()) - exact) < 4 * float(error), (float(grads.mean()), exact)
    if kappa == 2.0:
        direction = torch.tensor([0.0, 0.6, 0.0, 0.8], dtype=F64)

        def pathwise_guide(x, concentration, kl_scale=1.0):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", VonMisesFisher(direction.expand(x.shape[0], m), concentration,
                                                gradient="pathwise"))

        loss = ImportanceWeightedELBO(2, max_plate_nesting=1).differentiable_loss(
            model, pathwise_guide, x, concentration)
        (biased,) = torch.autograd.grad(-loss, concentration)
        assert abs(float(biased.mean()) - exact) > 10 * float(biased.std()) / math.sqrt(count)


def test_value_equals_quadrature_for_the_rejection_sampler():
    m, c, model, guide = vmf_problem()
    x = torch.ones(40_000, dtype=F64)
    concentration = torch.full((40_000,), 5.0, dtype=F64)
    torch.manual_seed(8)
    bounds = ImportanceWeightedELBO(2).bound(model, guide, x, concentration)
    exact = _vmf_iwae_bound_k2(5.0, m, c)
    # at kappa = c the guide is the posterior: the bound has no variance, only rounding error
    assert abs(float(bounds.mean()) - exact) < 4 * float(bounds.std()) / 200 + 1e-12


def test_svi_trains_a_vae_with_every_latent_family():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((32, 20), 0.3))
    for latent in ("vmf", "normal"):
        pyro.clear_param_store()
        vae = VAE(latent, latent_dim=3, input_dim=20, hidden_dims=(16,))
        svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), ImportanceWeightedELBO(5))
        losses = [svi.step(x) for _ in range(30)]
        assert np.isfinite(losses).all()
        assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_bad_arguments_and_sites_raise_value_error(problem):
    problem, x = problem
    with pytest.raises(ValueError, match="num_particles"):
        ImportanceWeightedELBO(0)
    with pytest.raises(ValueError, match="gradient"):
        ImportanceWeightedELBO(2, gradient="vimco")
    m, c, model, guide = vmf_problem()
    kappa = torch.tensor([2.0], dtype=F64)
    with pytest.raises(ValueError, match="score-function"):
        ImportanceWeightedELBO(2, gradient="dreg").differentiable_loss(
            model, guide, torch.ones(1, dtype=F64), kappa)

    with pytest.raises(ValueError, match="alpha"):
        RenyiELBO(alpha=1.0)
    with pytest.raises(ValueError, match="dreg"):
        RenyiELBO(alpha=0.5, gradient="dreg")

    planar = Planar(2).double()

    def flow_guide(x):
        mean, covariance = problem.posterior(x)
        base = pyro_dist.Normal(mean, covariance.diagonal().sqrt()).to_event(1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pyro_dist.TransformedDistribution(base, [planar]))

    with pytest.raises(ValueError, match="detached"):
        ImportanceWeightedELBO(2, gradient="stl").differentiable_loss(problem.model, flow_guide,
                                                                      x)
    # the same flow guide is fine with the default estimator (log q from the cache)
    ImportanceWeightedELBO(2).differentiable_loss(problem.model, flow_guide, x)


def test_dreg_gradients_reach_encoder_and_decoder_of_a_vae():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((8, 20), 0.3))
    vae = VAE("normal", latent_dim=3, input_dim=20, hidden_dims=(16,), param_store=False)
    loss = ImportanceWeightedELBO(5, gradient="dreg").differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())


def test_subsampling_of_a_nested_plate_acts_inside_the_weights():
    """Only the data plate's scale comes after the log-sum-exp: a pixel plate subsampled 2 of 4
    inside it scales those pixels' log-likelihoods inside log w, checked on the same samples."""
    x = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -0.5, 0.2]], dtype=F64)
    pixels = torch.tensor([0, 2])

    def model(x):
        with pyro.plate("data", 2, dim=-2):
            z = pyro.sample("z", pyro_dist.Normal(torch.zeros(1, dtype=F64), 1.0))
            with pyro.plate("pixels", 4, subsample=pixels, dim=-1) as index:
                pyro.sample("x", pyro_dist.Normal(z, 1.0), obs=x[:, index])

    def guide(x):
        with pyro.plate("data", 2, dim=-2):
            pyro.sample("z", pyro_dist.Normal(torch.full((1,), 0.5, dtype=F64), 0.8))

    iwae = ImportanceWeightedELBO(6, max_plate_nesting=2)
    pyro.set_rng_seed(9)
    bound = iwae.bound(model, guide, x)
    pyro.set_rng_seed(9)
    _, guide_trace = iwae._get_trace(model, guide, (x,), {})
    z = guide_trace.nodes["z"]["value"]  # (6, 2, 1)
    log_w = (pyro_dist.Normal(0.0, 1.0).log_prob(z) - pyro_dist.Normal(0.5, 0.8).log_prob(z)
             + 2 * pyro_dist.Normal(z, 1.0).log_prob(x[:, pixels]).sum(-1, keepdim=True))
    expected = torch.logsumexp(log_w.squeeze(-1), 0) - math.log(6)
    torch.testing.assert_close(bound, expected)
