"""Defences against gradient leakage, and how to measure them: privacy against accuracy.

Each defence changes what a client shares. Most are transforms of the shared gradient
(noise, pruning, quantisation) and work on their own (:func:`add_noise`, :func:`prune`,
:func:`quantise`) or inside a client (:class:`Defence`). Two change how the gradient is made:
several local steps before sharing (FedAvg) and DP-SGD (per-example clipping plus Gaussian
noise, through Opacus, with the privacy spent from Opacus's accountant).

The same :meth:`Defence.share` produces what the attacker sees (:func:`attack_defended`) and
what the server trains on (:func:`train_with_defence`), so both sides of the trade-off are
measured with the same defence (on different models and data: faces for the attack, digits for
training).

Defined in :doc:`/book/05_defences`.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlgkit.attacks.engine import AttackConfig, check_target, grads_restored
from dlgkit.budget import device_of, resolve_device
from dlgkit.checks import (
    STOPPED_PSNR,
    SUCCESS_PSNR,
    check_class_indices,
    check_nonnegative_int,
    check_positive_int,
    check_seed,
    check_unit_range,
)
from dlgkit.federated import check_gradients, client_gradient, client_update

__all__ = [
    "NOISE_DISTRIBUTIONS",
    "PRUNE_SCOPES",
    "QUANTISE_DTYPES",
    "DEFENCE_KINDS",
    "DEFENCES",
    "DEFENDED_ATTACK",
    "NoDefence",
    "GaussianNoise",
    "LaplacianNoise",
    "Prune",
    "PruneGlobal",
    "FP16",
    "Int8",
    "LocalSteps",
    "DPSGD",
    "add_noise",
    "prune",
    "quantise",
    "dp_sgd_gradient",
    "dp_epsilon",
    "relative_change",
    "PruningAwareModel",
    "Defence",
    "attack_defended",
    "TrainResult",
    "train_with_defence",
    "privacy_accuracy_sweep",
]

NOISE_DISTRIBUTIONS = ("gaussian", "laplacian")
PRUNE_SCOPES = ("layer", "global")
QUANTISE_DTYPES = ("fp16", "int8")
def _check_number(name: str, value: object, low: float = 0.0, high: float | None = None, fix: str = "") -> float:
    """Like :func:`dlgkit.checks.check_number` (NumPy and one-element torch scalars accepted),
    with the bounds written as this module's messages have them."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        allowed = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.{' ' + fix if fix else ''}")
    return value


def _gradients(gradients: Sequence[torch.Tensor], name: str = "gradients") -> list[torch.Tensor]:
    return check_target(name, gradients)


def add_noise(
    gradients: Sequence[torch.Tensor], variance: float, distribution: str = "gaussian", generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Add independent noise of the given ``variance`` to every entry of every tensor, as in
    the DLG paper's defence experiments (variances 1e-4 to 1e-1).

    ``distribution`` is ``"gaussian"`` (standard deviation ``sqrt(variance)``) or
    ``"laplacian"`` (scale ``sqrt(variance / 2)``, the same variance). The variance is absolute:
    compare it with the gradient's size through :func:`relative_change`. The noise is drawn
    where ``generator`` lives (the CPU by default) and moved to each tensor's device, so a CPU
    and a GPU run with the same seed add the same noise.
    Defined in :doc:`/book/05_defences`.
    """
    grads = _gradients(gradients)
    where = generator.device if generator is not None else None
    variance = _check_number("variance", variance, fix="It is the noise variance per entry, e.g. 1e-3; use 0 for no noise.")
    if distribution not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r} is not known; choose one of {list(NOISE_DISTRIBUTIONS)}.")
    out = []
    for g in grads:
        if variance == 0:
            out.append(g.clone())
            continue
        if distribution == "gaussian":
            noise = torch.randn(g.shape, generator=generator, device=where) * math.sqrt(variance)
        else:
            # Laplace(0, b) = b * (Exp(1) - Exp(1)), with b = sqrt(variance / 2)
            e = torch.empty((2, *g.shape), device=where).exponential_(generator=generator)
            noise = (e[0] - e[1]) * math.sqrt(variance / 2)
        out.append(g + noise.to(device=g.device, dtype=g.dtype))
    return out


def prune(gradients: Sequence[torch.Tensor], ratio: float, scope: str = "layer") -> list[torch.Tensor]:
    """Gradient pruning: set the fraction ``ratio`` of entries with the smallest magnitude to zero
    and share the rest unchanged (``ratio=0.7`` keeps the largest 30%).

    ``scope="layer"`` ranks the entries of each parameter tensor separately (weights and biases
    are separate tensors); ``scope="global"`` ranks all entries together. Ties at the threshold
    are broken by position, so exactly ``round(ratio * n)`` entries are zeroed.
    Defined in :doc:`/book/05_defences`.
    """
    grads = _gradients(gradients)
    ratio = _check_number("ratio", ratio, 0.0, 1.0, fix="It is the fraction of entries set to zero (0.3 zeroes 30%).")
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope={scope!r} is not known; choose one of {list(PRUNE_SCOPES)}.")
    if scope == "layer":
        return [_prune_flat(g.reshape(-1), ratio).reshape(g.shape) for g in grads]
    flat = _prune_flat(torch.cat([g.reshape(-1) for g in grads]), ratio)
    return [part.reshape(g.shape) for part, g in zip(torch.split(flat, [g.numel() for g in grads]), grads)]


def _prune_flat(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    out = flat.clone()
    k = int(round(ratio * flat.numel()))
    if k > 0:
        out[torch.argsort(flat.abs(), stable=True)[:k]] = 0
    return out


def quantise(gradients: Sequence[torch.Tensor], dtype: str) -> list[torch.Tensor]:
    """Round-trip every tensor through a low-precision format, as a client that shares
    compressed gradients would: ``"fp16"`` (half precision) or ``"int8"`` (symmetric, one scale
    per tensor: ``max|g| / 127``). Returns tensors in the original dtype.
    Defined in :doc:`/book/05_defences`.
    """
    grads = _gradients(gradients)
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be one of the strings {list(QUANTISE_DTYPES)}, got {type(dtype).__name__} {dtype!r}.")
    if dtype not in QUANTISE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not known; choose one of {list(QUANTISE_DTYPES)}.")
    out = []
    for g in grads:
        if dtype == "fp16":
            if g.numel() and float(g.abs().max()) > torch.finfo(torch.float16).max:
                warnings.warn(f"quantise: entries above {torch.finfo(torch.float16).max:g} in magnitude become inf in fp16; the shared gradient will hold inf.", stacklevel=2)
            out.append(g.to(torch.float16).to(g.dtype))
            continue
        scale = g.abs().max() / 127
        if scale == 0:
            out.append(g.clone())
            continue
        out.append((torch.round(g / scale).clamp(-127, 127) * scale).to(g.dtype))
    return out


def dp_sgd_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_multiplier: float, max_grad_norm: float = 1.0,
    expected_batch_size: int | None = None, generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """What a DP-SGD client shares for the batch ``(x, y)``, computed by Opacus: per-example
    gradients (``GradSampleModule``), each clipped to norm ``max_grad_norm``, summed, plus
    Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``, divided by
    ``expected_batch_size`` (default ``len(x)``). ``model`` itself is left untouched.
    Defined in :doc:`/book/05_defences`.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    noise_multiplier = _check_number("noise_multiplier", noise_multiplier, fix="It is sigma in DP-SGD (noise std / clipping norm), typically 0.5 to 2.")
    max_grad_norm = _check_number("max_grad_norm", max_grad_norm, fix="It is the per-example clipping norm C.")
    if max_grad_norm == 0:
        raise ValueError("max_grad_norm must be > 0: a clipping norm of 0 would share pure noise.")
    expected = len(x) if expected_batch_size is None else expected_batch_size
    if not isinstance(expected, int) or isinstance(expected, bool) or expected <= 0:
        raise ValueError(f"expected_batch_size must be a positive int, got {expected_batch_size!r}.")
    device = device_of(model)
    if isinstance(y, torch.Tensor) and y.dim() == 1:  # class indices as int64 (int32 or whole-number floats too)
        y = check_class_indices("y", y)
    x, y = x.to(device), y.to(device)
    private = GradSampleModule(copy.deepcopy(model))
    optimizer = DPOptimizer(
        torch.optim.SGD(private.parameters(), lr=0.0), noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, expected_batch_size=expected, generator=_generator_on(device, generator),
    )
    optimizer.zero_grad()
    with warnings.catch_warnings():  # Opacus's hooks fire although the input needs no gradient
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        F.cross_entropy(private(x), y).backward()
    optimizer.pre_step()  # clip, sum, add noise, divide by the expected batch size
    return [p.grad.detach().clone() for p in private.parameters() if p.requires_grad]


def _generator_on(device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator Opacus can use on ``device`` (it draws its noise there): ``generator`` itself
    when it lives there, otherwise a new one on ``device`` seeded from ``generator``."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float = 1e-5, accountant: str = "rdp") -> float:
    """The privacy spent, epsilon at ``delta``, after ``steps`` DP-SGD steps with Poisson sampling
    at ``sample_rate``, from Opacus's accountant (``"rdp"`` or ``"prv"``). ``inf`` without noise.
    Defined in :doc:`/book/05_defences`.
    """
    from opacus.accountants import PRVAccountant, RDPAccountant

    noise_multiplier = _check_number("noise_multiplier", noise_multiplier)
    sample_rate = _check_number("sample_rate", sample_rate, 0.0, 1.0, fix="It is batch size / dataset size.")
    delta = _check_number("delta", delta, 0.0, 1.0, fix="Use a delta well below 1 / dataset size, e.g. 1e-5.")
    steps = check_nonnegative_int("steps", steps)
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant={accountant!r} is not known; choose 'rdp' or 'prv'.")
    if steps == 0 or sample_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # tiny noise: the bound is loose, and epsilon is huge anyway
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        return float(acc.get_epsilon(delta=delta))


def relative_change(defended: Sequence[torch.Tensor], original: Sequence[torch.Tensor]) -> float:
    """``||defended - original|| / ||original||`` over all tensors together: how large a defence's
    change (noise, pruned entries, rounding) is next to the gradient itself.
    Defined in :doc:`/book/05_defences`."""
    d, o = _gradients(defended, "defended"), _gradients(original, "original")
    if len(d) != len(o) or any(a.shape != b.shape for a, b in zip(d, o)):
        raise ValueError("defended and original must have the same number of tensors, with the same shapes.")
    diff = math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(d, o)))
    norm = math.sqrt(sum(float((b.double() ** 2).sum()) for b in o))
    return diff / norm if norm > 0 else math.inf


class PruningAwareModel(nn.Module):
    """An adaptive attacker's view of a pruned gradient: ``model`` reparametrised as
    ``w = w0 + mask * delta`` with ``delta`` zero, so that its gradient with respect to ``delta``
    is ``mask * dL/dw``. The mask (the entries that survived pruning, visible as the non-zero
    entries of ``shared``) is applied to the dummy gradient too, and a gradient-matching attack on
    this model compares only the entries the client actually sent. Pass it to
    :func:`dlgkit.attacks.image.reconstruct` in place of ``model``.
    Defined in :doc:`/book/05_defences`.
    """

    def __init__(self, model: nn.Module, shared: Sequence[torch.Tensor]) -> None:
        super().__init__()
        shared = check_gradients(model, list(shared), name="shared")
        object.__setattr__(self, "inner", model)  # not a submodule: its weights are not attacked
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.base = {name: p.detach() for name, p in model.named_parameters()}
        self.masks = [(s != 0).to(s.dtype) for s in shared]
        self.deltas = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in model.parameters() if p.requires_grad])
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        params = dict(self.base)
        params.update({n: self.base[n] + m * d for n, m, d in zip(self.names, self.masks, self.deltas)})
        return functional_call(self.inner, params, (x,))


#: The registry of defences: kind -> class (one small class per kind, each registered by
#: subclassing :class:`Defence` with ``kind=`` and ``description=``).
DEFENCES: dict[str, type[Defence]] = {}


@dataclass(frozen=True, repr=False)
class Defence:
    """A defence a client applies to what it shares. ``kind`` is one of :data:`DEFENCE_KINDS`;
    ``strength`` is the noise variance, the pruning ratio, the number of local steps or the
    DP-SGD noise multiplier (ignored for ``none``, ``fp16`` and ``int8``).

    ``Defence(kind, strength)`` builds the registered class of that kind (:data:`DEFENCES`,
    e.g. ``Defence("prune", 0.7)`` is a :class:`Prune`). Defences are frozen and hashable:
    equal settings give equal objects, so results can be keyed by the defence itself
    (``rows_by_defence[Defence("prune", 0.7)]``); ``str(defence)`` is its :attr:`label`.
    Call one on a gradient list to transform it (transform kinds only), or use :meth:`share`
    to get what the client sends for a batch. Defined in :doc:`/book/05_defences`.
    """

    kind: str = "none"
    strength: float = 0.0
    max_grad_norm: float = 1.0

    #: True for the defences that transform a finished gradient (all but local steps and DP-SGD).
    is_transform: ClassVar[bool] = True
    #: The gradient distance an attacker uses against this defence (None: the attack's own).
    attack_distance: ClassVar[str | None] = None
    #: What ``strength`` means, for :data:`DEFENCE_KINDS`.
    description: ClassVar[str] = ""

    #: The kind a registered class stands for.
    registered: ClassVar[str | None] = None

    def __init_subclass__(cls, kind: str | None = None, description: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.registered, cls.description = kind, description
            DEFENCES[kind] = cls

    def __new__(cls, kind: str = "none", *args: object, **kwargs: object) -> Defence:
        if cls is Defence:
            if not isinstance(kind, str) or kind not in DEFENCES:
                raise ValueError(f"kind={kind!r} is not known; choose one of {list(DEFENCES)}.")
            cls = DEFENCES[kind]
        return object.__new__(cls)

    def __post_init__(self) -> None:
        own = type(self).registered
        if own is None:
            raise TypeError(f"{type(self).__name__} is not a registered defence; use Defence(kind, strength) with kind one of {list(DEFENCES)}.")
        if self.kind == "none" and own != "none":
            object.__setattr__(self, "kind", own)  # e.g. Prune(strength=0.7)
        if self.kind != own:
            raise ValueError(f"kind={self.kind!r} is not known for {type(self).__name__} (a {own!r} defence); choose one of {list(DEFENCES)}.")
        for name in ("strength", "max_grad_norm"):  # NumPy and torch scalars are stored as plain floats
            value = getattr(self, name)
            if (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                object.__setattr__(self, name, float(value))
        self.check()

    def check(self) -> None:
        """Validate ``strength`` (and ``max_grad_norm``) for this kind; nothing to check by default."""

    @property
    def label(self) -> str:
        """A short name for tables and plots, e.g. ``gaussian 1e-03``."""
        return self.kind

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"Defence({self.kind!r}, {self.strength!r}" + (f", max_grad_norm={self.max_grad_norm!r})" if self.max_grad_norm != 1.0 else ")")

    def transform(self, gradients: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
        """The transformed gradient list (transform kinds)."""
        return [g.clone() for g in gradients]

    def __call__(self, gradients: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Transform a gradient list (not for ``local_steps`` and ``dp_sgd``, which need the data:
        use :meth:`share`)."""
        if not self.is_transform:
            raise TypeError(f"a {self.kind!r} defence changes how the gradient is computed; call .share(model, x, y) instead.")
        return self.transform(_gradients(gradients), generator)

    def share(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
              local_lr: float = 0.1, expected_batch_size: int | None = None) -> list[torch.Tensor]:
        """What the defended client sends for the batch ``(x, y)``, as a gradient-shaped list.

        ``local_lr`` is the client's learning rate (``local_steps`` only); ``expected_batch_size``
        goes to :func:`dp_sgd_gradient` (``dp_sgd`` only)."""
        return self(client_gradient(model, x, y), generator=generator)

    def server_scale(self, lr: float, local_lr: float) -> float:
        """The server steps ``w -= server_scale * shared``: ``lr`` for a gradient."""
        return lr


class NoDefence(Defence, kind="none", description="no defence (strength ignored)"):
    """Shares the gradient as it is."""


class _Noise(Defence):
    """Independent noise of variance ``strength`` on every entry (:func:`add_noise`)."""

    def check(self) -> None:
        _check_number("strength (the noise variance)", self.strength, fix="Use e.g. 1e-3.")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.strength:.0e}"

    def transform(self, gradients: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
        return add_noise(gradients, self.strength, self.kind, generator=generator)


class GaussianNoise(_Noise, kind="gaussian", description="Gaussian noise of variance `strength` on every gradient entry"):
    """Gaussian noise (the DLG paper's defence)."""


class LaplacianNoise(_Noise, kind="laplacian", description="Laplacian noise of variance `strength` on every gradient entry"):
    """Laplacian noise of the same variance."""


class Prune(Defence, kind="prune", description="zero the fraction `strength` of smallest-magnitude entries of each tensor"):
    """Gradient pruning (:func:`prune`), per tensor."""

    scope: ClassVar[str] = "layer"

    def check(self) -> None:
        _check_number("strength (the pruning ratio)", self.strength, 0.0, 1.0, fix="It is the fraction of entries set to zero.")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.strength:.0%}"

    def transform(self, gradients: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
        return prune(gradients, self.strength, scope=self.scope)


class PruneGlobal(Prune, kind="prune_global", description="zero the fraction `strength` of smallest-magnitude entries over all tensors"):
    """Gradient pruning ranked over all tensors together."""

    scope: ClassVar[str] = "global"


class _Quantise(Defence):
    """A round trip through a low-precision format (:func:`quantise`), named by the kind. The
    strength is ignored and stored as 0, so ``Defence("fp16", 0.3) == Defence("fp16")``."""

    def check(self) -> None:
        object.__setattr__(self, "strength", 0.0)

    def transform(self, gradients: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
        return quantise(gradients, self.kind)


class FP16(_Quantise, kind="fp16", description="round trip through half precision (strength ignored)"):
    """Half precision: a rounding far below the gradient's size."""


class Int8(_Quantise, kind="int8", description="round trip through 8-bit integers with one scale per tensor (strength ignored)"):
    """8-bit integers, one scale per tensor."""


class LocalSteps(Defence, kind="local_steps", description="share the FedAvg update after `strength` local SGD steps on the batch"):
    """FedAvg: the client trains ``strength`` steps before it shares."""

    is_transform: ClassVar[bool] = False

    def check(self) -> None:
        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real) or not float(self.strength).is_integer() or self.strength < 1:
            raise ValueError(f"strength (the number of local steps) must be a positive whole number, got {self.strength!r}.")

    @property
    def label(self) -> str:
        return f"{int(self.strength)} local steps"

    def share(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
              local_lr: float = 0.1, expected_batch_size: int | None = None) -> list[torch.Tensor]:
        """The client runs ``strength`` SGD steps (rate ``local_lr``) on the batch and sends its
        weight change; the list returned is the gradient the server can infer from it,
        ``-update / (local_lr * steps)`` (the server knows both)."""
        local_lr = _check_number("local_lr", local_lr, fix="It is the client's learning rate, e.g. 0.1.")
        if local_lr == 0:
            raise ValueError("local_lr must be > 0: a client with learning rate 0 sends no update.")
        steps = int(self.strength)
        update = client_update(model, x, y, lr=local_lr, local_steps=steps)
        return [-u / (local_lr * steps) for u in update.tensors]

    def server_scale(self, lr: float, local_lr: float) -> float:
        """The server adds ``lr`` times the client's update: ``w -= lr * local_lr * steps * shared``."""
        return lr * local_lr * self.strength


class DPSGD(Defence, kind="dp_sgd", description="DP-SGD: per-example clipping to `max_grad_norm`, Gaussian noise with multiplier `strength`"):
    """DP-SGD through Opacus (:func:`dp_sgd_gradient`)."""

    is_transform: ClassVar[bool] = False
    attack_distance: ClassVar[str | None] = "cosine"  # clipping rescales the gradient: L2 would fail on scale alone

    def check(self) -> None:
        _check_number("strength (the noise multiplier)", self.strength, fix="Use e.g. 1.0.")
        _check_number("max_grad_norm", self.max_grad_norm)
        if self.max_grad_norm == 0:
            raise ValueError("max_grad_norm must be > 0.")

    @property
    def label(self) -> str:
        return f"dp_sgd sigma={self.strength:g}"

    def share(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
              local_lr: float = 0.1, expected_batch_size: int | None = None) -> list[torch.Tensor]:
        """See :func:`dp_sgd_gradient`."""
        return dp_sgd_gradient(model, x, y, self.strength, self.max_grad_norm, expected_batch_size=expected_batch_size, generator=generator)


#: What :class:`Defence` accepts as ``kind``, and what ``strength`` means for each.
DEFENCE_KINDS = {kind: cls.description for kind, cls in DEFENCES.items()}

#: The attack :func:`attack_defended` runs by default: one L-BFGS trial of the recommended
#: attack (labels known to the attacker).
DEFENDED_ATTACK = AttackConfig()


def attack_defended(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, defence: Defence, attack: AttackConfig = DEFENDED_ATTACK, *,
    seed: int = 0, adaptive: bool = False, local_lr: float = 1.0,
) -> dict:
    """Share ``(x, y)`` through ``defence`` on ``model``, attack what was shared with
    :func:`dlgkit.attacks.image.reconstruct` and the settings ``attack`` (labels known to the
    attacker; default one L-BFGS trial of the recommended attack), and report: ``psnr``,
    ``ssim``, ``relative_change`` (the size of the defence's change next to the signal: the
    gradient, or for DP-SGD the clipped gradient), ``iterations``, ``wall_time``, ``status``
    and the ``reconstruction``.

    Where the defence names an attack distance it is used instead of ``attack.distance``: DP-SGD
    clips, which rescales the gradient, so its attacker uses the cosine distance (an L2 attacker
    would fail on the scale alone). ``adaptive=True`` attacks a pruned gradient through
    :class:`PruningAwareModel` (only the shared entries are matched). ``local_lr`` is the
    client's learning rate for ``local_steps`` (the default matches :func:`train_with_defence`,
    so attack and training see the same defence). The caller's model keeps its ``.grad`` and
    mode. A shared gradient that is all zero (e.g. ``Defence("prune", 1.0)``) has nothing to
    attack: ``psnr`` and ``ssim`` are NaN, ``status`` is ``"nothing to attack"`` and the
    reconstruction is blank (in :func:`privacy_accuracy_sweep` such a row neither leaks nor
    counts as stopped). Defined in :doc:`/book/05_defences`.
    """
    from dlgkit.attacks.image import reconstruct

    if not isinstance(defence, Defence):
        raise TypeError(f"defence must be a dlgkit.defences.Defence, got {type(defence).__name__}.")
    if not isinstance(attack, AttackConfig):
        raise TypeError(f"attack must be a dlgkit.attacks.AttackConfig (e.g. attacks.AttackConfig(iterations=60)), got {type(attack).__name__}.")
    if adaptive and not isinstance(defence, Prune):
        raise ValueError(f"adaptive=True is the pruning-aware attack; it needs a pruning defence, got {defence.kind!r}.")
    seed = check_seed("seed", seed)
    shared, clean, attack = _defended_share(model, x, y, defence, attack, seed, local_lr)
    if not any(bool(t.any()) for t in shared):  # e.g. prune 1.0: nothing to attack, no score
        return _nothing_to_attack(x, shared, clean)
    target_model = PruningAwareModel(model, shared) if adaptive else model
    result = reconstruct(target_model, shared, tuple(x.shape), attack, labels=y, seed=seed, history_every=None, progress=False)
    return _scored(result, x, y, shared, clean)


def _defended_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor, defence: "Defence", attack: AttackConfig, seed: int,
                    local_lr: float) -> tuple[list[torch.Tensor], list[torch.Tensor], AttackConfig]:
    """What the client shares through ``defence`` (seeded by ``seed``), the undefended signal it
    is compared with, and the attack settings for it (the defence's distance, if it names one)."""
    generator = torch.Generator().manual_seed(seed)
    with grads_restored(model):
        if isinstance(defence, DPSGD):
            clean = Defence("dp_sgd", 0.0, defence.max_grad_norm).share(model, x, y, generator=torch.Generator().manual_seed(seed))
        else:
            clean = client_gradient(model, x, y)
        shared = defence.share(model, x, y, generator=generator, local_lr=local_lr)
    if defence.attack_distance is not None:
        attack = attack.with_(distance=defence.attack_distance)
    return shared, clean, attack


def _nothing_to_attack(x: torch.Tensor, shared: list[torch.Tensor], clean: list[torch.Tensor]) -> dict:
    return {"psnr": math.nan, "ssim": math.nan, "relative_change": relative_change(shared, clean), "iterations": 0,
            "wall_time": 0.0, "status": "nothing to attack", "reconstruction": torch.zeros_like(x).cpu()}


def _scored(result, x: torch.Tensor, y: torch.Tensor, shared: list[torch.Tensor], clean: list[torch.Tensor]) -> dict:
    report = result.report(x, y)
    return {
        "psnr": report.psnr,
        "ssim": report.ssim,
        "relative_change": relative_change(shared, clean),
        "iterations": result.iterations,
        "wall_time": result.wall_time,
        "status": result.status,
        "reconstruction": result.reconstruction.detach().clamp(0, 1).cpu(),
    }


def _attack_all(models: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, defences: list["Defence"], attack: AttackConfig,
                local_lr: float) -> tuple[list[list[dict]], list[float]]:
    """:func:`attack_defended` on every image through every defence (image ``i`` through
    ``models[i]``, seed ``i``), the attacks that share their settings solved as one problem by
    :func:`dlgkit.attacks.vectorised.reconstruct_many`. Returns the runs of each defence and
    its share of the wall time (the time of each batched call split evenly over its problems)."""
    import time

    from dlgkit.attacks.vectorised import reconstruct_many

    runs: list[list[dict | None]] = [[None] * len(models) for _ in defences]
    times = [0.0] * len(defences)
    groups: dict[AttackConfig, list[tuple[int, int, list[torch.Tensor], list[torch.Tensor]]]] = {}
    for k, defence in enumerate(defences):
        start = time.perf_counter()
        for i, model in enumerate(models):
            shared, clean, config = _defended_share(model, images[i : i + 1], labels[i : i + 1], defence, attack, i, local_lr)
            if any(bool(t.any()) for t in shared):
                groups.setdefault(config, []).append((k, i, shared, clean))
            else:
                runs[k][i] = _nothing_to_attack(images[i : i + 1], shared, clean)
        times[k] += time.perf_counter() - start
    for config, members in groups.items():
        start = time.perf_counter()
        results = reconstruct_many([models[i] for _, i, _, _ in members], [shared for _, _, shared, _ in members], (1, *images.shape[1:]), config,
                                   labels=[labels[i : i + 1] for _, i, _, _ in members], seeds=[i for _, i, _, _ in members],
                                   history_every=None, progress=False)
        share = (time.perf_counter() - start) / len(members)
        for (k, i, shared, clean), result in zip(members, results):
            runs[k][i] = _scored(result, images[i : i + 1], labels[i : i + 1], shared, clean)
            times[k] += share
    return runs, times


@dataclass
class TrainResult:
    """What :func:`train_with_defence` measured: test ``accuracy`` after ``steps`` server steps,
    the privacy spent (``epsilon`` at ``delta``, DP-SGD only; None otherwise) and the loss curve."""

    accuracy: float
    steps: int
    epsilon: float | None = None
    delta: float | None = None
    losses: list[float] = field(default_factory=list)
    model: nn.Module | None = None


def _digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    from dlgkit.data import digits

    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def train_with_defence(
    defence: Defence, steps: int = 300, batch_size: int = 32, lr: float = 1.0, seed: int = 0, delta: float = 1e-5,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None, device: str | torch.device | None = None,
    local_lr: float = 1.0,
) -> TrainResult:
    """Train the paper's LeNet (1 channel, 10 classes, 8x8) on scikit-learn's digits with FedSGD
    for ``steps`` server steps: each step a client draws a batch, shares it through
    ``defence`` (:meth:`Defence.share`, the very gradient an attacker would see) and the server
    steps ``w -= lr * shared`` (for ``local_steps``, where the client trains with ``local_lr``,
    ``w += lr * update``). Returns the test accuracy on a held-out 20% of the digits (``data``
    may give ``(x_train, y_train, x_test, y_test)``). Torch's global random state is left alone.

    DP-SGD samples each batch by Poisson sampling at rate ``batch_size / n`` (as its privacy
    analysis assumes) and reports epsilon at ``delta`` from Opacus's RDP accountant. The model
    and data live on ``device`` (default :func:`dlgkit.budget.default_device`); the batches are
    drawn on the CPU, so the same seed picks the same batches everywhere.
    Defined in :doc:`/book/05_defences`.
    """
    from dlgkit.models import LeNet

    if not isinstance(defence, Defence):
        raise TypeError(f"defence must be a dlgkit.defences.Defence, got {type(defence).__name__}.")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    seed = check_seed("seed", seed)
    _check_number("lr", lr)
    _check_number("local_lr", local_lr)
    device = resolve_device(device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (data if data is not None else _digits_split()))
    n = len(x_train)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
    with torch.random.fork_rng(devices=[]):  # the caller's global random state stays as it was
        model = LeNet(channels=x_train.shape[1], num_classes=10, image_size=x_train.shape[-1], seed=seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    sample_rate = batch_size / n
    scale = defence.server_scale(lr, local_lr)
    losses = []
    for _ in range(steps):
        if isinstance(defence, DPSGD):
            idx = torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()
            if idx.numel() == 0:  # probability (1 - q)^n; Opacus would share pure noise here
                idx = torch.randint(n, (1,), generator=generator)
        else:
            idx = torch.randperm(n, generator=generator)[:batch_size]
        xb, yb = x_train[idx], y_train[idx]
        shared = defence.share(model, xb, yb, generator=generator, local_lr=local_lr, expected_batch_size=batch_size)
        with torch.no_grad():
            for p, g in zip(model.parameters(), shared):
                p.add_(g, alpha=-scale)
            losses.append(float(F.cross_entropy(model(xb), yb)))
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
    epsilon = dp_epsilon(defence.strength, sample_rate, steps, delta) if isinstance(defence, DPSGD) else None
    return TrainResult(accuracy=accuracy, steps=steps, epsilon=epsilon, delta=delta if epsilon is not None else None, losses=losses, model=model)


def privacy_accuracy_sweep(
    defences: Sequence[Defence], images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig = DEFENDED_ATTACK.with_(iterations=60),
    train_steps: int = 300, adaptive: bool = True, num_classes: int = 100, progress: bool | None = None,
    device: str | torch.device | None = None, local_lr: float = 1.0, vectorised: bool = True,
) -> list[dict]:
    """Both sides of the trade-off for every defence: the attack on each image of ``images``
    (one at a time, each through its own fresh paper LeNet with ``num_classes`` classes, seeded
    by the image's index; :func:`attack_defended` with the settings ``attack``, by default at
    most 60 L-BFGS steps) and the test accuracy of :func:`train_with_defence` after
    ``train_steps`` steps (``local_lr``: the clients' learning rate, in both).

    Returns one dict per defence: ``defence`` (the :class:`Defence` itself, so rows can be
    keyed by it), ``label``, ``kind``, ``strength``, mean ``psnr`` and ``ssim``,
    ``relative_change``, ``accuracy``, ``epsilon`` (DP-SGD), ``leaks`` (mean PSNR >=
    :data:`~dlgkit.checks.SUCCESS_PSNR`), ``stopped`` (every attack, the pruning-aware one too,
    below :data:`~dlgkit.checks.STOPPED_PSNR`), the ``reconstructions`` (N, C, H, W, on the
    CPU), wall times, and for pruning with ``adaptive=True`` also ``adaptive_psnr``. Models and
    data go to ``device`` (default :func:`dlgkit.budget.default_device`).

    With ``vectorised=True`` (the default) the attacks of every defence on every image that
    share their settings run as one problem (:func:`dlgkit.attacks.vectorised.reconstruct_many`;
    DP-SGD's cosine attacks form a second one, and the pruning-aware attacks stay one at a
    time); a row's ``attack_time`` is then its share of the batched time. ``False`` runs
    :func:`attack_defended` image by image. Same settings, same seeds and the same L-BFGS
    steps (:class:`~dlgkit.attacks.vectorised.BatchedLBFGS`), but the batched float32 rounding
    differs and a long attack amplifies it, so single runs differ within the spread of the
    attack (compared in ``benchmarks/defences.py --compare``).
    Defined in :doc:`/book/05_defences`.
    """
    import time

    from tqdm.auto import tqdm

    from dlgkit.budget import progress_enabled
    from dlgkit.models import LeNet

    if isinstance(defences, Defence) or not isinstance(defences, Iterable):
        raise TypeError(f"defences must be a list of Defence objects, got {type(defences).__name__}; wrap a single one in a list: [defence].")
    defences = list(defences)  # a generator would be used up by the check below
    if not all(isinstance(d, Defence) for d in defences) or not defences:
        raise TypeError("defences must be a non-empty list of dlgkit.defences.Defence objects, e.g. [Defence('none'), Defence('prune', 0.7)].")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}; use torch.tensor({labels!r}).")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor with one class index per image, got shape {tuple(labels.shape)}; e.g. torch.tensor([3]) for one image.")
    labels = check_class_indices("labels", labels)  # int64: int32 or whole-number floats read as their values (the range is checked against the model)
    if not isinstance(attack, AttackConfig):
        raise TypeError(f"attack must be a dlgkit.attacks.AttackConfig (e.g. defences.DEFENDED_ATTACK.with_(iterations=60)), got {type(attack).__name__}.")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be True (also run the pruning-aware attack on pruned gradients) or False, got {adaptive!r}.")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0 or len(images) != len(labels):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch with one label each, got {got} and {len(labels)} labels.")
    check_unit_range("images", images)
    check_positive_int("train_steps", train_steps, hint="It is the number of training steps behind the accuracy column.")
    if not isinstance(vectorised, bool):
        raise TypeError(f"vectorised must be True (the images' attacks as one problem) or False (one at a time), got {vectorised!r}.")
    device = resolve_device(device)
    images, labels = images.to(device), labels.to(device)
    rows = []
    nets = [LeNet(channels=images.shape[1], num_classes=num_classes, image_size=images.shape[-1], seed=i).to(device) for i in range(len(images))]
    if vectorised:
        batched_runs, batched_times = _attack_all(nets, images, labels, defences, attack, local_lr)
    for k, defence in enumerate(tqdm(defences, desc="defences", disable=not progress_enabled(progress), leave=False)):
        start = time.perf_counter()
        cases = [(model, images[i : i + 1], labels[i : i + 1], i) for i, model in enumerate(nets)]
        runs = batched_runs[k] if vectorised else [attack_defended(m, x, y, defence, attack, seed=i, local_lr=local_lr) for m, x, y, i in cases]
        adaptive_runs = []
        if adaptive and isinstance(defence, Prune):  # the pruning-aware attack, one image at a time
            adaptive_runs = [attack_defended(m, x, y, defence, attack, seed=i, adaptive=True, local_lr=local_lr) for m, x, y, i in cases]
        attack_time = time.perf_counter() - start + (batched_times[k] if vectorised else 0.0)
        start = time.perf_counter()
        trained = train_with_defence(defence, steps=train_steps, device=device, local_lr=local_lr)
        psnr = sum(r["psnr"] for r in runs) / len(runs)
        row = {
            "defence": defence,
            "label": defence.label,
            "kind": defence.kind,
            "strength": defence.strength,
            "psnr": psnr,
            "leaks": psnr >= SUCCESS_PSNR,
            "stopped": all(r["psnr"] < STOPPED_PSNR for r in runs + adaptive_runs),
            "ssim": sum(r["ssim"] for r in runs) / len(runs),
            "relative_change": sum(r["relative_change"] for r in runs) / len(runs),
            "accuracy": trained.accuracy,
            "epsilon": trained.epsilon,
            "reconstructions": torch.cat([r["reconstruction"] for r in runs]),
            "attack_time": attack_time,
            "train_time": time.perf_counter() - start,
        }
        if adaptive_runs:
            row["adaptive_psnr"] = sum(r["psnr"] for r in adaptive_runs) / len(adaptive_runs)
            row["adaptive_reconstructions"] = torch.cat([r["reconstruction"] for r in adaptive_runs])
        rows.append(row)
    return rows
