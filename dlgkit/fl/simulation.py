"""Run chapter 6's apps in Flower's simulation engine, offline, and return what the server saw.

Explained in chapter 6 of the book.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from dlgkit.checks import check_positive_int
from dlgkit.fl.client_app import app as client_app
from dlgkit.fl.server_app import ClientUpdate, CuriousFedAvg, run_server
from dlgkit.fl.task import FLSettings

__all__ = ["simulate", "run_offline", "flower_log"]


def simulate(settings: FLSettings, num_clients: int = 2, num_rounds: int = 1, on_update: Callable[[ClientUpdate], None] | None = None, quiet: bool = True) -> list[ClientUpdate]:
    """Run ``num_rounds`` of federated training with ``num_clients`` simulated clients (Ray
    actors of one CPU each; client ``i`` holds partition ``i``) and return every client's
    update as the curious server recorded it, in arrival order. ``on_update`` is called with
    each update as it arrives (e.g. to attack it). ``quiet`` keeps Flower's log to errors.
    Explained in chapter 6 of the book."""
    if not isinstance(settings, FLSettings):
        raise TypeError(f"settings must be an FLSettings, got {type(settings).__name__}.")
    check_positive_int("num_clients", num_clients)
    check_positive_int("num_rounds", num_rounds)
    with flower_log(quiet):  # Flower's FedAvg warns that evaluation is off (as the course wants)
        strategy = CuriousFedAvg(settings, on_update=on_update, min_train_nodes=num_clients, min_available_nodes=num_clients)
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, strategy, num_rounds=num_rounds)

    run_offline(server_app, client_app, num_clients, quiet=quiet)
    return list(strategy.updates)


def run_offline(server_app: ServerApp, client: ClientApp, num_supernodes: int, quiet: bool = True) -> None:
    """Run ``server_app`` against ``num_supernodes`` simulated nodes of ``client`` in Flower's
    simulation engine, offline, one CPU per node (Flower's default asks for two); ``quiet``
    keeps Flower's log to errors while it runs and Ray's workers' log lines out of the output. Used by chapter 6's and chapter 7's runs."""
    with flower_log(quiet):
        # quiet: Ray does not forward its workers' log lines (e.g. "Manually terminating
        # ClientAppActor" when the run ends) into the notebook; Flower still reports a failed client
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"log_to_driver": not quiet}}
        run_simulation(server_app=server_app, client_app=client, num_supernodes=num_supernodes, backend_config=backend)


@contextlib.contextmanager
def flower_log(quiet: bool = True) -> Iterator[None]:
    """Inside, Flower's logger ("flwr") reports errors only when ``quiet`` (its warnings and
    INFO lines are for operators, not for the book's pages); its level is restored after."""
    if not isinstance(quiet, bool):
        raise TypeError(f"quiet must be True (Flower's log shows errors only) or False (everything), got {quiet!r}.")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flwr_logger.setLevel(level)
