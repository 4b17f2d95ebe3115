"""Dequantization of 8-bit images: the bounds' constants, the ELBO against quadrature, the
variational dequantizer's density against autograd, importance weighting, and NaN handling.

Everything runs in float64. Monte Carlo checks use fixed seeds and a tolerance of 5 standard
errors computed alongside (by quadrature or from the samples themselves).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO
from scipy.integrate import quad
from torch import nn
from torch.autograd.functional import jacobian

from pyro_dgm.models.dequantization import (
    DequantizedImageFlow,
    UniformDequantization,
    VariationalDequantization,
    evaluate_bits_per_dim,
)
from pyro_dgm.models.image_flow import ImageFlow, real_nvp
from pyro_dgm.transforms import (
    ConditionalMaskedAffineCoupling2d,
    conditional_masked_affine_coupling2d,
)
from pyro_dgm.transforms.image_logit import LogitPreprocessing

ALPHA = 0.05
LOG_256 = math.log(256)


def _randomize(module: nn.Module, seed: int, std: float = 0.3) -> None:
    """Redraw every parameter (convolution weights with gain about 1), so that no coupling is
    the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            scale = parameter[0].numel() ** -0.5 if name.endswith("weight") else std
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(scale * noise)


def _levels(shape, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _logit_flow(shape=(1, 2, 2)) -> ImageFlow:
    """The logit preprocessing alone over a standard normal: p(x) factorises over pixels."""
    return ImageFlow(shape, [LogitPreprocessing(ALPHA)]).double()


def _pixel_log_density(x: float) -> float:
    """log p(x) of one pixel under :func:`_logit_flow`, written out independently."""
    s = ALPHA + (1 - 2 * ALPHA) * x
    y = math.log(s / (1 - s))
    return (-0.5 * y * y - 0.5 * math.log(2 * math.pi) + math.log(1 - 2 * ALPHA)
            - math.log(s) - math.log(1 - s))


def _pixel_moments(level: int) -> tuple[float, float]:
    """E_u and Var_u of log p((k + u) / 256), u ~ U[0, 1), by quadrature."""
    def f(u):
        return _pixel_log_density((level + u) / 256)

    mean = quad(f, 0, 1, epsabs=1e-13, epsrel=1e-13)[0]
    second = quad(lambda u: f(u) ** 2, 0, 1, epsabs=1e-13, epsrel=1e-13)[0]
    return mean, second - mean**2


class _UnitCubeDensity(nn.Module):
    """A hand-made density on [0, 1]^D: uniform, log p = 0, so log P(k) = -D log 256 exactly
    for every 8-bit image k."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.image_shape = torch.Size(shape)
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))

    def forward(self, temperature: float = 1.0):
        zeros = self.anchor.expand(self.image_shape)
        return dist.Uniform(zeros, zeros + 1).to_event(3)


class _PoisonedUniform(dist.Uniform):
    """Uniform on [0, 1]^D, but log p = ``poison`` for images whose first pixel has level 7."""

    poison = math.nan

    def log_prob(self, value):
        log_prob = torch.zeros_like(value)
        poisoned = (value[..., 0, 0, 0] * 256).floor() == 7
        log_prob[..., 0, 0, 0] = torch.where(poisoned, self.poison, 0.0)
        return log_prob


class _PoisonedDensity(_UnitCubeDensity):
    def __init__(self, shape, poison: float) -> None:
        super().__init__(shape)
        # a class per value: Pyro's plates expand the distribution into a new instance
        self.distribution = type("_Poisoned", (_PoisonedUniform,), {"poison": poison})

    def forward(self, temperature: float = 1.0):
        zeros = self.anchor.expand(self.image_shape)
        return self.distribution(zeros, zeros + 1).to_event(3)


def test_model_log_joint_is_the_flow_density_minus_d_log_256():
    flow = DequantizedImageFlow(_logit_flow())
    images = torch.tensor([[[[0, 255], [17, 128]]], [[[3, 4], [250, 99]]]], dtype=torch.uint8)
    noise = torch.rand(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    trace = poutine.trace(poutine.condition(flow.model, data={"u": noise})).get_trace(images)
    trace.compute_log_prob()
    expected = torch.tensor([
        sum(_pixel_log_density((float(k) + float(u)) / 256)
            for k, u in zip(image.flatten(), noises.flatten(), strict=True)) - 4 * LOG_256
        for image, noises in zip(images, noise, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trace.nodes["u"]["log_prob"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(UniformDequantization()(images.double()).log_prob(noise),
                       torch.zeros(2, dtype=torch.float64))


def test_uniform_dequantization_elbo_equals_the_exact_expectation():
    pyro.set_rng_seed(0)
    flow = DequantizedImageFlow(_logit_flow())
    images = torch.tensor([[[[0, 255], [17, 128]]]], dtype=torch.uint8)
    moments = [_pixel_moments(int(k)) for k in images.flatten()]
    exact = sum(mean for mean, _ in moments) - 4 * LOG_256
    num_particles = 20_000
    standard_error = math.sqrt(sum(variance for _, variance in moments) / num_particles)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    estimate = -float(elbo.differentiable_loss(flow.model, flow.guide, images))
    assert abs(estimate - exact) < 5 * standard_error, (estimate, exact, standard_error)
    assert standard_error < 0.02  # the check is sharp: the pixels' log-densities vary by ~1


def test_bits_per_dim_is_exactly_8_under_a_uniform_density():
    flow = DequantizedImageFlow(_UnitCubeDensity((1, 4, 4)))
    images = _levels((10, 1, 4, 4), seed=1)
    for num_samples in (1, 5):
        result = evaluate_bits_per_dim(flow.model, flow.guide, images, num_samples=num_samples,
                                       batch_size=3)
        assert result.num_images == 10 and result.num_samples == num_samples
        torch.testing.assert_close(result.per_image, torch.full((10,), 8.0, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        assert result.bits_per_dim == pytest.approx(8.0, abs=1e-12)
        assert result.log_likelihood == pytest.approx(-16 * LOG_256, abs=1e-10)
        assert result.standard_error == pytest.approx(0.0, abs=1e-12)
    assert result.monte_carlo_standard_error == pytest.approx(0.0, abs=1e-12)


def test_untrained_real_nvp_on_8_bit_uniform_noise():
    # Untrained, Real NVP is the logit preprocessing over N(0, I): on uniform noise its bits
    # per dimension average 8 + KL(U[0, 1] || p_pixel) / ln 2 > 8 (Gibbs), by quadrature.
    pyro.set_rng_seed(1)
    flow = DequantizedImageFlow(real_nvp((1, 4, 4), num_scales=2, hidden_channels=4).double())
    images = _levels((1600, 1, 4, 4), seed=2)
    result = evaluate_bits_per_dim(flow.model, flow.guide, images, batch_size=400)
    pixel_mean = quad(_pixel_log_density, 0, 1, epsabs=1e-13)[0]
    expected = 8 - pixel_mean / math.log(2)
    assert expected == pytest.approx(8.2075, abs=1e-4)
    assert abs(result.bits_per_dim - expected) < 5 * result.standard_error, (result, expected)
    assert result.standard_error < 0.01 and result.monte_carlo_standard_error is None


def _dequantizer(seed: int = 3, shape=(1, 4, 4)) -> VariationalDequantization:
    dequantizer = VariationalDequantization(shape, num_couplings=4, hidden_channels=6,
                                            context_channels=3).double()
    _randomize(dequantizer, seed)
    return dequantizer


def _normalizing_map(dequantizer: VariationalDequantization, levels: torch.Tensor):
    """u -> epsilon for one image, flattened, composed from the couplings' forward maps."""
    context = dequantizer.features(levels / 127.5 - 1)
    couplings = [coupling.condition(context) for coupling in dequantizer.couplings]

    def forward(u_flat):
        value = torch.logit(u_flat.reshape(1, *levels.shape[-3:]))
        for coupling in couplings:
            value = coupling(value)
        return value.flatten()

    return forward


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 2, 2)])
def test_variational_log_q_matches_the_autograd_jacobian(shape):
    pyro.set_rng_seed(4)
    dequantizer = _dequantizer(shape=shape)
    levels = _levels((2, *shape), seed=5).double()
    q = dequantizer(levels)
    assert q.has_rsample and q.batch_shape == (2,) and q.event_shape == shape
    u = q.rsample()
    assert ((u > 0) & (u < 1)).all()
    log_q = q.log_prob(u)
    fresh = dequantizer(levels).log_prob(u.clone())  # no cache: the inverse maps
    normal = torch.distributions.Normal(0.0, 1.0)
    for i in range(2):
        forward = _normalizing_map(dequantizer, levels[i:i + 1])
        noise = forward(u[i].flatten())
        jac = jacobian(forward, u[i].flatten())
        expected = normal.log_prob(noise).sum() + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_q[i], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fresh[i], expected, rtol=1e-10, atol=1e-10)
    u.sum().backward()  # reparameterized: gradients reach the couplings and the features
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in dequantizer.parameters())


@torch.no_grad()
def test_variational_q_integrates_to_one_over_the_unit_cube():
    # The integral of q(u | k) over (0, 1)^4 by randomized quasi-Monte Carlo: the mean of q
    # over 4096 scrambled Sobol points, 8 independent scramblings giving the standard error;
    # tolerance 5 standard errors.
    dequantizer = _dequantizer(seed=7, shape=(1, 2, 2))
    q = dequantizer(_levels((1, 1, 2, 2), seed=8).double())
    means, largest = [], 0.0
    for seed in range(8):
        sobol = torch.quasirandom.SobolEngine(4, scramble=True, seed=seed)
        density = q.log_prob(sobol.draw(4096, dtype=torch.float64).reshape(-1, 1, 1, 2, 2)).exp()
        means.append(density.mean())
        largest = max(largest, float(density.max()))
    integral = torch.stack(means)
    standard_error = float(integral.std()) / math.sqrt(len(means))
    assert abs(float(integral.mean()) - 1) < 5 * standard_error, (integral, standard_error)
    assert standard_error < 0.002
    assert largest > 3  # q is far from uniform, so the check has teeth


def test_importance_weighting_tightens_the_bound():
    pyro.set_rng_seed(9)
    flow = real_nvp((1, 4, 4), num_scales=2, hidden_channels=4).double()
    _randomize(flow, seed=10, std=0.1)
    model = DequantizedImageFlow(flow, _dequantizer(seed=11))
    images = _levels((40, 1, 4, 4), seed=12)
    elbo = evaluate_bits_per_dim(model.model, model.guide, images, num_samples=1, batch_size=8)
    weighted = evaluate_bits_per_dim(model.model, model.guide, images, num_samples=16,
                                     batch_size=8)
    gap = elbo.per_image - weighted.per_image  # bits/dim, >= 0 in expectation
    standard_error = float(gap.std()) / math.sqrt(len(gap))
    # tolerance: 3 standard errors of the mean gap; the gap itself is far above that
    assert float(gap.mean()) > 3 * standard_error > 0, (float(gap.mean()), standard_error)
    assert weighted.monte_carlo_standard_error > 0
    assert weighted.bits_per_dim < elbo.bits_per_dim


@pytest.mark.parametrize("poison, shown", [(math.nan, "nan"), (-math.inf, "-inf"),
                                           (math.inf, "inf")])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_a_non_finite_estimate_raises_naming_the_batch(poison, shown, num_samples):
    flow = DequantizedImageFlow(_PoisonedDensity((1, 2, 2), poison))
    images = torch.full((6, 1, 2, 2), 100, dtype=torch.uint8)
    images[3, 0, 0, 0] = 7
    evaluate_bits_per_dim(flow.model, flow.guide, images[:3], num_samples=num_samples)
    with pytest.raises(ValueError, match=rf"batch 1 \(images 2 to 3\): image 3 has {shown}$"):
        evaluate_bits_per_dim(flow.model, flow.guide, images, num_samples=num_samples,
                              batch_size=2)


def test_subsampling_scales_the_loss_to_the_data_set():
    flow = DequantizedImageFlow(_logit_flow(), _dequantizer(shape=(1, 2, 2)))
    images = _levels((4, 1, 2, 2), seed=13)
    losses = []
    for kwargs in ({}, {"indices": torch.arange(4), "num_data": 100}):
        pyro.set_rng_seed(14)
        losses.append(Trace_ELBO().differentiable_loss(flow.model, flow.guide, images, **kwargs))
    torch.testing.assert_close(losses[1], 25 * losses[0], rtol=1e-12, atol=0)


def test_levels_from_uint8_and_from_intensities_agree():
    flow = DequantizedImageFlow(_logit_flow((1, 4, 4)))
    images = _levels((5, 1, 4, 4), seed=15)
    levels = flow.levels(images)
    assert levels.dtype == torch.float64 and levels.shape == (5, 1, 4, 4)
    assert torch.equal(flow.levels(images.flatten(1).float() / 255), levels)
    assert torch.equal(flow.levels(images.flatten(1)), levels)


def test_bad_arguments_are_named():
    flow = DequantizedImageFlow(_logit_flow())
    images = _levels((3, 1, 2, 2), seed=16)
    with pytest.raises(ValueError, match="kl_scale must be 1"):
        flow.model(images, kl_scale=0.5)
    with pytest.raises(ValueError, match="indices and num_data"):
        flow.guide(images, torch.arange(3))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 2, 2\)"):
        flow.model(images[:, :, :1])
    with pytest.raises(TypeError, match="uint8"):
        flow.model(images.long())
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_bits_per_dim(flow.model, flow.guide, images, num_samples=0)
    with pytest.raises(ValueError, match="mask"):
        conditional_masked_affine_coupling2d(2, 3, mask="diagonal")
    with pytest.raises(ValueError, match="channels must be at least 2"):
        ConditionalMaskedAffineCoupling2d(1, nn.Identity(), mask="channel")
    with pytest.raises(ValueError, match="num_couplings"):
        VariationalDequantization((1, 2, 2), num_couplings=0)


def test_particles_broadcast_through_flow_and_dequantizer():
    pyro.set_rng_seed(17)
    flow = real_nvp((1, 4, 4), num_scales=2, hidden_channels=4).double()
    _randomize(flow, seed=18, std=0.1)
    model = DequantizedImageFlow(flow, _dequantizer(seed=19))
    images = _levels((3, 1, 4, 4), seed=20)
    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model.model, model.guide, images)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.dequantization.parameters())
