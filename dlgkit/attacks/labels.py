"""Reading labels straight from a gradient (Zhao et al., 2020, "iDLG").

With softmax cross-entropy the gradient of the loss with respect to the logits is
``p - onehot(y)``: every entry is positive except the true class's, which is ``p_y - 1 < 0``.
The last linear layer's bias gradient *is* that vector, and each row of its weight gradient
is that entry times the (non-negative, for sigmoid features) input of the layer. So the one
negative entry, or the one row with a negative sum, names the label.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from dlgkit.checks import check_choice, check_finite_tensors, check_positive_int, check_seed
from dlgkit.federated import check_gradients

__all__ = ["last_linear_layer", "idlg_label", "label_set", "batch_labels", "BATCH_RULES"]


def last_linear_layer(model: nn.Module) -> tuple[int, int | None]:
    """Indices, in ``model.parameters()``, of the last ``nn.Linear``'s weight and bias (or None)."""
    index = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer, so the label cannot be read from its gradient.")
    last = linears[-1]
    if id(last.weight) not in index:
        raise ValueError("the last nn.Linear layer's weight is frozen (requires_grad=False), so the gradient holds no entry for it and the "
                         "label cannot be read from it; unfreeze it, or pass the labels (or use config.with_(labels='joint')).")
    bias = index.get(id(last.bias)) if last.bias is not None else None
    return index[id(last.weight)], bias


def idlg_label(model: nn.Module, gradients: Sequence[torch.Tensor]) -> int:
    """The label of a single example from the last layer's gradient (iDLG's rule).

    Uses the bias gradient when the layer has a bias (its only negative entry), otherwise the
    weight gradient's row sums (valid when the layer's inputs are non-negative, as after a
    sigmoid or ReLU). Assumes one example and softmax cross-entropy with a hard label.
    Defined in :doc:`/book/02_single_image_dlg`.
    """
    scores, has_bias = _last_layer_scores(model, _checked(model, gradients))
    if not bool((scores < 0).any()):
        warnings.warn(
            f"the last layer's {'bias gradient' if has_bias else 'weight-row sums'} has no negative entry, so iDLG's rule finds "
            "no label and the answer is a guess. The gradient is not one example's cross-entropy gradient with a hard label, "
            "or a defence (pruning, quantisation) zeroed that entry.",
            UserWarning,
            stacklevel=2,
        )
    return int(torch.argmin(scores).item())


BATCH_RULES = ("set", "count", "probe")


def _checked(model: nn.Module, gradients: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    gradients = check_gradients(model, gradients)
    check_finite_tensors("gradients", gradients)
    return gradients


def _last_layer_scores(model: nn.Module, gradients: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    w_idx, b_idx = last_linear_layer(model)
    if b_idx is not None:
        return gradients[b_idx].detach().double(), True
    return gradients[w_idx].detach().double().sum(dim=1), False


def label_set(model: nn.Module, gradients: Sequence[torch.Tensor]) -> list[int]:
    """The distinct labels of a batch: the classes whose last-layer bias gradient (or weight-row
    sum) is negative (the iDLG sign rule applied to a mean gradient).

    Needs: softmax cross-entropy averaged over the batch; non-negative features into the last
    layer when there is no bias; and, for each present class, the examples' own ``-1/B`` terms
    outweighing the probability the *other* examples give that class (true unless the model is
    already confident on it). Defined in :doc:`/book/03_batched_dlg`.
    """
    scores, _ = _last_layer_scores(model, _checked(model, gradients))
    return sorted(int(i) for i in torch.nonzero(scores < 0).flatten())


def batch_labels(model: nn.Module, gradients: Sequence[torch.Tensor], batch_size: int, rule: str = "count", input_shape: Sequence[int] | None = None, probes: int = 64, seed: int = 0) -> torch.Tensor:
    """Labels of a batch of ``batch_size`` examples read from the last layer's gradient.

    - ``rule="set"`` (after Yin et al., 2021): the ``batch_size`` classes with the most negative
      scores. Assumes the labels are distinct.
    - ``rule="count"`` (in the spirit of Wainakh et al., 2022): classes may repeat. Each occurrence
      of a class lowers its bias gradient by ``1/B`` (with a bias; otherwise by an impact
      estimated as the negative mass divided by B), on top of an offset that the other examples'
      probabilities add to every class, estimated as the mean positive score. Classes are picked
      greedily, most negative first, adding one impact back after each pick, until B are chosen.
    - ``rule="probe"``: classes may repeat, and the model may be confident. With a bias, the
      gradient of class c is ``(sum_k p_kc - n_c) / B``, so ``n_c = sum_k p_kc - B g_c``. The
      unknown ``sum_k p_kc`` is estimated as B times the model's mean softmax on ``probes``
      uniform-noise inputs of ``input_shape`` (C, H, W), the dummy-data estimate in the spirit
      of Wainakh et al.; classes are then picked greedily by the largest remaining estimate.
      Needs a bias in the last layer (falls back to ``"count"`` otherwise).

    Returns a sorted tensor of ``batch_size`` class indices (the order of a batch is not in the
    gradient). Defined in :doc:`/book/03_batched_dlg`.
    """
    check_choice("rule", rule, BATCH_RULES)
    batch_size = check_positive_int("batch_size", batch_size, hint="Pass the number of examples behind the gradient.")
    probes = check_positive_int("probes", probes, hint="Use at least 1 noise input (64 is the default).")
    seed = check_seed("seed", seed)
    scores, has_bias = _last_layer_scores(model, _checked(model, gradients))
    if batch_size > scores.numel() and rule == "set":
        raise ValueError(f"rule='set' assumes distinct labels, but batch_size={batch_size} exceeds the {scores.numel()} classes.")
    if rule == "set":
        return torch.sort(torch.argsort(scores)[:batch_size]).values
    if rule == "probe" and has_bias:
        if input_shape is None or len(tuple(input_shape)) not in (3, 4):
            raise ValueError("rule='probe' needs input_shape=(C, H, W) of one example (or the batch's (N, C, H, W)).")
        shape = tuple(check_positive_int(f"input_shape[{i}]", s) for i, s in enumerate(tuple(input_shape)[-3:]))
        param = next(model.parameters())
        noise = torch.rand((probes, *shape), generator=torch.Generator().manual_seed(seed)).to(param.device, param.dtype)
        with torch.no_grad():
            mean_probs = torch.softmax(model(noise), dim=-1).double().mean(dim=0).cpu()
        estimate = batch_size * (mean_probs - scores.cpu())
        picks = []
        for _ in range(batch_size):
            c = int(torch.argmax(estimate))
            picks.append(c)
            estimate[c] -= 1.0
        return torch.sort(torch.tensor(picks)).values
    negative = scores[scores < 0]
    impact = 1.0 / batch_size if has_bias else float(-negative.sum()) / batch_size
    positive = scores[scores > 0]
    offset = float(positive.mean()) if positive.numel() else 0.0
    adjusted = scores - offset
    picks = []
    for _ in range(batch_size):
        c = int(torch.argmin(adjusted))
        picks.append(c)
        adjusted[c] += impact
    return torch.sort(torch.tensor(picks)).values
