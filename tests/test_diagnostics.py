"""Latent-space diagnostics against exact references: closed-form KLs, 1-D quadrature of the
aggregate posterior, and posteriors whose mutual information is 0 or log N by construction.

Monte Carlo estimates are checked to within 5 standard errors, the standard error computed
exactly (in closed form or by quadrature) for the case at hand; the seeds are fixed, so the
tests are deterministic. The data are indices ``0..N-1`` into tables of posterior parameters.
"""

import math

import pyro.distributions as pyro_dist
import pytest
import torch
from pyro.distributions.transforms import AffineTransform

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher
from pyro_dgm.infer.diagnostics import active_units, bits_per_dim, elbo_surgery
from pyro_dgm.models import VAE

F64 = torch.float64
STANDARD_ERRORS = 5.0


def normal_posterior(locs, scales):
    """x (indices) -> N(locs[x], diag(scales[x]^2)), batch shape (B,), event shape (m,)."""
    return lambda index: pyro_dist.Normal(locs[index], scales[index]).to_event(1)


def standard_normal(dim, scale=1.0):
    return pyro_dist.Normal(torch.zeros(dim, dtype=F64), scale).to_event(1)


def gaussian_kl(locs, scales, prior_scale=1.0):
    """KL(N(loc, diag scale^2) || N(0, prior_scale^2 I)) per row."""
    ratio = (scales / prior_scale) ** 2
    return 0.5 * (ratio + (locs / prior_scale) ** 2 - 1 - ratio.log()).sum(-1)


def gaussian_log_ratio_variance(locs, scales, prior_scale=1.0):
    """Var_q[log q(z) - log p(z)] per row: with z = loc + scale eps, per coordinate
    (scale^2 / tau^2 - 1) eps^2 / 2 + loc scale eps / tau^2 + const."""
    ratio = (scales / prior_scale) ** 2
    return ((ratio - 1) ** 2 / 2 + ratio * (locs / prior_scale) ** 2).sum(-1)


def stratified_standard_error(variances, num_samples):
    """Standard error of the mean of num_samples draws from each of N components."""
    return math.sqrt(float(variances.sum()) / (len(variances) ** 2 * num_samples))


# ELBO surgery ----------------------------------------------------------------------------------


def test_identical_posteriors_carry_no_information():
    loc = torch.tensor([1.0, -0.5], dtype=F64)
    scale = torch.tensor([0.5, 1.5], dtype=F64)
    num_data, num_samples = 50, 40

    def posterior(x):
        return pyro_dist.Normal(loc, scale).expand([x.shape[0], 2]).to_event(1)

    result = elbo_surgery(posterior, standard_normal(2), torch.arange(num_data),
                          num_samples=num_samples, batch_size=16, seed=0)
    kl = float(gaussian_kl(loc, scale))
    # q_agg = q exactly, so every draw's log q(z|x) - log q_agg(z) is 0 up to rounding.
    assert abs(result.mutual_information) < 1e-12
    assert result.average_kl == pytest.approx(kl, abs=1e-12)
    error = math.sqrt(float(gaussian_log_ratio_variance(loc, scale)) / result.num_samples)
    assert abs(result.marginal_kl - kl) < STANDARD_ERRORS * error
    assert result.num_samples == num_data * num_samples
    assert result.log_num_data == pytest.approx(math.log(num_data), abs=1e-15)


def test_well_separated_posteriors_carry_log_n_nats():
    # A 5 x 5 grid with spacing 10 and scale 0.05: neighbours are 200 scales apart, so
    # q_agg(z) = q(z|x_n) / N to within exp(-20000) for z ~ q(z|x_n).
    grid = torch.arange(5, dtype=F64) * 10 - 20
    locs = torch.cartesian_prod(grid, grid)
    scales = torch.full_like(locs, 0.05)
    num_data, num_samples, prior_scale = len(locs), 20, 10.0
    result = elbo_surgery(normal_posterior(locs, scales), standard_normal(2, prior_scale),
                          torch.arange(num_data), num_samples=num_samples, batch_size=7, seed=1)
    assert result.mutual_information == pytest.approx(math.log(num_data), abs=1e-9)
    average_kl = float(gaussian_kl(locs, scales, prior_scale).mean())
    assert result.average_kl == pytest.approx(average_kl, abs=1e-12)
    error = stratified_standard_error(
        gaussian_log_ratio_variance(locs, scales, prior_scale), num_samples
    )
    assert abs(result.marginal_kl - (average_kl - math.log(num_data))) < STANDARD_ERRORS * error


class QuadratureCase:
    """N 1-D Gaussian posteriors, a N(0, 1) prior: the mutual information, the marginal KL and
    the variances of their per-draw terms by quadrature on a fine grid."""

    def __init__(self, num_data=20, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.locs = torch.rand(num_data, 1, generator=generator, dtype=F64) * 4 - 2
        self.scales = torch.rand(num_data, 1, generator=generator, dtype=F64) * 0.6 + 0.2
        z = torch.linspace(-9, 9, 36001, dtype=F64)
        weights = torch.full_like(z, float(z[1] - z[0]))  # trapezoid rule
        weights[[0, -1]] /= 2
        log_q = pyro_dist.Normal(self.locs, self.scales).log_prob(z)  # (N, G)
        log_aggregate = torch.logsumexp(log_q, 0) - math.log(num_data)
        log_prior = pyro_dist.Normal(0.0, 1.0).log_prob(z)
        density = log_q.exp() * weights
        self.kl = (density * (log_q - log_prior)).sum(-1)  # checks the grid
        mi_terms, marginal_terms = log_q - log_aggregate, log_aggregate - log_prior
        self.mi_n = (density * mi_terms).sum(-1)
        self.marginal_n = (density * marginal_terms).sum(-1)
        self.mi_variance_n = (density * (mi_terms - self.mi_n[:, None]) ** 2).sum(-1)
        self.marginal_variance_n = (
            density * (marginal_terms - self.marginal_n[:, None]) ** 2
        ).sum(-1)
        self.mutual_information = float(self.mi_n.mean())
        self.marginal_kl = float(self.marginal_n.mean())
        self.data = torch.arange(num_data)
        self.posterior = normal_posterior(self.locs, self.scales)


@pytest.fixture(scope="module")
def quadrature():
    return QuadratureCase()


def test_quadrature_reference_is_consistent(quadrature):
    closed_form = gaussian_kl(quadrature.locs, quadrature.scales)
    assert torch.allclose(quadrature.kl, closed_form, atol=1e-10, rtol=0)
    # The identity itself, exact for the exact quantities.
    assert quadrature.mutual_information + quadrature.marginal_kl == pytest.approx(
        float(closed_form.mean()), abs=1e-10
    )


def test_elbo_surgery_matches_quadrature(quadrature):
    num_samples = 50
    result = elbo_surgery(quadrature.posterior, standard_normal(1), quadrature.data,
                          num_samples=num_samples, batch_size=6, seed=2)
    assert result.average_kl == pytest.approx(float(quadrature.kl.mean()), abs=1e-10)
    mi_error = stratified_standard_error(quadrature.mi_variance_n, num_samples)
    marginal_error = stratified_standard_error(quadrature.marginal_variance_n, num_samples)
    assert abs(result.mutual_information - quadrature.mutual_information) < (
        STANDARD_ERRORS * mi_error
    )
    assert abs(result.marginal_kl - quadrature.marginal_kl) < STANDARD_ERRORS * marginal_error
    assert -STANDARD_ERRORS * mi_error < result.mutual_information <= result.log_num_data


def test_elbo_surgery_on_a_subset_of_points_matches_quadrature(quadrature):
    num_points, num_samples = 8, 100
    result = elbo_surgery(quadrature.posterior, standard_normal(1), quadrature.data,
                          num_samples=num_samples, num_points=num_points, batch_size=5, seed=3)
    assert result.num_samples == num_points * num_samples
    assert result.average_kl == pytest.approx(float(quadrature.kl.mean()), abs=1e-10)
    # Points drawn without replacement, then num_samples draws each: the variance is at most
    # Var_n(term mean) / n + E_n[Var(term)] / (n S).
    for estimate, means, variances, exact in (
        (result.mutual_information, quadrature.mi_n, quadrature.mi_variance_n,
         quadrature.mutual_information),
        (result.marginal_kl, quadrature.marginal_n, quadrature.marginal_variance_n,
         quadrature.marginal_kl),
    ):
        bound = float(means.var(correction=0)) / num_points + float(variances.mean()) / (
            num_points * num_samples
        )
        assert abs(estimate - exact) < STANDARD_ERRORS * math.sqrt(bound)


def test_prior_equal_to_the_aggregate_posterior(quadrature):
    # p = q_agg: the marginal KL vanishes draw by draw; the KL has no closed form, so the
    # average KL is the Monte Carlo mean from the same draws and equals the mutual information.
    mixture = pyro_dist.MixtureSameFamily(
        pyro_dist.Categorical(logits=torch.zeros(len(quadrature.data), dtype=F64)),
        pyro_dist.Normal(quadrature.locs, quadrature.scales).to_event(1),
    )
    num_samples = 50
    result = elbo_surgery(quadrature.posterior, lambda: mixture, quadrature.data,
                          num_samples=num_samples, batch_size=6, seed=4)
    assert abs(result.marginal_kl) < 1e-12
    assert result.average_kl == pytest.approx(result.mutual_information, abs=1e-12)
    error = stratified_standard_error(quadrature.mi_variance_n, num_samples)
    assert abs(result.mutual_information - quadrature.mutual_information) < (
        STANDARD_ERRORS * error
    )


def test_identity_on_a_random_two_dimensional_case():
    generator = torch.Generator().manual_seed(5)
    num_data, num_samples = 40, 25
    locs = torch.randn(num_data, 2, generator=generator, dtype=F64)
    scales = torch.rand(num_data, 2, generator=generator, dtype=F64) * 0.8 + 0.1
    result = elbo_surgery(normal_posterior(locs, scales), standard_normal(2),
                          torch.arange(num_data), num_samples=num_samples, batch_size=9, seed=5)
    # MI + marginal KL is the Monte Carlo mean of log q - log p from the same draws.
    error = stratified_standard_error(gaussian_log_ratio_variance(locs, scales), num_samples)
    total = result.mutual_information + result.marginal_kl
    assert abs(total - result.average_kl) < STANDARD_ERRORS * error
    assert 0 < result.mutual_information <= math.log(num_data)


def von_mises_fisher_kl_3d(concentration):
    """KL(vMF(mu, kappa) || U(S^2)) = log(kappa / sinh kappa) + kappa coth kappa - 1."""
    return (
        torch.log(concentration / torch.sinh(concentration))
        + concentration / torch.tanh(concentration) - 1
    )


def von_mises_fisher_log_ratio_variance_3d(concentration):
    """Var[kappa mu^T z] for z ~ vMF on S^2: kappa^2 (1 / kappa^2 - 1 / sinh^2 kappa)."""
    return 1 - (concentration / torch.sinh(concentration)) ** 2


def test_von_mises_fisher_identity_and_bounds():
    generator = torch.Generator().manual_seed(6)
    num_data, num_samples = 40, 25
    locs = torch.randn(num_data, 3, generator=generator, dtype=F64)
    locs = locs / locs.norm(dim=-1, keepdim=True)
    concentrations = torch.rand(num_data, generator=generator, dtype=F64) * 18 + 2

    def posterior(index):
        return VonMisesFisher(locs[index], concentrations[index])

    prior = HypersphericalUniform(3, dtype=F64)
    result = elbo_surgery(posterior, prior, torch.arange(num_data), num_samples=num_samples,
                          batch_size=16, seed=6)
    assert result.average_kl == pytest.approx(
        float(von_mises_fisher_kl_3d(concentrations).mean()), abs=1e-10
    )
    error = stratified_standard_error(
        von_mises_fisher_log_ratio_variance_3d(concentrations), num_samples
    )
    total = result.mutual_information + result.marginal_kl
    assert abs(total - result.average_kl) < STANDARD_ERRORS * error
    assert 0 < result.mutual_information <= math.log(num_data)
    assert result.marginal_kl > 0  # 40 caps of concentration >= 2 do not cover S^2 uniformly


def test_identical_von_mises_fisher_posteriors():
    loc = torch.tensor([0.0, 0.6, 0.8], dtype=F64)
    concentration = torch.tensor(7.0, dtype=F64)

    def posterior(x):
        return VonMisesFisher(loc, concentration).expand([x.shape[0]])

    result = elbo_surgery(posterior, HypersphericalUniform(3, dtype=F64), torch.arange(30),
                          num_samples=20, seed=7)
    kl = float(von_mises_fisher_kl_3d(concentration))
    assert abs(result.mutual_information) < 1e-12
    assert result.average_kl == pytest.approx(kl, abs=1e-10)
    error = math.sqrt(float(von_mises_fisher_log_ratio_variance_3d(concentration)) / 600)
    assert abs(result.marginal_kl - kl) < STANDARD_ERRORS * error


def test_seed_reproduces_and_leaves_the_global_state_alone(quadrature):
    state = torch.get_rng_state()
    first, second = (
        elbo_surgery(quadrature.posterior, standard_normal(1), quadrature.data,
                     num_samples=3, num_points=10, seed=8)
        for _ in range(2)
    )
    assert first == second
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("latent, flow", [("normal", None), ("vmf", None), ("normal", "iaf"),
                                          ("normal", "householder")])
def test_elbo_surgery_on_a_vae(latent, flow):
    torch.manual_seed(9)
    vae = VAE(latent, latent_dim=2, input_dim=6, hidden_dims=(8,), flow=flow, num_flows=2,
              param_store=False)
    data = torch.bernoulli(torch.full((30, 6), 0.4))
    if latent == "vmf":
        prior = HypersphericalUniform(vae.event_dim)
    else:
        prior = pyro_dist.Normal(torch.zeros(vae.event_dim), 1.0).to_event(1)
    result = elbo_surgery(vae.posterior, prior, data, num_samples=4, batch_size=64, seed=0)
    assert result.num_samples == 120
    # float32 rounding only: each draw's own component bounds its term by log N
    assert result.mutual_information <= result.log_num_data + 1e-5
    if flow is not None:  # no closed-form KL: the same draws serve all three terms
        total = result.mutual_information + result.marginal_kl
        assert total == pytest.approx(result.average_kl, abs=1e-6)


def test_elbo_surgery_refuses_a_flow_without_inverse():
    torch.manual_seed(10)
    vae = VAE("normal", latent_dim=2, input_dim=6, hidden_dims=(8,), flow="planar", num_flows=2,
              param_store=False)
    data = torch.bernoulli(torch.full((10, 6), 0.4))
    prior = pyro_dist.Normal(torch.zeros(2), 1.0).to_event(1)
    with pytest.raises(NotImplementedError, match="arbitrary points"):
        elbo_surgery(vae.posterior, prior, data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_elbo_surgery_on_cuda(quadrature):
    locs, scales = quadrature.locs.cuda(), quadrature.scales.cuda()
    prior = pyro_dist.Normal(torch.zeros(1, dtype=F64, device="cuda"), 1.0).to_event(1)
    state = torch.cuda.get_rng_state()
    num_samples = 50
    result = elbo_surgery(normal_posterior(locs, scales), prior, quadrature.data.cuda(),
                          num_samples=num_samples, batch_size=6, seed=11)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert result.average_kl == pytest.approx(float(quadrature.kl.mean()), abs=1e-10)
    error = stratified_standard_error(quadrature.mi_variance_n, num_samples)
    assert abs(result.mutual_information - quadrature.mutual_information) < (
        STANDARD_ERRORS * error
    )
    units = active_units(normal_posterior(locs, scales), quadrature.data.cuda())
    assert units.variances.device.type == "cuda"


# Active units ----------------------------------------------------------------------------------


def test_active_units_from_normal_means():
    generator = torch.Generator().manual_seed(12)
    num_data = 500
    factors = torch.randn(num_data, 3, generator=generator, dtype=F64)
    locs = torch.full((num_data, 6), 0.3, dtype=F64)
    locs[:, [0, 2, 4]] = factors * torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    locs[:, 5] += 0.05 * factors[:, 0]  # variance about 0.0025: below the threshold
    scales = torch.full_like(locs, 0.7)
    result = active_units(normal_posterior(locs, scales), torch.arange(num_data), batch_size=64)
    assert result.count == 3
    assert result.threshold == 0.01
    assert result.variances.dtype == F64 and result.variances.shape == (6,)
    assert torch.allclose(result.variances, locs.var(0), atol=1e-14, rtol=1e-12)
    assert result.variances[[1, 3]].abs().max() < 1e-28
    strict = active_units(normal_posterior(locs, scales), torch.arange(num_data), threshold=0.1)
    assert strict.count == 3
    loose = active_units(normal_posterior(locs, scales), torch.arange(num_data), threshold=0.0)
    assert loose.count == 4


def test_active_units_from_von_mises_fisher_means():
    generator = torch.Generator().manual_seed(13)
    num_data = 200
    angles = torch.rand(num_data, generator=generator, dtype=F64) * 2 * math.pi
    # Directions in the plane z = 0: the third coordinate of every mean is 0.
    locs = torch.stack([angles.cos(), angles.sin(), torch.zeros_like(angles)], -1)
    concentrations = torch.rand(num_data, generator=generator, dtype=F64) * 10 + 0.5

    def posterior(index):
        return VonMisesFisher(locs[index], concentrations[index])

    result = active_units(posterior, torch.arange(num_data))
    # E[z] = A_3(kappa) mu with A_3(kappa) = coth kappa - 1 / kappa on S^2.
    mean_length = 1 / torch.tanh(concentrations) - 1 / concentrations
    expected = (mean_length[:, None] * locs).var(0)
    assert torch.allclose(result.variances, expected, atol=1e-12, rtol=1e-10)
    assert result.count == 2


def test_active_units_from_monte_carlo_means():
    # A TransformedDistribution has no mean: the Monte Carlo path, with its noise removed.
    generator = torch.Generator().manual_seed(14)
    num_data, num_samples = 300, 200
    base_locs = torch.zeros(num_data, 4, dtype=F64)
    base_locs[:, :2] = torch.randn(num_data, 2, generator=generator, dtype=F64)
    shift = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=F64)
    scale = torch.tensor([0.5, 2.0, 1.5, 1.0], dtype=F64)

    def posterior(index):
        base = pyro_dist.Normal(base_locs[index], torch.ones_like(base_locs[index])).to_event(1)
        return pyro_dist.TransformedDistribution(base, [AffineTransform(shift, scale,
                                                                        event_dim=1)])

    result = active_units(posterior, torch.arange(num_data), num_samples=num_samples, seed=15)
    expected = (shift + scale * base_locs).var(0)
    # The Monte Carlo means carry noise e of variance Var_q(z_u) / S = scale^2 / S; the
    # corrected variance's error has standard deviation about 2 (A_u scale^2 / (N S))^(1/2)
    # (the cross term) + scale^2 / S (2 / N)^(1/2) (the noise's own sample variance).
    noise = scale**2 / num_samples
    error = 2 * (expected * noise / num_data).sqrt() + noise * math.sqrt(2 / num_data)
    assert ((result.variances - expected).abs() < STANDARD_ERRORS * error).all()
    # Without the correction the inactive units would read about 0.011 and 0.005.
    assert result.variances[2:].abs().max() < 5e-3
    assert result.count == 2


# Bits per dimension ----------------------------------------------------------------------------


def test_bits_per_dim():
    assert bits_per_dim(-100.0, 784) == pytest.approx(100 / (784 * math.log(2)), rel=1e-15)
    assert bits_per_dim(-784 * math.log(2), 784) == pytest.approx(1.0, rel=1e-15)
    log_likelihood = torch.tensor([-80.0, -95.5], dtype=F64)
    bits = bits_per_dim(log_likelihood, 784)
    assert torch.is_tensor(bits) and bits.shape == (2,)
    assert torch.allclose(bits, -log_likelihood / (784 * math.log(2)), rtol=1e-15, atol=0)


# Errors ----------------------------------------------------------------------------------------


def _prior():
    return standard_normal(1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": torch.zeros(0, 3)}, "data"),
        ({"data": torch.tensor(1.0)}, "data"),
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_points": 0}, "num_points"),
        ({"num_points": 21}, "num_points"),
        ({"prior": standard_normal(1).expand([2])}, "prior"),
        ({"prior": standard_normal(2)}, "prior"),
        ({"posterior": lambda index: standard_normal(1)}, "posterior"),
        ({"posterior": lambda index: torch.zeros(len(index), 1)}, "posterior"),
    ],
)
def test_elbo_surgery_errors(quadrature, kwargs, match):
    arguments = {"posterior": quadrature.posterior, "prior": _prior(),
                 "data": quadrature.data, **kwargs}
    with pytest.raises(ValueError, match=match):
        elbo_surgery(arguments.pop("posterior"), arguments.pop("prior"), arguments.pop("data"),
                     **arguments)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": torch.zeros(0)}, "data"),
        ({"data": torch.zeros(1)}, "data"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": -1}, "batch_size"),
        ({"posterior": lambda index: pyro_dist.Normal(0.0, 1.0)}, "posterior"),
        ({"posterior": lambda index: pyro_dist.Normal(torch.zeros(len(index), 2, 2), 1.0)
          .to_event(2)}, "event shape"),
    ],
)
def test_active_units_errors(quadrature, kwargs, match):
    arguments = {"posterior": quadrature.posterior, "data": quadrature.data, **kwargs}
    with pytest.raises(ValueError, match=match):
        active_units(arguments.pop("posterior"), arguments.pop("data"), **arguments)


def test_bits_per_dim_errors():
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(-1.0, 0)
