"""Deep Leakage from Gradients for images (Zhu, Liu and Han, 2019) and its refinements.

Start from random noise (and, in DLG, a random soft label), compute the gradient that this
dummy example would produce on the shared model, and move the dummy so that its gradient
matches the one the client shared. The gradient distance is differentiated with respect to
the dummy input, which needs second derivatives of the model (hence smooth activations).
The loop itself is :mod:`dlgkit.attacks.engine`'s; this module builds the image problem.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlgkit.attacks import engine
from dlgkit.attacks.engine import PAPER_DLG, RECOMMENDED, RECOMMENDED_BATCH, AttackConfig, gradient_distance
from dlgkit.attacks.labels import batch_labels, idlg_label, last_linear_layer
from dlgkit.checks import SUCCESS_PSNR, check_positive_int
from dlgkit.federated import check_gradients
from dlgkit.models import warn_if_non_smooth

__all__ = ["AttackConfig", "AttackResult", "AttackReport", "reconstruct", "gradient_distance", "total_variation", "PAPER_DLG", "RECOMMENDED", "RECOMMENDED_BATCH"]

#: ``observe(model, x, y) -> list[Tensor]``: what the server sees for input ``x`` with labels ``y``.
Observe = Callable[[nn.Module, torch.Tensor, torch.Tensor], list]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (a smoothness prior).
    Defined in :doc:`/book/03_batched_dlg`."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@dataclass(frozen=True)
class AttackReport:
    """Metrics of a reconstruction against the ground truth, the same fields for one image
    and for a batch: means over the batch (``mse``, ``psnr``, ``ssim``), per-image values
    (``psnr_per_image``, ``ssim_per_image``, after alignment), ``label_accuracy`` (aligned
    pairs) and ``label_set_accuracy`` (order-free; both None without true labels), the final
    gradient distance, iterations, wall time, the best trial's ``status`` and ``success``
    (mean PSNR >= :data:`dlgkit.checks.SUCCESS_PSNR`). A diverged attack or a reconstruction
    with NaN/inf has NaN metrics and ``success`` False. Fields can also be read as
    ``report["psnr"]``. Defined in :doc:`/book/02_single_image_dlg`."""

    mse: float
    psnr: float
    ssim: float
    psnr_per_image: torch.Tensor
    ssim_per_image: torch.Tensor
    label_accuracy: float | None
    label_set_accuracy: float | None
    grad_distance: float
    iterations: int
    wall_time: float
    status: str
    success: bool

    def __str__(self) -> str:
        """One line: the means, the label accuracy, the distance, iterations, time and status."""
        labels = "" if self.label_accuracy is None else f", label accuracy {self.label_accuracy:.3g}"
        if self.psnr_per_image.numel() > 1 and self.label_set_accuracy is not None:
            labels += f" (as a set {self.label_set_accuracy:.3g})"
        return (f"PSNR {self.psnr:.3g} dB, SSIM {self.ssim:.3g}, MSE {self.mse:.3g}{labels}, gradient distance {self.grad_distance:.3g}, "
                f"{self.iterations} iterations, {self.wall_time:.3g} s, {self.status}")

    def __getitem__(self, key: str) -> object:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"{key!r} is not a field of AttackReport; the fields are {[f.name for f in fields(self)]}.")
        return getattr(self, key)


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

    @property
    def status(self) -> str:
        """How the best restart ended."""
        return self.statuses[self.best_restart] if self.statuses else "budget"

    def report(self, original: torch.Tensor, true_labels: torch.Tensor | None = None, align: bool = True) -> AttackReport:
        """Metrics against the ground truth (:class:`AttackReport`). A batch is first aligned to
        the originals (:func:`dlgkit.metrics.align`, Hungarian matching on MSE) unless
        ``align=False``. Defined in :doc:`/book/02_single_image_dlg`."""
        from dlgkit import metrics

        if not isinstance(original, torch.Tensor) or tuple(original.shape) != tuple(self.reconstruction.shape):
            got = tuple(original.shape) if isinstance(original, torch.Tensor) else type(original).__name__
            raise ValueError(f"original must be the true batch, of shape {tuple(self.reconstruction.shape)} like the reconstruction, got {got}.")
        original = original.detach().cpu()
        n = original.shape[0]
        if true_labels is not None:
            true_labels = torch.as_tensor(true_labels).reshape(-1).cpu()
            if true_labels.numel() != n:
                raise ValueError(f"true_labels has {true_labels.numel()} entries for a batch of {n}.")
        rec = self.reconstruction.detach().cpu()
        common = dict(grad_distance=self.final_loss, iterations=self.iterations, wall_time=self.wall_time, status=self.status)
        if self.status == "diverged" or not bool(torch.isfinite(rec).all()):
            nan = torch.full((n,), math.nan)
            labelled = math.nan if true_labels is not None else None
            return AttackReport(mse=math.nan, psnr=math.nan, ssim=math.nan, psnr_per_image=nan, ssim_per_image=nan.clone(),
                                label_accuracy=labelled, label_set_accuracy=labelled, success=False, **common)
        rec = rec.clamp(0, 1)
        perm = metrics.align(rec, original) if n > 1 and align else torch.arange(n)
        aligned = rec[perm]
        per_psnr = torch.as_tensor(metrics.psnr(aligned, original)).reshape(-1)
        per_ssim = torch.as_tensor(metrics.ssim(aligned, original)).reshape(-1)
        per_mse = torch.as_tensor(metrics.mse(aligned, original)).reshape(-1)
        label_acc = set_acc = None
        if true_labels is not None:
            label_acc = metrics.label_accuracy(self.labels.reshape(-1)[perm], true_labels)
            set_acc = metrics.multiset_label_accuracy(self.labels.reshape(-1), true_labels)
        psnr = float(per_psnr.mean())
        return AttackReport(mse=float(per_mse.mean()), psnr=psnr, ssim=float(per_ssim.mean()), psnr_per_image=per_psnr, ssim_per_image=per_ssim,
                            label_accuracy=label_acc, label_set_accuracy=set_acc, success=psnr >= SUCCESS_PSNR, **common)


def _check_shape(shape: object) -> tuple[int, int, int, int]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) != 4:
        raise ValueError(f"shape must be the dummy batch's (N, C, H, W), four positive ints, got {shape!r}.")
    return tuple(check_positive_int(f"shape[{i}]", s, hint="shape is (N, C, H, W) of the batch to reconstruct.") for i, s in enumerate(shape))  # type: ignore[return-value]


def _check_num_classes(model: nn.Module, target: list[torch.Tensor], num_classes: int) -> None:
    """``num_classes`` must be the number of rows of the last linear layer's gradient."""
    try:
        w_idx, _ = last_linear_layer(model)
    except ValueError:
        return
    rows = target[w_idx].shape[0]
    if rows != num_classes:
        raise ValueError(f"num_classes={num_classes}, but the model's last layer has {rows} outputs (its gradient has {rows} rows); pass num_classes={rows} or leave it None.")


def _check_batch_size(model: nn.Module, target: list[torch.Tensor], batch: int) -> None:
    """The last linear layer's weight gradient, ``(1/B) sum_i (p_i - e_{y_i}) h_i^T``, has rank
    at most B, and B for B distinct examples (when B < number of classes and B <= its width).

    Singular values below ``3e-7`` of the largest are float32 rounding (1e-8 to 3e-8 for a
    float32 gradient or a sum of them): fewer singular values above that than ``shape[0]`` means the gradient
    came from fewer examples, an error. Between ``3e-7`` and ``1e-5`` lie examples the model
    already fits (a tiny loss, so a tiny share of the gradient, as in a SecAgg sum of chapter 7):
    a warning, since such images are hard to recover but the batch size may well be right."""
    try:
        w_idx, _ = last_linear_layer(model)
    except ValueError:
        return
    weight = target[w_idx].detach().double()
    if weight.dim() != 2 or batch > min(weight.shape[0] - 1, weight.shape[1]):
        return
    s = torch.linalg.svdvals(weight.cpu())
    if float(s[0]) <= 0:
        rank, clear = 0, 0
    else:
        rank, clear = int((s > 3e-7 * s[0]).sum()), int((s > 1e-5 * s[0]).sum())
    if rank < batch:
        raise ValueError(
            f"shape asks for a batch of {batch}, but the last layer's gradient has rank {rank}: it came from {rank} example(s) "
            f"(a batch of B distinct examples gives rank B). Pass the client's batch size as shape[0]."
        )
    if clear < batch:
        warnings.warn(
            f"the last layer's gradient has {clear} clear directions for a batch of {batch} (the others are 3e-7 to 1e-5 of the "
            f"largest): some examples barely contribute (the model already fits them) and will be hard to recover.",
            stacklevel=3,
        )


def _resolve_labels(model: nn.Module, target: list[torch.Tensor], labels: object, config: AttackConfig, num_classes: int, shape: tuple[int, ...]) -> tuple[str, torch.Tensor | None]:
    batch = shape[0]
    if labels is None:
        if config.labels == "idlg":
            if batch == 1:
                return "idlg", torch.tensor([idlg_label(model, target)])
            return "idlg", batch_labels(model, target, batch, rule="probe", input_shape=shape)
        return "joint", None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be None (use config.labels) or a tensor of class indices, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices (dtype int64), got dtype {labels.dtype}; a float label such as 3.7 is ambiguous.")
    labels = labels.detach().reshape(-1).long().cpu()
    if labels.numel() != batch:
        raise ValueError(f"labels has {labels.numel()} entries but shape asks for a batch of {batch}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}.")
    return "known", labels


def _checked_observation(seen: object, target: list[torch.Tensor]) -> list[torch.Tensor]:
    """``observe``'s output, checked against the target: a list of tensors, one per target
    tensor with its shape, differentiable with respect to the dummy input."""
    if not isinstance(seen, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in seen):
        raise TypeError(f"observe must return a list of tensors (one per target tensor), got {type(seen).__name__}; wrap a single tensor in a list: [g].")
    shapes, wanted = [tuple(t.shape) for t in seen], [tuple(t.shape) for t in target]
    if shapes != wanted:
        raise ValueError(f"observe returned {len(shapes)} tensor(s) of shapes {shapes[:4]}, but target_gradients has {len(wanted)} of shapes {wanted[:4]}; they must match tensor by tensor (no broadcasting).")
    if not any(t.requires_grad for t in seen):
        raise ValueError("observe returned tensors that do not depend on x (none requires grad): compute them differentiably, e.g. torch.autograd.grad(..., create_graph=True), and do not .detach() them.")
    return list(seen)


def _image_problem(model: nn.Module, target: list[torch.Tensor], shape: tuple[int, ...], config: AttackConfig, mode: str,
                   known: torch.Tensor | None, num_classes: int, observe: Observe | None, generator: torch.Generator) -> engine.Problem:
    """One random start: the dummy batch (and in ``joint`` mode a dummy soft label), drawn from
    ``generator``, and how the server would see it."""
    param = next(p for p in model.parameters() if p.requires_grad)
    noise = torch.randn(shape, generator=generator) if config.init == "gaussian" else torch.rand(shape, generator=generator)
    dummy = noise.to(device=param.device, dtype=param.dtype).contiguous().requires_grad_(True)
    variables = [dummy]
    if mode == "joint":
        dummy_label = torch.randn((shape[0], num_classes), generator=generator).to(device=param.device, dtype=param.dtype).requires_grad_(True)
        variables.append(dummy_label)
    else:
        hard = known.to(param.device)

    def seen(create_graph: bool) -> list[torch.Tensor]:
        y = F.softmax(dummy_label, dim=-1) if mode == "joint" else hard
        if observe is None:
            return engine.gradient_observation(model, dummy, y, create_graph=create_graph)
        return _checked_observation(observe(model, dummy, y), target)

    def project() -> None:
        with torch.no_grad():
            dummy.clamp_(0, 1)

    return engine.Problem(
        variables=variables,
        observe=seen,
        target=target,
        priors={"tv": (config.tv, lambda: total_variation(dummy))},
        project=project if config.clamp else None,
        snapshot=lambda: dummy.detach().clamp(0, 1).cpu().clone(),
    )


def _checked_inputs(model: nn.Module, target_gradients: Sequence[torch.Tensor], shape: Sequence[int], observe: Observe | None,
                    num_classes: int | None, name: str = "target_gradients") -> tuple[list[torch.Tensor], tuple[int, int, int, int], int]:
    """The checks of one attack's inputs (shared by :func:`reconstruct` and
    :func:`dlgkit.attacks.vectorised.reconstruct_many`): the target (finite, not all zero,
    matching the model), the shape (cross-checked against the gradient's rank) and the number of
    classes. Returns them checked."""
    target = engine.check_target(name, target_gradients)
    if not any(bool(t.any()) for t in target):
        raise ValueError(f"{name} is all zero (fully pruned, e.g. Defence('prune', 1.0)?): it carries no information about the input, so there is nothing to attack.")
    shape = _check_shape(shape)
    if observe is None:
        target = check_gradients(model, target, name=name)
        _check_batch_size(model, target, shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True); there is no gradient to match.")
    warn_if_non_smooth(model)
    if num_classes is None:
        num_classes = int(getattr(model, "num_classes", 0) or 0) or None
    if num_classes is None:
        raise ValueError("num_classes is needed: the model has no num_classes attribute.")
    num_classes = check_positive_int("num_classes", num_classes)
    if observe is None:
        _check_num_classes(model, target, num_classes)
    return target, shape, num_classes


def reconstruct(
    model: nn.Module,
    target_gradients: Sequence[torch.Tensor],
    shape: Sequence[int],
    config: AttackConfig = RECOMMENDED,
    *,
    labels: torch.Tensor | None = None,
    observe: Observe | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    history_every: int | None = 10,
    progress: bool | None = None,
) -> AttackResult:
    """Reconstruct the input (and label) that produced ``target_gradients`` on ``model``.

    - ``shape``: the dummy batch's shape ``(N, C, H, W)``; the attacker is assumed to know it.
      With the default observation it is cross-checked against the gradient (the rank of the
      last layer's weight gradient is the number of distinct examples).
    - ``config``: the attack's settings (:class:`~dlgkit.attacks.engine.AttackConfig`), by
      default :data:`~dlgkit.attacks.engine.RECOMMENDED`; ``PAPER_DLG`` reproduces the paper; change a copy with
      ``RECOMMENDED.with_(iterations=100)``.
    - ``labels``: None uses ``config.labels`` (``"idlg"`` or ``"joint"``); a tensor of class
      indices means the attacker knows the labels.
    - ``observe(model, x, y) -> list[Tensor]``: what the server sees for input ``x`` with labels
      ``y`` (class indices (N,) or probabilities (N, C)), differentiable with respect to ``x``.
      Default: the gradient of the cross-entropy with respect to the model's parameters
      (:func:`~dlgkit.attacks.engine.gradient_observation`); ``target_gradients`` must match
      its output tensor by tensor. The gradient list is checked against the model (count and
      shapes); which parameter each tensor belongs to cannot be checked where shapes repeat,
      so keep the order of ``model.parameters()``.
    - ``seed``: one CPU generator seeded with it draws every start; ``history_every``: keep a
      snapshot every k iterations (and at 0 and the end); None keeps none. ``progress``: a tqdm
      bar per restart (None: on unless ``DLGKIT_PROGRESS=0``).

    The model runs in eval mode during the attack and is left as it was (mode and ``.grad``).
    Defined in :doc:`/book/02_single_image_dlg`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be a dlgkit.attacks.AttackConfig (e.g. attacks.RECOMMENDED.with_(iterations=100)), got {type(config).__name__}.")
    if observe is not None and not callable(observe):
        raise TypeError(f"observe must be a function (model, x, y) -> list of tensors, got {type(observe).__name__}.")
    if observe is not None and observe is not engine.gradient_observation and config.labels == "idlg" and labels is None:
        raise ValueError("labels=None with config.labels='idlg' reads the label off a gradient's last layer, but observe replaces the "
                         "gradient by another observation (a FedAvg update's signs are flipped, for one), so it could be guessed wrongly; "
                         "pass labels (class indices) or use config.with_(labels='joint').")
    target, shape, num_classes = _checked_inputs(model, target_gradients, shape, observe, num_classes)
    device = next(p for p in model.parameters() if p.requires_grad).device
    with engine.caller_model_untouched(model):
        mode, known = _resolve_labels(model, target, labels, config, num_classes, shape)
        target = [t.to(device) for t in target]
        tol = engine.absolute_tol(config, target, shape[0])
        outcome = engine.run(
            lambda generator: _image_problem(model, target, shape, config, mode, known, num_classes, observe, generator),
            config, tol=tol, seed=seed, history_every=history_every, progress=progress, desc="DLG",
        )
    best = outcome.best_trial
    dummy = best.problem.variables[0]
    if mode == "joint":
        probs = F.softmax(best.problem.variables[1].detach(), dim=-1).cpu()
        found = probs.argmax(dim=-1)
    else:
        probs, found = None, known.cpu()
    return AttackResult(
        reconstruction=dummy.detach().cpu(),
        labels=found,
        losses=best.losses,
        history=best.history,
        history_iters=best.history_iters,
        wall_time=outcome.wall_time,
        restart_losses=[t.final for t in outcome.trials],
        statuses=[t.status for t in outcome.trials],
        best_restart=outcome.best,
        label_mode=mode,
        label_probs=probs,
    )
