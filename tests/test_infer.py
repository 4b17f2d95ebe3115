"""Objectives and evaluation against models with exact answers."""

import math

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import pytest
import torch
from exact_models import F64, LinearGaussian, vmf_problem

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher
from pyro_dgm.infer import (
    TraceAnalyticKL_ELBO,
    elbo_terms,
    evaluate_dataset,
    importance_log_likelihood,
)


@pytest.fixture
def linear_gaussian():
    torch.manual_seed(0)
    problem = LinearGaussian()
    x = problem.marginal().sample((6,))
    return problem, x


# TraceAnalyticKL_ELBO takes Pyro's traces when Pyro validates, and its own lean ones without.
BOTH_TRACE_PATHS = pytest.mark.parametrize("validation", [True, False], ids=["pyro", "lean"])


def test_importance_sampling_converges_to_exact_log_likelihood(linear_gaussian):
    """|error| < 0.05 nats with 5000 samples, and the standard error covers it."""
    problem, x = linear_gaussian
    exact = problem.marginal().log_prob(x)
    estimate = importance_log_likelihood(problem.model, problem.rough_guide, x,
                                         num_samples=5000, chunk_size=1000)
    assert estimate.log_likelihood.shape == (6,)
    error = (estimate.log_likelihood - exact).abs()
    assert (error < 0.05).all()
    assert (error < 5 * estimate.standard_error + 1e-3).all()
    assert ((estimate.effective_sample_size > 1) & (estimate.effective_sample_size <= 5000)).all()


def test_exact_posterior_makes_every_bound_tight(linear_gaussian):
    problem, x = linear_gaussian
    exact = problem.marginal().log_prob(x)
    estimate = importance_log_likelihood(problem.model, problem.exact_guide, x, num_samples=7,
                                         chunk_size=3)
    torch.testing.assert_close(estimate.log_likelihood, exact)
    torch.testing.assert_close(estimate.effective_sample_size, torch.full((6,), 7.0, dtype=F64))
    terms = elbo_terms(problem.model, problem.exact_guide, x, num_particles=3)
    torch.testing.assert_close(terms.elbo, exact)


def test_bounds_are_ordered_and_increase_with_samples(linear_gaussian):
    """ELBO = L_1 < L_5 < L_50 <= log p(x): means over 2000 repetitions; L_1 equals the ELBO
    within 4 standard errors, each increase exceeds 3, and L_50 is not above log p(x) by 3."""
    problem, x = linear_gaussian
    torch.manual_seed(1)
    exact = problem.marginal().log_prob(x)
    repeated = x.repeat(2000, 1)
    draws = [importance_log_likelihood(problem.model, problem.rough_guide, repeated,
                                       num_samples=k).log_likelihood.reshape(2000, 6)
             for k in (1, 5, 50)]
    means = [d.mean(0) for d in draws]
    errors = [d.std(0) / math.sqrt(2000) for d in draws]
    elbo = elbo_terms(problem.model, problem.rough_guide, x, num_particles=20_000).elbo
    assert ((means[0] - elbo).abs() < 4 * errors[0]).all()
    assert (means[1] - means[0] > 3 * (errors[0] + errors[1])).all()
    assert (means[2] - means[1] > 3 * (errors[1] + errors[2])).all()
    assert (means[2] - exact < 3 * errors[2]).all()  # a lower bound, nearly tight at K = 50


def test_elbo_terms_match_closed_form(linear_gaussian):
    problem, x = linear_gaussian
    terms = elbo_terms(problem.model, problem.rough_guide, x, num_particles=20_000)
    mean, covariance = problem.posterior(x)
    scale = 1.5 * covariance.diagonal().sqrt()
    q = pyro_dist.Normal(mean, scale).to_event(1)
    exact_kl = torch.distributions.kl_divergence(q, pyro_dist.Normal(torch.zeros_like(mean), 1.0)
                                                 .to_event(1))
    torch.testing.assert_close(terms.kl, exact_kl)  # analytic, so exact
    # E_q ||x - W z - b||^2 = ||x - W m - b||^2 + tr(W S W^T), S = diag(scale^2)
    residual = ((x - mean @ problem.weight.T - problem.bias) ** 2).sum(-1)
    trace = (problem.weight**2 @ scale**2).sum()
    n = x.shape[1]
    exact_re = -0.5 * (residual + trace) / problem.noise**2 - n * math.log(
        problem.noise * math.sqrt(2 * math.pi))
    torch.testing.assert_close(terms.reconstruction, exact_re, atol=0.05, rtol=0)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl)


@BOTH_TRACE_PATHS
def test_analytic_kl_elbo_equals_trace_elbo_in_expectation(linear_gaussian, validation):
    with pyro.validation_enabled(validation):
        problem, x = linear_gaussian
        torch.manual_seed(2)
        analytic = TraceAnalyticKL_ELBO(num_particles=20_000, vectorize_particles=True,
                                        max_plate_nesting=1)
        monte_carlo = pyro.infer.Trace_ELBO(num_particles=20_000, vectorize_particles=True,
                                            max_plate_nesting=1)
        value = analytic.loss(problem.model, problem.rough_guide, x)
        reference = monte_carlo.loss(problem.model, problem.rough_guide, x)
        assert value == pytest.approx(reference, rel=2e-3)
        exact = -elbo_terms(problem.model, problem.rough_guide, x, num_particles=20_000).elbo.sum()
        assert value == pytest.approx(float(exact), rel=2e-3)


def test_analytic_kl_elbo_gradient_matches_finite_differences(linear_gaussian):
    """The ELBO of a Gaussian guide is smooth in its scale: with common random numbers the
    estimator's gradient equals the derivative of its own value."""
    problem, x = linear_gaussian
    elbo = TraceAnalyticKL_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1)

    def loss_at(scale):
        pyro.set_rng_seed(3)
        return elbo.differentiable_loss(problem.model, problem.rough_guide, x, scale)

    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_at(scale), scale)
    h = 1e-6
    plus, minus = (torch.tensor(1.3 + s * h, dtype=F64) for s in (1, -1))
    numeric = (loss_at(plus) - loss_at(minus)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kl_scale", [1.0, 0.3])
@BOTH_TRACE_PATHS
def test_analytic_kl_elbo_gradient_through_rejection_sampler(kl_scale, validation):
    """Partially reparameterized guide: ELBO_i = c x_i A(kappa_i) - beta KL(kappa_i), so
    dELBO/dkappa_i = (c x_i - beta kappa_i) A'(kappa_i); 4 standard errors over 30 runs."""
    with pyro.validation_enabled(validation):
        m, c, model, guide = vmf_problem()
        x = torch.tensor([1.0, 2.0], dtype=F64)
        kappa = torch.tensor([2.0, 7.0], dtype=F64)
        elbo = TraceAnalyticKL_ELBO(num_particles=1000, vectorize_particles=True,
                                    max_plate_nesting=1)
        torch.manual_seed(0)
        grads = []
        for _ in range(30):
            concentration = kappa.clone().requires_grad_()
            loss = elbo.differentiable_loss(model, guide, x, concentration, kl_scale=kl_scale)
            grads.append(-torch.autograd.grad(loss, concentration)[0])
        grads = torch.stack(grads)
        from pyro_dgm.special import bessel_iv_ratio

        ratio = bessel_iv_ratio(0.5 * m - 1, kappa)
        derivative = 1 - ratio**2 - (m - 1) * ratio / kappa
        exact = (c * x - kl_scale * kappa) * derivative
        assert ((grads.mean(0) - exact).abs() < 4 * grads.std(0) / math.sqrt(30)).all()


@BOTH_TRACE_PATHS
def test_differentiable_loss_value_is_the_elbo_estimate(validation):
    """The score-function terms are zero-valued: the loss is -(E log lik - KL) exactly."""
    with pyro.validation_enabled(validation):
        m, c, model, guide = vmf_problem()
        x = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
        concentration = torch.tensor([1.0, 3.0, 9.0], dtype=F64)
        pyro.set_rng_seed(0)
        loss = TraceAnalyticKL_ELBO().differentiable_loss(model, guide, x, concentration)
        pyro.set_rng_seed(0)
        guide_trace = poutine.trace(guide).get_trace(x, concentration)
        z = guide_trace.nodes["z"]["value"]
        q = guide_trace.nodes["z"]["fn"]
        kl = torch.distributions.kl_divergence(q, HypersphericalUniform(m, dtype=F64).expand([3]))
        direction = torch.tensor([0.0, 0.6, 0.0, 0.8], dtype=F64)
        expected = -(c * (z @ direction) * x - kl).sum()
        torch.testing.assert_close(loss, expected)


@BOTH_TRACE_PATHS
def test_subsampling_scale_applies_to_every_term(validation):
    with pyro.validation_enabled(validation):
        m, c, model, guide = vmf_problem()

        def subsampled(fn):
            def wrapped(x, indices, concentration, num_data):
                with poutine.scale(scale=num_data / x.shape[0]):
                    fn(x, concentration)
            return wrapped

        x = torch.tensor([1.0, 2.0], dtype=F64)
        concentration = torch.tensor([2.0, 5.0], dtype=F64)
        pyro.set_rng_seed(0)
        full = TraceAnalyticKL_ELBO().differentiable_loss(model, guide, x, concentration)
        pyro.set_rng_seed(0)
        scaled = TraceAnalyticKL_ELBO().differentiable_loss(
            subsampled(model), subsampled(guide), x, None, concentration, 10)
        torch.testing.assert_close(scaled, 5 * full)


def test_lean_traces_compute_no_log_density_of_a_site_with_analytic_kl(monkeypatch):
    """Without validation, a latent site whose KL is analytic costs no log-density, neither
    in the model (the prior's) nor in the guide (the vMF's score comes alone); the value is
    the same as with Pyro's traces."""
    m, c, model, guide = vmf_problem()
    x = torch.tensor([1.0, -1.0, 0.5], dtype=F64)
    concentration = torch.tensor([1.0, 3.0, 9.0], dtype=F64)
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        expected = TraceAnalyticKL_ELBO().differentiable_loss(model, guide, x, concentration)

    def refuse(self, value):
        raise AssertionError(f"{type(self).__name__}.log_prob was computed")

    monkeypatch.setattr(HypersphericalUniform, "log_prob", refuse)
    monkeypatch.setattr(VonMisesFisher, "log_prob", refuse)
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(False):
        loss = TraceAnalyticKL_ELBO().differentiable_loss(model, guide, x, concentration)
    torch.testing.assert_close(loss, expected)


def test_importance_log_likelihood_rejects_bad_arguments(linear_gaussian):
    problem, x = linear_gaussian
    with pytest.raises(ValueError, match="num_samples"):
        importance_log_likelihood(problem.model, problem.rough_guide, x, num_samples=0)
    with pytest.raises(ValueError, match="data plate"):
        importance_log_likelihood(problem.model, problem.rough_guide, x, data_plate="pixels")


def test_evaluate_dataset_averages_batches(linear_gaussian):
    problem, x = linear_gaussian
    result = evaluate_dataset(problem.model, problem.exact_guide, x, batch_size=4,
                              num_samples=3, num_particles=2)
    exact = float(problem.marginal().log_prob(x).mean())
    assert result.log_likelihood == pytest.approx(exact, rel=1e-10)
    assert result.elbo == pytest.approx(exact, rel=1e-10)
    assert result.elbo == pytest.approx(result.reconstruction - result.kl, rel=1e-12)
    assert set(result.as_dict()) >= {"log_likelihood", "elbo", "reconstruction", "kl"}
    assert result.bits_per_dim == pytest.approx(-exact / (4 * math.log(2)), rel=1e-10)
    estimate = importance_log_likelihood(problem.model, problem.exact_guide, x, num_samples=3)
    torch.testing.assert_close(estimate.bits_per_dim(4),
                               -problem.marginal().log_prob(x) / (4 * math.log(2)))
