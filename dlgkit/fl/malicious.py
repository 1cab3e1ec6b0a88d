"""Chapter 7's malicious server inside Flower: one chosen client gets a planted model (an
imprint layer or trap weights in front of the global model), the others the honest one.

- :class:`MaliciousFedAvg`: the curious strategy of chapter 6 whose ``configure_train`` sends
  the planted model to one target node and whose ``aggregate_train`` harvests that node's update
  (the images are then read off it with :func:`dlgkit.attacks.imprint.imprint_recover` or
  :func:`dlgkit.attacks.trap.trap_recover`) and aggregates the other nodes' updates as an honest
  FedAvg would. The target's update is left out of the aggregate (its shapes differ, and it
  was computed on another model), so the round's aggregate is the mean of the honest nodes
  only: the global model goes on training, with one client fewer that round.
- ``app``: a ``ClientApp`` that trains whatever architecture the server describes, the threat
  model of Fowl et al. (2022) (the server ships the model): the honest LeNet, or the LeNet behind
  a planted block of ``planted-neurons`` neurons when the message's config says so.
- :func:`simulate_malicious`: the whole federation in Flower's simulation engine, offline.

Explained in chapter 7 of the book (the malicious server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dlgkit.attacks.imprint import PlantedModel
from dlgkit.checks import check_nonnegative_int, check_positive_int
from dlgkit.fl import client_app as honest_client
from dlgkit.fl.arrays import tensors_to_record
from dlgkit.fl.server_app import CuriousFedAvg, Reply, reply_fields, run_server
from dlgkit.fl.simulation import flower_log, run_offline
from dlgkit.fl.task import FLSettings, make_model

__all__ = ["INPUT_SHAPE", "Harvest", "MaliciousFedAvg", "planted_client_model", "simulate_malicious", "app"]

#: The shape of one input of the run's LeNet (grey 32x32 images).
INPUT_SHAPE = (1, 32, 32)
_KEY = "planted-neurons"


@dataclass
class Harvest(Reply):
    """The target node's reply to the planted model: ``tensors`` in the order of the planted
    model's parameters (``tensors[0]``, ``tensors[1]``: the planted layer's weight and bias
    gradients in FedSGD), ``planted`` the model it was computed on (with that round's global
    weights inside). Explained in chapter 7 of the book."""

    planted: PlantedModel


def planted_client_model(settings: FLSettings, neurons: int) -> PlantedModel:
    """The model a client builds when the server asks for a planted block of ``neurons``
    neurons: the run's LeNet behind an empty :class:`~dlgkit.attacks.imprint.PlantedModel`
    (the server's weights arrive in the message). Explained in chapter 7 of the book."""
    if not isinstance(settings, FLSettings):
        raise TypeError(f"settings must be the run's FLSettings, got {type(settings).__name__}.")
    neurons = check_positive_int("neurons", neurons)
    d = math.prod(INPUT_SHAPE)
    return PlantedModel(make_model(settings), INPUT_SHAPE, torch.zeros(neurons, d), torch.zeros(neurons))


class MaliciousFedAvg(CuriousFedAvg):
    """Chapter 6's curious FedAvg turned malicious against one node.

    ``planted`` is the server's planted model (from :func:`dlgkit.attacks.imprint.imprint_model`
    or :func:`dlgkit.attacks.trap.trap_model`, around a model of the run's architecture); each
    round the global weights are copied into it and it goes to the node ``target`` (an index
    into the sorted ids of the nodes sampled that round; Flower's node ids are random). Every
    other node gets the honest model. The target's reply goes to ``self.harvests`` (and to
    ``on_harvest``) instead of the aggregate; the other replies are recorded and aggregated as
    in :class:`~dlgkit.fl.server_app.CuriousFedAvg`. Explained in chapter 7 of the book.
    """

    def __init__(self, settings: FLSettings, planted: PlantedModel, target: int = 0, on_harvest: Callable[[Harvest], None] | None = None, **kwargs) -> None:
        if not isinstance(planted, PlantedModel):
            raise TypeError(f"planted must be a PlantedModel (imprint_model or trap_model), got {type(planted).__name__}.")
        if tuple(planted.input_shape) != INPUT_SHAPE:
            raise ValueError(f"planted must take inputs of shape {INPUT_SHAPE} like the run's LeNet, got {planted.input_shape}.")
        if on_harvest is not None and not callable(on_harvest):
            raise TypeError(f"on_harvest must be a function taking a Harvest, got {type(on_harvest).__name__}.")
        super().__init__(settings, **kwargs)
        if [p.shape for p in planted.model.parameters()] != [p.shape for p in self.template.parameters()]:
            raise ValueError("planted must wrap a model of the run's architecture (dlgkit.fl.task.make_model(settings)).")
        self.planted, self.target, self.on_harvest = planted, check_nonnegative_int("target", target), on_harvest
        self.harvests: list[Harvest] = []
        self.target_node: int | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The honest messages of ``CuriousFedAvg``, except the target's: the planted model with
        this round's global weights, and ``planted-neurons`` in its config."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        if self.target >= len(nodes):
            raise ValueError(f"target={self.target} but only {len(nodes)} nodes were sampled this round; use a target below {len(nodes)}.")
        self.target_node = nodes[self.target]
        with torch.no_grad():
            for p, w in zip(self.planted.model.parameters(), self._global):
                p.copy_(w)
        content = RecordDict(
            {
                self.arrayrecord_key: tensors_to_record([p.detach() for p in self.planted.parameters()], self.planted),
                self.configrecord_key: ConfigRecord({**dict(config), _KEY: self.planted.front.out_features}),
            }
        )
        malicious = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.target_node)
        return [malicious if m.metadata.dst_node_id == self.target_node else m for m in messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Harvest the target's reply; record and aggregate the others (``None`` when no honest
        reply came back: the global model then stays as it was)."""
        honest = []
        for msg in replies:
            if msg.has_error() or int(msg.metadata.src_node_id) != self.target_node:
                honest.append(msg)
                continue
            kind = "gradient" if self.settings.mode == "fedsgd" else "weights"
            harvest = Harvest(**reply_fields(msg, server_round, kind, self.planted), planted=_copy(self.planted))
            self.harvests.append(harvest)
            if self.on_harvest is not None:
                self.on_harvest(harvest)
        if not honest:
            return None, None
        return super().aggregate_train(server_round, honest)


def _copy(planted: PlantedModel) -> PlantedModel:
    twin = planted_client_model(FLSettings(), planted.front.out_features)
    twin.load_state_dict(planted.state_dict())
    return twin


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the model the server describes: the honest client's step (chapter 6) on the plain
    LeNet, or on the LeNet behind a planted block when the config asks for one."""
    config = dict(msg.content["config"])
    if _KEY not in config:
        return honest_client.train(msg, context)
    settings = FLSettings.from_config(config, ignore_unknown=True)
    return honest_client.train_and_reply(planted_client_model(settings, int(config[_KEY])), msg, context, settings)


def simulate_malicious(settings: FLSettings, planted: PlantedModel, num_clients: int = 3, num_rounds: int = 1, target: int = 0, quiet: bool = True) -> MaliciousFedAvg:
    """Run ``num_rounds`` rounds with ``num_clients`` simulated clients (client ``i`` holds
    partition ``i``) under :class:`MaliciousFedAvg` aimed at node index ``target``, and return
    the strategy: ``.harvests`` holds the target's replies, ``.updates`` the honest ones.
    ``quiet`` keeps Flower's log to errors. Explained in chapter 7 of the book."""

    check_positive_int("num_clients", num_clients)
    check_positive_int("num_rounds", num_rounds)
    with flower_log(quiet):
        strategy = MaliciousFedAvg(settings, planted, target=target, min_train_nodes=num_clients, min_available_nodes=num_clients)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, strategy, num_rounds=num_rounds)

    run_offline(server_app, app, num_clients, quiet=quiet)
    return strategy
