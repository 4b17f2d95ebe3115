"""VonMisesFisher: exactness of density and sampler, unbiased gradients, shapes, validation.

Statistical tests use fixed seeds; their thresholds (p-values > 1e-3, 3 or 4 standard errors)
are stated where they are used.
"""

import math

import numpy as np
import pyro
import pyro.distributions as pyro_dist
import pytest
import scipy.integrate
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions.testing.gof import auto_goodness_of_fit

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher, log_sphere_surface_area
from pyro_dgm.distributions.von_mises_fisher import (
    _ReparameterizedSample,
    _RotateFromPole,
    _WoodTransform,
)
from pyro_dgm.infer import TraceAnalyticKL_ELBO
from pyro_dgm.special import bessel_iv_ratio

F64 = torch.float64


def unit(vector):
    vector = torch.as_tensor(vector, dtype=F64)
    return vector / vector.norm(dim=-1, keepdim=True)


def random_unit(m, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return unit(torch.randn(*shape, m, generator=generator, dtype=F64))


def mean_resultant_length(m, kappa):
    return bessel_iv_ratio(0.5 * m - 1, torch.as_tensor(kappa, dtype=F64))


def exact_w_cdf(m, kappa):
    """CDF of w = mu^T z: density proportional to exp(kappa w) (1 - w^2)^((m - 3) / 2)."""

    def log_density(w):
        return kappa * (w - 1) + 0.5 * (m - 3) * np.log1p(-w * w)

    norm = scipy.integrate.quad(lambda w: np.exp(log_density(w)), -1, 1, limit=200)[0]

    def cdf(values):
        return np.array([
            scipy.integrate.quad(lambda w: np.exp(log_density(w)), -1, v, limit=200)[0] / norm
            for v in np.atleast_1d(values)
        ])

    return cdf


# Density and entropy ----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 5, 10, 64])
@pytest.mark.parametrize("kappa", [0.01, 1.0, 7.5, 200.0, 1e4])
def test_log_prob_and_entropy_match_scipy(m, kappa):
    loc = random_unit(m, seed=m)
    q = VonMisesFisher(loc, torch.tensor(kappa, dtype=F64))
    points = random_unit(m, 20, seed=1)
    points[0] = loc  # the mode
    reference = scipy.stats.vonmises_fisher(loc.numpy(), kappa)
    np.testing.assert_allclose(q.log_prob(points).numpy(), reference.logpdf(points.numpy()),
                               rtol=1e-12, atol=1e-9)
    assert float(q.entropy()) == pytest.approx(reference.entropy(), rel=1e-10, abs=1e-9)


@pytest.mark.parametrize("m, kappa", [(3, 5.0), (5, 2.0), (8, 20.0)])
def test_log_prob_integrates_to_one(m, kappa):
    """Monte Carlo over the uniform distribution: |S| E_U[q(z)] = 1, within 4 standard errors."""
    torch.manual_seed(0)
    q = VonMisesFisher(random_unit(m), torch.tensor(kappa, dtype=F64))
    uniform = HypersphericalUniform(m, dtype=F64)
    z = uniform.sample((400_000,))
    ratio = torch.exp(q.log_prob(z) - uniform.log_prob(z))
    standard_error = ratio.std() / math.sqrt(len(ratio))
    assert abs(ratio.mean() - 1) < 4 * standard_error


def test_zero_concentration_is_uniform():
    m = 6
    q = VonMisesFisher(random_unit(m), torch.tensor(0.0, dtype=F64))
    z = random_unit(m, 10, seed=3)
    torch.testing.assert_close(q.log_prob(z), torch.full((10,), -log_sphere_surface_area(m),
                                                         dtype=F64))
    assert float(q.entropy()) == pytest.approx(log_sphere_surface_area(m), rel=1e-14)
    torch.manual_seed(0)
    w = (q.sample((20_000,)) @ q.loc).numpy()
    # under the uniform, (1 + w) / 2 ~ Beta((m - 1) / 2, (m - 1) / 2)
    p_value = scipy.stats.kstest((1 + w) / 2, scipy.stats.beta((m - 1) / 2, (m - 1) / 2).cdf)[1]
    assert p_value > 1e-3


# Sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, kappa", [(3, 0.3), (3, 40.0), (4, 1.0), (5, 2.0), (10, 50.0), (65, 10.0), (100, 15.0)]
)
def test_w_has_the_exact_distribution(m, kappa):
    """KS test of w = mu^T z against its exact CDF (numerical quadrature), p > 1e-3."""
    torch.manual_seed(m)
    q = VonMisesFisher(random_unit(m), torch.tensor(kappa, dtype=F64))
    w = (q.sample((4000,)) @ q.loc).numpy()
    assert scipy.stats.kstest(w, exact_w_cdf(m, kappa))[1] > 1e-3


@pytest.mark.parametrize("m, kappa", [(4, 1.0), (11, 20.0), (65, 300.0)])
def test_w_has_the_exact_distribution_in_small_batches(m, kappa):
    """KS test (p > 1e-3) of w pooled over 60 draws of a batch of 64, the training step's
    shape: each round's proposals then come from two gamma variates (_proposal_pairs), where
    a large sample takes the t construction."""
    torch.manual_seed(m)
    q = VonMisesFisher(random_unit(m).expand(64, m), torch.full((64,), kappa, dtype=F64))
    w = torch.cat([q.sample() @ q.loc[0] for _ in range(60)]).numpy()
    assert scipy.stats.kstest(w, exact_w_cdf(m, kappa))[1] > 1e-3


def test_large_dimension_moderate_concentration_mean():
    """m = 100, kappa = 15: E[w] = A_m(kappa) = 0.147; the Taylor-switching envelope of the
    reference code samples E[w] = -0.243 here. Within 4 standard errors."""
    torch.manual_seed(0)
    m, kappa = 100, 15.0
    q = VonMisesFisher(random_unit(m), torch.tensor(kappa, dtype=F64))
    w = q.sample((50_000,)) @ q.loc
    exact = float(mean_resultant_length(m, kappa))
    assert exact == pytest.approx(0.147, abs=5e-4)
    assert abs(w.mean() - exact) < 4 * w.std() / math.sqrt(len(w))


def test_samples_agree_with_scipy_sampler():
    """Two-sample KS test of w against scipy.stats.vonmises_fisher's sampler, p > 1e-3."""
    torch.manual_seed(1)
    m, kappa = 7, 3.0
    loc = random_unit(m)
    ours = (VonMisesFisher(loc, kappa).sample((5000,)).to(F64) @ loc).numpy()
    theirs = scipy.stats.vonmises_fisher(loc.numpy(), kappa).rvs(5000, random_state=1)
    assert scipy.stats.ks_2samp(ours, theirs @ loc.numpy())[1] > 1e-3


@pytest.mark.parametrize("m, kappa", [(3, 2.0), (3, 30.0), (4, 5.0)])
def test_goodness_of_fit_of_the_full_vector(m, kappa):
    """Pyro's nearest-neighbour goodness-of-fit test on the sphere (manifold dim m - 1)."""
    torch.manual_seed(0)
    q = VonMisesFisher(random_unit(m), torch.tensor(kappa, dtype=F64))
    z = q.sample((12_000,))
    assert auto_goodness_of_fit(z, q.log_prob(z).exp(), dim=m - 1) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loc_kind", ["e1", "-e1", "near e1", "random"])
def test_samples_lie_on_the_sphere(dtype, loc_kind):
    m = 10
    loc = {
        "e1": torch.eye(m, dtype=F64)[0],
        "-e1": -torch.eye(m, dtype=F64)[0],
        "near e1": unit(torch.eye(m, dtype=F64)[0] + 1e-9 * torch.ones(m, dtype=F64)),
        "random": random_unit(m),
    }[loc_kind].to(dtype)
    concentration = torch.tensor([0.0, 1.0, 100.0, 1e5], dtype=dtype)
    torch.manual_seed(0)
    z = VonMisesFisher(loc, concentration).sample((500,))
    assert z.shape == (500, 4, m) and z.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((z.norm(dim=-1) - 1).abs() < 10 * eps * math.sqrt(m)).all()
    # with kappa = 1e5 the samples sit next to the mean direction
    assert ((z[:, 3] @ loc) > 0.99).all()


def test_sample_mean_matches_mean():
    torch.manual_seed(0)
    q = VonMisesFisher(random_unit(5, 3), torch.tensor([0.5, 4.0, 60.0], dtype=F64))
    z = q.sample((40_000,))
    standard_error = z.std(0) / math.sqrt(len(z))
    assert ((z.mean(0) - q.mean).abs() < 4 * standard_error + 1e-12).all()
    torch.testing.assert_close(q.mean.norm(dim=-1), mean_resultant_length(5, q.concentration))


# Gradients ----------------------------------------------------------------------------------


def exact_mean_derivative(m, kappa):
    """d/dkappa E[mu^T z] = A' = 1 - A^2 - (m - 1) A / kappa."""
    a = float(mean_resultant_length(m, kappa))
    return 1 - a * a - (m - 1) * a / kappa


def gradient_estimates(m, kappa, gradient, count):
    """Per-sample estimates of d E[mu^T z] / d kappa (one distribution per sample)."""
    concentration = torch.full((count,), kappa, dtype=F64, requires_grad=True)
    loc = torch.eye(m, dtype=F64)[0]
    q = VonMisesFisher(loc, concentration, gradient=gradient)
    z = q.rsample()
    score = q.score_parts(z).score_function
    f = z @ loc
    surrogate = f + f.detach() * (score - score.detach()) if torch.is_tensor(score) else f
    (grad,) = torch.autograd.grad(surrogate.sum(), concentration)
    return grad


@pytest.mark.parametrize(
    "m, kappa", [(3, 0.5), (3, 20.0), (4, 1.0), (5, 2.0), (5, 30.0), (11, 10.0), (65, 40.0)]
)
def test_rsvi_gradient_is_unbiased(m, kappa):
    """Within 3 standard errors of the exact dA_m/dkappa (m = 5, kappa = 2: 0.1474)."""
    torch.manual_seed(m)
    grad = gradient_estimates(m, kappa, "rsvi", 200_000)
    exact = exact_mean_derivative(m, kappa)
    if (m, kappa) == (5, 2.0):
        assert exact == pytest.approx(0.1474, abs=1e-4)
    assert abs(grad.mean() - exact) < 3 * grad.std() / math.sqrt(len(grad))


def test_pathwise_gradient_is_biased():
    """Without the correction term the estimate is about 0.128 instead of 0.147."""
    torch.manual_seed(0)
    grad = gradient_estimates(5, 2.0, "pathwise", 200_000)
    exact = exact_mean_derivative(5, 2.0)
    assert grad.mean() == pytest.approx(0.1277, abs=0.003)
    assert abs(grad.mean() - exact) > 10 * grad.std() / math.sqrt(len(grad))


def test_score_function_has_zero_mean():
    torch.manual_seed(0)
    concentration = torch.full((100_000,), 3.0, dtype=F64, requires_grad=True)
    q = VonMisesFisher(random_unit(6), concentration)
    score = q.score_parts(q.rsample()).score_function
    (grad,) = torch.autograd.grad(score.sum(), concentration)
    assert abs(grad.mean()) < 4 * grad.std() / math.sqrt(len(grad))


def test_score_parts_recovers_the_proposal_for_foreign_values():
    """score_parts of a value that is not the last sample: eps recovered from mu^T z."""
    torch.manual_seed(0)
    q = VonMisesFisher(random_unit(7, 50), torch.full((50,), 4.0, dtype=F64))
    z = q.rsample()
    cached = q.score_parts(z).score_function
    recovered = q.score_parts(z.clone()).score_function
    torch.testing.assert_close(recovered, cached, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("loss", [TraceAnalyticKL_ELBO, pyro.infer.Trace_ELBO])
def test_svi_gradients_are_unbiased(loss, validation):
    """ELBO of a guide vMF(mu, kappa) against a uniform prior and a factor c mu0^T z:
    ELBO(kappa) = c A(kappa) - KL(kappa), so dELBO/dkappa = (c - kappa) A'(kappa). The mean of
    20 independent gradient estimates is within 4 standard errors of it, with Pyro's
    validation on and off (TraceAnalyticKL_ELBO's lean traces)."""
    m, c, kappa = 5, 6.0, 2.0
    loc = torch.eye(m, dtype=F64)[0]

    def model():
        z = pyro.sample("z", HypersphericalUniform(m, dtype=F64))
        pyro.factor("likelihood", c * (z @ loc))

    def guide(concentration):
        pyro.sample("z", VonMisesFisher(loc, concentration))

    def wrapped_model(concentration):
        model()

    elbo = loss(num_particles=2000, vectorize_particles=True, max_plate_nesting=0)
    torch.manual_seed(0)
    grads = []
    for _ in range(20):
        concentration = torch.tensor(kappa, dtype=F64, requires_grad=True)
        with pyro.validation_enabled(validation):
            loss_value = elbo.differentiable_loss(wrapped_model, guide, concentration)
        grads.append(-torch.autograd.grad(loss_value, concentration)[0])
    grads = torch.stack(grads)
    exact = (c - kappa) * exact_mean_derivative(m, kappa)
    assert abs(grads.mean() - exact) < 4 * grads.std() / math.sqrt(len(grads))


@pytest.mark.parametrize("loss", [TraceAnalyticKL_ELBO, pyro.infer.Trace_ELBO])
def test_to_event_keeps_the_score_function(loss):
    """Two vMF components of one event (to_event): Pyro's Independent would drop the score
    function; ours sums it, so the ELBO gradient 2 (c - kappa) A'(kappa) of the example above
    is still unbiased (4 standard errors over 20 estimates)."""
    m, c, kappa = 5, 6.0, 2.0
    loc = torch.eye(m, dtype=F64)[0]

    def model(concentration):
        z = pyro.sample("z", HypersphericalUniform(m, dtype=F64).expand([2]).to_event(1))
        pyro.factor("likelihood", c * (z @ loc).sum(-1))

    def guide(concentration):
        pyro.sample("z", VonMisesFisher(loc.expand(2, m), concentration.expand(2)).to_event(1))

    elbo = loss(num_particles=2000, vectorize_particles=True, max_plate_nesting=0)
    torch.manual_seed(0)
    grads = []
    for _ in range(20):
        concentration = torch.tensor(kappa, dtype=F64, requires_grad=True)
        loss_value = elbo.differentiable_loss(model, guide, concentration)
        grads.append(-torch.autograd.grad(loss_value, concentration)[0])
    grads = torch.stack(grads)
    exact = 2 * (c - kappa) * exact_mean_derivative(m, kappa)
    assert abs(grads.mean() - exact) < 4 * grads.std() / math.sqrt(len(grads))
    q = VonMisesFisher(loc.expand(2, 3, m), torch.full((2, 3), kappa, dtype=F64))
    independent = q.to_event(1).to_event(1)  # nested: one Independent over both dimensions
    z = independent.rsample()
    assert independent.event_shape == (2, 3, m) and independent.to_event(0) is independent
    torch.testing.assert_close(independent.score_parts(z).score_function,
                               q.score_function(z).sum((-2, -1)))


@pytest.mark.parametrize("m", [4, 11])
def test_wood_transform_backward_matches_finite_differences(m):
    """The hand-written derivatives in kappa of w, sqrt(1 - w^2) and the proposal's score,
    from kappa near 0 to kappa = 500, with eps near 0, 1/2 and 1; and the values agree with
    the formulas written out."""
    kappa = torch.tensor([0.05, 1.0, 2.0, 30.0, 500.0, 7.0], dtype=F64)
    proposal = torch.tensor([0.3, 1e-3, 0.5, 0.999, 0.2, 0.7], dtype=F64)
    complement = 1 - proposal
    b = (m - 1) / (2 * kappa + torch.sqrt(4 * kappa**2 + (m - 1) ** 2))
    w, root, score = _WoodTransform.apply(kappa, proposal, complement, m, b)[:3]
    denominator = 1 - (1 - b) * proposal
    torch.testing.assert_close(w, 1 - 2 * b * proposal / denominator, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(root, torch.sqrt(1 - w**2), rtol=1e-9, atol=1e-12)
    expected = kappa * w + 0.5 * (m - 1) * b.log() - (m - 1) * denominator.log()
    torch.testing.assert_close(score, expected, rtol=1e-13, atol=1e-13)
    def transform(k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b_at_k = (m - 1) / (2 * k.detach() + torch.sqrt(4 * k.detach() ** 2 + (m - 1) ** 2))
        return _WoodTransform.apply(k, proposal, complement, m, b_at_k)[:3]

    assert torch.autograd.gradcheck(transform, (kappa.clone().requires_grad_(),))


def test_score_normalizer_derivative_matches_finite_differences():
    """score - log 0F1(kappa) - log|S|, with kappa broadcast over a sample dimension: the
    hand-written derivative -A_m(kappa) of _SubtractNormalizer against finite differences."""
    from pyro_dgm.distributions.von_mises_fisher import _SubtractNormalizer
    from pyro_dgm.special import log_bessel_iv_normalized_and_ratio_values

    m = 7

    def subtract(score, kappa):
        values = log_bessel_iv_normalized_and_ratio_values(0.5 * m - 1, kappa)
        return _SubtractNormalizer.apply(score, kappa, *values, log_sphere_surface_area(m),
                                        0.5 * m - 1)

    score = torch.randn(3, 4, dtype=F64, requires_grad=True)
    kappa = torch.tensor([0.05, 1.0, 30.0, 700.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(subtract, (score, kappa))


def _locs_of_every_sign(m: int) -> torch.Tensor:
    """Unit vectors with mu_1 of both signs, mu_1 = +0.0 and -0.0, and mu = +e_1 and -e_1."""
    loc = random_unit(m, 10)
    loc[:3, 0] = -loc[:3, 0].abs()
    loc[3:6, 0] = loc[3:6, 0].abs()
    loc[6:8, 0] = 0.0
    loc[6:8, 1:] = random_unit(m - 1, 2, seed=3)
    loc[7, 0] = -0.0
    loc[8:] = 0.0
    loc[8, 0], loc[9, 0] = 1.0, -1.0
    return loc


@pytest.mark.parametrize("m", [3, 6])
def test_rotation_from_the_pole_matches_finite_differences_and_maps_e1_to_loc(m):
    torch.manual_seed(1)
    loc = _locs_of_every_sign(m)
    n = loc.shape[0]
    w = 2 * torch.rand(n, dtype=F64) - 1
    tangent = random_unit(m - 1, n, seed=5)
    z = _RotateFromPole.apply(loc, w, (1 - w**2).sqrt(), tangent)[0]
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(n, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close((z * loc).sum(-1), w, rtol=0, atol=1e-15)  # mu^T z = w
    pole = _RotateFromPole.apply(loc, torch.ones(n, dtype=F64), torch.zeros(n, dtype=F64),
                                 tangent)[0]
    torch.testing.assert_close(pole, loc, rtol=0, atol=1e-15)
    # the map is orthogonal: the tangent directions stay orthogonal to loc and to each other
    other = random_unit(m - 1, n, seed=6)
    other = other - (other * tangent).sum(-1, keepdim=True) * tangent
    zero, one = torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64)
    along, across = (_RotateFromPole.apply(loc, zero, one, t)[0] for t in (tangent, other))
    torch.testing.assert_close((along * loc).sum(-1), zero, rtol=0, atol=1e-15)
    torch.testing.assert_close((along * across).sum(-1), zero, rtol=0, atol=1e-15)
    # the reflection changes with the sign of mu_1: no derivative across mu_1 = 0
    smooth = loc[:, 0] != 0
    arguments = (loc[smooth].requires_grad_(), w[smooth].requires_grad_(),
                 (1 - w[smooth] ** 2).sqrt().requires_grad_(), tangent[smooth])
    assert torch.autograd.gradcheck(lambda *a: _RotateFromPole.apply(*a)[0], arguments)


def test_reparameterized_sample_node_matches_finite_differences():
    """The one node of rsample (Wood's map, then the rotation) against finite differences, in
    loc and kappa, for the sample and the proposals' score together."""
    m, n = 6, 10
    loc = _locs_of_every_sign(m)
    kappa = torch.tensor([0.05, 1.0, 2.0, 30.0, 500.0, 7.0, 3.0, 0.5, 11.0, 60.0], dtype=F64)
    proposal = torch.tensor([0.3, 1e-3, 0.5, 0.999, 0.2, 0.7, 0.4, 0.6, 0.05, 0.9], dtype=F64)
    tangent = random_unit(m - 1, n, seed=7)

    def sample(loc, k, proposal, tangent) -> tuple[torch.Tensor, torch.Tensor]:
        b_at_k = (m - 1) / (2 * k.detach() + torch.sqrt(4 * k.detach() ** 2 + (m - 1) ** 2))
        return _ReparameterizedSample.apply(loc, k, proposal, 1 - proposal, b_at_k, tangent,
                                            m)[:2]

    z, _ = sample(loc, kappa, proposal, tangent)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(n, dtype=F64), rtol=0, atol=1e-15)
    smooth = loc[:, 0] != 0  # the reflection changes with the sign of mu_1
    arguments = (loc[smooth].requires_grad_(), kappa[smooth].requires_grad_(),
                 proposal[smooth], tangent[smooth])
    assert torch.autograd.gradcheck(sample, arguments)


def test_m3_is_fully_reparameterized():
    q = VonMisesFisher(unit([0.0, 0.0, 1.0]), torch.tensor(5.0, dtype=F64))
    z = q.rsample((10,))
    parts = q.score_parts(z)
    assert parts.score_function == 0
    assert parts.entropy_term is parts.log_prob


def test_gradients_reach_loc_and_concentration_in_float32():
    loc = torch.randn(8, 4, requires_grad=True)
    concentration = torch.rand(8, requires_grad=True)
    q = VonMisesFisher(torch.nn.functional.normalize(loc, dim=-1), 10 * concentration + 1)
    z = q.rsample((3,))
    loss = (z * torch.arange(4.0)).sum() + q.log_prob(z).sum() + q.entropy().sum()
    loss.backward()
    assert torch.isfinite(loc.grad).all() and (loc.grad != 0).any()
    assert torch.isfinite(concentration.grad).all() and (concentration.grad != 0).all()


# Shapes, broadcasting, expand, validation -------------------------------------------------


def test_shapes_and_broadcasting():
    loc = random_unit(4, 3, 1)  # batch (3, 1)
    concentration = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)  # (5,)
    q = VonMisesFisher(loc, concentration)
    assert q.batch_shape == (3, 5) and q.event_shape == (4,)
    assert q.sample().shape == (3, 5, 4)
    assert q.rsample((2, 7)).shape == (2, 7, 3, 5, 4)
    assert q.log_prob(random_unit(4, 2, 1, 1)).shape == (2, 3, 5)
    assert q.entropy().shape == (3, 5) and q.mean.shape == (3, 5, 4)
    assert q.mode.shape == (3, 5, 4)
    independent = q.to_event(1)
    assert independent.batch_shape == (3,) and independent.event_shape == (5, 4)


def test_expand_keeps_distribution_and_gradient_mode():
    q = VonMisesFisher(random_unit(3), torch.tensor(2.0, dtype=F64), gradient="pathwise")
    expanded = q.expand([6, 2])
    assert expanded.batch_shape == (6, 2) and expanded.gradient == "pathwise"
    z = random_unit(3, 6, 2, seed=2)
    torch.testing.assert_close(expanded.log_prob(z), q.log_prob(z))
    assert expanded.sample((4,)).shape == (4, 6, 2, 3)
    assert isinstance(pyro_dist.Normal(0, 1).expand([2]), pyro_dist.Normal)  # sanity


@pytest.mark.parametrize(
    "loc, concentration, message",
    [
        (torch.tensor([1.0, 1.0, 0.0]), 1.0, "loc"),
        (torch.tensor([1.0, 0.0, 0.0]), -1.0, "concentration"),
        (torch.tensor([1.0, 0.0, 0.0]), float("nan"), "concentration"),
        (torch.tensor([1.0]), 1.0, "m >= 2"),
        (torch.tensor(1.0), 1.0, "m >= 2"),
        (torch.eye(3)[:2], torch.ones(3), "do not broadcast"),
    ],
)
def test_bad_parameters_raise_value_error(loc, concentration, message):
    with pytest.raises(ValueError, match=message):
        VonMisesFisher(loc, concentration, validate_args=True)


def test_bad_gradient_mode_and_off_sphere_value():
    with pytest.raises(ValueError, match="gradient"):
        VonMisesFisher(torch.tensor([1.0, 0.0]), 1.0, gradient="reinforce")
    q = VonMisesFisher(torch.tensor([1.0, 0.0]), 1.0, validate_args=True)
    with pytest.raises(ValueError, match="support"):
        q.log_prob(torch.tensor([2.0, 0.0]))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 40),
    kappa=st.floats(0, 1e4, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_properties_hold_for_random_parameters(m, kappa, seed):
    torch.manual_seed(seed)
    q = VonMisesFisher(random_unit(m, seed=seed), torch.tensor(kappa, dtype=F64))
    z = q.sample((64,))
    assert ((z.norm(dim=-1) - 1).abs() < 1e-12).all()
    log_prob = q.log_prob(z)
    assert torch.isfinite(log_prob).all()
    # the density is largest at the mode, and the entropy at most that of the uniform
    assert (log_prob <= q.log_prob(q.loc) + 1e-9).all()
    assert float(q.entropy()) <= log_sphere_surface_area(m) + 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_log_prob_and_gradients():
    loc = random_unit(11, 256).float().cuda()
    concentration = torch.linspace(0, 500, 256, device="cuda", requires_grad=True)
    q = VonMisesFisher(loc, concentration)
    z = q.rsample((4,))
    assert z.device.type == "cuda" and ((z.norm(dim=-1) - 1).abs() < 1e-5).all()
    cpu = VonMisesFisher(loc.cpu(), concentration.detach().cpu())
    torch.testing.assert_close(q.log_prob(z).cpu(), cpu.log_prob(z.cpu()), rtol=1e-5, atol=1e-4)
    score = q.score_parts(z).score_function
    (z.sum() + (score - score.detach()).sum()).backward()
    assert concentration.grad.device.type == "cuda" and torch.isfinite(concentration.grad).all()


@pytest.mark.parametrize("shape", [(64, 8), (4096, 1)], ids=["two gammas", "t"])
@pytest.mark.parametrize("a", [0.5, 5.0, 32.0])
def test_proposal_pairs_are_symmetric_beta(shape, a):
    """eps = P_1 / (P_1 + P_2) of both proposal sources is Beta(a, a): KS test, p > 1e-3, over
    20 draws of each shape."""
    from pyro_dgm.distributions.von_mises_fisher import _proposal_pairs

    torch.manual_seed(13)
    like = torch.zeros((), dtype=F64)
    pairs = torch.cat([_proposal_pairs(like, shape, a).reshape(-1, 2) for _ in range(20)])
    assert (pairs > 0).all()
    eps = (pairs[:, 0] / pairs.sum(-1)).numpy()
    assert scipy.stats.kstest(eps, scipy.stats.beta(a, a).cdf).pvalue > 1e-3


@pytest.mark.parametrize("a", [0.5, 1.0, 5.0, 32.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_proposal_is_symmetric_beta_and_its_complement_exact(a, dtype):
    """The sampler's proposal pair (eps, 1 - eps) from one gamma and one normal: Beta(a, a) by a
    Kolmogorov-Smirnov test against scipy (p > 1e-3, 20,000 draws), both positive, summing to
    1 within rounding."""
    from pyro_dgm.distributions.von_mises_fisher import _symmetric_beta_pair

    torch.manual_seed(12)
    eps, complement = _symmetric_beta_pair(torch.full((20_000,), a, dtype=dtype)).unbind(-1)
    assert eps.dtype == dtype
    assert scipy.stats.kstest(eps.double().numpy(), scipy.stats.beta(a, a).cdf).pvalue > 1e-3
    tiny = torch.finfo(dtype).eps
    assert ((eps + complement - 1).abs() <= 2 * tiny).all()
    assert ((eps > 0) & (complement > 0)).all()
