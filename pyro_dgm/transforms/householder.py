r"""Products of Householder reflections, and the volume-preserving Householder flow.

A product of :math:`K` reflections, :math:`Q = H_1 H_2 \cdots H_K` with
:math:`H_k = I - 2 \mathbf{u}_k \mathbf{u}_k^T / \lVert \mathbf{u}_k \rVert^2`, is applied in one
of two ways, whichever is faster for where the vectors come from:

* Shared vectors (global parameters): the compact "UT" form [1, 2]

  .. math::

      Q = I - U T^{-1} U^T, \qquad
      T = \operatorname{triu}(U^T U, 1) + \tfrac{1}{2} \operatorname{diag}(U^T U),

  with :math:`U = [\mathbf{u}_1, \ldots, \mathbf{u}_K] \in \mathbb{R}^{D \times K}`: one
  :math:`K \times K` triangular solve, after which :math:`Q` or :math:`Q^T` acts on a whole batch
  by two :math:`D \times K` GEMMs, instead of :math:`K` rounds of small kernels forward and
  backward.
* Per-data-point vectors (amortized): the reflections one after another, a dot product and a
  fused multiply-add over the batch each: about half the time of the UT form (a batch of small
  triangular solves, which the CPU runs as a loop), and a small fraction of multiplying out a
  :math:`D \times D` matrix per data point as the reference code of the Sylvester flow paper
  does (figures in ``benchmarks/README.md``).

References:

1. C. Puglisi, "Modification of the Householder method based on the compact WY
   representation", SIAM J. Sci. Stat. Comput. 13 (1992).
2. T. Joffrain, T. M. Low, E. S. Quintana-Ortí, R. van de Geijn, F. G. Van Zee, "Accumulating
   Householder transformations, revisited", ACM Trans. Math. Softw. 32 (2006).
3. J. M. Tomczak, M. Welling, "Improving Variational Auto-Encoders using Householder Flow",
   arXiv:1611.09630 (2016).
"""

from __future__ import annotations

__all__ = [
    "ConditionalHouseholder",
    "ConditionedHouseholder",
    "Householder",
    "HouseholderChainNN",
    "conditional_householder",
    "householder",
]

import functools
import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from pyro.nn import DenseNN
from torch import Tensor, nn
from torch.distributions import Transform, constraints
from torch.nn import functional as F

from .._fused import cache_forward_signature, needs_reference, reference_vjp


class _Reflections:
    """:math:`Q = H_1 \\cdots H_K` from reflection vectors ``(..., K, D)`` (rows, unnormalised).

    ``matvec(z)`` is :math:`Q \\mathbf{z}` and ``rmatvec(z)`` is :math:`Q^T \\mathbf{z}` for
    ``z`` of shape ``(..., D)``, broadcasting against the vectors' batch shape without expanding
    them; ``lmul(a)`` is :math:`Q A` for matrices of shape ``(..., D, N)``. This class applies
    the reflections one by one (per-data-point vectors); see :func:`_householder_product`.
    """

    def __init__(self, vectors: Tensor) -> None:
        self.count = vectors.shape[-2]
        self.batched = vectors.dim() > 2
        # Contiguous unit vectors, one tensor (..., D) per reflection: a single unbind in the
        # backward pass, rather than a zero-filled (..., K, D) gradient per indexing.
        self.units = F.normalize(vectors, dim=-1).movedim(-2, 0).contiguous().unbind(0)

    @staticmethod
    def _reflect(z: Tensor, units: Sequence[Tensor]) -> Tensor:
        for u in units:
            z = torch.addcmul(z, torch.linalg.vecdot(z, u).unsqueeze(-1), u, value=-2)
        return z

    def matvec(self, z: Tensor) -> Tensor:
        return self._reflect(z, self.units[::-1])  # H_K first

    def rmatvec(self, z: Tensor) -> Tensor:
        return self._reflect(z, self.units)  # H_1 first

    def lmul(self, a: Tensor) -> Tensor:
        # The columns of a, as rows, against each vector broadcast over them.
        return self._reflect(a.mT, [u.unsqueeze(-2) for u in self.units[::-1]]).mT


class _CompactReflections:
    """:math:`Q = H_1 \\cdots H_K = I - U T^{-1} U^T` for shared vectors ``(K, D)``: one small
    triangular solve, then two GEMMs per application (module documentation)."""

    def __init__(self, vectors: Tensor) -> None:
        self.count = vectors.shape[-2]
        self.batched = False
        self.vectors = vectors  # the rows of U^T

    @functools.cached_property
    def dual(self) -> Tensor:
        """The rows of :math:`T^{-T} U^T`, so that :math:`Q = I - \\mathrm{dual}^T U^T` and
        :math:`Q^T = I - U \\mathrm{dual}`; computed on first use."""
        gram = self.vectors @ self.vectors.mT
        # T, with U^T U's strict lower triangle left in place: the solve reads the upper one only.
        t = torch.diagonal_scatter(gram, 0.5 * gram.diagonal())
        return torch.linalg.solve_triangular(t.mT, self.vectors, upper=False)

    def matvec(self, z: Tensor) -> Tensor:
        return z - (z @ self.vectors.mT) @ self.dual

    def rmatvec(self, z: Tensor) -> Tensor:
        return z - (z @ self.dual.mT) @ self.vectors

    def lmul(self, a: Tensor) -> Tensor:
        return a - self.dual.mT @ (self.vectors @ a)


@cache_forward_signature
class _HouseholderMatrix(torch.autograd.Function):
    """:math:`Q = H_1 \\cdots H_K = I - U T^{-1} U^T` as a (D, D) matrix, from the reflection
    vectors ``(K, D)`` (the rows of :math:`U^T`; module documentation), or a stack of them,
    (S, D, D) from (S, K, D), with a hand-written backward pass; :func:`_householder_matrix` is
    the entry point, and :func:`_householder_matrix_reference` the same map in plain torch.

    Writing :math:`P = T^{-T} U^T` (K, D), so that :math:`Q = I - P^T U^T`, and :math:`G` for
    the incoming gradient with respect to :math:`Q`, the gradient with respect to :math:`U^T` is

    .. math::

        -P G + T^{-1} G_P + (G_T + G_T^T) U^T, \\qquad G_P = -U^T G^T, \\quad
        G_T = \\operatorname{triu}(-P (T^{-1} G_P)^T, 1)
        + \\tfrac12 \\operatorname{diag}(-P (T^{-1} G_P)^T),

    from :math:`T^T P = U^T` and :math:`T = \\operatorname{triu}(U^T U, 1) +
    \\tfrac12 \\operatorname{diag}(U^T U)`: four small GEMMs and one triangular solve, where
    autograd's graph of the Gram matrix, the diagonal scatter and the solve took about twice as
    long (K = 33, D = 64). Higher derivatives come from the reference
    (:func:`pyro_dgm._fused.reference_vjp`). The forward pass also returns the list
    ``[T, P]`` (a non-tensor output) for the backward pass.
    """

    @staticmethod
    def forward(vectors: Tensor) -> tuple[Tensor, list[Tensor]]:
        stack_of_one = _is_stack_of_one(vectors)
        if stack_of_one:
            vectors = vectors[0]
        t = (vectors @ vectors.mT).triu_()
        t.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        dual = torch.linalg.solve_triangular(t.mT, vectors, upper=False)  # P = T^-T U^T
        eye = torch.eye(vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
        q = _addmm(vectors)(eye, dual.mT, vectors, alpha=-1)
        return (q.unsqueeze(0) if stack_of_one else q), [t, dual]

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: tuple[Tensor, list[Tensor]]) -> None:
        (vectors,) = inputs
        _, (t, dual) = output
        ctx.save_for_backward(vectors, t, dual)

    @staticmethod
    def backward(ctx, grad_q: Tensor, _: None) -> Tensor | None:
        vectors, t, dual = ctx.saved_tensors
        if torch.is_grad_enabled():  # a derivative of this gradient is being taken
            return reference_vjp(
                _householder_matrix_reference, (vectors,), (grad_q,), ctx.needs_input_grad
            )[0]
        stack_of_one = _is_stack_of_one(vectors)
        if stack_of_one:
            vectors, grad_q = vectors[0], grad_q[0]
        grad_dual = vectors @ grad_q.mT  # -G_P
        solved = torch.linalg.solve_triangular(t, grad_dual, upper=True)  # -T^-1 G_P
        grad_t = (dual @ solved.mT).triu_()  # G_T (the signs cancel)
        grad_t.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        grad_gram = grad_t + grad_t.mT
        grad = _addmm(vectors)(dual @ grad_q, grad_gram, vectors, alpha=-1).add_(solved).neg_()
        return grad.unsqueeze(0) if stack_of_one else grad


def _householder_matrix_reference(vectors: Tensor) -> Tensor:
    """:math:`I - U T^{-1} U^T` of :class:`_HouseholderMatrix` in plain torch (no in-place
    operations), differentiable to any order and under ``torch.func`` transforms: vectors
    ``(..., K, D)`` to matrices ``(..., D, D)``."""
    gram = vectors @ vectors.mT
    t = gram.triu(1) + torch.diag_embed(0.5 * gram.diagonal(dim1=-2, dim2=-1))
    dual = torch.linalg.solve_triangular(t.mT, vectors, upper=False)
    eye = torch.eye(vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
    return eye - dual.mT @ vectors


def _householder_matrix(vectors: Tensor) -> Tensor:
    """:math:`Q = H_1 \\cdots H_K` (..., D, D) from reflection vectors (K, D) or (S, K, D): the
    fused :class:`_HouseholderMatrix`, or its reference under ``torch.func`` transforms and
    forward-mode AD."""
    if needs_reference(vectors):
        return _householder_matrix_reference(vectors)
    return _HouseholderMatrix.apply(vectors)[0]


def _addmm(like: Tensor):
    """``torch.addmm`` for matrices, ``torch.baddbmm`` for a stack of them (3 dimensions)."""
    return torch.addmm if like.dim() == 2 else torch.baddbmm


def _is_stack_of_one(tensor: Tensor) -> bool:
    """Whether a stack of matrices (3 dimensions) holds just one: computed as a matrix, whose
    unbatched kernels (GEMM, triangular solve) took 10 to 15% less time than batched ones of
    one (D = 64, two threads)."""
    return tensor.dim() == 3 and tensor.shape[0] == 1


def _householder_product(vectors: Tensor) -> _Reflections | _CompactReflections:
    """:math:`H_1 \\cdots H_K` for reflection vectors ``(..., K, D)``: in compact form when they
    are shared (no batch dimensions), else as a sequence of reflections."""
    return _CompactReflections(vectors) if vectors.dim() == 2 else _Reflections(vectors)


class ConditionedHouseholder(Transform):
    r"""Householder flow with given (e.g. per-data-point) reflection vectors; a drop-in for
    Pyro's :class:`~pyro.distributions.transforms.householder.ConditionedHouseholder`.

    :math:`\mathbf{y} = H_K \cdots H_1 \mathbf{x}`, with
    :math:`H_k = I - 2 \mathbf{u}_k \mathbf{u}_k^T / \lVert \mathbf{u}_k \rVert^2`; the inverse
    applies the reflections in reverse order, and :math:`\log \lvert \det J \rvert = 0`. This is
    what :meth:`ConditionalHouseholder.condition` returns; see :class:`Householder` for details.
    Shared vectors (no batch dimensions) are applied in the compact form of the module
    documentation, per-data-point ones one reflection after another.

    :param u_unnormed: the reflection vectors :math:`\mathbf{u}_1, \ldots, \mathbf{u}_K` as
        rows, unnormalised and nonzero, with any batch shape that broadcasts against the
        inputs'; or a function of no arguments returning them (called at each use, as in Pyro).
    :type u_unnormed: torch.Tensor of shape ``(..., K, D)``, or callable
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    volume_preserving = True

    def __init__(self, u_unnormed: Tensor | Callable[[], Tensor] | None = None) -> None:
        super().__init__(cache_size=1)
        self.u_unnormed = u_unnormed
        self._product: _Reflections | _CompactReflections | None = None

    def _vectors(self) -> Tensor:
        return self.u_unnormed() if callable(self.u_unnormed) else self.u_unnormed

    def _reflections(self) -> _Reflections | _CompactReflections:
        if callable(self.u_unnormed):
            return _householder_product(self.u_unnormed())
        if self._product is None:  # fixed vectors: normalised (or solved) once
            self._product = _householder_product(self.u_unnormed)
        return self._product

    def u(self) -> Tensor:
        """The unit reflection vectors, shape ``(..., K, D)`` (Pyro's method)."""
        return F.normalize(self._vectors(), dim=-1)

    @property
    def sign(self) -> int:
        """:math:`\\det Q = (-1)^K`."""
        return -1 if self._vectors().shape[-2] % 2 else 1

    def _call(self, x: Tensor) -> Tensor:
        return self._reflections().rmatvec(x)

    def _inverse(self, y: Tensor) -> Tensor:
        # Exact: the reflections in reverse order, H_1 ... H_K y = Q y.
        return self._reflections().matvec(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """Zero (reflections preserve volume), with the batch shape of ``y``."""
        return y.new_zeros(torch.broadcast_shapes(x.shape[:-1], y.shape[:-1]))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_abs_det_jacobian(x, y))`` in one call."""
        y = self(x)
        return y, self.log_abs_det_jacobian(x, y)


class Householder(ConditionedHouseholder, TransformModule):
    r"""Householder flow: ``count_transforms`` learnable reflections; volume preserving,
    exactly invertible. A drop-in for Pyro's
    :class:`~pyro.distributions.transforms.Householder`: the same arguments, defaults,
    parameter (``u_unnormed``, so state dicts carry over) and map.

    .. math::

        \mathbf{y} = H_K \cdots H_2 H_1 \mathbf{x}, \qquad
        H_k = I - 2 \frac{\mathbf{u}_k \mathbf{u}_k^T}{\lVert \mathbf{u}_k \rVert^2},
        \qquad \log \lvert \det J \rvert = 0,

    the construction of Tomczak & Welling [1] with global parameters
    :math:`\mathbf{u}_k \in \mathbb{R}^D`. The inverse applies the reflections in reverse order.
    All :math:`K` reflections are applied at once in the compact form
    :math:`H_K \cdots H_1 = I - U T^{-T} U^T` of the module documentation, two
    :math:`(\ldots, D) \times (D, K)` products per call, where Pyro applies them one by one.
    As in Pyro, ``count_transforms`` counts the reflections of this one transform (not a
    number of flows). Unlike Pyro's, no warning is issued for :math:`K > D`.

    Inputs may have any batch shape ``(..., D)``.

    Example::

        base = dist.Normal(torch.zeros(10), torch.ones(10)).to_event(1)
        flow = dist.TransformedDistribution(base, [Householder(10, count_transforms=4)])
        z = flow.rsample((128,))  # (128, 10)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param count_transforms: the number of reflections :math:`K`.
    :type count_transforms: int
    :raises ValueError: if ``count_transforms`` is less than 1.

    References:

    1. J. M. Tomczak, M. Welling, "Improving Variational Auto-Encoders using Householder Flow",
       arXiv:1611.09630 (2016).
    """

    def __init__(self, input_dim: int, count_transforms: int = 1) -> None:
        super().__init__()
        _check_count(count_transforms)
        self.input_dim = input_dim
        self.count_transforms = count_transforms
        self.u_unnormed = nn.Parameter(torch.empty(count_transforms, input_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.input_dim)
        nn.init.uniform_(self.u_unnormed, -bound, bound)

    def _reflections(self) -> _Reflections | _CompactReflections:
        return _householder_product(self.u_unnormed)  # the current values, at every call


class ConditionalHouseholder(ConditionalTransformModule):
    r"""Householder flow whose reflection vectors are computed from a context by a network
    ``nn`` (amortized); a drop-in for Pyro's
    :class:`~pyro.distributions.transforms.ConditionalHouseholder`.

    .. math::

        (\mathbf{u}_1, \ldots, \mathbf{u}_K) = \mathrm{nn}(\mathbf{c}), \qquad
        \mathbf{y} = H_K \cdots H_1 \mathbf{x},

    with :math:`H_k` the reflection along :math:`\mathbf{u}_k`. ``condition(context)`` returns a
    :class:`ConditionedHouseholder` with per-data-point vectors of batch shape ``B``, the
    context's; inputs of shape ``(..., *B, D)`` (e.g. ``(S, B, D)`` for :math:`S` particles)
    broadcast against it. :func:`conditional_householder` builds ``nn`` as a
    :class:`~pyro.nn.DenseNN`, as Pyro's helper does; :class:`HouseholderChainNN` is the linear
    chain of Tomczak & Welling [1].

    Example::

        hypernet = DenseNN(64, [128], param_dims=[10] * 4)
        flow = ConditionalHouseholder(10, hypernet, count_transforms=4)
        transform = flow.condition(features)  # features: (B, 64)
        y = transform(x)  # x: (S, B, 10) -> y: (S, B, 10)

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param nn: maps a context of shape ``(..., C)`` to the vectors: one tensor of shape
        ``(..., D)`` if ``count_transforms`` is 1, else a sequence of ``count_transforms``
        tensors of shape ``(..., D)`` (what ``DenseNN(C, hidden_dims, [D] * K)`` returns).
    :type nn: callable
    :param count_transforms: the number of reflections :math:`K`.
    :type count_transforms: int
    :raises ValueError: if ``count_transforms`` is less than 1.

    References:

    1. J. M. Tomczak, M. Welling, "Improving Variational Auto-Encoders using Householder Flow",
       arXiv:1611.09630 (2016).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, input_dim: int, nn: Callable, count_transforms: int = 1) -> None:
        super().__init__()
        _check_count(count_transforms)
        self.nn = nn
        self.input_dim = input_dim
        self.count_transforms = count_transforms

    def vectors(self, context: Tensor) -> Tensor:
        """The reflection vectors :math:`\\mathbf{u}_1, \\ldots, \\mathbf{u}_K` as rows,
        shape ``(..., K, D)`` for a context of shape ``(..., C)``."""
        output = self.nn(context)
        if self.count_transforms == 1:
            return output.unsqueeze(-2)
        return torch.stack(tuple(output), dim=-2)

    def condition(self, context: Tensor) -> ConditionedHouseholder:
        return ConditionedHouseholder(self.vectors(context))


class HouseholderChainNN(nn.Module):
    r"""The hypernetwork of the Householder flow of Tomczak & Welling [1]: a chain of affine
    maps started from the context,

    .. math::

        \mathbf{u}_1 = W_1 \mathbf{c} + \mathbf{a}_1, \qquad
        \mathbf{u}_{k+1} = W_{k+1} \mathbf{u}_k + \mathbf{a}_{k+1},

    as ``nn`` of :class:`ConditionalHouseholder`: a context ``(..., C)`` gives one tensor
    ``(..., D)`` if ``count_transforms`` is 1, else a tuple of ``count_transforms`` of them.

    Example::

        flow = ConditionalHouseholder(10, HouseholderChainNN(64, 10, 4), count_transforms=4)

    :param context_dim: the context's dimension :math:`C`.
    :type context_dim: int
    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param count_transforms: the number of vectors :math:`K`.
    :type count_transforms: int
    :raises ValueError: if ``count_transforms`` is less than 1.

    References:

    1. J. M. Tomczak, M. Welling, "Improving Variational Auto-Encoders using Householder Flow",
       arXiv:1611.09630 (2016).
    """

    def __init__(self, context_dim: int, input_dim: int, count_transforms: int = 1) -> None:
        super().__init__()
        _check_count(count_transforms)
        self.count_transforms = count_transforms
        self.first = nn.Linear(context_dim, input_dim)
        self.chain = nn.ModuleList(
            nn.Linear(input_dim, input_dim) for _ in range(count_transforms - 1)
        )

    def forward(self, context: Tensor) -> Tensor | tuple[Tensor, ...]:
        vector = self.first(context)
        if self.count_transforms == 1:
            return vector
        vectors = [vector]
        for layer in self.chain:
            vector = layer(vector)
            vectors.append(vector)
        return tuple(vectors)


def _check_count(count_transforms: int) -> None:
    if count_transforms < 1:
        raise ValueError(f"count_transforms must be at least 1, got {count_transforms}")


def householder(input_dim: int, count_transforms: int | None = None) -> Householder:
    """Build a :class:`Householder` flow; Pyro's helper of the same name and arguments.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param count_transforms: the number of reflections; defaults to ``input_dim // 2 + 1``
        (as Pyro's helper).
    :type count_transforms: int or None
    """
    if count_transforms is None:
        count_transforms = input_dim // 2 + 1
    return Householder(input_dim, count_transforms=count_transforms)


def conditional_householder(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_transforms: int = 1,
) -> ConditionalHouseholder:
    """Build a :class:`ConditionalHouseholder` flow whose vectors come from a
    :class:`~pyro.nn.DenseNN`; Pyro's helper of the same name, arguments and defaults.

    :param input_dim: the event dimension :math:`D`.
    :type input_dim: int
    :param context_dim: the context's dimension :math:`C`.
    :type context_dim: int
    :param hidden_dims: the network's hidden widths; defaults to ``[10 * D, 10 * D]`` (as
        Pyro's helper). For the linear chain of Tomczak & Welling, pass a
        :class:`HouseholderChainNN` to :class:`ConditionalHouseholder` instead.
    :type hidden_dims: Sequence[int] or None
    :param count_transforms: the number of reflections :math:`K`.
    :type count_transforms: int
    """
    if hidden_dims is None:
        hidden_dims = [input_dim * 10, input_dim * 10]
    hypernet = DenseNN(context_dim, list(hidden_dims), param_dims=[input_dim] * count_transforms)
    return ConditionalHouseholder(input_dim, hypernet, count_transforms)
