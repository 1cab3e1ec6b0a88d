"""The curious server of chapter 6: Flower's ``FedAvg``, plus a record of every update.

:class:`CuriousFedAvg` aggregates exactly as an honest FedAvg server does, but in
``aggregate_train`` it first keeps a copy of each client's reply (as torch tensors, with the
node id, the partition id and the round) and hands it to a callback, e.g. an attack. The
module-level ``app`` is the ``ServerApp`` that Flower's deployment engine loads.
Explained in chapter 6 of the book.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from dlgkit.federated import SharedUpdate
from dlgkit.fl.arrays import record_to_tensors, tensors_to_record
from dlgkit.fl.task import FLSettings, make_model

__all__ = ["Reply", "ClientUpdate", "CuriousFedAvg", "run_server", "save_updates", "load_updates", "app"]


@dataclass
class Reply:
    """What every client reply carries, as the server saw it: the round, Flower's id of the
    sending node, the ``partition_id`` of the data it trained on (ground truth for scoring an
    attack, sent by our client for the course's bookkeeping), the ``kind`` of update, its
    ``tensors`` and the example count. Explained in chapter 6 of the book."""

    server_round: int
    node_id: int
    partition_id: int
    kind: str
    tensors: list[torch.Tensor]
    num_examples: int


def reply_fields(msg: Message, server_round: int, kind: str, like: nn.Module) -> dict:
    """The :class:`Reply` fields of a client's message (its arrays unpacked like ``like``)."""
    content = msg.content
    return dict(
        server_round=server_round,
        node_id=int(msg.metadata.src_node_id),
        partition_id=int(content["client"]["partition-id"]) if "client" in content else -1,
        kind=kind,
        tensors=record_to_tensors(content["arrays"], like),
        num_examples=int(content["metrics"]["num-examples"]),
    )


@dataclass
class ClientUpdate(Reply):
    """One client's reply in one round. ``tensors`` is a gradient (``kind="gradient"``,
    FedSGD) or ``W_E - W_0`` (``kind="weights"``, FedAvg); ``global_params`` are the weights
    ``W_0`` the server sent that round.
    """

    global_params: list[torch.Tensor]
    settings: FLSettings

    def global_model(self) -> nn.Module:
        """A fresh copy of the global model of this round (what the attacker attacks)."""
        model = make_model(self.settings)
        with torch.no_grad():
            for p, w in zip(model.parameters(), self.global_params):
                p.copy_(w)
        return model

    def shared(self) -> SharedUpdate:
        """The reply as a :class:`dlgkit.federated.SharedUpdate`, the form dlgkit's attacks take."""
        return SharedUpdate(list(self.tensors), num_examples=self.num_examples, kind=self.kind, local_steps=self.settings.local_steps, lr=self.settings.lr)


class CuriousFedAvg(FedAvg):
    """Flower's ``FedAvg`` that records every client's update before aggregating it.

    Clients reply with a gradient (FedSGD) or a weight update (FedAvg), not with new weights,
    so the aggregate is applied here: ``W_0 - lr * mean gradient`` or ``W_0 + mean update``
    (means weighted by ``num-examples``, computed by ``FedAvg``). ``on_update`` is called with
    each :class:`ClientUpdate` as it arrives; all of them stay in ``self.updates``
    (``self.template`` is a model of the run's architecture, for conversions). Other keyword
    arguments go to ``FedAvg`` (federated evaluation is off unless you ask for it).
    Explained in chapter 6 of the book.
    """

    def __init__(self, settings: FLSettings, on_update: Callable[[ClientUpdate], None] | None = None, **fedavg_kwargs) -> None:
        if not isinstance(settings, FLSettings):
            raise TypeError(f"settings must be an FLSettings, got {type(settings).__name__}.")
        if on_update is not None and not callable(on_update):
            raise TypeError(f"on_update must be a function taking a ClientUpdate, got {type(on_update).__name__}.")
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg_kwargs)
        self.settings, self.on_update = settings, on_update
        self.updates: list[ClientUpdate] = []
        self.template = make_model(settings)
        self._global: list[torch.Tensor] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember the weights sent out this round, and send the run's settings with them."""
        self._global = record_to_tensors(arrays, self.template)
        config.update(self.settings.to_config())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each valid reply, then aggregate with ``FedAvg`` and apply it to the global weights."""
        replies = list(replies)
        kind = "gradient" if self.settings.mode == "fedsgd" else "weights"
        for msg in replies:
            if msg.has_error():
                continue
            update = ClientUpdate(
                **reply_fields(msg, server_round, kind, self.template),
                global_params=[w.clone() for w in self._global],
                settings=self.settings,
            )
            self.updates.append(update)
            if self.on_update is not None:
                self.on_update(update)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        step = -self.settings.lr if kind == "gradient" else 1.0
        new = [w + step * m for w, m in zip(self._global, record_to_tensors(mean, self.template))]
        return tensors_to_record(new, self.template), metrics


def run_server(grid: Grid, strategy: CuriousFedAvg, num_rounds: int, timeout: float = 600.0) -> Result:
    """Start ``strategy`` from the run's initial global model for ``num_rounds`` rounds.
    Explained in chapter 6 of the book."""
    initial = tensors_to_record(list(make_model(strategy.settings).parameters()), strategy.template)
    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, timeout=timeout)


def save_updates(path: str | Path, updates: list[ClientUpdate], final: list[torch.Tensor] | None = None) -> None:
    """Write recorded updates (and optionally the final global weights) with ``torch.save``."""
    rows = [{**asdict(u), "settings": u.settings.to_config()} for u in updates]
    torch.save({"updates": rows, "final": final}, Path(path))


def load_updates(path: str | Path) -> tuple[list[ClientUpdate], list[torch.Tensor] | None]:
    """Read what :func:`save_updates` wrote: ``(updates, final global weights or None)``."""
    saved = torch.load(Path(path), weights_only=True)
    updates = [ClientUpdate(**{**row, "settings": FLSettings.from_config(row["settings"])}) for row in saved["updates"]]
    return updates, saved["final"]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The deployment engine's server: settings from the run config (the app's
    ``pyproject.toml`` and ``flwr run --run-config``); with ``record-file`` set, the recorded
    updates and the final weights are saved there."""
    config = context.run_config
    num_clients = int(config["num-clients"])
    strategy = CuriousFedAvg(FLSettings.from_config(dict(config), ignore_unknown=True), min_train_nodes=num_clients, min_available_nodes=num_clients)
    result = run_server(grid, strategy, num_rounds=int(config["num-server-rounds"]))
    if config.get("record-file"):
        final = record_to_tensors(result.arrays, strategy.template) if result.arrays is not None else None
        save_updates(str(config["record-file"]), strategy.updates, final)
