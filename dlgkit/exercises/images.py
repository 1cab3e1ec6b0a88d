"""Checks for the exercises of chapters 1-3 (gradients, single-image DLG, batches).

Every check draws its cases from a generator seeded with fresh entropy, hands the student's
function copies of the public inputs only, in a thread of its own, and compares the answer with
the case's truth or with the check's own computation.
"""

from __future__ import annotations

import copy
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlgkit import data, models
from dlgkit.exercises._common import ExerciseFailure, _as_int_list, _psnr, _report, _require, _tensor, call_student, fresh_generator, randint

__all__ = [
    "check_shared_gradient",
    "check_input_from_linear_gradient",
    "check_batch_mixing_weights",
    "check_batch_leak",
    "check_label_from_gradient",
    "check_gradient_matching_loss",
    "check_dlg_attack",
    "check_relu_attack",
    "check_align_batch",
    "check_batch_label_set",
    "check_batch_label_counts",
]

#: Exercise 2.3 passes at this PSNR (dB) on every private face; exercise 2.4 (ReLU) at ``RELU_TARGET_DB``
#: on the mean of four (measured on this project's CPU: the L2 L-BFGS attack of exercise 2.3 stays at
#: 12 to 18 dB per face there, 8 faces; the reference solution, a cosine distance with Adam,
#: clamping, a small TV prior and the better of 2 starts, reaches 19.2 to 30.7 dB on 28 faces, and
#: 12.3 to 28.4 dB, mean 23.0, on 40 fresh faces: 2 of them below 20 dB, which is why the check
#: averages 4 faces, not 2).
DLG_TARGET_DB = 30.0
RELU_TARGET_DB = 18.0
#: Exercise 1.4 passes when at least this many of the batch's 8 inputs are recovered exactly.
BATCH_LEAK_TARGET = 3
#: Exercise 3.3 passes when at least this many of 10 private batches get their label counts exactly right.
LABEL_COUNT_TARGET = 7

_CREATE_GRAPH = (
    "DLG differentiates the dummy's gradients with respect to the dummy image, so compute them with "
    "torch.autograd.grad(loss, params, create_graph=True) (without it they are constants), and make the "
    "dummy require grad."
)


def _seeded(generator: torch.Generator, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its weights drawn from ``generator`` (the caller's global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(randint(generator, 0, 2**31))
        return build()


def _mlp(generator: torch.Generator, d_in: int = 12, hidden: int = 7, classes: int = 4) -> nn.Module:
    return _seeded(generator, lambda: nn.Sequential(nn.Linear(d_in, hidden), nn.Sigmoid(), nn.Linear(hidden, classes)))


def _mlp_gradients(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the mean cross-entropy of a Linear-Sigmoid-Linear model, by hand (backpropagation
    written out), so the check does not grade with the tool the student uses."""
    first, last = model[0], model[2]
    with torch.no_grad():
        h = torch.sigmoid(x @ first.weight.T + first.bias)
        dz2 = (torch.softmax(h @ last.weight.T + last.bias, dim=1) - F.one_hot(y, last.out_features)) / len(x)
        dz1 = (dz2 @ last.weight) * h * (1 - h)
        return [dz1.T @ x, dz1.sum(0), dz2.T @ h, dz2.sum(0)]


def _lenet(generator: torch.Generator, classes: int, activation: str = "sigmoid", init: str = "uniform") -> nn.Module:
    return _seeded(generator, lambda: models.LeNet(channels=1, num_classes=classes, image_size=16, activation=activation, init=init))


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


# --- chapter 1 -----------------------------------------------------------------------------

def _mlp_case(generator: torch.Generator, low: int, high: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A private case of chapter 1's checks: a fresh MLP and a batch of ``low..high`` examples."""
    model = _mlp(generator)
    b = randint(generator, low, high)
    return model, torch.rand(b, 12, generator=generator), torch.randint(4, (b,), generator=generator)


def check_shared_gradient(fn: Callable) -> bool:
    """Exercise 1.1: ``fn(model, x, y)`` returns the list of gradients a FedSGD client shares.
    May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        for trial in range(3):
            model, x, y = _mlp_case(generator, 2, 7)
            b = len(x)
            got = call_student(fn, copy.deepcopy(model), x.clone(), y.clone())
            _require(isinstance(got, (list, tuple)), f"return a list of tensors, got {type(got).__name__}.")
            want = _mlp_gradients(model, x, y)
            _require(len(got) == len(want), f"expected {len(want)} tensors (one per parameter), got {len(got)}.")
            for i, (g, w) in enumerate(zip(got, want)):
                g = _tensor(g, f"gradient {i}")
                _require(g.shape == w.shape, f"gradient {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}.")
                if torch.allclose(g, w * b, atol=1e-6) and b > 1:
                    raise ExerciseFailure(f"gradient {i} is {b} times too large: the loss should be the mean cross-entropy over the batch, not the sum.")
                err = float((g - w).abs().max())
                _require(err < 1e-5, f"gradient {i} is off by up to {err:.2e}: is the loss the mean cross-entropy of model(x) against y?")
        return "Your gradients equal the check's hand-written backpropagation on 3 private models and batches."

    return _report("Exercise 1.1 (what a client shares)", body)


def check_input_from_linear_gradient(fn: Callable) -> bool:
    """Exercise 1.2: ``fn(weight_grad, bias_grad)`` returns the input of the linear layer. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        dead = randint(generator, 0, 4)  # in one case a unit is dead: its bias gradient is exactly zero
        worst = 0.0
        for trial in range(4):
            d_in = randint(generator, 8, 17)
            model = _mlp(generator, d_in=d_in)
            x, y = torch.rand(1, d_in, generator=generator), torch.randint(4, (1,), generator=generator)
            weight_grad, bias_grad = _mlp_gradients(model, x, y)[:2]
            if trial == dead:  # row 0 and one more unit are dead
                for row in (0, int(bias_grad[1:].abs().argmin()) + 1):
                    weight_grad[row], bias_grad[row] = 0.0, 0.0
            got = call_student(fn, weight_grad.clone(), bias_grad.clone())
            if isinstance(got, torch.Tensor) and got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise ExerciseFailure(f"case {trial}: the result contains NaN or inf: did you divide by a zero bias gradient (a dead unit)?")
            got = _tensor(got, "the recovered input")
            _require(got.numel() == d_in, f"expected the {d_in} input values, got a tensor of shape {tuple(got.shape)}.")
            err = float((got.reshape(-1) - x.reshape(-1)).abs().max())
            _require(err < 1e-4, f"case {trial}: max abs error {err:.2e}; a row of the weight gradient divided by its (non-zero) bias gradient is the input exactly.")
            worst = max(worst, err)
        return f"Exact recovery on 4 private layers, one with a dead unit (max abs error {worst:.1e})."

    return _report("Exercise 1.2 (input from a linear layer)", body, {"division by zero": "Avoid rows whose bias gradient is zero."})


def check_batch_mixing_weights(fn: Callable) -> bool:
    """Exercise 1.3: ``fn(model, x, y, row)`` returns the weights alpha (B,) such that
    ``weight_grad[row] / bias_grad[row] == sum_k alpha_k x_k`` for the first layer. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        for trial in range(3):
            while True:  # a row whose examples' bias gradients do not nearly cancel (else alpha is
                # a ratio of tiny numbers, and float32 rounding, not the student, decides it)
                model, x, y = _mlp_case(generator, 2, 6)
                b = len(x)
                per_row = torch.stack([_mlp_gradients(model, x[k : k + 1], y[k : k + 1])[1] for k in range(b)])  # (B, rows)
                usable = (per_row.sum(0).abs() >= 0.25 * per_row.abs().sum(0)).nonzero().flatten()
                if len(usable):
                    break
            row = int(usable[randint(generator, 0, len(usable))])
            got = _tensor(call_student(fn, copy.deepcopy(model), x.clone(), y.clone(), row), "alpha")
            _require(got.shape == (b,), f"alpha should have one weight per example, shape ({b},), got {tuple(got.shape)}.")
            per_example = per_row[:, row]
            want = per_example / per_example.sum()
            err = float((got.double() - want.double()).abs().max())
            _require(abs(float(got.sum()) - 1.0) < 1e-4, f"the weights should sum to 1, they sum to {float(got.sum()):.4f}.")
            _require(err < 1e-4, f"case {trial}: alpha is off by up to {err:.2e}; alpha_k is example k's own bias gradient (row `row`) over the sum of all examples'.")
        return "Your weights equal each example's share of the bias gradient on 3 private batches."

    return _report("Exercise 1.3 (what a batch does)", body)


def check_batch_leak(fn: Callable, target: int = BATCH_LEAK_TARGET) -> bool:
    """Exercise 1.4 (open): ``fn(gradients, batch_size)`` returns at most ``batch_size`` rows,
    guesses of the batch's inputs, from the gradients of a batch of 8 through a wide ReLU layer
    (Linear(64, 256), ReLU, Linear(256, 10)). Passes when, on each of 2 private batches, at least
    ``target`` inputs are recovered (max abs error < 1e-3). May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        found = []
        for trial in range(2):
            model = _seeded(generator, lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)))
            x, y = torch.rand(8, 64, generator=generator), torch.randint(10, (8,), generator=generator)
            grads = _gradients(model, x, y)
            got = _tensor(call_student(fn, [g.clone() for g in grads], 8), "your guesses")
            _require(got.dim() == 2 and got.shape[1] == 64 and 1 <= len(got) <= 8, f"return between 1 and 8 guesses of shape (64,), stacked as (K, 64); got {tuple(got.shape)}.")
            hits = int(((got[:, None].double() - x[None].double()).abs().amax(2) < 1e-3).any(0).sum())
            found.append(hits)
            _require(hits >= target, f"case {trial}: {hits} of the 8 inputs recovered, the target is {target}. Which rows of the first layer see only one example? What do their ratios have in common?")
        return f"{found[0]} and {found[1]} of 8 inputs recovered exactly (target {target})."

    return _report("Exercise 1.4 (open: a batch through a wide ReLU layer)", body)


# --- chapter 2 -----------------------------------------------------------------------------

def check_label_from_gradient(fn: Callable) -> bool:
    """Exercise 2.1: ``fn(bias_grad)`` returns the label (an int) from the last layer's bias gradient.
    May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        labels = torch.randperm(10, generator=generator)[:6]  # six cases, six different answers
        for trial, label in enumerate(labels.tolist()):
            model = _lenet(generator, classes=10)
            x = torch.rand(1, 1, 16, 16, generator=generator)
            bias_grad = _gradients(model, x, torch.tensor([label]))[-1]
            got = call_student(fn, bias_grad.clone())
            _require(isinstance(got, numbers.Integral) or (isinstance(got, torch.Tensor) and got.numel() == 1 and not got.is_floating_point()), f"return one label (an int), got {type(got).__name__}.")
            if int(got) != label:
                largest = int(got) == int(bias_grad.argmax())
                raise ExerciseFailure(
                    f"case {trial}: you said {int(got)}, the label was {label}. The last layer's bias gradient is "
                    f"p - onehot(y): every entry is positive except the true class's, which is negative. "
                    + ("You took the largest entry; look at the sign instead." if largest else "Look for the entry whose sign differs.")
                )
        return "6 of 6 private labels read correctly."

    return _report("Exercise 2.1 (label from the gradient)", body)


def check_gradient_matching_loss(fn: Callable) -> bool:
    """Exercise 2.2: ``fn(dummy_grads, shared_grads)`` returns DLG's distance (sum of squared
    differences over all tensors) as a scalar tensor that can be differentiated. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        values = []
        for trial in range(2):
            shapes = [(randint(generator, 2, 6), randint(generator, 2, 6)), (randint(generator, 1, 6),)]
            shared = [torch.randn(s, generator=generator) for s in shapes]
            dummy = [torch.randn(s, generator=generator).requires_grad_(True) for s in shapes]
            got = call_student(fn, dummy, [s.clone() for s in shared])
            _require(isinstance(got, torch.Tensor), f"return a tensor, got {type(got).__name__}.")
            _require(got.numel() == 1, f"return a single number (a scalar tensor), got shape {tuple(got.shape)}.")
            _require(got.requires_grad, "the result does not require grad: keep it a function of the dummy gradients (no .item(), .detach() or torch.tensor(...)).")
            value = float(_tensor(got, "the distance"))
            want = sum(float(((d.detach().double() - s.double()) ** 2).sum()) for d, s in zip(dummy, shared))
            total = sum(d.numel() for d in dummy)
            if abs(value * total - want) < 1e-4 * want:
                raise ExerciseFailure(f"got {value:.4f}, the mean of the squared differences; DLG's distance is their sum ({want:.4f}).")
            _require(abs(value - want) < 1e-4 * max(1.0, want), f"got {value:.4f}, expected {want:.4f} (the sum of squared differences over all tensors).")
            slopes = torch.autograd.grad(got, dummy, allow_unused=True)
            for i, (slope, d, s) in enumerate(zip(slopes, dummy, shared)):
                _require(slope is not None, f"the distance does not depend on dummy tensor {i}: add up every pair.")
                _require(torch.allclose(slope, 2 * (d.detach() - s), atol=1e-5), f"the distance's gradient with respect to dummy tensor {i} is not 2 (dummy - shared).")
            values.append(want)
        zero = _tensor(torch.as_tensor(call_student(fn, [s.clone() for s in shared], shared)), "the distance")
        _require(abs(float(zero)) < 1e-8, "the distance between a gradient and itself should be 0.")
        return f"Distance correct on 2 private cases ({values[0]:.3f}, {values[1]:.3f}) and differentiable."

    return _report("Exercise 2.2 (gradient-matching loss)", body)


def _private_face(generator: torch.Generator) -> torch.Tensor:
    """A 16x16 face no data set holds: a random LFW face, maybe mirrored, with a random contrast
    and brightness."""
    faces, _ = data.lfw_faces(100, size=16)
    index = randint(generator, 0, len(faces))
    face = faces[index : index + 1]
    if randint(generator, 0, 2):
        face = face.flip(-1)
    contrast, brightness = 0.7 + 0.3 * torch.rand(1, generator=generator), 0.15 * torch.rand(1, generator=generator)
    return (contrast * face + brightness).clamp(0, 1)


def _attack_cases(fn: Callable, activation: str, threshold: float, advice: str, on_mean: bool = False, faces: int = 2) -> str:
    """Run the student's attack on ``faces`` private 16x16 faces; require ``threshold`` dB PSNR on
    each (``on_mean``: on their mean)."""
    generator = fresh_generator()
    labels = torch.randperm(10, generator=generator)[:faces]
    scores = []
    for trial in range(faces):
        x, y = _private_face(generator), labels[trial : trial + 1].clone()
        init = "uniform" if activation == "sigmoid" else "default"  # a ReLU network gets PyTorch's init, as in practice
        model = _lenet(generator, classes=10, activation=activation, init=init)
        grads = _gradients(model, x, y)
        rec = _tensor(call_student(fn, copy.deepcopy(model), [g.clone() for g in grads], tuple(x.shape), y.clone()), "the reconstruction")
        _require(rec.shape == x.shape, f"return a tensor of shape {tuple(x.shape)}, got {tuple(rec.shape)}.")
        scores.append(_psnr(rec, x))
        _require(on_mean or scores[-1] >= threshold, f"private face {trial}: PSNR {scores[-1]:.1f} dB, below {threshold:g} dB. {advice}")
    mean = sum(scores) / len(scores)
    listed = ", ".join(f"{s:.1f}" for s in scores)
    _require(not on_mean or mean >= threshold, f"PSNR {listed} dB on {faces} private faces, mean {mean:.1f} dB, below {threshold:g} dB. {advice}")
    target = f"mean {mean:.1f} dB, target {threshold:g} dB" if on_mean else f"target {threshold:g} dB on each"
    return f"PSNR {listed} dB on {faces} private faces ({activation} LeNet; {target})."


def check_dlg_attack(fn: Callable, threshold: float = DLG_TARGET_DB) -> bool:
    """Exercise 2.3: ``fn(model, shared_grads, shape, label)`` returns a reconstruction (N, C, H, W)
    of a private 16x16 face; passes at PSNR >= ``threshold`` dB on each of 2 faces. May use: torch
    and your ``gradient_matching_loss``."""
    return _report(
        "Exercise 2.3 (DLG attack)",
        lambda: _attack_cases(fn, "sigmoid", threshold, "More iterations? L-BFGS with line_search_fn='strong_wolfe'? A restart from new noise when the distance stalls? Is the label used?"),
        {"does not require grad": _CREATE_GRAPH, "does not have a grad_fn": _CREATE_GRAPH},
    )


def check_relu_attack(fn: Callable, threshold: float = RELU_TARGET_DB) -> bool:
    """Exercise 2.4 (open): ``fn(model, shared_grads, shape, label)`` attacks a *ReLU* LeNet (with
    PyTorch's default initialisation); passes when the reconstructions of 4 private 16x16 faces
    reach ``threshold`` dB PSNR on average (4, not 2: a few ReLU models are hard for every attack,
    and the mean of 4 keeps one of them from deciding). May use: torch."""
    return _report(
        "Exercise 2.4 (open: attack a ReLU network)",
        lambda: _attack_cases(fn, "relu", threshold, "Try another distance (cosine), optimiser (Adam), a prior (total variation) or clamping to [0, 1].", on_mean=True, faces=4),
        {"does not require grad": _CREATE_GRAPH, "does not have a grad_fn": _CREATE_GRAPH},
    )


# --- chapter 3 -----------------------------------------------------------------------------

def check_align_batch(fn: Callable) -> bool:
    """Exercise 3.1: ``fn(reconstruction, original)`` returns ``perm`` (B,) such that
    ``reconstruction[perm[j]]`` is paired with ``original[j]``, with the lowest total MSE.
    May use: torch, numpy, scipy."""
    from scipy.optimize import linear_sum_assignment

    def body() -> str:
        generator = fresh_generator()
        for trial in range(5):
            b = randint(generator, 4, 8)
            # similar images (one base, small differences) and noisy reconstructions: the nearest
            # match of each original is often taken, so greedy pairing is rarely optimal
            base = torch.rand(1, 1, 8, 8, generator=generator)
            original = (base + 0.2 * (torch.rand(b, 1, 8, 8, generator=generator) - 0.5)).clamp(0, 1)
            shuffle = torch.randperm(b, generator=generator)
            noisy = (original + 0.3 * torch.randn(original.shape, generator=generator)).clamp(0, 1)[shuffle]
            perm = _tensor(call_student(fn, noisy.clone(), original.clone()), "perm")
            _require(perm.shape == (b,), f"return one index per original, shape ({b},), got {tuple(perm.shape)}.")
            perm = perm.long()
            _require(sorted(perm.tolist()) == list(range(b)), f"perm must be a permutation of 0..{b - 1}, got {perm.tolist()}.")
            cost = ((noisy[:, None] - original[None]) ** 2).flatten(2).mean(2).double().numpy()
            rows, cols = linear_sum_assignment(cost)
            best = float(cost[rows, cols].sum())
            got = float(sum(cost[int(perm[j]), j] for j in range(b)))
            _require(got <= best * (1 + 1e-6), f"case {trial}: your pairing costs {got:.4f} (total MSE), the best costs {best:.4f}. Greedy matching is not enough; is perm turned the right way round?")
        return "Optimal pairings on 5 private noisy, shuffled batches."

    return _report("Exercise 3.1 (align a batch)", body)


def _batch_bias_gradient(generator: torch.Generator, labels: torch.Tensor, classes: int) -> torch.Tensor:
    # PyTorch's init: the label rules' assumption (no class predicted confidently) holds; see chapter 3
    model = _lenet(generator, classes=classes, init="default")
    x = torch.rand(len(labels), 1, 16, 16, generator=generator)
    return _gradients(model, x, labels)[-1]


def check_batch_label_set(fn: Callable) -> bool:
    """Exercise 3.2: ``fn(bias_grad, batch_size)`` returns the batch's labels (distinct) from the
    last layer's bias gradient of a mean batch loss. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        for trial in range(6):
            b = [2, 4, 6][trial % 3]
            y = torch.randperm(20, generator=generator)[:b]
            bias_grad = _batch_bias_gradient(generator, y, classes=20)
            got = sorted(_as_int_list(call_student(fn, bias_grad.clone(), b), "the labels"))
            _require(len(got) == b, f"case {trial}: return {b} labels, got {len(got)}.")
            _require(got == sorted(y.tolist()), f"case {trial}: you said {got}, the labels were {sorted(y.tolist())}. Each present class pulls its entry down by 1/B: take the B most negative entries.")
        return "6 of 6 private batches' labels recovered."

    return _report("Exercise 3.2 (labels of a batch)", body)


def check_batch_label_counts(fn: Callable, target: int = LABEL_COUNT_TARGET) -> bool:
    """Exercise 3.3 (open): ``fn(bias_grad, batch_size)`` returns the batch's ``batch_size`` labels
    *with repeats* (any order). Passes when at least ``target`` of 10 private batches (sizes 4, 6
    or 8, each with a repeated label, 10 classes) are exactly right. May use: torch."""

    def body() -> str:
        generator = fresh_generator()
        right, wrong = 0, []
        for trial in range(10):
            b = [4, 6, 8][trial % 3]
            while True:  # at least one label repeats
                y = torch.randint(10, (b,), generator=generator)
                if len(set(y.tolist())) < b:
                    break
            bias_grad = _batch_bias_gradient(generator, y, classes=10)
            got = sorted(_as_int_list(call_student(fn, bias_grad.clone(), b), "the labels"))
            _require(len(got) == b, f"batch {trial}: return {b} labels (with repeats), got {len(got)}.")
            if got == sorted(y.tolist()):
                right += 1
            else:
                wrong.append(f"you said {got}, the labels were {sorted(y.tolist())}")
        if right < target:
            raise ExerciseFailure(f"{right} of 10 private batches right, the target is {target}; e.g. {wrong[0]}. A class seen n times pulls its entry down by about n/B, on top of the mean probability, which the absent classes show.")
        return f"{right} of 10 private batches' label counts exactly right (target {target})."

    return _report("Exercise 3.3 (open: labels with repeats)", body)
