"""Federated learning on Flower, with a curious server: the layout of Flower's quickstart.

- :mod:`dlgkit.fl.arrays`: Flower ``ArrayRecord`` <-> lists of torch tensors (exact round trip)
- :mod:`dlgkit.fl.task`: the model, each client's partition of the data, local training
- :mod:`dlgkit.fl.client_app`: the ``ClientApp`` (thin wiring around the task)
- :mod:`dlgkit.fl.server_app`: the curious ``FedAvg`` strategy that records every client's
  update, and the ``ServerApp`` of the deployment engine
- :mod:`dlgkit.fl.simulation`: run the apps in Flower's simulation engine, offline, and get
  the recorded updates back

Flower is an optional extra (``pip install "dlgkit[flower]"``, Python >= 3.11). Telemetry of
Flower and usage statistics of Ray are switched off here, before ``flwr`` is imported, so
nothing leaves the machine (a variable you set yourself is left as it is).

Explained in chapter 6 of the book (the curious server inside a real FL framework).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("dlgkit.fl needs Flower: pip install 'dlgkit[flower]' (Python >= 3.11), or pip install 'flwr[simulation]==1.42.0'.") from err

from dlgkit.fl.arrays import record_to_tensors, tensors_to_record
from dlgkit.fl.server_app import ClientUpdate, CuriousFedAvg
from dlgkit.fl.task import FLSettings, load_partition, make_model, partition

__all__ = ["tensors_to_record", "record_to_tensors", "FLSettings", "make_model", "partition", "load_partition", "ClientUpdate", "CuriousFedAvg", "simulate"]


def __getattr__(name: str):
    # simulate() needs Ray, which a ClientApp process of the deployment engine never imports
    if name == "simulate":
        from dlgkit.fl.simulation import simulate

        return simulate
    raise AttributeError(f"module 'dlgkit.fl' has no attribute {name!r}")
