"""Shared machinery of the exercise checks: private cases, calling the student's function, reporting.

How a check grades the student and not the library:

- its cases are drawn inside the check from a generator seeded with fresh operating-system
  entropy (:func:`fresh_generator`), so every run sees new inputs and no answer can be typed in;
- the student's function runs in a thread of its own (:func:`call_student`): walking up the
  frames from the student's code finds only the public arguments, never a case's truth, which
  stays in the check's frames and is compared with the answer afterwards;
- a call into a dlgkit module the exercise asks the student to write (the library's own
  version, or the data set the private cases come from) fails the check;
- answers are compared with the truth or with the check's own computation, never with the
  dlgkit function the exercise replaces, and NaN or inf never passes.
"""

from __future__ import annotations

import ctypes
import gc
import math
import numbers
import secrets
import sys
import threading
import time
import traceback
from typing import Callable, Sequence

import torch

from dlgkit.checks import check_number


class ExerciseFailure(AssertionError):
    """Raised inside a check to report a wrong answer with an explanation."""


#: dlgkit modules every exercise may use: the models the checks hand over run through them.
#: (Not dlgkit.exercises: the checks' own references live there.)
ALWAYS_ALLOWED = ("dlgkit.models", "dlgkit.checks", "dlgkit.budget")


def fresh_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy: cases nobody can predict."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer in ``[low, high)`` from ``generator``."""
    return int(torch.randint(low, high, (1,), generator=generator))


class _Forbidden(BaseException):
    """Raised into the student's code when it calls a module the exercise does not allow
    (a BaseException, so that an ``except Exception`` in the student's code cannot swallow it)."""


#: Introspection that reaches other threads' frames or every live object, where a case's truth
#: lives while the student's function runs: calling one of these fails the check.
_INTROSPECTION = {sys._current_frames: "sys._current_frames", gc.get_objects: "gc.get_objects",
                  gc.get_referrers: "gc.get_referrers", gc.get_referents: "gc.get_referents"}


def _check_modules() -> dict[str, dict]:
    """The namespaces of the checks' own modules, to find a student's function patching them."""
    return {name: dict(vars(module)) for name, module in list(sys.modules.items())
            if name.startswith("dlgkit.exercises") and module is not None}


class _TimedOut(BaseException):
    """Raised into the student's code when it runs past the time limit (a BaseException, so
    that an ``except Exception`` in the student's code cannot swallow it)."""


#: How long one call of a student's function may run, in seconds (:func:`call_student`): far
#: above what the reference solutions need at the full budget (a few seconds to a minute).
TIME_LIMIT = 600.0


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in ``thread`` at its next Python instruction (CPython's asynchronous
    exception; a long torch call in C finishes first)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def call_student(fn: Callable, *args: object, allow: Sequence[str] | None = (), time_limit: float | None = TIME_LIMIT) -> object:
    """``fn(*args)`` in a thread of its own, returning its result or raising its exception.

    ``allow``: the dlgkit modules (by name prefix, besides :data:`ALWAYS_ALLOWED`) that ``fn``
    may call; any other ``dlgkit`` or ``opacus`` call fails the check. ``None`` allows everything.
    ``time_limit``: seconds after which the call is stopped and the check fails (a loop that
    never ends); None waits for ever.
    """
    time_limit = check_number("time_limit", time_limit, low=0.0, low_open=True, allow_none=True,
                              hint="It is the number of seconds the student's function may run; None waits for ever.")
    box: dict = {}
    allowed = ALWAYS_ALLOWED + tuple(allow or ())

    def hook(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "c_call":
            for function, name in _INTROSPECTION.items():
                if arg is function:
                    box.setdefault("forbidden", name)
                    sys.setprofile(None)
                    raise _Forbidden(name)
            return
        if event == "call":
            module = frame.f_globals.get("__name__") or ""
            if module.startswith(("dlgkit", "opacus")) and not module.startswith(allowed):
                box.setdefault("forbidden", f"{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}")
                sys.setprofile(None)
                raise _Forbidden(box["forbidden"])

    def run() -> None:
        if allow is not None:
            sys.setprofile(hook)
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the checking thread
            box["error"] = exc
        finally:
            sys.setprofile(None)

    namespaces = _check_modules()
    worker = threading.Thread(target=run, name="exercise", daemon=True)
    worker.start()
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    try:
        while worker.is_alive():
            worker.join(0.05)
            if deadline is not None and time.monotonic() > deadline:
                box["timed_out"] = True
                _raise_in(worker, _TimedOut)
                worker.join(10.0)  # it stops at its next Python instruction
                break
    except KeyboardInterrupt:
        print("Interrupted: the check stops here; your function finishes its current call in the background.")
        raise
    patched = sorted(f"{name}.{key}" for name, before in namespaces.items() for key in set(before) | set(vars(sys.modules[name]))
                     if vars(sys.modules[name]).get(key, box) is not before.get(key, box))
    if patched:
        for name, before in namespaces.items():  # undo it, so the next check runs unpatched
            namespace = vars(sys.modules[name])
            namespace.clear()
            namespace.update(before)
        raise ExerciseFailure(f"your function changed the check itself ({', '.join(patched[:3])}). Solve the exercise instead.")
    if box.get("timed_out"):
        raise ExerciseFailure(f"your function did not return within {float(time_limit):g} s, so the check stopped it. "
                              "Look for a loop that never ends (a while loop whose condition never turns False), or far too many iterations.")
    if "forbidden" in box and box["forbidden"] in _INTROSPECTION.values():
        raise ExerciseFailure(f"your function called {box['forbidden']}, which reads the check's private cases. Solve the exercise from the arguments you are given.")
    if "forbidden" in box:
        allowed_text = ", ".join(f"dlgkit.{m.split('.', 1)[1]}" for m in allow or ()) or "none of dlgkit's modules"
        raise ExerciseFailure(
            f"your function called {box['forbidden']}. This exercise asks you to write that piece "
            f"yourself (allowed here: torch, numpy, scipy, your own functions, {allowed_text})."
        )
    if "error" in box:
        box["error"].raised_by_student = True  # _report blames the student only for these
        raise box["error"]
    return box.get("value")


def _report(name: str, body: Callable[[], str], hints: dict[str, str] | None = None) -> bool:
    """Run a check's ``body``; print ✅ with its detail, or ❌ with what went wrong; return
    True/False. ``hints`` maps a fragment of an exception's message to advice on the usual
    mistake behind it. The caller's global random state is left as it was."""
    try:
        with torch.random.fork_rng(devices=[]):
            detail = body()
    except NotImplementedError:
        print(f"❌ {name}: not implemented yet (the function still raises NotImplementedError).")
        return False
    except ExerciseFailure as failure:
        print(f"❌ {name}: {failure}")
        return False
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the student's code may raise anything, sys.exit() too
        advice = next((text for key, text in (hints or {}).items() if key in str(exc)), "")
        if not getattr(exc, "raised_by_student", False):  # the check itself could not use the answer
            print(f"❌ {name}: the check could not use your answer ({type(exc).__name__}: {exc}). Return what the exercise asks for: "
                  f"torch tensors of the shapes it names (float32 for real values, integer ids as ints).{' ' + advice if advice else ''}")
            return False
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"❌ {name}: your function raised {type(exc).__name__}: {exc} (line {frame.lineno} of {frame.filename}).{' ' + advice if advice else ''}")
        return False
    print(f"✅ {name}: passed. {detail}")
    return True


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ExerciseFailure(message)


def _tensor(value: object, what: str) -> torch.Tensor:
    """``value`` as a finite tensor (real values cast to the checks' float32, so a float64
    answer is graded, not crashed on), or a failure that says what is wrong with it."""
    _require(isinstance(value, torch.Tensor), f"{what} should be a torch.Tensor, got {type(value).__name__}.")
    value = value.detach()  # type: ignore[union-attr]
    if value.is_floating_point() or value.is_complex():
        _require(bool(torch.isfinite(value).all()), f"{what} contains NaN or inf: a value that is not a number never passes.")
    return value.float() if value.is_floating_point() else value


def _as_int_list(value: object, what: str) -> list[int]:
    """``value`` (a tensor, list, tuple or set) as a list of ints; floats only when whole numbers
    (``int()`` would truncate 3.5 to 3), anything else (strings, None, NaN) a failure."""
    if isinstance(value, torch.Tensor):
        value = _tensor(value, what).flatten().tolist()
    _require(isinstance(value, (list, tuple, set, frozenset)), f"return {what} as a list or tensor of ints, got {type(value).__name__}.")
    _require(
        all((isinstance(v, numbers.Integral) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v) and v == int(v)) for v in value),  # type: ignore[union-attr]
        f"{what} should be whole numbers, got {list(value)[:8]}.",  # type: ignore[call-overload]
    )
    return [int(v) for v in value]  # type: ignore[union-attr]


def _psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """PSNR in dB for images in [0, 1] (the check's own formula; inputs already finite)."""
    mse = float(((reconstruction.double() - original.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()
