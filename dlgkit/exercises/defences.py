"""Checks for the exercises of chapter 5 (defences)."""

from __future__ import annotations

from typing import Callable

import torch

from dlgkit import data, defences, models
from dlgkit.exercises._common import _report, _require, _tensor

__all__ = ["NOISE_GRID", "noise_problem", "check_prune", "check_weakest_noise"]

#: The Gaussian noise variances Exercise 5.2 chooses from, weakest first.
NOISE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
#: Exercise 5.2 calls the attack stopped below this PSNR (dB): no face is recognisable there.
STOPPED_DB = 15.0
_ATTACK_STEPS = 30


def noise_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Exercise 5.2's client: one 16x16 LFW face with label 3 on a paper LeNet (10 classes, seed 0)."""
    x, _ = data.lfw_faces(1, size=16, start=3)
    return models.LeNet(channels=1, num_classes=10, image_size=16, seed=0), x, torch.tensor([3])


def _attack_psnr(variance: float) -> float:
    model, x, y = noise_problem()
    return defences.attack_defended(model, x, y, defences.Defence("gaussian", variance), defences.DEFENDED_ATTACK.with_(iterations=_ATTACK_STEPS), seed=0)["psnr"]


def check_prune(fn: Callable) -> bool:
    """Exercise 5.1: ``fn(gradients, ratio)`` zeroes the fraction ``ratio`` of smallest-magnitude
    entries of each tensor and keeps the others unchanged."""

    def body() -> str:
        generator = torch.Generator().manual_seed(5)
        for trial, ratio in enumerate((0.0, 0.3, 0.5, 0.9, 1.0)):
            grads = [torch.randn(8, 6, generator=generator), torch.randn(8, generator=generator) * 0.01]
            got = fn([g.clone() for g in grads], ratio)
            _require(isinstance(got, (list, tuple)) and len(got) == len(grads), f"return a list of {len(grads)} tensors, one per gradient tensor.")
            want = defences.prune(grads, ratio)
            for i, (g, w) in enumerate(zip(got, want)):
                g = _tensor(g, f"tensor {i}")
                _require(g.shape == w.shape, f"tensor {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}.")
                zeros, expected = int((g == 0).sum()), int((w == 0).sum())
                _require(zeros == expected, f"ratio {ratio}: tensor {i} has {zeros} zeros, expected {expected} (round(ratio * numel), per tensor).")
                _require(torch.equal(g, w), f"ratio {ratio}: tensor {i} zeroes the wrong entries or changes the kept ones; keep the largest magnitudes, with their signs.")
        return "Your pruning matches dlgkit's on 5 ratios, tensor by tensor."

    return _report("Exercise 5.1 (gradient pruning)", body)


def check_weakest_noise(fn: Callable) -> bool:
    """Exercise 5.2: ``fn(model, x, y, variances)`` returns the smallest variance in ``variances``
    whose Gaussian noise brings the attack on ``noise_problem()`` below ``STOPPED_DB`` (15) dB."""

    def body() -> str:
        model, x, y = noise_problem()
        answer = fn(model, x, y, NOISE_GRID)
        _require(isinstance(answer, float) or (isinstance(answer, int) and not isinstance(answer, bool)), f"return one variance (a float), got {type(answer).__name__}.")
        _require(float(answer) in NOISE_GRID, f"{answer!r} is not one of the variances offered, {list(NOISE_GRID)}.")
        k = NOISE_GRID.index(float(answer))
        stopped = _attack_psnr(NOISE_GRID[k])
        _require(stopped < STOPPED_DB, f"at variance {answer:g} the attack still reaches {stopped:.1f} dB (>= {STOPPED_DB:g} dB): it is not stopped.")
        if k > 0:
            weaker = _attack_psnr(NOISE_GRID[k - 1])
            _require(weaker >= STOPPED_DB, f"variance {NOISE_GRID[k - 1]:g} already stops the attack ({weaker:.1f} dB): yours is not the weakest.")
        return f"variance {answer:g} is the weakest that stops the attack ({stopped:.1f} dB)."

    return _report("Exercise 5.2 (weakest noise that stops the attack)", body)
