"""Shared machinery of the exercise checks: reporting, and the failure type."""

from __future__ import annotations

import traceback
from typing import Callable

import torch


class ExerciseFailure(AssertionError):
    """Raised inside a check to report a wrong answer with an explanation."""


def _report(name: str, body: Callable[[], str]) -> bool:
    try:
        detail = body()
    except NotImplementedError:
        print(f"❌ {name}: not implemented yet (the function still raises NotImplementedError).")
        return False
    except ExerciseFailure as failure:
        print(f"❌ {name}: {failure}")
        return False
    except Exception as exc:  # noqa: BLE001 - the student's code may raise anything
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"❌ {name}: your function raised {type(exc).__name__}: {exc} (line {frame.lineno} of {frame.filename}).")
        return False
    print(f"✅ {name}: passed. {detail}")
    return True


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ExerciseFailure(message)


def _tensor(value: object, what: str) -> torch.Tensor:
    _require(isinstance(value, torch.Tensor), f"{what} should be a torch.Tensor, got {type(value).__name__}.")
    return value  # type: ignore[return-value]
