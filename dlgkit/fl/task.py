"""Chapter 6's federated task, laid out like Flower's quickstart ``task.py``: the model, each
client's share of the data, and what a client runs locally.

Every setting of a run lives in one :class:`FLSettings`; the server sends it to the clients
in each round's ``ConfigRecord``, so a client needs nothing but its partition id.
Explained in chapter 6 of the book.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from dlgkit import data
from dlgkit.checks import check_choice, check_nonnegative_int, check_number, check_positive_int, check_seed
from dlgkit.federated import client_gradient, client_update
from dlgkit.models import LeNet, init_uniform_

__all__ = ["DATASETS", "MODES", "FLSettings", "make_model", "load_dataset", "partition", "load_partition", "local_train"]

#: The bundled data sets a run can use: LFW faces (32x32 grey) and scikit-learn's digits (resized to 32x32).
DATASETS = ("faces", "digits")
#: ``"fedsgd"``: a client shares the gradient of its data; ``"fedavg"``: it shares ``W_E - W_0`` after local SGD steps.
MODES = ("fedsgd", "fedavg")
NUM_CLASSES = 10


@dataclass(frozen=True)
class FLSettings:
    """The settings of one federated run (the same in simulation and deployment).

    ``batch_size=0`` means the client's whole partition in each step. ``lr`` is the client's
    local learning rate in FedAvg and the server's step size in FedSGD.
    """

    dataset: str = "faces"
    mode: str = "fedavg"
    examples_per_client: int = 1
    lr: float = 0.1
    local_steps: int = 1
    batch_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("mode", self.mode, MODES)
        checked = {  # stored as plain int/float: Flower's ConfigRecord refuses NumPy scalars
            "examples_per_client": check_positive_int("examples_per_client", self.examples_per_client),
            "lr": check_number("lr", self.lr, low=0.0, low_open=True),
            "local_steps": check_positive_int("local_steps", self.local_steps),
            "batch_size": check_nonnegative_int("batch_size", self.batch_size),
            "seed": check_seed("seed", self.seed),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_config(self) -> dict:
        """The settings as a flat dict with Flower's hyphenated keys (for a ``ConfigRecord``)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping, *, ignore_unknown: bool = False) -> "FLSettings":
        """Read the settings back from :meth:`to_config`'s hyphenated keys (missing keys keep
        their defaults). An unknown key is an error that lists the allowed ones, unless
        ``ignore_unknown`` (for a run config or message config that also carries other keys);
        a field spelt with underscores (``local_steps``) is always an error."""
        allowed = [f.name.replace("_", "-") for f in fields(cls)]
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (or Flower ConfigRecord) with keys from {allowed}, got {type(config).__name__}.")
        unknown = [key for key in config if key not in allowed and (not ignore_unknown or str(key).replace("_", "-") in allowed)]
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; the allowed keys are {allowed} (hyphens, as FLSettings.to_config writes them).")
        return cls(**{key.replace("-", "_"): value for key, value in config.items() if key in allowed})


def make_model(settings: FLSettings) -> nn.Module:
    """The global model of a run: the paper's LeNet (1 channel, 32x32, 10 classes), weights
    uniform in [-0.5, 0.5] drawn from ``settings.seed`` (the caller's RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        model = LeNet(channels=1, num_classes=NUM_CLASSES, image_size=32, init="default")
    return init_uniform_(model, seed=settings.seed)


def load_dataset(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of a bundled data set as (images (n, 1, 32, 32) in [0, 1], labels)."""
    check_choice("dataset", name, DATASETS)
    if name == "faces":
        return data.lfw_faces(n=n, size=32, num_classes=NUM_CLASSES, seed=0)
    return data.digits(n=n, size=32)


def partition(x: torch.Tensor, y: torch.Tensor, num_partitions: int, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s share of ``(x, y)``: the data cut into ``num_partitions``
    contiguous, near-equal slices, in order (an IID split if the data are shuffled)."""
    check_positive_int("num_partitions", num_partitions)
    check_nonnegative_int("partition_id", partition_id)
    if partition_id >= num_partitions:
        raise ValueError(f"partition_id must be below num_partitions={num_partitions}, got {partition_id}.")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels; they must match.")
    if num_partitions > len(x):
        raise ValueError(f"cannot cut {len(x)} examples into num_partitions={num_partitions} non-empty slices; use fewer partitions or more data.")
    index = torch.tensor_split(torch.arange(len(x)), num_partitions)[partition_id]
    return x[index], y[index]


def load_partition(settings: FLSettings, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s private data: ``settings.examples_per_client`` examples."""
    check_positive_int("num_partitions", num_partitions)
    x, y = load_dataset(settings.dataset, settings.examples_per_client * num_partitions)
    return partition(x, y, num_partitions, partition_id)


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: FLSettings) -> list[torch.Tensor]:
    """What a client shares. FedSGD: the gradient of the mean loss on ``(x, y)``. FedAvg:
    ``W_E - W_0`` after ``settings.local_steps`` SGD steps at ``settings.lr`` over mini-batches of
    ``settings.batch_size`` taken in order (:func:`dlgkit.federated.client_update`)."""
    if settings.mode == "fedsgd":
        return client_gradient(model, x, y)
    update = client_update(model, x, y, lr=settings.lr, local_steps=settings.local_steps, batch_size=settings.batch_size or None)
    return update.tensors
