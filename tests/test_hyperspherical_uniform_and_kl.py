"""HypersphericalUniform, and the closed-form KL divergences against Monte Carlo and mpmath."""

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
from torch.distributions import kl_divergence

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher, log_sphere_surface_area

F64 = torch.float64


def random_unit(m, *shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(*shape, m, generator=generator, dtype=F64)
    return vector / vector.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("m", [2, 3, 4, 11])
def test_surface_area(m):
    # |S^1| = 2 pi, |S^2| = 4 pi, |S^3| = 2 pi^2
    known = {2: 2 * math.pi, 3: 4 * math.pi, 4: 2 * math.pi**2}
    expected = known.get(m, 2 * math.pi ** (m / 2) / math.gamma(m / 2))
    assert log_sphere_surface_area(m) == pytest.approx(math.log(expected), rel=1e-14)


def test_uniform_samples_moments_and_density():
    torch.manual_seed(0)
    m = 5
    uniform = HypersphericalUniform(m, dtype=F64)
    z = uniform.sample((100_000,))
    assert z.shape == (100_000, m) and z.dtype == F64
    assert ((z.norm(dim=-1) - 1).abs() < 1e-14).all()
    # mean 0 and covariance I / m, within 4 standard errors (sd of z_i z_j <= 1/sqrt(m))
    tolerance = 4 / math.sqrt(len(z))
    assert (z.mean(0).abs() < tolerance).all()
    covariance = z.T @ z / len(z)
    assert ((covariance - torch.eye(m, dtype=F64) / m).abs() < tolerance).all()
    torch.testing.assert_close(uniform.variance, torch.full((m,), 1 / m, dtype=F64))
    assert float(uniform.log_prob(z[0])) == pytest.approx(-log_sphere_surface_area(m))
    assert float(uniform.entropy()) == pytest.approx(log_sphere_surface_area(m))


def test_uniform_shapes_expand_dtype_device():
    uniform = HypersphericalUniform(3, batch_shape=(2,), dtype=torch.float32)
    assert uniform.batch_shape == (2,) and uniform.event_shape == (3,)
    expanded = uniform.expand([4, 2])
    assert expanded.sample((5,)).shape == (5, 4, 2, 3)
    assert expanded.log_prob(random_unit(3, 4, 2).float()).shape == (4, 2)
    assert expanded.rsample().dtype == torch.float32 and expanded.device.type == "cpu"
    assert uniform.mean.shape == (2, 3)


@pytest.mark.parametrize("dim", [1, 0, 2.5, "3", True])
def test_uniform_rejects_bad_dimension(dim):
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        HypersphericalUniform(dim)


def test_uniform_validates_its_support():
    uniform = HypersphericalUniform(3, validate_args=True)
    with pytest.raises(ValueError):
        uniform.log_prob(torch.tensor([1.0, 1.0, 0.0]))


def monte_carlo_kl(p, q, count=200_000):
    z = p.sample((count,))
    values = p.log_prob(z) - q.log_prob(z)
    return values.mean(0), values.std(0) / math.sqrt(count)


@pytest.mark.parametrize("m", [3, 5, 16])
def test_kl_to_uniform_against_monte_carlo(m):
    torch.manual_seed(m)
    concentration = torch.tensor([0.0, 0.3, 2.0, 25.0, 400.0], dtype=F64)
    p = VonMisesFisher(random_unit(m, 5), concentration)
    q = HypersphericalUniform(m, dtype=F64).expand([5])
    kl = kl_divergence(p, q)
    estimate, standard_error = monte_carlo_kl(p, q)
    assert kl.shape == (5,) and kl[0] == 0
    assert ((kl - estimate).abs() <= 4 * standard_error + 1e-12).all()


@pytest.mark.parametrize("m", [3, 7])
def test_kl_between_von_mises_fisher_against_monte_carlo(m):
    torch.manual_seed(m)
    p = VonMisesFisher(random_unit(m, 4, seed=1), torch.tensor([0.0, 1.0, 10.0, 50.0],
                                                                dtype=F64))
    q = VonMisesFisher(random_unit(m, 4, seed=2), torch.tensor([3.0, 0.0, 12.0, 40.0],
                                                                dtype=F64))
    kl = kl_divergence(p, q)
    estimate, standard_error = monte_carlo_kl(p, q)
    assert ((kl - estimate).abs() <= 4 * standard_error + 1e-12).all()
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(4, dtype=F64), atol=1e-12,
                               rtol=0)


@pytest.mark.parametrize("m, kappa", [(3, 1e4), (10, 1e5), (128, 2.0), (128, 3e3), (2, 1e6)])
def test_kl_to_uniform_against_mpmath(m, kappa):
    """KL = kappa A + log C_m + log|S|, in 40-digit arithmetic (scipy's ive underflows at
    m = 128, kappa = 2, which gave the reference code NaN losses)."""
    mpmath.mp.dps = 40
    v = mpmath.mpf(m) / 2 - 1
    k = mpmath.mpf(kappa)
    # log I_v(kappa): the series, or for large kappa the Hankel expansion [DLMF 10.40.1]
    log_iv = mpmath.log(mpmath.besseli(v, k)) if kappa < 1e3 else (
        k - 0.5 * mpmath.log(2 * mpmath.pi * k)
        + mpmath.log(sum(mpmath.rf(0.5 - v, j) * mpmath.rf(0.5 + v, j)
                         / (mpmath.factorial(j) * (2 * k) ** j) for j in range(30))))
    ratio = mpmath.besseli(v + 1, k) / mpmath.besseli(v, k) if kappa < 1e3 else None
    if ratio is None:  # A = d/dkappa log I_v - v / kappa, by the same asymptotic series
        ratio = mpmath.diff(
            lambda t: t - 0.5 * mpmath.log(2 * mpmath.pi * t) + mpmath.log(
                sum(mpmath.rf(0.5 - v, j) * mpmath.rf(0.5 + v, j)
                    / (mpmath.factorial(j) * (2 * t) ** j) for j in range(30))), k) - v / k
    log_c = v * mpmath.log(k) - (v + 1) * mpmath.log(2 * mpmath.pi) - log_iv
    expected = k * ratio + log_c + log_sphere_surface_area(m)
    p = VonMisesFisher(random_unit(m), torch.tensor(kappa, dtype=F64))
    kl = kl_divergence(p, HypersphericalUniform(m, dtype=F64))
    assert float(kl) == pytest.approx(float(expected), rel=1e-10)
    if m == 128 and kappa == 2.0:  # I_63(2) ~ 1e-87 underflows in float32
        assert np.float32(scipy.special.iv(63.0, 2.0)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_is_smooth_at_zero_and_finite_everywhere(dtype):
    concentration = torch.tensor([0.0, 1e-30, 1e-8, 1e-3, 1.0, 1e3, 1e5, 1e6], dtype=dtype,
                                 requires_grad=True)
    m = 11
    p = VonMisesFisher(random_unit(m, 8).to(dtype), concentration)
    kl = kl_divergence(p, HypersphericalUniform(m, dtype=dtype))
    (grad,) = torch.autograd.grad(kl.sum(), concentration)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert (kl >= 0).all() and kl[0] == 0 and grad[0] == 0
    # near 0: KL = kappa^2 / (2 m) + O(kappa^4), so dKL/dkappa = kappa / m
    assert float(kl[3].detach()) == pytest.approx(1e-6 / (2 * m), rel=1e-3)
    assert float(grad[3]) == pytest.approx(1e-3 / m, rel=1e-3)
    assert (kl[1:].diff() > 0).all()  # increasing in kappa


@pytest.mark.parametrize("m", [3, 6, 11, 101])
def test_kl_gradient_against_finite_differences(m):
    kappa = torch.tensor([0.2, 3.0, 70.0, 2000.0], dtype=F64, requires_grad=True)
    loc = random_unit(m, 4)

    def kl_of(concentration):
        p = VonMisesFisher(loc, concentration)
        return kl_divergence(p, HypersphericalUniform(m, dtype=F64).expand([4]))

    (grad,) = torch.autograd.grad(kl_of(kappa).sum(), kappa)
    h = 1e-5 * kappa.detach()  # KL is a difference of terms of size kappa: step with kappa
    numeric = (kl_of(kappa.detach() + h) - kl_of(kappa.detach() - h)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-7, atol=1e-10)


def test_kl_rejects_different_spheres():
    with pytest.raises(ValueError, match="different spheres"):
        kl_divergence(VonMisesFisher(random_unit(3), 1.0), HypersphericalUniform(4,
                                                                                  dtype=F64))
