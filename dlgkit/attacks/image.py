"""Deep Leakage from Gradients for images (Zhu, Liu and Han, 2019) and its refinements.

Start from random noise (and, in DLG, a random soft label), compute the gradient that this
dummy example would produce on the shared model, and move the dummy so that its gradient
matches the one the client shared. The gradient distance is differentiated with respect to
the dummy input, which needs second derivatives of the model (hence smooth activations).

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dlgkit.attacks.labels import batch_labels, idlg_label
from dlgkit.budget import progress_enabled
from dlgkit.federated import check_gradients, soft_cross_entropy
from dlgkit.models import warn_if_non_smooth

__all__ = ["AttackResult", "reconstruct", "gradient_distance", "total_variation", "PAPER_DLG", "RECOMMENDED", "RECOMMENDED_BATCH"]

DISTANCES = ("l2", "cosine")
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("gaussian", "uniform")
LABEL_MODES = ("joint", "idlg")

#: DLG exactly as in the paper's code: a random soft label optimised jointly with the image,
#: Gaussian noise as the start, L-BFGS with step 1 and no line search, 300 steps. The early
#: stop once the gradient distance is below 1e-6 is dlgkit's, not the paper's (its code always
#: runs every step); it only saves time once the image is back.
PAPER_DLG = dict(labels="joint", init="gaussian", optimizer="lbfgs", lr=1.0, line_search=False, iterations=300, restarts=1, tol=1e-6, tol_relative=False, patience=None)

#: The course's recommendation for one image: the label read off the gradient (iDLG), a start
#: drawn uniformly in [0, 1], L-BFGS with a strong-Wolfe line search (no divergence), a stop
#: once the distance is below 1e-8 of the shared gradient's squared norm (scale-free, unlike the
#: absolute 1e-6 of :data:`PAPER_DLG`), and up to four restarts when a run stalls. Measured in
#: ``benchmarks/image_attacks.py``.
RECOMMENDED = dict(labels="idlg", init="uniform", optimizer="lbfgs", lr=1.0, line_search=True, iterations=300, restarts=4, tol=1e-8, tol_relative=True, patience=10)

#: For batches: :data:`RECOMMENDED` plus a small total-variation prior (weight 3e-4, tuned on
#: batches of 8 LFW faces on the paper's LeNet). Without it, L-BFGS stalls on batches of 8 with
#: every image uniformly noisy (about 20 dB); the prior removes that noise (about 35-40 dB).
#: Measured in ``benchmarks/image_attacks.py``.
RECOMMENDED_BATCH = dict(RECOMMENDED, tv=3e-4)


def gradient_distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor], distance: str = "l2") -> torch.Tensor:
    """Distance between two gradient lists: ``"l2"`` is the paper's sum of squared differences,
    ``"cosine"`` is ``1 - cos`` between the two gradients seen as one long vector
    (Geiping et al., 2020). Defined in :doc:`/book/02_single_image_dlg`."""
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not known; choose one of {list(DISTANCES)}.")
    if distance == "l2":
        return sum(((d - t) ** 2).sum() for d, t in zip(dummy, target))
    dot = sum((d * t).sum() for d, t in zip(dummy, target))
    norm_d = torch.sqrt(sum((d * d).sum() for d in dummy))
    norm_t = torch.sqrt(sum((t * t).sum() for t in target))
    return 1 - dot / (norm_d * norm_t + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (a smoothness prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@dataclass
class AttackResult:
    """What an attack returns: the reconstruction, its labels and how it got there.

    ``losses`` is the gradient distance after every iteration of the best restart;
    ``history`` holds snapshots (clamped to [0, 1]) at ``history_iters``; ``restart_losses``
    the final distance of each restart (``inf`` where it diverged) and ``statuses`` how each
    ended (``converged``, ``stalled``, ``diverged`` or ``budget``).
    """

    reconstruction: torch.Tensor
    labels: torch.Tensor
    losses: list[float]
    history: list[torch.Tensor]
    history_iters: list[int]
    wall_time: float
    restart_losses: list[float] = field(default_factory=list)
    best_restart: int = 0
    statuses: list[str] = field(default_factory=list)
    label_mode: str = "known"
    label_probs: torch.Tensor | None = None

    @property
    def iterations(self) -> int:
        """How many iterations the best restart ran (fewer than the budget if it stopped early)."""
        return len(self.losses)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.inf

    def report(self, original: torch.Tensor, true_labels: torch.Tensor | None = None, align: bool = True) -> dict[str, float]:
        """Metrics against the ground truth: MSE, PSNR, SSIM (means over the batch), label
        accuracy when ``true_labels`` is given, gradient distance, iterations and wall time.

        A batch is first aligned to the originals (:func:`dlgkit.metrics.align`, Hungarian
        matching on MSE) unless ``align=False``; the report then adds ``label_set_accuracy``
        (order-free) and keeps per-image values under ``psnr_per_image``/``ssim_per_image``."""
        from dlgkit import metrics

        rec = self.reconstruction.clamp(0, 1).cpu()
        original = original.detach().cpu()
        if rec.shape[0] > 1 and align:
            batch = metrics.batch_report(rec, original, self.labels, true_labels)
            out = {k: v for k, v in batch.items() if k != "perm"}
        else:
            out = {
                "mse": float(torch.as_tensor(metrics.mse(rec, original)).mean()),
                "psnr": float(torch.as_tensor(metrics.psnr(rec, original)).mean()),
                "ssim": float(torch.as_tensor(metrics.ssim(rec, original)).mean()),
            }
            if true_labels is not None:
                out["label_accuracy"] = metrics.label_accuracy(self.labels, true_labels)
        out.update(grad_distance=self.final_loss, iterations=float(self.iterations), wall_time=self.wall_time)
        return out


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; choose one of {list(allowed)}.")


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _resolve_labels(model: nn.Module, target: list[torch.Tensor], labels: object, num_classes: int, shape: tuple[int, ...]) -> tuple[str, torch.Tensor | None]:
    batch = shape[0]
    if isinstance(labels, str):
        _check_choice("labels", labels, LABEL_MODES)
        if labels == "idlg":
            if batch == 1:
                return "idlg", torch.tensor([idlg_label(model, target)])
            return "idlg", batch_labels(model, target, batch, rule="probe", input_shape=shape)
        return "joint", None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be 'joint', 'idlg' or a tensor of class indices, got {type(labels).__name__}.")
    labels = labels.reshape(-1).long()
    if labels.numel() != batch:
        raise ValueError(f"labels has {labels.numel()} entries but shape asks for a batch of {batch}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}.")
    return "known", labels


def reconstruct(
    model: nn.Module,
    target_gradients: Sequence[torch.Tensor],
    shape: Sequence[int],
    *,
    labels: str | torch.Tensor = "idlg",
    num_classes: int | None = None,
    distance: str = "l2",
    tv: float = 0.0,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    iterations: int = 300,
    restarts: int = 1,
    init: str = "uniform",
    clamp: bool = False,
    tol: float | None = 1e-8,
    tol_relative: bool = True,
    patience: int | None = 10,
    restart_policy: str = "failed",
    line_search: bool = True,
    history_every: int | None = 10,
    seed: int = 0,
    progress: bool | None = None,
) -> AttackResult:
    """Reconstruct the input (and label) that produced ``target_gradients`` on ``model``.

    Parameters (keyword-only after ``shape``):

    - ``shape``: the dummy batch's shape ``(N, C, H, W)``; the attacker is assumed to know it.
    - ``labels``: ``"joint"`` optimises a soft label with the image (DLG); ``"idlg"`` reads the
      label from the last layer's gradient first (iDLG for one example; for a batch the
      ``"probe"`` rule of :func:`dlgkit.attacks.labels.batch_labels`, which counts repeated
      labels and survives a confident model); a tensor means known labels.
    - ``distance``: ``"l2"`` (paper) or ``"cosine"``; ``tv`` weights a total-variation prior.
    - ``optimizer``: ``"lbfgs"`` (paper; ``lr`` defaults to 1) or ``"adam"`` (``lr`` 0.1);
      ``line_search=True`` (default) gives L-BFGS a strong-Wolfe line search; the paper used none.
    - ``iterations``: optimiser steps per restart (one L-BFGS step runs up to 20 evaluations).
    - ``restarts``: at most this many runs from independent random starts; the one with the
      lowest final distance wins. With ``restart_policy="failed"`` (default) a new start is only
      tried after a run diverged (NaN) or stalled (an L-BFGS run that has not improved for
      ``patience`` iterations; None: never) more than 1000 times above ``tol``; a run that
      converged, stalled close to ``tol``, or used its whole budget while still improving ends
      the attack.
      ``"always"`` runs them all. Adam's noisy curve is never cut short.
    - ``tol``: a run stops once the distance falls below it. With ``tol_relative=True`` the
      threshold is ``tol`` times the shared gradient's squared norm divided by B² (L2
      distance): free of the model's gradient scale, and as strict per image for a batch, whose
      images each enter the mean gradient with weight 1/B.
    - ``init``: dummy starts as ``"gaussian"`` noise (paper) or ``"uniform"`` noise in [0, 1].
    - ``clamp``: project the dummy onto [0, 1] after every step.
    - ``history_every``: keep a snapshot every k iterations (and at 0); None keeps none.
    - ``progress``: a tqdm bar per restart (None: on unless ``DLGKIT_PROGRESS=0``).

    The defaults are the course's recommended attack (see :data:`RECOMMENDED`, which also sets
    ``restarts=4``); ``reconstruct(..., **PAPER_DLG)`` reproduces the paper.

    Defined in :doc:`/book/02_single_image_dlg`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    target = [t.detach() for t in check_gradients(model, target_gradients, name="target_gradients")]
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
    if not isinstance(shape, tuple) or len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"shape must be (N, C, H, W) with positive sizes, got {shape!r}.")
    _check_choice("distance", distance, DISTANCES)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("init", init, INITS)
    _check_positive_int("iterations", iterations)
    _check_positive_int("restarts", restarts)
    _check_choice("restart_policy", restart_policy, ("failed", "always"))
    if history_every is not None:
        _check_positive_int("history_every", history_every)
    if patience is not None:
        _check_positive_int("patience", patience)
    if tv < 0:
        raise ValueError(f"tv must be >= 0, got {tv!r}.")
    warn_if_non_smooth(model)
    progress = progress_enabled(progress)

    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    if num_classes is None:
        num_classes = int(getattr(model, "num_classes", 0)) or None
    if num_classes is None:
        raise ValueError("num_classes is needed: the model has no num_classes attribute.")
    mode, known = _resolve_labels(model, target, labels, num_classes, shape)
    target = [t.to(device) for t in target]
    lr = lr if lr is not None else (1.0 if optimizer == "lbfgs" else 0.1)
    if tol is not None and tol_relative and distance == "l2":
        tol = tol * float(sum((t.double() ** 2).sum() for t in target)) / shape[0] ** 2

    start_time = time.perf_counter()
    best: dict | None = None
    restart_losses: list[float] = []
    statuses: list[str] = []
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for restart in range(restarts):
        run = _single_run(
            model, params, target, shape, mode, known, num_classes, distance, tv, optimizer, lr,
            iterations, init, clamp, tol, patience, line_search, history_every, generator, device,
            progress=progress, desc=f"DLG restart {restart + 1}/{restarts}" if restarts > 1 else "DLG",
        )
        restart_losses.append(run["final"])
        statuses.append(run["status"])
        if best is None or run["final"] < best["final"]:
            best = dict(run, restart=restart)
        failed = run["status"] == "diverged" or (run["status"] == "stalled" and (tol is None or run["final"] > 1e3 * tol))
        if restart_policy == "failed" and not failed:
            break  # converged, still improving at the end of its budget, or stalled close to tol
    assert best is not None
    return AttackResult(
        reconstruction=best["x"],
        labels=best["labels"],
        losses=best["losses"],
        history=best["history"],
        history_iters=best["history_iters"],
        wall_time=time.perf_counter() - start_time,
        restart_losses=restart_losses,
        statuses=statuses,
        best_restart=best["restart"],
        label_mode=mode,
        label_probs=best["probs"],
    )


def _single_run(model, params, target, shape, mode, known, num_classes, distance, tv, optimizer, lr,
                iterations, init, clamp, tol, patience, line_search, history_every, generator, device, progress, desc) -> dict:
    noise = torch.randn(shape, generator=generator) if init == "gaussian" else torch.rand(shape, generator=generator)
    dummy = noise.to(device=device, dtype=params[0].dtype).contiguous().requires_grad_(True)
    variables = [dummy]
    if mode == "joint":
        dummy_label = torch.randn((shape[0], num_classes), generator=generator).to(device=device, dtype=params[0].dtype).requires_grad_(True)
        variables.append(dummy_label)
    else:
        hard = known.to(device)

    def objective(prior: bool = True) -> torch.Tensor:
        target_y = F.softmax(dummy_label, dim=-1) if mode == "joint" else hard
        loss = soft_cross_entropy(model(dummy), target_y)
        grads = torch.autograd.grad(loss, params, create_graph=prior)
        value = gradient_distance(grads, target, distance)
        if tv > 0 and prior:
            value = value + tv * total_variation(dummy)
        return value

    if optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            variables, lr=lr, max_iter=20, history_size=100, line_search_fn="strong_wolfe" if line_search else None
        )
    else:
        opt = torch.optim.Adam(variables, lr=lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    history, history_iters, losses = [], [], []

    def snapshot(i: int) -> None:
        if history_every is not None and i % history_every == 0:
            history.append(dummy.detach().clamp(0, 1).cpu().clone())
            history_iters.append(i)

    snapshot(0)
    diverged, status = False, "budget"
    bar = tqdm(range(1, iterations + 1), desc=desc, disable=not progress, leave=False)
    for i in bar:
        before = opt.step(closure)
        if clamp:
            with torch.no_grad():
                dummy.clamp_(0, 1)
        # L-BFGS moves a long way within one step, so measure where it landed (one extra
        # evaluation against up to 20 inside the step); Adam's own value is one step behind.
        # With a prior, the reported distance (and the stopping rules) are the gradient distance alone.
        current = float(objective(prior=False).detach()) if optimizer == "lbfgs" or tv > 0 else float(before.detach())
        if not math.isfinite(current):
            diverged, status = True, "diverged"
            losses.append(math.inf)
            break
        losses.append(current)
        snapshot(i)
        if progress and i % 10 == 0:
            bar.set_postfix(distance=f"{current:.2e}")
        if tol is not None and current < tol:
            status = "converged"
            break
        if optimizer == "lbfgs" and patience is not None and len(losses) > patience and losses[-1] >= losses[-1 - patience] * (1 - 1e-9):
            status = "stalled"  # no progress in `patience` steps: a restart is cheaper
            break
    bar.close()
    if history_every is not None and history_iters[-1] != len(losses) and not diverged:
        history.append(dummy.detach().clamp(0, 1).cpu().clone())
        history_iters.append(len(losses))
    if mode == "joint":
        probs = F.softmax(dummy_label.detach(), dim=-1).cpu()
        labels = probs.argmax(dim=-1)
    else:
        probs, labels = None, known.cpu()
    return {
        "x": dummy.detach().cpu(),
        "labels": labels,
        "probs": probs,
        "losses": losses,
        "history": history,
        "history_iters": history_iters,
        "final": math.inf if diverged else losses[-1],
        "status": status,
    }
