"""Trap weights ("When the Curious Abandon Honesty", Boenisch et al., EuroS&P 2023): a malicious
server crafts a fully connected layer so that each neuron fires for few inputs.

Each row starts random; then its positive entries are scaled down so that their sum is
``1 - margin`` times the magnitude of the negative entries' sum. For an image with pixels in
[0, 1] the pre-activation is then negative unless the image happens to be bright where the
row is positive, so a neuron fires for a few images of a batch only. A neuron fired by exactly
one image ``x`` has weight gradient ``g x`` and bias gradient ``g``: the row ``dW_i / db_i`` is
the image, exactly. The course's LeNet starts with convolutions, so the crafted layer is put in
front of it in a :class:`dlgkit.attacks.imprint.PlantedModel` (the same carrier as the imprint
attack; only the first layer's weights differ).
Explained in chapter 7 of the book (the malicious server).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dlgkit.attacks.imprint import PlantedModel, _check_input_shape, _front_gradients
from dlgkit.checks import check_number, check_positive_int, check_seed

__all__ = ["trap_weights", "trap_model", "trap_recover"]


def trap_weights(inputs: int, neurons: int, margin: float = 0.05, seed: int = 0) -> torch.Tensor:
    """A (neurons, inputs) weight matrix of trap rows: standard normal entries, then in each
    row the positive entries scaled so that their sum is ``(1 - margin)`` times the magnitude of
    the negative entries' sum (Boenisch et al.'s construction). A larger ``margin`` makes the
    neurons fire for fewer images. Explained in chapter 7 of the book."""
    d = check_positive_int("inputs", inputs)
    n = check_positive_int("neurons", neurons, hint="It is the width of the trap layer, e.g. 1000.")
    margin = check_number("margin", margin, low=0.0, high=1.0, high_open=True)
    if d < 2:
        raise ValueError(f"inputs must be at least 2 (a row needs positive and negative entries), got {d}.")
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    w = torch.randn(n, d, generator=gen)
    pos, neg = w.clamp_min(0), w.clamp_max(0)
    pos_sum, neg_sum = pos.sum(1, keepdim=True), -neg.sum(1, keepdim=True)
    scale = (1.0 - margin) * neg_sum / pos_sum.clamp_min(1e-12)
    return pos * scale + neg


def trap_model(model: nn.Module, input_shape: Sequence[int], neurons: int = 1000, margin: float = 0.05, decoder_scale: float = 1e-2, seed: int = 0) -> PlantedModel:
    """``model`` behind a trap layer of ``neurons`` rows (:func:`trap_weights`, bias 0), a ReLU
    and a layer back to the input shape, as a :class:`dlgkit.attacks.imprint.PlantedModel`.
    Explained in chapter 7 of the book."""
    d = math.prod(_check_input_shape(input_shape))
    weight = trap_weights(d, neurons, margin=margin, seed=seed)
    return PlantedModel(model, input_shape, weight, torch.zeros(weight.shape[0]), decoder_scale=decoder_scale, seed=seed)


def trap_recover(model: PlantedModel, gradients: Sequence[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """One candidate image per neuron that fired: ``dW_i / db_i``, shape ``(M, *input_shape)``,
    duplicates merged (several neurons fired by the same single image give the same row). A
    neuron counts as silent when its bias gradient is below ``tol`` times the largest one. A
    neuron fired by one image gives it exactly, one fired by several a weighted mix.
    Explained in chapter 7 of the book."""
    dw, db = _front_gradients(model, gradients)
    tol = check_number("tol", tol, low=0.0)
    scale = float(db.abs().max())
    if scale == 0:
        return torch.zeros(0, *model.input_shape)
    fired = db.abs() > tol * scale
    rows = (dw[fired] / db[fired, None]).float()
    rows = torch.unique(torch.round(rows * 2**20) / 2**20, dim=0)  # the same image from several neurons, once
    return rows.view(-1, *model.input_shape)
