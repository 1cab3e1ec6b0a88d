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
from dlgkit.checks import check_choice, check_class_indices, check_finite_tensors, check_number, check_positive_int

__all__ = ["SharedUpdate", "client_gradient", "client_update", "check_gradients", "Client", "Server", "soft_cross_entropy"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that accepts class indices (N,) or probability rows (N, K); mean over N."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target)
    return torch.mean(torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1))


def _check_data(x: object, y: object) -> None:
    """A client's data: an image batch ``x`` (N, ...) and ``y``, N class indices or N probability rows."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}.")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch with a leading batch dimension, got shape {tuple(x.shape)}.")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0] if y.dim() else 'no'} labels; they must match.")
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); a client needs at least one example.")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}; images are floats in [0, 1] (dlgkit.data.to_tensor).")
    check_finite_tensors("x", x)
    if y.dim() == 1:
        check_class_indices("y", y)
    elif y.dim() == 2:
        if not y.is_floating_point():
            raise ValueError(f"y of shape {tuple(y.shape)} must hold probability rows (floats); class indices have shape (N,).")
        check_finite_tensors("y", y)
        if bool((y < 0).any()) or not torch.allclose(y.sum(dim=1), torch.ones((), dtype=y.dtype, device=y.device), atol=1e-3):
            raise ValueError("y of shape (N, K) must hold probability rows (non-negative, each summing to 1); for logits pass y.softmax(dim=1), for class indices shape (N,).")
    else:
        raise ValueError(f"y must be class indices (N,) or probability rows (N, K), got shape {tuple(y.shape)}.")


def _check_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    _check_data(x, y)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """``loss_fn(model(x), y)``, with clear errors for input the model cannot take and, under
    the default cross-entropy, for labels that do not fit its classes."""
    try:
        logits = model(x)
    except RuntimeError as exc:
        if "device" in str(exc):  # a device mix-up is the caller's placement, not a shape problem
            raise
        weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if x.is_floating_point() and len(weights) == 1 and x.dtype not in weights:
            (dtype,) = weights
            raise ValueError(f"x is {x.dtype} but the model's weights are {dtype}; convert one to the other: x.to({dtype}) or model.to({x.dtype}).") from exc
        raise ValueError(f"the model cannot take x of shape {tuple(x.shape)} ({str(exc).strip()}); pass images of the shape it was built for.") from exc
    if loss_fn is soft_cross_entropy:
        classes = logits.shape[-1]
        if y.dim() == 1:
            y = check_class_indices("labels", y, classes).to(y.device)  # as int64: int32 or whole-number float indices were only checked
        elif y.shape[-1] != classes:
            raise ValueError(f"y holds probability rows over {y.shape[-1]} classes but the model has {classes} classes.")
    return loss_fn(logits, y)


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

    def __post_init__(self) -> None:
        if isinstance(self.tensors, torch.Tensor) or not isinstance(self.tensors, (list, tuple)):
            raise TypeError(f"tensors must be a list of tensors (one per model parameter), got {type(self.tensors).__name__}.")
        self.num_examples = check_positive_int("num_examples", self.num_examples, hint="The server weights each update by it.")
        check_choice("kind", self.kind, ("gradient", "weights"))
        self.local_steps = check_positive_int("local_steps", self.local_steps)
        if self.lr is not None:
            self.lr = check_number("lr", self.lr, low=0, low_open=True)


def client_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = soft_cross_entropy) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(model(x), y)`` with respect to every trainable parameter: what a
    FedSGD client sends. ``y`` may be class indices or probability rows. Detached copies.
    Defined in :doc:`/book/01_gradient_sharing`."""
    _check_batch(model, x, y)
    x, y = _on_model(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _loss(model, x, y, loss_fn)
    return [g.detach().clone() for g in torch.autograd.grad(loss, params)]


def client_update(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1, local_steps: int = 1, batch_size: int | None = None, loss_fn: LossFn = soft_cross_entropy
) -> SharedUpdate:
    """Run ``local_steps`` of SGD on a private copy of ``model`` and share the weight change
    (FedAvg). With one step over the full batch this is ``-lr * gradient``.
    Defined in :doc:`/book/01_gradient_sharing`."""
    _check_batch(model, x, y)
    local_steps = check_positive_int("local_steps", local_steps)
    lr = check_number("lr", lr, low=0, low_open=True)
    batch_size = check_positive_int("batch_size", batch_size, allow_none=True, hint="None takes the whole batch.") or x.shape[0]
    x, y = _on_model(model, x, y)
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    for step in range(local_steps):
        start = (step * batch_size) % x.shape[0]
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        opt.zero_grad()
        _loss(local, xb, yb, loss_fn).backward()
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

    def __post_init__(self) -> None:
        _check_data(self.x, self.y)
        self.batch_size = check_positive_int("batch_size", self.batch_size, allow_none=True, hint="None shares the whole local data set.")

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model, self.lr = model, check_number("lr", lr, low=0, low_open=True)
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
        check_choice("mode", mode, ("fedsgd", "fedavg"))
        if isinstance(clients, Client) or not isinstance(clients, (list, tuple)):
            raise TypeError(f"clients must be a list of Client objects (for one client: [client]), got {type(clients).__name__}.")
        if not clients:
            raise ValueError("clients is empty: a round needs at least one Client.")
        for i, c in enumerate(clients):
            if not isinstance(c, Client):
                raise TypeError(f"clients[{i}] is a {type(c).__name__}, expected a dlgkit.federated.Client.")
        local_steps = check_positive_int("local_steps", local_steps)
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
