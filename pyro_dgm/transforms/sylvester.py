r"""Sylvester normalizing flows [1], with an exact log-determinant and an exact inverse.

One flow is

.. math::

    \mathbf{z}' = \mathbf{z} + Q R\, h(\tilde R Q^T \mathbf{z} + \mathbf{b}), \qquad h = \tanh,

with :math:`Q \in \mathbb{R}^{D \times M}` having orthonormal columns and
:math:`R, \tilde R \in \mathbb{R}^{M \times M}` upper triangular. By Sylvester's determinant
identity and :math:`Q^T Q = I`, :math:`\det J = \det(I + \operatorname{diag}(h') \tilde R R)`, a
triangular determinant:

.. math::

    \log \lvert \det J \rvert = \sum_{i=1}^M \log\bigl(1 + h'\bigl((\tilde R Q^T \mathbf{z}
    + \mathbf{b})_i\bigr) R_{ii} \tilde R_{ii}\bigr).

The diagonals are :math:`\tanh` of free parameters, so :math:`\lvert R_{ii} \tilde R_{ii} \rvert
< 1` and, as :math:`0 < h' \le 1`, every factor is positive: the flow is a diffeomorphism.

The three flows of [1] differ in :math:`Q`: the orthogonal flow (O-SNF,
``OrthogonalSylvester``) orthonormalises a free :math:`D \times M` matrix; the Householder
flow (H-SNF, ``HouseholderSylvester``) takes :math:`M = D` and :math:`Q` a product of
``num_reflections`` Householder reflections; the triangular flow (T-SNF,
``TriangularSylvester``) takes :math:`M = D` and :math:`Q` the identity or the reversal
permutation, alternating along a stack. Each module is a stack of ``num_flows`` flows (the
word ``num_flows`` means that throughout the package); its ``Conditioned`` variant takes
given (e.g. per-data-point) factors and its ``Conditional`` variant computes them from a
context.

Inverse. Writing :math:`\mathbf{v} = Q^T \mathbf{z}` and :math:`\mathbf{c} = Q^T \mathbf{z}'`, the
component of :math:`\mathbf{z}` orthogonal to the columns of :math:`Q` is unchanged by the flow,
and :math:`\mathbf{v}` solves the :math:`M`-dimensional equation

.. math::

    \mathbf{g}(\mathbf{v}) = \mathbf{v} + R\, h(\tilde R \mathbf{v} + \mathbf{b}) - \mathbf{c} = 0,

after which :math:`\mathbf{z} = \mathbf{z}' - Q R\, h(\tilde R \mathbf{v} + \mathbf{b})`.

This system is triangular: row :math:`i` involves :math:`v_i, \ldots, v_M` only. Solved from the
last row up (nonlinear back substitution), each row is a scalar equation
:math:`v_i + R_{ii} h(\tilde R_{ii} v_i + s_i) = t_i`, with :math:`s_i, t_i` fixed by the rows
already solved, whose left side is increasing with slope in
:math:`(1 - \lvert R_{ii} \tilde R_{ii} \rvert, 1 + \lvert R_{ii} \tilde R_{ii} \rvert)` and
whose root lies in :math:`[t_i - \lvert R_{ii} \rvert, t_i + \lvert R_{ii} \rvert]` (:math:`h` is
bounded by 1). Newton's method on it provably converges (``_solve_monotone``): it contracts
when :math:`R_{ii} \tilde R_{ii} \ge 0`, and otherwise, started at the end of that bracket on the
convex side of the inflection point, moves monotonically to the root. The alternatives are
worse: the fixed-point iteration :math:`\mathbf{v} \leftarrow \mathbf{c} - R h(\tilde R
\mathbf{v} + \mathbf{b})` converges, but only linearly at the rate
:math:`\max_i \lvert R_{ii} \tilde R_{ii} \rvert`, after transient growth through large
off-diagonal entries (1% of random systems with :math:`M = 6` were not solved after 1000
iterations); Newton on the whole system has no convergence guarantee, and globalising it by
backtracking on :math:`\lVert \mathbf{g} \rVert^2` stalls in the flat regions of a saturated
:math:`\tanh` where the full step would have landed on the root. The back substitution costs
:math:`M` rounds of a few scalar Newton steps (7 to 22 in stress tests), each round over the
whole batch at once. The result is backward stable: it reproduces :math:`\mathbf{z}'` to
rounding; its distance from the exact preimage is that rounding times the condition number of
:math:`J`, which large off-diagonal entries can make big (:math:`10^7` for random amortized
factors with :math:`M = 64`: use float64 to invert such flows accurately). The iterations run
without gradient tracking; two Newton steps from their solution, taken with gradient tracking
and kept out of the value, carry the implicit-function derivatives of the inverse in
:math:`\mathbf{z}'` and in the parameters, exact up to the third order (so that Hessians
through the inverse are exact too).

References:

1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
   for Variational Inference", UAI 2018, arXiv:1803.05649.
2. Å. Björck, C. Bowie, "An iterative algorithm for computing the best estimate of an
   orthogonal matrix", SIAM J. Numer. Anal. 8 (1971).
"""

from __future__ import annotations

__all__ = [
    "ConditionalHouseholderSylvester",
    "ConditionalOrthogonalSylvester",
    "ConditionalTriangularSylvester",
    "ConditionedHouseholderSylvester",
    "ConditionedOrthogonalSylvester",
    "ConditionedTriangularSylvester",
    "HouseholderSylvester",
    "OrthogonalSylvester",
    "TriangularSylvester",
    "conditional_householder_sylvester",
    "conditional_orthogonal_sylvester",
    "conditional_triangular_sylvester",
    "householder_sylvester",
    "orthogonal_sylvester",
    "triangular_sylvester",
]

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from pyro.nn import DenseNN
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from .._fused import cache_forward_signature, needs_reference, reference_vjp
from .householder import _addmm, _householder_matrix, _householder_product, _is_stack_of_one


def _matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    """``matrix @ vector`` over broadcast batch shapes; einsum does not expand the matrix over
    the vector's extra (e.g. particle) dimensions, unlike ``matmul``."""
    return torch.einsum("...ij,...j->...i", matrix, vector)


def _tanh_and_slope(twice: Tensor) -> tuple[Tensor, Tensor]:
    """``(tanh(t), 1 - tanh(t)^2)`` from ``twice`` = 2 t, through :math:`s = \\sigma(2 t)`:
    :math:`\\tanh t = 2 s - 1` and :math:`1 - \\tanh^2 t = 4 s (1 - s)`.

    One sigmoid and a few cheap elementwise operations: on the CPU torch's ``tanh`` costs 7
    times its ``sigmoid`` (168 against 23 microseconds for 1024 x 64 float32 values, one
    thread), and the slope is taken without forming :math:`1 - \\tanh^2`. Both are within a
    few units of rounding of the direct forms in absolute terms (their relative error for
    :math:`\\lvert t \\rvert` below the precision is that of :math:`2 s - 1`, which only
    matters relative to a sum with larger terms).
    """
    s = torch.sigmoid(twice)
    if s.requires_grad:  # autograd keeps s: no in-place operations
        return 2 * s - 1, 4 * s * (1 - s)
    slope = torch.rsub(s, 1).mul_(s).mul_(4)
    return s.mul_(2).sub_(1), slope


def _log1p(x: Tensor) -> Tensor:
    """``log1p(x)``, except for float32 on the CPU, where torch's ``log1p`` runs unvectorized
    (about ten times slower than ``log``) and ``log(1 + x)`` is used: its
    absolute error, at most about 1.2e-7, is that of the float32 sums the log-determinants
    enter."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.log(x + 1)
    return torch.log1p(x)


def _orthogonalize(matrix: Tensor, steps: int) -> Tensor:
    r"""The orthonormal polar factor of ``matrix`` (..., D, M), by ``steps`` iterations of
    :math:`Q \leftarrow Q (I + \tfrac12 (I - Q^T Q))` [1, 2].

    Each singular value maps as :math:`\sigma \mapsto \sigma (3 - \sigma^2) / 2`, which converges
    to 1 for every :math:`\sigma \in (0, \sqrt 3)`: by a factor of 1.5 per step while small, then
    quadratically. Dividing first by :math:`\lVert Q^T Q \rVert_F^{1/2} \ge \sigma_{\max}` puts all
    singular values in (0, 1]; about :math:`\log_{1.5}(\sigma_{\max} / \sigma_{\min}) + 5` steps
    reach machine precision. A fixed count keeps the step free of host synchronisation.
    """
    q = matrix.reshape(-1, *matrix.shape[-2:])  # one batch dimension, for the fused bmm
    q = q * torch.linalg.matrix_norm(q.mT @ q).rsqrt()[:, None, None]
    for _ in range(steps):
        q = torch.baddbmm(q, q, q.mT @ q, beta=1.5, alpha=-0.5)  # 1.5 Q - 0.5 Q Q^T Q
    return q.reshape(matrix.shape)


def _triangular_factors(square: Tensor, diag_tilde: Tensor) -> tuple[Tensor, Tensor]:
    r"""Upper triangular :math:`R, \tilde R` from one square matrix, as in the code of [1].

    :math:`R`'s strict upper triangle is ``square``'s, and :math:`\tilde R`'s is the transpose of
    ``square``'s strict lower triangle; the diagonals are ``tanh(diag(square))`` and
    ``tanh(diag_tilde)``, in (-1, 1).
    """
    diagonal = torch.tanh(square.diagonal(dim1=-2, dim2=-1))
    r = torch.diagonal_scatter(square.triu(1), diagonal, dim1=-2, dim2=-1)
    r_tilde = torch.diagonal_scatter(square.mT.triu(1), torch.tanh(diag_tilde), dim1=-2, dim2=-1)
    return r, r_tilde


def _solve_monotone(
    a: Tensor, w: Tensor, shift: Tensor, target: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    r"""The root of :math:`g(v) = v + a \tanh(w v + s) - t` and :math:`\tanh(w v + s)` there,
    elementwise, for :math:`\lvert a w \rvert < 1`, by Newton's method.

    :math:`g' \in (1 - \lvert a w \rvert, 1 + \lvert a w \rvert)`, so :math:`g` is increasing
    and its root lies in :math:`[t - \lvert a \rvert, t + \lvert a \rvert]`. If :math:`a w \ge 0`
    the Newton error contracts by at least :math:`\lvert a w \rvert` per step from anywhere. If
    :math:`a w < 0`, :math:`g` is concave left of its inflection point :math:`-s / w` and convex
    right of it; started at the end of the bracket on the root's side of the inflection point,
    Newton's iterates move monotonically to the root, quadratically at last. The stopping rule
    (all steps below ``tol * (1 + |v|)``) is data-dependent: a host synchronisation per step.
    """
    inflection = torch.where(w == 0, target, -shift / w)
    root_on_right = inflection <= target  # g(inflection) = inflection - target
    v = torch.where(root_on_right, target + a.abs(), target - a.abs())
    for _ in range(max_iter):
        activation = torch.tanh(w * v + shift)
        step = (v + a * activation - target) / (1 + a * w * (1 - activation.square()))
        v = v - step
        if bool((step.abs() <= tol * (1 + v.abs())).all()):
            break
    else:
        warnings.warn(
            f"Sylvester inverse: Newton's method did not converge in {max_iter} steps "
            f"(largest last step {step.abs().max().item():.3g})",
            RuntimeWarning,
            stacklevel=5,
        )
    return v, torch.tanh(w * v + shift)


class _Basis(Protocol):
    """:math:`Q` (D, M) as an operator: ``matvec`` is :math:`Q \\mathbf{w}` (..., M) -> (..., D),
    ``rmatvec`` is :math:`Q^T \\mathbf{z}` (..., D) -> (..., M), and ``lmul`` is :math:`Q A` for
    matrices (..., M, N) -> (..., D, N)."""

    batched: bool

    def matvec(self, w: Tensor) -> Tensor: ...

    def rmatvec(self, z: Tensor) -> Tensor: ...

    def lmul(self, a: Tensor) -> Tensor: ...


class _DenseBasis:
    """:math:`Q` stored as a matrix (..., D, M) with orthonormal columns."""

    def __init__(self, q: Tensor) -> None:
        self.q = q
        self.batched = q.dim() > 2

    def matvec(self, w: Tensor) -> Tensor:
        return _matvec(self.q, w)

    def rmatvec(self, z: Tensor) -> Tensor:
        return torch.einsum("...dm,...d->...m", self.q, z)

    def lmul(self, a: Tensor) -> Tensor:
        return self.q @ a


class _PermutationBasis:
    """:math:`Q` the identity or the reversal permutation (which is its own transpose)."""

    batched = False

    def __init__(self, reverse: bool) -> None:
        self.reverse = reverse

    def matvec(self, w: Tensor) -> Tensor:
        return w.flip(-1) if self.reverse else w

    rmatvec = matvec

    def lmul(self, a: Tensor) -> Tensor:
        return a.flip(-2) if self.reverse else a


@cache_forward_signature
class _SylvesterRows(torch.autograd.Function):
    """A stack of flows and the sum of their log-determinants on rows ``x`` (N, D), for shared
    factors, as one autograd node; :func:`_sylvester_rows` is the entry point, and
    :func:`_sylvester_rows_reference` the same map in plain torch.

    Flow k maps ``x`` to ``x + h(x E_k + b_k) F_k`` with ``log|det J_k| = sum_i log(1 + d_ki
    h'_ki)``, where ``E_k = Q_k R~_k^T`` (D, M), ``F_k = R_k^T Q_k^T`` (M, D), ``d_k =
    diag(R_k) diag(R~_k)`` (M,), ``h = tanh`` and ``h' = 1 - h^2``; the factors come stacked,
    ``encoders`` (K, D, M), ``biases`` (K, M), ``decoders`` (K, M, D) and ``diagonals`` (K, M).
    Everything is written in ``s = sigmoid(2 (x E + b))``: ``h = 2 s - 1`` and ``h' = 4 u``
    with ``u = s - s^2`` (see :func:`_tanh_and_slope`), so that a flow's forward pass is two
    GEMMs, one sigmoid and five elementwise operations over the (N, M) rows, and its backward
    pass four GEMMs and seven. The hand-written backward pass runs the flows in reverse,
    reuses ``h``, ``u`` and ``1 + d h'`` from the forward pass (returned, with each flow's
    input, in a list: a non-tensor output), works in place on its own temporaries and writes
    each flow's parameter gradients into one tensor per factor: one node for the whole stack,
    where a node per flow (and autograd's accumulation into slices of the stacked parameters)
    took a quarter longer (``benchmarks/bench_flows.py``).
    Higher derivatives come from the reference (:func:`pyro_dgm._fused.reference_vjp`).
    """

    @staticmethod
    def forward(
        x: Tensor, encoders: Tensor, biases: Tensor, decoders: Tensor, diagonals: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        diagonals_4 = 4 * diagonals
        one = diagonals.new_ones(())
        per_flow = []  # input, h, h' / 4 and 1 + d h' of each flow
        log_det = None
        for encoder, bias, decoder, diagonal_4 in zip(
            encoders.unbind(0), biases.unbind(0), decoders.unbind(0), diagonals_4.unbind(0),
            strict=True,
        ):
            s = torch.addmm(bias, x, encoder, beta=2, alpha=2).sigmoid_()
            u = torch.addcmul(s, s, s, value=-1)  # h' / 4
            one_plus = torch.addcmul(one, u, diagonal_4)  # 1 + d h'
            activation = s.mul_(2).sub_(1)
            per_flow += [x, activation, u, one_plus]
            x = torch.addmm(x, activation, decoder)
            term = _sum_log(one_plus)
            log_det = term if log_det is None else log_det.add_(term)
        return x, log_det, per_flow

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: tuple) -> None:
        x, encoders, biases, decoders, diagonals = inputs
        _, _, per_flow = output
        ctx.save_for_backward(x, encoders, biases, decoders, diagonals, *per_flow)

    @staticmethod
    def backward(
        ctx, grad_y: Tensor, grad_log_det: Tensor, _: None
    ) -> tuple[Tensor | None, ...]:
        x, encoders, biases, decoders, diagonals, *per_flow = ctx.saved_tensors
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(
                _sylvester_rows_reference, (x, encoders, biases, decoders, diagonals),
                (grad_y, grad_log_det), ctx.needs_input_grad,
            )
        need_x, need_encoders, need_biases, need_decoders, need_diagonals = ctx.needs_input_grad
        count = encoders.shape[0]
        diagonals_4 = 4 * diagonals
        grad_log_det = grad_log_det.unsqueeze(-1)
        grads: list[tuple[Tensor, ...]] = []  # per flow, last first
        for encoder, decoder, diagonal_4, k in zip(
            encoders.unbind(0)[::-1], decoders.unbind(0)[::-1], diagonals_4.unbind(0)[::-1],
            reversed(range(count)), strict=True,
        ):
            x_k, activation, u, one_plus = per_flow[4 * k : 4 * k + 4]
            # weight = g / (1 + d h'); with dh'/dpre = -2 h h' (pre = x E + b), the gradient
            # with respect to pre is (g_y F^T - 2 weight d h) h' = 4 u (g_y F^T - weight d_4 h / 2)
            weight = one_plus.reciprocal().mul_(grad_log_det)
            grad_pre = (grad_y @ decoder.mT).addcmul_(activation, weight * diagonal_4, value=-0.5)
            grad_pre.mul_(u)  # a quarter of the gradient with respect to pre
            grads.append((
                (x_k.mT @ grad_pre).mul_(4) if need_encoders else None,
                grad_pre.sum(0).mul_(4) if need_biases else None,
                activation.mT @ grad_y if need_decoders else None,
                weight.mul_(u).sum(0).mul_(4) if need_diagonals else None,
            ))
            if k > 0 or need_x:
                grad_y = torch.addmm(grad_y, grad_pre, encoder.mT, alpha=4)
        stacked = [  # per factor, over the flows in order
            None if factor[0] is None
            else factor[0].unsqueeze(0) if count == 1 else torch.stack(factor[::-1])
            for factor in zip(*grads, strict=True)
        ]
        return grad_y if need_x else None, *stacked


def _sylvester_rows_reference(
    x: Tensor, encoders: Tensor, biases: Tensor, decoders: Tensor, diagonals: Tensor
) -> tuple[Tensor, Tensor]:
    """The map of :class:`_SylvesterRows` in plain torch (no in-place operations),
    differentiable to any order and under ``torch.func`` transforms: ``x`` (..., D) to the
    output (..., D) and the summed log-determinant (...)."""
    log_det = None
    for encoder, bias, decoder, diagonal in zip(
        encoders.unbind(0), biases.unbind(0), decoders.unbind(0), diagonals.unbind(0),
        strict=True,
    ):
        activation = torch.tanh(x @ encoder + bias)
        term = torch.log1p((1 - activation.square()) * diagonal).sum(-1)
        log_det = term if log_det is None else log_det + term
        x = x + activation @ decoder
    return x, log_det


def _sylvester_rows(
    z: Tensor, encoders: Tensor, biases: Tensor, decoders: Tensor, diagonals: Tensor
) -> tuple[Tensor, Tensor]:
    """The flows of :class:`_SylvesterRows` on ``z`` (..., D): the output (..., D) and the
    summed log-determinant (...), fused, or by the reference under ``torch.func`` transforms
    and forward-mode AD."""
    if needs_reference(z, encoders, biases, decoders, diagonals):
        return _sylvester_rows_reference(z, encoders, biases, decoders, diagonals)
    rows = z.reshape(-1, z.shape[-1])
    z_new, log_det, _ = _SylvesterRows.apply(rows, encoders, biases, decoders, diagonals)
    return z_new.view(z.shape), log_det.view(z.shape[:-1])


def _sum_log(positive: Tensor) -> Tensor:
    """``positive.log().sum(-1)`` for the factors ``1 + d h'`` of a log-determinant, which lie
    in [2^-24, 2) in float32 (in [2^-53, 2) in float64) or are 0.

    In float32 the last dimension is, when its size allows, multiplied down twice by halves
    before the logarithm, so that a quarter of the logarithms are taken (31 against 60
    microseconds for 1024 x 64 values on one CPU thread): a product of four factors stays
    above 2^-96 and below 16, so nothing under- or overflows, and its rounding error, at most
    three units in the last place, matches that of adding four logarithms.
    """
    size = positive.shape[-1]
    if positive.dtype == torch.float32 and size % 4 == 0:
        half = positive[..., : size // 2] * positive[..., size // 2 :]
        positive = half[..., : size // 4] * half[..., size // 4 :]
    return positive.log().sum(-1)


@cache_forward_signature
class _SharedProjections(torch.autograd.Function):
    """``(E, F, d)`` of :class:`_SylvesterRows` for a stack of K flows, from :math:`Q`
    (K, D, M) and the free parameters of :func:`_triangular_factors`, ``square`` (K, M, M) and
    ``diag_tilde`` (K, M); :func:`_shared_projections` is the entry point, and
    :func:`_shared_projections_reference` the same map in plain torch.

    With :math:`L` and :math:`U` the strict lower and upper triangles of ``square`` and
    :math:`d, \\tilde d` the two tanh diagonals, :math:`R = U + \\operatorname{diag}(d)` and
    :math:`\\tilde R^T = L + \\operatorname{diag}(\\tilde d)`, so
    :math:`E = Q \\tilde R^T = Q L + Q \\operatorname{diag}(\\tilde d)` and
    :math:`F^T = Q R = Q U + Q \\operatorname{diag}(d)`: two batched GEMMs with the column
    scalings fused in. The hand-written backward pass takes four more and a few (K, M, M)
    operations, where autograd's graph of the triangles, the diagonal scatters and the
    concatenation took three times as long for D = M = 64 (the benchmark's flows). All K flows
    in one call: the cost of these small operations does not grow with K. The forward pass
    also returns the list ``[L, U, d, d~]`` (a non-tensor output) for the backward pass;
    higher derivatives come from the reference (:func:`pyro_dgm._fused.reference_vjp`).
    """

    @staticmethod
    def forward(
        q: Tensor, square: Tensor, diag_tilde: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        stack_of_one = _is_stack_of_one(q)
        if stack_of_one:
            q, square, diag_tilde = q[0], square[0], diag_tilde[0]
        addmm = _addmm(q)
        diag_r, diag_t = square.diagonal(dim1=-2, dim2=-1).tanh(), diag_tilde.tanh()
        lower, upper = square.tril(-1), square.triu(1)
        encoder = addmm(q * diag_t.unsqueeze(-2), q, lower)
        q_r = addmm(q * diag_r.unsqueeze(-2), q, upper)
        outputs = encoder, q_r.mT, diag_r * diag_t
        if stack_of_one:
            outputs = tuple(t.unsqueeze(0) for t in outputs)
        return *outputs, [lower, upper, diag_r, diag_t]

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, ...], output: tuple) -> None:
        q, square, diag_tilde = inputs
        *_, (lower, upper, diag_r, diag_t) = output
        ctx.save_for_backward(q, square, diag_tilde, lower, upper, diag_r, diag_t)

    @staticmethod
    def backward(
        ctx, grad_encoder: Tensor, grad_decoder: Tensor, grad_diagonal: Tensor, _: None
    ) -> tuple[Tensor | None, ...]:
        q, square, diag_tilde, lower, upper, diag_r, diag_t = ctx.saved_tensors
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(
                _shared_projections_reference, (q, square, diag_tilde),
                (grad_encoder, grad_decoder, grad_diagonal), ctx.needs_input_grad,
            )
        need_q, need_square, need_diag_tilde = ctx.needs_input_grad
        stack_of_one = _is_stack_of_one(q)
        if stack_of_one:
            q, grad_encoder, grad_decoder, grad_diagonal = (
                tensor[0] for tensor in (q, grad_encoder, grad_decoder, grad_diagonal)
            )
        addmm = _addmm(q)
        grad_q_r = grad_decoder.mT
        grad_q = grad_square = grad_diag_tilde = None
        if need_q:  # E = Q R~^T and Q R: Q gets g_E R~ + g_QR R^T
            grad_q = addmm(grad_encoder * diag_t.unsqueeze(-2), grad_encoder, lower.mT)
            grad_q = addmm(grad_q, grad_q_r, upper.mT).addcmul_(grad_q_r, diag_r.unsqueeze(-2))
        if need_square or need_diag_tilde:
            grad_r_tilde_t = q.mT @ grad_encoder  # with respect to R~^T
            grad_r = q.mT @ grad_q_r
            grad_diag_r = torch.addcmul(grad_r.diagonal(dim1=-2, dim2=-1), grad_diagonal, diag_t)
            grad_diag_t = torch.addcmul(
                grad_r_tilde_t.diagonal(dim1=-2, dim2=-1), grad_diagonal, diag_r
            )
            grad_square = grad_r_tilde_t.tril_(-1).add_(grad_r.triu(1))
            grad_square.diagonal(dim1=-2, dim2=-1).copy_(grad_diag_r * (1 - diag_r.square()))
            grad_diag_tilde = grad_diag_t * (1 - diag_t.square())
        grads = grad_q, grad_square, grad_diag_tilde
        if stack_of_one:
            return tuple(None if grad is None else grad.unsqueeze(0) for grad in grads)
        return grads


def _shared_projections_reference(
    q: Tensor, square: Tensor, diag_tilde: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The map of :class:`_SharedProjections` in plain torch (no in-place operations),
    differentiable to any order and under ``torch.func`` transforms: ``(E, F, d)`` of shapes
    (..., D, M), (..., M, D) and (..., M) from ``q`` (..., D, M), ``square`` (..., M, M) and
    ``diag_tilde`` (..., M)."""
    r, r_tilde = _triangular_factors(square, diag_tilde)
    diagonal = r.diagonal(dim1=-2, dim2=-1) * r_tilde.diagonal(dim1=-2, dim2=-1)
    return q @ r_tilde.mT, (q @ r).mT, diagonal


def _shared_projections(
    q: Tensor, square: Tensor, diag_tilde: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(E, F, d)`` of a stack of flows (:class:`_SharedProjections`), fused, or by the
    reference under ``torch.func`` transforms and forward-mode AD."""
    if needs_reference(q, square, diag_tilde):
        return _shared_projections_reference(q, square, diag_tilde)
    encoders, decoders, diagonals, _ = _SharedProjections.apply(q, square, diag_tilde)
    return encoders, decoders, diagonals


class _Factors:
    """:math:`Q, R, \\tilde R, \\mathbf{b}` of one flow, with the maps the transform needs."""

    def __init__(self, basis: _Basis, r: Tensor, r_tilde: Tensor, bias: Tensor) -> None:
        self.basis = basis
        self.r = r
        self.r_tilde = r_tilde
        self.bias = bias
        self.diagonal = r.diagonal(dim1=-2, dim2=-1) * r_tilde.diagonal(dim1=-2, dim2=-1)
        self.fused = not basis.batched and r.dim() == r_tilde.dim() == 2 and bias.dim() == 1
        if self.fused:
            # Shared parameters: multiply out Q once, so that a call costs two GEMMs whatever Q
            # is. Per-data-point factors are applied one after another instead, which never
            # forms a (D, M) or (D, D) matrix per data point.
            # Rows z give (R~ Q^T z)^T = z Q R~^T and rows a give (Q R a)^T = a R^T Q^T.
            encoder, q_r = basis.lmul(torch.cat([r_tilde.mT, r], dim=-1)).split(r.shape[-1], -1)
            self.encoder, self.decoder = encoder, q_r.mT  # (D, M), (M, D)

    def q(self) -> Tensor:
        """:math:`Q` as a matrix (..., D, M)."""
        bias = self.bias
        return self.basis.lmul(torch.eye(bias.shape[-1], dtype=bias.dtype, device=bias.device))

    def preactivation(self, z: Tensor) -> Tensor:
        """:math:`\\tilde R Q^T \\mathbf{z} + \\mathbf{b}`."""
        if self.fused:
            return z @ self.encoder + self.bias
        return _matvec(self.r_tilde, self.basis.rmatvec(z)) + self.bias

    def update(self, activation: Tensor) -> Tensor:
        """:math:`Q R \\mathbf{a}`."""
        if self.fused:
            return activation @ self.decoder
        return self.basis.matvec(_matvec(self.r, activation))

    def apply(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`\\mathbf{z} + Q R h(\\tilde R Q^T \\mathbf{z} + \\mathbf{b})` and its
        log-determinant."""
        if self.fused:
            return _sylvester_rows(
                z, *(t.unsqueeze(0) for t in (self.encoder, self.bias, self.decoder,
                                               self.diagonal))
            )
        activation, slope = _tanh_and_slope(2 * self.preactivation(z))
        return z + self.update(activation), self.log_abs_det(slope)

    def log_abs_det_at(self, z: Tensor) -> Tensor:
        """The log-determinant at ``z``, without the flow's output."""
        return self.log_abs_det(_tanh_and_slope(2 * self.preactivation(z))[1])

    def inverse(self, y: Tensor, tol: float | None, max_iter: int) -> tuple[Tensor, Tensor]:
        """The preimage of ``y`` (module documentation) and the log-determinant there."""
        activation = self.solve_activation(self.basis.rmatvec(y), tol, max_iter)
        return y - self.update(activation), self.log_abs_det(1 - activation.square())

    def log_abs_det(self, slope: Tensor) -> Tensor:
        """:math:`\\sum_i \\log(1 + h'_i R_{ii} \\tilde R_{ii})` from the slopes
        :math:`h' = 1 - h^2` of the activation; the argument of the logarithm is positive, as
        :math:`\\lvert R_{ii} \\tilde R_{ii} \\rvert < 1`."""
        return _log1p(slope * self.diagonal).sum(-1)

    def solve_activation(self, c: Tensor, tol: float | None, max_iter: int) -> Tensor:
        """:math:`h(\\tilde R \\mathbf{v} + \\mathbf{b})` at the root of
        :math:`\\mathbf{v} + R h(\\tilde R \\mathbf{v} + \\mathbf{b}) = \\mathbf{c}`, by
        back substitution (module documentation)."""
        r, r_tilde, bias = self.r, self.r_tilde, self.bias
        tol = math.sqrt(torch.finfo(c.dtype).eps) if tol is None else tol
        with torch.no_grad():
            v = c.new_zeros(torch.broadcast_shapes(c.shape, bias.shape))
            activation = torch.zeros_like(v)
            for i in reversed(range(v.shape[-1])):  # row i involves v_i, ..., v_M only
                later = slice(i + 1, None)
                shift = bias[..., i] + (r_tilde[..., i, later] * v[..., later]).sum(-1)
                target = c[..., i] - (r[..., i, later] * activation[..., later]).sum(-1)
                v[..., i], activation[..., i] = _solve_monotone(
                    r[..., i, i], r_tilde[..., i, i], shift, target, tol, max_iter
                )
            if not any(t.requires_grad for t in (c, r, r_tilde, bias)):
                return activation
        # Implicit differentiation: two Newton steps from the root v0 (a constant), with the
        # triangular J = I + R diag(h') R~ a function of the parameters, differ from the root
        # v(c, R, R~, b) by O(|v0 - v|^4) (each step squares the error), so their first three
        # derivatives are the root's; one step, or steps with a constant J, would leave the
        # second derivatives (a Hessian through the inverse) wrong. The value stays v0.
        eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
        newton = v
        for _ in range(2):
            activation = torch.tanh(_matvec(r_tilde, newton) + bias)
            g = newton + _matvec(r, activation) - c
            jacobian = eye + (r * (1 - activation.square()).unsqueeze(-2)) @ r_tilde
            newton = newton - torch.linalg.solve_triangular(
                jacobian, g.unsqueeze(-1), upper=True
            )[..., 0]
        return torch.tanh(_matvec(r_tilde, v + (newton - newton.detach())) + bias)


class _AmortizedFactors(_Factors):
    """The factors of one flow from the free parameters of :func:`_triangular_factors` with a
    batch shape (amortized flows), kept in those parts: with :math:`U` and :math:`L` the
    strict upper and lower triangles of ``square`` and :math:`d, \\tilde d` the two tanh
    diagonals, :math:`R \\mathbf{a} = U \\mathbf{a} + d \\odot \\mathbf{a}` and
    :math:`\\tilde R \\mathbf{v} = L^T \\mathbf{v} + \\tilde d \\odot \\mathbf{v}`.
    :math:`R` and :math:`\\tilde R` are formed as matrices only for the inverse: forming
    them (a diagonal scatter each) and taking their diagonals back out cost passes over the
    (..., M, M) factors in each direction of every training step."""

    fused = False

    def __init__(self, basis: _Basis, square: Tensor, diag_tilde: Tensor, bias: Tensor) -> None:
        self.basis = basis
        self.bias = bias
        self.upper = square.triu(1)
        self.lower = square.tril(-1)
        self.diag_r = torch.tanh(square.diagonal(dim1=-2, dim2=-1))
        self.diag_r_tilde = torch.tanh(diag_tilde)
        self.diagonal = self.diag_r * self.diag_r_tilde

    @functools.cached_property
    def r(self) -> Tensor:
        """:math:`R` (..., M, M), for the inverse."""
        return torch.diagonal_scatter(self.upper, self.diag_r, dim1=-2, dim2=-1)

    @functools.cached_property
    def r_tilde(self) -> Tensor:
        """:math:`\\tilde R` (..., M, M), for the inverse."""
        return torch.diagonal_scatter(self.lower.mT, self.diag_r_tilde, dim1=-2, dim2=-1)

    def preactivation(self, z: Tensor) -> Tensor:
        v = self.basis.rmatvec(z)
        lower_t_v = torch.einsum("...ji,...j->...i", self.lower, v)
        return torch.addcmul(lower_t_v + self.bias, self.diag_r_tilde, v)

    def update(self, activation: Tensor) -> Tensor:
        r_a = torch.addcmul(_matvec(self.upper, activation), self.diag_r, activation)
        return self.basis.matvec(r_a)


class _FlowSequence:
    """Flows with given (e.g. per-data-point) factors, :class:`_Factors`, applied one after
    another, first flow first; the inverse runs them in reverse order."""

    def __init__(self, flows: Sequence[_Factors]) -> None:
        self.flows = list(flows)

    def q(self) -> Tensor:
        """:math:`Q` of every flow as matrices, ``(..., K, D, M)``."""
        return torch.stack([flow.q() for flow in self.flows], dim=-3)

    def apply(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = None
        for flow in self.flows:
            z, term = flow.apply(z)
            log_det = term if log_det is None else log_det + term
        return z, log_det

    def log_abs_det_at(self, z: Tensor) -> Tensor:
        if len(self.flows) == 1:
            return self.flows[0].log_abs_det_at(z)
        return self.apply(z)[1]

    def inverse(self, y: Tensor, tol: float | None, max_iter: int) -> tuple[Tensor, Tensor]:
        log_det = None
        for flow in reversed(self.flows):
            y, term = flow.inverse(y, tol, max_iter)
            log_det = term if log_det is None else log_det + term
        return y, log_det


class _StackedFactors:
    """The factors of a stack of K flows with global parameters: :math:`Q` (K, D, M) as a
    matrix, the free parameters of :func:`_triangular_factors` (K, M, M) and (K, M), and the
    biases (K, M). :math:`E, F, d` of all flows come from one call of
    :class:`_SharedProjections`, and the flows run as one node, :class:`_SylvesterRows`; the
    inverse takes the flows' :class:`_Factors` one by one, in reverse order."""

    def __init__(self, q: Tensor, square: Tensor, diag_tilde: Tensor, bias: Tensor) -> None:
        self.q_matrix = q
        self.bias = bias
        self._free = (square, diag_tilde)
        self.encoders, self.decoders, self.diagonals = _shared_projections(q, square, diag_tilde)

    def q(self) -> Tensor:
        return self.q_matrix

    def apply(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return _sylvester_rows(z, self.encoders, self.bias, self.decoders, self.diagonals)

    def log_abs_det_at(self, z: Tensor) -> Tensor:
        return self.apply(z)[1]

    def inverse(self, y: Tensor, tol: float | None, max_iter: int) -> tuple[Tensor, Tensor]:
        r, r_tilde = _triangular_factors(*self._free)
        flows = zip(self.q_matrix, r, r_tilde, self.bias, strict=True)
        return _FlowSequence(
            [_Factors(_DenseBasis(q), *triangles_and_bias) for q, *triangles_and_bias in flows]
        ).inverse(y, tol, max_iter)


class _SylvesterTransform(Transform):
    """The transform given :math:`Q, R, \\tilde R, \\mathbf{b}`; subclasses supply them
    through :meth:`_factors`."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1  # det J > 0 (module documentation)

    def __init__(self, inverse_tol: float | None, inverse_max_iter: int) -> None:
        super().__init__(cache_size=1)
        _check_positive(inverse_max_iter=inverse_max_iter)
        self.inverse_tol = inverse_tol
        self.inverse_max_iter = inverse_max_iter
        self._cached_ladj: tuple[Tensor | None, Tensor | None, Tensor | None] = (None,) * 3

    def _factors(self) -> _FlowSequence | _StackedFactors:
        raise NotImplementedError

    def q(self) -> Tensor:
        """The matrices :math:`Q` (orthonormal columns) of the :math:`K` flows, shape
        ``(..., K, D, M)``."""
        return self._factors().q()

    def _call(self, x: Tensor) -> Tensor:
        y, log_det = self._factors().apply(x)
        self._cached_ladj = (x, y, log_det)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, log_det = self._factors().inverse(y, self.inverse_tol, self.inverse_max_iter)
        self._cached_ladj = (x, y, log_det)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """:math:`\\log \\lvert \\det \\partial \\mathbf{y} / \\partial \\mathbf{x} \\rvert`
        of the whole stack, shape ``(...)``; taken from the last forward or inverse call when
        ``(x, y)`` is that call's pair, else computed from ``x``."""
        x_old, y_old, ladj = self._cached_ladj
        if x is x_old and y is y_old:
            return ladj
        return self._factors().log_abs_det_at(x)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_abs_det_jacobian(x, y))`` from a single evaluation."""
        y = self(x)
        return y, self.log_abs_det_jacobian(x, y)


def _check_positive(**values: int) -> None:
    """ValueError naming the first of ``values`` (integers) that is not at least 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _bottleneck(input_dim: int, bottleneck: int | None) -> int:
    """:math:`M` of the orthogonal Sylvester flow: ``bottleneck``, by default ``min(32, D)``."""
    bottleneck = min(32, input_dim) if bottleneck is None else bottleneck
    if not 1 <= bottleneck <= input_dim:
        raise ValueError(f"bottleneck must be in [1, {input_dim}], got {bottleneck}")
    return bottleneck


def _stack_size(r: Tensor, r_tilde: Tensor, bias: Tensor, **q_factors: Tensor) -> int:
    """The number of flows :math:`K` of given factors: ``r`` and ``r_tilde`` (..., K, M, M),
    ``bias`` (..., K, M) and the tensors of Q (..., K, *, *); ValueError otherwise."""
    matrices = {"r": r, "r_tilde": r_tilde, **q_factors}
    for name, tensor, min_dim, shape in [
        *((name, tensor, 3, "(..., K, *, *)") for name, tensor in matrices.items()),
        ("bias", bias, 2, "(..., K, M)"),
    ]:
        if tensor.dim() < min_dim:
            raise ValueError(
                f"{name} must have a flow dimension, shape {shape}; got {tuple(tensor.shape)}"
            )
    sizes = {name: tensor.shape[-3] for name, tensor in matrices.items()}
    sizes["bias"] = bias.shape[-2]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the factors must have one number of flows K, got {sizes}")
    return r.shape[-3]


class _ConditionedSylvester(_SylvesterTransform):
    """A stack of flows with given factors (flow dimension -3 of the matrices, -2 of the
    bias) and one :class:`_Basis` per flow. Each flow's factors are taken and triangularised
    from their own slices: per-data-point tensors of the whole stack are K times the size of
    one flow's, and on the CPU each such temporary comes from fresh memory (a page fault per
    page) where a flow's-worth is reused by the allocator."""

    def __init__(
        self,
        r: Tensor,
        r_tilde: Tensor,
        bias: Tensor,
        bases: Sequence[_Basis],
        inverse_tol: float | None,
        inverse_max_iter: int,
    ) -> None:
        super().__init__(inverse_tol, inverse_max_iter)
        factors = zip(bases, r.unbind(-3), r_tilde.unbind(-3), bias.unbind(-2), strict=True)
        self._sequence = _FlowSequence([
            _Factors(basis, r_k.triu(), r_tilde_k.triu(), bias_k)
            for basis, r_k, r_tilde_k, bias_k in factors
        ])

    @classmethod
    def _of_flows(
        cls,
        flows: Sequence[_Factors],
        inverse_tol: float | None,
        inverse_max_iter: int,
        **attributes: object,
    ) -> _ConditionedSylvester:
        """An instance around flows already built, whose factors need no triangularising (as
        :meth:`_ConditionalSylvester.condition` builds them), with the public ``attributes``
        that the constructor would have set."""
        transform = cls.__new__(cls)
        _SylvesterTransform.__init__(transform, inverse_tol, inverse_max_iter)
        transform._sequence = _FlowSequence(flows)
        for name, value in attributes.items():
            setattr(transform, name, value)
        return transform

    def _factors(self) -> _FlowSequence:
        return self._sequence


class ConditionedOrthogonalSylvester(_ConditionedSylvester):
    r"""A stack of :math:`K` orthogonal Sylvester flows (O-SNF [1]) with given (e.g.
    per-data-point) factors; flow :math:`k` maps

    .. math::

        \mathbf{z} \mapsto \mathbf{z} + Q_k R_k \tanh(\tilde R_k Q_k^T \mathbf{z} + \mathbf{b}_k),

    the first flow first, and the log-determinant is the sum of the flows' (module notes).
    This is what :meth:`ConditionalOrthogonalSylvester.condition` returns. Every tensor carries
    the flow dimension :math:`K` (also for :math:`K = 1`) and may carry a batch shape that
    broadcasts against the inputs'.

    :param r: :math:`R_k`; only the upper triangle is read, its diagonal in (-1, 1).
    :type r: torch.Tensor of shape ``(..., K, M, M)``
    :param r_tilde: :math:`\tilde R_k`; only the upper triangle is read, its diagonal in
        (-1, 1).
    :type r_tilde: torch.Tensor of shape ``(..., K, M, M)``
    :param bias: :math:`\mathbf{b}_k`.
    :type bias: torch.Tensor of shape ``(..., K, M)``
    :param q: :math:`Q_k`, with orthonormal columns.
    :type q: torch.Tensor of shape ``(..., K, D, M)``
    :param inverse_tol: the Newton tolerance of the inverse (module notes); ``None``: the
        square root of the machine epsilon of the input's dtype.
    :type inverse_tol: float or None
    :param inverse_max_iter: the most Newton steps per row of the inverse; a warning is issued
        if exceeded.
    :type inverse_max_iter: int
    :raises ValueError: if a tensor lacks the flow dimension, the tensors disagree on
        :math:`K`, or ``inverse_max_iter`` is less than 1.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        r: Tensor,
        r_tilde: Tensor,
        bias: Tensor,
        q: Tensor,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        _stack_size(r, r_tilde, bias, q=q)
        bases = [_DenseBasis(q_k) for q_k in q.unbind(-3)]
        super().__init__(r, r_tilde, bias, bases, inverse_tol, inverse_max_iter)


class ConditionedHouseholderSylvester(_ConditionedSylvester):
    r"""A stack of :math:`K` Householder Sylvester flows (H-SNF [1]) with given (e.g.
    per-data-point) factors: the flows of :class:`ConditionedOrthogonalSylvester` with
    :math:`M = D` and :math:`Q_k = H_{k,1} \cdots H_{k,L}`, a product of :math:`L` Householder
    reflections. Per-data-point vectors are applied one reflection after another, shared ones
    in the compact form of :mod:`pyro_dgm.transforms.householder`. This is what
    :meth:`ConditionalHouseholderSylvester.condition` returns.

    :param r: :math:`R_k`; only the upper triangle is read, its diagonal in (-1, 1).
    :type r: torch.Tensor of shape ``(..., K, D, D)``
    :param r_tilde: :math:`\tilde R_k`; only the upper triangle is read, its diagonal in
        (-1, 1).
    :type r_tilde: torch.Tensor of shape ``(..., K, D, D)``
    :param bias: :math:`\mathbf{b}_k`.
    :type bias: torch.Tensor of shape ``(..., K, D)``
    :param householder_vectors: the reflection vectors of each :math:`Q_k` as rows,
        unnormalised and nonzero (:math:`L` = ``num_reflections`` of them).
    :type householder_vectors: torch.Tensor of shape ``(..., K, L, D)``
    :param inverse_tol: as in :class:`ConditionedOrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`ConditionedOrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: if a tensor lacks the flow dimension, the tensors disagree on
        :math:`K`, or ``inverse_max_iter`` is less than 1.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        r: Tensor,
        r_tilde: Tensor,
        bias: Tensor,
        householder_vectors: Tensor,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        _stack_size(r, r_tilde, bias, householder_vectors=householder_vectors)
        bases = [_householder_product(vectors) for vectors in householder_vectors.unbind(-3)]
        super().__init__(r, r_tilde, bias, bases, inverse_tol, inverse_max_iter)


class ConditionedTriangularSylvester(_ConditionedSylvester):
    r"""A stack of :math:`K` triangular Sylvester flows (T-SNF [1]) with given (e.g.
    per-data-point) factors: the flows of :class:`ConditionedOrthogonalSylvester` with
    :math:`M = D` and :math:`Q_k` the identity or the reversal permutation, alternating along
    the stack (from the reversal if ``permute``). This is what
    :meth:`ConditionalTriangularSylvester.condition` returns.

    :param r: :math:`R_k`; only the upper triangle is read, its diagonal in (-1, 1).
    :type r: torch.Tensor of shape ``(..., K, D, D)``
    :param r_tilde: :math:`\tilde R_k`; only the upper triangle is read, its diagonal in
        (-1, 1).
    :type r_tilde: torch.Tensor of shape ``(..., K, D, D)``
    :param bias: :math:`\mathbf{b}_k`.
    :type bias: torch.Tensor of shape ``(..., K, D)``
    :param permute: :math:`Q_1` is the reversal permutation instead of the identity.
    :type permute: bool
    :param inverse_tol: as in :class:`ConditionedOrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`ConditionedOrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: if a tensor lacks the flow dimension, the tensors disagree on
        :math:`K`, or ``inverse_max_iter`` is less than 1.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        r: Tensor,
        r_tilde: Tensor,
        bias: Tensor,
        permute: bool = False,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        num_flows = _stack_size(r, r_tilde, bias)
        bases = [_PermutationBasis(bool((k + permute) % 2)) for k in range(num_flows)]
        super().__init__(r, r_tilde, bias, bases, inverse_tol, inverse_max_iter)
        self.permute = permute


class _Sylvester(_SylvesterTransform, TransformModule):
    """A stack of ``num_flows`` flows with global parameters: the free parameters of
    :math:`R, \\tilde R` and the biases here, :math:`Q` (K, D, M) from the subclass's
    :meth:`_q`, all flows as one :class:`_StackedFactors`."""

    def __init__(
        self,
        input_dim: int,
        num_flows: int,
        bottleneck: int,
        inverse_tol: float | None,
        inverse_max_iter: int,
    ) -> None:
        super().__init__(inverse_tol, inverse_max_iter)
        _check_positive(num_flows=num_flows)
        self.input_dim = input_dim
        self.num_flows = num_flows
        self.bottleneck = bottleneck
        self.triangular = nn.Parameter(torch.empty(num_flows, bottleneck, bottleneck))
        self.diag_tilde = nn.Parameter(torch.empty(num_flows, bottleneck))
        self.bias = nn.Parameter(torch.empty(num_flows, bottleneck))

    def reset_parameters(self) -> None:
        """Near the identity map: small triangular factors and bias (subclasses add
        :math:`Q`'s parameters)."""
        for parameter in (self.triangular, self.diag_tilde, self.bias):
            nn.init.uniform_(parameter, -0.01, 0.01)

    def _q(self) -> Tensor:
        raise NotImplementedError

    def _factors(self) -> _StackedFactors:
        return _StackedFactors(self._q(), self.triangular, self.diag_tilde, self.bias)


class OrthogonalSylvester(_Sylvester):
    r"""Orthogonal Sylvester normalizing flow (O-SNF [1]) with learnable global parameters, or
    a stack of ``num_flows`` of them.

    .. math::

        \mathbf{y} = \mathbf{x} + Q R \tanh(\tilde R Q^T \mathbf{x} + \mathbf{b}), \qquad
        \log \lvert \det J \rvert = \sum_{i=1}^M \log\bigl(1 + \tanh'\bigl((\tilde R Q^T
        \mathbf{x} + \mathbf{b})_i\bigr) R_{ii} \tilde R_{ii}\bigr),

    with :math:`Q \in \mathbb{R}^{D \times M}` having orthonormal columns (a free matrix,
    divided by :math:`\lVert Q^T Q \rVert_F^{1/2}` so that all singular values lie in (0, 1],
    then ``orthogonalization_steps`` iterations of
    :math:`Q \leftarrow Q (I + \tfrac12 (I - Q^T Q))` [2]),
    :math:`R, \tilde R \in \mathbb{R}^{M \times M}` upper triangular with diagonals in
    :math:`(-1, 1)` (``tanh`` of free parameters, so the flow is invertible) and
    :math:`\mathbf{b} \in \mathbb{R}^M`.

    **Stacks.** With ``num_flows`` :math:`= K > 1` the module is the composition
    :math:`f_K \circ \cdots \circ f_1` of :math:`K` such flows, each with parameters of its
    own (every parameter has a leading dimension :math:`K`, also for :math:`K = 1`), and
    :math:`\log \lvert \det J \rvert` is the sum of theirs: the same map as :math:`K` modules
    of one flow, computed faster (the factors of all flows in one batched pass, the flows as
    one autograd node). The same holds for :class:`HouseholderSylvester` and
    :class:`TriangularSylvester`.

    The log-determinant is exact at any parameter values and is returned by the forward pass
    without recomputation (:meth:`call_and_ladj`, or :meth:`log_abs_det_jacobian` on the cached
    pair). The inverse accepts any point, not only cached forward outputs: it solves an
    :math:`M`-dimensional triangular system by back substitution, each row by Newton's method
    from a start from which it provably converges (module notes); it is differentiable, with
    implicit-function derivatives. Inputs may have any batch shape ``(..., D)``.

    Example::

        base = dist.Normal(torch.zeros(10), torch.ones(10)).to_event(1)
        flow = dist.TransformedDistribution(base, [OrthogonalSylvester(10, num_flows=4)])
        z = flow.rsample((128,))
        log_q = flow.log_prob(z)  # the cached inverse and log-determinants
        log_q_new = flow.log_prob(torch.randn(5, 10))  # any point: the solved inverse

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param num_flows: :math:`K`, the number of flows in the stack.
    :type num_flows: int
    :param bottleneck: :math:`M`; defaults to ``min(32, D)``.
    :type bottleneck: int or None
    :param orthogonalization_steps: iterations of the orthogonalisation of :math:`Q`. The
        log-determinant and the inverse are exact to the extent that :math:`Q^T Q = I`; each
        singular value moves as :math:`\sigma \mapsto \sigma (3 - \sigma^2) / 2`, and about
        :math:`\log_{1.5}(\sigma_{\max} / \sigma_{\min}) + 5` steps reach machine precision,
        so the default 30 does unless the free matrix's condition number exceeds about
        :math:`10^4`.
    :type orthogonalization_steps: int
    :param inverse_tol: the inverse's Newton iterations (one per row of the triangular system)
        stop once every step is at most ``inverse_tol * (1 + |v|)``, which leaves an error of
        about the square of that. Defaults to the square root of the machine epsilon of the
        input's dtype. The stop is data-dependent (a host synchronisation per step), which is
        acceptable for the inverse: it is not part of a training step's forward pass.
    :type inverse_tol: float or None
    :param inverse_max_iter: the most Newton steps per row (7 to 22 were taken in stress tests,
        with diagonal products rounding to :math:`\pm 1`); a warning is issued if exceeded.
    :type inverse_max_iter: int
    :raises ValueError: for a ``bottleneck`` outside :math:`[1, D]`, or a ``num_flows``,
        ``orthogonalization_steps`` or ``inverse_max_iter`` less than 1.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    2. Å. Björck, C. Bowie, "An iterative algorithm for computing the best estimate of an
       orthogonal matrix", SIAM J. Numer. Anal. 8 (1971).
    """

    def __init__(
        self,
        input_dim: int,
        num_flows: int = 1,
        bottleneck: int | None = None,
        orthogonalization_steps: int = 30,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        bottleneck = _bottleneck(input_dim, bottleneck)
        _check_positive(orthogonalization_steps=orthogonalization_steps)
        super().__init__(input_dim, num_flows, bottleneck, inverse_tol, inverse_max_iter)
        self.orthogonalization_steps = orthogonalization_steps
        self.q_free = nn.Parameter(torch.empty(num_flows, input_dim, bottleneck))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near the identity map, with :math:`Q` orthonormal."""
        super().reset_parameters()
        for q_free in self.q_free:
            nn.init.orthogonal_(q_free)

    def _q(self) -> Tensor:
        return _orthogonalize(self.q_free, self.orthogonalization_steps)


class HouseholderSylvester(_Sylvester):
    r"""Householder Sylvester normalizing flow (H-SNF [1]) with learnable global parameters,
    or a stack of ``num_flows`` of them: the flow of :class:`OrthogonalSylvester` with
    :math:`M = D` and :math:`Q = H_1 \cdots H_L`, a product of :math:`L` =
    ``num_reflections`` Householder reflections
    :math:`H_l = I - 2 \mathbf{v}_l \mathbf{v}_l^T / \lVert \mathbf{v}_l \rVert^2`, orthogonal
    by construction; the vectors are the parameter ``householder_vectors``, of shape
    ``(num_flows, num_reflections, D)``.

    Example::

        flows = HouseholderSylvester(10, num_flows=4, num_reflections=8)
        y, log_det = flows.call_and_ladj(torch.randn(128, 10))  # (128, 10), (128,)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param num_flows: :math:`K`, the number of flows in the stack.
    :type num_flows: int
    :param num_reflections: :math:`L`, the number of reflections making up each flow's
        :math:`Q` (a count inside one flow, not a number of flows).
    :type num_reflections: int
    :param inverse_tol: as in :class:`OrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`OrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: for a ``num_flows``, ``num_reflections`` or ``inverse_max_iter`` less
        than 1.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        input_dim: int,
        num_flows: int = 1,
        num_reflections: int = 8,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        _check_positive(num_reflections=num_reflections)
        super().__init__(input_dim, num_flows, input_dim, inverse_tol, inverse_max_iter)
        self.num_reflections = num_reflections
        self.householder_vectors = nn.Parameter(
            torch.empty(num_flows, num_reflections, input_dim)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near the identity map, with :math:`Q` from random reflections."""
        super().reset_parameters()
        bound = 1.0 / math.sqrt(self.input_dim)
        nn.init.uniform_(self.householder_vectors, -bound, bound)

    def _q(self) -> Tensor:
        return _householder_matrix(self.householder_vectors)


class TriangularSylvester(_Sylvester):
    r"""Triangular Sylvester normalizing flow (T-SNF [1]) with learnable global parameters, or
    a stack of ``num_flows`` of them: the flow of :class:`OrthogonalSylvester` with
    :math:`M = D` and :math:`Q` the identity or the reversal permutation, alternating along
    the stack as in [1] (from the reversal if ``permute``).

    Example::

        flows = TriangularSylvester(10, num_flows=4)
        y, log_det = flows.call_and_ladj(torch.randn(128, 10))  # (128, 10), (128,)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param num_flows: :math:`K`, the number of flows in the stack.
    :type num_flows: int
    :param permute: :math:`Q` of the first flow is the reversal permutation instead of the
        identity.
    :type permute: bool
    :param inverse_tol: as in :class:`OrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`OrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: for a ``num_flows`` or ``inverse_max_iter`` less than 1.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        input_dim: int,
        num_flows: int = 1,
        permute: bool = False,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        super().__init__(input_dim, num_flows, input_dim, inverse_tol, inverse_max_iter)
        self.permute = permute
        eye = torch.eye(input_dim)  # a buffer: it moves with the module
        permutations = [eye.flip(0) if (k + permute) % 2 else eye for k in range(num_flows)]
        self.register_buffer("permutations", torch.stack(permutations), persistent=False)
        self.reset_parameters()

    def _q(self) -> Tensor:
        return self.permutations


def _param_shapes(
    num_flows: int, rank: int, q_shape: tuple[int, ...] | None
) -> list[tuple[int, ...]]:
    """Shapes of the free parameters of ``num_flows`` amortized flows, in the order of the
    hypernetwork's outputs: squares (K, M, M), diagonals of R~ (K, M), biases (K, M), and
    Q's parameters (K, *q_shape) if any."""
    shapes = [(num_flows, rank, rank), (num_flows, rank), (num_flows, rank)]
    return shapes if q_shape is None else [*shapes, (num_flows, *q_shape)]


class _LinearHeads(nn.Module):
    """The linear map from the context to all the parameters of ``num_flows`` flows, as in
    [1], as a tuple of tensors of sizes ``param_dims`` (as :class:`~pyro.nn.DenseNN` returns
    them: group :math:`g` holds its block for each flow, the first flow's first), and as one
    tensor of their total size by :meth:`linear`.

    The map is held as one :class:`~torch.nn.Linear` per group and flow, ``heads[g][k]``: a
    single matrix for all of them has :math:`K` times the size (60 to 90 MB for 16 flows on
    :math:`D = 64` from 300 features), and on the CPU its gradient and an optimizer's
    temporaries of that size are fresh memory at every step (a page fault per page), where a
    flow's blocks are reused by the allocator. State dicts with the single matrix
    (``linear.weight``, ``linear.bias``) load into the blocks.
    """

    def __init__(self, context_dim: int, param_dims: Sequence[int], num_flows: int) -> None:
        super().__init__()
        self.param_dims = list(param_dims)
        self.num_flows = num_flows
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(context_dim, size // num_flows) for _ in range(num_flows))
            for size in self.param_dims
        )
        self.register_load_state_dict_pre_hook(_LinearHeads._split_single_matrix)

    def forward(self, context: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.cat([head(context) for head in group], dim=-1) for group in self.heads)

    def linear(self, context: Tensor) -> Tensor:
        """All the parameters for ``context`` (..., C) as one tensor (..., sum(param_dims))."""
        return torch.cat(self(context), dim=-1)

    def _split_single_matrix(self, state_dict: dict, prefix: str, *_: object) -> None:
        """Rewrite ``linear.weight`` (sum(param_dims), C) and ``linear.bias`` in
        ``state_dict`` as the blocks ``heads.g.k.weight`` and ``heads.g.k.bias``."""
        for name in ("weight", "bias"):
            single = state_dict.pop(f"{prefix}linear.{name}", None)
            if single is None:
                continue
            for g, group in enumerate(single.split(self.param_dims)):
                for k, block in enumerate(group.chunk(self.num_flows)):
                    state_dict[f"{prefix}heads.{g}.{k}.{name}"] = block


def _hypernet(
    context_dim: int, hidden_dims: Sequence[int] | None, param_shapes: list[tuple[int, ...]]
) -> nn.Module:
    """The helpers' network: linear heads (the paper's) without hidden widths, else a
    :class:`~pyro.nn.DenseNN`."""
    param_dims = [math.prod(shape) for shape in param_shapes]
    if hidden_dims:
        return DenseNN(context_dim, list(hidden_dims), param_dims=param_dims)
    return _LinearHeads(context_dim, param_dims, num_flows=param_shapes[0][0])


class _ConditionalSylvester(ConditionalTransformModule):
    """A stack of ``num_flows`` amortized flows: ``nn`` computes the free parameters of all
    of them from the context in one call; each flow's factors are then built from its own
    slices of that output (as :class:`_ConditionedSylvester` explains), with :math:`Q` from
    the subclass's :meth:`_bases`, and the subclass wraps the flows in its conditioned
    transform (:meth:`_conditioned`)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(
        self,
        input_dim: int,
        nn: Callable,
        num_flows: int,
        bottleneck: int,
        q_shape: tuple[int, ...] | None,
        inverse_tol: float | None,
        inverse_max_iter: int,
    ) -> None:
        super().__init__()
        _check_positive(num_flows=num_flows, inverse_max_iter=inverse_max_iter)
        self.input_dim = input_dim
        self.nn = nn
        self.num_flows = num_flows
        self.bottleneck = bottleneck
        self.inverse_tol = inverse_tol
        self.inverse_max_iter = inverse_max_iter
        #: the shapes of the parameter groups ``nn`` computes, in order
        self.param_shapes = _param_shapes(num_flows, bottleneck, q_shape)

    @property
    def param_dims(self) -> list[int]:
        """The sizes of the parameter groups ``nn`` returns, in order."""
        return [math.prod(shape) for shape in self.param_shapes]

    def params(self, context: Tensor) -> list[Tensor]:
        """``nn``'s output for ``context`` (..., C) as tensors of the shapes
        :attr:`param_shapes`, after the batch shape ``(...)``."""
        output = self.nn(context)
        if torch.is_tensor(output):
            output = output.split(self.param_dims, dim=-1)
        if len(output) != len(self.param_shapes):
            raise ValueError(
                f"nn must return {len(self.param_shapes)} tensors of sizes {self.param_dims} "
                f"(or one tensor of their total size), got {len(output)}"
            )
        return [
            group.unflatten(-1, shape)
            for group, shape in zip(output, self.param_shapes, strict=True)
        ]

    def condition(self, context: Tensor) -> _ConditionedSylvester:
        """The stack of flows with the factors for ``context`` of shape ``(*B, C)``."""
        square, diag_tilde, bias, *q_params = self.params(context)
        slices = zip(
            self._bases(*q_params), square.unbind(-3), diag_tilde.unbind(-2), bias.unbind(-2),
            strict=True,
        )
        if square.dim() > 3:  # factors per data point
            return self._conditioned([_AmortizedFactors(*flow) for flow in slices])
        # one context for all inputs: shared factors, multiplied out once (_Factors)
        return self._conditioned([
            _Factors(basis, *_triangular_factors(square_k, diag_tilde_k), bias_k)
            for basis, square_k, diag_tilde_k, bias_k in slices
        ])

    def _bases(self, *q_params: Tensor) -> list[_Basis]:
        """:math:`Q` of each flow from the parameters of :math:`Q` (..., K, *, *), if any."""
        raise NotImplementedError

    def _conditioned(self, flows: list[_Factors]) -> _ConditionedSylvester:
        raise NotImplementedError


class ConditionalOrthogonalSylvester(_ConditionalSylvester):
    r"""Orthogonal Sylvester flows (O-SNF [1]), a stack of ``num_flows``, whose parameters are
    computed from a context (amortized):

    .. math::

        \mathbf{z} \mapsto \mathbf{z} + Q_k R_k \tanh(\tilde R_k Q_k^T \mathbf{z}
        + \mathbf{b}_k), \qquad k = 1, \ldots, K,

    the flows of :class:`OrthogonalSylvester` with every factor, :math:`Q_k` included, a
    function of the context :math:`\mathbf{c}` (in a VAE, the encoder's feature
    :math:`h(\mathbf{x})`), computed by ``nn``. As in the code of [1], one square matrix gives
    the strict triangles of both :math:`R_k` and :math:`\tilde R_k` and, through ``tanh``, the
    diagonal of :math:`R_k`; the diagonal of :math:`\tilde R_k` is ``tanh`` of a vector of its
    own. ``nn``'s outputs, in this order and flattened (their sizes are :attr:`param_dims`):
    the squares ``(K, M, M)``, the diagonals of :math:`\tilde R` ``(K, M)``, the biases
    ``(K, M)`` and the free matrices of :math:`Q` ``(K, D, M)``, orthogonalised per data point
    as in :class:`OrthogonalSylvester`. :func:`conditional_orthogonal_sylvester` builds ``nn``.

    ``condition(context)`` returns a :class:`ConditionedOrthogonalSylvester` whose factors
    have the context's batch shape ``B``; inputs of shape ``(..., *B, D)`` (e.g. ``(S, B, D)``
    for :math:`S` particles) broadcast against it. Per-data-point factors are applied one
    after another, so no :math:`D \times M` product is formed per data point. ``nn`` runs
    once for the whole stack; the factors (the orthogonalisation of :math:`Q_k` included) are
    then built flow by flow from its output, whose per-data-point temporaries for all
    :math:`K` flows at once would be :math:`K` times as large.

    Example::

        flows = conditional_orthogonal_sylvester(10, 64, num_flows=4)
        transform = flows.condition(features)  # features: (B, 64)
        y, log_det = transform.call_and_ladj(x)  # x: (S, B, 10) -> (S, B, 10), (S, B)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param nn: maps a context of shape ``(..., C)`` to a tuple of tensors of shapes
        ``(..., size)`` for the sizes :attr:`param_dims` (as
        ``DenseNN(C, hidden_dims, param_dims)`` does), or to one tensor of their total size.
    :type nn: callable
    :param num_flows: :math:`K`, the number of flows in the stack.
    :type num_flows: int
    :param bottleneck: :math:`M`; defaults to ``min(32, D)``.
    :type bottleneck: int or None
    :param orthogonalization_steps: as in :class:`OrthogonalSylvester`.
    :type orthogonalization_steps: int
    :param inverse_tol: as in :class:`OrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`OrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: for a ``bottleneck`` outside :math:`[1, D]`, or a ``num_flows``,
        ``orthogonalization_steps`` or ``inverse_max_iter`` less than 1; from
        :meth:`condition`, if ``nn`` returns another number of tensors.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        input_dim: int,
        nn: Callable,
        num_flows: int = 1,
        bottleneck: int | None = None,
        orthogonalization_steps: int = 30,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        bottleneck = _bottleneck(input_dim, bottleneck)
        _check_positive(orthogonalization_steps=orthogonalization_steps)
        super().__init__(
            input_dim, nn, num_flows, bottleneck, (input_dim, bottleneck), inverse_tol,
            inverse_max_iter,
        )
        self.orthogonalization_steps = orthogonalization_steps

    def _bases(self, q_free: Tensor) -> list[_Basis]:
        return [
            _DenseBasis(_orthogonalize(q_free_k, self.orthogonalization_steps))
            for q_free_k in q_free.unbind(-3)
        ]

    def _conditioned(self, flows: list[_Factors]) -> ConditionedOrthogonalSylvester:
        return ConditionedOrthogonalSylvester._of_flows(
            flows, self.inverse_tol, self.inverse_max_iter
        )


class ConditionalHouseholderSylvester(_ConditionalSylvester):
    r"""Householder Sylvester flows (H-SNF [1]), a stack of ``num_flows``, whose parameters,
    the reflection vectors of each :math:`Q_k = H_{k,1} \cdots H_{k,L}` included, are computed
    from a context (amortized): the flows of :class:`HouseholderSylvester`, amortized as in
    :class:`ConditionalOrthogonalSylvester`. ``nn``'s outputs, in this order and flattened:
    the squares ``(K, D, D)``, the diagonals of :math:`\tilde R` ``(K, D)``, the biases
    ``(K, D)`` and the reflection vectors ``(K, L, D)``;
    :func:`conditional_householder_sylvester` builds ``nn``. ``condition(context)`` returns a
    :class:`ConditionedHouseholderSylvester`, which applies per-data-point reflections one by
    one (measured against the alternatives in :mod:`pyro_dgm.transforms.householder`).

    Example::

        flows = conditional_householder_sylvester(10, 64, num_flows=4, num_reflections=8)
        y, log_det = flows.condition(features).call_and_ladj(x)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param nn: as in :class:`ConditionalOrthogonalSylvester`, with the outputs above.
    :type nn: callable
    :param num_flows: :math:`K`, the number of flows in the stack.
    :type num_flows: int
    :param num_reflections: :math:`L`, the number of reflections making up each flow's
        :math:`Q` (a count inside one flow, not a number of flows).
    :type num_reflections: int
    :param inverse_tol: as in :class:`OrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`OrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: for a ``num_flows``, ``num_reflections`` or ``inverse_max_iter`` less
        than 1; from :meth:`condition`, if ``nn`` returns another number of tensors.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        input_dim: int,
        nn: Callable,
        num_flows: int = 1,
        num_reflections: int = 8,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        _check_positive(num_reflections=num_reflections)
        super().__init__(
            input_dim, nn, num_flows, input_dim, (num_reflections, input_dim), inverse_tol,
            inverse_max_iter,
        )
        self.num_reflections = num_reflections

    def _bases(self, householder_vectors: Tensor) -> list[_Basis]:
        return [_householder_product(vectors) for vectors in householder_vectors.unbind(-3)]

    def _conditioned(self, flows: list[_Factors]) -> ConditionedHouseholderSylvester:
        return ConditionedHouseholderSylvester._of_flows(
            flows, self.inverse_tol, self.inverse_max_iter
        )


class ConditionalTriangularSylvester(_ConditionalSylvester):
    r"""Triangular Sylvester flows (T-SNF [1]), a stack of ``num_flows``, whose parameters are
    computed from a context (amortized): the flows of :class:`TriangularSylvester` (:math:`Q`
    alternating between the identity and the reversal permutation, from the reversal if
    ``permute``), amortized as in :class:`ConditionalOrthogonalSylvester`. ``nn``'s outputs,
    in this order and flattened: the squares ``(K, D, D)``, the diagonals of :math:`\tilde R`
    ``(K, D)`` and the biases ``(K, D)``; :func:`conditional_triangular_sylvester` builds
    ``nn``. ``condition(context)`` returns a :class:`ConditionedTriangularSylvester`.

    Example::

        flows = conditional_triangular_sylvester(10, 64, num_flows=4)
        y, log_det = flows.condition(features).call_and_ladj(x)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param nn: as in :class:`ConditionalOrthogonalSylvester`, with the outputs above.
    :type nn: callable
    :param num_flows: :math:`K`, the number of flows in the stack.
    :type num_flows: int
    :param permute: :math:`Q` of the first flow is the reversal permutation instead of the
        identity.
    :type permute: bool
    :param inverse_tol: as in :class:`OrthogonalSylvester`.
    :type inverse_tol: float or None
    :param inverse_max_iter: as in :class:`OrthogonalSylvester`.
    :type inverse_max_iter: int
    :raises ValueError: for a ``num_flows`` or ``inverse_max_iter`` less than 1; from
        :meth:`condition`, if ``nn`` returns another number of tensors.

    References:

    1. R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling, "Sylvester Normalizing Flows
       for Variational Inference", UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        input_dim: int,
        nn: Callable,
        num_flows: int = 1,
        permute: bool = False,
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
    ) -> None:
        super().__init__(
            input_dim, nn, num_flows, input_dim, None, inverse_tol, inverse_max_iter
        )
        self.permute = permute

    def _bases(self) -> list[_Basis]:
        return [_PermutationBasis(bool((k + self.permute) % 2)) for k in range(self.num_flows)]

    def _conditioned(self, flows: list[_Factors]) -> ConditionedTriangularSylvester:
        return ConditionedTriangularSylvester._of_flows(
            flows, self.inverse_tol, self.inverse_max_iter, permute=self.permute
        )


def orthogonal_sylvester(
    input_dim: int, num_flows: int = 1, bottleneck: int | None = None, **kwargs
) -> OrthogonalSylvester:
    """Build an :class:`OrthogonalSylvester` stack, in the manner of Pyro's helpers.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param num_flows: the number of flows in the stack.
    :type num_flows: int
    :param bottleneck: :math:`M`; defaults to ``min(32, D)``.
    :type bottleneck: int or None
    :param kwargs: further keyword arguments of :class:`OrthogonalSylvester`.
    """
    return OrthogonalSylvester(input_dim, num_flows, bottleneck, **kwargs)


def householder_sylvester(
    input_dim: int, num_flows: int = 1, num_reflections: int = 8, **kwargs
) -> HouseholderSylvester:
    """Build a :class:`HouseholderSylvester` stack, in the manner of Pyro's helpers.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param num_flows: the number of flows in the stack.
    :type num_flows: int
    :param num_reflections: the number of reflections making up each flow's :math:`Q`.
    :type num_reflections: int
    :param kwargs: further keyword arguments of :class:`HouseholderSylvester`.
    """
    return HouseholderSylvester(input_dim, num_flows, num_reflections, **kwargs)


def triangular_sylvester(
    input_dim: int, num_flows: int = 1, permute: bool = False, **kwargs
) -> TriangularSylvester:
    """Build a :class:`TriangularSylvester` stack, in the manner of Pyro's helpers.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param num_flows: the number of flows in the stack.
    :type num_flows: int
    :param permute: :math:`Q` of the first flow is the reversal permutation.
    :type permute: bool
    :param kwargs: further keyword arguments of :class:`TriangularSylvester`.
    """
    return TriangularSylvester(input_dim, num_flows, permute, **kwargs)


def conditional_orthogonal_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_flows: int = 1,
    bottleneck: int | None = None,
    **kwargs,
) -> ConditionalOrthogonalSylvester:
    """Build a :class:`ConditionalOrthogonalSylvester` stack and its network, in the manner
    of Pyro's helpers.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param context_dim: the context's dimension :math:`C`.
    :type context_dim: int
    :param hidden_dims: hidden widths of a :class:`~pyro.nn.DenseNN` computing the parameters;
        ``None`` or empty (default) maps the context linearly, as in the paper (Pyro's
        helpers default to two hidden layers instead).
    :type hidden_dims: Sequence[int] or None
    :param num_flows: the number of flows in the stack.
    :type num_flows: int
    :param bottleneck: :math:`M`; defaults to ``min(32, D)``.
    :type bottleneck: int or None
    :param kwargs: further keyword arguments of :class:`ConditionalOrthogonalSylvester`.
    """
    _check_positive(num_flows=num_flows)  # before building a network of no outputs
    rank = _bottleneck(input_dim, bottleneck)
    shapes = _param_shapes(num_flows, rank, (input_dim, rank))
    return ConditionalOrthogonalSylvester(
        input_dim, _hypernet(context_dim, hidden_dims, shapes), num_flows, rank, **kwargs
    )


def conditional_householder_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_flows: int = 1,
    num_reflections: int = 8,
    **kwargs,
) -> ConditionalHouseholderSylvester:
    """Build a :class:`ConditionalHouseholderSylvester` stack and its network, in the manner
    of Pyro's helpers.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param context_dim: the context's dimension :math:`C`.
    :type context_dim: int
    :param hidden_dims: as in :func:`conditional_orthogonal_sylvester`.
    :type hidden_dims: Sequence[int] or None
    :param num_flows: the number of flows in the stack.
    :type num_flows: int
    :param num_reflections: the number of reflections making up each flow's :math:`Q`.
    :type num_reflections: int
    :param kwargs: further keyword arguments of :class:`ConditionalHouseholderSylvester`.
    """
    _check_positive(num_flows=num_flows, num_reflections=num_reflections)
    shapes = _param_shapes(num_flows, input_dim, (num_reflections, input_dim))
    return ConditionalHouseholderSylvester(
        input_dim, _hypernet(context_dim, hidden_dims, shapes), num_flows, num_reflections,
        **kwargs,
    )


def conditional_triangular_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    num_flows: int = 1,
    permute: bool = False,
    **kwargs,
) -> ConditionalTriangularSylvester:
    """Build a :class:`ConditionalTriangularSylvester` stack and its network, in the manner
    of Pyro's helpers.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param context_dim: the context's dimension :math:`C`.
    :type context_dim: int
    :param hidden_dims: as in :func:`conditional_orthogonal_sylvester`.
    :type hidden_dims: Sequence[int] or None
    :param num_flows: the number of flows in the stack.
    :type num_flows: int
    :param permute: :math:`Q` of the first flow is the reversal permutation.
    :type permute: bool
    :param kwargs: further keyword arguments of :class:`ConditionalTriangularSylvester`.
    """
    _check_positive(num_flows=num_flows)
    shapes = _param_shapes(num_flows, input_dim, None)
    return ConditionalTriangularSylvester(
        input_dim, _hypernet(context_dim, hidden_dims, shapes), num_flows, permute, **kwargs
    )
