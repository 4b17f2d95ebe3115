"""HypersphericalUniform, the closed-form KL divergences against Monte Carlo and mpmath, and the
von Mises-Fisher log-density, entropy and KLs: accuracy at large kappa, derivatives of every
order, torch.func transforms."""

import math

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
from torch.distributions import kl_divergence

from pyro_dgm.distributions import HypersphericalUniform, VonMisesFisher, log_sphere_surface_area
from pyro_dgm.distributions.kl import _kl_to_uniform_reference, _KLToUniform
from pyro_dgm.special import log_bessel_iv_normalized_and_ratio_values

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


# Higher derivatives, torch.func, accuracy at large kappa (log_prob, entropy, both KLs) -------


def vmf_functions(m):
    """The four functions of (loc, kappa) whose derivatives are checked, float64: log_prob at
    a fixed point, entropy, KL to the uniform, KL to a fixed vMF; and KL from a fixed vMF."""
    point = random_unit(m, seed=11)
    other_loc, other_kappa = random_unit(m, seed=12), torch.tensor(3.0, dtype=F64)
    uniform = HypersphericalUniform(m, dtype=F64)

    def vmf(loc, kappa):
        return VonMisesFisher(loc, kappa, validate_args=False)

    return {
        "log_prob": lambda loc, kappa: vmf(loc, kappa).log_prob(point),
        "entropy": lambda loc, kappa: vmf(loc, kappa).entropy(),
        "kl_uniform": lambda loc, kappa: kl_divergence(vmf(loc, kappa), uniform),
        "kl_vmf": lambda loc, kappa: kl_divergence(vmf(loc, kappa), vmf(other_loc, other_kappa)),
        "kl_vmf_second": lambda loc, kappa: kl_divergence(vmf(other_loc, other_kappa),
                                                          vmf(loc, kappa)),
    }


def flat_gradient(function, parameters):
    """The autograd gradient of ``function(loc, kappa)`` as one vector (m + 1,)."""
    loc, kappa = (p.detach().clone().requires_grad_() for p in parameters)
    grads = torch.autograd.grad(function(loc, kappa), (loc, kappa), allow_unused=True,
                                materialize_grads=True)  # entropy, KL to U: not in loc
    return torch.cat([grads[0], grads[1].reshape(1)])


def hessian_and_finite_differences(function, loc, kappa, step=1e-5):
    """The autograd Hessian of ``function`` in (loc, kappa), (m + 1, m + 1), and its central
    finite differences of the autograd gradient (steps relative to each coordinate's scale)."""
    blocks = torch.autograd.functional.hessian(function, (loc, kappa))
    hessian = torch.cat([torch.cat([blocks[0][0], blocks[0][1].unsqueeze(-1)], -1),
                         torch.cat([blocks[1][0].unsqueeze(0), blocks[1][1].reshape(1, 1)],
                                   -1)])
    columns = []
    for i in range(len(loc) + 1):
        h = step * (1.0 if i < len(loc) else max(1.0, float(kappa)))
        shifted = []
        for sign in (1, -1):
            new_loc, new_kappa = loc.clone(), kappa.clone()
            if i < len(loc):
                new_loc[i] += sign * h
            else:
                new_kappa += sign * h
            shifted.append(flat_gradient(function, (new_loc, new_kappa)))
        columns.append((shifted[0] - shifted[1]) / (2 * h))
    return hessian, torch.stack(columns, -1)


@pytest.mark.parametrize("m, kappa", [(3, 0.4), (5, 5.0), (11, 60.0)])
def test_hessians_against_finite_differences(m, kappa):
    """float64 Hessians in (loc, kappa) of log_prob, entropy and both KLs (the fused backward
    passes are differentiable to any order) against central differences of the autograd
    gradient, within 1e-6 relative to the largest entry."""
    loc = random_unit(m, seed=m)
    concentration = torch.tensor(kappa, dtype=F64)
    for name, function in vmf_functions(m).items():
        hessian, numeric = hessian_and_finite_differences(function, loc, concentration)
        assert torch.isfinite(hessian).all()
        scale = hessian.abs().max()
        assert scale > 0
        torch.testing.assert_close(hessian, numeric, rtol=0, atol=1e-6 * scale, msg=name)
        torch.testing.assert_close(hessian, hessian.T, rtol=0, atol=1e-12 * scale, msg=name)


def test_hessian_in_kappa_is_minus_variance_of_w():
    """d^2 log_prob / d kappa^2 = -A_m'(kappa) = -Var(mu^T z) exactly (log_prob is linear in
    kappa but for the log-normalizer), against 40-digit arithmetic, as is d^2 KL / d kappa^2 =
    A' + kappa A''; at kappa = 0 both are 1/m in magnitude."""
    mpmath.mp.dps = 40
    m, point = 5, random_unit(5, seed=1)
    for kappa in (0.0, 5.0, 300.0):
        concentration = torch.tensor(kappa, dtype=F64)
        hessian = torch.autograd.functional.hessian(
            lambda k: VonMisesFisher(random_unit(m), k).log_prob(point), concentration)
        kl_hessian = torch.autograd.functional.hessian(
            lambda k: kl_divergence(VonMisesFisher(random_unit(m), k),
                                    HypersphericalUniform(m, dtype=F64)), concentration)
        if kappa == 0:
            assert float(hessian) == pytest.approx(-1 / m, rel=1e-14)
            assert float(kl_hessian) == pytest.approx(1 / m, rel=1e-14)
            continue
        v = mpmath.mpf(m) / 2 - 1

        def slope(k, v=v):
            r = mpmath.besseli(v + 1, k) / mpmath.besseli(v, k)
            return 1 - r * r - (2 * v + 1) * r / k

        k = mpmath.mpf(kappa)
        assert float(hessian) == pytest.approx(-float(slope(k)), rel=1e-13)
        expected_kl = slope(k) + k * mpmath.diff(slope, k)
        assert float(kl_hessian) == pytest.approx(float(expected_kl), rel=1e-8)


def test_torch_func_transforms_match_autograd():
    """torch.func.grad, vmap and jacrev of log_prob, entropy and both KLs (through the
    plain-torch references) equal autograd's results on the fused paths."""
    m = 5
    locs = random_unit(m, 4, seed=3)
    kappas = torch.tensor([0.0, 0.7, 30.0, 2e4], dtype=F64)
    for name, function in vmf_functions(m).items():
        pairs = list(zip(locs, kappas, strict=True))
        values = torch.stack([function(loc, kappa) for loc, kappa in pairs])
        grads = [flat_gradient(function, (loc, kappa)) for loc, kappa in pairs]
        grads = torch.stack(grads)
        torch.testing.assert_close(torch.func.vmap(function)(locs, kappas), values,
                                   rtol=1e-13, atol=1e-13, msg=name)
        grad_loc, grad_kappa = torch.func.vmap(torch.func.grad(function, argnums=(0, 1)))(
            locs, kappas)
        torch.testing.assert_close(torch.cat([grad_loc, grad_kappa.unsqueeze(-1)], -1), grads,
                                   rtol=1e-11, atol=1e-13, msg=name)
        for i in (1, 2):
            jacobian = torch.func.jacrev(function, argnums=(0, 1))(locs[i], kappas[i])
            torch.testing.assert_close(torch.cat([jacobian[0], jacobian[1].reshape(1)]),
                                       grads[i], rtol=1e-11, atol=1e-13, msg=name)


MPMATH_DIMENSIONS = [2, 3, 5, 11, 100, 1000]
MPMATH_KAPPAS = [0.0, 1e-6, 1e-3, 0.1, 0.7, 2.0, 5.0, 13.0, 40.0, 150.0, 1e3, 4e3, 2e4,
                 1e5, 3e5, 1e6]


def mpmath_von_mises_fisher(m: int, kappa: float) -> dict:
    """log C_m(kappa), the entropy and d KL / d kappa = kappa A'(kappa), 50 digits."""
    mpmath.mp.dps = 50
    v, k = mpmath.mpf(m) / 2 - 1, mpmath.mpf(kappa)
    iv = mpmath.besseli(v, k, maxterms=10**6)
    ratio = mpmath.besseli(v + 1, k, maxterms=10**6) / iv
    log_c = v * mpmath.log(k) - (v + 1) * mpmath.log(2 * mpmath.pi) - mpmath.log(iv)
    return {"log_c": log_c, "entropy": -log_c - k * ratio,
            "kl_slope": k * (1 - ratio**2 - (2 * v + 1) * ratio / k)}


@pytest.mark.parametrize("m", MPMATH_DIMENSIONS)
def test_log_prob_entropy_and_their_derivatives_against_mpmath(m):
    """float64, kappa from 0 to 1e6: log_prob and the entropy within 2e-14 of 50-digit values
    (relative to max(1, |value|); log_prob at points drawn from the distribution, the exact
    density being taken at the points normalized in 50 digits), and d KL / d kappa =
    kappa A'(kappa) = -d entropy / d kappa within 1e-10 relative (both 0 at kappa = 0)."""
    loc = random_unit(m, seed=m)
    mu = [mpmath.mpf(t) for t in loc.tolist()]
    errors = {"log_prob": 0.0, "entropy": 0.0, "kl_slope": 0.0, "entropy_slope": 0.0}
    for kappa in MPMATH_KAPPAS:
        concentration = torch.tensor(kappa, dtype=F64, requires_grad=True)
        q = VonMisesFisher(loc, concentration)
        (kl_slope,) = torch.autograd.grad(
            kl_divergence(q, HypersphericalUniform(m, dtype=F64)), concentration)
        entropy = VonMisesFisher(loc, concentration).entropy()
        (entropy_slope,) = torch.autograd.grad(entropy, concentration)
        if kappa == 0:
            assert kl_slope == 0 and entropy_slope == 0
            continue
        torch.manual_seed(int(kappa * 10) % 1000 + m)
        points = q.sample((2,))
        log_prob = q.log_prob(points).detach()
        exact = mpmath_von_mises_fisher(m, kappa)
        for point, value in zip(points, log_prob, strict=True):
            z = [mpmath.mpf(t) for t in point.tolist()]
            cosine = sum(a * b for a, b in zip(mu, z, strict=True)) / mpmath.sqrt(
                sum(a * a for a in mu) * sum(b * b for b in z))
            expected = float(kappa * cosine + exact["log_c"])
            errors["log_prob"] = max(errors["log_prob"],
                                     abs(float(value) - expected) / max(1.0, abs(expected)))
        expected = float(exact["entropy"])
        errors["entropy"] = max(errors["entropy"],
                                abs(float(entropy.detach()) - expected) / max(1.0, abs(expected)))
        expected = float(exact["kl_slope"])
        errors["kl_slope"] = max(errors["kl_slope"], abs(float(kl_slope) / expected - 1))
        errors["entropy_slope"] = max(errors["entropy_slope"],
                                      abs(-float(entropy_slope) / expected - 1))
    assert errors["log_prob"] < 2e-14 and errors["entropy"] < 2e-14, errors
    assert errors["kl_slope"] < 1e-10 and errors["entropy_slope"] < 1e-10, errors


def assert_kl_to_uniform_fused_matches_reference(device: str) -> None:
    """The float32 training path's fused KL (_KLToUniform) against its plain-torch reference:
    values, first and second derivatives in kappa, float32 and float64."""
    for dtype, (value_tol, first_tol, second_tol) in {
        torch.float64: (1e-12, 1e-9, 1e-8), torch.float32: (1e-6, 1e-5, 1e-5)
    }.items():
        kappa = torch.tensor([0.0, 1e-3, 0.6, 4.0, 35.0, 300.0, 2500.0], dtype=dtype,
                             device=device)
        for m in (3, 11, 64):
            log_normalized, ratio = log_bessel_iv_normalized_and_ratio_values(0.5 * m - 1,
                                                                               kappa)
            results = []
            for fused in (True, False):
                k = kappa.clone().requires_grad_()
                if fused:
                    value = _KLToUniform.apply(k, log_normalized, ratio, m)
                else:
                    value = _kl_to_uniform_reference(k, m)
                (first,) = torch.autograd.grad(value.sum(), k, create_graph=True)
                (second,) = torch.autograd.grad(first.sum(), k)
                assert value.dtype == dtype
                results.append((value.detach(), first.detach(), second))
            tolerances = (value_tol, first_tol, second_tol)
            for got, expected, tol in zip(*results, tolerances, strict=True):
                torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 1e-2)


def test_kl_to_uniform_fused_matches_reference():
    assert_kl_to_uniform_fused_matches_reference("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kl_to_uniform_fused_matches_reference_on_cuda():
    assert_kl_to_uniform_fused_matches_reference("cuda")


@pytest.mark.parametrize("m", [3, 11, 64])
def test_float32_values_and_derivatives_match_float64(m):
    """float32 parameters (octave tables, the fused KL): log_prob, entropy, both KLs and
    their gradients in kappa within float32's precision of the float64 results at the same
    (rounded) parameters, for kappa up to 2e4."""
    loc32 = random_unit(m, 6, seed=m).float()
    kappa32 = torch.tensor([0.0, 0.05, 1.5, 20.0, 700.0, 2e4])
    point32 = random_unit(m, 6, seed=m + 1).float()
    other = VonMisesFisher(random_unit(m, seed=2).float(), torch.tensor(4.0))
    for dtype in (torch.float32, F64):
        loc, kappa = loc32.to(dtype), kappa32.to(dtype).requires_grad_()
        q = VonMisesFisher(loc, kappa, validate_args=False)
        other_q = VonMisesFisher(other.loc.to(dtype), other.concentration.to(dtype),
                                 validate_args=False)
        values = torch.stack([
            q.log_prob(point32.to(dtype)), q.entropy(),
            kl_divergence(q, HypersphericalUniform(m, dtype=dtype)), kl_divergence(q, other_q),
        ])
        grads = torch.stack([torch.autograd.grad(row.sum(), kappa, retain_graph=True)[0]
                             for row in values])
        if dtype == torch.float32:
            values32, grads32 = values.detach(), grads
        else:
            scale = values.detach().abs().clamp(min=1)
            assert ((values32.double() - values.detach()).abs() / scale).max() < 1e-6
            assert ((grads32.double() - grads).abs() / grads.abs().clamp(min=1e-3)).max() < 2e-5
