"""The gradient-matching engine every optimisation attack of dlgkit runs on.

An attack is a *problem* (what is optimised, what the server saw, which priors apply) handed
to one loop. The loop has the shape of breaching's (Geiping et al., 2020):
:func:`run` tries up to ``restarts`` trials (``_run_trial``), each minimising
``_compute_objective`` (a distance between the dummy's observation and the target, plus
weighted priors) with one optimiser, stopped by one rule, and keeps the trial with the best
score (``_score_trial``). Distances, optimisers and restart policies are looked up in small
dicts, so a new one is one entry. :func:`dlgkit.attacks.image.reconstruct` (images) and
:func:`dlgkit.attacks.text.reconstruct_text` (text) build their problem and call :func:`run`; a
new observation (e.g. a FedAvg weight update through simulated local steps) is one ``observe``
function and leaves the loop alone.

The settings travel as one frozen :class:`AttackConfig` (images) or :class:`TextAttackConfig`
(text), changed with ``.with_(...)``.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dlgkit.budget import progress_enabled
from dlgkit.checks import check_choice, check_finite_tensors, check_number, check_positive_int, check_seed
from dlgkit.federated import soft_cross_entropy

__all__ = ["EngineConfig", "AttackConfig", "TextAttackConfig", "PAPER_DLG", "RECOMMENDED", "RECOMMENDED_BATCH", "Problem", "Trial", "EngineRun", "run", "gradient_distance", "gradient_observation", "DISTANCES", "OPTIMIZERS", "RESTART_POLICIES", "absolute_tol", "check_target", "grads_restored", "caller_model_untouched"]


# --- strategies ---------------------------------------------------------------------------------


def _check_pair(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> None:
    if len(dummy) != len(target):
        raise ValueError(f"the two gradient lists have {len(dummy)} and {len(target)} tensors; they must have one tensor per parameter each, in the same order.")
    for i, (d, t) in enumerate(zip(dummy, target)):
        if d.shape != t.shape:
            raise ValueError(f"gradient {i} has shape {tuple(d.shape)} in one list and {tuple(t.shape)} in the other; the shapes must be equal (no broadcasting).")


def _l2(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(((d - t) ** 2).sum() for d, t in zip(dummy, target))


def _cosine(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    dot = sum((d * t).sum() for d, t in zip(dummy, target))
    norm_d = torch.sqrt(sum((d * d).sum() for d in dummy))
    norm_t = torch.sqrt(sum((t * t).sum() for t in target))
    return 1 - dot / (norm_d * norm_t + 1e-12)


#: Distances between two gradient lists (see :func:`gradient_distance`).
DISTANCES: dict[str, Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]] = {"l2": _l2, "cosine": _cosine}


def gradient_distance(dummy: Sequence[torch.Tensor], target: Sequence[torch.Tensor], distance: str = "l2") -> torch.Tensor:
    """Distance between two gradient lists: ``"l2"`` is the paper's sum of squared differences,
    ``"cosine"`` is ``1 - cos`` between the two gradients seen as one long vector
    (Geiping et al., 2020). The lists must have the same length and equal shapes, tensor by
    tensor (no broadcasting). Defined in :doc:`/book/02_single_image_dlg`."""
    check_choice("distance", distance, list(DISTANCES))
    for name, items in (("dummy", dummy), ("target", target)):
        if isinstance(items, torch.Tensor) or not isinstance(items, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in items):
            raise TypeError(f"{name} must be a list of tensors (one per model parameter), got {type(items).__name__}.")
    _check_pair(dummy, target)
    if not dummy:
        raise ValueError("the gradient lists are empty; pass one tensor per model parameter.")
    return DISTANCES[distance](dummy, target)


def _lbfgs(variables: list[torch.Tensor], lr: float, config: EngineConfig) -> torch.optim.Optimizer:
    return torch.optim.LBFGS(variables, lr=lr, max_iter=20, history_size=100, line_search_fn="strong_wolfe" if config.line_search else None)


def _adam(variables: list[torch.Tensor], lr: float, config: EngineConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(variables, lr=lr)


#: Optimisers by name: a function ``(variables, lr, config) -> torch.optim.Optimizer``.
OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], float, "EngineConfig"], torch.optim.Optimizer]] = {"lbfgs": _lbfgs, "adam": _adam}


def _failed(trial: Trial, tol: float | None) -> bool:
    """A trial worth a restart: it diverged, or stalled more than 1000 times above ``tol``."""
    return trial.status == "diverged" or (trial.status == "stalled" and (tol is None or trial.final > 1e3 * tol))


#: When to try another start: ``"failed"`` only after a failed trial, ``"always"`` every time.
RESTART_POLICIES: dict[str, Callable[[Trial, float | None], bool]] = {"failed": _failed, "always": lambda trial, tol: True}


# --- configuration ------------------------------------------------------------------------------


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The settings of the engine that every attack shares (see :class:`AttackConfig` for the
    images' fields and :class:`TextAttackConfig` for the text's). Frozen: change a copy with
    :meth:`with_`. Every field is checked when the config is made.

    - ``distance``: ``"l2"`` (the paper's sum of squared differences) or ``"cosine"``
      (``1 - cos``, blind to the gradient's scale).
    - ``optimizer``: ``"lbfgs"`` (the paper's; one step runs up to 20 evaluations) or ``"adam"``.
    - ``lr``: the step size; None picks the attack's default (:meth:`step_size`).
    - ``iterations``: optimiser steps per trial.
    - ``restarts``: at most this many trials from independent random starts; the one with the
      lowest final distance wins.
    - ``restart_policy``: ``"failed"`` tries a new start only after a trial diverged (NaN) or
      stalled (L-BFGS without progress for ``patience`` steps) more than 1000 times above
      ``tol``; ``"always"`` runs every restart.
    - ``tol``: a trial stops once the distance is below it (None: never). With
      ``tol_relative=True`` and the L2 distance it is relative: ``tol`` times the target's
      squared norm divided by B² (free of the model's gradient scale, and as strict per example
      for a batch of B, whose examples each enter the mean gradient with weight 1/B).
    - ``patience``: an L-BFGS trial that has not improved for this many steps has stalled
      (None: never). Adam's noisy curve is never cut short.
    - ``line_search``: give L-BFGS a strong-Wolfe line search (the paper used none).
    - ``float64``: compute the distance in float64 (the observation and the target are cast
      before the sums). Float32 sums stall the cosine distance on small FedAvg updates
      (chapter 6); the model itself keeps its dtype.
    """

    distance: str = "l2"
    optimizer: str = "lbfgs"
    lr: float | None = None
    iterations: int = 300
    restarts: int = 1
    tol: float | None = 1e-8
    tol_relative: bool = True
    patience: int | None = 10
    restart_policy: str = "failed"
    line_search: bool = True
    float64: bool = False

    def __post_init__(self) -> None:
        check_choice("distance", self.distance, list(DISTANCES))
        check_choice("optimizer", self.optimizer, list(OPTIMIZERS))
        check_number("lr", self.lr, low=0.0, low_open=True, allow_none=True, hint="It is the optimiser's step size, e.g. 1.0 for L-BFGS or 0.1 for Adam; None picks the default.")
        check_positive_int("iterations", self.iterations)
        check_positive_int("restarts", self.restarts)
        check_number("tol", self.tol, low=0.0, allow_none=True, hint="It is the distance below which a trial stops; None never stops early.")
        check_positive_int("patience", self.patience, allow_none=True)
        check_choice("restart_policy", self.restart_policy, list(RESTART_POLICIES))
        _check_flag("tol_relative", self.tol_relative)
        _check_flag("line_search", self.line_search)
        _check_flag("float64", self.float64)

    def with_(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes`` applied (and checked), e.g. ``RECOMMENDED.with_(iterations=100)``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; the fields are {[f.name for f in dataclasses.fields(self)]}.")
        return dataclasses.replace(self, **changes)

    def step_size(self) -> float:
        """``lr``, or the default step: 1 for L-BFGS, 0.1 for Adam."""
        if self.lr is not None:
            return float(self.lr)
        return 1.0 if self.optimizer == "lbfgs" else 0.1


LABEL_MODES = ("idlg", "joint")
INITS = ("uniform", "gaussian")


@dataclass(frozen=True, kw_only=True)
class AttackConfig(EngineConfig):
    """An image attack's settings (:func:`dlgkit.attacks.image.reconstruct`): the engine's
    (``EngineConfig``: ``distance``, ``optimizer``, ``lr``, ``iterations``, ``restarts``,
    ``restart_policy``, ``tol``, ``tol_relative``, ``patience``, ``line_search``, ``float64``) and:

    - ``labels``: ``"idlg"`` reads the label off the last layer's gradient first (iDLG for one
      example; for a batch the ``"probe"`` rule of :func:`dlgkit.attacks.labels.batch_labels`);
      ``"joint"`` optimises a soft label with the image (DLG). Known labels are an argument of
      ``reconstruct``, not a setting.
    - ``tv``: the weight of a total-variation prior (0: none).
    - ``init``: the dummy starts as ``"uniform"`` noise in [0, 1] or ``"gaussian"`` noise (the paper).
    - ``clamp``: project the dummy onto [0, 1] after every step.

    The defaults are one trial of the course's recommended attack (:data:`~dlgkit.attacks.engine.RECOMMENDED` allows
    four). Defined in :doc:`/book/02_single_image_dlg`.
    """

    labels: str = "idlg"
    tv: float = 0.0
    init: str = "uniform"
    clamp: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("labels", self.labels, LABEL_MODES)
        check_number("tv", self.tv, low=0.0, hint="It is the weight of the total-variation prior, e.g. 3e-4; 0 turns it off.")
        check_choice("init", self.init, INITS)
        _check_flag("clamp", self.clamp)


PARAMETRIZATIONS = ("embedding", "bag")
DECODERS = ("cosine", "euclidean", "bag")


@dataclass(frozen=True, kw_only=True)
class TextAttackConfig(EngineConfig):
    """A text attack's settings (:func:`dlgkit.attacks.text.reconstruct_text`): the engine's
    (``EngineConfig``; here Adam, no early stop and no stall rule by default) and:

    - ``parametrization``: ``"embedding"`` optimises a free vector per position (the paper's
      setting); ``"bag"`` a softmax over the bag of words' embeddings per position.
    - ``decode``: how free vectors become tokens: ``"cosine"`` or ``"euclidean"`` nearest
      vocabulary embedding, or ``"bag"``, the most similar token of the bag of words.
    - ``fix_special``: pin [CLS] and [SEP] at both ends.
    - ``span_weight``: the weight of the span prior (the distance of each dummy input of the
      first layer from the span of that layer's shared gradient, after DAGER; 0: none).
    - ``lr`` None means 0.01 for ``"embedding"`` and 0.1 for ``"bag"``.

    Defined in :doc:`/book/04_text_dlg`.
    """

    optimizer: str = "adam"
    tol: float | None = None
    patience: int | None = None
    parametrization: str = "embedding"
    decode: str = "bag"
    fix_special: bool = True
    span_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        check_choice("decode", self.decode, DECODERS)
        _check_flag("fix_special", self.fix_special)
        check_number("span_weight", self.span_weight, low=0.0, hint="It is the weight of the span prior, e.g. 1000; 0 turns it off.")

    def step_size(self) -> float:
        """``lr``, or 0.01 for free embeddings and 0.1 for the bag parametrisation."""
        if self.lr is not None:
            return float(self.lr)
        return 0.01 if self.parametrization == "embedding" else 0.1


#: DLG exactly as in the paper's code: a random soft label optimised jointly with the image,
#: Gaussian noise as the start, L-BFGS with step 1 and no line search, 300 steps. The early
#: stop once the gradient distance is below 1e-6 is dlgkit's, not the paper's (its code always
#: runs every step); it only saves time once the image is back.
PAPER_DLG = AttackConfig(labels="joint", init="gaussian", optimizer="lbfgs", lr=1.0, line_search=False, iterations=300, restarts=1, tol=1e-6, tol_relative=False, patience=None)

#: The course's recommendation for one image: the label read off the gradient (iDLG), a start
#: drawn uniformly in [0, 1], L-BFGS with a strong-Wolfe line search (no divergence), a stop
#: once the distance is below 1e-8 of the shared gradient's squared norm (scale-free, unlike the
#: absolute 1e-6 of :data:`PAPER_DLG`), and up to four restarts when a run stalls. Measured in
#: ``benchmarks/image_attacks.py``.
RECOMMENDED = AttackConfig(labels="idlg", init="uniform", optimizer="lbfgs", lr=1.0, line_search=True, iterations=300, restarts=4, tol=1e-8, tol_relative=True, patience=10)

#: For batches: :data:`RECOMMENDED` plus a small total-variation prior (weight 3e-4, tuned on
#: batches of 8 LFW faces on the paper's LeNet). Without it, L-BFGS stalls on batches of 8 with
#: every image uniformly noisy (about 20 dB); the prior removes that noise (about 35-40 dB).
#: Measured in ``benchmarks/image_attacks.py``.
RECOMMENDED_BATCH = RECOMMENDED.with_(tv=3e-4)


# --- the problem and the loop -------------------------------------------------------------------


def gradient_observation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True) -> list[torch.Tensor]:
    """What a FedSGD server sees for input ``x`` with labels ``y`` (class indices (N,) or
    probability rows (N, C)): the gradient of the mean cross-entropy with respect to every
    trainable parameter of ``model``, differentiable with respect to ``x`` when
    ``create_graph``. The default ``observe`` of :func:`dlgkit.attacks.image.reconstruct`.
    Defined in :doc:`/book/02_single_image_dlg`."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(soft_cross_entropy(model(x), y), params, create_graph=create_graph))


@dataclass
class Problem:
    """One trial's optimisation problem, built by an attack for each random start.

    ``variables`` are the leaf tensors the optimiser moves; ``observe(create_graph)`` returns
    what the server would see for their current value (a list of tensors matching ``target``);
    ``priors`` maps a name to ``(weight, function)``, each added as ``weight * function()`` to
    the objective (weight 0: skipped); ``project`` runs after every step (e.g. a clamp);
    ``snapshot`` returns what the history records."""

    variables: list[torch.Tensor]
    observe: Callable[[bool], list[torch.Tensor]]
    target: list[torch.Tensor]
    priors: dict[str, tuple[float, Callable[[], torch.Tensor]]] = field(default_factory=dict)
    project: Callable[[], None] | None = None
    snapshot: Callable[[], Any] | None = None


@dataclass
class Trial:
    """How one trial ended: its ``problem`` (holding the final variables), the distance after
    every step (``losses``), the recorded ``history`` at ``history_iters``, its ``status``
    (``converged``, ``stalled``, ``diverged`` or ``budget``) and its ``final`` distance (inf
    when it diverged)."""

    problem: Problem
    losses: list[float]
    history: list[Any]
    history_iters: list[int]
    status: str
    final: float


@dataclass
class EngineRun:
    """All trials of one attack, the index of the best and the wall time in seconds."""

    trials: list[Trial]
    best: int
    wall_time: float

    @property
    def best_trial(self) -> Trial:
        return self.trials[self.best]


def _compute_objective(problem: Problem, distance: str, with_priors: bool, float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective and, separately, its distance term (what is reported and stopped on),
    the distance summed in float64 when ``float64``."""
    observed, target = list(problem.observe(with_priors)), problem.target
    if float64:
        observed, target = [t.double() for t in observed], [t.double() for t in target]
    data = gradient_distance(observed, target, distance)
    value = data
    if with_priors:
        for weight, prior in problem.priors.values():
            if weight > 0:
                value = value + weight * prior()
    return value, data


def _score_trial(trial: Trial) -> float:
    """Lower is better: the final distance (inf for a diverged trial)."""
    return trial.final


def _stalled(losses: list[float], patience: int | None) -> bool:
    return patience is not None and len(losses) > patience and losses[-1] >= losses[-1 - patience] * (1 - 1e-9)


def _run_trial(problem: Problem, config: EngineConfig, tol: float | None, history_every: int | None, progress: bool, desc: str) -> Trial:
    opt = OPTIMIZERS[config.optimizer](problem.variables, config.step_size(), config)
    seen: dict[str, float] = {}

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value, data = _compute_objective(problem, config.distance, True, config.float64)
        value.backward()
        seen["distance"] = float(data.detach())
        return value

    history: list[Any] = []
    history_iters: list[int] = []
    recording = problem.snapshot is not None and history_every is not None

    def record(i: int) -> None:
        history.append(problem.snapshot())
        history_iters.append(i)

    if recording:
        record(0)
    losses: list[float] = []
    status = "budget"
    bar = tqdm(range(1, config.iterations + 1), desc=desc, disable=not progress, leave=False)
    for i in bar:
        opt.step(closure)
        if problem.project is not None:
            problem.project()
        # L-BFGS moves a long way within one step, so measure where it landed (one extra
        # evaluation against up to 20 inside the step); Adam's value is the one its step saw,
        # one step behind. The reported distance (and the stopping rules) leave the priors out.
        if config.optimizer == "lbfgs":
            current = float(_compute_objective(problem, config.distance, False, config.float64)[1].detach())
        else:
            current = seen["distance"]
        if not math.isfinite(current):
            status = "diverged"
            losses.append(math.inf)
            break
        losses.append(current)
        if recording and i % history_every == 0:
            record(i)
        if progress and i % 10 == 0:
            bar.set_postfix(distance=f"{current:.2e}")
        if tol is not None and current < tol:
            status = "converged"
            break
        if config.optimizer == "lbfgs" and _stalled(losses, config.patience):
            status = "stalled"  # no progress in `patience` steps: a restart is cheaper
            break
    bar.close()
    if recording and history_iters[-1] != len(losses) and status != "diverged":
        record(len(losses))
    final = math.inf if status == "diverged" else losses[-1]
    return Trial(problem=problem, losses=losses, history=history, history_iters=history_iters, status=status, final=final)


def absolute_tol(config: EngineConfig, target: Sequence[torch.Tensor], batch: int) -> float | None:
    """The stopping threshold ``config.tol`` in the units of the distance (see :class:`EngineConfig`).
    Defined in :doc:`/book/02_single_image_dlg`."""
    if config.tol is not None and config.tol_relative and config.distance == "l2":
        return config.tol * float(sum((t.double() ** 2).sum() for t in target)) / batch**2
    return config.tol


def run(make_problem: Callable[[torch.Generator], Problem], config: EngineConfig, *, tol: float | None, seed: int = 0,
        history_every: int | None = 10, progress: bool | None = None, desc: str = "DLG") -> EngineRun:
    """Try up to ``config.restarts`` trials, each on ``make_problem(generator)`` (one CPU
    generator seeded with ``seed`` draws every start in turn), as ``config.restart_policy``
    allows, and return them all with the best. ``tol`` is the absolute stopping threshold
    (:func:`absolute_tol`). Defined in :doc:`/book/02_single_image_dlg`."""
    seed = check_seed("seed", seed)
    check_positive_int("history_every", history_every, allow_none=True)
    progress = progress_enabled(progress)
    start = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    trials: list[Trial] = []
    best = 0
    for restart in range(config.restarts):
        label = f"{desc} restart {restart + 1}/{config.restarts}" if config.restarts > 1 else desc
        trial = _run_trial(make_problem(generator), config, tol, history_every, progress, label)
        trials.append(trial)
        if _score_trial(trial) < _score_trial(trials[best]):
            best = restart
        if not RESTART_POLICIES[config.restart_policy](trial, tol):
            break  # converged, still improving at the end of its budget, or stalled close to tol
    return EngineRun(trials=trials, best=best, wall_time=time.perf_counter() - start)


def check_target(name: str, target: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A target observation: a non-empty list of finite tensors (detached).
    Defined in :doc:`/book/02_single_image_dlg`."""
    if isinstance(target, torch.Tensor) or not isinstance(target, (list, tuple)) or not target:
        raise TypeError(f"{name} must be a non-empty list of tensors (one per model parameter), got {type(target).__name__}.")
    for i, t in enumerate(target):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, expected a tensor.")
    check_finite_tensors(name, target)
    return [t.detach() for t in target]


_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


@contextlib.contextmanager
def grads_restored(model: nn.Module) -> Iterator[None]:
    """Leave every parameter's ``.grad`` of ``model`` as it was: cleared on entry (backward
    passes inside fill fresh tensors) and put back on exit.
    Defined in :doc:`/book/02_single_image_dlg`."""
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:
        p.grad = None
    try:
        yield
    finally:
        for p, g in grads.items():
            p.grad = g


@contextlib.contextmanager
def caller_model_untouched(model: nn.Module) -> Iterator[None]:
    """Run an attack on ``model`` in evaluation mode and leave it as it was: its training mode
    and every parameter's ``.grad`` are restored afterwards. A model in training mode with
    BatchNorm or Dropout gets a warning: the attack uses BatchNorm's running statistics and no
    Dropout (deterministic, and BatchNorm's statistics are not updated by the attack).
    Defined in :doc:`/book/02_single_image_dlg`."""
    modes = {m: m.training for m in model.modules()}
    if model.training and any(isinstance(m, _MODE_DEPENDENT) for m in model.modules()):
        warnings.warn(
            f"{type(model).__name__} is in training mode and has BatchNorm or Dropout layers; the attack runs it in eval mode "
            "(running statistics, no dropout) and restores the mode afterwards. Call model.eval() before sharing to match.",
            stacklevel=3,
        )
    model.eval()
    try:
        with grads_restored(model):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
