"""Sylvester and Householder flows: exact log-determinants, inverses, shapes, gradients, devices.

Every check runs in float64 at random, far-from-identity parameters, for every kind, with global
parameters ("plain") and with parameters computed from a context ("conditional").
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

import pyro.distributions as dist
import pyro.distributions.transforms as pyro_transforms
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms import Sylvester as PyroSylvester
from pyro.nn import DenseNN
from torch.autograd.functional import jacobian
from torch.func import functional_call

import pyro_dgm.transforms
from pyro_dgm.transforms import (
    ConditionalHouseholder,
    ConditionalHouseholderSylvester,
    ConditionalOrthogonalSylvester,
    ConditionalTriangularSylvester,
    ConditionedHouseholder,
    ConditionedHouseholderSylvester,
    ConditionedOrthogonalSylvester,
    ConditionedTriangularSylvester,
    Householder,
    HouseholderChainNN,
    HouseholderSylvester,
    OrthogonalSylvester,
    TriangularSylvester,
    conditional_householder,
    conditional_householder_sylvester,
    conditional_orthogonal_sylvester,
    conditional_triangular_sylvester,
    householder,
    householder_sylvester,
    orthogonal_sylvester,
    triangular_sylvester,
)
from pyro_dgm.transforms.householder import _householder_matrix, _householder_matrix_reference
from pyro_dgm.transforms.sylvester import (
    _shared_projections,
    _shared_projections_reference,
    _sum_log,
    _sylvester_rows,
    _sylvester_rows_reference,
    _triangular_factors,
)

D, C, B, S = 5, 3, 4, 2  # event, context, batch and particle sizes

# name -> (plain module, conditional module), built on demand
CASES = {
    "orthogonal-bottleneck": (
        lambda: OrthogonalSylvester(D, bottleneck=3),
        lambda: conditional_orthogonal_sylvester(D, C, bottleneck=3),
    ),
    "orthogonal-square": (
        lambda: OrthogonalSylvester(D),
        lambda: conditional_orthogonal_sylvester(D, C),
    ),
    "householder": (
        lambda: HouseholderSylvester(D, num_reflections=3),
        lambda: conditional_householder_sylvester(D, C, num_reflections=3),
    ),
    "triangular": (
        lambda: TriangularSylvester(D),
        lambda: conditional_triangular_sylvester(D, C),
    ),
    "triangular-permuted": (
        lambda: TriangularSylvester(D, permute=True),
        lambda: conditional_triangular_sylvester(D, C, permute=True),
    ),
    "householder-flow": (
        lambda: Householder(D, 3),
        lambda: ConditionalHouseholder(D, HouseholderChainNN(C, D, 3), 3),
    ),
    # Pyro's helper: the vectors from a DenseNN
    "householder-flow-dense": (None, lambda: conditional_householder(D, C, [6], 3)),
    # stacks of three flows in one module
    "orthogonal-stack": (
        lambda: OrthogonalSylvester(D, num_flows=3, bottleneck=3),
        lambda: conditional_orthogonal_sylvester(D, C, num_flows=3, bottleneck=3),
    ),
    "householder-stack": (
        lambda: HouseholderSylvester(D, num_flows=3, num_reflections=3),
        lambda: conditional_householder_sylvester(D, C, [6], num_flows=3, num_reflections=3),
    ),
    "triangular-stack": (
        lambda: TriangularSylvester(D, num_flows=3, permute=True),
        lambda: conditional_triangular_sylvester(D, C, num_flows=3, permute=True),
    ),
}
HOUSEHOLDER_FLOWS = {"householder-flow", "householder-flow-dense"}  # volume preserving
ORTHONORMAL_Q = ["orthogonal-bottleneck", "orthogonal-square", "householder", "orthogonal-stack",
                 "householder-stack"]


def _build(name: str, conditional: bool, seed: int = 0) -> torch.nn.Module:
    """The module in float64 with every parameter redrawn at random, far from the identity:
    vectors from N(0, 1), matrices from N(0, 4 / fan_in) (entries near 1 for D = 5)."""
    torch.manual_seed(seed)
    module = CASES[name][conditional]().double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 1 if parameter.dim() == 1 else 2 / parameter.shape[-1] ** 0.5)
    return module


def _transform(module: torch.nn.Module, context: torch.Tensor | None):
    return module.condition(context) if hasattr(module, "condition") else module


def _inputs(*shape: int, seed: int = 1, scale: float = 1.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _per_point_jacobians(function, x: torch.Tensor) -> torch.Tensor:
    """(B, D, D) Jacobians of a map acting row by row on x (B, D); checks the rows are
    independent (off-diagonal blocks zero)."""
    full = jacobian(function, x)  # (B, D, B, D)
    blocks = full.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    off_diagonal = full.clone()
    for b in range(x.shape[0]):
        off_diagonal[b, :, b, :] = 0
    assert off_diagonal.abs().max() == 0
    return blocks


def _modules(names) -> list:
    """(name, conditional) for every module of CASES among ``names`` that exists."""
    return [
        pytest.param(name, conditional, id=f"{name}-{'conditional' if conditional else 'plain'}")
        for name in names
        for conditional in (False, True)
        if CASES[name][conditional] is not None
    ]


parametrize_modules = pytest.mark.parametrize("name, conditional", _modules(CASES))


@parametrize_modules
def test_log_abs_det_jacobian_matches_autograd(name: str, conditional: bool) -> None:
    module = _build(name, conditional)
    context = _inputs(B, C, seed=2)
    transform = _transform(module, context)
    x = _inputs(B, D)

    y, log_det = transform.call_and_ladj(x)
    if name not in HOUSEHOLDER_FLOWS:
        assert transform.log_abs_det_jacobian(x, y) is log_det  # cached, not recomputed
    jacobians = _per_point_jacobians(lambda z: _transform(module, context)(z), x)
    sign, expected = torch.linalg.slogdet(jacobians)

    assert log_det.shape == (B,)
    torch.testing.assert_close(log_det, expected, rtol=0, atol=1e-10)
    assert (sign == transform.sign).all()
    # Not the trivial case: the flow moves points and (Sylvester) changes volume.
    assert (y - x).abs().max() > 0.1
    if name not in HOUSEHOLDER_FLOWS:
        assert expected.abs().max() > 0.05
    # Recomputed (no cache) and cached log-determinants agree.
    fresh = _transform(module, context)
    torch.testing.assert_close(
        fresh.log_abs_det_jacobian(x.clone(), y.clone()), log_det, rtol=0, atol=1e-12
    )


@parametrize_modules
def test_inverse_round_trip(name: str, conditional: bool) -> None:
    module = _build(name, conditional)
    context = _inputs(B, C, seed=2)
    x = _inputs(B, D)
    y, log_det = _transform(module, context).call_and_ladj(x)

    inverse = _transform(module, context)  # a fresh transform: nothing cached
    y_new = y.clone()
    x_back = inverse.inv(y_new)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(
        inverse.log_abs_det_jacobian(x_back, y_new), log_det, rtol=0, atol=1e-8
    )

    # Points that no forward pass produced: y -> x -> y (clones, so that no cache answers).
    y_any = _inputs(B, D, seed=3, scale=3.0)
    x_any = _transform(module, context).inv(y_any)
    torch.testing.assert_close(
        _transform(module, context)(x_any.clone()), y_any, rtol=0, atol=1e-8
    )


@pytest.mark.parametrize("name, conditional", _modules(ORTHONORMAL_Q))
def test_q_has_orthonormal_columns(name: str, conditional: bool) -> None:
    module = _build(name, conditional)
    q = _transform(module, _inputs(B, C, seed=2)).q()
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    assert (q.mT @ q - eye).abs().max() < 1e-6


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_householder_q_is_the_product_of_reflections(conditional: bool) -> None:
    """The compact (global) and the sequential (per-data-point) forms give H_1 H_2 ... H_K."""
    module = _build("householder", conditional)
    context = _inputs(B, C, seed=2)
    # (..., K, L, D): (B, 1, 3, D) from the context, or the parameter (1, 3, D)
    vectors = module.params(context)[-1] if conditional else module.householder_vectors
    expected = torch.eye(D, dtype=torch.float64)
    for u in vectors.unbind(-2):
        reflection = torch.eye(D, dtype=torch.float64) - 2 * (
            u.unsqueeze(-1) * u.unsqueeze(-2) / u.square().sum(-1)[..., None, None]
        )
        expected = expected @ reflection
    torch.testing.assert_close(_transform(module, context).q(), expected, rtol=0, atol=1e-12)


@parametrize_modules
def test_particle_dimensions_broadcast_against_the_context(name: str, conditional: bool) -> None:
    module = _build(name, conditional)
    context = _inputs(B, C, seed=2)
    x = _inputs(S, B, D)

    y, log_det = _transform(module, context).call_and_ladj(x)
    x_back = _transform(module, context).inv(y.clone())

    assert y.shape == (S, B, D) and log_det.shape == (S, B) and x_back.shape == (S, B, D)
    for s in range(S):
        y_s, log_det_s = _transform(module, context).call_and_ladj(x[s])
        torch.testing.assert_close(y[s], y_s, rtol=0, atol=1e-12)
        torch.testing.assert_close(log_det[s], log_det_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)


@parametrize_modules
def test_gradients_reach_every_parameter_and_the_context(name: str, conditional: bool) -> None:
    module = _build(name, conditional)
    context = _inputs(B, C, seed=2).requires_grad_()
    x = _inputs(S, B, D).requires_grad_()

    y, log_det = _transform(module, context).call_and_ladj(x)
    (y.sin().sum() + log_det.sum()).backward()

    for parameter_name, parameter in module.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().max() > 0, parameter_name
    assert x.grad.abs().max() > 0
    if conditional:
        assert context.grad.abs().max() > 0


@parametrize_modules
def test_inverse_gradient_is_the_inverse_jacobian(name: str, conditional: bool) -> None:
    """Derivatives through the solved inverse are those of the implicit function."""
    module = _build(name, conditional)
    context = _inputs(B, C, seed=2)
    x = _inputs(B, D)
    y = _transform(module, context)(x).detach()
    inverse_jacobians = _per_point_jacobians(lambda v: _transform(module, context).inv(v), y)
    forward_jacobians = _per_point_jacobians(lambda z: _transform(module, context)(z), x)
    torch.testing.assert_close(
        inverse_jacobians, torch.linalg.inv(forward_jacobians), rtol=1e-9, atol=1e-9
    )


PLAIN_SYLVESTER = {  # kind -> (class, options of a small flow)
    "orthogonal": (OrthogonalSylvester, {"bottleneck": 3}),
    "householder": (HouseholderSylvester, {"num_reflections": 3}),
    "triangular": (TriangularSylvester, {}),
}


@pytest.mark.parametrize(
    "kind, permute",
    [("orthogonal", False), ("householder", False), ("triangular", False), ("triangular", True)],
)
def test_a_stack_is_its_flows_one_after_another(kind: str, permute: bool) -> None:
    """X(D, num_flows=3) is the composition of three single flows with its parameters'
    slices (the triangular kind alternating Q from the reversal if permute): same outputs and
    log-determinants, forward and inverse."""
    cls, options = PLAIN_SYLVESTER[kind]
    if kind == "triangular":
        options = {"permute": permute}
    torch.manual_seed(0)
    stack = cls(D, 3, **options).double()  # num_flows, positionally
    with torch.no_grad():
        for parameter in stack.parameters():
            parameter.normal_(0, 0.7)
    flows = []
    for k in range(3):
        single = options
        if kind == "triangular":  # Q alternates along the stack
            single = dict(options, permute=permute != (k % 2 == 1))
        flow = cls(D, **single).double()
        with torch.no_grad():
            for parameter, stacked in zip(flow.parameters(), stack.parameters(), strict=True):
                parameter.copy_(stacked[k : k + 1])
        flows.append(flow)
    x = _inputs(S, B, D)
    z, log_det = x, 0
    for flow in flows:
        z, term = flow.call_and_ladj(z)
        log_det = log_det + term
    y, stacked_log_det = stack.call_and_ladj(x)
    torch.testing.assert_close(y, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(stacked_log_det, log_det, rtol=0, atol=1e-12)
    assert (y - x).abs().max() > 0.1 and log_det.abs().max() > 0.05
    inverse = cls(D, 3, **options).double()
    inverse.load_state_dict(stack.state_dict())
    torch.testing.assert_close(inverse.inv(y.clone()), x, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["orthogonal-stack", "householder-stack", "triangular-stack"])
def test_a_conditional_stack_is_its_flows_one_after_another(name: str) -> None:
    """ConditionalX(..., num_flows=3).condition(c) is the composition of three conditioned
    single flows with the slices of its factors, first flow first (the triangular stack's Q
    alternating from the reversal, as permute=True asks): same outputs and log-determinants,
    forward and inverse."""
    module = _build(name, conditional=True)
    context = _inputs(B, C, seed=2)
    stack = module.condition(context)
    square, diag_tilde, bias, *q_params = module.params(context)
    r, r_tilde = _triangular_factors(square, diag_tilde)
    assert r.shape[-3] == 3 and bias.shape == (B, 3, module.bottleneck)

    def single(k: int):
        factors = r[:, k : k + 1], r_tilde[:, k : k + 1], bias[:, k : k + 1]
        if name == "orthogonal-stack":
            return ConditionedOrthogonalSylvester(*factors, stack.q()[:, k : k + 1])
        if name == "householder-stack":
            return ConditionedHouseholderSylvester(*factors, q_params[0][:, k : k + 1])
        return ConditionedTriangularSylvester(*factors, permute=k % 2 == 0)

    x = _inputs(S, B, D)
    z, log_det = x, 0
    for k in range(3):
        z, term = single(k).call_and_ladj(z)
        log_det = log_det + term
    y, stacked_log_det = stack.call_and_ladj(x)
    torch.testing.assert_close(y, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(stacked_log_det, log_det, rtol=0, atol=1e-12)
    assert (y - x).abs().max() > 0.1 and log_det.abs().max() > 0.05
    torch.testing.assert_close(module.condition(context).inv(y.clone()), x, rtol=0, atol=1e-8)
    if name == "triangular-stack":
        eye = torch.eye(D, dtype=torch.float64)
        torch.testing.assert_close(stack.q(), torch.stack([eye.flip(0), eye, eye.flip(0)]))


@pytest.mark.parametrize("diagonal", [3.0, 20.0], ids=["0.995", "1.0"])
def test_inverse_converges_when_the_flow_is_nearly_singular(diagonal: float) -> None:
    """R_ii R~_ii near (or rounding to) -1 and large off-diagonal entries: the fixed-point
    iteration crawls and Newton with backtracking on |g|^2 stalls, while the back substitution
    still solves every point to the rounding level (and without a warning)."""
    flow = TriangularSylvester(D).double()
    with torch.no_grad():
        flow.triangular.normal_(0, 5)[0].diagonal().fill_(diagonal)  # tanh(20) = 1.0 (float64)
        flow.diag_tilde.fill_(-diagonal)
        flow.bias.normal_()
    y = _inputs(256, D, scale=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = flow.inv(y)
    torch.testing.assert_close(flow(x.clone()), y, rtol=1e-13, atol=1e-13)


def test_fused_backward_matches_finite_differences() -> None:
    """The stack of rows (three flows, M = 3 < D = 4) as one node: its hand-written backward
    pass against finite differences, and its values against the flows one after another."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        sample = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return sample.requires_grad_()

    diagonals = (
        1.8 * torch.rand(3, 3, generator=generator, dtype=torch.float64) - 0.9
    ).requires_grad_()
    arguments = (draw(6, 4), draw(3, 4, 3), draw(3, 3), draw(3, 3, 4), diagonals)
    assert torch.autograd.gradcheck(_sylvester_rows, arguments)
    x, encoders, biases, decoders, diagonals = (a.detach() for a in arguments)
    log_det = torch.zeros(6, dtype=torch.float64)
    for encoder, bias, decoder, diagonal in zip(
        encoders, biases, decoders, diagonals, strict=True
    ):
        activation = torch.tanh(x @ encoder + bias)
        log_det += torch.log1p((1 - activation.square()) * diagonal).sum(-1)
        x = x + activation @ decoder
    y, stacked_log_det = _sylvester_rows(*arguments)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-13)
    torch.testing.assert_close(stacked_log_det, log_det, rtol=0, atol=1e-13)


def test_householder_matrix_is_the_product_of_reflections_with_exact_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    product = torch.eye(6, dtype=torch.float64)
    for v in vectors:  # H_1 H_2 ... H_K, each I - 2 v v^T / |v|^2
        product = product @ (torch.eye(6, dtype=torch.float64) - 2 * torch.outer(v, v) / v.dot(v))
    torch.testing.assert_close(_householder_matrix(vectors), product, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(_householder_matrix, (vectors.requires_grad_(),))
    stack = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)  # a stack of three
    torch.testing.assert_close(
        _householder_matrix(stack),
        torch.stack([_householder_matrix(v) for v in stack]), rtol=0, atol=1e-14,
    )
    assert torch.autograd.gradcheck(_householder_matrix, (stack.requires_grad_(),))


def test_shared_projections_backward_matches_finite_differences() -> None:
    generator = torch.Generator().manual_seed(4)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    for q_shape in [(6, 4), (4, 4)]:  # bottleneck M < D, and M = D; stacks of two flows
        assert torch.autograd.gradcheck(
            _shared_projections, (draw(2, *q_shape), draw(2, 4, 4), draw(2, 4))
        )


@pytest.mark.parametrize(
    "name", ["orthogonal-bottleneck", "householder", "triangular-permuted"]
)
def test_plain_flow_gradients_match_finite_differences(name: str) -> None:
    """The composed hand-written backward passes (Q, projections, rows) of a plain flow, with
    respect to every parameter and the input, at random parameters."""
    module = _build(name, conditional=False)
    names = [parameter_name for parameter_name, _ in module.named_parameters()]

    def flow(x: torch.Tensor, *parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone()  # a new x: no answer from the cache
        y = functional_call(module, dict(zip(names, parameters, strict=True)), (x,))
        return y, module.log_abs_det_jacobian(x, y)  # cached by the call, with its graph

    parameters = [parameter.detach().clone().requires_grad_() for parameter in
                  module.parameters()]
    assert torch.autograd.gradcheck(flow, (_inputs(3, D).requires_grad_(), *parameters))


def test_float32_log_determinant_sums_products_of_factors() -> None:
    """_sum_log takes a quarter of the logarithms in float32: within float32 rounding of the
    float64 sum, also with factors down to the smallest float32 gives (2^-24) and up to 2."""
    generator = torch.Generator().manual_seed(5)
    factors = torch.rand(256, 64, generator=generator, dtype=torch.float64) * 2
    factors[:, :8] = 2.0**-24  # a whole group of four at the smallest factor
    exact = factors.log().sum(-1)
    single = _sum_log(factors.float())
    assert torch.allclose(single.double(), exact, rtol=0, atol=64 * 2.0**-24 * 20)
    torch.testing.assert_close(_sum_log(factors), exact, rtol=0, atol=1e-12)


def test_pyro_sylvester_log_det_is_wrong_at_random_parameters() -> None:
    """Pyro's Sylvester computes the rows x + tanh(x S Q^T + b) Q R, i.e. the columns
    x + R^T Q^T tanh(Q S^T x + b), with det J = det(I + diag(h') Q (R S)^T Q^T). That equals
    its prod_i (1 + h'_i R_ii S_ii) when h' is constant (near its initial, almost-zero
    parameters, the only place its own test looks) or Q = I, not in general. Ours computes the
    paper's x + Q R h(R~ Q^T x + b)."""
    torch.manual_seed(0)
    pyro_flow = PyroSylvester(D, count_transforms=3).double()
    ours = HouseholderSylvester(D, num_reflections=3).double()
    with torch.no_grad():
        for parameter in [*pyro_flow.parameters(), *ours.parameters()]:
            parameter.normal_()
    x = _inputs(B, D)

    for flow in (pyro_flow, ours):
        expected = torch.linalg.slogdet(_per_point_jacobians(flow._call, x))[1]
        log_det = flow.log_abs_det_jacobian(x, flow(x))
        if flow is ours:
            torch.testing.assert_close(log_det, expected, rtol=0, atol=1e-10)
        else:
            assert (log_det - expected).abs().max() > 0.1


def test_no_tensor_is_created_on_the_default_device() -> None:
    """On the meta device every tensor must follow the inputs and parameters: a torch.eye left
    on the CPU (as in Pyro's Sylvester) raises."""
    device = torch.device("meta")
    x = torch.empty(S, B, D, device=device)
    context = torch.empty(B, C, device=device)
    for name in CASES:
        for conditional in (False, True):
            if CASES[name][conditional] is None:
                continue
            module = CASES[name][conditional]().to(device)
            transform = _transform(module, context)
            y, log_det = transform.call_and_ladj(x)
            assert y.device == device and log_det.device == device
            if name not in HOUSEHOLDER_FLOWS:
                assert transform.q().device == device
    with pytest.raises(RuntimeError, match="device"):
        PyroSylvester(D, count_transforms=2).to(device)(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@parametrize_modules
def test_cuda_matches_cpu(name: str, conditional: bool) -> None:
    module = _build(name, conditional)
    context, x = _inputs(B, C, seed=2), _inputs(S, B, D)
    y, log_det = _transform(module, context).call_and_ladj(x)
    x_back = _transform(module, context).inv(y.clone())

    module.cuda()
    y_gpu, log_det_gpu = _transform(module, context.cuda()).call_and_ladj(x.cuda())
    x_back_gpu = _transform(module, context.cuda()).inv(y_gpu.clone())
    torch.testing.assert_close(y_gpu.cpu(), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_det_gpu.cpu(), log_det, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_back_gpu.cpu(), x_back, rtol=0, atol=1e-8)


def test_transformed_distribution_scores_any_point() -> None:
    """Samples are scored from the cache; other points by the inverse (Pyro raises there)."""
    torch.manual_seed(0)
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    flows = [
        orthogonal_sylvester(D, bottleneck=3).double(),
        householder_sylvester(D, num_flows=2, num_reflections=2).double(),
        triangular_sylvester(D, permute=True).double(),
        householder(D, 2).double(),
    ]
    for flow in flows:
        with torch.no_grad():
            for parameter in flow.parameters():
                parameter.normal_()
    flow_dist = dist.TransformedDistribution(base, flows)
    z = flow_dist.rsample((B,))
    log_q = flow_dist.log_prob(z)
    torch.testing.assert_close(flow_dist.log_prob(z.clone()), log_q, rtol=0, atol=1e-8)
    assert torch.isfinite(flow_dist.log_prob(_inputs(B, D, scale=3.0))).all()


def test_helpers_build_what_they_say() -> None:
    assert orthogonal_sylvester(D).bottleneck == D and orthogonal_sylvester(40).bottleneck == 32
    assert orthogonal_sylvester(D, 3, 2).q_free.shape == (3, D, 2)
    assert householder_sylvester(D).householder_vectors.shape == (1, 8, D)
    assert householder_sylvester(D, 3, 4).householder_vectors.shape == (3, 4, D)
    assert triangular_sylvester(D, 2, True).permutations.shape == (2, D, D)
    assert householder(D).count_transforms == D // 2 + 1
    linear = conditional_triangular_sylvester(D, C, num_flows=2)
    with_hidden = conditional_triangular_sylvester(D, C, [7], 2)
    assert isinstance(with_hidden.nn, DenseNN) and not isinstance(linear.nn, DenseNN)
    for module in (linear, with_hidden):
        assert module.param_dims == [2 * D * D, 2 * D, 2 * D]
        assert module.condition(torch.randn(B, C)).q().shape == (2, D, D)
    orthogonal = conditional_orthogonal_sylvester(D, C, [7], 2, 3)
    assert isinstance(orthogonal, ConditionalOrthogonalSylvester)
    assert orthogonal.param_dims == [18, 6, 6, 2 * D * 3]
    with_reflections = conditional_householder_sylvester(D, C, None, 2, 4)
    assert isinstance(with_reflections, ConditionalHouseholderSylvester)
    assert with_reflections.param_dims[-1] == 2 * 4 * D
    assert conditional_householder(D, C, [7], 3).nn.param_dims == [D] * 3
    chain = HouseholderChainNN(C, D, 3)
    assert len(chain(torch.randn(B, C))) == 3 and chain.chain[0].in_features == D


def test_conditional_sylvester_takes_one_tensor_or_a_tuple_from_its_network() -> None:
    """nn may return the parameter groups as a tuple (as DenseNN does) or as one tensor of
    their total size; another number of groups is an error naming nn."""
    tuple_module = conditional_triangular_sylvester(D, C, num_flows=2).double()
    tensor_module = ConditionalTriangularSylvester(D, tuple_module.nn.linear, num_flows=2)
    context, x = _inputs(B, C, seed=2), _inputs(B, D)
    y, log_det = tuple_module.condition(context).call_and_ladj(x)
    y_tensor, log_det_tensor = tensor_module.condition(context).call_and_ladj(x)
    torch.testing.assert_close(y_tensor, y, rtol=0, atol=0)
    torch.testing.assert_close(log_det_tensor, log_det, rtol=0, atol=0)
    wrong = ConditionalTriangularSylvester(D, DenseNN(C, [4], [D * D, D]))
    with pytest.raises(ValueError, match="nn must return 3 tensors"):
        wrong.condition(torch.randn(B, C))


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: OrthogonalSylvester(D, bottleneck=D + 1), "bottleneck"),
        (lambda: OrthogonalSylvester(D, bottleneck=0), "bottleneck"),
        (lambda: OrthogonalSylvester(D, orthogonalization_steps=0), "orthogonalization_steps"),
        (lambda: OrthogonalSylvester(D, inverse_max_iter=0), "inverse_max_iter"),
        (lambda: HouseholderSylvester(D, num_flows=0), "num_flows"),
        (lambda: HouseholderSylvester(D, num_reflections=0), "num_reflections"),
        (lambda: TriangularSylvester(D, num_flows=0), "num_flows"),
        (lambda: conditional_orthogonal_sylvester(D, C, bottleneck=D + 1), "bottleneck"),
        (lambda: conditional_householder_sylvester(D, C, num_reflections=0), "num_reflections"),
        (lambda: conditional_triangular_sylvester(D, C, num_flows=0), "num_flows"),
        (
            lambda: ConditionalTriangularSylvester(D, torch.nn.Linear(C, 1), inverse_max_iter=0),
            "inverse_max_iter",
        ),
        (lambda: Householder(D, 0), "count_transforms"),
        (lambda: ConditionalHouseholder(D, torch.nn.Linear(C, D), 0), "count_transforms"),
        (lambda: HouseholderChainNN(C, D, 0), "count_transforms"),
        (  # no flow dimension
            lambda: ConditionedTriangularSylvester(
                torch.zeros(1, D, D), torch.zeros(1, D, D), torch.zeros(D)
            ),
            "bias",
        ),
        (  # two flows, but Q for one
            lambda: ConditionedOrthogonalSylvester(
                torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), torch.zeros(2, 3),
                torch.zeros(1, D, 3),
            ),
            "number of flows",
        ),
    ],
)
def test_invalid_arguments_are_rejected(build, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build()


# Pyro's Householder family: ours is a drop-in. The same call (Pyro's positional order and
# defaults) builds, in both, a transform with the same parameters (names and shapes: a state
# dict carries over) and, with those parameters, the same outputs, log-determinants and
# inverses, in float64. No other name of ours is a Pyro transform's.

DROP_INS = {
    "ConditionalHouseholder",
    "ConditionedHouseholder",
    "Householder",
    "conditional_householder",
    "householder",
}

# case -> (name, the arguments of the call, in Pyro's positional order)
DROP_IN_CALLS = {
    "Householder-default": ("Householder", lambda: (D,)),
    "Householder": ("Householder", lambda: (D, 3)),
    "householder-default": ("householder", lambda: (D,)),
    "householder": ("householder", lambda: (D, 3)),
    "ConditionalHouseholder-default": (
        "ConditionalHouseholder", lambda: (D, DenseNN(C, [7], param_dims=[D])),
    ),
    "ConditionalHouseholder": (
        "ConditionalHouseholder", lambda: (D, DenseNN(C, [7], param_dims=[D] * 3), 3),
    ),
    "conditional_householder-default": ("conditional_householder", lambda: (D, C)),
    "conditional_householder": ("conditional_householder", lambda: (D, C, [7], 3)),
}


def _pyro_transform_names() -> set[str]:
    """Pyro's exported transform names and the public classes and functions of its transform
    modules (such as ``ConditionedHouseholder``, which the package does not export)."""
    names = set(pyro_transforms.__all__)
    for info in pkgutil.iter_modules(pyro_transforms.__path__):
        module = importlib.import_module(f"{pyro_transforms.__name__}.{info.name}")
        names |= {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == module.__name__
        }
    return names


def test_no_name_is_a_pyro_transform_unless_it_is_a_verified_drop_in() -> None:
    pyro_names = _pyro_transform_names()
    assert {"Householder", "ConditionedHouseholder", "Sylvester", "sylvester"} <= pyro_names
    assert set(pyro_dgm.transforms.__all__) & pyro_names == DROP_INS


@pytest.mark.parametrize("name", sorted(DROP_INS))
def test_drop_in_signatures_are_pyros(name: str) -> None:
    """The same parameter names, kinds (positional order) and defaults."""
    pyro_householder = importlib.import_module(f"{pyro_transforms.__name__}.householder")

    def described(function) -> list[tuple]:
        return [
            (parameter.name, parameter.kind, parameter.default)
            for parameter in inspect.signature(function).parameters.values()
        ]

    assert described(getattr(pyro_dgm.transforms, name)) == described(
        getattr(pyro_householder, name)
    )


@pytest.mark.parametrize("case", list(DROP_IN_CALLS))
def test_pyro_householder_call_builds_the_same_transform(case: str) -> None:
    name, make_arguments = DROP_IN_CALLS[case]
    arguments = make_arguments()  # one network, shared by both, where the call takes one
    torch.manual_seed(0)
    theirs = getattr(pyro_transforms, name)(*arguments).double()
    ours = getattr(pyro_dgm.transforms, name)(*arguments).double()
    assert {key: value.shape for key, value in ours.state_dict().items()} == {
        key: value.shape for key, value in theirs.state_dict().items()
    }
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 1 if parameter.dim() == 1 else 2 / parameter.shape[-1] ** 0.5)
    ours.load_state_dict(theirs.state_dict())
    for kind in (TransformModule, ConditionalTransformModule):
        assert isinstance(ours, kind) == isinstance(theirs, kind)

    context, x = _inputs(B, C, seed=2), _inputs(S, B, D)
    transform_theirs, transform_ours = _transform(theirs, context), _transform(ours, context)
    assert isinstance(transform_ours, ConditionedHouseholder)
    y, y_ours = transform_theirs(x), transform_ours(x)
    torch.testing.assert_close(y_ours, y, rtol=0, atol=1e-12)
    assert (y - x).abs().max() > 0.1
    torch.testing.assert_close(
        transform_ours.log_abs_det_jacobian(x, y_ours),
        transform_theirs.log_abs_det_jacobian(x, y), rtol=0, atol=0,
    )
    y_any = _inputs(S, B, D, seed=3)  # a point no forward pass produced
    torch.testing.assert_close(
        transform_ours.inv(y_any), transform_theirs.inv(y_any.clone()), rtol=0, atol=1e-12
    )


# Second derivatives and torch.func. The hand-fused Functions (_SylvesterRows,
# _SharedProjections, _HouseholderMatrix) against their plain-torch references: values, first
# derivatives and Hessian-vector products (the fused backward pass hands a derivative of the
# gradient to the reference), in float32 and float64, on the CPU and CUDA; then the Hessian of
# a flow posterior's log-density against finite differences of the gradient, and torch.func
# transforms against ordinary autograd, for every kind of flow.

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


def _rows_arguments(count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """x (6, 4) and the factors of ``count`` flows with M = 3: encoders (K, 4, 3), biases
    (K, 3), decoders (K, 3, 4) and diagonals (K, 3) in (-0.9, 0.9), as the flows make them."""
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    diagonals = 1.8 * torch.rand(count, 3, generator=generator, dtype=torch.float64) - 0.9
    return [draw(6, 4), draw(count, 4, 3), draw(count, 3), draw(count, 3, 4), diagonals]


def _projections_arguments(
    count: int, d: int, m: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Q (K, D, M), square (K, M, M) and diag_tilde (K, M)."""
    return [
        torch.randn(*shape, generator=generator, dtype=torch.float64)
        for shape in [(count, d, m), (count, m, m), (count, m)]
    ]


# name -> (entry point, reference, arguments from a generator, name of the fused node)
FUSED = {
    "rows-one-flow": (
        _sylvester_rows, _sylvester_rows_reference, lambda g: _rows_arguments(1, g),
        "_SylvesterRowsBackward",
    ),
    "rows-three-flows": (
        _sylvester_rows, _sylvester_rows_reference, lambda g: _rows_arguments(3, g),
        "_SylvesterRowsBackward",
    ),
    "projections-one-bottleneck": (
        _shared_projections, _shared_projections_reference,
        lambda g: _projections_arguments(1, 6, 4, g), "_SharedProjectionsBackward",
    ),
    "projections-two-square": (
        _shared_projections, _shared_projections_reference,
        lambda g: _projections_arguments(2, 4, 4, g), "_SharedProjectionsBackward",
    ),
    "householder-matrix": (
        _householder_matrix, _householder_matrix_reference,
        lambda g: [torch.randn(3, 6, generator=g, dtype=torch.float64)],
        "_HouseholderMatrixBackward",
    ),
    "householder-matrix-stack-of-one": (
        _householder_matrix, _householder_matrix_reference,
        lambda g: [torch.randn(1, 3, 6, generator=g, dtype=torch.float64)],
        "_HouseholderMatrixBackward",
    ),
    "householder-matrix-stack": (
        _householder_matrix, _householder_matrix_reference,
        lambda g: [torch.randn(2, 3, 6, generator=g, dtype=torch.float64)],
        "_HouseholderMatrixBackward",
    ),
}


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return (outputs,) if torch.is_tensor(outputs) else tuple(outputs)


def _graph_nodes(*tensors: torch.Tensor) -> set[str]:
    """The class names of the autograd nodes that ``tensors`` were computed through."""
    names, stack = set(), [tensor.grad_fn for tensor in tensors]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(FUSED))
def test_fused_function_matches_its_reference(case: str, dtype: torch.dtype, device: str) -> None:
    """Values, vector-Jacobian products (the hand-written backward pass) and Hessian-vector
    products, with respect to the inputs and to the incoming gradient, of the fused Function
    against its reference; in float32 to a few units of its rounding at these sizes."""
    entry, reference, make_arguments, node = FUSED[case]
    generator = torch.Generator().manual_seed(7)
    arguments = [a.to(device, dtype).requires_grad_() for a in make_arguments(generator)]
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {
        "rtol": 1e-5, "atol": 1e-5
    }

    fused, expected = _as_tuple(entry(*arguments)), _as_tuple(reference(*arguments))
    assert node in _graph_nodes(*fused)  # the fused path, not the reference
    for value, expected_value in zip(fused, expected, strict=True):
        torch.testing.assert_close(value, expected_value, **tolerance)

    cotangents = [
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device, dtype)
        .requires_grad_()
        for t in expected
    ]
    directions = [
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device, dtype)
        for t in arguments
    ]

    def derivatives(outputs: tuple[torch.Tensor, ...]):
        # the first by the fused backward pass (no graph), the second through the graph of
        # the first: d/d(inputs, cotangents) of <vjp, directions>, i.e. Hessian-vector
        # products and a Jacobian-vector product (the derivative in the cotangent)
        vjp = torch.autograd.grad(outputs, arguments, cotangents, retain_graph=True)
        vjp_graph = torch.autograd.grad(outputs, arguments, cotangents, create_graph=True)
        inner = sum((g * v).sum() for g, v in zip(vjp_graph, directions, strict=True))
        return vjp + vjp_graph, torch.autograd.grad(inner, arguments + cotangents)

    (vjp, second), (vjp_expected, second_expected) = (
        derivatives(fused), derivatives(_as_tuple(reference(*arguments)))
    )
    for value, expected_value in zip(vjp + second, vjp_expected + second_expected, strict=True):
        torch.testing.assert_close(value, expected_value, **tolerance)
    assert max(value.abs().max() for value in second) > 0.1


@pytest.mark.parametrize("case", list(FUSED))
def test_fused_function_derivatives_match_finite_differences(case: str) -> None:
    """gradcheck and gradgradcheck of the fused Function in float64: its hand-written first
    derivatives, and the second derivatives taken through its backward pass."""
    entry, _, make_arguments, _ = FUSED[case]
    arguments = [a.requires_grad_() for a in make_arguments(torch.Generator().manual_seed(8))]
    assert torch.autograd.gradcheck(entry, arguments)
    assert torch.autograd.gradgradcheck(entry, arguments)


def test_fused_backward_passes_respect_needs_input_grad() -> None:
    """Only some inputs requiring gradients (as the triangular kind's constant Q): those get
    the reference's gradient, in ordinary and in double backward passes."""
    generator = torch.Generator().manual_seed(9)
    cases = [
        (_sylvester_rows, _sylvester_rows_reference, _rows_arguments(2, generator), [1, 4]),
        (_sylvester_rows, _sylvester_rows_reference, _rows_arguments(2, generator), [0]),
        (
            _shared_projections, _shared_projections_reference,
            _projections_arguments(2, 4, 4, generator), [1, 2],
        ),
        (
            _shared_projections, _shared_projections_reference,
            _projections_arguments(1, 5, 3, generator), [0],
        ),
    ]
    for entry, reference, arguments, wanted in cases:
        for index in wanted:
            arguments[index].requires_grad_()
        inputs = [arguments[index] for index in wanted]
        weights = [
            torch.randn(t.shape, generator=generator, dtype=torch.float64)
            for t in _as_tuple(reference(*arguments))
        ]

        def loss(outputs) -> torch.Tensor:
            return sum((w * o.sin()).sum() for w, o in zip(weights, outputs, strict=True))

        for create_graph in (False, True):
            fused = torch.autograd.grad(loss(entry(*arguments)), inputs, create_graph=create_graph)
            expected = torch.autograd.grad(loss(reference(*arguments)), inputs)
            for value, expected_value in zip(fused, expected, strict=True):
                torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)


def test_ordinary_autograd_takes_the_fused_nodes() -> None:
    """Outside torch.func a plain flow's graph holds the three fused nodes (the fast path)."""
    module = _build("householder-stack", conditional=False)
    x = _inputs(B, D).requires_grad_()
    assert {"_SylvesterRowsBackward", "_SharedProjectionsBackward",
            "_HouseholderMatrixBackward"} <= _graph_nodes(*module.call_and_ladj(x))


class _FlowMap(torch.nn.Module):
    """A flow module, conditioned on ``context`` when given, as the map ``x -> (y, log|det J|)``
    (for ``functional_call``)."""

    def __init__(self, flow: torch.nn.Module, context: torch.Tensor | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.context = context

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transform = _transform(self.flow, self.context)
        y = transform(x)
        return y, transform.log_abs_det_jacobian(x, y)


class _LogDensity(torch.nn.Module):
    """The log-density of the flow posterior q = TransformedDistribution(N(0, I), [flow]),
    summed over fixed ``points`` (scored through the inverse), plus the guide's part of a KL
    estimate, log q(z) - log p(z) at z = flow(eps) (scored from the cache), for a fixed base
    sample ``eps`` and p = N(0.5, 2^2)."""

    def __init__(self, flow: torch.nn.Module, context: torch.Tensor | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.context = context

    def forward(self, points: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        transform = _transform(self.flow, self.context)
        zeros = torch.zeros(D, dtype=points.dtype)
        posterior = dist.TransformedDistribution(dist.Normal(zeros, 1.0).to_event(1), [transform])
        total = posterior.log_prob(points).sum()
        if eps is not None:
            z = transform(eps)
            prior = dist.Normal(zeros + 0.5, 2.0).to_event(1)
            total = total + (posterior.log_prob(z) - prior.log_prob(z)).sum()
        return total


def _gradient_differences(function, point: torch.Tensor, step: float = 1e-5) -> torch.Tensor:
    """(n, n) central differences, with ``step``, of autograd's gradient of a scalar function
    of ``point`` (n numbers)."""

    def gradient(at: torch.Tensor) -> torch.Tensor:
        at = at.detach().requires_grad_()
        return torch.autograd.grad(function(at), at)[0].reshape(-1)

    columns = []
    for j in range(point.numel()):
        shift = torch.zeros(point.numel(), dtype=point.dtype)
        shift[j] = step
        shift = shift.view(point.shape)
        columns.append((gradient(point + shift) - gradient(point - shift)) / (2 * step))
    return torch.stack(columns, dim=1)


def _assert_hessian_matches_differences(function, point: torch.Tensor) -> None:
    hessian = torch.autograd.functional.hessian(function, point).reshape(
        point.numel(), point.numel()
    )
    differences = _gradient_differences(function, point)
    scale = differences.abs().max()
    assert scale > 0.1
    torch.testing.assert_close(hessian, differences, rtol=0, atol=1e-6 * scale.item())


HESSIAN_CASES = ["orthogonal-bottleneck", "householder", "triangular-permuted", "householder-flow",
                 "orthogonal-stack", "householder-stack", "triangular-stack"]


@pytest.mark.parametrize("name, conditional", _modules(HESSIAN_CASES))
def test_log_density_hessian_in_the_point_matches_finite_differences(
    name: str, conditional: bool
) -> None:
    """The Hessian of log q(x) in x, through the inverse (its implicit-function derivatives
    must be exact to the second order), in float64, to 1e-6 of its largest entry."""
    module = _build(name, conditional)
    context = _inputs(2, C, seed=2) if conditional else None
    log_density = _LogDensity(module, context)
    _assert_hessian_matches_differences(
        lambda x: log_density(x.clone()), _inputs(2, D, seed=3)  # a new x: no cached answer
    )


@pytest.mark.parametrize("name, conditional", _modules(HESSIAN_CASES))
def test_log_density_hessian_in_the_parameters_matches_finite_differences(
    name: str, conditional: bool
) -> None:
    """The Hessian, in two entries of every parameter tensor, of log q at fixed points plus
    log q(z) - log p(z) at z = flow(eps): the fused nodes' second derivatives (plain flows),
    the inverse's and the hypernetworks' (conditional ones), in float64, to 1e-6 of its
    largest entry."""
    module = _build(name, conditional)
    context = _inputs(2, C, seed=2) if conditional else None
    log_density = _LogDensity(module, context)
    points, eps = _inputs(2, D, seed=3), _inputs(2, D, seed=4, scale=1.0)
    generator = torch.Generator().manual_seed(5)
    named = {f"flow.{key}": value.detach() for key, value in module.named_parameters()}
    chosen = {  # two flat indices per parameter tensor
        key: torch.randperm(value.numel(), generator=generator)[:2] for key, value in named.items()
    }
    start = torch.cat([named[key].reshape(-1)[index] for key, index in chosen.items()])

    def function(entries: torch.Tensor) -> torch.Tensor:
        parameters = {}
        for (key, index), values in zip(chosen.items(), entries.split(2), strict=True):
            parameters[key] = named[key].reshape(-1).index_put((index,), values).view_as(
                named[key]
            )
        return functional_call(log_density, parameters, (points.clone(), eps.clone()))

    _assert_hessian_matches_differences(function, start)


@parametrize_modules
def test_torch_func_transforms_match_autograd(name: str, conditional: bool) -> None:
    """torch.func.grad (in the input and in the parameters), vmap, jacrev and jacfwd through
    the flow's forward map and log_abs_det_jacobian equal ordinary autograd."""
    module = _build(name, conditional)
    context = _inputs(B, C, seed=2) if conditional else None
    flow_map = _FlowMap(module, context)
    x = _inputs(B, D)
    weights = _inputs(B, D, seed=6)

    def score(x: torch.Tensor) -> torch.Tensor:
        y, log_det = flow_map(x)
        return (weights * y.sin()).sum() + log_det.square().sum()

    x_leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(score(x_leaf), x_leaf)[0]
    torch.testing.assert_close(torch.func.grad(score)(x.clone()), expected, rtol=1e-12,
                               atol=1e-12)

    names = [key for key, _ in module.named_parameters()]
    parameters = {f"flow.{key}": value.detach() for key, value in module.named_parameters()}

    def score_of_parameters(parameters: dict, x: torch.Tensor) -> torch.Tensor:
        y, log_det = functional_call(flow_map, parameters, (x,))
        return (weights * y.sin()).sum() + log_det.square().sum()

    gradients = torch.func.grad(score_of_parameters)(parameters, x.clone())
    expected = torch.autograd.grad(score(x.clone()), list(module.parameters()))
    for key, expected_gradient in zip(names, expected, strict=True):
        torch.testing.assert_close(gradients[f"flow.{key}"], expected_gradient, rtol=1e-12,
                                   atol=1e-12)

    def point_map(x_point: torch.Tensor, context_point: torch.Tensor | None):
        return _FlowMap(module, context_point)(x_point)

    in_dims = (0, 0 if conditional else None)
    y_expected, log_det_expected = flow_map(x.clone())
    y, log_det = torch.func.vmap(point_map, in_dims)(x, context)
    torch.testing.assert_close(y, y_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_det, log_det_expected, rtol=1e-12, atol=1e-12)

    context_point = None if context is None else context[1]
    expected = jacobian(lambda x_point: point_map(x_point, context_point), x[1].clone())
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        found = transform(point_map)(x[1], context_point)
        for value, expected_value in zip(found, expected, strict=True):
            torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-12)
