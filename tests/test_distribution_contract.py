"""Pyro's distribution contract, checked generically over every exported distribution.

In the manner of Pyro's ``tests/distributions/conftest.py`` fixtures: one table (``CASES``) of
parameter sets for every distribution in ``pyro_dgm.distributions.__all__`` and one test per
property, parametrized over the table. A check that cannot apply to a case is named in the
case's ``not_applicable`` with the reason, and the test skips with it; nothing passes silently.
The KL divergences have their own table (``KL_CASES``), which must cover every pair of the
package's distributions registered with :func:`torch.distributions.kl_divergence`.

Statistical checks draw from a fixed seed, state their sample count, and allow
``TOLERANCE_SE`` standard errors (estimated from the same draws); the normalization of the
rotationally symmetric densities is checked by deterministic quadrature instead.

The last sections test the exact m = 3 sampler's derivative near kappa = 0 and the von
Mises-Fisher second moments against mpmath.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import mpmath
import numpy as np
import pyro.distributions as pyro_dist
import pytest
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit
from torch.distributions import Distribution, kl_divergence
from torch.distributions.kl import _KL_REGISTRY

import pyro_dgm.distributions as package
from pyro_dgm.distributions import HypersphericalUniform, VampPrior, VonMisesFisher
from pyro_dgm.distributions.von_mises_fisher import (
    _hankel_start,
    _second_moments,
    _w_by_inversion,
)

F64 = torch.float64
TOLERANCE_SE = 4.5  # standard errors allowed to a Monte Carlo estimate (two-sided p ~ 7e-6)
DRAWS = 20_000  # draws per Monte Carlo estimate of a moment, the entropy or a KL
GOF_P_VALUE = 1e-3  # for Pyro's one-dimensional test (sorted gaps)
GOF_P_VALUE_VECTOR = 1e-8  # for its nearest-neighbour test, whose p-values are too small


def random_unit(m: int, *shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(*shape, m, generator=generator, dtype=F64)
    return vector / torch.linalg.vector_norm(vector, dim=-1, keepdim=True)


def log_sphere_area(m: int) -> float:
    """log |S^{m-1}|, written here independently of the package."""
    return math.log(2.0) + 0.5 * m * math.log(math.pi) - math.lgamma(0.5 * m)


# The table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One distribution with one parameter set.

    ``build(device, dtype, validate_args, leaves)`` makes the distribution (float64 on the CPU
    by default; the tensors to differentiate the samples by are appended to ``leaves``).
    ``infer_args`` are the arguments of ``family.infer_shapes``. ``manifold_dim`` is the
    dimension of the support for the goodness-of-fit test. ``axis`` gives, for a density that
    depends on ``z`` only through ``axis(d)^T z``, the axis of the quadrature that checks its
    normalization; without one, the normalization is checked by importance sampling from
    ``proposal``. ``repr_parts`` must appear in ``repr``. ``not_applicable`` maps a check's
    name to the reason it cannot apply.
    """

    name: str
    family: type
    build: Callable[..., Distribution]
    infer_args: dict | None
    manifold_dim: int
    repr_parts: tuple[str, ...]
    axis: Callable[[Distribution], torch.Tensor] | None = None
    proposal: str = "uniform"
    not_applicable: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def vmf_case(name: str, m: int, loc_shape: tuple[int, ...], kappa, seed: int) -> Case:
    """A VonMisesFisher case; ``kappa`` a float (kept a Python float) or a list."""

    def build(device="cpu", dtype=F64, validate_args=None, leaves=None):
        raw = random_unit(m, *loc_shape, seed=seed).to(dtype)
        concentration = kappa if isinstance(kappa, float) else torch.tensor(kappa, dtype=dtype)
        if leaves is not None:
            raw.requires_grad_()
            if not isinstance(kappa, float):
                concentration.requires_grad_()
                leaves.append(concentration)
            leaves.append(raw)
        loc = raw / torch.linalg.vector_norm(raw, dim=-1, keepdim=True)
        if torch.is_tensor(concentration):
            concentration = concentration.to(device)
        return VonMisesFisher(loc.to(device), concentration, validate_args=validate_args)

    loc_shape_full = (*loc_shape, m)
    kappa_shape = () if isinstance(kappa, float) else (len(kappa),)
    batch_shape = torch.broadcast_shapes(loc_shape, kappa_shape)
    not_applicable = {}
    if m != 3:
        not_applicable["meta_sample"] = (
            "for m != 3 the rejection sampler asks the host, once per round, whether every "
            "element was accepted: meta tensors have no values"
        )
    return Case(
        name=name,
        family=VonMisesFisher,
        build=build,
        infer_args={"loc": loc_shape_full, "concentration": kappa_shape},
        manifold_dim=m - 1,
        repr_parts=(  # torch's repr, of the parameters expanded to the batch shape
            f"loc: torch.Size({list(batch_shape + (m,))})",
            f"concentration: {1.5}" if not kappa_shape else
            f"concentration: torch.Size({list(batch_shape)})",
        ),
        axis=lambda d: d.loc,
        not_applicable=not_applicable,
    )


def uniform_case(name: str, m: int, batch_shape: tuple[int, ...]) -> Case:
    def build(device="cpu", dtype=F64, validate_args=None, leaves=None):
        return HypersphericalUniform(
            m, batch_shape, dtype=dtype, device=device, validate_args=validate_args
        )

    def axis(d):
        return torch.eye(m, dtype=d.dtype)[0].expand(d.batch_shape + (m,))

    return Case(
        name=name,
        family=HypersphericalUniform,
        build=build,
        infer_args={"dim": m, "batch_shape": batch_shape},
        manifold_dim=m - 1,
        repr_parts=(f"dim: {m}", f"batch_shape: torch.Size({list(batch_shape)})"),
        axis=axis,
        not_applicable={"rsample": "no parameters to differentiate the samples by"},
    )


VAMP_NOT_APPLICABLE = {
    "infer_shapes": "the event shape is that of the encoder's output, not a function of the "
    "arguments' shapes (VampPrior.infer_shapes raises NotImplementedError)",
    "entropy": "a mixture's entropy has no closed form; VampPrior defines no entropy()",
    "covariance": "VampPrior defines no covariance_matrix",
}


def vamp_vmf_from_encoder() -> Case:
    """K = 4 pseudo-inputs of 6 features through a fixed linear encoder to vMF on S^2."""

    def build(device="cpu", dtype=F64, validate_args=None, leaves=None):
        generator = torch.Generator().manual_seed(7)
        weight = torch.randn(6, 4, generator=generator, dtype=F64).to(dtype)
        pseudo_inputs = torch.randn(4, 6, generator=generator, dtype=F64).to(dtype)
        if leaves is not None:
            weight.requires_grad_()
            leaves.append(weight)

        def encoder(x):
            out = x @ weight
            loc = torch.nn.functional.normalize(out[:, :3], dim=-1)
            concentration = 1 + 3 * torch.sigmoid(out[:, 3])  # in (1, 4)
            return VonMisesFisher(loc.to(device), concentration.to(device), validate_args=False)

        return VampPrior(encoder, pseudo_inputs, validate_args=validate_args)

    return Case(
        name="vamp-vmf3-encoder",
        family=VampPrior,
        build=build,
        infer_args=None,
        manifold_dim=2,
        repr_parts=("num_components: 4", "VonMisesFisher"),
        not_applicable=dict(VAMP_NOT_APPLICABLE),
    )


def vamp_vmf_expanded() -> Case:
    """K = 3 vMF components on S^4, mixture expanded to batch shape (2,)."""

    def build(device="cpu", dtype=F64, validate_args=None, leaves=None):
        concentration = torch.tensor([0.5, 2.0, 6.0], dtype=dtype)
        if leaves is not None:
            concentration.requires_grad_()
            leaves.append(concentration)
        components = VonMisesFisher(
            random_unit(5, 3, seed=11).to(dtype).to(device), concentration.to(device),
            validate_args=False,
        )
        return VampPrior.from_components(components, validate_args=validate_args).expand([2])

    return Case(
        name="vamp-vmf5-expanded",
        family=VampPrior,
        build=build,
        infer_args=None,
        manifold_dim=4,
        repr_parts=("num_components: 3", "VonMisesFisher", "batch_shape: torch.Size([2])"),
        not_applicable={
            **VAMP_NOT_APPLICABLE,
            "meta_sample": "its m = 5 von Mises-Fisher components' rejection sampler asks the "
            "host whether every element was accepted: meta tensors have no values",
        },
    )


def vamp_normal() -> Case:
    """K = 3 diagonal Normal components in R^2."""

    def build(device="cpu", dtype=F64, validate_args=None, leaves=None):
        loc = torch.tensor([[0.0, 1.0], [-1.5, 0.5], [1.0, -1.0]], dtype=dtype)
        scale = torch.tensor([[0.5, 1.0], [0.8, 0.3], [1.2, 0.7]], dtype=dtype)
        if leaves is not None:
            loc.requires_grad_()
            leaves.append(loc)
        components = pyro_dist.Normal(loc.to(device), scale.to(device), validate_args=False)
        components = components.to_event(1)
        return VampPrior.from_components(components, validate_args=validate_args)

    return Case(
        name="vamp-normal2",
        family=VampPrior,
        build=build,
        infer_args=None,
        manifold_dim=2,
        repr_parts=("num_components: 3", "Independent"),
        proposal="normal",
        not_applicable=dict(VAMP_NOT_APPLICABLE),
    )


CASES = [
    vmf_case("vmf2-scalar-kappa", 2, (), 1.5, seed=1),
    vmf_case("vmf2-large-kappa", 2, (2,), [300.0, 1e4], seed=2),
    vmf_case("vmf3-batched", 3, (3,), [0.0, 0.5, 20.0], seed=3),
    vmf_case("vmf3-broadcast", 3, (2, 1), [1e-3, 1.0, 200.0], seed=4),
    vmf_case("vmf5-small-kappa", 5, (2,), [1e-6, 0.1], seed=5),
    vmf_case("vmf5-large-kappa", 5, (2,), [1e3, 5e4], seed=6),
    vmf_case("vmf11-batched", 11, (3,), [0.0, 3.0, 40.0], seed=7),
    vmf_case("vmf11-broadcast", 11, (3, 1), [2.0, 300.0], seed=8),
    uniform_case("uniform2", 2, ()),
    uniform_case("uniform3-batch-2x1", 3, (2, 1)),
    uniform_case("uniform11-batch-3", 11, (3,)),
    vamp_vmf_from_encoder(),
    vamp_vmf_expanded(),
    vamp_normal(),
]


@dataclass(frozen=True)
class FamilyRules:
    """What every parameter set of a family shares: constructors that must raise ValueError
    when validating, and a value outside the support of the distribution ``d``."""

    bad_arguments: tuple[Callable[[], object], ...]
    off_support: Callable[[Distribution], torch.Tensor]


def _vamp_of(encoder_output):
    return VampPrior(lambda x: encoder_output, torch.zeros(3, 2), validate_args=True)


FAMILY_RULES = {
    VonMisesFisher: FamilyRules(
        bad_arguments=(
            lambda: VonMisesFisher(torch.tensor([1.0, 1.0, 0.0]), 1.0, validate_args=True),
            lambda: VonMisesFisher(torch.tensor([1.0, 0.0]), -1.0, validate_args=True),
            lambda: VonMisesFisher(torch.tensor([1.0, 0.0]), float("nan"), validate_args=True),
            lambda: VonMisesFisher(torch.tensor([1.0]), 1.0, validate_args=True),
            lambda: VonMisesFisher(torch.eye(3)[:2], torch.ones(3), validate_args=True),
            lambda: VonMisesFisher(torch.eye(2), 1.0, gradient="reinforce"),
        ),
        off_support=lambda d: 2 * d.sample(),
    ),
    HypersphericalUniform: FamilyRules(
        bad_arguments=(
            lambda: HypersphericalUniform(1, validate_args=True),
            lambda: HypersphericalUniform(2.5, validate_args=True),
            lambda: HypersphericalUniform(True, validate_args=True),
        ),
        off_support=lambda d: 2 * d.sample(),
    ),
    VampPrior: FamilyRules(
        bad_arguments=(
            lambda: VampPrior(lambda x: x, [1.0, 2.0], validate_args=True),
            lambda: _vamp_of(pyro_dist.Normal(torch.zeros(2, 2), 1.0).to_event(1)),  # K != 3
            lambda: _vamp_of(pyro_dist.Normal(torch.zeros(3, 2), 1.0)),  # event shape ()
            lambda: _vamp_of(torch.zeros(3, 2)),  # not a distribution
        ),
        off_support=lambda d: torch.full_like(d.sample(), float("nan")),
    ),
}


def skip_unless_applicable(case: Case, check: str) -> None:
    if check in case.not_applicable:
        pytest.skip(f"{case.name}: {case.not_applicable[check]}")


def test_the_table_covers_every_exported_distribution():
    """Every distribution family the package exports has cases here and family rules, except
    the score-keeping wrappers ``ScoredIndependent`` and ``ScoredMasked``: Pyro's Independent
    and MaskedDistribution with another score function (what ``VonMisesFisher.to_event`` and
    ``.mask`` return; tested in test_von_mises_fisher.py and test_elbo_graphs.py)."""
    exported = {
        value
        for value in (getattr(package, name) for name in package.__all__)
        if isinstance(value, type) and issubclass(value, Distribution)
    }
    wrappers = {package.ScoredIndependent, package.ScoredMasked}
    assert {case.family for case in CASES} == exported - wrappers
    assert set(FAMILY_RULES) == exported - wrappers


parametrize_cases = pytest.mark.parametrize("case", CASES, ids=str)


# Shapes, expand, validation, repr, pickling, support -------------------------------------


@parametrize_cases
def test_infer_shapes(case):
    skip_unless_applicable(case, "infer_shapes")
    d = case.build()
    batch_shape, event_shape = case.family.infer_shapes(**case.infer_args)
    assert (batch_shape, event_shape) == (d.batch_shape, d.event_shape)


def test_vamp_prior_infer_shapes_is_not_implemented():
    with pytest.raises(NotImplementedError):
        VampPrior.infer_shapes(pseudo_inputs=(4, 6))


@parametrize_cases
def test_expand(case):
    torch.manual_seed(0)
    d = case.build()
    value = d.sample()
    expanded = d.expand((2,) + d.batch_shape)
    assert type(expanded) is type(d)
    assert expanded.batch_shape == (2,) + d.batch_shape
    assert expanded.event_shape == d.event_shape
    assert expanded.sample((3,)).shape == (3, 2) + d.batch_shape + d.event_shape
    torch.testing.assert_close(
        expanded.log_prob(value), d.log_prob(value).expand((2,) + d.batch_shape)
    )
    assert d.expand(d.batch_shape).batch_shape == d.batch_shape
    # singleton dimensions grow
    grown = torch.Size(4 if size == 1 else size for size in d.batch_shape)
    if grown != d.batch_shape:
        assert d.expand(grown).log_prob(value.expand(grown + d.event_shape)).shape == grown


@parametrize_cases
def test_expand_errors(case):
    """As torch.Tensor.expand: a non-singleton dimension cannot change, and dimensions cannot
    be dropped (torch's distributions raise RuntimeError)."""
    d = case.build()
    expanded = d.expand((2,) + d.batch_shape)
    with pytest.raises(RuntimeError):
        expanded.expand((3,) + d.batch_shape)  # 2 -> 3
    with pytest.raises(RuntimeError):
        expanded.expand(d.batch_shape)  # drops the leading 2
    for i, size in enumerate(d.batch_shape):
        if size != 1:
            with pytest.raises(RuntimeError):
                d.expand(d.batch_shape[:i] + (size + 1,) + d.batch_shape[i + 1 :])


@parametrize_cases
def test_validate_args(case):
    rules = FAMILY_RULES[case.family]
    for make in rules.bad_arguments:
        with pytest.raises(ValueError):
            make()
    d = case.build(validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(rules.off_support(d))
    d.log_prob(d.sample())  # in the support: no error


@parametrize_cases
def test_repr(case):
    text = repr(case.build())
    name = case.family.__name__
    assert text.startswith(name + "(") and text.endswith(")") and text != name + "()"
    for part in case.repr_parts:
        assert part in text, (part, text)


@parametrize_cases
def test_pickle_round_trip(case):
    torch.manual_seed(0)
    d = case.build()
    value = d.sample((5,))
    copy = pickle.loads(pickle.dumps(d))
    assert type(copy) is type(d) and copy.batch_shape == d.batch_shape
    assert copy.event_shape == d.event_shape
    torch.testing.assert_close(copy.log_prob(value), d.log_prob(value), rtol=0, atol=0)


@parametrize_cases
def test_support_contains_the_samples(case):
    torch.manual_seed(0)
    d = case.build()
    samples = d.sample((200,))
    assert samples.shape == (200,) + d.batch_shape + d.event_shape
    assert bool(d.support.check(samples).all())
    assert torch.isfinite(d.log_prob(samples)).all()


@parametrize_cases
def test_rsample_is_differentiable(case):
    skip_unless_applicable(case, "rsample")
    torch.manual_seed(0)
    leaves = []
    d = case.build(leaves=leaves)
    assert d.has_rsample and leaves
    z = d.rsample((8,))
    assert z.shape == (8,) + d.batch_shape + d.event_shape
    weights = torch.linspace(-1, 1, z.shape[-1], dtype=z.dtype)
    grads = torch.autograd.grad((z * weights).sum(), leaves)
    for grad in grads:
        assert torch.isfinite(grad).all() and bool((grad != 0).any())


# Moments, entropy, normalization, goodness of fit -------------------------------------------


def standard_errors(values: torch.Tensor) -> torch.Tensor:
    return values.std(0) / math.sqrt(values.shape[0])


@parametrize_cases
def test_mean_against_monte_carlo(case):
    torch.manual_seed(1)
    d = case.build()
    z = d.sample((DRAWS,))
    error = (z.mean(0) - d.mean).abs()
    assert d.mean.shape == d.batch_shape + d.event_shape
    assert (error <= TOLERANCE_SE * standard_errors(z) + 1e-12).all(), error.max()


@parametrize_cases
def test_variance_against_monte_carlo(case):
    """Sample variance against ``variance``; its standard error from the fourth central
    moment, sqrt((m4 - s^4) / N)."""
    torch.manual_seed(2)
    d = case.build()
    z = d.sample((DRAWS,))
    centered = z - z.mean(0)
    variance = centered.square().mean(0)
    fourth = centered.pow(4).mean(0)
    standard_error = ((fourth - variance.square()).clamp(min=0) / DRAWS).sqrt()
    assert d.variance.shape == d.batch_shape + d.event_shape
    error = (variance - d.variance).abs()
    assert (error <= TOLERANCE_SE * standard_error + 1e-12).all(), error.max()


@parametrize_cases
def test_covariance_matrix_against_monte_carlo(case):
    skip_unless_applicable(case, "covariance")
    torch.manual_seed(3)
    d = case.build()
    z = d.sample((DRAWS,))
    centered = z - d.mean  # the exact mean, tested above
    products = centered.unsqueeze(-1) * centered.unsqueeze(-2)
    covariance = d.covariance_matrix
    assert covariance.shape == d.batch_shape + d.event_shape + d.event_shape
    torch.testing.assert_close(covariance, covariance.transpose(-1, -2), rtol=0, atol=0)
    torch.testing.assert_close(
        covariance.diagonal(dim1=-2, dim2=-1), d.variance, rtol=1e-15, atol=1e-18
    )
    error = (products.mean(0) - covariance).abs()
    assert (error <= TOLERANCE_SE * standard_errors(products) + 1e-12).all(), error.max()


@parametrize_cases
def test_entropy_against_monte_carlo(case):
    skip_unless_applicable(case, "entropy")
    torch.manual_seed(4)
    d = case.build()
    negative_log_density = -d.log_prob(d.sample((DRAWS,)))
    entropy = d.entropy()
    assert entropy.shape == d.batch_shape
    error = (negative_log_density.mean(0) - entropy).abs()
    assert (error <= TOLERANCE_SE * standard_errors(negative_log_density) + 1e-12).all()


def test_entropy_is_not_implemented_where_the_table_says_so():
    for case in CASES:
        if "entropy" in case.not_applicable:
            with pytest.raises(NotImplementedError):
                case.build().entropy()


def gauss_legendre_graded(panels: int = 48, nodes: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [0, pi], panels [pi 2^-(j+1), pi 2^-j] graded towards 0 (where a
    concentrated density peaks), ``nodes`` Gauss-Legendre points each."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = [math.pi * 2.0**-j for j in range(panels)] + [0.0]
    points, weights = [], []
    for high, low in zip(edges[:-1], edges[1:], strict=True):
        points.append(low + (high - low) * (x + 1) / 2)
        weights.append(w * (high - low) / 2)
    return np.concatenate(points), np.concatenate(weights)


def axis_frame(case: Case, d: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's symmetry axis and a unit vector orthogonal to it, both batch_shape + (m,)."""
    m = d.event_shape[0]
    axis = case.axis(d).expand(d.batch_shape + (m,))
    generator = torch.Generator().manual_seed(0)
    other = torch.randn(d.batch_shape + (m,), dtype=F64, generator=generator)
    other = other - (other * axis).sum(-1, keepdim=True) * axis
    return axis, other / torch.linalg.vector_norm(other, dim=-1, keepdim=True)


@parametrize_cases
def test_log_prob_is_normalized(case):
    """For a density of ``axis^T z`` alone, int_{S^{m-1}} p = |S^{m-2}| int_0^pi p(cos t axis +
    sin t n) sin^{m-2} t dt (n a unit vector orthogonal to the axis), by graded Gauss-Legendre
    quadrature: to 1e-11. Otherwise, importance sampling: 200_000 draws from the uniform
    distribution on the sphere (or N(0, 3^2 I) in R^m), densities written here, to 4.5 SE."""
    d = case.build()
    m = d.event_shape[0]
    if case.axis is not None:
        axis, other = axis_frame(case, d)
        angles, weights = (torch.from_numpy(a) for a in gauss_legendre_graded())
        shape = (-1,) + (1,) * (len(d.batch_shape) + 1)
        z = angles.cos().reshape(shape) * axis + angles.sin().reshape(shape) * other
        density = d.log_prob(z).exp()  # (nodes, *batch)
        measure = weights * angles.sin() ** (m - 2)
        total = torch.einsum("n...,n->...", density, measure) * math.exp(log_sphere_area(m - 1))
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-11, atol=0)
        return
    generator = torch.Generator().manual_seed(5)
    count = 200_000
    if case.proposal == "uniform":
        z = torch.randn(count, m, generator=generator, dtype=F64)
        z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        log_proposal = torch.full((count,), -log_sphere_area(m), dtype=F64)
    else:
        scale = 3.0
        z = scale * torch.randn(count, m, generator=generator, dtype=F64)
        log_proposal = (-0.5 * (z / scale).square().sum(-1) - m * math.log(scale)
                        - 0.5 * m * math.log(2 * math.pi))
    z = z.reshape((count,) + (1,) * len(d.batch_shape) + (m,))
    ratio = (d.log_prob(z) - log_proposal.reshape((count,) + (1,) * len(d.batch_shape))).exp()
    error = (ratio.mean(0) - 1).abs()
    assert (error <= TOLERANCE_SE * standard_errors(ratio)).all(), error


@parametrize_cases
def test_goodness_of_fit(case):
    """Pyro's goodness-of-fit tests (with scipy's chi^2 tail, see conftest) of the draws
    against ``log_prob``, for each batch element.

    Pyro's nearest-neighbour test of vectors counts each pair of mutual nearest neighbours
    twice: on exact draws (uniform on S^2 and S^4, 1000 m of them; a standard normal in R^2)
    it gave p < 1e-3 in 7-10 % of 300 seeds and p < 1e-6 in up to 0.3 % (measured), but never
    p < 1e-8. Its one-dimensional test (gaps between sorted draws) gave p < 1e-3 in at most
    0.5 % of 200 seeds. So where the density is a function of ``axis^T z`` alone, the draws are
    tested as 4000 one-dimensional statistics against densities derived from ``log_prob``:
    on the circle the signed angle from the axis (density ``p(z)``); otherwise w = axis^T z
    (density ``|S^{m-2}| (1 - w^2)^{(m-3)/2} p(z)``) and the first coordinate t of the unit
    tangent direction (z - w axis) / sqrt(1 - w^2) along a vector orthogonal to the axis
    (density ``|S^{m-3}| (1 - t^2)^{(m-4)/2} / |S^{m-2}|``), at p > GOF_P_VALUE. Otherwise
    the vectors themselves, 1000 (d + 1) on a manifold of dimension d (Pyro asks for more than
    1000 d), at p > GOF_P_VALUE_VECTOR.
    """
    torch.manual_seed(6)
    d = case.build()
    m = d.event_shape[0]
    if case.axis is None:
        count = 1000 * (case.manifold_dim + 1)
        z = d.sample((count,))
        density = d.log_prob(z).exp().reshape(count, -1)
        z = z.reshape(count, -1, m)
        for element in range(z.shape[1]):
            p_value = auto_goodness_of_fit(z[:, element], density[:, element],
                                           dim=case.manifold_dim)
            assert p_value > GOF_P_VALUE_VECTOR, (element, p_value)
        return
    count = 4000
    z = d.sample((count,))
    log_density = d.log_prob(z)
    axis, other = axis_frame(case, d)
    w = (z * axis).sum(-1)
    across = (z * other).sum(-1)
    if m == 2:  # arc length is the circle's surface measure
        statistics = [(torch.atan2(across, w), log_density)]
    else:
        tangent = across / (1 - w.square()).sqrt()
        statistics = [
            (w, log_density + log_sphere_area(m - 1) + 0.5 * (m - 3) * torch.log1p(-w.square())),
            (tangent, log_sphere_area(m - 2) - log_sphere_area(m - 1)
             + 0.5 * (m - 4) * torch.log1p(-tangent.square())),
        ]
    for statistic, log_statistic_density in statistics:
        statistic = statistic.reshape(count, -1)
        density = log_statistic_density.exp().reshape(count, -1)
        for element in range(statistic.shape[1]):
            p_value = auto_goodness_of_fit(statistic[:, element, None], density[:, element])
            assert p_value > GOF_P_VALUE, (element, p_value)


# Devices -----------------------------------------------------------------------------------


@parametrize_cases
def test_meta_device_shapes(case):
    """Built on the meta device (no values; validation off, as it needs them), the shapes of
    log_prob, mean, variance and entropy are right without any computation."""
    d = case.build(device="meta", validate_args=False)
    value = torch.empty((4,) + d.batch_shape + d.event_shape, dtype=F64, device="meta")
    log_prob = d.log_prob(value)
    assert log_prob.device.type == "meta" and log_prob.shape == (4,) + d.batch_shape
    assert d.mean.shape == d.variance.shape == d.batch_shape + d.event_shape
    if "entropy" not in case.not_applicable:
        assert d.entropy().shape == d.batch_shape


@parametrize_cases
def test_meta_device_sampling(case):
    skip_unless_applicable(case, "meta_sample")
    d = case.build(device="meta", validate_args=False)
    z = d.sample((3,))
    assert z.device.type == "meta" and z.shape == (3,) + d.batch_shape + d.event_shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@parametrize_cases
def test_cuda_matches_cpu(case):
    torch.manual_seed(7)
    d = case.build(device="cuda")
    cpu = case.build()
    z = d.sample((64,))
    assert z.device.type == "cuda" and bool(d.support.check(z).all())
    torch.testing.assert_close(d.log_prob(z).cpu(), cpu.log_prob(z.cpu()), rtol=1e-12,
                               atol=1e-10)
    torch.testing.assert_close(d.mean.cpu(), cpu.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d.variance.cpu(), cpu.variance, rtol=1e-12, atol=1e-14)
    if "entropy" not in case.not_applicable:
        torch.testing.assert_close(d.entropy().cpu(), cpu.entropy(), rtol=1e-12, atol=1e-12)


# KL divergences ----------------------------------------------------------------------------


def vmf(m, loc_shape, kappa, seed):
    return VonMisesFisher(random_unit(m, *loc_shape, seed=seed), torch.tensor(kappa, dtype=F64))


KL_CASES = [
    pytest.param(
        lambda: vmf(3, (4,), [0.0, 0.7, 15.0, 400.0], seed=20),
        lambda: HypersphericalUniform(3, dtype=F64),
        id="vmf3||uniform",
    ),
    pytest.param(
        lambda: vmf(11, (2, 1), [0.3, 60.0], seed=21),
        lambda: HypersphericalUniform(11, (2, 2), dtype=F64),
        id="vmf11||uniform-batched",
    ),
    pytest.param(
        lambda: vmf(5, (3,), [0.0, 2.0, 30.0], seed=22),
        lambda: vmf(5, (3,), [4.0, 0.5, 25.0], seed=23),
        id="vmf5||vmf5",
    ),
    pytest.param(
        lambda: vmf(2, (2, 1), [1.0], seed=24),
        lambda: vmf(2, (3,), [0.0, 2.0, 9.0], seed=25),
        id="vmf2||vmf2-broadcast",
    ),
]


def test_kl_table_covers_every_registered_pair():
    classes = {
        value for value in (getattr(package, name) for name in package.__all__)
        if isinstance(value, type) and issubclass(value, Distribution)
    }
    registered = {(p, q) for p, q in _KL_REGISTRY if p in classes and q in classes}
    covered = {(type(param.values[0]()), type(param.values[1]())) for param in KL_CASES}
    assert registered == covered


@pytest.mark.parametrize("make_p, make_q", KL_CASES)
def test_kl_against_monte_carlo(make_p, make_q):
    torch.manual_seed(8)
    p, q = make_p(), make_q()
    kl = kl_divergence(p, q)
    shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert kl.shape == shape and (kl >= 0).all()
    z = p.sample((DRAWS,))
    z = z.expand((DRAWS,) + shape + p.event_shape)
    difference = p.log_prob(z) - q.log_prob(z)
    error = (difference.mean(0) - kl).abs()
    assert (error <= TOLERANCE_SE * standard_errors(difference) + 1e-12).all(), error


# The m = 3 sampler near kappa = 0 ----------------------------------------------------------


def exact_w_and_derivative(kappa: float, uniform: float) -> tuple[float, float]:
    """w = 1 + log(u + a e^{-2 kappa}) / kappa (a = 1 - u) and dw/dkappa, in enough digits
    that the derivative's two terms of size 1/kappa do not cancel (0 at kappa = 0: 2 a u)."""
    digits = 40 + 2 * max(0, int(-math.log10(kappa))) if kappa else 40
    with mpmath.workdps(digits):
        u = mpmath.mpf(uniform)
        a = 1 - u
        if kappa == 0:
            return float(u - a), float(2 * a * u)
        k = mpmath.mpf(kappa)
        q = u + a * mpmath.exp(-2 * k)
        one_minus_w = -mpmath.log(q) / k
        derivative = one_minus_w / k - 2 * a * mpmath.exp(-2 * k) / (k * q)
        return float(1 - one_minus_w), float(derivative)


INVERSION_KAPPAS = [0.0, 1e-300, 1e-12, 1e-8, 1e-6, 1e-3, 0.1, 0.125 * (1 - 1e-15), 0.125,
                    0.2, 0.5, 1 - 1e-15, 1.0, 5.0, 50.0, 700.0, 1e4, 1e6]
# multiples of 2^-53, as torch.rand's float64 variates, for which 1 - u is exact
INVERSION_UNIFORMS = [
    math.ldexp(round(math.ldexp(u, 53)), -53)
    for u in [0.0, 2.0**-53, 2.0**-30, 1e-9, 1e-3, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999,
              1 - 2.0**-30, 1 - 2.0**-53]
]


def test_m3_inverse_cdf_and_its_derivative_against_mpmath():
    """w and dw/dkappa of the m = 3 inversion, float64, on a grid of kappa (through both
    switch points, 1/8 and 1) and u, against arithmetic of at least 40 digits: to 6e-16 and
    4e-15 absolute (measured 5.6e-16 and 2.9e-15, the latter the closed form's just above
    kappa = 1/8, where its derivative loses about eps / kappa to cancellation)."""
    kappa = torch.tensor([k for k in INVERSION_KAPPAS for _ in INVERSION_UNIFORMS], dtype=F64,
                         requires_grad=True)
    uniform = torch.tensor(INVERSION_UNIFORMS * len(INVERSION_KAPPAS), dtype=F64)
    w, root = _w_by_inversion(kappa, uniform)
    (derivative,) = torch.autograd.grad(w.sum(), kappa)
    pairs = zip(kappa.detach().tolist(), uniform.tolist(), strict=True)
    exact = [exact_w_and_derivative(k, u) for k, u in pairs]
    exact_w, exact_derivative = (torch.tensor(column, dtype=F64) for column in zip(*exact))
    torch.testing.assert_close(w.detach(), exact_w, rtol=0, atol=6e-16)
    torch.testing.assert_close(derivative, exact_derivative, rtol=0, atol=4e-15)
    torch.testing.assert_close(w.detach().square() + root.detach().square(),
                               torch.ones_like(w), rtol=0, atol=5e-16)


def test_m3_inverse_cdf_has_finite_second_derivatives():
    kappa = torch.tensor(INVERSION_KAPPAS, dtype=F64, requires_grad=True)
    uniform = torch.full_like(kappa, 0.3)
    w, _ = _w_by_inversion(kappa, uniform)
    (first,) = torch.autograd.grad(w.sum(), kappa, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), kappa)
    assert torch.isfinite(second).all()
    # d^2 w / dkappa^2 at kappa = 0 is -2 c_2(a) = (8/3) a u d, d = a - u (the series)
    a, u = 0.7, 0.3
    assert float(second[0]) == pytest.approx(8 / 3 * a * u * (a - u), rel=1e-12)


def exact_mean_derivative(kappa: float) -> float:
    """d/dkappa E[w] = d/dkappa (coth kappa - 1/kappa) = 1/kappa^2 - 1/sinh^2 kappa; 1/3 at 0."""
    if kappa == 0:
        return 1 / 3
    with mpmath.workdps(60):
        k = mpmath.mpf(kappa)
        return float(1 / k**2 - 1 / mpmath.sinh(k) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("kappa", [0.0, 1e-8, 1e-6, 1e-3])
def test_m3_rsample_gradient_in_kappa_near_zero(kappa, dtype):
    """Through VonMisesFisher.rsample (m = 3): 100_000 independent draws of d(mu^T z)/dkappa,
    each between 0 and (1 + A)^2 / 2 (see _w_by_inversion; 1/2 at kappa = 0, where each is
    2 u (1 - u)), with mean within 4 standard errors of dA/dkappa (1/3 at kappa = 0; the
    clamp before the fix gave exactly 0 there, and float32's cancellation a mean of 0.55 with
    draws up to 16 at kappa < 1e-6)."""
    torch.manual_seed(9)
    count = 100_000
    loc = torch.zeros(count, 3, dtype=dtype)
    loc[:, 2] = 1
    concentration = torch.full((count,), kappa, dtype=dtype, requires_grad=True)
    z = VonMisesFisher(loc, concentration).rsample()
    (derivative,) = torch.autograd.grad((z @ loc[0]).sum(), concentration)
    derivative = derivative.double()
    mean_resultant = 0.0 if kappa == 0 else 1 / math.tanh(kappa) - 1 / kappa
    slack = 1e-6 if dtype == torch.float32 else 1e-14
    assert float(derivative.min()) >= -slack
    assert float(derivative.max()) <= (1 + mean_resultant) ** 2 / 2 + slack
    standard_error = float(derivative.std()) / math.sqrt(count)
    assert abs(float(derivative.mean()) - exact_mean_derivative(kappa)) <= 4 * standard_error


# von Mises-Fisher second moments ------------------------------------------------------------


def exact_second_moments(m: int, kappa: float) -> tuple[float, float]:
    """(A_m / kappa, A_m') in 80 digits: A' = 1 - A^2 - (m - 1) A / kappa; (1/m, 1/m) at 0."""
    if kappa == 0:
        return 1 / m, 1 / m
    with mpmath.workdps(80):
        k = mpmath.mpf(kappa)
        v = mpmath.mpf(m) / 2 - 1
        ratio = mpmath.besseli(v + 1, k) / mpmath.besseli(v, k)
        return float(ratio / k), float(1 - ratio**2 - (m - 1) * ratio / k)


@pytest.mark.parametrize("m", [2, 3, 5, 11, 65])
def test_vmf_second_moments_against_mpmath(m):
    """A_m / kappa and Var(mu^T z) = A_m' (float64 arithmetic, for float64 and float32
    parameters) against 80-digit arithmetic, through the switch to Hankel's expansion: to
    1e-15 and 5e-13 relative (measured 4.3e-16 and 2.4e-13, the second just below the switch)."""
    start = _hankel_start(m)
    kappas = [0.0, 1e-300, 1e-8, 1e-3, 0.5, 1.0, 5.0, 10.0, start * (1 - 1e-12), start,
              start * 1.5, 1e3, 1e4, 1e5]
    exact = torch.tensor([exact_second_moments(m, k) for k in kappas], dtype=F64)
    for dtype in (F64, torch.float32):
        kappa = torch.tensor(kappas, dtype=dtype)
        if dtype == torch.float32:  # compare at the float32 kappa actually used
            exact = torch.tensor([exact_second_moments(m, float(k)) for k in kappa], dtype=F64)
        perpendicular, axial = _second_moments(kappa, m)
        assert perpendicular.dtype == axial.dtype == F64
        torch.testing.assert_close(perpendicular, exact[:, 0], rtol=1e-15, atol=0)
        torch.testing.assert_close(axial, exact[:, 1], rtol=5e-13, atol=0)


@pytest.mark.parametrize("m", [2, 3, 7])
def test_vmf_covariance_is_the_uniform_one_at_zero_concentration(m):
    """At kappa = 0, Cov z = I / m (no 0/0: A/kappa = 1 / (m + kappa A_{m+2})), smoothly:
    the derivative of the covariance in kappa is 0 there and finite."""
    concentration = torch.zeros((), dtype=F64, requires_grad=True)
    q = VonMisesFisher(random_unit(m, seed=m), concentration)
    covariance = q.covariance_matrix
    torch.testing.assert_close(covariance, torch.eye(m, dtype=F64) / m, rtol=0, atol=1e-16)
    (grad,) = torch.autograd.grad(covariance.sum(), concentration)
    assert float(grad) == 0.0
    uniform = HypersphericalUniform(m, dtype=F64)
    torch.testing.assert_close(q.variance, uniform.variance, rtol=0, atol=1e-16)


def test_vmf_covariance_matches_its_closed_form():
    """Cov z = (A/kappa) (I - mu mu^T) + A' mu mu^T, E[z z^T] = (A/kappa) I + A_m A_{m+2} mu
    mu^T, against 80-digit values, at a mean direction near a coordinate axis (where
    1 - mu_i^2 is summed as the others' squares)."""
    m, kappa = 6, 37.0
    loc = torch.tensor([1.0, 1e-9, -2e-9, 0.5e-9, 0.0, 3e-9], dtype=F64)
    loc = loc / torch.linalg.vector_norm(loc)
    q = VonMisesFisher(loc, torch.tensor(kappa, dtype=F64))
    perpendicular, axial = exact_second_moments(m, kappa)
    outer = torch.outer(loc, loc)
    expected = perpendicular * (torch.eye(m, dtype=F64) - outer) + axial * outer
    others = loc.square().sum() - loc.square()
    others[0] = loc[1:].square().sum()
    expected.diagonal().copy_(perpendicular * others + axial * loc.square())
    torch.testing.assert_close(q.covariance_matrix, expected, rtol=1e-13, atol=0)
    with mpmath.workdps(60):
        v = mpmath.mpf(m) / 2 - 1
        next_product = float(mpmath.besseli(v + 1, kappa) / mpmath.besseli(v, kappa)
                             * mpmath.besseli(v + 2, kappa) / mpmath.besseli(v + 1, kappa))
    second_moment = q.covariance_matrix + torch.outer(q.mean, q.mean)
    expected = perpendicular * torch.eye(m, dtype=F64) + next_product * outer
    torch.testing.assert_close(second_moment, expected, rtol=1e-12, atol=1e-18)
