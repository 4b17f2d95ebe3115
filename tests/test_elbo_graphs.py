"""Unbiased gradients wherever a Pyro user puts a partially reparameterized site.

Each test compares the mean of independent gradient estimates with an exact gradient (closed
form, differentiated by autograd) or, where none exists, with Pyro's ``Trace_ELBO`` (which is
unbiased for any dependency structure), and asks for agreement within 4 standard errors of the
difference. Fixed seeds; the replicate counts and sample sizes are stated in each test. Every
case draws its samples from a von Mises-Fisher on S^4 (m = 5, so the sampler is a rejection
sampler with a score-function correction term).
"""

import math
import warnings

import pyro
import pyro.distributions as pyro_dist
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_dgm.distributions import HypersphericalUniform, VampPrior, VonMisesFisher
from pyro_dgm.infer import ImportanceWeightedELBO, TraceAnalyticKL_ELBO
from pyro_dgm.special import bessel_iv_ratio, log_bessel_iv_normalized

F64 = torch.float64
M = 5  # ambient dimension of the sphere S^4

ESTIMATORS = {
    "analytic": lambda: TraceAnalyticKL_ELBO(),
    "trace": lambda: pyro.infer.Trace_ELBO(),
    "iwae1": lambda: ImportanceWeightedELBO(num_particles=1),
}


def second_moment(loc, kappa):
    """E[z z^T] = (A / kappa) I + (1 - m A / kappa) mu mu^T for z ~ vMF(mu, kappa) on S^{m-1}."""
    a = bessel_iv_ratio(0.5 * M - 1, kappa)
    eye = torch.eye(M, dtype=F64)
    return (a / kappa) * eye + (1 - M * a / kappa) * torch.outer(loc, loc)


def mean_and_error(estimates):
    stacked = torch.stack(estimates)
    return stacked.mean(0), stacked.std(0) / math.sqrt(len(estimates))


def assert_agree(estimates, reference, reference_error=0.0, sigmas=4.0):
    """The mean of ``estimates`` (a list of gradient vectors) agrees with ``reference`` within
    ``sigmas`` standard errors of the difference, coordinate by coordinate."""
    mean, error = mean_and_error(estimates)
    combined = torch.sqrt(error**2 + torch.as_tensor(reference_error) ** 2)
    gap = (mean - reference).abs()
    assert torch.all(gap < sigmas * combined), (mean, reference, combined)
    return mean, error


class TwoLevel:
    """The issue's graph: guide z1 ~ vMF(mu, kappa), z2 ~ N(b, 1); model z1 ~ U(S^4),
    z2 | z1 ~ N(a^T z1, 1). The analytic KL of z2, (b - a^T z1)^2 / 2, depends on z1."""

    a = torch.tensor([1.2, 0.9, -0.8, 0.5, 1.4], dtype=F64)
    b = 0.7

    def __init__(self):
        self.raw_loc = torch.tensor([0.3, 1.0, -0.4, 0.2, 0.6], dtype=F64, requires_grad=True)
        self.kappa = torch.tensor(3.0, dtype=F64, requires_grad=True)
        self.params = [self.kappa, self.raw_loc]

    def loc(self):
        return self.raw_loc / self.raw_loc.norm()

    def model(self, size):
        with pyro.plate("data", size):
            z1 = pyro.sample("z1", HypersphericalUniform(M, dtype=F64).expand([size]))
            pyro.sample("z2", pyro_dist.Normal(z1 @ self.a, 1.0))

    def guide(self, size):
        with pyro.plate("data", size):
            pyro.sample("z1", VonMisesFisher(self.loc().expand(size, M), self.kappa.expand(size)))
            pyro.sample("z2", pyro_dist.Normal(torch.full((size,), self.b, dtype=F64), 1.0))

    def exact_elbo(self):
        """-KL(vMF || U) - E[(b - a^T z1)^2] / 2 per data point."""
        loc, kappa = self.loc(), self.kappa
        q = VonMisesFisher(loc, kappa)
        mean = bessel_iv_ratio(0.5 * M - 1, kappa) * loc
        square = self.b**2 - 2 * self.b * (self.a @ mean) + self.a @ second_moment(loc, kappa) @ self.a
        return -kl_divergence(q, HypersphericalUniform(M, dtype=F64)) - 0.5 * square


class VonMisesFisherChain:
    """vMF -> vMF: guide z1 ~ vMF(mu, kappa), z2 ~ vMF(nu, lambda); model z1 ~ U(S^4),
    z2 | z1 ~ vMF(z1, c). KL(vMF(nu, lambda) || vMF(z1, c)) (registered) depends on z1."""

    c = 4.0

    def __init__(self):
        self.raw_loc = torch.tensor([0.3, 1.0, -0.4, 0.2, 0.6], dtype=F64, requires_grad=True)
        self.kappa = torch.tensor(2.5, dtype=F64, requires_grad=True)
        self.raw_nu = torch.tensor([1.0, 0.2, 0.5, -0.7, 0.1], dtype=F64, requires_grad=True)
        self.lam = torch.tensor(6.0, dtype=F64, requires_grad=True)
        self.params = [self.kappa, self.raw_loc, self.lam, self.raw_nu]

    def model(self, size):
        with pyro.plate("data", size):
            z1 = pyro.sample("z1", HypersphericalUniform(M, dtype=F64).expand([size]))
            pyro.sample("z2", VonMisesFisher(z1, torch.full((size,), self.c, dtype=F64)))

    def guide(self, size):
        loc, nu = self.raw_loc / self.raw_loc.norm(), self.raw_nu / self.raw_nu.norm()
        with pyro.plate("data", size):
            pyro.sample("z1", VonMisesFisher(loc.expand(size, M), self.kappa.expand(size)))
            pyro.sample("z2", VonMisesFisher(nu.expand(size, M), self.lam.expand(size)))

    def exact_elbo(self):
        """-KL(q1 || U) - A(lambda) (lambda - c nu^T E[z1]) + log 0F1(lambda) - log 0F1(c)."""
        loc, nu = self.raw_loc / self.raw_loc.norm(), self.raw_nu / self.raw_nu.norm()
        v = 0.5 * M - 1
        q1 = VonMisesFisher(loc, self.kappa)
        mean = bessel_iv_ratio(v, self.kappa) * loc
        kl2 = (
            bessel_iv_ratio(v, self.lam) * (self.lam - self.c * (nu @ mean))
            - log_bessel_iv_normalized(v, self.lam)
            + log_bessel_iv_normalized(v, torch.tensor(self.c, dtype=F64))
        )
        return -kl_divergence(q1, HypersphericalUniform(M, dtype=F64)) - kl2


class VampPriorBelow:
    """A prior without a closed-form KL below the vMF: guide z1 ~ vMF(mu, kappa),
    z2 | z1 ~ N(W z1, 0.7); model z1 ~ U(S^4), z2 ~ VampPrior (a mixture of 3 Gaussian
    posteriors at pseudo-inputs). The Monte Carlo KL of z2 depends on z1. No closed form:
    the reference is Trace_ELBO."""

    def __init__(self):
        generator = torch.Generator().manual_seed(5)
        self.weight = torch.randn(2, M, generator=generator, dtype=F64)
        self.pseudo_inputs = torch.randn(3, 2, generator=generator, dtype=F64)
        self.raw_loc = torch.tensor([0.3, 1.0, -0.4, 0.2, 0.6], dtype=F64, requires_grad=True)
        self.kappa = torch.tensor(3.0, dtype=F64, requires_grad=True)
        self.params = [self.kappa, self.raw_loc]

    def prior(self):
        return VampPrior(lambda u: pyro_dist.Normal(u, 0.8).to_event(1), self.pseudo_inputs)

    def model(self, size):
        with pyro.plate("data", size):
            pyro.sample("z1", HypersphericalUniform(M, dtype=F64).expand([size]))
            pyro.sample("z2", self.prior().expand([size]))

    def guide(self, size):
        loc = self.raw_loc / self.raw_loc.norm()
        with pyro.plate("data", size):
            z1 = pyro.sample("z1", VonMisesFisher(loc.expand(size, M), self.kappa.expand(size)))
            pyro.sample("z2", pyro_dist.Normal(z1 @ self.weight.T, 0.7).to_event(1))


def gradient_estimates(problem, estimator, replicates, size, seed):
    """``replicates`` independent estimates of d ELBO / d params, per data point, each from
    ``size`` data points."""
    torch.manual_seed(seed)
    estimates = []
    for _ in range(replicates):
        loss = estimator.differentiable_loss(problem.model, problem.guide, size) / size
        grads = torch.autograd.grad(-loss, problem.params)
        estimates.append(torch.cat([g.reshape(-1) for g in grads]))
    return estimates


def exact_gradient(problem):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(problem.exact_elbo(),
                                                                 problem.params)])


@pytest.mark.parametrize("estimator", ["analytic", "trace", "iwae1"])
@pytest.mark.parametrize("problem", [TwoLevel, VonMisesFisherChain])
def test_hierarchical_gradients_are_unbiased(problem, estimator):
    """10 replicates of 20,000 data points each; every coordinate of the gradient (kappa and
    the unnormalized loc of z1, and for the chain lambda and nu of z2) within 4 standard
    errors of the closed-form gradient. Without the analytic KL of z2 in the cost of z1's
    score function (the code before this test), d/dkappa misses by tens of standard errors on
    both graphs. (The correction term depends on kappa alone, so loc's gradient is pathwise.)"""
    problem = problem()
    estimates = gradient_estimates(problem, ESTIMATORS[estimator](), 10, 20_000, seed=1)
    assert_agree(estimates, exact_gradient(problem))


@pytest.mark.parametrize("estimator", ["analytic", "iwae1"])
def test_vampprior_below_a_vmf_agrees_with_trace_elbo(estimator):
    """No closed form: 10 replicates of 20,000 data points of each estimator, against as many
    of Trace_ELBO, agree within 4 standard errors of the difference (kappa and loc)."""
    problem = VampPriorBelow()
    ours = gradient_estimates(problem, ESTIMATORS[estimator](), 10, 20_000, seed=2)
    reference, reference_error = mean_and_error(
        gradient_estimates(problem, pyro.infer.Trace_ELBO(), 10, 20_000, seed=3)
    )
    assert_agree(ours, reference, reference_error)


def test_the_prior_depending_on_a_later_guide_sample_falls_back_to_monte_carlo():
    """Guide order z2, z1 but model order z1, z2 | z1: the model's prior of z2 depends on a
    sample the guide draws after z2, so KL(q(z2) || p(z2 | z1)) may not replace the Monte
    Carlo term (the mean-field condition fails). The estimator falls back to it and stays
    unbiased (exact gradient, 10 x 20,000 data points, 4 standard errors)."""
    problem = TwoLevel()

    def guide(size):  # the same guide, its two independent sites in the other order
        with pyro.plate("data", size):
            pyro.sample("z2", pyro_dist.Normal(torch.full((size,), problem.b, dtype=F64), 1.0))
            pyro.sample("z1", VonMisesFisher(problem.loc().expand(size, M),
                                             problem.kappa.expand(size)))

    problem.guide = guide
    estimates = gradient_estimates(problem, TraceAnalyticKL_ELBO(), 10, 20_000, seed=4)
    assert_agree(estimates, exact_gradient(problem))


# Wrappers ---------------------------------------------------------------------------------
# The one-site problem of tests/test_von_mises_fisher.py: guide vMF(mu0, kappa), prior U(S^4),
# likelihood factor c mu0^T z, so ELBO(kappa) = c A(kappa) - KL(kappa) per site and
# d ELBO / d kappa = (c - kappa) A'(kappa); two sites (batch of 2) per draw.

C, KAPPA = 6.0, 2.0
LOC = torch.eye(M, dtype=F64)[0]


def a_prime(kappa=KAPPA):
    a = float(bessel_iv_ratio(0.5 * M - 1, torch.tensor(kappa, dtype=F64)))
    return 1 - a * a - (M - 1) * a / kappa


def wrapped_site(kind, concentration):
    """(guide distribution, prior, model-side wrapper) for each wrapper kind, on a batch of 2."""
    q = VonMisesFisher(LOC.expand(2, M), concentration.expand(2))
    prior = HypersphericalUniform(M, dtype=F64).expand([2])
    if kind == "Independent":
        return pyro_dist.Independent(q, 1), prior.to_event(1)
    if kind == "to_event":
        return q.to_event(1), prior.to_event(1)
    if kind == "mask(True)":
        return q.mask(True).to_event(1), prior.to_event(1)
    if kind == "MaskedDistribution(True)":
        return pyro_dist.Independent(pyro_dist.MaskedDistribution(q, True), 1), prior.to_event(1)
    if kind == "mask(tensor)":
        mask = torch.tensor([True, False])
        return q.mask(mask).to_event(1), prior.mask(mask).to_event(1)
    if kind == "ExpandedDistribution":
        base = VonMisesFisher(LOC, concentration)
        return pyro_dist.ExpandedDistribution(base, [2]).to_event(1), prior.to_event(1)
    raise ValueError(kind)


# exact d ELBO / d kappa for each kind: 2 sites contribute c A' each; KL terms as masked
WRAPPER_GRADIENT = {
    "Independent": 2 * (C - KAPPA),
    "to_event": 2 * (C - KAPPA),
    "mask(True)": 2 * (C - KAPPA),
    "MaskedDistribution(True)": 2 * (C - KAPPA),
    "mask(tensor)": 2 * C - KAPPA,  # the second site's KL is masked out, its factor is not
    "ExpandedDistribution": 2 * (C - KAPPA),
}


def wrapper_estimates(kind, estimator, replicates=20, particles=2000, seed=0):
    def model(concentration):
        with pyro.plate("data", particles):
            z = pyro.sample("z", wrapped_site(kind, concentration)[1].expand([particles]))
            pyro.factor("likelihood", C * (z @ LOC).sum(-1))

    def guide(concentration):
        with pyro.plate("data", particles):
            pyro.sample("z", wrapped_site(kind, concentration)[0].expand([particles]))

    torch.manual_seed(seed)
    grads = []
    for _ in range(replicates):
        concentration = torch.tensor(KAPPA, dtype=F64, requires_grad=True)
        loss = estimator.differentiable_loss(model, guide, concentration) / particles
        grads.append(-torch.autograd.grad(loss, concentration)[0].reshape(1))
    return grads


@pytest.mark.parametrize("estimator", ["analytic", "iwae1"])
@pytest.mark.parametrize("kind", list(WRAPPER_GRADIENT))
def test_our_elbos_see_through_every_wrapper(kind, estimator):
    """20 replicates of 2000 particles: within 4 standard errors of the exact gradient, and no
    warning (our ELBOs never ask a wrapper that would drop the score)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = wrapper_estimates(kind, ESTIMATORS[estimator]())
    exact = torch.tensor([WRAPPER_GRADIENT[kind] * a_prime()], dtype=F64)
    assert_agree(grads, exact)


@pytest.mark.parametrize("kind", ["to_event", "mask(True)", "mask(tensor)"])
def test_pyro_trace_elbo_is_unbiased_through_our_wrappers(kind):
    grads = wrapper_estimates(kind, pyro.infer.Trace_ELBO())
    exact = torch.tensor([WRAPPER_GRADIENT[kind] * a_prime()], dtype=F64)
    assert_agree(grads, exact)


@pytest.mark.parametrize(
    "kind", ["Independent", "MaskedDistribution(True)", "ExpandedDistribution"]
)
def test_pyro_wrappers_that_drop_the_score_warn_under_pyro_elbos(kind):
    """Pyro's Independent (also over Pyro's ExpandedDistribution) and boolean
    MaskedDistribution drop the score function: Pyro's Trace_ELBO is then biased (shown: more
    than 10 standard errors off, 10 replicates of 2000 particles), and says so."""
    with pytest.warns(UserWarning, match="drops its score function"):
        grads = wrapper_estimates(kind, pyro.infer.Trace_ELBO(), replicates=10)
    mean, error = mean_and_error(grads)
    exact = WRAPPER_GRADIENT[kind] * a_prime()
    assert abs(float(mean) - exact) > 10 * float(error)


@pytest.mark.parametrize("estimator", ["analytic", "trace", "iwae1"])
def test_poutine_scale_and_mask_and_subsampling(estimator):
    """poutine.scale(0.3) on the latent site (KL warm-up), poutine.mask on its second element
    and a plate of 10 subsampled to 2 (scale 5) at once: d ELBO / d kappa =
    5 (2 c - 0.3 kappa) A'(kappa) per particle (20 replicates of 2000 particles, 4 standard
    errors)."""
    particles = 2000

    def model(concentration):
        with pyro.plate("particles", particles, dim=-2):
            with pyro.plate("data", 10, subsample_size=2, dim=-1):
                with poutine.scale(scale=0.3), poutine.mask(mask=torch.tensor([True, False])):
                    z = pyro.sample("z", HypersphericalUniform(M, dtype=F64).expand([particles, 2]))
                pyro.factor("likelihood", C * (z @ LOC))

    def guide(concentration):
        with pyro.plate("particles", particles, dim=-2):
            with pyro.plate("data", 10, subsample_size=2, dim=-1):
                with poutine.scale(scale=0.3), poutine.mask(mask=torch.tensor([True, False])):
                    pyro.sample("z", VonMisesFisher(LOC.expand(particles, 2, M),
                                                    concentration.expand(particles, 2)))

    elbo = ESTIMATORS[estimator]()
    if estimator == "iwae1":
        elbo = ImportanceWeightedELBO(num_particles=1, data_plate="data")
    torch.manual_seed(0)
    grads = []
    for _ in range(20):
        concentration = torch.tensor(KAPPA, dtype=F64, requires_grad=True)
        loss = elbo.differentiable_loss(model, guide, concentration) / particles
        grads.append(-torch.autograd.grad(loss, concentration)[0].reshape(1))
    exact = torch.tensor([5 * (2 * C - 0.3 * KAPPA) * a_prime()], dtype=F64)
    assert_agree(grads, exact)


def test_predictive_draws_exact_samples_without_a_gradient_to_bias():
    """Predictive runs under no_grad: its vMF samples carry no gradient (no pathwise-only
    gradient can leak), and they have the exact mean A(kappa) mu (4 standard errors, 20,000
    draws)."""
    concentration = torch.tensor(KAPPA, dtype=F64, requires_grad=True)

    def guide():
        pyro.sample("z", VonMisesFisher(LOC, concentration))

    torch.manual_seed(0)
    samples = pyro.infer.Predictive(guide, num_samples=20_000, parallel=True)()["z"]
    assert samples.shape[-1] == M and not samples.requires_grad
    w = samples.reshape(-1, M) @ LOC
    exact = float(bessel_iv_ratio(0.5 * M - 1, torch.tensor(KAPPA, dtype=F64)))
    assert abs(float(w.mean()) - exact) < 4 * float(w.std()) / math.sqrt(len(w))
