"""Sylvester and Householder flows: exact log-determinants, inverses, shapes, gradients, devices.

Every check runs in float64 at random, far-from-identity parameters, for every kind, with global
parameters ("plain") and with parameters computed from a context ("conditional").
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import Sylvester as PyroSylvester
from torch.autograd.functional import jacobian
from torch.func import functional_call

from pyro_dgm.transforms import (
    ConditionalHouseholder,
    ConditionalSylvester,
    Householder,
    Sylvester,
    conditional_householder,
    conditional_sylvester,
    householder,
    sylvester,
)
from pyro_dgm.transforms.householder import _HouseholderMatrix
from pyro_dgm.transforms.sylvester import _SharedProjections, _sum_log, _SylvesterRows

D, C, B, S = 5, 3, 4, 2  # event, context, batch and particle sizes

# name -> (plain module, conditional module), built on demand
CASES = {
    "orthogonal-bottleneck": (
        lambda: Sylvester(D, "orthogonal", bottleneck=3),
        lambda: ConditionalSylvester(D, C, "orthogonal", bottleneck=3),
    ),
    "orthogonal-square": (
        lambda: Sylvester(D, "orthogonal"),
        lambda: ConditionalSylvester(D, C, "orthogonal"),
    ),
    "householder": (
        lambda: Sylvester(D, "householder", count_householder=3),
        lambda: ConditionalSylvester(D, C, "householder", count_householder=3),
    ),
    "triangular": (
        lambda: Sylvester(D, "triangular"),
        lambda: ConditionalSylvester(D, C, "triangular"),
    ),
    "triangular-permuted": (
        lambda: Sylvester(D, "triangular", permute=True),
        lambda: ConditionalSylvester(D, C, "triangular", permute=True),
    ),
    "householder-flow": (
        lambda: Householder(D, 3),
        lambda: ConditionalHouseholder(D, C, 3),
    ),
    # stacks of three flows in one module (global parameters only)
    "orthogonal-stack": (lambda: Sylvester(D, "orthogonal", bottleneck=3, num_flows=3), None),
    "householder-stack": (
        lambda: Sylvester(D, "householder", count_householder=3, num_flows=3), None
    ),
    "triangular-stack": (lambda: Sylvester(D, "triangular", permute=True, num_flows=3), None),
}
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
    if name != "householder-flow":
        assert transform.log_abs_det_jacobian(x, y) is log_det  # cached, not recomputed
    jacobians = _per_point_jacobians(lambda z: _transform(module, context)(z), x)
    sign, expected = torch.linalg.slogdet(jacobians)

    assert log_det.shape == (B,)
    torch.testing.assert_close(log_det, expected, rtol=0, atol=1e-10)
    assert (sign == transform.sign).all()
    # Not the trivial case: the flow moves points and (Sylvester) changes volume.
    assert (y - x).abs().max() > 0.1
    if name != "householder-flow":
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
    if conditional:
        params = module.hypernet(context).split(module.param_dims, dim=-1)[-1]
        vectors = params.unflatten(-1, module.q_shape)
    else:
        vectors = module.householder_vectors
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


@pytest.mark.parametrize(
    "kind, permute",
    [("orthogonal", False), ("householder", False), ("triangular", False), ("triangular", True)],
)
def test_a_stack_is_its_flows_one_after_another(kind: str, permute: bool) -> None:
    """Sylvester(..., num_flows=3) is the composition of three single flows with its parameters'
    slices (the triangular kind alternating Q from the reversal if permute): same outputs and
    log-determinants, forward and inverse."""
    options = {"orthogonal": {"bottleneck": 3}, "householder": {"count_householder": 3},
               "triangular": {"permute": permute}}[kind]
    torch.manual_seed(0)
    stack = Sylvester(D, kind, num_flows=3, **options).double()
    with torch.no_grad():
        for parameter in stack.parameters():
            parameter.normal_(0, 0.7)
    flows = []
    for k in range(3):
        single = options
        if kind == "triangular":  # Q alternates along the stack
            single = dict(options, permute=permute != (k % 2 == 1))
        flow = Sylvester(D, kind, **single).double()
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
    inverse = Sylvester(D, kind, num_flows=3, **options).double()
    inverse.load_state_dict(stack.state_dict())
    torch.testing.assert_close(inverse.inv(y.clone()), x, rtol=0, atol=1e-8)


@pytest.mark.parametrize("diagonal", [3.0, 20.0], ids=["0.995", "1.0"])
def test_inverse_converges_when_the_flow_is_nearly_singular(diagonal: float) -> None:
    """R_ii R~_ii near (or rounding to) -1 and large off-diagonal entries: the fixed-point
    iteration crawls and Newton with backtracking on |g|^2 stalls, while the back substitution
    still solves every point to the rounding level (and without a warning)."""
    flow = Sylvester(D, "triangular").double()
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
    assert torch.autograd.gradcheck(_SylvesterRows.apply, arguments)
    x, encoders, biases, decoders, diagonals = (a.detach() for a in arguments)
    log_det = torch.zeros(6, dtype=torch.float64)
    for encoder, bias, decoder, diagonal in zip(
        encoders, biases, decoders, diagonals, strict=True
    ):
        activation = torch.tanh(x @ encoder + bias)
        log_det += torch.log1p((1 - activation.square()) * diagonal).sum(-1)
        x = x + activation @ decoder
    y, stacked_log_det = _SylvesterRows.apply(*arguments)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-13)
    torch.testing.assert_close(stacked_log_det, log_det, rtol=0, atol=1e-13)


def test_householder_matrix_is_the_product_of_reflections_with_exact_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    product = torch.eye(6, dtype=torch.float64)
    for v in vectors:  # H_1 H_2 ... H_K, each I - 2 v v^T / |v|^2
        product = product @ (torch.eye(6, dtype=torch.float64) - 2 * torch.outer(v, v) / v.dot(v))
    torch.testing.assert_close(_HouseholderMatrix.apply(vectors), product, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(_HouseholderMatrix.apply, (vectors.requires_grad_(),))
    stack = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)  # a stack of three
    torch.testing.assert_close(
        _HouseholderMatrix.apply(stack),
        torch.stack([_HouseholderMatrix.apply(v) for v in stack]), rtol=0, atol=1e-14,
    )
    assert torch.autograd.gradcheck(_HouseholderMatrix.apply, (stack.requires_grad_(),))


def test_shared_projections_backward_matches_finite_differences() -> None:
    generator = torch.Generator().manual_seed(4)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    for q_shape in [(6, 4), (4, 4)]:  # bottleneck M < D, and M = D; stacks of two flows
        assert torch.autograd.gradcheck(
            _SharedProjections.apply, (draw(2, *q_shape), draw(2, 4, 4), draw(2, 4))
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
    ours = Sylvester(D, "householder", count_householder=3).double()
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
            if name != "householder-flow":
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
        sylvester(D, "orthogonal", bottleneck=3).double(),
        sylvester(D, "householder", count_householder=2).double(),
        sylvester(D, "triangular", permute=True).double(),
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
    assert sylvester(D).kind == "orthogonal" and sylvester(D).bottleneck == D
    assert sylvester(40).bottleneck == 32
    assert sylvester(D, "householder").householder_vectors.shape == (1, 8, D)
    assert sylvester(D, "householder", num_flows=3).householder_vectors.shape == (3, 8, D)
    assert householder(D).count_transforms == D // 2 + 1
    with_hidden = conditional_sylvester(D, C, "triangular", hidden_dims=[7])
    assert isinstance(with_hidden.hypernet, torch.nn.Module)
    assert with_hidden.condition(torch.randn(B, C)).q().shape == (D, D)
    assert len(conditional_householder(D, C, 3, hidden_dims=[7]).chain) == 2


@pytest.mark.parametrize(
    "arguments",
    [
        {"kind": "spherical"},
        {"kind": "householder", "bottleneck": 2},
        {"kind": "triangular", "count_householder": 2},
        {"kind": "orthogonal", "bottleneck": D + 1},
        {"kind": "orthogonal", "inverse_max_iter": 0},
        {"kind": "householder", "permute": True},
        {"kind": "householder", "num_flows": 0},
    ],
)
def test_invalid_arguments_are_rejected(arguments: dict) -> None:
    with pytest.raises(ValueError):
        Sylvester(D, **arguments)
