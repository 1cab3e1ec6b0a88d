"""Chapter 7's secure aggregation: the same federation under Flower's SecAgg+ (Bell et al.,
2020), where the server only learns the (weighted) mean of the clients' updates.

Flower 1.42 runs SecAgg+ through its legacy server API only: a ``DefaultWorkflow`` whose fit
workflow is ``SecAggPlusWorkflow``, called with a ``LegacyContext`` around a legacy ``FedAvg``;
the clients run the ``secaggplus_mod`` and reply in the legacy ``FitRes`` layout. Each client
masks its quantised update with pairwise masks that cancel in the sum, so the raw replies are
random integers and the strategy only ever sees the aggregate.

:func:`simulate_secagg` runs FedSGD rounds in which every client gets the same model: round
``r`` sends ``models[r]``, the honest LeNet or a planted one (chapter 7's imprint model, sent to
every client: Fowl et al. show that it still recovers images through the sum). It returns the
aggregate gradient of each round, which is all the server sees.
Explained in chapter 7 of the book (the malicious server; what secure aggregation stops).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.client.mod import secaggplus_mod
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from torch import nn

from dlgkit.attacks.imprint import PlantedModel
from dlgkit.checks import check_number, check_positive_int
from dlgkit.fl.malicious import _KEY, planted_client_model
from dlgkit.fl.simulation import flower_log, run_offline
from dlgkit.fl.task import FLSettings, load_partition, local_train, make_model

__all__ = ["SecAggRecorder", "simulate_secagg", "AggregateAttacks", "attack_aggregate", "app"]


def _client_model(config: dict) -> nn.Module:
    settings = FLSettings.from_config(config, ignore_unknown=True)
    return planted_client_model(settings, int(config[_KEY])) if _KEY in config else make_model(settings)


def _train(msg: Message, context: Context) -> Message:
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    settings = FLSettings.from_config(config, ignore_unknown=True)
    model = _client_model(config)
    with torch.no_grad():
        for p, w in zip(model.parameters(), parameters_to_ndarrays(fitins.parameters)):
            p.copy_(torch.from_numpy(np.asarray(w)).to(p.dtype))
    x, y = load_partition(settings, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    shared = local_train(model, x, y, settings)
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters([t.detach().numpy() for t in shared]), num_examples=len(x), metrics={})
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


#: The SecAgg+ client: the honest or planted model as the config says, FedSGD on its partition,
#: the reply masked by Flower's ``secaggplus_mod``.
app = ClientApp(mods=[secaggplus_mod])
app.train()(_train)


class SecAggRecorder(LegacyFedAvg):
    """A legacy ``FedAvg`` that sends ``models[r - 1]`` (with its settings in the config) in
    round ``r`` and records what it is given back: under SecAgg+ every ``FitRes`` it sees holds
    the aggregate, the mean of the clients' gradients weighted by their example counts.
    ``self.aggregates[r - 1]`` is round ``r``'s; ``self.distinct_replies[r - 1]`` counts the
    different parameter lists among the ``FitRes`` it saw (1: no single client's update
    visible). Explained in chapter 7 of the book."""

    def __init__(self, settings: FLSettings, models: Sequence[nn.Module], num_clients: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients, min_available_clients=num_clients, initial_parameters=self._params(models[0]))
        self.settings, self.models = settings, list(models)
        self.aggregates: list[list[torch.Tensor]] = []
        self.distinct_replies: list[int] = []

    @staticmethod
    def _params(model: nn.Module):
        return ndarrays_to_parameters([p.detach().numpy() for p in model.parameters()])

    def configure_fit(self, server_round, parameters, client_manager):
        """Every client gets this round's model (honest or planted) and the run's settings."""
        model = self.models[server_round - 1]
        config = dict(self.settings.to_config())
        if isinstance(model, PlantedModel):
            config[_KEY] = model.front.out_features
        pairs = super().configure_fit(server_round, self._params(model), client_manager)
        for _, fitins in pairs:
            fitins.config = dict(config)
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        """Record the aggregate (what SecAgg+ lets the server see), then let ``FedAvg`` go on."""
        lists = [parameters_to_ndarrays(res.parameters) for _, res in results]
        self.distinct_replies.append(len({tuple(a.tobytes() for a in arrays) for arrays in lists}))
        if lists:
            self.aggregates.append([torch.from_numpy(np.array(a, dtype=np.float32)) for a in lists[0]])
        return super().aggregate_fit(server_round, results, failures)


#: The modulus of the secure sum (Flower's ``modulus_range``): the quantisation range may not exceed it.
MODULUS = 2**40


def simulate_secagg(settings: FLSettings, models: Sequence[nn.Module], num_clients: int, clipping_range: float = 8.0, quantization_range: int = 2**30, quiet: bool = True) -> SecAggRecorder:
    """Run ``len(models)`` FedSGD rounds under SecAgg+ with ``num_clients`` simulated clients
    (client ``i`` holds partition ``i`` of ``settings``), round ``r`` training ``models[r - 1]``
    (the run's LeNet, or a :class:`~dlgkit.attacks.imprint.PlantedModel` around it), and return
    the strategy with ``.aggregates``. Updates are clipped to ``clipping_range`` and quantised to
    ``quantization_range`` levels (an error of about ``clipping_range / quantization_range``
    per entry; Flower's default of 2**22 levels blurs the imprint of a face whose gradient is
    small, so the default here is 2**30, the server's choice, with a modulus of 2**40). SecAgg+ needs at least 2 clients and 3 or more shares (with fewer than 3
    clients every client shares with all). Explained in chapter 7 of the book."""
    if not isinstance(settings, FLSettings) or settings.mode != "fedsgd":
        raise ValueError(f"settings must be an FLSettings with mode='fedsgd' (the aggregate is then a mean gradient), got {settings!r}.")
    n = check_positive_int("num_clients", num_clients)
    if n < 2:
        raise ValueError(f"num_clients must be at least 2 for SecAgg+ (Flower's workflow refuses to sample fewer), got {n}; with one client the server sees its update as it is (client_gradient).")
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models or not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(f"models must be a non-empty list of torch models, one per round (the run's LeNet or a PlantedModel around it), got {type(models).__name__}; for one round pass [model].")
    clip = check_number("clipping_range", clipping_range, low=0.0, low_open=True)
    quant = check_positive_int("quantization_range", quantization_range)
    if quant > MODULUS:
        raise ValueError(f"quantization_range must be at most 2**40 (MODULUS, the modulus of the secure sum), got {quant}.")
    with flower_log(quiet):
        strategy = SecAggRecorder(settings, models, n)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context: Context) -> None:
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=len(strategy.models)), strategy=strategy)
        shares = max(3, n)
        workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=max(2, shares - 1), max_weight=settings.examples_per_client, clipping_range=clip, quantization_range=quant, modulus_range=MODULUS)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    run_offline(server_app, app, n, quiet=quiet)
    return strategy


@dataclass
class AggregateAttacks:
    """What :func:`attack_aggregate` measured for ``num_clients`` clients of one face each.

    ``faces``/``labels``: the clients' data (ground truth, for scoring only). ``single``: chapter
    2's attack aimed at client 0's face, scored ``single_psnr`` against it. ``batch``: chapter 3's
    batch attack on all N faces, aligned to ``faces``, mean PSNR ``batch_psnr``. ``imprint_best``:
    each face's best PSNR among the imprint attack's recoveries (``imprint_recovered``).
    ``expected``: the closed form for N images in the imprint's bins. ``seconds``: the SecAgg+ run
    (0 for N = 1, where the server sees the lone client's gradient).
    Explained in chapter 7 of the book."""

    num_clients: int
    seconds: float
    faces: torch.Tensor
    labels: torch.Tensor
    single: torch.Tensor
    single_psnr: float
    batch: torch.Tensor
    batch_psnr: float
    imprint_recovered: torch.Tensor
    imprint_best: torch.Tensor
    expected: float


def attack_aggregate(num_clients: int, thresholds: torch.Tensor, iterations: int = 300, settings: FLSettings | None = None) -> AggregateAttacks:
    """Two FedSGD rounds under SecAgg+ with ``num_clients`` clients of one face each (round 1 the
    honest LeNet, round 2 the imprint model of ``thresholds`` with the same weights, sent to every
    client; back layer of scale 1), then every attack on what the server saw: the honest attacks
    of chapters 2 and 3 (labels known, one start of ``iterations`` L-BFGS steps; with one client
    they are the same attack) on round 1's aggregate, the imprint attack on round 2's. With one client there is nothing to aggregate:
    the server sees the client's own gradients (SecAgg+ needs 2 clients).
    Explained in chapter 7 of the book."""
    from dlgkit import attacks
    from dlgkit.attacks import imprint
    from dlgkit.attacks.engine import gradient_observation
    from dlgkit.federated import client_gradient
    from dlgkit.metrics import align, batch_report, psnr

    n = check_positive_int("num_clients", num_clients)
    iterations = check_positive_int("iterations", iterations)
    settings = settings if settings is not None else FLSettings(mode="fedsgd", examples_per_client=1, seed=0)
    if not isinstance(settings, FLSettings) or settings.mode != "fedsgd" or settings.examples_per_client != 1:
        raise ValueError(f"settings must be an FLSettings with mode='fedsgd' and examples_per_client=1 (one face per client), got {settings!r}.")
    honest = make_model(settings)
    planted = imprint.imprint_model(make_model(settings), (1, 32, 32), thresholds, decoder_scale=1.0)
    with torch.no_grad():
        for p, w in zip(planted.model.parameters(), honest.parameters()):
            p.copy_(w)
    parts = [load_partition(settings, i, n) for i in range(n)]
    x, y = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
    start = time.perf_counter()
    if n == 1:
        seen, seconds = [client_gradient(honest, x, y), client_gradient(planted, x, y)], 0.0
    else:
        seen = simulate_secagg(settings, [honest, planted], num_clients=n).aggregates
        seconds = time.perf_counter() - start
    x0, y0 = parts[0]
    one = attacks.reconstruct(honest, seen[0], x0.shape, attacks.RECOMMENDED.with_(iterations=iterations, restarts=1), labels=y0, seed=0, history_every=None, progress=False)
    # The server knows N (it sampled the clients), so it passes the observation explicitly and the
    # engine does not second-guess the batch size from the last layer's rank, which misses a face
    # whose gradient is tiny (a confident prediction) once SecAgg+ has quantised the sum.
    if n == 1:  # the batch is client 0's face: the batch attack is the attack aimed at it
        batch = one.reconstruction.detach().clamp(0, 1)
    else:
        many = attacks.reconstruct(honest, seen[0], x.shape, attacks.RECOMMENDED_BATCH.with_(iterations=iterations, restarts=1), labels=y, observe=gradient_observation, seed=0, history_every=None, progress=False)
        batch = many.reconstruction.detach().clamp(0, 1)
    recovered = imprint.imprint_recover(planted, seen[1])
    return AggregateAttacks(
        num_clients=n, seconds=seconds, faces=x, labels=y,
        single=one.reconstruction.detach().clamp(0, 1), single_psnr=float(psnr(one.reconstruction.detach(), x0)),
        batch=batch[align(batch, x)], batch_psnr=float(batch_report(batch, x)["psnr"]),
        imprint_recovered=recovered, imprint_best=imprint.best_psnr(recovered, x),
        expected=imprint.expected_recovered_fraction(n, bins=len(thresholds)),
    )
