"""Checks for the exercises of chapter 5 (defences)."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch

import torch.nn.functional as F

from dlgkit.checks import STOPPED_PSNR
from dlgkit.exercises._common import ExerciseFailure, _psnr, _report, _require, _tensor, call_student, fresh_generator, randint
from dlgkit.exercises.images import _lenet, _private_face

__all__ = ["STOPPED_DB", "check_prune", "check_clip_per_example", "check_weakest_noise"]

#: Exercise 5.3 calls the attack stopped below this PSNR (dB), the course-wide line of
#: :data:`dlgkit.checks.STOPPED_PSNR`: no face is recognisable there.
STOPPED_DB = STOPPED_PSNR
_ATTACK_STEPS = 50


def _as_tensor_list(value: object, n: int) -> list[torch.Tensor]:
    _require(isinstance(value, (list, tuple)) and len(value) == n, f"return a list of {n} tensors, one per gradient tensor.")
    return [_tensor(v, f"tensor {i}") for i, v in enumerate(value)]  # type: ignore[union-attr]


def check_prune(fn: Callable) -> bool:
    """Exercise 5.1: ``fn(gradients, ratio)`` zeroes the fraction ``ratio`` of smallest-magnitude
    entries of each tensor and keeps the others unchanged. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        ratios = [0.0, 1.0, *(0.05 + 0.9 * torch.rand(3, generator=generator)).tolist()]
        for ratio in ratios:
            grads = [torch.randn(randint(generator, 4, 10), 6, generator=generator), torch.randn(randint(generator, 5, 12), generator=generator) * 0.01]
            inputs = [g.clone() for g in grads]
            got = _as_tensor_list(call_student(fn, inputs, ratio), len(grads))
            _require(all(torch.equal(a, b) for a, b in zip(inputs, grads)), "your function changed the gradients it was given; prune a copy.")
            for i, (g, original) in enumerate(zip(got, grads)):
                _require(g.shape == original.shape, f"tensor {i} has shape {tuple(g.shape)}, expected {tuple(original.shape)}.")
                k = round(ratio * original.numel())
                order = original.abs().flatten().sort().indices  # the check's own reference: the k smallest magnitudes
                want = original.flatten().clone()
                want[order[:k]] = 0
                want = want.reshape(original.shape)
                zeros = int((g == 0).sum())
                _require(zeros == k, f"ratio {ratio:.3f}: tensor {i} has {zeros} zeros, expected {k} (round(ratio * numel), per tensor, not over all tensors together).")
                _require(torch.equal(g, want), f"ratio {ratio:.3f}: tensor {i} zeroes the wrong entries or changes the kept ones; keep the largest magnitudes (abs), with their signs.")
        return f"Your pruning is right on {len(ratios)} private ratios, tensor by tensor."

    return _report("Exercise 5.1 (gradient pruning)", body)


def check_clip_per_example(fn: Callable) -> bool:
    """Exercise 5.2: ``fn(per_example_grads, max_norm)`` clips each example's gradient (all its
    tensors together) to L2 norm at most ``max_norm``, as DP-SGD does before adding noise.
    ``per_example_grads`` is a list of tensors whose first dimension is the example. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        for trial in range(3):
            b = randint(generator, 3, 7)
            grads = [torch.randn(b, randint(generator, 2, 5), 3, generator=generator), torch.randn(b, randint(generator, 2, 6), generator=generator)]
            scale = torch.exp(2 * torch.randn(b, generator=generator))  # some examples far above the bound, some below
            grads = [g * scale.view(-1, *[1] * (g.dim() - 1)) for g in grads]
            norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in grads))
            max_norm = float(norms.median())
            got = _as_tensor_list(call_student(fn, [g.clone() for g in grads], max_norm), len(grads))
            factor = torch.clamp(max_norm / norms, max=1.0)
            want = [g * factor.view(-1, *[1] * (g.dim() - 1)) for g in grads]
            for i, (g, w) in enumerate(zip(got, want)):
                _require(g.shape == w.shape, f"tensor {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)} (keep the example dimension).")
            if all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(got, want)):
                continue
            per_tensor = [t * torch.clamp(max_norm / t.flatten(1).norm(dim=1), max=1.0).view(-1, *[1] * (t.dim() - 1)) for t in grads]
            if all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(got, per_tensor)):
                raise ExerciseFailure(f"case {trial}: you clipped each tensor on its own; DP-SGD bounds the norm of an example's whole gradient (all tensors together).")
            got_norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in got))
            if bool((got_norms > max_norm * (1 + 1e-4)).any()):
                raise ExerciseFailure(f"case {trial}: an example's clipped gradient has norm {float(got_norms.max()):.3g} > max_norm {max_norm:.3g}: clip each example's whole gradient, all tensors together.")
            raise ExerciseFailure(f"case {trial}: wrong clipped gradients. Scale example k by min(1, max_norm / ||g_k||), where ||g_k|| is the norm over all its tensors; examples below the bound stay unchanged.")
        return "Each example's whole gradient is clipped to max_norm on 3 private batches; the small ones are left alone."

    return _report("Exercise 5.2 (per-example clipping)", body)


def _noise_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[float], float]:
    """``attack(variance) -> PSNR``: the shared gradient of ``(x, y)`` with Gaussian noise of that
    variance (seeded, so the same variance always gives the same answer), attacked by DLG with
    the label known (L-BFGS with line search, at most ``_ATTACK_STEPS`` steps, uniform start)."""
    params = list(model.parameters())
    clean = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)]

    def attack(variance: float) -> float:
        if not isinstance(variance, (int, float)) or isinstance(variance, bool) or not math.isfinite(variance) or variance < 0:
            raise ValueError(f"attack(variance): variance must be a finite number >= 0, got {variance!r}.")
        noise = torch.Generator().manual_seed(0)
        shared = [g + math.sqrt(variance) * torch.randn(g.shape, generator=noise) for g in clean]
        dummy = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        optimizer = torch.optim.LBFGS([dummy], max_iter=_ATTACK_STEPS, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            grads = torch.autograd.grad(F.cross_entropy(model(dummy), y), params, create_graph=True)
            distance = sum(((g - s) ** 2).sum() for g, s in zip(grads, shared))
            distance.backward()
            return distance

        optimizer.step(closure)
        return _psnr(dummy.detach().clamp(0, 1), x)

    return attack


def check_weakest_noise(fn: Callable) -> bool:
    """Exercise 5.3 (open): ``fn(attack, variances)`` returns the smallest variance in
    ``variances`` (sorted, weakest first) whose Gaussian noise brings ``attack(variance)`` (the
    attack's PSNR in dB on a private face) below ``STOPPED_DB`` (15) dB. Two private clients with
    different grids of variances. May use: anything (dlgkit.defences included)."""

    def body() -> str:
        generator = fresh_generator()
        found = []
        for trial, (first, count) in enumerate(((1e-6, 5), (1e-5, 4))):  # the answers sit at different positions
            shift = 10 ** float(torch.rand(1, generator=generator))
            grid = tuple(first * shift * 10**k for k in range(count))
            label = torch.tensor([randint(generator, 0, 10)])
            model, x = _lenet(generator, classes=10), _private_face(generator)
            answer = call_student(fn, _noise_attack(copy.deepcopy(model), x.clone(), label), grid, allow=None)
            _require(isinstance(answer, float) or (isinstance(answer, int) and not isinstance(answer, bool)), f"return one variance (a float), got {type(answer).__name__}.")
            _require(math.isfinite(answer), f"{answer!r} is not a variance.")
            _require(float(answer) in grid, f"client {trial}: {answer!r} is not one of the variances offered, {[f'{v:.3g}' for v in grid]}.")
            k = grid.index(float(answer))
            check = _noise_attack(model, x, label)  # the check's own attack, not the one handed out
            stopped = check(grid[k])
            _require(stopped < STOPPED_DB, f"client {trial}: at variance {answer:.3g} the attack still reaches {stopped:.1f} dB (>= {STOPPED_DB:g} dB): it is not stopped.")
            if k > 0:
                weaker = check(grid[k - 1])
                _require(weaker >= STOPPED_DB, f"client {trial}: variance {grid[k - 1]:.3g} already stops the attack ({weaker:.1f} dB): yours is not the weakest.")
            found.append(f"{answer:.2g} ({stopped:.1f} dB)")
        return f"the weakest stopping variances of 2 private clients: {found[0]} and {found[1]}."

    return _report("Exercise 5.3 (open: the weakest noise that stops the attack)", body)
