"""Federated learning in miniature: what a client shares and how a server aggregates.

The threat model is explicit. An honest-but-curious server sees exactly what a client
shares (a :class:`SharedUpdate`) and the global model it sent out; it never sees the data.
Whether it also knows the batch size or the labels is written down in the update's fields.

Defined in :doc:`/book/01_gradient_sharing`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlgkit.budget import device_of

__all__ = ["SharedUpdate", "client_gradient", "client_update", "check_gradients", "Client", "Server", "soft_cross_entropy"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that accepts class indices (N,) or probability rows (N, K); mean over N."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target)
    return torch.mean(torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1))


def _check_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}.")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch with a leading batch dimension, got shape {tuple(x.shape)}.")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels; they must match.")


def _on_model(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, moved to the device of ``model`` (a client's data may arrive from the CPU)."""
    device = device_of(model)
    return tuple(t.to(device) for t in tensors)


def check_gradients(model: nn.Module, gradients: Sequence[torch.Tensor], name: str = "gradients") -> list[torch.Tensor]:
    """Validate that ``gradients`` has one tensor per trainable parameter of ``model``, same shapes."""
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(gradients, torch.Tensor) or not isinstance(gradients, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors (one per model parameter), got {type(gradients).__name__}.")
    if len(gradients) != len(params):
        raise ValueError(f"{name} has {len(gradients)} tensors but the model has {len(params)} trainable parameters.")
    for i, (g, p) in enumerate(zip(gradients, params)):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(g).__name__}, expected a tensor.")
        if g.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(g.shape)} but parameter {i} has shape {tuple(p.shape)}.")
    return list(gradients)


@dataclass
class SharedUpdate:
    """What travels from a client to the server.

    ``kind`` is ``"gradient"`` (FedSGD: the gradient of the mean loss on one batch) or
    ``"weights"`` (FedAvg: new weights minus old after ``local_steps`` SGD steps).
    ``num_examples`` is public in most protocols, because the server weights by it.
    """

    tensors: list[torch.Tensor]
    num_examples: int
    kind: str = "gradient"
    local_steps: int = 1
    lr: float | None = None
    meta: dict = field(default_factory=dict)


def client_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = soft_cross_entropy) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(model(x), y)`` with respect to every trainable parameter: what a
    FedSGD client sends. ``y`` may be class indices or probability rows. Detached copies.
    Defined in :doc:`/book/01_gradient_sharing`."""
    _check_batch(model, x, y)
    x, y = _on_model(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    return [g.detach().clone() for g in torch.autograd.grad(loss, params)]


def client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1, local_steps: int = 1, batch_size: int | None = None, loss_fn: LossFn = soft_cross_entropy
) -> SharedUpdate:
    """Run ``local_steps`` of SGD on a private copy of ``model`` and share the weight change
    (FedAvg). With one step over the full batch this is ``-lr * gradient``.
    Defined in :doc:`/book/01_gradient_sharing`."""
    _check_batch(model, x, y)
    if not isinstance(local_steps, int) or local_steps <= 0:
        raise ValueError(f"local_steps must be a positive int, got {local_steps!r}.")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    x, y = _on_model(model, x, y)
    batch_size = batch_size or x.shape[0]
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    for step in range(local_steps):
        start = (step * batch_size) % x.shape[0]
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        opt.zero_grad()
        loss_fn(local(xb), yb).backward()
        opt.step()
    delta = [(new - old).detach() for new, old in zip(local.parameters(), model.parameters())]
    return SharedUpdate(delta, num_examples=int(x.shape[0]), kind="weights", local_steps=local_steps, lr=lr)


@dataclass
class Client:
    """A participant holding private data ``(x, y)``; it shares only :class:`SharedUpdate` objects."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def share_gradient(self, model: nn.Module) -> SharedUpdate:
        """FedSGD: sample a batch, share the gradient of its mean loss."""
        idx = self._batch()
        return SharedUpdate(client_gradient(model, self.x[idx], self.y[idx]), num_examples=len(idx))

    def share_weights(self, model: nn.Module, lr: float, local_steps: int) -> SharedUpdate:
        """FedAvg: share the change of weights after ``local_steps`` SGD steps on local data."""
        idx = torch.randperm(len(self.x), generator=self.generator)
        return client_update(model, self.x[idx], self.y[idx], lr=lr, local_steps=local_steps, batch_size=self.batch_size)

    def _batch(self) -> torch.Tensor:
        size = min(self.batch_size or len(self.x), len(self.x))
        return torch.randperm(len(self.x), generator=self.generator)[:size]


class Server:
    """Holds the global model; averages what clients share (weighted by their example counts).
    Defined in :doc:`/book/01_gradient_sharing`."""

    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}.")
        self.model, self.lr = model, lr
        self.received: list[SharedUpdate] = []

    def aggregate(self, updates: Sequence[SharedUpdate]) -> list[torch.Tensor]:
        """Example-weighted mean of the shared tensors (all updates must be of the same kind)."""
        if not updates:
            raise ValueError("aggregate() needs at least one update.")
        kinds = {u.kind for u in updates}
        if len(kinds) != 1:
            raise ValueError(f"cannot average updates of different kinds {sorted(kinds)}.")
        for u in updates:
            check_gradients(self.model, u.tensors, name="update.tensors")
        total = sum(u.num_examples for u in updates)
        return [sum(u.tensors[i] * (u.num_examples / total) for u in updates) for i in range(len(updates[0].tensors))]

    def round(self, clients: Sequence[Client], mode: str = "fedsgd", local_steps: int = 1) -> list[SharedUpdate]:
        """One round: every client shares, the server records and applies the average.

        ``mode="fedsgd"`` applies ``-lr * mean gradient``; ``mode="fedavg"`` adds the mean weight change.
        Returns the updates the server received (what an attacker at the server gets to see).
        """
        if mode not in ("fedsgd", "fedavg"):
            raise ValueError(f"mode must be 'fedsgd' or 'fedavg', got {mode!r}.")
        if mode == "fedsgd":
            updates = [c.share_gradient(self.model) for c in clients]
        else:
            updates = [c.share_weights(self.model, lr=self.lr, local_steps=local_steps) for c in clients]
        mean = self.aggregate(updates)
        with torch.no_grad():
            for p, u in zip(self.model.parameters(), mean):
                p.add_(-self.lr * u if mode == "fedsgd" else u)
        self.received.extend(updates)
        return updates
