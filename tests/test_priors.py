"""VampPrior and the learnable priors: exact densities, normalisation, sampler, gradients, caching.

Statistical tests use fixed seeds; Monte Carlo estimates must lie within 3 or 4 of their
standard errors (stated where used), goodness-of-fit p-values above 1e-3. Exact comparisons run
in float64.
"""

import math

import pyro
import pyro.distributions as pyro_dist
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions.testing import gof
from torch import nn

from pyro_dgm.distributions import VampPrior, VonMisesFisher, log_sphere_surface_area
from pyro_dgm.distributions import von_mises_fisher as von_mises_fisher_module
from pyro_dgm.models.priors import FlowPrior, MixtureOfGaussiansPrior, VampPriorModule
from pyro_dgm.special import bessel_iv_ratio

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(vector):
    return vector / vector.norm(dim=-1, keepdim=True)


# Fixed components (K = 3) in float64 -----------------------------------------------------------

NORMAL_LOC = torch.tensor([[-2.0, 0.5], [1.0, 1.5], [0.5, -1.5]], dtype=F64)
NORMAL_SCALE = torch.tensor([[0.5, 1.0], [0.8, 0.4], [1.2, 0.7]], dtype=F64)
VMF_LOC = unit(torch.tensor([[1.0, 0.0, 0.2], [-0.3, 1.0, 0.5], [0.1, -0.4, -1.0]], dtype=F64))
VMF_CONCENTRATION = torch.tensor([1.0, 4.0, 10.0], dtype=F64)


def normal_components(loc=NORMAL_LOC, scale=NORMAL_SCALE):
    return pyro_dist.Normal(loc, scale).to_event(1)


def mvn_components(loc=NORMAL_LOC, scale=NORMAL_SCALE):
    """The same Gaussians as a MultivariateNormal: a family without the indexed sampling path."""
    return pyro_dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))


def vmf_components(loc=VMF_LOC, concentration=VMF_CONCENTRATION):
    return VonMisesFisher(loc, concentration)


def component(kind, k):
    """The k-th component alone, built from its parameters (the reference for the loop)."""
    if kind == "vmf":
        return VonMisesFisher(VMF_LOC[k], VMF_CONCENTRATION[k])
    if kind == "mvn":
        return pyro_dist.MultivariateNormal(NORMAL_LOC[k], scale_tril=torch.diag(NORMAL_SCALE[k]))
    return pyro_dist.Normal(NORMAL_LOC[k], NORMAL_SCALE[k]).to_event(1)


COMPONENTS = {"normal": normal_components, "mvn": mvn_components, "vmf": vmf_components}


def points(kind, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dim = 3 if kind == "vmf" else 2
    z = torch.randn(*shape, dim, generator=generator, dtype=F64)
    return unit(z) if kind == "vmf" else 2 * z


def normal_mixture_moments():
    mean = NORMAL_LOC.mean(0)
    outer = NORMAL_LOC[:, :, None] * NORMAL_LOC[:, None]
    second_moment = (torch.diag_embed(NORMAL_SCALE**2) + outer).mean(0)
    return mean, second_moment - mean[:, None] * mean[None]


# VampPrior: density -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "mvn", "vmf"])
def test_log_prob_matches_loop_over_components(kind):
    prior = VampPrior.from_components(COMPONENTS[kind]())
    z = points(kind, 3, 5)  # particle and batch dimensions
    expected = torch.stack([component(kind, k).log_prob(z) for k in range(3)]).logsumexp(0)
    expected = expected - math.log(3)
    actual = prior.log_prob(z)
    assert actual.shape == (3, 5)
    assert torch.allclose(actual, expected, rtol=0, atol=1e-12)
    assert torch.allclose(prior.expand([5]).log_prob(z), expected, rtol=0, atol=1e-12)


def test_vmf_log_normalizer_is_evaluated_on_the_components_only(monkeypatch):
    shapes = []
    original = von_mises_fisher_module.log_bessel_iv_normalized_and_ratio_values

    def recording(order, concentration):
        shapes.append(tuple(concentration.shape))
        return original(order, concentration)

    monkeypatch.setattr(
        von_mises_fisher_module, "log_bessel_iv_normalized_and_ratio_values", recording
    )
    prior = VampPrior.from_components(vmf_components()).expand([50])
    prior.log_prob(points("vmf", 4, 50))
    prior.log_prob(points("vmf", 7, 1))
    assert shapes == [(3,)]  # once, on the K concentrations


def test_expand_keeps_the_components():
    components = normal_components()
    prior = VampPrior.from_components(components)
    expanded = prior.expand([5])
    assert prior.batch_shape == () and prior.event_shape == (2,)
    assert expanded.batch_shape == (5,) and expanded.event_shape == (2,)
    assert expanded.components is components and components.batch_shape == (3,)
    assert expanded.num_components == 3
    assert expanded.log_prob(points("normal", 3, 5)).shape == (3, 5)
    one_point = expanded.log_prob(points("normal"))
    assert one_point.shape == (5,) and torch.all(one_point == one_point[0])
    assert expanded.sample((2,)).shape == (2, 5, 2)
    assert expanded.rsample().shape == (5, 2)
    twice = expanded.expand([4, 5])
    assert twice.batch_shape == (4, 5) and twice.components is components
    assert twice.mean.shape == (4, 5, 2)


def test_single_component_is_the_posterior():
    for components, z in [
        (normal_components(NORMAL_LOC[:1], NORMAL_SCALE[:1]), points("normal", 3, 5)),
        (vmf_components(VMF_LOC[1:2], VMF_CONCENTRATION[1:2]), points("vmf", 3, 5)),
    ]:
        prior = VampPrior.from_components(components)
        expected = components.log_prob(z.unsqueeze(-2)).squeeze(-1)
        assert torch.allclose(prior.log_prob(z), expected, rtol=0, atol=1e-12)


def test_normalisation_normal_by_importance_sampling():
    """Proposal N(0, 3^2 I): |estimate - 1| < 3 standard errors, which are below 0.02."""
    generator = torch.Generator().manual_seed(1)
    proposal = pyro_dist.Normal(torch.zeros(2, dtype=F64), 3.0).to_event(1)
    z = 3 * torch.randn(40_000, 2, generator=generator, dtype=F64)
    weights = (VampPrior.from_components(normal_components()).log_prob(z) - proposal.log_prob(z))
    weights = weights.exp()
    estimate, standard_error = weights.mean(), weights.std() / math.sqrt(len(weights))
    assert standard_error < 0.02
    assert abs(estimate - 1) < 3 * standard_error


def test_normalisation_vmf_on_the_sphere():
    """Uniform points on S^2: |S^2| E[p(z)] = 1 within 3 standard errors (below 0.03)."""
    generator = torch.Generator().manual_seed(2)
    z = unit(torch.randn(40_000, 3, generator=generator, dtype=F64))
    values = VampPrior.from_components(vmf_components()).log_prob(z).exp()
    values = values * math.exp(log_sphere_surface_area(3))
    estimate, standard_error = values.mean(), values.std() / math.sqrt(len(values))
    assert standard_error < 0.03
    assert abs(estimate - 1) < 3 * standard_error


def test_validation_rejects_points_off_the_support():
    prior = VampPrior.from_components(vmf_components(), validate_args=True)
    with pytest.raises(ValueError):
        prior.log_prob(torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    prior.log_prob(points("vmf", 4))


# VampPrior: sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_sample_moments_normal(kind):
    """Mean and covariance of 40 000 draws against the mixture's, within 4 standard errors
    (the covariance's estimated from the products themselves)."""
    torch.manual_seed(3)
    prior = VampPrior.from_components(COMPONENTS[kind]())
    mean, covariance = normal_mixture_moments()
    assert torch.allclose(prior.mean, mean, rtol=0, atol=1e-14)
    assert torch.allclose(prior.variance, covariance.diagonal(), rtol=0, atol=1e-14)
    count = 40_000
    z = prior.sample((count,))
    assert z.shape == (count, 2)
    mean_error = (z.mean(0) - mean).abs()
    assert torch.all(mean_error < 4 * (covariance.diagonal() / count).sqrt())
    products = (z - mean)[:, :, None] * (z - mean)[:, None]
    covariance_error = (products.mean(0) - covariance).abs()
    assert torch.all(covariance_error < 4 * products.std(0) / math.sqrt(count))


@pytest.mark.parametrize("dim", [3, 5])
def test_sample_mean_vmf(dim):
    """Mean of 30 000 draws against the mixture mean (1/K) sum_k A_m(kappa_k) mu_k, within 4
    standard errors; draws on the sphere."""
    torch.manual_seed(4)
    loc = unit(torch.randn(3, dim, generator=torch.Generator().manual_seed(5), dtype=F64))
    prior = VampPrior.from_components(vmf_components(loc, VMF_CONCENTRATION))
    mean = (bessel_iv_ratio(0.5 * dim - 1, VMF_CONCENTRATION)[:, None] * loc).mean(0)
    assert torch.allclose(prior.mean, mean, rtol=0, atol=1e-14)
    count = 30_000
    z = prior.sample((count,))
    assert torch.allclose(z.norm(dim=-1), torch.ones(count, dtype=F64), atol=1e-12)
    assert torch.all((z.mean(0) - mean).abs() < 4 * z.std(0) / math.sqrt(count))


@pytest.mark.parametrize("kind", ["normal", "mvn", "vmf"])
def test_goodness_of_fit(kind):
    """Pyro's nearest-neighbour test, with scipy's chi^2 tail (see conftest.py): Pyro's own
    would pass a sampler with the wrong mixture weights."""
    torch.manual_seed(6)
    prior = VampPrior.from_components(COMPONENTS[kind]())
    z = prior.sample((8_000,))
    dim = 2  # the plane, or the sphere S^2
    assert gof.auto_goodness_of_fit(z, prior.log_prob(z).exp(), dim=dim) > 1e-3


def test_components_without_rsample():
    probs = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.5]], dtype=F64)
    components = pyro_dist.Bernoulli(probs).to_event(1)
    prior = VampPrior.from_components(components)
    assert not prior.has_rsample and repr(prior.support) == repr(components.support)
    with pytest.raises(NotImplementedError, match="rsample"):
        prior.rsample()
    torch.manual_seed(7)
    z = prior.sample((20_000,))
    assert z.shape == (20_000, 3) and set(z.unique().tolist()) <= {0.0, 1.0}
    # Bernoulli means 0.45, 0.55, 0.5; standard errors below 0.004
    assert torch.all((z.mean(0) - probs.mean(0)).abs() < 0.015)


def test_has_rsample_and_support_follow_the_components():
    assert VampPrior.from_components(normal_components()).has_rsample
    vmf_prior = VampPrior.from_components(vmf_components())
    assert vmf_prior.has_rsample and vmf_prior.support is vmf_components().support


# VampPrior: gradients ---------------------------------------------------------------------------


def make_encoder(kind, input_dim=4, seed=0):
    """A linear encoder in float64 to the Gaussian or (on S^2) von Mises-Fisher posterior."""
    torch.manual_seed(seed)
    dim = 3 if kind == "vmf" else 2
    network = nn.Linear(input_dim, dim + (1 if kind == "vmf" else dim)).double()

    def encoder(x):
        loc, second = network(x).split([dim, network.out_features - dim], dim=-1)
        if kind == "vmf":
            return VonMisesFisher(F.normalize(loc, dim=-1), F.softplus(second.squeeze(-1)) + 1)
        return pyro_dist.Normal(loc, F.softplus(second)).to_event(1)

    return network, encoder


def assert_gradients_reach(tensors):
    for tensor in tensors:
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
        tensor.grad = None


@pytest.mark.parametrize("kind", ["normal", "vmf"])
def test_gradients_reach_pseudo_inputs_and_encoder(kind):
    network, encoder = make_encoder(kind)
    pseudo_inputs = torch.rand(5, 4, dtype=F64, requires_grad=True)
    leaves = [pseudo_inputs, *network.parameters()]
    prior = VampPrior(encoder, pseudo_inputs)
    assert prior.num_components == 5
    prior.expand([6]).log_prob(points(kind, 2, 6)).sum().backward()
    assert_gradients_reach(leaves)
    torch.manual_seed(8)
    prior = VampPrior(encoder, pseudo_inputs)
    (prior.expand([6]).rsample((10,)) @ torch.arange(1.0, prior.event_shape[0] + 1, dtype=F64)
     ).square().sum().backward()
    assert_gradients_reach(leaves)


@pytest.mark.parametrize("kind", ["normal", "mvn"])
def test_rsample_gradient_is_unbiased(kind):
    """d/d mu_k E[|z|^2] = 2 mu_k / K and d/d sigma_k = 2 sigma_k / K. The per-draw gradients
    1{k} 2 z and 1{k} 2 z eps have second moments (4/K)(mu^2 + sigma^2) and
    (4/K)(mu^2 + 3 sigma^2); the estimates must lie within 4 of the standard errors these
    bound."""
    torch.manual_seed(9)
    loc = NORMAL_LOC.clone().requires_grad_()
    scale = NORMAL_SCALE.clone().requires_grad_()
    count = 40_000
    prior = VampPrior.from_components(COMPONENTS[kind](loc, scale))
    prior.rsample((count,)).square().sum().div(count).backward()
    loc_bound = (4 / 3 * (NORMAL_LOC**2 + NORMAL_SCALE**2) / count).sqrt()
    assert torch.all((loc.grad - 2 * NORMAL_LOC / 3).abs() < 4 * loc_bound)
    if kind == "normal":  # MultivariateNormal reaches the scale through scale_tril
        scale_bound = (4 / 3 * (NORMAL_LOC**2 + 3 * NORMAL_SCALE**2) / count).sqrt()
        assert torch.all((scale.grad - 2 * NORMAL_SCALE / 3).abs() < 4 * scale_bound)


def test_rsample_gradient_is_unbiased_vmf():
    """On S^2 (exact reparameterization): d/d kappa_k E[c^T z] = A'(kappa_k) mu_k^T c / K with
    A(kappa) = coth(kappa) - 1/kappa. Twenty batches of 2 000 draws; the mean gradient lies
    within 4 standard errors of their spread."""
    torch.manual_seed(20)
    direction = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    gradients = []
    for _ in range(20):
        concentration = VMF_CONCENTRATION.clone().requires_grad_()
        prior = VampPrior.from_components(vmf_components(VMF_LOC, concentration))
        (prior.rsample((2_000,)) @ direction).mean().backward()
        gradients.append(concentration.grad)
    gradients = torch.stack(gradients)
    kappa = VMF_CONCENTRATION
    expected = (kappa.pow(-2) - torch.sinh(kappa).pow(-2)) * (VMF_LOC @ direction) / 3
    standard_error = gradients.std(0) / math.sqrt(len(gradients))
    assert torch.all((gradients.mean(0) - expected).abs() < 4 * standard_error)


# VampPrior: errors ------------------------------------------------------------------------------


def test_component_shape_errors():
    with pytest.raises(ValueError, match=r"event shape \(m,\).*got event shape \(\)"):
        VampPrior.from_components(pyro_dist.Normal(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match=r"batch shape \(K,\).*got batch shape \(2, 3\)"):
        VampPrior.from_components(pyro_dist.Normal(torch.zeros(2, 3, 4), 1.0).to_event(1))
    with pytest.raises(ValueError, match=r"event shape \(m,\).*got event shape \(3, 4\)"):
        VampPrior.from_components(pyro_dist.Normal(torch.zeros(2, 3, 4), 1.0).to_event(2))
    with pytest.raises(ValueError, match="K >= 1"):
        VampPrior.from_components(pyro_dist.Normal(torch.zeros(0, 4), 1.0).to_event(1))
    with pytest.raises(ValueError, match="torch Distribution"):
        VampPrior.from_components(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(K,\) = \(3,\) for 3 pseudo-inputs"):
        VampPrior(lambda x: pyro_dist.Normal(torch.zeros(4, 2), 1.0).to_event(1), torch.rand(3, 5))
    with pytest.raises(ValueError, match="pseudo_inputs must be a tensor"):
        VampPrior(lambda x: None, [[0.5]])


# VampPriorModule ---------------------------------------------------------------------------------


def test_normal_init_is_the_papers():
    torch.manual_seed(10)
    module = VampPriorModule(50, (4, 5))
    pseudo_inputs = module.pseudo_inputs
    assert pseudo_inputs.shape == (50, 4, 5) and module.raw_pseudo_inputs.shape == (50, 4, 5)
    assert torch.all((pseudo_inputs >= 0) & (pseudo_inputs <= 1))
    # 1000 values of N(0.05, 0.01^2): standard error of the mean 3e-4, of the std 2.2e-4
    assert abs(pseudo_inputs.mean().item() - 0.05) < 0.0015
    assert abs(pseudo_inputs.std().item() - 0.01) < 0.001


@pytest.mark.parametrize("binary", [False, True])
def test_data_init_picks_distinct_rows(binary):
    torch.manual_seed(11)
    data = torch.rand(20, 6)
    data = torch.bernoulli(data).long() if binary else data
    module = VampPriorModule(8, 6, init="data", data=data)
    pseudo_inputs = module.pseudo_inputs.detach()
    assert torch.all((pseudo_inputs > 0) & (pseudo_inputs < 1))
    distances = (pseudo_inputs[:, None] - (0.01 + 0.98 * data.float())[None]).abs().amax(-1)
    assert torch.all(distances.min(1).values < 1e-5)
    if not binary:  # distinct rows (binary rows may coincide)
        assert len(set(distances.argmin(1).tolist())) == 8


def test_tensor_init():
    initial = torch.rand(3, 2, 2, dtype=F64)
    initial[0, 0, 0], initial[0, 0, 1] = 0.0, 1.0
    module = VampPriorModule(3, (2, 2), init=initial)
    expected = initial.clamp(1e-4, 1 - 1e-4)
    assert module.raw_pseudo_inputs.dtype == F64
    assert torch.allclose(module.pseudo_inputs, expected, rtol=0, atol=1e-12)


def test_module_forward_shapes_and_gradients():
    network, encoder = make_encoder("normal")
    module = VampPriorModule(5, 4).double()
    prior = module(encoder)
    assert isinstance(prior, VampPrior)
    assert prior.batch_shape == () and prior.event_shape == (2,) and prior.num_components == 5
    z = prior.expand([7]).rsample((3,))
    assert z.shape == (3, 7, 2) and z.dtype == F64
    prior.expand([7]).log_prob(z).sum().backward()
    assert_gradients_reach([module.raw_pseudo_inputs, *network.parameters()])


@pytest.mark.parametrize("kind", ["normal", "vmf"])
def test_module_as_the_prior_of_a_pyro_model(kind):
    """A VAE-like model/guide pair with vectorized particles: z has shape (particles, B, m)."""
    network, encoder = make_encoder(kind)
    module = VampPriorModule(5, 4).double()
    x = torch.rand(6, 4, dtype=F64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", module(encoder).expand([x.shape[0]]))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", encoder(x))

    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True)
    loss = elbo.differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    assert_gradients_reach([module.raw_pseudo_inputs, *network.parameters()])


class Posterior:
    """An object whose bound method is the encoder, as ``vae.posterior`` is."""

    def __init__(self):
        self.network, self.encoder = make_encoder("vmf")

    def posterior(self, x):
        return self.encoder(x)


def test_eval_mode_caches_the_prior():
    owner = Posterior()
    module = VampPriorModule(5, 4).double()
    parent = nn.Sequential(module)
    assert module(owner.posterior) is not module(owner.posterior)  # training: rebuilt
    parent.eval()
    cached = module(owner.posterior)
    assert module(owner.posterior) is cached  # a new bound method of the same encoder
    assert not cached.components.loc.requires_grad
    assert torch.allclose(cached.log_prob(points("vmf", 4)), VampPrior(
        owner.posterior, module.pseudo_inputs).log_prob(points("vmf", 4)), rtol=0, atol=1e-12)
    assert module(Posterior().posterior) is not cached  # another encoder
    module.eval()
    assert module(owner.posterior) is not cached  # train(False) cleared it
    cached = module(owner.posterior)
    parent.train()
    assert module._cache is None
    parent.eval()
    assert module(owner.posterior) is not cached
    cached = module(owner.posterior)
    module.clear_cache()
    assert module(owner.posterior) is not cached


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_pseudo_inputs": 0}, "num_pseudo_inputs must be an integer >= 1"),
        ({"input_shape": (4, 0)}, "input_shape must be a positive integer"),
        ({"init": "uniform"}, r"init must be one of \('normal', 'data'\)"),
        ({"init": 0.5}, "init must be one of .* or a tensor, got float"),
        ({"init": "data"}, "init='data' needs data"),
        ({"init": "data", "data": torch.rand(2, 4)}, "at least num_pseudo_inputs = 3 rows"),
        ({"init": "data", "data": torch.rand(9, 5)}, r"data must have shape .*\(N, 4\)"),
        ({"init": "data", "data": 255 * torch.rand(9, 4)}, r"data must have values in \[0, 1\]"),
        ({"data": torch.rand(9, 4)}, "data is only used with init='data'"),
        ({"init": torch.rand(3, 5)}, r"init must have shape .* = \(3, 4\), got \(3, 5\)"),
        ({"init": 2 * torch.ones(3, 4)}, r"init must have values in \[0, 1\]"),
    ],
)
def test_module_errors(arguments, message):
    arguments = {"num_pseudo_inputs": 3, "input_shape": 4, **arguments}
    with pytest.raises(ValueError, match=message):
        VampPriorModule(arguments.pop("num_pseudo_inputs"), arguments.pop("input_shape"),
                        **arguments)


# MixtureOfGaussiansPrior ------------------------------------------------------------------------


def test_mixture_of_gaussians_log_prob_and_gradients():
    torch.manual_seed(12)
    module = MixtureOfGaussiansPrior(3, 4, init_scale=2.0).double()
    with torch.no_grad():
        module.raw_scale.normal_()
        module.logits.normal_()
    prior = module()
    assert prior.batch_shape == () and prior.event_shape == (3,)
    z = torch.randn(2, 5, 3, dtype=F64)
    scale = F.softplus(module.raw_scale)
    log_weights = module.logits - module.logits.logsumexp(0)
    standardized = (z[..., None, :] - module.loc) / scale
    log_normal = (-0.5 * standardized**2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    expected = (log_weights + log_normal).logsumexp(-1)
    actual = prior.expand([5]).log_prob(z)
    assert actual.shape == (2, 5)
    assert torch.allclose(actual, expected, rtol=0, atol=1e-12)
    actual.sum().backward()
    assert_gradients_reach([module.loc, module.raw_scale, module.logits])


def test_mixture_of_gaussians_init():
    torch.manual_seed(13)
    module = MixtureOfGaussiansPrior(10, 50, init_scale=3.0)
    assert torch.allclose(module.scale, torch.ones(50, 10))
    assert torch.all(module.logits == 0)
    # 500 draws of N(0, 9): the sample std lies within 0.3 of 3 (about 5 standard errors)
    assert abs(module.loc.std().item() - 3.0) < 0.3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0, 3), "latent_dim must be an integer >= 1"),
        ((2, 0), "num_components must be an integer >= 1"),
        ((2, 3, -1.0), "init_scale must be positive"),
    ],
)
def test_mixture_of_gaussians_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        MixtureOfGaussiansPrior(*arguments[:2], init_scale=(arguments[2:] or (1.0,))[0])


# FlowPrior --------------------------------------------------------------------------------------


def flow_map(module, z):
    """T = T_L o ... o T_1 evaluated from the networks alone (no transform objects)."""
    for transform in module.transforms:
        mean, log_scale = transform.arn(z)
        z = log_scale.clamp(-5, 3).exp() * z + mean
    return z


def test_flow_log_prob_is_the_change_of_variables():
    torch.manual_seed(14)
    module = FlowPrior(3, num_flows=3).double()
    prior = module()
    assert prior.batch_shape == () and prior.event_shape == (3,)
    z = torch.randn(4, 3, dtype=F64)
    standard = pyro_dist.Normal(torch.zeros(3, dtype=F64), 1.0).to_event(1)
    for point, actual in zip(z, prior.log_prob(z), strict=True):
        jacobian = torch.autograd.functional.jacobian(lambda x: flow_map(module, x), point)
        expected = standard.log_prob(flow_map(module, point)) + jacobian.slogdet().logabsdet
        assert torch.allclose(actual, expected, rtol=0, atol=1e-12)


def test_flow_log_prob_runs_the_forward_direction_only(monkeypatch):
    torch.manual_seed(15)
    module = FlowPrior(4)
    for transform in module.transforms:
        monkeypatch.setattr(transform, "_inverse", None)  # calling it would fail
    assert module().expand([6]).log_prob(torch.randn(2, 6, 4)).shape == (2, 6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_flow_samples_have_finite_density(dtype):
    torch.manual_seed(16)
    module = FlowPrior(3).to(dtype)
    prior = module().expand([4])
    z = prior.sample((5,))
    assert z.shape == (5, 4, 3) and z.dtype == dtype
    log_prob = prior.log_prob(z)
    assert log_prob.shape == (5, 4) and torch.isfinite(log_prob).all()
    # sampling inverts the density direction: T(z) is the base draw it came from
    assert torch.isfinite(flow_map(module, z)).all()


def test_flow_sampler_inverts_the_density_map():
    torch.manual_seed(17)
    module = FlowPrior(3, num_flows=2).double()
    base_draws = torch.randn(50, 3, dtype=F64)
    z = base_draws
    for transform in reversed(module.transforms):
        z = transform.inv(z)
    assert torch.allclose(flow_map(module, z), base_draws, rtol=0, atol=1e-12)


def test_flow_normalisation_and_sampler():
    """2-D: importance sampling from N(0, 3^2 I) integrates the density to 1, and
    E_p[N(z; 0, I) / p(z)] = 1 over the flow's own draws; each within 3 standard errors (below
    0.03)."""
    torch.manual_seed(18)
    prior = FlowPrior(2, num_flows=2).double()()
    proposal = pyro_dist.Normal(torch.zeros(2, dtype=F64), 3.0).to_event(1)
    with torch.no_grad():
        z = 3 * torch.randn(40_000, 2, dtype=F64)
        importance = (prior.log_prob(z) - proposal.log_prob(z)).exp()
        draws = prior.sample((20_000,))
        standard = pyro_dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1)
        reverse = (standard.log_prob(draws) - prior.log_prob(draws)).exp()
    for values in (importance, reverse):
        estimate, standard_error = values.mean(), values.std() / math.sqrt(len(values))
        assert standard_error < 0.03
        assert abs(estimate - 1) < 3 * standard_error


def test_flow_gradients_reach_every_network():
    torch.manual_seed(19)
    module = FlowPrior(3, num_flows=2, hidden_dims=[8, 8])
    module().log_prob(torch.randn(16, 3)).sum().backward()
    parameters = list(module.parameters())
    assert len(parameters) == 2 * 3 * 2  # 2 flows, 3 layers, weight and bias
    assert_gradients_reach(parameters)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"latent_dim": 0}, "latent_dim must be an integer >= 1"),
        ({"num_flows": 0}, "num_flows must be an integer >= 1"),
        ({"hidden_dims": [2]}, r"hidden_dims must be .* >= latent_dim = 3, got \[2\]"),
        ({"hidden_dims": []}, "hidden_dims must be a non-empty list"),
    ],
)
def test_flow_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        FlowPrior(**{"latent_dim": 3, **arguments})


def test_gaussian_mixture_density_is_accurate_in_float32():
    """The matrix-product evaluation of the Gaussian components stays within 1e-5 nats of the
    direct float64 evaluation for float32 inputs with small scales and offset means."""
    torch.manual_seed(11)
    loc = torch.randn(500, 40) * 2 + 3
    scale = torch.rand(500, 40) * 0.9 + 0.05
    prior = VampPrior.from_components(pyro_dist.Normal(loc, scale).to_event(1))
    z = loc[torch.randint(500, (100,))] + 0.1 * torch.randn(100, 40)
    reference = pyro_dist.Normal(loc.double(), scale.double()).log_prob(
        z.double()[:, None]).sum(-1).logsumexp(-1) - math.log(500)
    value = prior.log_prob(z)
    assert value.dtype == torch.float32
    assert (value.double() - reference).abs().max() < 1e-5 * reference.abs().max()
