"""A stand-in CUDA device for machines without a GPU, to test device placement on the CPU.

    import simulated_cuda
    simulated_cuda.install()          # from here on, torch "sees" one CUDA device

After :func:`install`, ``torch.cuda.is_available()`` is True and every tensor placed on
``cuda`` is a :class:`SimulatedCudaTensor`: a wrapper that keeps its numbers in an ordinary CPU
tensor and computes there. (Its ``.device`` reads ``lazy:0``, for the reason given at
:data:`SIMULATED`; code that passes ``x.device`` along stays on the simulated GPU.) What it
adds is CUDA's discipline, so that code which would fail on a real GPU fails here too:

* an operation that mixes a CUDA tensor with a CPU tensor (other than a 0-dim one, as CUDA
  allows) raises ``RuntimeError: Expected all tensors to be on the same device``;
* ``.numpy()`` (and so ``np.asarray``, matplotlib's ``imshow``) refuses a CUDA tensor;
* a factory call on ``cuda`` with a CPU ``torch.Generator`` is refused, as on a GPU.

Results are bit-for-bit the CPU results, so a notebook's asserts still check real numbers, and
:data:`counts` tells how much of the work went to the GPU. It is 2 to 4 times slower than plain
CPU (every operation passes through Python), so use the quick budget. It checks placement only;
it says nothing about speed, memory or the numerics of real GPU kernels.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["install", "uninstall", "simulated", "counts", "cuda_share", "SimulatedCudaTensor", "SimulatedGenerator", "DeviceMixError"]

CUDA = torch.device("cuda", 0)
# The wrappers say "lazy:0" (a device type no one here uses): PyTorch's autograd engine asks the
# CUDA driver for a stream for every tensor that reports "cuda", and this machine has no driver.
# Both "cuda" and "lazy" requests land on the simulated device, so code that uses `x.device` or
# "cuda" behaves alike, while "meta" (transformers builds its models there first) stays meta.
SIMULATED = torch.device("lazy", 0)
aten = torch.ops.aten

# CUDA accepts these with CPU arguments (copies across devices; indexing with CPU indices)
_CROSS_DEVICE_OK = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                    aten._index_put_impl_.default, aten.lift_fresh.default}


#: How many operations ran on each device since :func:`install` (or the last reset): a check
#: that the work really went to the GPU, not only that nothing was mixed up. ``host_reads``
#: counts the operations that make a real GPU's host wait for the device: a value read into
#: Python (``item``, ``bool``, ``int``, ``float``, ``tolist``), a copy to the CPU, or an
#: operation whose result's size depends on the data (``nonzero``, ``masked_select``).
counts = {"cuda": 0, "cpu": 0, "host_reads": 0}

# results whose shape depends on the values: the host must read them before it goes on
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default}


def cuda_share() -> float:
    """The fraction of operations that ran on the simulated GPU."""
    total = counts["cuda"] + counts["cpu"]
    return counts["cuda"] / total if total else 0.0


class DeviceMixError(RuntimeError):
    """What a real GPU raises when CPU and CUDA tensors meet in one operation."""


class SimulatedCudaTensor(torch.Tensor):
    """A tensor on the simulated GPU: CPU numbers in ``elem``, CUDA's rules in every operation."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=SIMULATED, requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"{self.elem!r} (simulated cuda:0)"

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

    def __array__(self, *args, **kwargs):
        return self.numpy()

    def tolist(self):
        counts["host_reads"] += 1
        return self.elem.tolist()

    def __format__(self, spec: str) -> str:  # f"{loss:.2e}" works on a CUDA scalar
        return self.elem.__format__(spec) if self.dim() == 0 else object.__format__(self, spec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def tree_map(fn, x):
    """``fn`` on every tensor in the (nested) arguments or results of an operation; a lean
    version of ``torch.utils._pytree.tree_map``, which costs more than the operations here."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if type(x) in (list, tuple):
        return type(x)(tree_map(fn, v) for v in x)
    if type(x) is dict:
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, tuple):  # named tuples of results
        values = [tree_map(fn, v) for v in x]
        return type(x)(*values) if hasattr(x, "_fields") else type(x)(values)
    return x


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type in ("cuda", "lazy")


def _dispatch(func, args, kwargs):
    on_cuda, on_cpu = [], []
    wrapped: dict[int, SimulatedCudaTensor] = {}

    def unwrap(t):
        if isinstance(t, SimulatedCudaTensor):
            on_cuda.append(t)
            wrapped[id(t.elem)] = t
            return t.elem
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            on_cpu.append(t)
        return t

    args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    to_cuda = _is_cuda(kwargs.get("device"))
    if to_cuda:
        kwargs["device"] = torch.device("cpu")
    generator = kwargs.get("generator")
    if generator is not None:
        wants = "cuda" if (to_cuda or on_cuda) else "cpu"
        found = "cuda" if _is_simulated_generator(generator) else generator.device.type
        if found != wants:
            raise DeviceMixError(f"Expected a '{wants}' device type for generator but found '{generator.device.type}' (in {func}).")
    if func is aten._to_copy.default:
        to_cuda = to_cuda or ("device" not in kwargs and bool(on_cuda))
    elif func in _CROSS_DEVICE_OK:
        first = args[0] if args else None
        to_cuda = to_cuda or any(first is t.elem for t in on_cuda)
    elif on_cuda and on_cpu:
        shapes = ", ".join(str(tuple(t.shape)) for t in on_cpu)
        raise DeviceMixError(f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                             f"(simulated: {func} got CPU tensors of shape {shapes})")
    else:
        to_cuda = to_cuda or bool(on_cuda)
    out = func(*args, **kwargs)
    counts["cuda" if to_cuda or on_cuda else "cpu"] += 1
    if on_cuda and (func in _DATA_DEPENDENT or not to_cuda):  # a result the host reads from the device
        counts["host_reads"] += 1
    if func is aten._local_scalar_dense.default or not to_cuda:
        return out

    def wrap(t):
        if type(t) is torch.Tensor:
            same = wrapped.get(id(t))  # in-place ops give back their input
            return same if same is not None else SimulatedCudaTensor(t)
        return t

    return tree_map(wrap, out)


class _Mode(TorchDispatchMode):
    """Catches factory calls (``torch.zeros(..., device="cuda")``) before they reach CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _to_simulated(device):
    """Send "cuda" to the simulated device (PyTorch would otherwise ask the driver)."""
    if isinstance(device, (str, torch.device)):
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            return device
        if parsed.type == "cuda":
            return SIMULATED
    return device


def _redirect_cuda(method):
    @functools.wraps(method)
    def patched(self, *args, **kwargs):
        args = tuple(_to_simulated(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _to_simulated(kwargs["device"])
        return method(self, *args, **kwargs)

    return patched


_RealGenerator = torch.Generator
_simulated_generators: weakref.WeakSet = weakref.WeakSet()


def _is_simulated_generator(generator) -> bool:
    """Inside an operation PyTorch hands over a plain ``torch._C.Generator`` object, not the
    subclass; a simulated generator is recognised by its state (a CPU generator in exactly the
    same state would be taken for it, which only weakens this check, never the numbers)."""
    if getattr(generator, "simulated", False):
        return True
    state = generator.get_state()
    return any(torch.equal(g.get_state(), state) for g in list(_simulated_generators))


class _GeneratorMeta(type(torch.Generator)):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _RealGenerator)

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, _RealGenerator)


class SimulatedGenerator(_RealGenerator, metaclass=_GeneratorMeta):
    """``torch.Generator`` while the simulation runs: ``torch.Generator("cuda")`` gives a CPU
    generator that says it lives on ``cuda:0`` (so that the device checks above can tell them
    apart); any other device gives PyTorch's own generator."""

    def __new__(cls, device="cpu"):
        if not _is_cuda(_to_simulated(device)):
            return _RealGenerator(device)
        gen = super().__new__(cls, "cpu")
        gen.simulated = True
        _simulated_generators.add(gen)
        return gen

    def __init__(self, device="cpu") -> None:
        pass

    @property
    def device(self) -> torch.device:
        return CUDA if getattr(self, "simulated", False) else _RealGenerator.device.__get__(self)


def _from_data(make):
    """``torch.tensor(data, device="cuda")`` copies its data inside PyTorch, past the dispatch
    mode; build it on the CPU and move it instead."""

    @functools.wraps(make)
    def patched(data, *args, **kwargs):
        device = _to_simulated(kwargs.get("device"))
        if device is not None and _is_cuda(device):
            return make(data, *args, **dict(kwargs, device="cpu")).to(SIMULATED)
        return make(data, *args, **kwargs)

    return patched


_mode: _Mode | None = None
_saved: list[tuple[object, str, object]] = []


def _patch(owner, name: str, value) -> None:
    _saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def install() -> None:
    """Make torch see one (simulated) CUDA device, until :func:`uninstall`."""
    global _mode
    if _mode is not None:
        return
    _patch(torch.cuda, "_lazy_init", lambda: None)
    _patch(torch.cuda, "is_available", lambda: True)
    _patch(torch.cuda, "device_count", lambda: 1)
    _patch(torch.cuda, "current_device", lambda: 0)
    _patch(torch.cuda, "get_device_name", lambda device=None: "simulated CUDA (computes on the CPU)")
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    # torch.optim asks the accelerator API for the current stream (CUDA-graph capture check)
    _patch(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    _patch(torch.Tensor, "to", _redirect_cuda(torch.Tensor.to))
    _patch(torch.Tensor, "cuda", lambda self, device=None, non_blocking=False, **kw: self.to(SIMULATED, non_blocking=non_blocking))
    _patch(torch, "Generator", SimulatedGenerator)
    # `with torch.device(...)` recognises factories by identity, from a list built once: build it
    # from PyTorch's own functions before they are wrapped (transformers relies on it)
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in ("tensor", "as_tensor", "asarray"):
        _patch(torch, name, _from_data(getattr(torch, name)))
    counts.update(cuda=0, cpu=0, host_reads=0)
    _mode = _Mode()
    _mode.__enter__()


def uninstall() -> None:
    """Undo :func:`install`: torch sees the real hardware again."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    while _saved:
        owner, name, value = _saved.pop()
        setattr(owner, name, value)


@contextlib.contextmanager
def simulated():
    """``with simulated(): ...`` runs the block with the simulated CUDA device."""
    install()
    try:
        yield
    finally:
        uninstall()
