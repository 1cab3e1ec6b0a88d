"""The ``ClientApp`` of chapter 6: thin wiring around :mod:`dlgkit.fl.task`.

A client loads the global weights it receives, trains on its own partition (the
``partition-id`` of its node config) with the settings in the message's config, and replies
with what it shares: a gradient (FedSGD) or ``W_E - W_0`` (FedAvg), plus its example count.
Explained in chapter 6 of the book.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dlgkit.fl.arrays import record_to_tensors, tensors_to_record
from dlgkit.fl.task import FLSettings, load_partition, local_train, make_model

__all__ = ["app"]

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's partition and reply with the shared update."""
    settings = FLSettings.from_config(dict(msg.content["config"]), ignore_unknown=True)
    return train_and_reply(make_model(settings), msg, context, settings)


def train_and_reply(model: torch.nn.Module, msg: Message, context: Context, settings: FLSettings) -> Message:
    """Load the message's weights into ``model``, train on this node's partition with
    ``settings`` and reply with the shared update and the example count (the honest client of
    chapter 6 and, on a planted model, the victim of chapter 7)."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), record_to_tensors(msg.content["arrays"], model)):
            p.copy_(w)
    partition_id = int(context.node_config["partition-id"])
    x, y = load_partition(settings, partition_id, int(context.node_config["num-partitions"]))
    shared = local_train(model, x, y, settings)
    content = RecordDict(
        {
            "arrays": tensors_to_record(shared, model),
            "metrics": MetricRecord({"num-examples": len(x)}),
            # bookkeeping for the course (which data the reply came from); a real client need not send it
            "client": ConfigRecord({"partition-id": partition_id}),
        }
    )
    return Message(content=content, reply_to=msg)
