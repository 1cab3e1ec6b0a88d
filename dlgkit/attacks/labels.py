"""Reading labels straight from a gradient (Zhao et al., 2020, "iDLG").

With softmax cross-entropy the gradient of the loss with respect to the logits is
``p - onehot(y)``: every entry is positive except the true class's, which is ``p_y - 1 < 0``.
The last linear layer's bias gradient *is* that vector, and each row of its weight gradient
is that entry times the (non-negative, for sigmoid features) input of the layer. So the one
negative entry, or the one row with a negative sum, names the label.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dlgkit.federated import check_gradients

__all__ = ["last_linear_layer", "idlg_label"]


def last_linear_layer(model: nn.Module) -> tuple[int, int | None]:
    """Indices, in ``model.parameters()``, of the last ``nn.Linear``'s weight and bias (or None)."""
    index = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer, so the label cannot be read from its gradient.")
    last = linears[-1]
    bias = index.get(id(last.bias)) if last.bias is not None else None
    return index[id(last.weight)], bias


def idlg_label(model: nn.Module, gradients: Sequence[torch.Tensor]) -> int:
    """The label of a single example from the last layer's gradient (iDLG's rule).

    Uses the bias gradient when the layer has a bias (its only negative entry), otherwise the
    weight gradient's row sums (valid when the layer's inputs are non-negative, as after a
    sigmoid or ReLU). Assumes one example and softmax cross-entropy with a hard label.
    Defined in :doc:`/book/02_single_image_dlg`.
    """
    gradients = check_gradients(model, gradients)
    w_idx, b_idx = last_linear_layer(model)
    scores = gradients[b_idx] if b_idx is not None else gradients[w_idx].sum(dim=1)
    return int(torch.argmin(scores).item())
