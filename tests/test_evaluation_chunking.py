"""Chunked importance-sampled log-likelihoods: equal to the unchunked estimate on the same
draws, converging to exact log-likelihoods, within their memory budget, and strict about
their arguments."""

import math

import pyro
import pyro.distributions as pyro_dist
import pytest
import torch
from exact_models import F64, LinearGaussian
from torch.distributions import constraints

from pyro_dgm.infer import evaluate_dataset, evaluation, importance_log_likelihood

NUM_POINTS, NUM_SAMPLES = 10, 60


class BankNormal(pyro_dist.TorchDistribution):
    """``Normal(loc, scale)`` per coordinate whose draws come from a fixed bank of noise: the
    s-th draw for data point i is ``loc + scale * bank[i, s mod S]``, whatever the chunks. Any
    S consecutive draws of a data point are therefore its S bank rows, in some order, so every
    chunking of an S-sample estimate sees the same weights."""

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, loc, scale, indices, sampler, batch_shape=None):
        self.loc, self.scale, self.indices, self.sampler = loc, scale, indices, sampler
        batch_shape = loc.shape[:-1] if batch_shape is None else batch_shape
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return BankNormal(self.loc, self.scale, self.indices, self.sampler, batch_shape)

    def sample(self, sample_shape=torch.Size()):
        particles = self.batch_shape[0] if len(self.batch_shape) == 2 else 1
        noise = self.sampler.draw(self.indices, particles)
        return (self.loc + self.scale * noise).reshape(self.shape())

    def log_prob(self, value):
        return pyro_dist.Normal(self.loc, self.scale).log_prob(value).sum(-1)


class BankGuide:
    """The rough guide of :class:`LinearGaussian` (right mean, scales inflated 1.5 times),
    drawing from a bank of shape ``(N, S, latent)``; records the (particles, data points) of
    each call."""

    def __init__(self, problem, data, bank):
        self.problem, self.data, self.bank = problem, data, bank
        self.counters = torch.zeros(len(data), dtype=torch.long)
        self.chunks = []

    def moments(self, x):
        mean, covariance = self.problem.posterior(x)
        return mean, (1.5 * covariance.diagonal().sqrt()).expand_as(mean)

    def draw(self, indices, particles):
        positions = self.counters[indices] + torch.arange(particles)[:, None]
        positions = positions % self.bank.shape[1]
        self.counters[indices] += particles
        self.chunks.append((particles, len(indices)))
        return self.bank[indices, positions]

    def __call__(self, x):
        indices = (x[:, None, :] == self.data[None]).all(-1).long().argmax(-1)
        mean, scale = self.moments(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", BankNormal(mean, scale, indices, self))

    def reference(self):
        """log p(x_i) estimates from all S bank draws, unchunked, in closed form: log-likelihood,
        standard error and ESS, shapes ``(N,)``."""
        mean, scale = self.moments(self.data)
        z = mean[:, None] + scale[:, None] * self.bank  # (N, S, latent)
        problem = self.problem
        log_weight = (
            pyro_dist.Normal(z @ problem.weight.T + problem.bias, problem.noise)
            .log_prob(self.data[:, None]).sum(-1)
            + pyro_dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            - pyro_dist.Normal(mean[:, None], scale[:, None]).log_prob(z).sum(-1)
        )
        num_samples = self.bank.shape[1]
        log_likelihood = log_weight.logsumexp(1) - math.log(num_samples)
        weight = (log_weight - log_weight.max(1, keepdim=True).values).exp()
        ess = weight.sum(1) ** 2 / (weight**2).sum(1)
        standard_error = ((num_samples / ess - 1) / (num_samples - 1)).sqrt()
        return log_likelihood, standard_error, ess


@pytest.fixture
def bank_problem():
    torch.manual_seed(0)
    problem = LinearGaussian()
    data = problem.marginal().sample((NUM_POINTS,))
    bank = torch.randn(NUM_POINTS, NUM_SAMPLES, problem.latent, dtype=F64,
                       generator=torch.Generator().manual_seed(1))
    return problem, data, bank


# chunk_size=None with a budget of a few pairs per chunk: the probe chunks, then many small
# ones; NUM_SAMPLES is the unchunked estimate.
CHUNKINGS = [dict(chunk_size=NUM_SAMPLES), dict(chunk_size=7), dict(chunk_size=1),
             dict(memory_budget=20_000), dict()]


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
def test_chunked_estimate_equals_unchunked_on_the_same_draws(bank_problem, chunking):
    problem, data, bank = bank_problem
    guide = BankGuide(problem, data, bank)
    estimate = importance_log_likelihood(problem.model, guide, data, num_samples=NUM_SAMPLES,
                                         **chunking)
    assert sum(particles for particles, _ in guide.chunks[1:]) == NUM_SAMPLES  # [0]: guess
    for value, expected in zip(estimate, guide.reference(), strict=True):
        assert value.dtype == F64
        torch.testing.assert_close(value, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunking", [dict(batch_size=NUM_POINTS, chunk_size=NUM_SAMPLES),
                                      dict(batch_size=3, chunk_size=7),
                                      dict(batch_size=4), dict(chunk_size=9),
                                      dict(memory_budget=20_000)], ids=str)
def test_chunked_dataset_estimate_equals_unchunked_on_the_same_draws(bank_problem, chunking):
    problem, data, bank = bank_problem
    guide = BankGuide(problem, data, bank)
    result = evaluate_dataset(problem.model, guide, data, num_samples=NUM_SAMPLES,
                              num_particles=2, **chunking)
    log_likelihood, standard_error, ess = guide.reference()
    assert result.log_likelihood == pytest.approx(float(log_likelihood.mean()), abs=1e-10)
    assert result.log_likelihood_standard_error == pytest.approx(
        math.sqrt(float(standard_error.square().mean()) / NUM_POINTS), abs=1e-10)
    assert result.effective_sample_size == pytest.approx(float(ess.mean()), abs=1e-10)


def test_automatic_chunks_split_particles_and_data_points(bank_problem):
    """A small budget gives chunks of several data points and particles, evenly split."""
    problem, data, bank = bank_problem
    guide = BankGuide(problem, data, bank)
    probe = BankGuide(problem, data[: evaluation._PROBE_DATA_POINTS], bank)
    _, bytes_per_pair = evaluation._probe(problem.model, probe, -2, "data", (data,), {})
    budget = 40 * bytes_per_pair
    evaluate_dataset(problem.model, guide, data, num_samples=NUM_SAMPLES, num_particles=1,
                     memory_budget=budget)
    chunks = [c for c in guide.chunks if c[0] > 1]  # the IS chunks (not the guess, the ELBO)
    assert all(particles * points * bytes_per_pair <= budget for particles, points in chunks)
    # min(N, 16) = 10 data points leave 4 particles per chunk: 60 = 15 x 4, in batches of 10
    assert set(chunks) == {(4, 10)}


def test_estimate_converges_to_exact_log_likelihood_within_its_standard_error():
    torch.manual_seed(3)
    problem = LinearGaussian()
    data = problem.marginal().sample((8,))
    exact = problem.marginal().log_prob(data)
    estimate = importance_log_likelihood(problem.model, problem.rough_guide, data,
                                         num_samples=4000, memory_budget=200_000)
    error = (estimate.log_likelihood - exact).abs()
    assert (error < 4 * estimate.standard_error + 1e-4).all()
    assert (estimate.standard_error < 0.02).all()
    result = evaluate_dataset(problem.model, problem.rough_guide, data, num_samples=4000,
                              memory_budget=200_000)
    assert abs(result.log_likelihood - float(exact.mean())) < (
        4 * result.log_likelihood_standard_error + 1e-4)


def test_exact_guide_gives_exact_log_likelihood_in_any_chunks(bank_problem):
    """With the exact posterior as proposal every weight equals p(x): chunks of every size give
    log p(x) to rounding, an ESS of S and a standard error of 0."""
    problem, data, _ = bank_problem
    exact = problem.marginal().log_prob(data)
    for chunking in (dict(chunk_size=3), dict(memory_budget=10_000), dict()):
        estimate = importance_log_likelihood(problem.model, problem.exact_guide, data,
                                             num_samples=50, **chunking)
        torch.testing.assert_close(estimate.log_likelihood, exact, atol=1e-10, rtol=0)
        torch.testing.assert_close(estimate.effective_sample_size,
                                   torch.full_like(exact, 50.0), atol=1e-8, rtol=0)
        assert (estimate.standard_error < 1e-6).all()


class Wide:
    """z ~ N(0, 1) per data point, x ~ N(z * 1, 1) over D = 2000 coordinates, float64: the
    model's mean (particles, B, 2000) takes 16 kB per (data point x particle) pair."""

    def __init__(self, dim=2000):
        self.ones = torch.ones(dim, dtype=F64)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro_dist.Normal(torch.zeros((), dtype=F64), 1.0))
            pyro.sample("x", pyro_dist.Normal(z[..., None] * self.ones, 1.0).to_event(1),
                        obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro_dist.Normal(x.mean(-1), 0.1))
        self.shapes.append(tuple(z.shape))


def test_automatic_chunks_respect_the_memory_budget():
    wide = Wide()
    pair_bytes = 2000 * 8
    data = torch.randn(40, 2000, dtype=F64)
    largest = {}
    for budget in (4 * 2**20, 8 * 2**20):
        wide.shapes = []
        evaluate_dataset(wide.model, wide.guide, data, num_samples=300, num_particles=1,
                         memory_budget=budget)
        # after the call guessing the plate nesting and the probe chunks of 1, 1, 4 particles
        pairs = [math.prod(shape) for shape in wide.shapes[4:]]
        assert max(pairs) * pair_bytes <= budget
        largest[budget] = max(pairs)
    assert largest[8 * 2**20] >= 1.8 * largest[4 * 2**20]  # the budget sets the size
    # The estimate counts every allocation twice: here the mean and about ten elementwise
    # temporaries of Normal.log_prob, each of the pair's 16 kB, so about 22 times pair_bytes;
    # what does not grow with the particles (the data, the guide's per-point work) cancels,
    # so the estimate does not depend on the number of data points probed.
    _, bytes_per_pair = evaluation._probe(wide.model, wide.guide, -2, "data", (data,), {})
    _, bytes_per_pair_few = evaluation._probe(wide.model, wide.guide, -2, "data", (data[:5],),
                                              {})
    assert 2 * pair_bytes <= bytes_per_pair <= 32 * pair_bytes
    assert bytes_per_pair_few == pytest.approx(bytes_per_pair, rel=1e-3)


def test_probe_of_a_vae_measures_what_grows_with_the_particles():
    """VAE("normal", 10): the encoder, run once per chunk, cancels; the estimate lies between
    the decoder's logits (784 float32 per pair) and 16 times that."""
    from pyro_dgm.models import VAE

    torch.manual_seed(0)
    vae = VAE("normal", 10, param_store=False)
    x = torch.bernoulli(torch.full((32, 784), 0.13))
    with pyro.validation_enabled(False):
        chunks, bytes_per_pair = evaluation._probe(vae.model, vae.guide, -2, "data", (x,), {})
        estimate = importance_log_likelihood(vae.model, vae.guide, x[:3], num_samples=20,
                                             memory_budget=2**20)
    assert [chunk.shape for chunk in chunks] == [(1, 32), (1, 32), (4, 32)]
    assert 784 * 4 <= bytes_per_pair <= 16 * 784 * 4
    assert estimate.log_likelihood.dtype == torch.float32
    assert estimate.log_likelihood.isfinite().all()


def test_plan_chunks_rule():
    plan = evaluation._plan_chunks
    # all S particles fit with 16 data points: then as many data points as fit
    assert plan(100, 100 * 5000 * 40, 10_000, 5000) == (40, 5000)
    # they do not: S evenly split (5000 = 3 x 1667 - 1), batch of 16 data points or more
    assert plan(100, 100 * 16 * 2400, 10_000, 5000) == (23, 1667)
    assert plan(100, 100 * 16 * 2400, 10_000, 5000, batch_size=8) == (8, 2500)
    assert plan(100, 100 * 16 * 2400, 10_000, 5000, chunk_size=100) == (384, 100)
    # a budget below one pair still gives one of each; never more than N or S
    assert plan(10**9, 1, 10_000, 5000) == (1, 1)
    assert plan(1, 10**12, 7, 50) == (7, 50)


def test_no_host_round_trip(bank_problem, monkeypatch):
    """Nothing in the estimate reads a tensor back to the host (on CUDA: no synchronisation
    per chunk)."""
    problem, data, _ = bank_problem

    def refuse(*args, **kwargs):
        raise AssertionError("host round trip")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pyro.validation_enabled(False):  # validation checks values on the host
        estimate = importance_log_likelihood(problem.model, problem.rough_guide, data,
                                             num_samples=50, memory_budget=20_000)
    monkeypatch.undo()
    assert estimate.log_likelihood.isfinite().all()


@pytest.mark.parametrize("argument, value", [
    ("num_samples", 0), ("num_samples", 2.5), ("chunk_size", 0), ("chunk_size", -3),
    ("memory_budget", 0), ("memory_budget", 1.5), ("memory_budget", True),
])
def test_importance_log_likelihood_rejects_bad_arguments(bank_problem, argument, value):
    problem, data, _ = bank_problem
    with pytest.raises(ValueError, match=argument):
        importance_log_likelihood(problem.model, problem.rough_guide, data,
                                  **{argument: value})


@pytest.mark.parametrize("argument, value", [
    ("num_samples", 0), ("num_particles", 0), ("batch_size", 0), ("chunk_size", -1),
    ("memory_budget", -5), ("data", torch.zeros(0, 4, dtype=F64)),
])
def test_evaluate_dataset_rejects_bad_arguments(bank_problem, argument, value):
    problem, data, _ = bank_problem
    arguments = {"data": data, argument: value}
    with pytest.raises(ValueError, match=argument):
        evaluate_dataset(problem.model, problem.rough_guide, **arguments)
