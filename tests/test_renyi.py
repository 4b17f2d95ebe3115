"""RenyiELBO: the bound's limits and order in alpha, global latents against an exact log p(x),
Pyro's signature, and unbiased gradients for the von Mises-Fisher against quadrature."""

import inspect
import math

import numpy as np
import pyro
import pyro.distributions as pyro_dist
import pytest
import scipy.special
import torch

from pyro_dgm.infer import RenyiELBO
from exact_models import LinearGaussian, vmf_problem

F64 = torch.float64


def test_the_signature_is_pyros():
    """The same positional arguments, in the same order, with the same defaults."""
    ours = list(inspect.signature(RenyiELBO).parameters.values())
    pyros = list(inspect.signature(pyro.infer.RenyiELBO).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(pyros)]] == [
        (p.name, p.default) for p in pyros
    ]
    RenyiELBO(0.5, 3, 1, None, True, False)  # the same call as Pyro's


def bounds(alphas, model, guide, *args, num_particles=4, seed=0):
    """The bound per data point for each alpha, on the same particles (same seed)."""
    values = []
    for alpha in alphas:
        pyro.set_rng_seed(seed)
        values.append(RenyiELBO(alpha, num_particles).bound(model, guide, *args))
    return torch.stack(values)


def test_monotone_in_alpha_and_tends_to_the_elbo():
    """On the same particles the bound decreases in alpha (power means), and at alpha -> 1 it
    is the ELBO estimate of those particles, the average of their log weights."""
    problem = LinearGaussian(seed=3)
    x = problem.marginal().sample((6,))
    alphas = [0.0, 0.25, 0.5, 0.75, 0.99, 1 - 1e-7]
    values = bounds(alphas, problem.model, problem.rough_guide, x, 2.0)
    assert torch.all(values[:-1] >= values[1:] - 1e-12)
    assert torch.all(values[0] > values[-2] + 1e-3)  # not constant: the guide is rough
    pyro.set_rng_seed(0)
    renyi = RenyiELBO(0.0, 4)
    model_trace, guide_trace, _, particle_dim = renyi._traces(
        problem.model, problem.rough_guide, (x, 2.0), {}
    )
    log_p, log_q, *_ = renyi._log_densities(model_trace, guide_trace, particle_dim)
    torch.testing.assert_close(values[-1], (log_p - log_q).mean(0), rtol=0, atol=1e-5)


class GlobalMean:
    """beta ~ N(0, 1), x_i ~ N(beta, s^2): one global latent; log p(x) and p(beta | x) exact."""

    noise = 0.7

    def marginal(self, size):
        covariance = self.noise**2 * torch.eye(size, dtype=F64) + torch.ones(size, size,
                                                                             dtype=F64)
        return pyro_dist.MultivariateNormal(torch.zeros(size, dtype=F64), covariance)

    def posterior(self, x):
        precision = 1 + len(x) / self.noise**2
        return x.sum() / self.noise**2 / precision, precision**-0.5

    def model(self, x, widen=1.0):
        beta = pyro.sample("beta", pyro_dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", pyro_dist.Normal(beta, self.noise), obs=x)

    def guide(self, x, widen=1.0):
        mean, scale = self.posterior(x)
        pyro.sample("beta", pyro_dist.Normal(mean, widen * scale))


def test_a_global_latent_gives_one_weight_per_batch_and_the_exact_log_likelihood():
    """With the exact posterior as guide every weight is p(x): the bound is log p(x) for any
    alpha and K (to 1e-10), one value for the batch, as Pyro's RenyiELBO gives; with a
    widened guide the ELBO (K = 1, mean of 400 draws) is below log p(x) by about
    KL = 0.81 nats, and the bound approaches log p(x) as K grows (K = 20,000: within 0.01)."""
    problem = GlobalMean()
    torch.manual_seed(0)
    x = problem.marginal(5).sample()
    exact = float(problem.marginal(5).log_prob(x))
    for alpha in (0.0, 0.5):
        bound = RenyiELBO(alpha, 3).bound(problem.model, problem.guide, x)
        assert bound.shape == (1,)
        assert float(bound) == pytest.approx(exact, abs=1e-10)
    pyro_loss = pyro.infer.RenyiELBO(alpha=0.5, num_particles=3).loss(problem.model,
                                                                       problem.guide, x)
    assert -pyro_loss == pytest.approx(exact, abs=1e-10)
    single = RenyiELBO(0.0, 1)
    loose = np.mean([float(single.bound(problem.model, problem.guide, x, 2.0))
                     for _ in range(400)])
    tight = float(RenyiELBO(0.0, 20_000).bound(problem.model, problem.guide, x, 2.0))
    assert loose < exact - 0.05 and exact - 0.01 < tight <= exact + 0.005


def quadrature_bound(alpha, kappa, m, c, nodes=48):
    """E over w_1, w_2 iid of (1 / (1 - alpha)) log mean_k w_k^(1 - alpha), for the vMF
    problem's log w = (c - kappa) w + log 0F1(; m/2; kappa^2/4) at x = 1, by Gauss-Jacobi
    quadrature in the density of w = mu^T z, proportional to exp(kappa w) (1 - w^2)^((m-3)/2)."""
    half = 0.5 * (m - 3)
    points, weights = scipy.special.roots_jacobi(nodes, half, half)
    density = weights * np.exp(kappa * (points - 1))
    density /= density.sum()
    # log 0F1(; m/2; kappa^2 / 4) = log(Gamma(m/2) (2/kappa)^(m/2-1) I_{m/2-1}(kappa))
    v = 0.5 * m - 1
    log_normalizer = (scipy.special.gammaln(v + 1) + v * math.log(2 / kappa)
                      + math.log(scipy.special.ive(v, kappa)) + kappa)
    log_w = (c - kappa) * points + log_normalizer
    power = 1 - alpha
    pair = np.logaddexp.outer(power * log_w, power * log_w) - math.log(2)
    return float(np.einsum("i,j,ij->", density, density, pair / power))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_vmf_gradients_are_unbiased_against_quadrature(alpha):
    """K = 2 particles of a rejection-sampled vMF (m = 4), 10 replicates of 20,000 data
    points: the mean of d bound / d kappa is within 4 standard errors of the quadrature's
    (central difference of the quadrature, h = 1e-4)."""
    m, c, model, guide = vmf_problem()
    kappa = 2.0
    step = 1e-4
    reference = (quadrature_bound(alpha, kappa + step, m, c)
                 - quadrature_bound(alpha, kappa - step, m, c)) / (2 * step)
    elbo = RenyiELBO(alpha, 2)
    x = torch.ones(20_000, dtype=F64)
    torch.manual_seed(1)
    estimates = []
    for _ in range(10):
        concentration = torch.tensor(kappa, dtype=F64, requires_grad=True)
        loss = elbo.differentiable_loss(model, guide, x, concentration) / len(x)
        estimates.append(-torch.autograd.grad(loss, concentration)[0])
    estimates = torch.stack(estimates)
    error = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - reference) < 4 * error
