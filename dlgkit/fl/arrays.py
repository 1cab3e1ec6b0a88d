"""Conversions between Flower's ``ArrayRecord`` and the lists of torch tensors dlgkit uses.

A model's parameters (or a gradient, or a weight update: one tensor per parameter) travel
in an ``ArrayRecord`` keyed by parameter name. The round trip is exact: same values, dtypes
and shapes. Explained in chapter 6 of the book.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

__all__ = ["tensors_to_record", "record_to_tensors", "parameter_names"]


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``model``, in ``model.parameters()`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _reference(like: nn.Module | Sequence[torch.Tensor], what: str) -> tuple[list[str] | None, list[torch.Tensor]]:
    if isinstance(like, nn.Module):
        return parameter_names(like), [p for p in like.parameters() if p.requires_grad]
    if isinstance(like, torch.Tensor) or not isinstance(like, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in like):
        raise TypeError(f"{what} must be an nn.Module or a list of torch tensors, got {type(like).__name__}.")
    return None, list(like)


def tensors_to_record(tensors: Sequence[torch.Tensor], names: nn.Module | Sequence[str] | None = None) -> ArrayRecord:
    """Pack ``tensors`` (parameters, a gradient or an update; one tensor per parameter) into an
    ``ArrayRecord``. Keys are the parameter names of ``names`` (a model, or a list of strings)
    or ``"0"``, ``"1"``, ... when ``names`` is None. Values are detached CPU copies.
    Explained in chapter 6 of the book."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list of torch tensors (one per parameter), got {type(tensors).__name__}.")
    if isinstance(names, nn.Module):
        keys = parameter_names(names)
    elif names is None:
        keys = [str(i) for i in range(len(tensors))]
    elif isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be the model the tensors belong to or a list of str (one per tensor), got {names!r}.")
    else:
        keys = list(names)
    if len(keys) != len(tensors):
        raise ValueError(f"tensors has {len(tensors)} entries but names has {len(keys)}; pass one name per tensor (or the model they belong to).")
    if len(set(keys)) != len(keys):
        raise ValueError(f"names must be distinct, got {keys}.")
    record = ArrayRecord()
    for i, (key, t) in enumerate(zip(keys, tensors)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, expected a torch tensor.")
        if t.dtype in (torch.bfloat16,) or t.is_complex():
            raise ValueError(f"tensors[{i}] ({key!r}) has dtype {t.dtype}, which Flower's arrays (NumPy) cannot carry; cast it to float32 first.")
        record[key] = Array(t.detach().cpu().numpy())
    return record


def record_to_tensors(record: ArrayRecord, like: nn.Module | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Unpack ``record`` into a list of tensors shaped like ``like`` (a model: its trainable
    parameters, matched by name; or a list of tensors, matched by position), on ``like``'s
    device. Counts, names, shapes and dtypes must agree exactly; anything else is an error that
    says what differs. Explained in chapter 6 of the book."""
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"record must be a flwr.app.ArrayRecord, got {type(record).__name__}.")
    names, ref = _reference(like, "like")
    keys = list(record.keys())
    if len(keys) != len(ref):
        raise ValueError(f"record holds {len(keys)} arrays but like has {len(ref)} tensors; the record belongs to another model.")
    if names is not None and keys == [str(i) for i in range(len(keys))] and keys != names:
        raise ValueError("record was packed without names (keys '0', '1', ...) but like is a model; pack it with tensors_to_record(tensors, names=model), or pass like=list(model.parameters()) to match by position.")
    if names is not None and keys != names:
        raise ValueError(f"record's keys {keys} differ from the model's parameter names {names}; the record belongs to another model.")
    out = []
    for key, r in zip(keys, ref):
        array = record[key].numpy()
        t = torch.from_numpy(np.array(array, copy=True))
        if tuple(t.shape) != tuple(r.shape):
            raise ValueError(f"record[{key!r}] has shape {tuple(t.shape)} but the matching tensor has shape {tuple(r.shape)}.")
        if t.dtype != r.dtype:
            raise ValueError(f"record[{key!r}] has dtype {t.dtype} but the matching tensor has dtype {r.dtype}; convert one of them (e.g. model.to(torch.{str(t.dtype).split('.')[-1]})).")
        out.append(t.to(r.device))
    return out
