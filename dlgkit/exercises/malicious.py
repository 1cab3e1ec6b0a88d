"""Checks for the exercises of chapter 7 (the malicious server: imprint layers).

The checks build their imprint layers, gradients and recoveries with their own code (never with
:mod:`dlgkit.attacks.imprint`, which the exercises ask the student to write), on private cases
drawn afresh at every call: brightness distributions, faces with a random contrast and
brightness, batches.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F

from dlgkit import data
from dlgkit.exercises._common import ExerciseFailure, _report, _require, _tensor, call_student, fresh_generator, randint

__all__ = ["FLAT_BATCH", "FLAT_NEURONS", "FLAT_TARGET", "check_imprint_thresholds", "check_imprint_recover", "check_expected_fraction", "check_flat_brightness_layer"]

#: Exercise 7.4: the neuron budget, the clients' batch size and the mean fraction of 16 private
#: batches that must come back exactly. Equally likely bins give (1 - 1/64)^47 = 0.477. Measured on
#: this project's CPU (calls of the check): the reference solution (the first principal direction of
#: the public images, thresholds at its quantiles) 0.448 to 0.514 (30 calls), a random direction with
#: quantile thresholds 0.457 to 0.484 (5), a random direction with evenly spaced thresholds 0.294 to
#: 0.346 (10), brightness bins 0.001 to 0.003 (5: every image has the same brightness).
FLAT_NEURONS = 64
FLAT_BATCH = 48
FLAT_TARGET = 0.40
_SIDE = 16  # the private faces are 16x16 (d = 256)
_FLAT_TRIALS = 16  # private batches of exercise 7.4


def _faces(generator: torch.Generator, n: int) -> torch.Tensor:
    """``n`` private 16x16 faces: random LFW faces, maybe mirrored, with a random contrast and brightness."""
    faces, _ = data.lfw_faces(100, size=_SIDE)
    pick = torch.randint(0, len(faces), (n,), generator=generator)
    out = faces[pick].clone()
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    shift = 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
    return (contrast * out + shift).clamp(0, 1)


def _flat_faces(generator: torch.Generator, n: int) -> torch.Tensor:
    """Private faces normalised to the same mean brightness, 1/2: the brightness statistic is degenerate."""
    x = _faces(generator, n).flatten(1).double()
    return (0.5 + 0.5 * (x - x.mean(1, keepdim=True))).float().view(n, 1, _SIDE, _SIDE)  # in [0, 1], contrast kept


def _imprint_gradients(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The front layer's gradients when a client trains ``x + v * sum relu(weight x + bias)`` followed
    by a linear classifier (the check's own planted model; ``v`` has equal columns)."""
    d = x[0].numel()
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    v = 1e-2 * torch.randn(d, generator=generator)
    classifier = torch.randn(10, d, generator=generator) / math.sqrt(d)
    flat = x.flatten(1)
    h = torch.relu(flat @ w.T + b)
    logits = (flat + h.sum(1, keepdim=True) * v) @ classifier.T
    dw, db = torch.autograd.grad(F.cross_entropy(logits, y), [w, b])
    return dw, db


def _bin_recover(dw: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """The check's own recovery: consecutive row differences over bias differences, the top row alone."""
    dwb = torch.cat([dw[:-1] - dw[1:], dw[-1:]]).double()
    dbb = torch.cat([db[:-1] - db[1:], db[-1:]]).double()
    full = dbb.abs() > 1e-6 * float(db.abs().max()) if float(db.abs().max()) > 0 else torch.zeros_like(dbb, dtype=torch.bool)
    return dwb[full] / dbb[full, None]


def _exact(recovered: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For each image of ``x``: does some recovered row reproduce it at PSNR >= 60 dB (RMS error <= 1e-3)?"""
    if recovered.numel() == 0:
        return torch.zeros(len(x), dtype=torch.bool)
    a, b = recovered.double().reshape(len(recovered), -1), x.double().flatten(1)
    rms = torch.cdist(b, a, compute_mode="donot_use_mm_for_euclid_dist").amin(1) / math.sqrt(b.shape[1])
    return rms <= 1e-3


# --- exercise 7.1 --------------------------------------------------------------------------

def _brightness_sample(generator: torch.Generator, n: int, low: float, high: float, gamma: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64) ** gamma


def _below(c: float, low: float, high: float, gamma: float) -> float:
    """P(brightness <= c) for the brightness ``low + (high - low) * U ** gamma`` (U uniform)."""
    if not c > low:
        return 0.0
    return min(1.0, ((c - low) / (high - low)) ** (1 / gamma))


def check_imprint_thresholds(fn: Callable) -> bool:
    """Exercise 7.1: ``fn(public_brightness, bins)`` returns ``bins`` strictly increasing thresholds
    ``c_1 < ... < c_k`` (a tensor) that make the bins ``(c_i, c_{i+1}]`` and ``(c_k, inf)`` equally
    likely for the clients, whose brightness follows the same distribution as the public sample
    (20000 values in [0, 1]), with no client image below ``c_1``. Checked on 3 private, skewed
    distributions against 200000 fresh draws: every bin's probability within 30% of ``1/k``; and
    no probability at all below ``c_1`` (computed exactly from the distribution, so a ``c_1`` at the
    public minimum fails every time). May use: torch, numpy (not dlgkit.attacks)."""

    def body() -> str:
        generator = fresh_generator()
        worst = 0.0
        for trial in range(3):
            bins = (8, 16, 32)[randint(generator, 0, 3)]
            low, high = 0.05 + 0.25 * float(torch.rand(1, generator=generator)), 0.6 + 0.35 * float(torch.rand(1, generator=generator))
            gamma = (0.3 + 0.3 * float(torch.rand(1, generator=generator))) if trial % 2 else (1.8 + 1.2 * float(torch.rand(1, generator=generator)))
            public = _brightness_sample(generator, 20000, low, high, gamma).float()
            got = _tensor(call_student(fn, public.clone(), bins), "the thresholds")
            _require(got.dim() == 1 and got.numel() == bins, f"return one threshold per bin: a 1-D tensor of {bins} values, got shape {tuple(got.shape)}.")
            _require(bool((got.diff() > 0).all()), "the thresholds must be strictly increasing (c_1 < c_2 < ...): neuron i fires above c_i, and the bins lie between consecutive thresholds.")
            fresh = _brightness_sample(generator, 200000, low, high, gamma)
            where = f"distribution {trial} ({bins} bins)"
            # the probability of a client's image at or below c_1, exact (the brightness is
            # low + (high - low) * U ** gamma): a sample would miss a c_1 just above the lowest
            # brightness (e.g. the public minimum) about one time in ten
            dead = _below(float(got[0]), low, high, gamma)
            if dead > 0:
                if abs(dead - 1 / bins) < 0.3 / bins:
                    raise ExerciseFailure(f"{where}: {dead:.1%} of the clients' images fall at or below c_1 and fire no neuron: about 1/k. You used the quantiles 1/k, ..., k/k; use 0, 1/k, ..., (k-1)/k, with c_1 below every image.")
                raise ExerciseFailure(f"{where}: {100 * dead:.2g}% of the clients' images fall at or below c_1 and fire no neuron. c_1 must lie below every brightness a client can have (the public minimum is not enough: put c_1 below it).")
            counts = torch.bincount(torch.bucketize(fresh, got.double()) - 1, minlength=bins).double()
            spread = float((counts / len(fresh) * bins - 1).abs().max())
            worst = max(worst, spread)
            _require(spread < 0.3, f"{where}: the bins are not equally likely: one holds {float(counts.max()) / len(fresh):.3f} of the images, another {float(counts.min()) / len(fresh):.3f}, against 1/k = {1 / bins:.3f}. Evenly spaced thresholds follow the range, not the distribution: use quantiles of the public brightness.")
        return f"Equally likely bins on 3 private distributions (every bin within {worst:.0%} of 1/k on 200000 fresh draws, none below c_1)."

    return _report("Exercise 7.1 (thresholds that make the bins equally likely)", body)


# --- exercise 7.2 --------------------------------------------------------------------------

def check_imprint_recover(fn: Callable) -> bool:
    """Exercise 7.2: ``fn(weight_grad, bias_grad)`` gets the gradients of an imprint layer of ``k``
    brightness bins (rows sorted by increasing threshold) and returns one image per non-empty bin,
    a tensor ``(M, d)`` (flattened images, any order). Passes when ``M`` is the number of non-empty
    bins and every image alone in its bin comes back exactly (PSNR >= 60 dB), on 3 private batches
    of 16x16 faces. May use: torch (not dlgkit.attacks)."""

    def body() -> str:
        generator = fresh_generator()
        total = 0
        for trial in range(3):
            bins, batch = (16, 32)[trial % 2], randint(generator, 6, 11)
            public = _faces(generator, 2000).flatten(1).mean(1).double()
            for _ in range(50):  # case 0 has one image alone in the top bin (to catch a forgotten top row)
                c = torch.quantile(public, torch.arange(bins, dtype=torch.float64) / bins)
                c[0] = -1.0
                x = _faces(generator, batch)
                which = torch.bucketize(x.flatten(1).mean(1).double(), c) - 1
                counts = torch.bincount(which, minlength=bins)
                alone = counts[which] == 1
                if trial or (counts[-1] == 1 and int(alone.sum()) >= 2):
                    break
            else:
                raise RuntimeError("exercise 7.2: no private case met its premise in 50 draws; please report this.")
            d = x[0].numel()
            y = torch.randint(0, 10, (batch,), generator=generator)
            dw, db = _imprint_gradients(torch.full((bins, d), 1.0 / d), -c.float(), x, y, generator)
            got = _tensor(call_student(fn, dw.clone(), db.clone()), "the recovered images")
            nonempty = int((counts > 0).sum())
            _require(got.dim() == 2 and got.shape[1] == d, f"return the images flattened, a tensor of shape (M, {d}), got {tuple(got.shape)}.")
            ok = _exact(got, x)
            where = f"batch {trial} ({batch} faces, {bins} bins, {nonempty} of them non-empty)"
            if not bool(ok[alone].all()):
                top_alone = alone & (which == bins - 1)
                missed = alone & ~ok
                if bool(top_alone.any()) and bool(missed[top_alone].all()) and bool(ok[alone & ~top_alone].all()):
                    raise ExerciseFailure(f"{where}: every image alone in its bin came back except the brightest, alone in the top bin (c_k, inf). Row k has no row k+1 to subtract: its gradient is the top bin's on its own.")
                if bool(top_alone.any()) and bool(ok[top_alone].all()):
                    raise ExerciseFailure(f"{where}: only the top bin's image came back exactly. Neuron i fires for every image brighter than c_i, so row i sums all of them: subtract row i+1 (and the bias gradients likewise) to keep bin i alone.")
                raise ExerciseFailure(f"{where}: {int(missed.sum())} of the {int(alone.sum())} images alone in their bin did not come back exactly. Bin i is (row i - row i+1) / (bias i - bias i+1).")
            _require(len(got) == nonempty, f"{where}: you returned {len(got)} images; expected one per non-empty bin ({nonempty}). An empty bin has a zero bias difference: leave it out.")
            total += int(alone.sum())
        return f"All {total} faces alone in their bins recovered exactly on 3 private batches, one image per non-empty bin."

    return _report("Exercise 7.2 (images out of an imprint gradient)", body, {"division by zero": "Empty bins have a zero bias difference: leave them out."})


# --- exercise 7.3 --------------------------------------------------------------------------

def check_expected_fraction(fn: Callable) -> bool:
    """Exercise 7.3: ``fn(probabilities, batch_size)`` returns the expected fraction of a batch of
    ``batch_size`` independent images recovered exactly when the bins have the given
    ``probabilities`` (a 1-D tensor summing to at most 1; the rest is the dead region below
    ``c_1``, where nothing is recovered). Passes within 1e-4 on 4 private cases. May use: torch,
    numpy, math (not dlgkit.attacks)."""

    def body() -> str:
        generator = fresh_generator()
        for trial in range(4):
            bins, batch = randint(generator, 4, 65), randint(generator, 2, 100)
            weights = -torch.log(torch.rand(bins, generator=generator, dtype=torch.float64))  # Dirichlet(1, ..., 1)
            dead = 0.0 if trial == 0 else 0.2 * float(torch.rand(1, generator=generator))
            p = weights / weights.sum() * (1 - dead)
            got = call_student(fn, p.clone(), batch)
            if isinstance(got, torch.Tensor):
                _require(got.numel() == 1, f"return one number, got a tensor of shape {tuple(got.shape)}.")
                got = float(_tensor(got, "the expected fraction").double())
            _require(isinstance(got, (int, float)) and not isinstance(got, bool), f"return the expected fraction as a float, got {type(got).__name__}.")
            got = float(got)  # a plain float: a subclass could redefine the arithmetic of the comparison
            _require(math.isfinite(got), "the expected fraction is not a number (NaN or inf).")
            want = float((p * (1 - p) ** (batch - 1)).sum())
            if abs(got - want) < 1e-4:
                continue
            where = f"case {trial} ({bins} bins of unequal probability, batch of {batch}, dead region {dead:.1%})"
            if abs(got - (1 - 1 / bins) ** (batch - 1)) < 1e-6:
                raise ExerciseFailure(f"{where}: you returned the formula for equally likely bins, (1 - 1/k)^(B-1). Condition on the bin of one image: it lands in bin j with probability p_j and is alone there with probability (1 - p_j)^(B-1).")
            if abs(got - float((p * (1 - p) ** batch).sum())) < 1e-6:
                raise ExerciseFailure(f"{where}: the exponent is off by one: an image is alone when the *other* B - 1 images miss its bin.")
            q = p / p.sum()
            if dead > 0 and abs(got - float((q * (1 - q) ** (batch - 1)).sum())) < 1e-6:
                raise ExerciseFailure(f"{where}: you renormalised the probabilities to sum to 1. An image in the dead region below c_1 fires no neuron and is lost; it is not moved into a bin.")
            raise ExerciseFailure(f"{where}: you returned {got:.6f}, expected {want:.6f}.")
        return "The expected fraction is right on 4 private cases, with and without a dead region."

    return _report("Exercise 7.3 (the expected fraction for unequal bins)", body)


# --- exercise 7.4 --------------------------------------------------------------------------

def check_flat_brightness_layer(fn: Callable, target: float = FLAT_TARGET) -> bool:
    """Exercise 7.4 (open): ``fn(public, neurons)`` gets ``public`` (2000, 1, 16, 16), faces of the
    clients' population, in which every image has mean brightness 1/2, and returns the imprint
    layer's ``(weight, bias)``: at most ``neurons`` (64) rows of 256 values, and their biases. The
    check plants it in front of its own model, and for each of 16 private batches of 48 faces reads
    the images off the gradient with consecutive row differences (rows in order of increasing
    threshold, so decreasing bias, the top row alone). Passes when the mean fraction recovered
    exactly is at least ``target``. May use: torch, numpy (not dlgkit.attacks)."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < target <= 1:
        raise ValueError(f"target must be a fraction in (0, 1], the share of each batch to recover (default {FLAT_TARGET}), got {target!r}.")

    def body() -> str:
        generator = fresh_generator()
        public = _flat_faces(generator, 2000)
        got = call_student(fn, public.clone(), FLAT_NEURONS)
        _require(isinstance(got, (tuple, list)) and len(got) == 2, f"return the layer as a pair (weight, bias), got {type(got).__name__}.")
        weight, bias = _tensor(got[0], "the weight"), _tensor(got[1], "the bias")
        d = public[0].numel()
        _require(weight.dim() == 2 and weight.shape[1] == d and 1 <= weight.shape[0] <= FLAT_NEURONS, f"the weight must have shape (neurons, {d}) with at most {FLAT_NEURONS} neurons, got {tuple(weight.shape)}.")
        _require(bias.shape == (weight.shape[0],), f"the bias must have one entry per row of the weight, shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
        fractions = []
        for _ in range(_FLAT_TRIALS):
            x = _flat_faces(generator, FLAT_BATCH)
            y = torch.randint(0, 10, (FLAT_BATCH,), generator=generator)
            dw, db = _imprint_gradients(weight, bias, x, y, generator)
            fractions.append(float(_exact(_bin_recover(dw, db), x).double().mean()))
        mean = sum(fractions) / len(fractions)
        best = (1 - 1 / weight.shape[0]) ** (FLAT_BATCH - 1)
        _require(
            mean >= target,
            f"{mean:.1%} of the private batches recovered exactly (per batch: {', '.join(f'{f:.0%}' for f in fractions)}), below the target {target:.0%}; "
            f"equally likely bins would give {best:.1%} with {weight.shape[0]} neurons. Every image here has the same brightness, so brightness bins put them all in one bin: "
            "find a statistic that still varies across these images (a direction of the public images), then put the thresholds at its quantiles.",
        )
        return f"{mean:.1%} of {_FLAT_TRIALS} private batches of {FLAT_BATCH} recovered exactly with {weight.shape[0]} neurons (target {target:.0%}; equally likely bins give {best:.1%})."

    return _report("Exercise 7.4 (open: an imprint layer when brightness says nothing)", body)
