"""Checks for the exercises of chapter 4 (text): the bag of words and the span test."""

from __future__ import annotations

from typing import Callable

import torch

from dlgkit.attacks.text import span_residuals
from dlgkit.exercises._common import _report, _require, _tensor

__all__ = ["check_bag_of_words", "check_span_test"]


def _as_id_set(value: object) -> set[int]:
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.flatten().tolist()}
    _require(isinstance(value, (list, tuple, set, frozenset)), f"return the token ids as a tensor, list or set, got {type(value).__name__}.")
    return {int(v) for v in value}  # type: ignore[union-attr]


def check_bag_of_words(fn: Callable) -> bool:
    """Exercise 4.1: ``fn(word_embedding_gradient)`` returns the ids of the rows that are not zero."""

    def body() -> str:
        gen = torch.Generator().manual_seed(41)
        for trial in range(4):
            vocab, dim = 500 + 37 * trial, 16
            ids = torch.randperm(vocab, generator=gen)[: 5 + 3 * trial]
            grad = torch.zeros(vocab, dim)
            grad[ids] = torch.randn(len(ids), dim, generator=gen) * 10.0 ** -(2 * trial)
            if trial == 3:  # one row with a single tiny entry still counts
                grad[ids[0]] = 0
                grad[ids[0], 3] = 1e-12
            got = _as_id_set(fn(grad.clone()))
            want = {int(i) for i in ids}
            _require(got >= want, f"missing token ids {sorted(want - got)[:5]}: every non-zero row counts, however small its entries (trial {trial}).")
            _require(got <= want, f"ids {sorted(got - want)[:5]} have all-zero gradient rows and are not in the input (trial {trial}).")
        return "the non-zero rows are exactly the input's tokens."

    return _report("Exercise 4.1 (bag of words)", body)


def check_span_test(fn: Callable) -> bool:
    """Exercise 4.2: ``fn(gradient, candidates, rank)`` returns each candidate's relative distance
    from the row space of ``gradient`` (using its top ``rank`` right singular vectors)."""

    def body() -> str:
        gen = torch.Generator().manual_seed(42)
        d, n_in, m = 24, 6, 18
        inputs = torch.randn(n_in, d, generator=gen)
        deltas = torch.randn(n_in, m, generator=gen)
        gradient = (deltas.T @ inputs).double()  # sum_t delta_t x_t^T, shape (m, d)
        outsiders = torch.randn(5, d, generator=gen)
        mixes = (torch.rand(3, n_in, generator=gen) @ inputs) * 3.0
        candidates = torch.cat([inputs, outsiders, mixes]).double()
        got = _tensor(fn(gradient.clone(), candidates.clone(), n_in), "the residuals")
        _require(got.shape == (len(candidates),), f"return one residual per candidate: expected shape ({len(candidates)},), got {tuple(got.shape)}.")
        want, _ = span_residuals(gradient, candidates, rank=n_in)
        got = got.double()
        _require(bool((got[:n_in] < 1e-6).all()), f"the true inputs lie in the span, so their residuals should be ~0; got {got[:n_in].max():.3g}.")
        _require(bool((got[-3:] < 1e-6).all()), "combinations of inputs also lie in the span; their residuals should be ~0.")
        _require(bool((got[n_in:-3] > 0.05).all()), "random vectors outside the span should have clearly positive residuals.")
        _require(torch.allclose(got, want.double(), atol=1e-4), "the residual should be relative: ||x - P x|| / ||x||, with P the projection on the top `rank` right singular vectors.")
        return "members of the span have residual ~0, outsiders do not."

    return _report("Exercise 4.2 (span test)", body)
