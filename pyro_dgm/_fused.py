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

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

__all__ = ["cache_forward_signature", "needs_reference", "reference_vjp"]

_transforms_active = torch._C._are_functorch_transforms_active


def needs_reference(*tensors: Tensor | object) -> bool:
    """Whether the fused path gives way to the reference: inside any ``torch.func`` transform,
    whether or not ``tensors`` are seen through it (torch refuses to ``vmap`` a Function that
    has no vmap rule even when none of its inputs is batched), or when any of ``tensors``
    carries a forward-mode tangent. Non-tensors are ignored. (One C call, and a look at each
    tensor only under a forward-mode dual level; no device work.)"""
    if _transforms_active():
        return True
    if _forward_ad._current_level < 0:  # a dual tensor exists only under a dual level
        return False
    return any(
        torch.is_tensor(tensor) and _forward_ad.unpack_dual(tensor).tangent is not None
        for tensor in tensors
    )


def cache_forward_signature(function: type[torch.autograd.Function]) -> type:
    """Class decorator for a Function in the ``setup_context`` style: torch binds the arguments
    of every call to ``forward``'s signature, which :func:`inspect.signature` rebuilds from the
    code object each time unless ``forward.__signature__`` holds it. This stores it once, which
    takes most of the cost that the ``setup_context`` style adds to a call on the fused path.
    When every parameter of ``forward`` is positional without a default (so that binding only
    passes the arguments through), the signature stored is ``(*args)``, which binds in a third
    of the time and means the same for positional calls; a call with keyword arguments then
    raises ``TypeError``."""
    signature = inspect.signature(function.forward)
    if all(
        parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and parameter.default is inspect.Parameter.empty
        for parameter in signature.parameters.values()
    ):
        signature = _POSITIONAL_ONLY_ARGS
    function.forward.__signature__ = signature
    return function


_POSITIONAL_ONLY_ARGS = inspect.Signature(
    [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]
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
        # each wanted input enters through an alias of its own, so that the gradients are
        # partial derivatives also when one input is computed from another (or the same tensor
        # is passed twice): autograd.grad with respect to the input itself would add the paths
        # through the other inputs, which the chain rule outside this Function adds again
        inputs = [
            value.view_as(value) if i in wanted else value for i, value in enumerate(inputs)
        ]
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
