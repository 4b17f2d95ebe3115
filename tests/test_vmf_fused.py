"""The von Mises-Fisher sampler's fused autograd Functions against their plain-torch references.

Each Function (Wood's map, the rotation from the pole, the two together, and the score less
its normalizer) is compared with its reference in values, first derivatives (the hand-written
backward passes) and second derivatives (the fused backward pass under ``create_graph``, which
goes through the reference), in float64 and float32, on the CPU and, where there is one, on a
CUDA device. The references' second derivatives are checked independently by
``gradgradcheck`` and by central differences of the hand-written first derivatives. Then the
whole sampler: Hessians of a Monte Carlo surrogate through ``rsample`` and ``score_function``,
``torch.func`` transforms and forward-mode AD against autograd, under fixed seeds.

Tolerances: float64 comparisons of the same quantity by two formulas at 1e-10 relative (they
differ by rounding only); central differences (step 1e-6) at 1e-6 relative; float32 at the
stated multiples of float32's rounding.
"""

import pytest
import torch
import torch.nn.functional as F

from pyro_dgm.distributions import VonMisesFisher, log_sphere_surface_area
from pyro_dgm.distributions import von_mises_fisher as vmf
from pyro_dgm.distributions.von_mises_fisher import (
    _envelope_b,
    _reparameterized_sample_reference,
    _ReparameterizedSample,
    _rotate_reference,
    _RotateFromPole,
    _subtract_normalizer_reference,
    _SubtractNormalizer,
    _wood_map_reference,
    _WoodTransform,
)
from pyro_dgm.special import log_bessel_iv_normalized_and_ratio_values

F64 = torch.float64
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")),
]
DTYPES = [torch.float64, torch.float32]
# (rtol, atol) of fused against reference: values, first derivatives, second derivatives
TOLERANCES = {
    torch.float64: ((1e-12, 1e-12), (1e-10, 1e-11), (1e-9, 1e-10)),
    torch.float32: ((1e-6, 1e-6), (1e-5, 1e-5), (1e-4, 1e-4)),
}

KAPPAS = [0.05, 1.0, 2.0, 30.0, 500.0, 7.0]
PROPOSALS = [0.3, 1e-3, 0.5, 0.999, 0.2, 0.7]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    values = torch.randn(tensor.shape, generator=_generator(seed), dtype=F64)
    return values.to(dtype=tensor.dtype, device=tensor.device)


def _smooth_locs(m: int, n: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Unit vectors with |mu_1| >= 0.1 of both signs (the reflection is smooth there)."""
    loc = F.normalize(torch.randn(n, m, generator=_generator(seed), dtype=F64), dim=-1)
    loc[:, 0] = torch.where(loc[:, 0].abs() < 0.1, 0.1 * torch.ones(n, dtype=F64), loc[:, 0])
    loc[::2, 0] = -loc[::2, 0].abs()
    return F.normalize(loc, dim=-1).to(dtype=dtype, device=device)


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return (result,) if torch.is_tensor(result) else tuple(result)


def _pairing(outputs: tuple[torch.Tensor, ...], seed: int) -> torch.Tensor:
    """A fixed random linear functional of the outputs."""
    return sum((output * _random_like(output, seed + i)).sum() for i, output in enumerate(outputs))


def _first_and_second(function, inputs: tuple[torch.Tensor, ...], seed: int):
    """(values, gradient of a random functional, Hessian-vector product of it in a random
    direction), the gradient without create_graph (the hand-written backward pass of a fused
    Function) and the Hessian-vector product with it (its reference)."""
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    values = _outputs(function(*inputs))
    gradient = torch.autograd.grad(_pairing(values, seed), inputs)
    values = _outputs(function(*inputs))
    first = torch.autograd.grad(_pairing(values, seed), inputs, create_graph=True)
    directions = [_random_like(x, seed + 100 + i) for i, x in enumerate(inputs)]
    along = sum((g * v).sum() for g, v in zip(first, directions, strict=True))
    hvp = torch.autograd.grad(along, inputs, allow_unused=True)
    hvp = tuple(torch.zeros_like(x) if h is None else h for x, h in zip(inputs, hvp, strict=True))
    return tuple(v.detach() for v in values), gradient, hvp


def _assert_fused_matches_reference(fused, reference, inputs, dtype, seed=0):
    values_tol, first_tol, second_tol = TOLERANCES[dtype]
    fused_parts = _first_and_second(fused, inputs, seed)
    reference_parts = _first_and_second(reference, inputs, seed)
    for (rtol, atol), ours, theirs in zip(
        (values_tol, first_tol, second_tol), fused_parts, reference_parts, strict=True
    ):
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max()))


def _assert_hvp_matches_central_differences(fused, inputs, seed=0, step=1e-6):
    """The fused Hessian-vector product (through the reference) against central differences of
    the fused first derivative (the hand-written backward pass, independent code), float64."""
    _, _, hvp = _first_and_second(fused, inputs, seed)
    directions = [_random_like(x, seed + 100 + i) for i, x in enumerate(inputs)]

    def gradient(shift: float) -> tuple[torch.Tensor, ...]:
        moved = tuple((x + shift * v).requires_grad_() for x, v in zip(inputs, directions,
                                                                        strict=True))
        return torch.autograd.grad(_pairing(_outputs(fused(*moved)), seed), moved)

    differences = [(a - b) / (2 * step) for a, b in zip(gradient(step), gradient(-step),
                                                         strict=True)]
    for ours, numerical in zip(hvp, differences, strict=True):
        torch.testing.assert_close(ours, numerical, rtol=1e-6,
                                   atol=1e-6 * max(1.0, numerical.abs().max()))


# The four Functions as functions of their differentiable inputs -----------------------------


def _wood_case(m: int, dtype, device):
    proposal = torch.tensor(PROPOSALS, dtype=dtype, device=device)
    complement = 1 - proposal

    def fused(kappa):
        return _WoodTransform.apply(kappa, proposal, complement, m,
                                    _envelope_b(kappa.detach(), m))[:3]

    def reference(kappa):
        return _wood_map_reference(kappa, proposal, complement, m)

    return fused, reference, (torch.tensor(KAPPAS, dtype=dtype, device=device),)


def _rotation_case(m: int, dtype, device):
    n = 8
    loc = _smooth_locs(m, n, dtype, device)
    w = torch.linspace(-0.95, 0.99, n, dtype=dtype, device=device)
    tangent = F.normalize(torch.randn(n, m - 1, generator=_generator(3), dtype=F64),
                          dim=-1).to(dtype=dtype, device=device)

    def fused(loc, w, root):
        return _RotateFromPole.apply(loc, w, root, tangent)[0]

    def reference(loc, w, root):
        return _rotate_reference(loc, w, root, tangent)

    return fused, reference, (loc, w, (1 - w * w).sqrt())


def _sample_case(m: int, dtype, device):
    n = len(KAPPAS)
    loc = _smooth_locs(m, n, dtype, device, seed=1)
    proposal = torch.tensor(PROPOSALS, dtype=dtype, device=device)
    tangent = F.normalize(torch.randn(n, m - 1, generator=_generator(4), dtype=F64),
                          dim=-1).to(dtype=dtype, device=device)

    def fused(loc, kappa):
        b = _envelope_b(kappa.detach(), m)
        return _ReparameterizedSample.apply(loc, kappa, proposal, 1 - proposal, b, tangent,
                                            m)[:2]

    def reference(loc, kappa):
        return _reparameterized_sample_reference(loc, kappa, proposal, 1 - proposal, None,
                                                 tangent, m)

    return fused, reference, (loc, torch.tensor(KAPPAS, dtype=dtype, device=device))


def _normalizer_case(m: int, dtype, device):
    """The score has a sample dimension in front of kappa's (broadcast, summed back)."""
    order, log_area = 0.5 * m - 1, log_sphere_surface_area(m)
    kappa = torch.tensor(KAPPAS + [1e-8, 5000.0], dtype=dtype, device=device)
    score = _random_like(torch.empty(3, kappa.shape[0], dtype=dtype, device=device), 9)

    def fused(score, kappa):
        values = log_bessel_iv_normalized_and_ratio_values(order, kappa.detach())
        return _SubtractNormalizer.apply(score, kappa, *values, log_area, order)

    def reference(score, kappa):
        return _subtract_normalizer_reference(score, kappa, None, None, log_area, order)

    return fused, reference, (score, kappa)


CASES = {
    "wood": _wood_case,
    "rotation": _rotation_case,
    "sample": _sample_case,
    "normalizer": _normalizer_case,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("m", [4, 11])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_function_matches_reference(case, m, dtype, device):
    """Values, first derivatives (hand-written) and Hessian-vector products (through the
    reference) of each fused Function against its plain-torch reference."""
    fused, reference, inputs = CASES[case](m, dtype, device)
    _assert_fused_matches_reference(fused, reference, inputs, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_second_derivatives_pass_gradgradcheck(case):
    """Second derivatives of each fused Function (including those with respect to the incoming
    gradient) against finite differences of its first derivatives, float64."""
    fused, _, inputs = CASES[case](5, F64, "cpu")
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    assert torch.autograd.gradgradcheck(fused, inputs)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_hessian_vector_product_matches_differences_of_the_hand_written_gradient(case):
    fused, _, inputs = CASES[case](7, F64, "cpu")
    _assert_hvp_matches_central_differences(fused, inputs)


def test_fused_functions_give_only_the_gradients_asked_for():
    """ctx.needs_input_grad: with loc alone or kappa alone requiring grad, the other gets
    none, and the one asked for is the gradient computed with both."""
    fused, _, (loc, kappa) = _sample_case(6, F64, "cpu")
    both = tuple(x.clone().requires_grad_() for x in (loc, kappa))
    full = torch.autograd.grad(_pairing(fused(*both), 0), both)
    for which in range(2):
        inputs = [loc.clone(), kappa.clone()]
        inputs[which].requires_grad_()
        _pairing(fused(*inputs), 0).backward()
        assert inputs[1 - which].grad is None
        torch.testing.assert_close(inputs[which].grad, full[which], rtol=1e-14, atol=1e-15)


def test_double_backward_counts_each_path_once_when_one_input_depends_on_another():
    """The fused backward under create_graph returns partial derivatives: with loc computed
    from kappa (and the score of the normalizer computed from kappa), the Hessian is that of
    the same composition written with the references alone."""
    m = 5
    fused_sample, reference_sample, (loc, _) = _sample_case(m, F64, "cpu")
    fused_norm, reference_norm, _ = _normalizer_case(m, F64, "cpu")
    direction = _random_like(loc, 5)

    def composed(sample, normalizer):
        def objective(kappa):
            moved = F.normalize(loc + 0.1 * kappa.unsqueeze(-1) * direction, dim=-1)
            z, score = sample(moved, kappa)
            return (z * direction).sum() + normalizer(score.unsqueeze(0), kappa).sum()
        return objective

    kappa = torch.tensor(KAPPAS, dtype=F64)
    ours = torch.autograd.functional.hessian(composed(fused_sample, fused_norm), kappa)
    theirs = torch.autograd.functional.hessian(composed(reference_sample, reference_norm),
                                               kappa)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# The whole sampler --------------------------------------------------------------------------

M, N, SAMPLES = 6, 4, 3
A = torch.linspace(-1.0, 1.5, M, dtype=F64)


def _loc_and_kappa(m: int = M, dtype=F64, device="cpu"):
    return (_smooth_locs(m, N, dtype, device, seed=11),
            torch.tensor([0.5, 3.0, 20.0, 150.0], dtype=dtype, device=device))


def _surrogate(loc: torch.Tensor, kappa: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Monte Carlo objective through one seeded draw: the sample's projection on a fixed
    vector plus the rejection sampler's score function, as an ELBO surrogate has."""
    torch.manual_seed(seed)
    q = VonMisesFisher(loc, kappa)
    z = q.rsample((SAMPLES,))
    objective = (z @ A[: loc.shape[-1]].to(z)).sum()
    score = q.score_function(z)
    return objective if isinstance(score, int) else objective + score.sum()


def _hessians(loc, kappa):
    def in_kappa(k):
        return _surrogate(loc, k)

    def in_direction(v):  # loc parameterized off the sphere, as an encoder's output
        return _surrogate(F.normalize(v, dim=-1), kappa)

    return (torch.autograd.functional.hessian(in_kappa, kappa),
            torch.autograd.functional.hessian(in_direction, loc))


def _gradients(loc, kappa):
    loc, kappa = loc.clone().requires_grad_(), kappa.clone().requires_grad_()
    return torch.autograd.grad(_surrogate(F.normalize(loc, dim=-1), kappa), (loc, kappa))


@pytest.mark.parametrize("m", [3, M])
def test_hessian_of_surrogate_through_rsample_matches_reference_and_differences(
    m, monkeypatch
):
    """torch.autograd.functional.hessian of the seeded surrogate in kappa and in loc: the
    fused path equals the references' (same draws), and central differences of the fused
    (hand-written) gradient, step 1e-6."""
    loc, kappa = _loc_and_kappa(m)
    fused = _hessians(loc, kappa)
    # every derivative of the fused path is exact: the Hessian in kappa is diagonal and
    # the score term contributes (it would be missing without second derivatives)
    assert (fused[0].diagonal() != 0).all()
    step, inputs = 1e-6, (loc, kappa)
    for hessian, which in zip(fused, (1, 0), strict=True):  # in kappa, then in loc
        columns = []
        for index in range(inputs[which].numel()):
            shift = torch.zeros(inputs[which].numel(), dtype=F64)
            shift[index] = step
            shift = shift.view_as(inputs[which])
            plus, minus = list(inputs), list(inputs)
            plus[which], minus[which] = inputs[which] + shift, inputs[which] - shift
            difference = _gradients(*plus)[which] - _gradients(*minus)[which]
            columns.append((difference / (2 * step)).flatten())
        numerical = torch.stack(columns, -1).view_as(hessian)
        torch.testing.assert_close(hessian, numerical, rtol=1e-6,
                                   atol=1e-6 * float(numerical.abs().max()))
    monkeypatch.setattr(vmf, "needs_reference", lambda *tensors: True)
    for ours, theirs in zip(fused, _hessians(loc, kappa), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _node_names(tensor: torch.Tensor, depth: int = 3) -> set[str]:
    names, nodes = set(), [tensor.grad_fn]
    for _ in range(depth):
        names |= {type(node).__name__ for node in nodes}
        nodes = [child for node in nodes for child, _ in node.next_functions if child is not None]
    return names


def test_fused_path_is_taken_outside_transforms():
    for m in (3, M):
        loc, kappa = _loc_and_kappa(m)
        q = VonMisesFisher(loc, kappa.requires_grad_())
        z = q.rsample((2,))
        fused = "_RotateFromPoleBackward" if m == 3 else "_ReparameterizedSampleBackward"
        assert fused in _node_names(z)
    assert "_SubtractNormalizerBackward" in _node_names(q.score_function(z))


@pytest.mark.parametrize("m", [3, M])
def test_torch_func_grad_and_jacrev_give_the_autograd_results(m):
    loc, kappa = _loc_and_kappa(m)
    expected = _gradients(loc, kappa)

    def objective(loc, kappa):
        return _surrogate(F.normalize(loc, dim=-1), kappa)

    found = torch.func.grad(objective, argnums=(0, 1))(loc, kappa)
    for ours, theirs in zip(found, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)

    def samples(kappa):  # a vector function: (SAMPLES * N * m,)
        torch.manual_seed(1)
        return VonMisesFisher(loc, kappa).rsample((SAMPLES,)).flatten()

    jacobian = torch.func.jacrev(samples)(kappa)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(samples, kappa),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("m", [3, M])
def test_forward_mode_gives_the_autograd_directional_derivative(m):
    """torch.func.jvp and forward-mode AD (dual tensors) through rsample and score_function
    against the reverse-mode gradient, in a random direction of (loc, kappa)."""
    loc, kappa = _loc_and_kappa(m)
    directions = (_random_like(loc, 21), _random_like(kappa, 22))
    gradient = _gradients(loc, kappa)
    expected = sum((g * v).sum() for g, v in zip(gradient, directions, strict=True))

    def objective(loc, kappa):
        return _surrogate(F.normalize(loc, dim=-1), kappa)

    _, found = torch.func.jvp(objective, (loc, kappa), directions)
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-14)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(x, v)
                 for x, v in zip((loc, kappa), directions, strict=True)]
        tangent = torch.autograd.forward_ad.unpack_dual(objective(*duals)).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-14)


def test_vmap_over_rsample_raises_a_clear_error_where_the_rejection_loop_cannot_batch():
    loc, kappa = _loc_and_kappa()

    def sample(kappa):
        return VonMisesFisher(loc[0], kappa).rsample()

    message = "cannot draw under torch.func.vmap.*rejection sampler"
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(sample, randomness="different")(kappa)
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(sample)(kappa)  # randomness="error"


def test_vmap_works_where_no_rejection_loop_is_batched():
    """vmap over loc alone with the same draws for every element (randomness="same") gives,
    element by element, the unbatched draw under the same seed; and m = 3 (no rejection loop)
    samples under vmap with batched kappa."""
    loc, kappa = _loc_and_kappa()

    def sample(loc):
        return VonMisesFisher(loc, kappa[1]).rsample((2,))

    torch.manual_seed(5)
    batched = torch.func.vmap(sample, randomness="same")(loc)
    for i in range(N):
        torch.manual_seed(5)
        torch.testing.assert_close(batched[i], sample(loc[i]), rtol=1e-14, atol=1e-15)
    pole = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    z = torch.func.vmap(lambda k: VonMisesFisher(pole, k).rsample(),
                        randomness="different")(kappa)
    assert z.shape == (N, 3)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(N, dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_sampler_gradients_and_hessians_match_reference_path(dtype, device, monkeypatch):
    """rsample + score_function on the fused path against the references (same draws), in
    float32 and float64: gradients (hand-written) and Hessians in kappa (reference)."""
    loc, kappa = _loc_and_kappa(dtype=dtype, device=device)
    values_tol, first_tol, second_tol = TOLERANCES[dtype]
    results = {}
    for path in ("fused", "reference"):
        if path == "reference":  # rsample and score_function on the references
            monkeypatch.setattr(vmf, "needs_reference", lambda *tensors: True)
        value = _surrogate(loc, kappa)
        gradients = _gradients(loc, kappa)
        hessian = torch.autograd.functional.hessian(lambda k: _surrogate(loc, k), kappa)
        results[path] = (value, gradients, hessian)
    (value, gradients, hessian), (value_r, gradients_r, hessian_r) = (
        results["fused"], results["reference"]
    )
    torch.testing.assert_close(value, value_r, rtol=values_tol[0], atol=values_tol[1])
    for ours, theirs in zip(gradients, gradients_r, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=first_tol[0],
                                   atol=first_tol[1] * float(theirs.abs().max()))
    torch.testing.assert_close(hessian, hessian_r, rtol=second_tol[0],
                               atol=second_tol[1] * float(hessian_r.abs().max()))


def test_score_of_a_foreign_value_is_twice_differentiable(monkeypatch):
    """score_function at points that are not the last sample (the proposal is recovered from
    mu^T z, through _WoodTransform, and held fixed): its Hessian in kappa, fused, equals the
    references'. (Central differences in kappa would recover a different proposal at each
    kappa; the Function's own second derivatives are checked above.)"""
    loc, kappa = _loc_and_kappa()
    torch.manual_seed(3)
    points = VonMisesFisher(loc, kappa).sample((SAMPLES,))

    def score(kappa):
        return VonMisesFisher(loc, kappa).score_function(points).sum()

    fused = torch.autograd.functional.hessian(score, kappa)
    assert (fused.diagonal() != 0).all()
    monkeypatch.setattr(vmf, "needs_reference", lambda *tensors: True)
    torch.testing.assert_close(fused, torch.autograd.functional.hessian(score, kappa),
                               rtol=1e-10, atol=1e-12)
