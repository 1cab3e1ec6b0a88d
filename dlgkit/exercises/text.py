"""Checks for the exercises of chapter 4 (text): the bag of words, the span test, a sentence."""

from __future__ import annotations

from typing import Callable

import torch

from dlgkit.exercises._common import ExerciseFailure, _as_int_list, _report, _require, _tensor, call_student, fresh_generator, randint

__all__ = ["check_bag_of_words", "check_span_test", "check_sentence_from_span"]

#: Exercise 4.3 passes when every private sentence has the right length and at least this token accuracy.
SENTENCE_TARGET = 0.9


def _as_id_set(value: object) -> set[int]:
    return set(_as_int_list(value, "the token ids"))


def check_bag_of_words(fn: Callable) -> bool:
    """Exercise 4.1: ``fn(word_embedding_gradient)`` returns the ids of the rows that are not zero.
    May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        tiny = randint(generator, 0, 4)  # in one case a row has a single, tiny entry
        for trial in range(4):
            vocab, dim = randint(generator, 300, 700), 16
            ids = torch.randperm(vocab, generator=generator)[: randint(generator, 5, 15)]
            grad = torch.zeros(vocab, dim)
            grad[ids] = torch.randn(len(ids), dim, generator=generator) * 10.0 ** -(2 * trial)
            if trial == tiny:
                grad[ids[0]] = 0
                grad[ids[0], randint(generator, 0, dim)] = 1e-12
            got = _as_id_set(call_student(fn, grad.clone()))
            want = {int(i) for i in ids}
            _require(got >= want, f"case {trial}: missing token ids {sorted(want - got)[:5]}: every non-zero row counts, however small its entries.")
            _require(got <= want, f"case {trial}: ids {sorted(got - want)[:5]} have all-zero gradient rows and are not in the input.")
        return "the non-zero rows are exactly the input's tokens in 4 private cases."

    return _report("Exercise 4.1 (bag of words)", body)


def _distance_to_span(vectors: torch.Tensor, basis_rows: torch.Tensor) -> torch.Tensor:
    """Relative distance of each row of ``vectors`` from the span of ``basis_rows`` (least squares,
    the check's own reference: no SVD of the gradient)."""
    coefficients = torch.linalg.lstsq(basis_rows.T, vectors.T).solution
    return (vectors - (basis_rows.T @ coefficients).T).norm(dim=1) / vectors.norm(dim=1)


def check_span_test(fn: Callable) -> bool:
    """Exercise 4.2: ``fn(gradient, candidates, rank)`` returns each candidate's relative distance
    from the row space of ``gradient`` (using its top ``rank`` right singular vectors). May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        for trial in range(2):
            d, n_in, m = randint(generator, 20, 40), randint(generator, 3, 8), 18
            inputs = torch.randn(n_in, d, generator=generator, dtype=torch.float64)
            deltas = torch.randn(n_in, m, generator=generator, dtype=torch.float64)
            gradient = deltas.T @ inputs  # sum_t delta_t x_t^T, shape (m, d)
            # a little noise beyond the true rank, as in float32 gradients: only the top `rank` directions count
            gradient = gradient + 1e-9 * torch.randn(m, d, generator=generator, dtype=torch.float64)
            outsiders = torch.randn(5, d, generator=generator, dtype=torch.float64)
            mixes = (torch.rand(3, n_in, generator=generator, dtype=torch.float64) @ inputs) * 3.0
            candidates = torch.cat([inputs, outsiders, mixes])
            got = _tensor(call_student(fn, gradient.clone(), candidates.clone(), n_in), "the residuals")
            _require(got.shape == (len(candidates),), f"return one residual per candidate: expected shape ({len(candidates)},), got {tuple(got.shape)}.")
            got = got.double()
            want = _distance_to_span(candidates, inputs)
            _require(bool((got[:n_in] < 1e-6).all()), f"case {trial}: the true inputs lie in the span, so their residuals should be ~0; got {float(got[:n_in].max()):.3g}. Keep only the top `rank` right singular vectors.")
            _require(bool((got[-3:] < 1e-6).all()), f"case {trial}: combinations of inputs also lie in the span; their residuals should be ~0.")
            _require(bool((got[n_in:-3] > 0.05).all()), f"case {trial}: random vectors outside the span should have clearly positive residuals.")
            _require(torch.allclose(got, want, atol=1e-4), f"case {trial}: the residual should be relative: ||x - P x|| / ||x||, with P the projection on the top `rank` right singular vectors.")
        return "members of the span have residual ~0, outsiders their exact relative distance, in 2 private cases."

    return _report("Exercise 4.2 (span test)", body)


def _toy_sentence_case(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """A toy transformer's first layer: token t's input is ``words[v_t] + positions[t]``, then a
    linear layer (64 units) and tanh; returns (weight gradient, words, positions, sentence)."""
    vocab, dim, max_len = 400, 48, 16
    words = torch.randn(vocab, dim, generator=generator, dtype=torch.float64)
    positions = 0.5 * torch.randn(max_len, dim, generator=generator, dtype=torch.float64)
    length = randint(generator, 6, 13)
    sentence = torch.randint(vocab, (length,), generator=generator)
    sentence[randint(generator, 1, length)] = sentence[0]  # a repeated word, as in real sentences
    layer = torch.randn(64, dim, generator=generator, dtype=torch.float64) / dim**0.5
    readout = torch.randn(64, generator=generator, dtype=torch.float64)
    inputs = words[sentence] + positions[:length]
    deltas = readout * (1 - torch.tanh(inputs @ layer.T) ** 2)  # d loss / d pre-activation, loss = sum_t readout . tanh(W x_t)
    return deltas.T @ inputs, words, positions, sentence.tolist()


def check_sentence_from_span(fn: Callable, target: float = SENTENCE_TARGET) -> bool:
    """Exercise 4.3 (open): ``fn(weight_gradient, word_embeddings, position_embeddings)`` returns
    the private sentence (a list of token ids, length unknown to you) that produced the first
    layer's ``weight_gradient``. Passes when each of 3 sentences has the right length and a token
    accuracy of at least ``target``. May use: torch and your ``span_residuals``."""

    def body() -> str:
        generator = fresh_generator()
        scores = []
        for trial in range(3):
            gradient, words, positions, sentence = _toy_sentence_case(generator)
            got = call_student(fn, gradient.clone(), words.clone(), positions.clone())
            if isinstance(got, torch.Tensor):
                got = _tensor(got, "the sentence").flatten().tolist()
            _require(isinstance(got, (list, tuple)), f"return the sentence as a list of token ids, got {type(got).__name__}.")
            if len(got) != len(sentence):
                raise ExerciseFailure(f"case {trial}: your sentence has {len(got)} tokens, the private one {len(sentence)}. How many singular values of the gradient are not (nearly) zero?")
            accuracy = sum(int(a) == b for a, b in zip(got, sentence)) / len(sentence)
            scores.append(accuracy)
            _require(accuracy >= target, f"case {trial}: token accuracy {accuracy:.0%}, the target is {target:.0%}. For each position t, which word v puts words[v] + positions[t] in the span?")
        return f"token accuracy {', '.join(f'{s:.0%}' for s in scores)} on 3 private sentences (target {target:.0%})."

    return _report("Exercise 4.3 (open: a sentence from the span)", body)
