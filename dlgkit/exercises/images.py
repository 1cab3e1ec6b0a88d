"""Checks for the exercises of chapters 1-3 (gradients, single-image DLG, batches)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dlgkit import attacks, data, federated, metrics, models
from dlgkit.exercises._common import _report, _require, _tensor

__all__ = [
    "check_shared_gradient",
    "check_input_from_linear_gradient",
    "check_batch_mixing_weights",
    "check_label_from_gradient",
    "check_gradient_matching_loss",
    "check_dlg_attack",
    "check_relu_attack",
    "check_align_batch",
    "check_batch_label_set",
]


def _mlp(seed: int, d_in: int = 12, hidden: int = 7, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Sigmoid(), nn.Linear(hidden, classes))



# --- chapter 1 -----------------------------------------------------------------------------

def check_shared_gradient(fn: Callable) -> bool:
    """Exercise 1.1: ``fn(model, x, y)`` returns the list of gradients a FedSGD client shares."""

    def body() -> str:
        for seed in range(3):
            model = _mlp(seed)
            x, y = torch.rand(5, 12), torch.randint(4, (5,))
            got = fn(model, x, y)
            _require(isinstance(got, (list, tuple)), f"return a list of tensors, got {type(got).__name__}.")
            want = federated.client_gradient(model, x, y)
            _require(len(got) == len(want), f"expected {len(want)} tensors (one per parameter), got {len(got)}.")
            for i, (g, w) in enumerate(zip(got, want)):
                g = _tensor(g, f"gradient {i}")
                _require(g.shape == w.shape, f"gradient {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}.")
                err = float((g.detach() - w).abs().max())
                _require(err < 1e-5, f"gradient {i} is off by up to {err:.2e}: is the loss the mean cross-entropy over the batch?")
        return "Your gradients equal PyTorch's on 3 random models and batches."

    return _report("Exercise 1.1 (what a client shares)", body)


def check_input_from_linear_gradient(fn: Callable) -> bool:
    """Exercise 1.2: ``fn(weight_grad, bias_grad)`` returns the input of the linear layer."""

    def body() -> str:
        worst = 0.0
        for seed in range(5):
            model = _mlp(seed)
            x, y = torch.rand(1, 12), torch.randint(4, (1,))
            grads = federated.client_gradient(model, x, y)
            if seed == 4:  # a dead unit: a row whose bias gradient is exactly zero must be avoided
                grads[0][0].zero_()
                grads[1][0] = 0.0
            got = _tensor(fn(grads[0], grads[1]), "the recovered input")
            _require(got.numel() == 12, f"expected the 12 input values, got a tensor of shape {tuple(got.shape)}.")
            worst = max(worst, float((got.reshape(-1) - x.reshape(-1)).abs().max()))
            _require(torch.isfinite(got).all(), "the result contains inf or NaN: did you divide by a zero bias gradient?")
        _require(worst < 1e-5, f"max abs error {worst:.2e}; expected an exact recovery (< 1e-5).")
        return f"Exact recovery on 5 random layers (max abs error {worst:.1e})."

    return _report("Exercise 1.2 (input from a linear layer)", body)


def check_batch_mixing_weights(fn: Callable) -> bool:
    """Exercise 1.3: ``fn(model, x, y, row)`` returns the weights alpha (B,) such that
    ``weight_grad[row] / bias_grad[row] == sum_k alpha_k x_k`` for the first layer."""

    def body() -> str:
        for seed in range(3):
            model = _mlp(seed)
            x, y = torch.rand(4, 12), torch.randint(4, (4,))
            grads = federated.client_gradient(model, x, y)
            row = int(grads[1].abs().argmax())
            alpha = _tensor(fn(model, x, y, row), "alpha")
            _require(alpha.shape == (4,), f"alpha should have one weight per example, shape (4,), got {tuple(alpha.shape)}.")
            alpha = alpha.detach().float()
            _require(abs(float(alpha.sum()) - 1.0) < 1e-4, f"the weights should sum to 1, they sum to {float(alpha.sum()):.4f}.")
            mix = grads[0][row] / grads[1][row]
            err = float((alpha @ x - mix).abs().max())
            _require(err < 1e-4, f"sum_k alpha_k x_k differs from the division by up to {err:.2e}.")
        return "Your weights reproduce the mixed input on 3 random batches."

    return _report("Exercise 1.3 (what a batch does)", body)


# --- chapter 2 -----------------------------------------------------------------------------

def check_label_from_gradient(fn: Callable) -> bool:
    """Exercise 2.1: ``fn(bias_grad)`` returns the label (an int) from the last layer's bias gradient."""

    def body() -> str:
        model = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0)
        generator = torch.Generator().manual_seed(1)
        for trial in range(10):
            x = torch.rand(1, 1, 16, 16, generator=generator)
            y = torch.randint(10, (1,), generator=generator)
            grads = federated.client_gradient(model, x, y)
            got = fn(grads[-1])
            _require(isinstance(got, int) or (isinstance(got, torch.Tensor) and got.numel() == 1), f"return one label (an int), got {type(got).__name__}.")
            _require(int(got) == int(y), f"trial {trial}: you said {int(got)}, the label was {int(y)}.")
        return "10 of 10 labels read correctly."

    return _report("Exercise 2.1 (label from the gradient)", body)


def check_gradient_matching_loss(fn: Callable) -> bool:
    """Exercise 2.2: ``fn(dummy_grads, shared_grads)`` returns DLG's distance as a scalar tensor
    that can be differentiated."""

    def body() -> str:
        generator = torch.Generator().manual_seed(2)
        shapes = [(3, 4), (3,), (2, 3)]
        shared = [torch.randn(s, generator=generator) for s in shapes]
        dummy = [torch.randn(s, generator=generator).requires_grad_(True) for s in shapes]
        got = _tensor(fn(dummy, shared), "the distance")
        _require(got.numel() == 1, f"return a single number (a scalar tensor), got shape {tuple(got.shape)}.")
        want = float(attacks.gradient_distance([d.detach() for d in dummy], shared, "l2"))
        value = float(got.detach())
        _require(abs(value - want) < 1e-4 * max(1.0, want), f"got {value:.4f}, expected {want:.4f} (the sum of squared differences over all tensors).")
        _require(got.requires_grad, "the result does not require grad: keep it a function of the dummy gradients (no .item() or .detach()).")
        got.backward()
        _require(all(d.grad is not None for d in dummy), "the distance must depend on every dummy gradient tensor.")
        zero = fn([s.clone() for s in shared], shared)
        _require(abs(float(torch.as_tensor(zero).detach())) < 1e-8, "the distance between a gradient and itself should be 0.")
        return f"Distance correct ({want:.3f}) and differentiable."

    return _report("Exercise 2.2 (gradient-matching loss)", body)


def _face_problem(activation: str, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    x, _ = data.lfw_faces(1, size=16, start=3)
    y = torch.tensor([2])
    init = "uniform" if activation == "sigmoid" else "default"  # a ReLU network gets PyTorch's init, as in practice
    model = models.LeNet(channels=1, num_classes=10, image_size=16, activation=activation, seed=seed, init=init)
    return model, federated.client_gradient(model, x, y), x, y


def _face_attack_psnr(fn: Callable, activation: str, threshold: float, advice: str) -> str:
    """Run the student's attack on the 16x16 face problem and require ``threshold`` dB PSNR."""
    model, grads, x, y = _face_problem(activation)
    rec = _tensor(fn(model, grads, tuple(x.shape), y), "the reconstruction")
    _require(rec.shape == x.shape, f"return a tensor of shape {tuple(x.shape)}, got {tuple(rec.shape)}.")
    value = float(metrics.psnr(rec.detach(), x))
    _require(value >= threshold, f"PSNR {value:.1f} dB, below {threshold} dB. {advice}")
    return f"PSNR {value:.1f} dB on a {activation} network."


def check_dlg_attack(fn: Callable, threshold: float = 30.0) -> bool:
    """Exercise 2.3: ``fn(model, shared_grads, shape, label)`` returns a reconstruction (N, C, H, W)
    of a 16x16 face; passes at PSNR >= ``threshold`` dB."""
    return _report(
        "Exercise 2.3 (DLG attack)",
        lambda: _face_attack_psnr(fn, "sigmoid", threshold, "More iterations? L-BFGS? Is the label used?"),
    )


def check_relu_attack(fn: Callable, threshold: float = 20.0) -> bool:
    """Exercise 2.4 (open): ``fn(model, shared_grads, shape, label)`` attacks a *ReLU* LeNet (with
    PyTorch's default initialisation); passes when the reconstruction of a 16x16 face reaches
    ``threshold`` dB PSNR. The recommended L-BFGS attack reaches about 14 dB there."""
    return _report(
        "Exercise 2.4 (attack a ReLU network)",
        lambda: _face_attack_psnr(fn, "relu", threshold, "Try another distance, optimiser or start."),
    )


# --- chapter 3 -----------------------------------------------------------------------------

def check_align_batch(fn: Callable) -> bool:
    """Exercise 3.1: ``fn(reconstruction, original)`` returns ``perm`` (B,) such that
    ``reconstruction[perm[j]]`` is paired with ``original[j]``, with the lowest total MSE."""
    from scipy.optimize import linear_sum_assignment

    def body() -> str:
        generator = torch.Generator().manual_seed(3)
        for trial in range(5):
            b = 6
            original = torch.rand(b, 1, 8, 8, generator=generator)
            shuffle = torch.randperm(b, generator=generator)
            noisy = (original + 0.35 * torch.randn(original.shape, generator=generator)).clamp(0, 1)[shuffle]
            perm = _tensor(fn(noisy, original), "perm")
            _require(perm.shape == (b,), f"return one index per original, shape ({b},), got {tuple(perm.shape)}.")
            perm = perm.long()
            _require(sorted(perm.tolist()) == list(range(b)), f"perm must be a permutation of 0..{b - 1}, got {perm.tolist()}.")
            cost = ((noisy[:, None] - original[None]) ** 2).flatten(2).mean(2).double().numpy()
            rows, cols = linear_sum_assignment(cost)
            best = float(cost[rows, cols].sum())
            got = float(sum(cost[int(perm[j]), j] for j in range(b)))
            _require(got <= best * (1 + 1e-6), f"trial {trial}: your pairing costs {got:.4f} (total MSE), the best costs {best:.4f}. Greedy matching is not enough.")
        return "Optimal pairings on 5 noisy, shuffled batches."

    return _report("Exercise 3.1 (align a batch)", body)


def check_batch_label_set(fn: Callable) -> bool:
    """Exercise 3.2: ``fn(bias_grad, batch_size)`` returns the batch's labels (distinct) from the
    last layer's bias gradient of a mean batch loss."""

    def body() -> str:
        generator = torch.Generator().manual_seed(4)
        for trial in range(10):
            # PyTorch's init: the rule's assumption (no class predicted confidently) holds; see chapter 3
            model = models.LeNet(channels=1, num_classes=20, image_size=16, seed=trial, init="default")
            b = [2, 4, 6][trial % 3]
            x = torch.rand(b, 1, 16, 16, generator=generator)
            y = torch.randperm(20, generator=generator)[:b]
            grads = federated.client_gradient(model, x, y)
            got = fn(grads[-1], b)
            got = sorted(int(v) for v in (got.tolist() if isinstance(got, torch.Tensor) else got))
            _require(len(got) == b, f"trial {trial}: return {b} labels, got {len(got)}.")
            _require(got == sorted(y.tolist()), f"trial {trial}: you said {got}, the labels were {sorted(y.tolist())}.")
        return "10 of 10 batches' labels recovered."

    return _report("Exercise 3.2 (labels of a batch)", body)
