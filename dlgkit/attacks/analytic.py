"""Closed-form leaks: a fully connected layer's gradient contains its input.

For ``y = W x + b`` and any loss L, ``dL/dW = (dL/dy) x^T`` and ``dL/db = dL/dy``. Row i of
the weight gradient is therefore ``(dL/dy_i) x``, and dividing it by ``dL/db_i`` gives ``x``
exactly, for one example. For a batch the gradient is a mean, and the same division gives a
weighted mix of the batch's inputs instead.

Defined in :doc:`/book/01_gradient_sharing`.
"""

from __future__ import annotations

import torch

from dlgkit.checks import check_finite_tensors, check_number

__all__ = ["recover_linear_input"]


def recover_linear_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Recover the input of a linear layer from its weight and bias gradients.

    ``weight_grad`` has shape (out, in), ``bias_grad`` shape (out,). Uses the row whose bias
    gradient is largest in magnitude (the best-conditioned division). Returns a tensor of
    shape (in,). Exact for a single example; a mix of inputs for a batch.
    Defined in :doc:`/book/01_gradient_sharing`.
    """
    if not isinstance(weight_grad, torch.Tensor) or not isinstance(bias_grad, torch.Tensor):
        raise TypeError("weight_grad and bias_grad must be torch tensors.")
    if weight_grad.dim() != 2 or bias_grad.dim() != 1 or weight_grad.shape[0] != bias_grad.shape[0]:
        raise ValueError(
            f"expected weight_grad (out, in) and bias_grad (out,) with the same 'out', got "
            f"{tuple(weight_grad.shape)} and {tuple(bias_grad.shape)}."
        )
    check_finite_tensors("weight_grad", weight_grad)
    check_finite_tensors("bias_grad", bias_grad)
    eps = check_number("eps", eps, low=0)
    i = int(torch.argmax(bias_grad.abs()))
    if float(bias_grad[i].abs()) <= eps:
        raise ValueError("every bias gradient is zero: this layer received no gradient, so nothing can be recovered.")
    return weight_grad[i] / bias_grad[i]
