"""Argument checks shared by every dlgkit module, and the course's named thresholds.

Each check raises a ``ValueError`` (or ``TypeError`` for a wrong kind of object) whose message
names the argument, shows the value it got and says what to pass instead, in the style of
scikit-learn. Bad input never reaches torch, NumPy or scikit-image, where the error would come
from deep inside a dependency.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

__all__ = [
    "SUCCESS_PSNR",
    "STOPPED_PSNR",
    "check_choice",
    "check_positive_int",
    "check_nonnegative_int",
    "check_number",
    "check_seed",
    "check_probability",
    "check_finite_tensors",
    "check_unit_range",
    "check_class_indices",
]

#: PSNR (dB) at and above which a reconstruction counts as a success: the face is back, pixel
#: errors are invisible (used by the chapters, the benchmarks and the exercise checks).
SUCCESS_PSNR = 30.0
#: PSNR (dB) below which an attack counts as stopped: nothing of the image is recognisable.
STOPPED_PSNR = 15.0


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """``value`` must be one of ``allowed`` (strings); returns it."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; choose one of {list(allowed)}.")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value: object, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` must be an int >= 1 (or None when ``allow_none``); returns it as an int."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or int(value) < 1:
        also = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{also}, got {value!r}.{' ' + hint if hint else ''}")
    return int(value)


def check_nonnegative_int(name: str, value: object) -> int:
    """``value`` must be an int >= 0; returns it as an int."""
    if not _is_int(value) or int(value) < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    return int(value)


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """``value`` must be a finite real number in the given range (``low``/``high`` inclusive
    unless ``*_open``); returns it as a float. NaN and inf are always refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}.{' ' + hint if hint else ''}")
    v = float(value)
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if bad_low or bad_high:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must lie in {span}, got {value!r}.{' ' + hint if hint else ''}")
    return v


def check_seed(name: str, value: object) -> int:
    """A seed for a ``torch.Generator``: an int in [0, 2**63 - 1] (NumPy integers too); returns
    it as a plain ``int``, which callers must use (torch refuses ``np.int64``)."""
    if not _is_int(value) or not 0 <= int(value) <= 2**63 - 1:
        raise ValueError(f"{name} must be an int >= 0 and at most 2**63 - 1 (a seed for a torch.Generator), got {value!r}.")
    return int(value)


def check_probability(name: str, value: object) -> float:
    """A number in [0, 1]."""
    return check_number(name, value, low=0.0, high=1.0)  # type: ignore[return-value]


def check_finite_tensors(name: str, tensors: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Every tensor must be free of NaN and inf: an attack on a NaN gradient would otherwise
    report nonsense as a result."""
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(items):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            where = name if len(items) == 1 else f"{name}[{i}]"
            raise ValueError(f"{where} holds NaN or inf values; a gradient or image with non-finite entries cannot be attacked or scored. Check the computation that produced it.")


def check_unit_range(name: str, x: torch.Tensor, tol: float = 1e-6) -> None:
    """Images in dlgkit are floats in [0, 1]; refuse anything else with a hint (e.g. 0-255)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point image in [0, 1], got dtype {x.dtype}; use dlgkit.data.to_tensor, which scales integer images.")
    check_finite_tensors(name, x)
    if x.numel() and (float(x.min()) < -tol or float(x.max()) > 1 + tol):
        hint = " It looks like 0-255 pixel values: divide by 255." if float(x.max()) > 1.5 else ""
        raise ValueError(f"{name} must hold pixel values in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}].{hint}")


def check_class_indices(name: str, labels: object, num_classes: int | None = None) -> torch.Tensor:
    """Class indices: an int, a sequence of ints or an integer tensor (floats only when every
    value is a whole number, so that 3.7 is never silently read as 3), each in
    ``[0, num_classes)`` when ``num_classes`` is given. Returns a flat ``long`` tensor on the CPU."""
    if isinstance(labels, (bool, str)) or (isinstance(labels, torch.Tensor) and labels.dtype == torch.bool):
        raise ValueError(f"{name} must hold integer class indices, got {labels!r}.")
    try:
        t = torch.as_tensor(labels).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must hold integer class indices (an int, a list of ints or an integer tensor), got {labels!r}.") from exc
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}.")
    t = t.flatten()
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(bad.any()):
            raise ValueError(f"{name} must hold integer class indices, got {t[bad][:3].tolist()}; round them first, or pass scores/probabilities of shape (N, K) where a function takes them.")
    t = t.long()
    if num_classes is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (the model has {num_classes} classes), got {t.tolist()[:8]}.")
    return t
