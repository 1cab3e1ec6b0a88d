"""Many image attacks at once: P independent gradient-matching problems solved as one.

The chapters and benchmarks attack many images one after another (20 faces, random starts,
sweep points, clients). Each attack is a few small tensor operations per step, so the time
goes to Python and to launching kernels, once per problem. :func:`reconstruct_many` stacks the
P dummies into one tensor and computes every problem's objective and its gradient in one call
(``torch.func.vmap`` over ``torch.func.grad_and_value``, with the inner gradient, the one the
server sees, taken by ``torch.func.grad`` on ``torch.func.functional_call``). Problems may use
one shared model or one model each (same architecture, different weights: the weights are
stacked). Every problem keeps its own optimiser state, stopping rule and restarts; a problem
that stops is frozen (its entries are left alone by masks) while the others go on, so a NaN in
one problem never reaches another.

Where the time goes on a CPU, and what the engine does about it (measured on 20 LeNet
problems, ``benchmarks/vectorised.py``):

- the last layer's weight gradient is the largest tensor of the problem (100 x 768 per problem
  for LeNet on 32x32 images); for a model with a linear head the distance to it is taken in
  factored form and the gradient is never formed (``_Stack``);
- for LeNet (convolutions and element-wise activations) the P problems skip ``vmap`` and
  autograd: each layer is one grouped convolution over all of them, channels-last, and both
  gradients (the inner one, which the server sees, and the objective's with respect to the
  dummies) are written out layer by layer (``_Stack``); about half the time per evaluation of
  ``vmap`` for batches of 4 faces;
- L-BFGS reads its history of 100 pairs twice per iteration; both products read it with unit stride
  (:class:`BatchedLBFGS`);
- a call where most problems are asked evaluates them all instead of copying the asked rows'
  weights and targets; a problem left alone at the end of a run is solved without ``vmap``
  (on the grouped path: as two copies of itself, through the same grouped kernels as a batch).

The results are the same :class:`~dlgkit.attacks.image.AttackResult` objects as
:func:`~dlgkit.attacks.image.reconstruct`'s, one per problem. With Adam the per-problem
arithmetic is the sequential one (Adam acts element by element); L-BFGS is
:class:`BatchedLBFGS`, which takes ``torch.optim.LBFGS``'s steps, its strong-Wolfe line search
included (the few differences are listed there). The float32 rounding of a batched evaluation
is not the sequential one's, and a long attack amplifies it: runs agree in quality (success,
PSNR within noise), not bit for bit.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vjp, vmap
from tqdm.auto import tqdm

from dlgkit.attacks import engine
from dlgkit.attacks.engine import DISTANCES, RECOMMENDED, RESTART_POLICIES, AttackConfig
from dlgkit.attacks.image import AttackResult, _checked_inputs, _resolve_labels, total_variation
from dlgkit.budget import progress_enabled
from dlgkit.checks import check_number, check_positive_int, check_seed
from dlgkit.federated import soft_cross_entropy

__all__ = ["reconstruct_many", "gradient_of_loss", "FunctionalObserve", "BatchedAdam", "BatchedLBFGS"]

# The optimisers call ``evaluate(mask, z) -> (gradient (P, D), objective (P,), distance (P,))``:
# the values at the rows of ``z`` where ``mask`` is True; the other rows of the results are NaN,
# or values that the optimisers ignore (where ``reconstruct_many`` evaluates a superset of the
# mask that the host knows, to spare the device a sync).

_RUNNING, _CONVERGED, _STALLED, _DIVERGED, _BUDGET = 0, 1, 2, 3, 4
_STATUS = {_CONVERGED: "converged", _STALLED: "stalled", _DIVERGED: "diverged", _BUDGET: "budget"}


def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` in the rows where ``mask`` (P,) is True, ``old`` elsewhere."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def _check_optimiser(z: object, lr: object) -> float:
    """The optimisers' common arguments: ``z`` a (P, D) floating tensor, ``lr`` positive."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point() or 0 in z.shape:
        what = f"a {z.dtype} tensor of shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a floating-point tensor of shape (P, D), one row of variables per problem, got {what}; "
                         "for one problem pass z.reshape(1, -1).")
    return check_number("lr", lr, low=0, low_open=True)


class BatchedAdam:
    """Adam (Kingma and Ba, 2015; PyTorch's defaults: betas 0.9 and 0.999, eps 1e-8) on a
    stack of P problems, each with its own moments and step count, so that a problem restarted
    later starts afresh. Adam acts element by element: for one problem it is
    ``torch.optim.Adam``'s update. One :meth:`round` is one step of every live problem.
    Defined in :doc:`/book/02_single_image_dlg`."""

    def __init__(self, z: torch.Tensor, lr: float) -> None:
        self.lr, self.betas, self.eps = _check_optimiser(z, lr), (0.9, 0.999), 1e-8
        self.m, self.v = torch.zeros_like(z), torch.zeros_like(z)
        self.steps = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)

    def reset(self, rows: torch.Tensor, z: torch.Tensor, evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Forget the state of the problems in ``rows`` (a bool mask): a fresh start."""
        self.m, self.v = _where(rows, torch.zeros_like(self.m), self.m), _where(rows, torch.zeros_like(self.v), self.v)
        self.steps = torch.where(rows, torch.zeros_like(self.steps), self.steps)

    def prepare(self, live: torch.Tensor) -> None:
        """Nothing to prepare: every step is one evaluation."""

    def round(self, z: torch.Tensor, evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of the problems where ``live``; returns the new ``z``, which problems ended
        a step (all live ones) and each problem's distance at the point its step started from
        (as the sequential engine reports Adam)."""
        g, _, dist = evaluate(live, z)
        b1, b2 = self.betas
        self.steps = self.steps + live.to(self.steps.dtype)
        m = self.m.lerp(g, 1 - b1)
        v = self.v * b2 + (1 - b2) * g * g
        shape = (-1, *([1] * (z.dim() - 1)))
        correction1 = (1 - b1**self.steps).clamp(min=1e-300).to(z.dtype).view(shape)
        correction2 = (1 - b2**self.steps).clamp(min=1e-300).sqrt().to(z.dtype).view(shape)
        new = z - (self.lr / correction1) * m / (v.sqrt() / correction2 + self.eps)
        self.m, self.v = _where(live, m, self.m), _where(live, v, self.v)
        return _where(live, new, z), live, dist


def _cubic_minimum(t1: torch.Tensor, f1: torch.Tensor, g1: torch.Tensor, t2: torch.Tensor, f2: torch.Tensor, g2: torch.Tensor,
                   low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Per problem, the minimiser of the cubic through (t1, f1) and (t2, f2) with slopes g1 and
    g2, clamped to [low, high]; the middle of [low, high] where the cubic has no minimum or the
    arithmetic is not finite (Nocedal and Wright, 2006, eq. 3.59)."""
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    square = d1 * d1 - g1 * g2
    d2 = square.clamp(min=0).sqrt()
    ahead = t1 <= t2
    far, near, g_far, g_near = torch.where(ahead, t2, t1), torch.where(ahead, t1, t2), torch.where(ahead, g2, g1), torch.where(ahead, g1, g2)
    at = far - (far - near) * ((g_far + d2 - d1) / (g_far - g_near + 2 * d2))
    at = torch.minimum(torch.maximum(at, low), high)
    return torch.where((square >= 0) & torch.isfinite(at), at, (low + high) / 2)


class BatchedLBFGS:
    """L-BFGS on a stack of P problems, each with its own history, step and line search.

    Per problem it follows ``torch.optim.LBFGS(lr, max_iter=20, history_size=100,
    line_search_fn="strong_wolfe" or None)`` (tolerance_grad 1e-7, tolerance_change 1e-9,
    max_eval 25): a step runs up to 20 inner iterations, each a direction from the last 100
    pairs (s, y) (a pair is kept only when y.s > 1e-10; H0 = y.s / y.y), the first iteration of a
    trial scaled to ``min(1, 1 / sum(abs(g))) * lr`` and the others starting at lr; a step ends
    on PyTorch's conditions (20 iterations, 25 evaluations counting the one where it starts, a
    gradient below 1e-7 at its start or after an iteration, no descent direction, a move or a
    change of the objective below 1e-9).

    The line search (``line_search=True``) is PyTorch's strong-Wolfe search (Nocedal and Wright,
    2006, algorithms 3.5 and 3.6; c1 = 1e-4, c2 = 0.9): it extrapolates by cubic interpolation
    (to between ``t + 0.01 (t - t_prev)`` and ``10 t``, ``t`` the last try and ``t_prev`` the one
    before) until it brackets a point that satisfies both Wolfe conditions, then zooms into the
    bracket by cubic interpolation, kept a tenth of the bracket away from its ends when it makes
    too little progress, and moves to the lower end of its bracket (when the budget runs out
    while extrapolating: the lower of the step's start and the last try); it stops at the
    budget of evaluations left in the step or when the bracket is shorter than 1e-9. The
    differences from PyTorch:

    - a point whose objective or slope is NaN or infinite counts as too high (PyTorch compares
      the NaN and may step to it, or, for a NaN slope with a finite objective, tries the same
      point until its budget is spent), and an interpolation that is not finite takes the
      middle of its interval;
    - a direction whose slope is NaN ends the step (PyTorch goes on);
    - the objective and gradient where a step ends are reused where the next one starts
      (PyTorch evaluates the closure again at the same point: same numbers, one evaluation
      fewer), and without a line search every iteration evaluates its new point (PyTorch skips
      the evaluation after a step's 20th iteration).

    The problems advance in *rounds*: in each, every live problem evaluates its next trial
    point (all in one batched call), so problems at different stages of their steps and line
    searches share every evaluation. Without ``sync_free`` (the default on a CPU, which reads its
    own memory for free) :meth:`prepare` reads which problems turn to a new direction and
    computes only theirs, and :func:`reconstruct_many` reads which problems ask for an
    evaluation and evaluates only those. With ``sync_free`` (the default off the CPU)
    :meth:`prepare` computes every problem's direction and keeps it where the problem turns
    (masks), and :func:`reconstruct_many` evaluates every problem in a trial (rows the host
    knows): nothing is read from the device between its checks of the problems' states (an
    ``evaluate`` that read its mask would still make the host wait).
    Defined in :doc:`/book/02_single_image_dlg`.
    """

    max_iter, max_eval, history_size = 20, 25, 100
    tolerance_grad, tolerance_change, c1, c2 = 1e-7, 1e-9, 1e-4, 0.9

    def __init__(self, z: torch.Tensor, lr: float, line_search: bool, sync_free: bool | None = None) -> None:
        lr = _check_optimiser(z, lr)
        if z.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the batched L-BFGS solves its linear systems in float32 or float64, got {z.dtype} variables; "
                             "convert the model (model.float()) and its gradient, or use optimizer='adam'.")
        if not isinstance(line_search, bool):
            raise ValueError(f"line_search must be True (strong-Wolfe) or False (a fixed step of lr), got {line_search!r}.")
        if sync_free is not None and not isinstance(sync_free, bool):
            raise ValueError(f"sync_free must be True, False or None (True off the CPU), got {sync_free!r}.")
        p, d = z.shape
        self.lr, self.line_search = lr, line_search
        self.sync_free = z.device.type != "cpu" if sync_free is None else sync_free
        self.rows = torch.arange(p, device=z.device)
        # the pairs in ring buffers: pairs[:, j] is s and pairs[:, m + j] is y of slot j; sy[j, k] =
        # s_j . y_k and yy[j, k] = y_j . y_k (one pass over the history per product, see _store_pair)
        self.pairs = z.new_zeros((p, 2 * self.history_size, d))
        self.sy, self.yy = z.new_zeros((p, self.history_size, self.history_size)), z.new_zeros((p, self.history_size, self.history_size))
        self.count = torch.zeros(p, dtype=torch.long, device=z.device)
        self.pos = torch.zeros_like(self.count)
        self.h_diag = z.new_ones(p)
        flag = torch.zeros(p, dtype=torch.bool, device=z.device)
        # fresh: the next direction is a trial's first; ended: a step just ended; searching: a
        # trial point waits for the next round; idle: the step ends next round without evaluation;
        # zoom: the line search has a bracket
        self.fresh, self.ended, self.searching, self.idle, self.turn = flag | True, flag.clone(), flag.clone(), flag.clone(), flag.clone()
        self.zoom, self.slow = flag.clone(), flag.clone()
        self.d, self.prev_g, self.g = z.new_zeros((p, d)), z.new_zeros((p, d)), z.new_zeros((p, d))
        wide = torch.float64
        self.t, self.slope, self.d_norm = z.new_zeros(p, dtype=wide), z.new_zeros(p, dtype=wide), z.new_zeros(p, dtype=wide)
        self.f, self.f_start, self.dist = (z.new_zeros(p, dtype=wide) for _ in range(3))
        self.evals, self.inner, self.ls_iter, self.ls_max = (torch.zeros_like(self.count) for _ in range(4))
        # the line search's two points (step, objective, slope, gradient, distance): the last two
        # tries while it extrapolates (0 the older), then the bracket, with ``low`` its lower end
        # (in one tensor, so that a point is written in one go; bt, bf, bgtd and bdist are its views)
        self.bs = z.new_zeros((p, 2, 4), dtype=wide)
        self.bt, self.bf, self.bgtd, self.bdist = self.bs.unbind(2)
        self.bg = z.new_zeros((p, 2, d))
        self.low = torch.zeros_like(self.count)

    def reset(self, rows: torch.Tensor, z: torch.Tensor, evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Forget the history of the problems in ``rows`` (a bool mask) and evaluate their start."""
        zero = torch.zeros_like(self.count)
        self.count, self.pos = torch.where(rows, zero, self.count), torch.where(rows, zero, self.pos)
        self.h_diag = torch.where(rows, torch.ones_like(self.h_diag), self.h_diag)
        self.fresh, self.ended = self.fresh | rows, self.ended | rows
        self.searching, self.idle, self.turn = self.searching & ~rows, self.idle & ~rows, self.turn & ~rows
        self.refresh(rows, z, evaluate)

    def refresh(self, rows: torch.Tensor, z: torch.Tensor, evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Evaluate the problems in ``rows`` at ``z`` (after a start or a projection)."""
        g, f, dist = evaluate(rows, z)
        self.g, self.f, self.dist = _where(rows, g, self.g), torch.where(rows, f, self.f), torch.where(rows, dist, self.dist)

    def prepare(self, live: torch.Tensor) -> None:
        """Start a step for the live problems whose step ended, and the next inner iteration
        (a direction and a trial step) for those that go on."""
        start = live & self.ended
        self.evals = torch.where(start, torch.ones_like(self.evals), self.evals)  # the evaluation where the step starts
        self.inner = torch.where(start, torch.zeros_like(self.inner), self.inner)
        optimal = self.g.abs().amax(1) <= self.tolerance_grad
        self.idle = self.idle | (start & optimal)
        turn = live & (self.turn | (start & ~optimal))
        self.ended, self.turn = self.ended & ~live, self.turn & ~live
        if self.sync_free:  # which problems turn stays on the device: work on all, masked
            rows = self.rows
        else:
            rows = turn.nonzero().flatten()
            if rows.numel() == 0:
                return
        if rows is self.rows or 2 * rows.numel() > turn.numel():  # most problems turn: work on all, masked
            rows, take, chosen = self.rows, (lambda t: t), turn
        else:  # a few: work on copies of their rows
            take, chosen = (lambda t: t.index_select(0, rows)), torch.ones_like(rows, dtype=torch.bool)
        history = self._store_pair(rows, take, chosen)
        d = self._direction(take, *history)
        self.d = _where(turn, d, self.d) if rows is self.rows else self.d.index_copy(0, rows, d)
        self.prev_g, self.f_start = _where(turn, self.g, self.prev_g), torch.where(turn, self.f, self.f_start)
        first_t = (1 / self.g.abs().sum(1).to(self.t.dtype)).clamp(max=1.0) * self.lr
        self.t = torch.where(turn, torch.where(self.fresh, first_t, torch.full_like(self.t, self.lr)), self.t)
        self.fresh = self.fresh & ~turn
        self.slope = torch.where(turn, (self.g * self.d).sum(1).to(self.slope.dtype), self.slope)
        descent = self.slope <= -self.tolerance_change
        self.idle = self.idle | (turn & ~descent)
        self.searching = self.searching | (turn & descent)
        # the line search starts from the step's start: point 0 at t = 0
        self._put(0, turn, torch.zeros_like(self.t), self.f, self.slope, self.g, self.dist)
        zero = torch.zeros_like(self.low)
        self.zoom, self.slow = self.zoom & ~turn, self.slow & ~turn
        self.ls_iter = torch.where(turn, zero, self.ls_iter)
        self.ls_max = torch.where(turn, self.max_eval - self.evals, self.ls_max)  # the evaluations left in the step, as PyTorch's max_ls
        self.d_norm = torch.where(turn, self.d.abs().amax(1).to(self.d_norm.dtype), self.d_norm)

    def _put(self, slot: int | torch.Tensor, mask: torch.Tensor, t: torch.Tensor, f: torch.Tensor, gtd: torch.Tensor, g: torch.Tensor,
             dist: torch.Tensor) -> None:
        """Write a point of the line search into its ``slot`` (0 or 1, for all or per problem) where ``mask``."""
        at = self._slot(slot)
        for store, value in ((self.bs, torch.stack([t, f, gtd, dist], dim=1)), (self.bg, g)):
            store[at] = _where(mask, value, store[at])

    def _lower_end(self) -> torch.Tensor:
        """Per problem, the slot (0 or 1) of the line search's point with the lower objective (0 on a tie)."""
        return (~(self.bf[:, 0] <= self.bf[:, 1])).long()

    def _slot(self, slot: int | torch.Tensor) -> tuple:
        """The index of a line-search slot in the stores: one slot for all problems (an int: a
        view, cheaper) or one per problem (a tensor)."""
        return (slice(None), slot) if isinstance(slot, int) else (self.rows, slot)

    def _point(self, slot: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The line-search point in ``slot`` (0 or 1, for all or per problem): step, objective,
        slope, gradient, distance (views of the store for an int slot)."""
        at = self._slot(slot)
        t, f, gtd, dist = self.bs[at].unbind(1)
        return t, f, gtd, self.bg[at], dist

    def _store_pair(self, rows: torch.Tensor, take: Callable[[torch.Tensor], torch.Tensor], chosen: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keep the last iteration's pair (s, y) of the problems ``rows`` (where ``chosen``) if
        y.s > 1e-10, with its inner products with the stored pairs; returns what
        :meth:`_direction` needs. One batched product reads the history once."""
        m, k = self.history_size, rows.numel()
        g = take(self.g)
        y, s = g - take(self.prev_g), take(self.d) * take(self.t).to(g.dtype)[:, None]
        ys = (y * s).sum(1)
        fresh = take(self.fresh)
        keep = chosen & ~fresh & (ys > 1e-10)
        slot, at = take(self.pos), torch.arange(k, device=rows.device)
        pairs, sy, yy = take(self.pairs), take(self.sy), take(self.yy)
        pairs[at, slot] = _where(keep, s, pairs[at, slot])
        pairs[at, m + slot] = _where(keep, y, pairs[at, m + slot])
        # (k, 2m, 3): s_j and y_j against s, y and g; as (k, 3, D) x (k, D, 2m), which reads the
        # history with unit stride (2 to 3 times faster on a CPU than (k, 2m, D) x (k, D, 3))
        dots = torch.bmm(torch.stack([s, y, g], dim=1), pairs.transpose(1, 2)).transpose(1, 2)
        sy[at, slot] = _where(keep, dots[:, m:, 0], sy[at, slot])  # s_new . y_j
        sy[at, :, slot] = _where(keep, dots[:, :m, 1], sy[at, :, slot])  # s_j . y_new
        yy[at, slot] = _where(keep, dots[:, m:, 1], yy[at, slot])
        yy[at, :, slot] = _where(keep, dots[:, m:, 1], yy[at, :, slot])
        if rows is not self.rows:  # the copies go back
            self.pairs[rows, slot], self.pairs[rows, m + slot] = pairs[at, slot], pairs[at, m + slot]
            self.sy[rows], self.yy[rows] = sy, yy
        pos = torch.where(keep, (slot + 1) % m, slot)
        count = torch.where(keep, (take(self.count) + 1).clamp(max=m), take(self.count))
        h_diag = torch.where(keep, ys / (y * y).sum(1), take(self.h_diag))
        h_diag = torch.where(fresh, torch.ones_like(h_diag), h_diag)
        if rows is self.rows:
            self.pos, self.count, self.h_diag = pos, count, h_diag
        else:
            self.pos, self.count, self.h_diag = self.pos.index_copy(0, rows, pos), self.count.index_copy(0, rows, count), self.h_diag.index_copy(0, rows, h_diag)
        return g, pairs, sy, yy, dots[:, :m, 2], dots[:, m:, 2], pos, count, h_diag, fresh

    def _direction(self, take: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, pairs: torch.Tensor, sy: torch.Tensor, yy: torch.Tensor,
                   s_g: torch.Tensor, y_g: torch.Tensor, pos: torch.Tensor, count: torch.Tensor, h_diag: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """``-H g`` for the stored pairs, from the compact representation of the L-BFGS matrix
        (Byrd, Nocedal and Schnabel, 1994): with the pairs in order as columns of S and Y,
        R the upper triangle of S'Y, D its diagonal and H0 = gamma I,
        ``H g = gamma g + S p - gamma Y u`` where ``R u = S'g`` and
        ``R' p = (D + gamma Y'Y) u - gamma Y'g``: the two-loop recursion's direction in a few
        batched products instead of a loop over the history. ``-g`` for a trial's first iteration."""
        m = self.history_size
        order = (pos[:, None] - count[:, None] + torch.arange(m, device=g.device)) % m  # slots, oldest first
        valid = torch.arange(m, device=g.device) < count[:, None]
        grid = valid[:, :, None] & valid[:, None, :]
        sy = sy.gather(1, order[:, :, None].expand(-1, -1, m)).gather(2, order[:, None, :].expand(-1, m, -1))
        yy = yy.gather(1, order[:, :, None].expand(-1, -1, m)).gather(2, order[:, None, :].expand(-1, m, -1))
        r = torch.where(grid, sy.triu(), torch.eye(m, dtype=g.dtype, device=g.device).expand_as(sy))
        none = torch.zeros_like(valid, dtype=g.dtype)
        diag = torch.where(valid, torch.diagonal(sy, dim1=1, dim2=2), none)
        s_g = torch.where(valid, s_g.gather(1, order), none)[:, :, None]
        y_g = torch.where(valid, y_g.gather(1, order), none)[:, :, None]
        u = torch.linalg.solve_triangular(r, s_g, upper=True)
        gamma = h_diag[:, None, None]
        w = diag[:, :, None] * u + gamma * torch.bmm(torch.where(grid, yy, torch.zeros_like(yy)), u) - gamma * y_g
        p = torch.linalg.solve_triangular(r.transpose(1, 2), torch.where(valid[:, :, None], w, torch.zeros_like(w)), upper=False)
        weights = torch.cat([torch.zeros_like(p).scatter(1, order[:, :, None], p), torch.zeros_like(u).scatter(1, order[:, :, None], -gamma * u)], dim=1)
        hg = gamma[:, :, 0] * g + torch.bmm(weights.transpose(1, 2), pairs)[:, 0]  # S p - gamma Y u in one pass over the history
        return _where(fresh, -g, -hg)

    def round(self, z: torch.Tensor, evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evaluate every live problem's trial point at once and move on: returns the new
        ``z``, which problems ended a step, and each problem's distance where it stands."""
        asked = live & self.searching
        candidate = z + self.t.to(z.dtype)[:, None] * self.d
        g, f, dist = evaluate(asked, candidate)
        self.evals = self.evals + asked.long()
        if self.line_search:
            z, moved = self._search(z, asked, g, f, dist)
        else:  # a fixed step: every trial point is taken
            moved = asked
            z, self.g = _where(moved, candidate, z), _where(moved, g, self.g)
            self.f, self.dist = torch.where(moved, f, self.f), torch.where(moved, dist, self.dist)
        self.inner = self.inner + moved.long()
        small = (self.d * self.t.to(self.d.dtype)[:, None]).abs().amax(1) <= self.tolerance_change
        optimal = self.g.abs().amax(1) <= self.tolerance_grad
        flat = (self.f - self.f_start).abs() < self.tolerance_change
        stop = moved & ((self.evals >= self.max_eval) | (self.inner >= self.max_iter) | optimal | small | flat)
        ended = live & (stop | self.idle)
        self.ended = self.ended | ended
        self.turn = self.turn | (moved & ~stop)
        self.searching = self.searching & ~moved
        self.idle = self.idle & ~live
        return z, ended, self.dist

    def _search(self, z: torch.Tensor, asked: torch.Tensor, g: torch.Tensor, f: torch.Tensor, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One round of the strong-Wolfe line search for the ``asked`` problems, which evaluated
        ``f`` and ``g`` at their trial step ``self.t``: either the next trial step, or the end of
        the search (``z`` moves to the lower end of its bracket). Returns ``z`` and the problems
        that moved."""
        t, f0, slope0 = self.t, self.f_start, self.slope
        gtd = (g * self.d).sum(1).to(t.dtype)
        # a point whose objective or slope is NaN or infinite counts as too high (and its
        # interpolations take the middle of their interval): the search shrinks back from it
        f = torch.where(torch.isfinite(f) & torch.isfinite(gtd), f, torch.full_like(f, math.inf))
        high_f = ~(f <= f0 + self.c1 * t * slope0)  # the sufficient decrease fails (or f is not finite)
        curved = gtd.abs() <= -self.c2 * slope0  # the strong curvature condition holds
        # extrapolation: point 1 is the newest try, point 0 the one before
        bracketing = asked & ~self.zoom
        self._put(1, bracketing, t, f, gtd, g, dist)
        spent = bracketing & (self.ls_iter >= self.ls_max)  # the last try of the budget: no test
        checked = bracketing & ~spent
        above = high_f | ((self.ls_iter > 1) & (f >= self.bf[:, 0]))
        to_zoom = checked & (above | (~curved & (gtd >= 0)))
        found = checked & ~above & curved
        further = checked & ~above & ~curved & (gtd < 0)
        t_next = _cubic_minimum(self.bt[:, 0], self.bf[:, 0], self.bgtd[:, 0], t, f, gtd, t + 0.01 * (t - self.bt[:, 0]), 10 * t)
        self._put(0, further, *self._point(1))
        self.t = torch.where(further, t_next, self.t)
        self.ls_iter = self.ls_iter + further.long()
        self._put(0, spent, torch.zeros_like(t), f0, slope0, self.prev_g, self.dist)  # the budget is spent: the start or the last try
        self.low = torch.where(found, torch.ones_like(self.low), torch.where(spent | to_zoom, self._lower_end(), self.low))
        # zoom: a new point replaces an end of the bracket
        zooming = asked & self.zoom
        self.ls_iter = self.ls_iter + zooming.long()
        low, high = self.low, 1 - self.low
        up = zooming & (high_f | (f >= self.bf[self.rows, low]))
        down = zooming & ~up
        found = found | (down & curved)
        swap = down & ~curved & (gtd * (self.bt[self.rows, high] - self.bt[self.rows, low]) >= 0)
        self._put(high, up, t, f, gtd, g, dist)
        self._put(high, swap, *self._point(low))
        self._put(low, down, t, f, gtd, g, dist)
        self.low = torch.where(up, self._lower_end(), self.low)
        # the next point of the zoom, unless the budget is spent or the bracket is too short
        zoom = to_zoom | (zooming & ~found)
        self.zoom = self.zoom | to_zoom
        ends = torch.minimum(self.bt[:, 0], self.bt[:, 1]), torch.maximum(self.bt[:, 0], self.bt[:, 1])
        short = (ends[1] - ends[0]) * self.d_norm < self.tolerance_change
        stop_zoom = zoom & ((self.ls_iter >= self.ls_max) | short)
        inside = _cubic_minimum(self.bt[:, 0], self.bf[:, 0], self.bgtd[:, 0], self.bt[:, 1], self.bf[:, 1], self.bgtd[:, 1], *ends)
        margin = 0.1 * (ends[1] - ends[0])
        edge = torch.minimum(ends[1] - inside, inside - ends[0]) < margin
        shift = edge & (self.slow | (inside >= ends[1]) | (inside <= ends[0]))
        inside = torch.where(shift, torch.where((inside - ends[1]).abs() < (inside - ends[0]).abs(), ends[1] - margin, ends[0] + margin), inside)
        go_on = zoom & ~stop_zoom
        self.t = torch.where(go_on, inside, self.t)
        self.slow = torch.where(go_on, edge & ~shift, self.slow)
        # the end: move to the lower end of the bracket
        moved = spent | found | stop_zoom
        t_low, f_low, _, g_low, dist_low = self._point(self.low)
        self.t = torch.where(moved, t_low, self.t)
        z = _where(moved, z + t_low.to(z.dtype)[:, None] * self.d, z)
        self.g, self.f, self.dist = _where(moved, g_low, self.g), torch.where(moved, f_low, self.f), torch.where(moved, dist_low, self.dist)
        return z, moved


_OPTIMIZERS = {"adam": lambda z, config: BatchedAdam(z, config.step_size()), "lbfgs": lambda z, config: BatchedLBFGS(z, config.step_size(), config.line_search)}


def _models_list(models: nn.Module | Sequence[nn.Module], count: int) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models] * count
    if not isinstance(models, (list, tuple)) or not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError(f"models must be one torch.nn.Module (shared by every problem) or a list of them (one per problem), got {type(models).__name__}.")
    if len(models) != count:
        raise ValueError(f"models has {len(models)} model(s) but targets has {count} problem(s); pass one model per problem, or one model for all.")
    first = models[0]
    layout = [(n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in first.named_parameters()]
    for i, m in enumerate(models):
        if type(m) is not type(first) or [(n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in m.named_parameters()] != layout:
            raise ValueError(f"models[{i}] differs from models[0] in its class or its parameters (names, shapes, dtype, device); every problem's model must share one architecture (only the weights may differ).")
    return list(models)


def _labels_list(labels: object, count: int) -> list[torch.Tensor | None]:
    if labels is None:
        return [None] * count
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 2 or labels.shape[0] != count:
            raise ValueError(f"labels must be None or one row of class indices per problem, shape ({count}, N), got shape {tuple(labels.shape)}.")
        return list(labels)
    if not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be None, a ({count}, N) tensor or a list of {count} tensors (one per problem), got {type(labels).__name__}; "
                        "convert an array with torch.as_tensor(labels).")
    if len(labels) != count:
        raise ValueError(f"labels must be None, a ({count}, N) tensor or a list of {count} tensors (one per problem), got a list of length {len(labels)}.")
    for i, known in enumerate(labels):
        if known is not None and not isinstance(known, torch.Tensor):
            raise TypeError(f"labels[{i}] must be a tensor of class indices (or None: config.labels), got {type(known).__name__}; pass torch.tensor({known!r}).")
    return list(labels)


def _seeds_list(seeds: int | Sequence[int], count: int) -> list[int]:
    if isinstance(seeds, (list, tuple)):
        if len(seeds) != count:
            raise ValueError(f"seeds has {len(seeds)} entries but targets has {count} problem(s); pass one seed per problem, or one int for all.")
        return [check_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
    if getattr(seeds, "ndim", 0):  # a tensor or array of seeds
        raise TypeError(f"seeds must be one int for every problem or a list of {count} ints (one per problem), got a {type(seeds).__name__}; pass seeds.tolist().")
    return [check_seed("seeds", seeds)] * count


def _check_floating(name: str, target: Sequence[torch.Tensor]) -> None:
    """A gradient or an update holds real numbers: refuse integer tensors (rounded values), which
    would otherwise be attacked as if they were the observation."""
    for j, t in enumerate(target):
        if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name}[{j}] has dtype {t.dtype}, but a gradient or update holds real numbers; pass the float tensors the "
                             "client computed (e.g. federated.client_update(...).tensors), not rounded or cast values.")


#: ``observe(call, weights, x, y) -> dict``: what the server sees for input ``x`` with labels ``y``,
#: written with ``torch.func`` so that it can be batched: ``weights`` is the dict of the model's
#: trainable parameters, ``call(weights, inputs)`` the model's logits with those weights, and the
#: result has the same keys. :func:`gradient_of_loss` (the default) and
#: :func:`dlgkit.attacks.fedavg.local_sgd` are two.
FunctionalObserve = Callable[[Callable[[dict, torch.Tensor], torch.Tensor], dict, torch.Tensor, torch.Tensor], dict]


def gradient_of_loss(call: Callable[[dict, torch.Tensor], torch.Tensor], weights: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The default observation of :func:`reconstruct_many`: the gradient of the soft
    cross-entropy of the batch ``(x, y)`` with respect to the weights (FedSGD)."""
    return grad(lambda w: soft_cross_entropy(call(w, x), y))(weights)


gradient_of_loss.functional = True  # batchable: reconstruct_many accepts it as observe


def _check_observe(observe: FunctionalObserve, template: nn.Module, params: dict, buffers: dict, shape: tuple[int, ...], y: torch.Tensor,
                   target: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Call a custom ``observe`` once, on the first problem at a fixed random input, before the
    batched run: its output must be a dict of the trainable parameters' names with the target's
    shapes, it must depend on ``x``, and ``torch.func.grad`` and ``vmap`` must go through it.
    Otherwise a clear error, instead of a KeyError or a vmap trace from inside the attack."""
    names = [k for k, p in template.named_parameters() if p.requires_grad]
    weights = {k: params[k] for k in names}

    def call(trainable: dict, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(template, ({**params, **trainable}, buffers), (inputs,))

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator).to(device=device, dtype=dtype)
    seen = observe(call, weights, x, y)
    if not isinstance(seen, dict):
        raise TypeError(f"observe must return a dict keyed like its weights argument (the model's parameter names), got {type(seen).__name__}; "
                        "e.g. return {k: ... for k in weights}.")
    missing, unknown = [k for k in names if k not in seen], [k for k in seen if k not in weights]
    if missing or unknown:
        raise ValueError(f"observe must return one tensor per trainable parameter, keyed by its name; missing {missing[:3]}, unexpected {unknown[:3]}.")
    for k, t in zip(names, target):
        if not isinstance(seen[k], torch.Tensor) or tuple(seen[k].shape) != tuple(t.shape):
            got = tuple(seen[k].shape) if isinstance(seen[k], torch.Tensor) else type(seen[k]).__name__
            raise ValueError(f"observe returned {got} for {k!r}, but the target holds a tensor of shape {tuple(t.shape)} for it; "
                             "they must match entry by entry (no broadcasting).")
    probes = {k: torch.randn(seen[k].shape, generator=generator).to(device=device, dtype=seen[k].dtype) for k in names}
    try:
        moved = vmap(grad(lambda inputs: sum((observe(call, weights, inputs, y)[k] * probes[k]).sum() for k in names)))(x[None])
    except RuntimeError as exc:
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"observe cannot be batched: torch.func.grad and vmap fail on it ({first_line}). Write it with torch operations only, "
                         "as dlgkit.attacks.fedavg.local_sgd is: no .item(), float(), .tolist(), .numpy() or Python if/while on tensor values.") from exc
    if not bool(moved.any()):
        raise ValueError("observe's output does not depend on x (its gradient with respect to x is zero): compute it from call(weights, x), "
                         "e.g. with torch.func.grad, and do not .detach() it.")


def _linear_head(template: nn.Module, names: list[str]) -> bool:
    """Whether the model computes ``fc(body(x).flatten(1))`` with ``fc`` an ``nn.Linear`` whose
    weight and bias are trained, and nothing else trainable outside ``body`` (the paper's
    :class:`~dlgkit.models.LeNet`, not a subclass that changes ``forward``): then the last
    layer's weight gradient need not be formed (see ``_Stack``)."""
    from dlgkit.models import LeNet

    if not isinstance(template, LeNet) or type(template).forward is not LeNet.forward or not isinstance(template.fc, nn.Linear):
        return False
    if template.fc.bias is None or names[-2:] != ["fc.weight", "fc.bias"]:
        return False
    return all(k.startswith("body.") for k in names[:-2])


#: The element-wise activations a grouped body may use, each with its backward written from its
#: output ``out``: the gradient at its input from ``grad`` at its output.
_ACTIVATION_BACKWARD: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.ReLU: lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0),
}


def _minus_twice(product: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``product * (1 - 2 out)`` in one pass over the tensors."""
    return torch.addcmul(product, product, out, value=-2)


#: Their second derivative's part: the gradient at the output ``out`` of ``grad . backward(back, out)``
#: (``back`` the gradient the backward was given), or None where it is zero (ReLU).
_ACTIVATION_SECOND: dict[type, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]] = {
    nn.Sigmoid: lambda grad, back, out: _minus_twice(grad * back, out),  # d/d out of out (1 - out) = 1 - 2 out
    nn.Tanh: lambda grad, back, out: (grad * back).mul_(out).mul_(-2),  # d/d out of 1 - out^2 = -2 out
    nn.ReLU: lambda grad, back, out: None,
}


def _grouped_body(template: nn.Module) -> bool:
    """Whether the body of a ``_linear_head`` model is a chain of plain convolutions (no groups,
    zero padding) and element-wise activations, with no buffers (the paper's
    :class:`~dlgkit.models.LeNet`): then P problems' bodies run as one grouped convolution per
    layer (see ``_Stack``)."""
    from torch.nn.utils import parametrize

    body = getattr(template, "body", None)
    if type(body) is not nn.Sequential or any(True for _ in body.buffers()) or body._forward_hooks or body._forward_pre_hooks:
        return False
    convs = 0
    for layer in body:
        if layer._forward_hooks or layer._forward_pre_hooks:  # e.g. the old, hook-style weight_norm
            return False
        if type(layer) is nn.Conv2d:
            own = {name for name, _ in layer.named_parameters(recurse=False)}
            if own != {"weight"} | ({"bias"} if layer.bias is not None else set()) or parametrize.is_parametrized(layer):
                return False  # its weight is computed (weight_norm, a parametrization), not a parameter
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return False
            convs += 1
        elif type(layer) not in _ACTIVATION_BACKWARD:
            return False
    return convs > 0


@dataclass
class _Stack:
    """The P problems as stacked tensors, and the batched objective over any subset of them.

    For a model with a linear head (``_linear_head``, e.g. LeNet) and the gradient as the
    observation, the head's weight gradient ``delta' h`` (``delta`` the loss's gradient at the
    logits, ``h`` the features; one row per example) is never formed: its distance to the
    target ``T`` is ``sum((delta delta') * (h h')) - 2 sum(delta * (h T')) + |T|^2`` (and its
    part of a cosine likewise), computed in float64 so that the difference of large terms keeps
    its digits. This is the same objective as the plain one (checked on the first two problems
    with finite weights before the run, with a fallback to the plain one); it spares the largest tensors of the
    problem (the head's 100 x 768 gradient per problem) and a quarter to a third of the time per
    evaluation on a CPU (20 LeNet problems, 32x32 colour images).

    When that body is a chain of convolutions and element-wise activations (``_grouped_body``,
    LeNet), the P problems go through neither ``vmap`` nor autograd (``_grouped_objective``):
    their images are laid side by side as the channels of one batch (channels-last), each layer
    is one convolution with ``groups=P`` and the problems' weights stacked, and both gradients
    are written out layer by layer: the inner one (the server's view: PyTorch's
    ``convolution_backward`` for each layer's weights and input, the activations' own backward),
    then the objective's gradient with respect to the dummies, backwards through that inner
    gradient, the head and the forward pass (every step a convolution, a transposed convolution
    or an element-wise product: ``_ACTIVATION_SECOND`` holds the activations' second
    derivatives). One evaluation of 10 batches of 4 faces on 2 CPU cores: 7.4 ms, against 13.8 ms
    with ``vmap`` and 8.8 ms with autograd through the same computation (an earlier version of
    this path, which took PyTorch's slower kernels for grouped transposed convolutions). Same
    objective, checked against the ``vmap`` one on the first problems before the run (with a
    fallback to it).
    """

    template: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    shared: bool
    target: list[torch.Tensor]
    labels: torch.Tensor
    shape: tuple[int, int, int, int]
    num_classes: int
    joint: bool
    config: AttackConfig
    observe: "FunctionalObserve | None" = None
    scale: torch.Tensor | None = None  # (P,): each problem's observation is divided by it (None: by 1)

    def __post_init__(self) -> None:
        names = [n for n, p in self.template.named_parameters() if p.requires_grad]
        n, numel = self.shape[0], math.prod(self.shape)
        config = self.config
        observe = self.observe or gradient_of_loss
        count = len(self.labels)
        scaled = self.scale is not None
        if not scaled:
            self.scale = torch.ones(count, dtype=torch.float64, device=self.labels.device)

        def inputs(z, labels):
            x = z[:numel].view(self.shape)
            return x, (F.softmax(z[numel:].view(n, self.num_classes), dim=-1) if self.joint else labels)

        def finish(observed, wanted, x, extra=None):
            if config.float64:
                observed, wanted = [t.double() for t in observed], [t.double() for t in wanted]
            if extra is None:
                distance = DISTANCES[config.distance](observed, wanted)
            elif config.distance == "l2":
                distance = DISTANCES["l2"](observed, wanted) + extra["gram"] - 2 * extra["cross"] + extra["tt"]
            else:  # cosine over the whole gradient, the head's weight included
                dot = sum((d * t).sum() for d, t in zip(observed, wanted)) + extra["cross"]
                norm_d = torch.sqrt(sum((d * d).sum() for d in observed) + extra["gram"])
                distance = 1 - dot / (norm_d * extra["norm_t"] + 1e-12)
            value = distance + config.tv * total_variation(x) if config.tv > 0 else distance
            return value, distance

        def objective(z, params, buffers, target, labels, scale, head_target, head_norms):
            x, y = inputs(z, labels)

            def call(trainable, batch):
                return functional_call(self.template, ({**params, **trainable}, buffers), (batch,))

            seen = observe(call, {k: params[k] for k in names}, x, y)
            observed = [seen[k] / scale.to(seen[k].dtype) for k in names] if scaled else [seen[k] for k in names]
            return finish(observed, list(target), x)

        body_names = names[:-2]

        def factored(x, y, params, buffers):
            """The gradient with the head's weight gradient left as ``delta' h``: the body's
            gradients and the head's bias gradient, ``delta`` (N, classes) and ``h`` (N, features)."""
            body_buffers = {k[5:]: v for k, v in buffers.items() if k.startswith("body.")}
            frozen = {k[5:]: v for k, v in params.items() if k.startswith("body.") and k not in body_names}  # each problem's own
            features, pull = vjp(lambda p: functional_call(self.template.body, ({**frozen, **p}, body_buffers), (x,)).flatten(1),
                                 {k[5:]: params[k] for k in body_names})
            weight = params["fc.weight"]
            delta = grad(lambda logits: soft_cross_entropy(logits, y))(F.linear(features, weight, params["fc.bias"]))
            (body_grads,) = pull(delta @ weight)
            return [body_grads[k[5:]] for k in body_names] + [delta.sum(0)], delta, features

        self.factored = factored

        def head_objective(z, params, buffers, target, labels, scale, head_target, head_norms):
            x, y = inputs(z, labels)
            observed, delta, features = factored(x, y, params, buffers)
            d64, h64 = delta.double(), features.double()
            extra = {"gram": ((d64 @ d64.T) * (h64 @ h64.T)).sum(), "cross": (d64 * (h64 @ head_target.T)).sum(),
                     "tt": head_norms[0], "norm_t": head_norms[1]}
            return finish(observed, list(target), x, extra)  # target: the gradient without the head's weight

        dims = None if self.shared else 0
        in_dims = (0, dims, dims, 0, 0, 0, 0, 0)
        self.head_target = self.head_norms = None
        use_head = not scaled and self.observe in (None, gradient_of_loss) and _linear_head(self.template, names)  # (its factored head is unscaled)
        if use_head:
            self.head_target = self.target[-2].double()
            tt = self.head_target.square().sum((1, 2))
            rest = sum(t.double().flatten(1).square().sum(1) for j, t in enumerate(self.target) if j != len(self.target) - 2)
            self.head_norms = torch.stack([tt, torch.sqrt(tt + rest)], dim=1)
        else:
            self.head_target = self.head_norms = torch.zeros(count, device=self.labels.device)
        self.single = {False: grad_and_value(objective, has_aux=True), True: grad_and_value(head_objective, has_aux=True)}
        self.batched = {False: vmap(self.single[False], in_dims=in_dims), True: vmap(self.single[True], in_dims=in_dims)}
        self.trainable = names  # the trainable parameters' names, in order
        self.head = use_head and self._same_objectives()
        self.grouped = self.head and config.distance in ("l2", "cosine") and _grouped_body(self.template) and self._grouped_agrees()

    def _args(self, take: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, head: bool | None = None) -> tuple:
        """The arguments of the objective (the factored one if ``head``, default: the one in
        use) for the rows ``take`` picks; the factored one is not given the head's weight target
        (it reads ``head_target``)."""
        head = self.head if head is None else head
        params = self.params if self.shared else {k: take(v) for k, v in self.params.items()}
        buffers = self.buffers if self.shared else {k: take(v) for k, v in self.buffers.items()}
        skip = len(self.target) - 2 if head else -1
        target = [take(t) for j, t in enumerate(self.target) if j != skip]
        return (take(z), params, buffers, target, take(self.labels), take(self.scale), take(self.head_target), take(self.head_norms))

    def _same_objectives(self) -> bool:
        """The factored gradient against the model's own (``torch.func.grad`` of the loss through
        ``forward``) for the first two problems whose weights are finite, at a random input: the
        same tensors up to float32 rounding, else the plain objective is used (a model whose
        ``forward`` is not ``fc(body(x).flatten(1))`` fails here)."""
        generator = torch.Generator().manual_seed(12345)
        dtype, device = self.params["fc.weight"].dtype, self.labels.device
        x = torch.rand(self.shape, generator=generator).to(device=device, dtype=dtype)
        y = torch.softmax(torch.randn((self.shape[0], self.num_classes), generator=generator), dim=-1).to(device=device, dtype=dtype)
        names = self.trainable
        problems = [None]  # one shared model
        if not self.shared:  # a problem with NaN weights (a broken client) is NaN both ways: check others
            finite = torch.stack([v.reshape(v.shape[0], -1).isfinite().all(1) for v in self.params.values()]).all(0)
            problems = finite.nonzero().flatten()[:2].tolist() or [0]
        for i in problems:
            params = self.params if i is None else {k: v[i] for k, v in self.params.items()}
            buffers = self.buffers if i is None else {k: v[i] for k, v in self.buffers.items()}
            plain = gradient_of_loss(lambda w, inputs: functional_call(self.template, ({**params, **w}, buffers), (inputs,)),
                                     {k: params[k] for k in names}, x, y)
            observed, delta, features = self.factored(x, y, params, buffers)
            mine = observed[:-1] + [delta.T @ features, observed[-1]]
            if not all(float((a - plain[k]).norm()) <= 1e-4 * float(plain[k].norm()) + 1e-30 for a, k in zip(mine, names)):
                return False
        return True

    def _grouped_objective(self, z: torch.Tensor, params: dict, buffers: dict, target: list[torch.Tensor], labels: torch.Tensor,
                           scale: torch.Tensor, head_target: torch.Tensor, head_norms: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The factored objective (``head_objective``) of the P rows in ``z`` and its gradient,
        without ``vmap`` or autograd: the bodies run as grouped convolutions and both gradients
        are written out (see the class docstring). Takes :meth:`_args`'s arguments (the head's
        target left out) and returns what the ``vmap`` objective returns: the gradient (P, D)
        and the objective and distance (P,)."""
        config, (n, c, h, w) = self.config, self.shape
        p, numel = z.shape[0], n * c * h * w
        cl = torch.channels_last

        def stacked(key: str) -> torch.Tensor:  # (P, ...): a shared model's weights repeated
            return (params[key] if not self.shared else params[key].expand(p, *params[key].shape)).detach()

        def backward(out_grad, before, kernel, layer, mask):  # a grouped convolution's input, weight and bias gradients (those mask asks for)
            return torch.ops.aten.convolution_backward(out_grad, before, kernel, [kernel.shape[0]] if mask[2] else None, list(layer.stride),
                                                       list(layer.padding), list(layer.dilation), False, [0, 0], p, mask)

        z = z.detach()
        x = z[:, :numel].view(p, n, c, h, w)
        # the forward pass: the problems' images side by side as channels, one grouped convolution a layer
        act = x.transpose(0, 1).reshape(n, p * c, h, w).contiguous(memory_format=cl)
        tape = []  # (index, layer, input, output, kernel) of each layer
        for i, layer in enumerate(self.template.body):
            kernel = None
            if isinstance(layer, nn.Conv2d):
                kernel = stacked(f"body.{i}.weight")
                kernel = kernel.reshape(-1, *kernel.shape[2:]).contiguous(memory_format=cl)
                bias = stacked(f"body.{i}.bias").reshape(-1) if layer.bias is not None else None
                out = F.conv2d(act, kernel, bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=p)
            else:
                out = layer(act)
            tape.append((i, layer, act, out, kernel))
            act = out
        features = act.reshape(n, p, -1).transpose(0, 1)  # (P, N, features), each row as body(x).flatten(1)
        head_w, head_b = stacked("fc.weight"), stacked("fc.bias")
        logits = torch.baddbmm(head_b[:, None, :], features, head_w.transpose(1, 2))
        probs = F.softmax(logits, dim=-1)
        if self.joint:
            y = F.softmax(z[:, numel:].view(p, n, self.num_classes), dim=-1)
            mass = y.sum(-1, keepdim=True)
            delta = (probs * mass - y) / n  # the mean soft cross-entropy's gradient at the logits
        else:
            delta = (probs - F.one_hot(labels, self.num_classes).to(probs.dtype)) / n
        # the inner gradient (the one the server sees), layer by layer down to the first convolution
        first = next(i for i, layer in enumerate(self.template.body) if isinstance(layer, nn.Conv2d))
        back = torch.bmm(delta, head_w).transpose(0, 1).reshape(act.shape).contiguous(memory_format=cl)
        at_output, grads = {}, {}  # the inner gradient at each layer's output; the observed gradients
        for i, layer, before, after, kernel in reversed(tape):
            at_output[i] = back
            if not isinstance(layer, nn.Conv2d):
                back = _ACTIVATION_BACKWARD[type(layer)](back, after)
                continue
            weight, bias = f"body.{i}.weight" in self.trainable, f"body.{i}.bias" in self.trainable  # (a frozen one is not observed)
            back_in, weight_grad, bias_grad = backward(back, before, kernel, layer, [i != first, weight, bias])
            grads[f"body.{i}.weight"], grads[f"body.{i}.bias"] = weight_grad, bias_grad
            if i == first:
                break
            back = back_in
        names = self.trainable[:-2]
        observed = [grads[k].view(p, -1, *grads[k].shape[1:]) for k in names] + [delta.sum(1)]
        wanted = list(target)
        if config.float64:
            observed, wanted = [t.double() for t in observed], [t.double() for t in wanted]
        d64, h64 = delta.double(), features.double()
        dd, hh, ht = torch.bmm(d64, d64.transpose(1, 2)), torch.bmm(h64, h64.transpose(1, 2)), torch.bmm(h64, head_target.transpose(1, 2))
        gram, cross = (dd * hh).sum((1, 2)), (d64 * ht).sum((1, 2))

        def per_problem(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # (P,) broadcast over a (P, ...) tensor
            return v.view(-1, *([1] * (like.dim() - 1)))

        # the distance, and its gradient at the observed gradients, the gram term and the cross term
        if config.distance == "l2":
            diffs = [a - b for a, b in zip(observed, wanted)]
            distance = sum(d.square().flatten(1).sum(1) for d in diffs) + gram - 2 * cross + head_norms[:, 0]
            bar_observed = [2 * d for d in diffs]
            bar_gram, bar_cross = torch.ones_like(gram), torch.full_like(cross, -2.0)
        else:  # cosine over the whole gradient, the head's weight included
            dot = sum((a * b).flatten(1).sum(1) for a, b in zip(observed, wanted)) + cross
            norm = torch.sqrt(sum(a.square().flatten(1).sum(1) for a in observed) + gram)
            scaled = norm * head_norms[:, 1] + 1e-12
            distance = 1 - dot / scaled
            bar_dot, bar_square = -1 / scaled, dot * head_norms[:, 1] / scaled.square() / (2 * norm)
            bar_observed = [per_problem(bar_dot, b).to(b.dtype) * b + 2 * per_problem(bar_square, a).to(a.dtype) * a for a, b in zip(observed, wanted)]
            bar_gram, bar_cross = bar_square, bar_dot
        bar_grads = {k: g.to(delta.dtype) for k, g in zip(names, bar_observed)}
        bar_delta = (2 * per_problem(bar_gram, dd) * torch.bmm(hh, d64) + per_problem(bar_cross, ht) * ht).to(delta.dtype) + bar_observed[-1].to(delta.dtype)[:, None, :]
        bar_features = (2 * per_problem(bar_gram, dd) * torch.bmm(dd, h64) + per_problem(bar_cross, ht) * torch.bmm(d64, head_target)).to(delta.dtype)

        bar_kernels = {}  # the distance's gradient at each convolution's weight (as a kernel) and bias; None where frozen or absent
        for i, layer, *_ in tape[first:]:
            if isinstance(layer, nn.Conv2d):
                weight, bias = bar_grads.get(f"body.{i}.weight"), bar_grads.get(f"body.{i}.bias")
                bar_kernels[i] = (None if weight is None else weight.reshape(-1, *weight.shape[2:]).contiguous(memory_format=cl),
                                  None if bias is None else bias.reshape(-1))

        # back through the inner gradient, from the first convolution up: the gradient at each
        # layer's inner gradient (bar_back), and what the activations add at their outputs
        bar_back, bar_out = None, {}
        for i, layer, before, after, kernel in tape[first:]:
            if isinstance(layer, nn.Conv2d):
                weight, bias = bar_kernels[i]
                terms = []
                if weight is not None:
                    terms.append(F.conv2d(before, weight, bias, layer.stride, layer.padding, layer.dilation, p))
                elif bias is not None:
                    terms.append(bias.view(1, -1, 1, 1).expand_as(at_output[i]))
                if bar_back is not None:
                    terms.append(F.conv2d(bar_back, kernel, None, layer.stride, layer.padding, layer.dilation, p))
                bar_back = sum(terms[1:], terms[0]) if terms else torch.zeros_like(at_output[i])
            else:
                twice = _ACTIVATION_SECOND[type(layer)](bar_back, at_output[i], after)
                if twice is not None:
                    bar_out[i] = twice
                bar_back = _ACTIVATION_BACKWARD[type(layer)](bar_back, after)
        # back through the head: the softmax, and the features' two roles (logits and the head's gradient)
        bar_delta = bar_delta + torch.bmm(bar_back.reshape(n, p, -1).transpose(0, 1), head_w.transpose(1, 2))
        weighted = (bar_delta * probs).sum(-1, keepdim=True)
        bar_logits = probs * (bar_delta - weighted) / n
        bar_z = []
        if self.joint:
            bar_logits = bar_logits * mass
            bar_y = (weighted - bar_delta) / n
            bar_z.append((y * (bar_y - (y * bar_y).sum(-1, keepdim=True))).reshape(p, -1))
        bar_features = bar_features + torch.bmm(bar_logits, head_w)
        # back through the forward pass, down to the images
        bar_act = bar_features.transpose(0, 1).reshape(act.shape).contiguous(memory_format=cl)
        for i, layer, before, after, kernel in reversed(tape):
            if i in bar_out:
                bar_act = bar_act + bar_out[i]
            if isinstance(layer, nn.Conv2d):
                weight, _ = bar_kernels[i]
                bar_in = backward(bar_act, before, kernel, layer, [True, False, False])[0]
                if weight is not None:
                    bar_in = bar_in + backward(at_output[i], before, weight, layer, [True, False, False])[0]
                bar_act = bar_in
            else:
                bar_act = _ACTIVATION_BACKWARD[type(layer)](bar_act, after)
        bar_x = bar_act.reshape(n, p, c, h, w).transpose(0, 1)
        value = distance
        if config.tv > 0:
            across, down = x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
            tv = across.abs().flatten(1).mean(1) + down.abs().flatten(1).mean(1)
            value = distance + config.tv * tv  # total_variation per problem
            bar_x = bar_x.contiguous()
            step_a, step_d = torch.sign(across) * (config.tv / across[0].numel()), torch.sign(down) * (config.tv / down[0].numel())
            bar_x[..., 1:, :] += step_a
            bar_x[..., :-1, :] -= step_a
            bar_x[..., :, 1:] += step_d
            bar_x[..., :, :-1] -= step_d
        g = torch.cat([bar_x.reshape(p, -1), *bar_z], dim=1)
        return g, (value, distance)

    def _grouped_agrees(self) -> bool:
        """The grouped objective against the ``vmap`` one on the first (up to) three problems at
        a random input: the same values and gradients up to float32 rounding (and NaN in the same
        problems), else ``vmap`` is used."""
        generator = torch.Generator().manual_seed(54321)
        rows = torch.arange(min(3, len(self.labels)), device=self.labels.device)
        take = lambda t: t.index_select(0, rows)  # noqa: E731
        z = torch.rand((len(rows), math.prod(self.shape) + (self.shape[0] * self.num_classes if self.joint else 0)), generator=generator)
        args = self._args(take, z.to(device=self.labels.device, dtype=self.params["fc.weight"].dtype))
        g_vmap, (v_vmap, _) = self.batched[True](*args)
        try:
            g_mine, (v_mine, _) = self._grouped_objective(*args)
        except Exception:  # noqa: BLE001 - a body the grouped path cannot run: the vmap one can
            return False
        finite = torch.isfinite(v_vmap) & torch.isfinite(g_vmap).all(1)  # a problem with NaN weights is NaN both ways
        if not bool(finite.any()) or not torch.equal(finite, torch.isfinite(v_mine) & torch.isfinite(g_mine).all(1)):
            return False
        v_vmap, v_mine, g_vmap, g_mine = v_vmap[finite], v_mine[finite], g_vmap[finite], g_mine[finite]
        close = torch.allclose(v_mine.double(), v_vmap.double(), rtol=1e-4, atol=1e-9)
        return close and all(float((a - b).norm()) <= 1e-3 * float(b.norm()) + 1e-12 for a, b in zip(g_mine, g_vmap))

    def evaluate(self, mask: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradient, objective and distance of the problems where ``mask`` is True (at the
        indices ``rows`` instead when given: a superset of the mask known on the host, which
        spares the device a sync). One problem alone is solved without ``vmap`` (cheaper)."""
        if rows is None:
            rows = mask.nonzero().flatten()
        p = z.shape[0]
        g = torch.full_like(z, math.nan)
        value = z.new_full((p,), math.nan, dtype=torch.float64)
        distance = value.clone()
        if rows.numel() == 0:
            return g, value, distance
        # most rows asked: evaluate them all (the others' values are dropped) rather than copy the
        # asked rows' weights and targets, which costs more than the extra rows on a CPU
        everyone = rows.numel() >= 0.85 * p and rows.numel() > 1
        # a problem alone runs as two copies of itself in the grouped objective, through the
        # same grouped kernels as in a batch (one group takes other kernels, which round
        # differently); its numbers agree with its row in a batch to float32 rounding
        picked = rows.repeat(2) if self.grouped and rows.numel() == 1 else rows
        take = (lambda t: t) if everyone else (lambda t: t.index_select(0, picked))
        args = self._args(take, z)
        if self.grouped:
            g_rows, (value_rows, distance_rows) = self._grouped_objective(*args)
        elif rows.numel() == 1:
            z_one, params, buffers, target, *rest = args
            if not self.shared:
                params, buffers = {k: v[0] for k, v in params.items()}, {k: v[0] for k, v in buffers.items()}
            g_one, (value_one, distance_one) = self.single[self.head](z_one[0], params, buffers, [t[0] for t in target], *(a[0] for a in rest))
            g_rows, value_rows, distance_rows = g_one[None], value_one[None], distance_one[None]
        else:
            g_rows, (value_rows, distance_rows) = self.batched[self.head](*args)
        if everyone and rows.numel() < p:
            g_rows, value_rows, distance_rows = g_rows.index_select(0, rows), value_rows.index_select(0, rows), distance_rows.index_select(0, rows)
        g_rows, value_rows, distance_rows = g_rows[: rows.numel()], value_rows[: rows.numel()], distance_rows[: rows.numel()]  # a lone problem's copy dropped
        g = g.index_copy(0, rows, g_rows.detach())
        value = value.index_copy(0, rows, value_rows.detach().to(torch.float64))
        distance = distance.index_copy(0, rows, distance_rows.detach().to(torch.float64))
        return g, value, distance


def _trial(p: int, z: torch.Tensor, steps: int, code: int, losses: torch.Tensor, snaps: torch.Tensor, every: int | None,
           numel: int, shape: tuple[int, ...]) -> tuple[engine.Trial, torch.Tensor]:
    """The trial that problem ``p`` just ended, read from the device (its variables are frozen)."""
    values = losses[:steps, p].tolist()
    if code == _DIVERGED:
        values[-1] = math.inf
    variables = z[p].detach().cpu().clone()
    history, iters = [], []
    if every is not None:
        last = (steps - 1 if code == _DIVERGED else steps) // every
        history = [snaps[p, j].cpu().view(shape).clone() for j in range(last + 1)]
        iters = [j * every for j in range(last + 1)]
        if code != _DIVERGED and iters[-1] != steps:
            history.append(variables[:numel].view(shape).clamp(0, 1))
            iters.append(steps)
    final = math.inf if code == _DIVERGED else values[-1]
    return engine.Trial(problem=None, losses=values, history=history, history_iters=iters, status=_STATUS[code], final=final), variables


def reconstruct_many(
    models: nn.Module | Sequence[nn.Module],
    targets: Sequence[Sequence[torch.Tensor]],
    shape: Sequence[int],
    config: AttackConfig = RECOMMENDED,
    *,
    labels: torch.Tensor | Sequence[torch.Tensor] | None = None,
    num_classes: int | None = None,
    seeds: int | Sequence[int] = 0,
    history_every: int | None = 10,
    check_every: int | None = None,
    progress: bool | None = None,
    observe: FunctionalObserve | None = None,
) -> list[AttackResult]:
    """Solve P independent image attacks as one: problem ``i`` is
    ``reconstruct(models[i], targets[i], shape, config, labels=labels[i], seed=seeds[i])``.

    - ``models``: one model shared by every problem, or a list of P models of one architecture
      (their weights may differ; they are stacked and called with ``torch.func.functional_call``).
    - ``targets``: P gradient lists, each checked as :func:`~dlgkit.attacks.image.reconstruct` checks one.
    - ``shape``: each problem's dummy batch ``(N, C, H, W)``, the same for all.
    - ``labels``: None (``config.labels`` for every problem), a ``(P, N)`` tensor or a list of P
      tensors of class indices. ``seeds``: one int for every problem or one per problem; problem
      ``i`` draws its starts exactly as ``reconstruct(..., seed=seeds[i])`` does.
    - ``history_every``: snapshots as in ``reconstruct``; ``check_every``: how many rounds (one
      batched evaluation each: an Adam step, an L-BFGS trial point) pass between the reads of the
      problems' states by the host (to end and restart trials); None is 1 on a CPU and 10 on a
      GPU. A check is skipped when no problem has ended a step since the previous one. It
      changes only when a finished problem restarts, never a result.

    Each problem keeps its own optimiser state (:class:`BatchedAdam`, :class:`BatchedLBFGS`),
    stopping rule and restarts, as ``config`` asks. Returns one
    :class:`~dlgkit.attacks.image.AttackResult` per problem; its ``wall_time`` is the whole run's
    time divided by P.

    ``observe`` replaces the gradient by another observation, written with ``torch.func`` so
    that it can be batched (:data:`FunctionalObserve`; e.g. :func:`dlgkit.attacks.fedavg.local_sgd`,
    the FedAvg update, used by :func:`dlgkit.attacks.fedavg.reconstruct_fedavg_many`); the
    ``observe(model, x, y)`` functions of ``reconstruct`` cannot be batched and are refused.
    Defined in :doc:`/book/02_single_image_dlg`.
    """
    return _reconstruct_many(models, targets, shape, config, labels=labels, num_classes=num_classes, seeds=seeds,
                             history_every=history_every, check_every=check_every, progress=progress, observe=observe)


def _reconstruct_many(models, targets, shape, config, *, labels, num_classes, seeds, history_every, check_every, progress,
                      observe, scales: Sequence[float] | None = None) -> list[AttackResult]:
    if observe is not None and (not callable(observe) or not getattr(observe, "functional", False)):
        raise TypeError("observe must be a batchable observation (observe.functional is True), such as "
                        "dlgkit.attacks.fedavg.local_sgd(local_steps, local_lr, batch_size), or None for the gradient; "
                        f"got {type(observe).__name__}. A function observe(model, x, y) works with reconstruct, one problem at a time.")
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be a dlgkit.attacks.AttackConfig (e.g. attacks.RECOMMENDED.with_(iterations=100)), got {type(config).__name__}.")
    if isinstance(targets, torch.Tensor) or not isinstance(targets, (list, tuple)) or not targets:
        raise TypeError(f"targets must be a non-empty list of gradient lists (one per problem), got {type(targets).__name__}.")
    if all(isinstance(t, torch.Tensor) for t in targets):
        raise TypeError("targets is one gradient list (a list of tensors); reconstruct_many takes a list of them, one per problem: pass [gradients] for one problem.")
    count = len(targets)
    model_list = _models_list(models, count)
    label_list, seed_list = _labels_list(labels, count), _seeds_list(seeds, count)
    if observe is not None and observe is not gradient_of_loss and config.labels == "idlg" and any(known is None for known in label_list):
        raise ValueError("labels=None (or a None entry) with config.labels='idlg' reads the labels off a gradient's last layer, but observe "
                         "replaces the gradient by another observation, so they would be guessed wrongly; pass the labels (a (P, N) tensor "
                         "of class indices) or use config.with_(labels='joint').")
    check_positive_int("history_every", history_every, allow_none=True)
    check_positive_int("check_every", check_every, allow_none=True)
    checked, modes = [], []
    for i, (model, target, known) in enumerate(zip(model_list, targets, label_list)):
        if isinstance(target, torch.Tensor) or not isinstance(target, (list, tuple)):
            raise TypeError(f"targets[{i}] must be a gradient list (one tensor per model parameter), got {type(target).__name__}.")
        _check_floating(f"targets[{i}]", target)
        target, shape, classes = _checked_inputs(model, target, shape, None, num_classes, name=f"targets[{i}]")
        mode, resolved = _resolve_labels(model, target, known, config, classes, shape)
        checked.append((target, resolved))
        modes.append(mode)
    if len({mode == "joint" for mode in modes}) > 1:
        raise ValueError("labels mixes known labels and None with config.labels='joint'; give every problem its labels, or none.")
    num_classes = classes
    template = model_list[0]
    device = next(p for p in template.parameters() if p.requires_grad).device
    dtype = next(p for p in template.parameters() if p.requires_grad).dtype
    with contextlib.ExitStack() as stack:
        for model in {id(m): m for m in model_list}.values():
            stack.enter_context(engine.caller_model_untouched(model))
        return _solve(model_list, checked, modes[0], shape, num_classes, config, seed_list, history_every, check_every, progress, device, dtype,
                      observe, scales)


def _solve(model_list, checked, mode, shape, num_classes, config, seeds, history_every, check_every, progress, device, dtype,
           observe=None, scales=None) -> list[AttackResult]:
    start_time = time.perf_counter()
    count, n = len(model_list), shape[0]
    shared = all(m is model_list[0] for m in model_list)
    template = model_list[0]
    if shared:
        params = {k: v.detach() for k, v in template.named_parameters()}
        buffers = {k: v.detach() for k, v in template.named_buffers()}
    else:
        params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in model_list]) for k, _ in template.named_parameters()}
        buffers = {k: torch.stack([dict(m.named_buffers())[k].detach() for m in model_list]) for k, _ in template.named_buffers()}
    targets = [[t.to(device) for t in target] for target, _ in checked]
    stacked_target = [torch.stack([target[j] for target in targets]) for j in range(len(targets[0]))]
    joint = mode == "joint"
    labels = torch.zeros((count, n), dtype=torch.long) if joint else torch.stack([known for _, known in checked])
    scale = None if scales is None else torch.tensor(list(scales), dtype=torch.float64, device=device)
    if observe is not None:
        first = params if shared else {k: v[0] for k, v in params.items()}
        first_buffers = buffers if shared else {k: v[0] for k, v in buffers.items()}
        y = torch.full((n, num_classes), 1.0 / num_classes, dtype=dtype, device=device) if joint else labels[0].to(device)
        _check_observe(observe, template, first, first_buffers, shape, y, targets[0], dtype, device)
    problems = _Stack(template, params, buffers, shared, stacked_target, labels.to(device), shape, num_classes, joint, config, observe, scale)
    tols = [engine.absolute_tol(config, target, n) for target in targets]
    tol = torch.tensor([-math.inf if t is None else t for t in tols], dtype=torch.float64, device=device)
    numel = math.prod(shape)
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    def draw(i: int) -> torch.Tensor:  # the draws of dlgkit.attacks.image._image_problem, in order
        noise = torch.randn(shape, generator=generators[i]) if config.init == "gaussian" else torch.rand(shape, generator=generators[i])
        parts = [noise.reshape(-1)]
        if joint:
            parts.append(torch.randn((n, num_classes), generator=generators[i]).reshape(-1))
        return torch.cat(parts).to(device=device, dtype=dtype)

    z = torch.stack([draw(i) for i in range(count)])
    lbfgs = config.optimizer == "lbfgs"
    optimiser = _OPTIMIZERS[config.optimizer](z, config)
    everyone = torch.ones(count, dtype=torch.bool, device=device)
    optimiser.reset(everyone, z, problems.evaluate)
    rows = torch.arange(count, device=device)
    steps = torch.zeros(count, dtype=torch.long, device=device)
    status = torch.zeros(count, dtype=torch.long, device=device)
    losses = torch.full((config.iterations, count), math.nan, dtype=torch.float64, device=device)
    slots = config.iterations // history_every + 1 if history_every is not None else 1
    snaps = z.new_zeros((count, slots, numel))
    if history_every is not None:
        snaps[:, 0] = z[:, :numel].clamp(0, 1)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 10
    trials: list[list[engine.Trial]] = [[] for _ in range(count)]
    finals: list[list[torch.Tensor]] = [[] for _ in range(count)]
    in_trial = set(range(count))
    in_trial_mask = everyone.clone()
    in_rows = rows.clone()

    picks_rows = lbfgs and not optimiser.sync_free

    def evaluate(mask: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # on a CPU an L-BFGS round evaluates only the problems that ask (the mask, read by the
        # host); off the CPU, and for Adam, every problem in a trial (rows the host knows: no sync)
        return problems.evaluate(mask, at, None if picks_rows else in_rows)

    bar = tqdm(total=count, desc=f"DLG x{count}", disable=not progress_enabled(progress), leave=False)
    live = everyone.clone()
    optimiser.prepare(live)
    rounds, pending = 0, False
    reads_done = device.type == "cpu" or (lbfgs and config.clamp)  # whether a round reads if a step ended
    while in_trial:
        rounds += 1
        z, done, current = optimiser.round(z, evaluate, live)
        done = done & live  # these problems ended a step: record it and apply the stopping rules
        # on a CPU, reading whether any did costs nothing, and most L-BFGS rounds end no step:
        # they skip this bookkeeping (a no-op for them) and the next check (nothing changed). Off
        # the CPU the bookkeeping runs masked, without a read, except for a clamped L-BFGS: its
        # projection costs an evaluation, so one read per round spares it where no step ended
        if not reads_done or bool(done.any()):
            pending = True
            if config.clamp:
                z = torch.cat([_where(done, z[:, :numel].clamp(0, 1), z[:, :numel]), z[:, numel:]], dim=1)
                if lbfgs:
                    optimiser.refresh(done, z, evaluate)
                    current = optimiser.dist
            steps = steps + done.long()
            at = (steps - 1).clamp(min=0)
            losses[at, rows] = torch.where(done, current, losses[at, rows])
            finite = torch.isfinite(current)
            new = torch.where(~finite, _DIVERGED, _RUNNING)
            if history_every is not None:
                record = done & finite & (steps % history_every == 0)
                slot = (steps // history_every).clamp(max=slots - 1)
                snaps[rows, slot] = _where(record, z[:, :numel].clamp(0, 1), snaps[rows, slot])
            new = torch.where(finite & (current < tol), _CONVERGED, new)
            if lbfgs and config.patience is not None:
                before = losses[(steps - 1 - config.patience).clamp(min=0), rows]
                stalled = finite & (steps > config.patience) & (current >= before * (1 - 1e-9))
                new = torch.where((new == _RUNNING) & stalled, _STALLED, new)
            new = torch.where((new == _RUNNING) & (steps >= config.iterations), _BUDGET, new)
            status = torch.where(done, new, status)
        if rounds % check_every == 0 and pending:
            pending = False
            codes = status.tolist()
            restart = torch.zeros_like(everyone)
            for i in sorted(in_trial):
                if codes[i] == _RUNNING:
                    continue
                trial, variables = _trial(i, z, int(steps[i]), codes[i], losses, snaps, history_every, numel, shape)
                trials[i].append(trial)
                finals[i].append(variables)
                if len(trials[i]) < config.restarts and RESTART_POLICIES[config.restart_policy](trial, tols[i]):
                    restart[i] = True
                    z[i] = draw(i)
                else:
                    in_trial.discard(i)
                    in_trial_mask[i] = False
                    bar.update(1)
            if bool(restart.any()):
                steps = torch.where(restart, torch.zeros_like(steps), steps)
                status = torch.where(restart, torch.zeros_like(status), status)
                if history_every is not None:
                    snaps[:, 0] = _where(restart, z[:, :numel].clamp(0, 1), snaps[:, 0])
                optimiser.reset(restart, z, evaluate)
            in_rows = torch.tensor(sorted(in_trial), dtype=torch.long, device=device)
        live = in_trial_mask & (status == _RUNNING)
        optimiser.prepare(live)
    bar.close()
    share = (time.perf_counter() - start_time) / count
    return [_result(trials[i], finals[i], shape, numel, n, num_classes, mode, checked[i][1], share) for i in range(count)]


def _result(trials: list[engine.Trial], finals: list[torch.Tensor], shape: tuple[int, ...], numel: int, n: int, num_classes: int,
            mode: str, known: torch.Tensor | None, wall_time: float) -> AttackResult:
    best = 0
    for i, trial in enumerate(trials):
        if trial.final < trials[best].final:
            best = i
    variables = finals[best]
    if mode == "joint":
        probs = F.softmax(variables[numel:].view(n, num_classes), dim=-1)
        found = probs.argmax(dim=-1)
    else:
        probs, found = None, known.cpu()
    chosen = trials[best]
    return AttackResult(
        reconstruction=variables[:numel].view(shape).clone(), labels=found, losses=chosen.losses, history=chosen.history,
        history_iters=chosen.history_iters, wall_time=wall_time, restart_losses=[t.final for t in trials],
        statuses=[t.status for t in trials], best_restart=best, label_mode=mode, label_probs=probs,
    )
