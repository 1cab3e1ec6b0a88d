"""Iteration budgets, seeding and device choice shared by every chapter.

One environment variable, ``DLGKIT_QUICK``, switches the whole course between the
*full* budget (the default, what the book and the GPU workflow run) and the *quick*
budget that CPU continuous integration runs. Chapters ask :func:`budget` for their
iteration counts so the same notebook serves both.

Defined in :doc:`/book/01_gradient_sharing` (first use).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from dlgkit.checks import check_positive_int

__all__ = ["is_quick", "budget", "seed_everything", "default_device", "device_of", "resolve_device", "progress_enabled", "cores", "threads_for", "use_threads"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def is_quick() -> bool:
    """Return True when ``DLGKIT_QUICK`` asks for the quick (CI) budget.

    Accepted values are ``1/true/yes/on`` and ``0/false/no/off`` (case-insensitive);
    anything else is an error so that a typo cannot silently run the wrong budget.
    """
    value = os.environ.get("DLGKIT_QUICK", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"DLGKIT_QUICK={value!r} is not understood; use 1 (quick budget) or 0 (full budget)."
    )


def budget(full: int, quick: int) -> int:
    """Pick an iteration count: ``full`` normally, ``quick`` under ``DLGKIT_QUICK=1``.

    >>> budget(300, 50)  # doctest: +SKIP
    300
    """
    full = check_positive_int("full", full, hint="budget(full, quick) takes two iteration counts.")
    quick = check_positive_int("quick", quick, hint="budget(full, quick) takes two iteration counts.")
    return quick if is_quick() else full


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and CUDA); return a seeded ``torch.Generator``.

    On a GPU it also asks for full float32 precision and deterministic kernels: cuDNN and
    matrix products may otherwise use TF32 (10-bit mantissas), and gradient matching, which
    drives a gradient distance towards 1e-10, needs every bit of float32.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63) (PyTorch's seed range), got {seed}.")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when available (and not disabled with ``DLGKIT_DEVICE=cpu``), else CPU.

    Every chapter puts its models and data here (``DEVICE = budget.default_device()``), so the
    same notebook runs on a laptop CPU and on a GPU. ``DLGKIT_DEVICE=cuda`` makes a missing GPU
    an error instead of a silent fall-back (the GPU workflow sets it).
    """
    wanted = os.environ.get("DLGKIT_DEVICE", "").strip().lower()
    if wanted:
        if wanted not in {"cpu", "cuda"}:
            raise ValueError(f"DLGKIT_DEVICE={wanted!r}; use 'cpu' or 'cuda'.")
        if wanted == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("DLGKIT_DEVICE=cuda but PyTorch sees no CUDA device.")
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` means :func:`default_device`.
    Asking for CUDA on a machine without it is a clear error, not a crash later on."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device PyTorch knows; use 'cpu' or 'cuda'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but PyTorch sees no CUDA device; use 'cpu' (or device=None for the best available).")
    return resolved


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (CPU for a model without any). dlgkit's functions
    that take a model compute there and move the tensors they are given to it."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def progress_enabled(progress: bool | None = None) -> bool:
    """Resolve a ``progress`` argument: an explicit bool wins; ``None`` shows progress bars
    unless ``DLGKIT_PROGRESS=0`` (the book build and CI set it to keep pages clean)."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("DLGKIT_PROGRESS", "1").strip().lower() not in _FALSE


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one, else
    ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for(processes: int = 1, batched: bool = True) -> int:
    """The thread policy for the course's small models on a CPU: the torch threads each of
    ``processes`` processes attacking at the same time should use.

    - ``batched=True`` (many problems as one, :func:`dlgkit.attacks.vectorised.reconstruct_many`, or a
      simulation's clients): an equal share of :func:`cores`, at least 1;
    - ``batched=False`` (one small attack at a time): 1 thread, whatever the cores.

    Measured by ``benchmarks/threads.py`` on 2 cores (``benchmarks/results/threads.md``): one
    LeNet attack at a time ran 10% slower with 2 threads than with 1; 8 attacks as one batched
    problem ran 20% faster with 2; and two processes with 2 threads each ran 5 to 6 times slower
    than with 1 thread each (they fight over the cores). Explained in the README (thread policy)."""
    processes = check_positive_int("processes", processes, hint="It is how many processes run attacks at the same time (1 when only this one does).")
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True (many problems at once) or False (one small attack at a time), got {batched!r}.")
    return max(1, cores() // processes) if batched else 1


def use_threads(processes: int = 1, batched: bool = True) -> int:
    """Set torch's thread count to :func:`threads_for` ``(processes, batched)`` and return it:
    call it in each of ``processes`` processes (benchmark jobs, simulated clients) before they
    attack."""
    threads = threads_for(processes, batched)
    torch.set_num_threads(threads)
    return threads
