"""The FedAvg-aware observation: what the server sees when a client runs local SGD steps.

A FedAvg client does not send a gradient. It runs ``local_steps`` SGD steps at ``local_lr``
over mini-batches of its data and sends the change of its weights, ``W_E - W_0`` (the sign
convention of :func:`dlgkit.federated.client_update` and of Flower's FedAvg clients: an update
is added to the global weights). :func:`fedavg_observation` builds a function that replays
those steps *differentiably* for a candidate input, so a gradient-matching attack can match
the update itself (Geiping et al. 2020, Dimitrov et al. 2022) through the engine's
``observe=`` hook instead of pretending that the update is one gradient.

The naive attack treats ``-(W_E - W_0) / (E * local_lr)`` as a gradient
(:func:`naive_gradient`): exact for one full-batch step, only an approximation after more.

Explained in chapter 6 of the book.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from dlgkit.checks import check_choice, check_finite_tensors, check_number, check_positive_int
from dlgkit.federated import LossFn, soft_cross_entropy

__all__ = ["fedavg_observation", "local_sgd", "naive_gradient", "reconstruct_fedavg", "reconstruct_fedavg_many"]

Observe = Callable[[nn.Module, torch.Tensor, torch.Tensor], list[torch.Tensor]]


def fedavg_observation(local_steps: int, local_lr: float, batch_size: int | None = None, loss_fn: LossFn = soft_cross_entropy) -> Observe:
    """``observe(model, x, y) -> W_E - W_0``: the weight update a FedAvg client with data
    ``(x, y)`` sends after ``local_steps`` SGD steps at ``local_lr`` on a copy of ``model``.

    Step ``s`` uses the mini-batch ``x[start : start + batch_size]`` with
    ``start = (s * batch_size) % len(x)``: the client's data in a fixed order, the same images
    in every epoch (``batch_size=None``: the whole batch in every step), exactly as
    :func:`dlgkit.federated.client_update`. The steps are built with ``create_graph=True``, so
    the update is differentiable with respect to ``x`` (and ``y`` when it holds probabilities);
    ``model`` itself is left untouched. ``y`` holds class indices (N,) or probabilities (N, C).
    Explained in chapter 6 of the book.
    """
    local_steps = check_positive_int("local_steps", local_steps)
    local_lr = check_number("local_lr", local_lr, low=0.0, low_open=True, hint="It is the client's local SGD learning rate.")
    batch_size = check_positive_int("batch_size", batch_size, allow_none=True, hint="None uses the whole batch in every step.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(logits, labels) -> scalar tensor, got {type(loss_fn).__name__}.")

    def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}.")
        if x.dim() < 2 or y.dim() not in (1, 2) or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x must be a non-empty batch (N, ...) and y its N labels (N,) or label rows (N, C); got x {tuple(x.shape)}, y {tuple(y.shape)}.")
        if y.dim() == 1 and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            raise TypeError(f"y of shape (N,) must hold integer class indices, got dtype {y.dtype}; pass y.long() for indices, or probabilities as (N, C).")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        start = [p.detach().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad]
        weights, size = list(start), batch_size or len(x)
        for step in range(local_steps):
            first = (step * size) % len(x)
            xb, yb = x[first : first + size], y[first : first + size]
            loss = loss_fn(functional_call(model, dict(zip(names, weights)), (xb,)), yb)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            weights = [w - local_lr * g for w, g in zip(weights, grads)]
        return [w - w0 for w, w0 in zip(weights, start)]

    return observe


def local_sgd(local_steps: int, local_lr: float, batch_size: int | None = None):
    """The batchable twin of :func:`fedavg_observation` for
    :func:`dlgkit.attacks.vectorised.reconstruct_many`: ``observe(call, weights, x, y)`` returns
    the dict ``W_E - W_0`` after the same local SGD steps (same mini-batches, in the same order,
    soft cross-entropy), written with ``torch.func.grad`` so that ``vmap`` can batch it.
    Explained in chapter 6 of the book."""
    from torch.func import grad

    local_steps = check_positive_int("local_steps", local_steps)
    local_lr = check_number("local_lr", local_lr, low=0.0, low_open=True, hint="It is the client's local SGD learning rate.")
    batch_size = check_positive_int("batch_size", batch_size, allow_none=True, hint="None uses the whole batch in every step.")

    def observe(call, weights: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        size, current = batch_size or len(x), dict(weights)
        for step in range(local_steps):
            first = (step * size) % len(x)
            xb, yb = x[first : first + size], y[first : first + size]
            grads = grad(lambda w: soft_cross_entropy(call(w, xb), yb))(current)
            current = {k: current[k] - local_lr * grads[k] for k in current}
        return {k: current[k] - weights[k] for k in weights}

    observe.functional = True
    return observe


def naive_gradient(update: Sequence[torch.Tensor], local_steps: int, local_lr: float) -> list[torch.Tensor]:
    """The naive reading of a FedAvg update as one gradient: ``-(W_E - W_0) / (E * local_lr)``,
    the mean gradient over the local steps. Exact for one full-batch step.
    Explained in chapter 6 of the book."""
    local_steps = check_positive_int("local_steps", local_steps)
    local_lr = check_number("local_lr", local_lr, low=0.0, low_open=True)
    if isinstance(update, torch.Tensor) or not isinstance(update, (list, tuple)) or not all(isinstance(u, torch.Tensor) for u in update):
        raise TypeError(f"update must be a list of tensors (one per parameter), got {type(update).__name__}.")
    check_finite_tensors("update", update)
    return [-u.detach() / (local_steps * local_lr) for u in update]


def _unit_update(name: str, update: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """``update`` divided by its norm, and the norm (summed in float64): the FedAvg-aware attack
    matches the unit update, so that its distances start near 1 as for a gradient."""
    scale = float(torch.sqrt(sum(u.double().square().sum() for u in update)))
    if scale == 0.0:
        raise ValueError(f"{name} is all zeros: the client did not move (no data, or local_lr too small); there is nothing to attack.")
    return [u / scale for u in update], scale


def reconstruct_fedavg(
    model: nn.Module,
    update: Sequence[torch.Tensor],
    shape: Sequence[int],
    config,
    *,
    labels: torch.Tensor,
    local_steps: int,
    local_lr: float,
    batch_size: int | None = None,
    attack: str = "aware",
    seed: int = 0,
    history_every: int | None = 10,
    progress: bool | None = None,
):
    """Attack a FedAvg weight update ``W_E - W_0`` of ``model`` (the global model the client
    started from), the attacker knowing ``labels`` (class indices), ``local_steps``,
    ``local_lr`` and ``batch_size`` (the client's mini-batches, taken in order).

    ``attack="aware"`` matches the update through :func:`fedavg_observation` (the local steps
    replayed); both sides are divided by the update's norm, so the L2 distance starts near 1
    and the engine's stopping rules see the same numbers as for a gradient (on the raw update,
    about ``local_lr`` times a gradient, L-BFGS stops early). ``attack="naive"`` runs the
    ordinary attack on :func:`naive_gradient`. ``config`` is an
    :class:`~dlgkit.attacks.engine.AttackConfig` (``float64=True`` for the cosine distance).
    Returns the :class:`~dlgkit.attacks.image.AttackResult` of
    :func:`dlgkit.attacks.image.reconstruct`. Explained in chapter 6 of the book."""
    from dlgkit.attacks.engine import check_target, gradient_observation
    from dlgkit.attacks.image import reconstruct

    check_choice("attack", attack, ("aware", "naive"))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of class indices (the attacker knows them for a FedAvg update), got {type(labels).__name__}.")
    update = check_target("update", update)
    local_steps = check_positive_int("local_steps", local_steps)
    local_lr = check_number("local_lr", local_lr, low=0.0, low_open=True)
    if attack == "naive":
        target, observe = naive_gradient(update, local_steps, local_lr), gradient_observation
    else:
        target, scale = _unit_update("update", update)
        replay = fedavg_observation(local_steps, local_lr, batch_size)

        def observe(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
            return [u / scale for u in replay(m, x, y)]

    return reconstruct(model, target, shape, config, labels=labels, observe=observe, seed=seed, history_every=history_every, progress=progress)


def reconstruct_fedavg_many(
    models: nn.Module | Sequence[nn.Module],
    updates: Sequence[Sequence[torch.Tensor]],
    shape: Sequence[int],
    config,
    *,
    labels: torch.Tensor | Sequence[torch.Tensor],
    local_steps: int,
    local_lr: float,
    batch_size: int | None = None,
    seeds: int | Sequence[int] = 0,
    history_every: int | None = 10,
    check_every: int | None = None,
    progress: bool | None = None,
):
    """The FedAvg-aware attack (``attack="aware"`` of :func:`reconstruct_fedavg`) on P updates
    at once, with :func:`dlgkit.attacks.vectorised.reconstruct_many`: update ``i`` was sent by a
    client that started from ``models[i]`` (one model: the same for all) and holds
    ``labels[i]``; every client ran the same ``local_steps``, ``local_lr`` and ``batch_size``.
    Each update and its replay are divided by the update's norm, as in
    :func:`reconstruct_fedavg`. Returns one :class:`~dlgkit.attacks.image.AttackResult` per
    update. The batched L-BFGS takes ``torch.optim.LBFGS``'s steps (see
    :class:`~dlgkit.attacks.vectorised.BatchedLBFGS`), but the batched float32 rounding differs,
    so the results agree with ``reconstruct_fedavg``'s in quality, not bit for bit. Explained in chapter 6 of the book."""
    from dlgkit.attacks.engine import check_target
    from dlgkit.attacks.vectorised import _check_floating, _reconstruct_many

    if isinstance(updates, torch.Tensor) or not isinstance(updates, (list, tuple)) or not updates:
        raise TypeError(f"updates must be a non-empty list of updates (each a list of tensors, one per parameter), got {type(updates).__name__}.")
    if all(isinstance(u, torch.Tensor) for u in updates):
        raise TypeError("updates is one update (a list of tensors); reconstruct_fedavg_many takes a list of them, one per client: pass [update] for one.")
    if labels is None or (isinstance(labels, (list, tuple)) and any(known is None for known in labels)):
        where = "labels" if labels is None else f"labels[{[known is None for known in labels].index(True)}]"
        raise TypeError(f"{where} is None, but labels must be the clients' class indices (a (P, N) tensor or a list of P tensors): "
                        "the FedAvg-aware attack needs them (it cannot read them off an update).")
    observe = local_sgd(local_steps, local_lr, batch_size)
    targets, scales = [], []
    for i, update in enumerate(updates):
        update = check_target(f"updates[{i}]", update)
        _check_floating(f"updates[{i}]", update)
        target, scale = _unit_update(f"updates[{i}]", update)
        targets.append(target)
        scales.append(scale)
    return _reconstruct_many(models, targets, shape, config, labels=labels, num_classes=None, seeds=seeds, history_every=history_every,
                             check_every=check_every, progress=progress, observe=observe, scales=scales)
