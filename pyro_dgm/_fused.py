"""The rules every hand-fused ``torch.autograd.Function`` of the package follows.

A fused Function computes a formula and its gradient in fewer operations than autograd's graph
of the same formula (training steps at small batches are bound by the count of operations).
Each one lives beside a plain-torch reference of the same math, written without in-place or
``out=`` operations so that autograd, ``torch.func`` and forward-mode AD can differentiate it to
any order, and a differential test holds the two together (values, first and second
derivatives). The fused path serves the common case; the reference serves the two cases a
hand-written first derivative cannot:

* **higher derivatives** (``create_graph=True``: ``torch.autograd.functional.hessian``,
  ``pyro.ops.hessian``, Laplace approximations): a fused backward pass that finds grad mode on
  returns :func:`reference_vjp`, the vector-Jacobian product of the reference at the saved
  inputs, itself differentiable;
* **torch.func transforms** (``grad``, ``vmap``, ``jacrev``, ``jacfwd``) and forward-mode AD:
  the public entry points ask :func:`needs_reference` of their inputs and call the reference
  directly.

Fused Functions are written in the ``setup_context`` style, with ``ctx.needs_input_grad``
respected and the saved tensors unpacked by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["needs_reference", "reference_vjp"]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def needs_reference(*tensors: Tensor | object) -> bool:
    """Whether any of ``tensors`` is seen through a ``torch.func`` transform or carries a
    forward-mode tangent: the fused path then gives way to the reference. Non-tensors are
    ignored. (One C call per tensor; no device work.)"""
    for tensor in tensors:
        if torch.is_tensor(tensor) and (_is_wrapped(tensor) or _has_tangent(tensor)):
            return True
    return False


def _has_tangent(tensor: Tensor) -> bool:
    # forward-mode AD outside torch.func: a dual tensor (only under a dual level)
    return torch._C._forward_AD_enabled() if hasattr(torch._C, "_forward_AD_enabled") else (
        torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None
    )


def reference_vjp(
    reference: Callable[..., Tensor | tuple[Tensor, ...]],
    inputs: Sequence[Tensor | object],
    grad_outputs: Sequence[Tensor | None],
    needs_input_grad: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """The vector-Jacobian product of ``reference(*inputs)`` with ``grad_outputs``, as a
    differentiable function of the inputs and of ``grad_outputs`` (``create_graph=True``).

    For a fused Function's backward pass when grad mode is on (a derivative of the gradient is
    being taken). ``inputs`` are the Function's inputs as saved (tensors keep their history in
    such a backward pass; non-tensors are passed through), ``grad_outputs`` the incoming
    gradients (``None`` for an output that received none) and ``needs_input_grad`` the
    Function's ``ctx.needs_input_grad``.

    :returns: one entry per input: its gradient, or ``None`` where none is needed or the output
        does not depend on it.
    """
    wanted = [i for i, need in enumerate(needs_input_grad) if need]
    gradients: list[Tensor | None] = [None] * len(inputs)
    if not wanted:
        return tuple(gradients)
    with torch.enable_grad():
        outputs = reference(*inputs)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [
            (output, grad)
            for output, grad in zip(outputs, grad_outputs, strict=True)
            if grad is not None and output.requires_grad
        ]
        if pairs:
            found = torch.autograd.grad(
                [output for output, _ in pairs],
                [inputs[i] for i in wanted],
                [grad for _, grad in pairs],
                create_graph=True,
                allow_unused=True,
            )
            for i, grad in zip(wanted, found, strict=True):
                gradients[i] = grad
    return tuple(gradients)
