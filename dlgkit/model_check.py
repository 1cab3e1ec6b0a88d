"""What a client can check in a model a server sends it, before training on it: the signatures
of chapter 7's malicious layers.

- Imprint layer (Fowl et al., 2022): many rows of one linear layer point the same way (they all
  measure one statistic) and differ only in their bias, which climbs a ladder of quantiles.
  Rows of an honestly initialised or trained layer are never parallel.
- Trap weights (Boenisch et al., 2023): in nearly every row the negative entries outweigh the
  positive ones by a little. In a random layer about half the rows lean each way.

Explained in chapter 7 of the book (the malicious server; what a client can do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dlgkit.checks import check_number, check_positive_int

__all__ = ["CHANCE_PAIRS", "ModelInspection", "chance_parallel_pairs", "inspect_model"]


@dataclass
class ModelInspection:
    """The verdict of :func:`inspect_model`: ``suspicious`` is True when some layer looks
    planted, and ``reasons`` says which layer and why (one line each).
    Explained in chapter 7 of the book."""

    suspicious: bool
    reasons: list[str] = field(default_factory=list)
    #: layers the parallel-rows test could not judge (too few input dimensions; see
    #: :func:`chance_parallel_pairs`), one line each
    not_judged: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.suspicious


def inspect_model(model: nn.Module, parallel_cosine: float = 0.9999, min_parallel: int = 3, trap_fraction: float = 0.9, min_rows: int = 32) -> ModelInspection:
    """Check every ``nn.Linear`` of ``model`` for an imprint layer (at least ``min_parallel``
    rows whose pairwise cosine similarity is at least ``parallel_cosine``) and for trap weights
    (a layer of at least ``min_rows`` rows in which at least ``trap_fraction`` of the rows have a
    positive part smaller than, but more than half of, their negative part). The honest models
    of the course pass; the models of :func:`dlgkit.attacks.imprint.imprint_model` and
    :func:`dlgkit.attacks.trap.trap_model` are flagged. A server that knows the check can hide
    from it (e.g. by rotating rows a little), so passing is no proof of honesty. A layer with
    NaN or inf weights is flagged too. A layer with so few inputs that random rows are parallel
    by chance (more than :data:`CHANCE_PAIRS` parallel pairs expected, e.g. ``Linear(2, 256)``)
    is not judged by the parallel-rows test, unless it holds far more parallel pairs than chance
    gives (e.g. every row the same); it is listed in ``not_judged`` instead.
    Explained in chapter 7 of the book."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    cos_min = check_number("parallel_cosine", parallel_cosine, low=0.0, high=1.0, low_open=True)
    min_parallel = check_positive_int("min_parallel", min_parallel)
    if min_parallel < 2:
        raise ValueError(f"min_parallel must be at least 2 (parallel means two or more rows), got {min_parallel}.")
    frac = check_number("trap_fraction", trap_fraction, low=0.5, high=1.0, low_open=True)
    min_rows = check_positive_int("min_rows", min_rows)
    reasons, skipped = [], []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear) or layer.out_features < 2 or layer.in_features < 2:
            continue
        w = layer.weight.detach().double()
        if not bool(torch.isfinite(w).all()) or (layer.bias is not None and not bool(torch.isfinite(layer.bias.detach()).all())):
            reasons.append(f"{name or 'model'}: holds NaN or inf weights; no honest model sends those (training on it would give NaN).")
            continue
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cos = unit @ unit.T
        partners = (cos >= cos_min).sum(1)  # each row counts itself
        group = int(partners.max())
        chance = chance_parallel_pairs(layer.out_features, layer.in_features, cos_min)
        pairs = int(partners.sum() - layer.out_features) // 2  # the parallel pairs found
        if group >= min_parallel and chance >= CHANCE_PAIRS and not _beyond_chance(pairs, chance):
            skipped.append(f"{name or 'model'}: rows in {layer.in_features} dimensions are parallel by chance too "
                           f"({chance:.2g} pairs expected among {layer.out_features} random rows), so parallel rows prove nothing here.")
        elif group >= min_parallel and chance >= CHANCE_PAIRS:
            reasons.append(f"{name or 'model'}: {group} of {layer.out_features} rows point the same way (cosine >= {cos_min}), {pairs} parallel pairs where "
                           f"random rows in {layer.in_features} dimensions give about {chance:.2g}: far more than chance (an imprint layer repeats one row with many biases).")
        elif group >= min_parallel:
            reasons.append(f"{name or 'model'}: {group} of {layer.out_features} rows point the same way (cosine >= {cos_min}); an honest layer has none "
                           "(a planted layer repeats one row: an imprint layer's measuring rows, or a back layer that copies one value into every output).")
        if layer.out_features >= min_rows:
            pos, neg = w.clamp_min(0).sum(1), -w.clamp_max(0).sum(1)
            ratio = pos / neg.clamp_min(1e-300)
            leaning = float(((ratio < 1) & (ratio > 0.5)).double().mean())
            if leaning >= frac:
                reasons.append(f"{name or 'model'}: {leaning:.0%} of {layer.out_features} rows have a positive part a little smaller than the negative part: trap weights.")
    return ModelInspection(bool(reasons), reasons, skipped)


#: The parallel-rows test judges a layer only when random rows would give fewer parallel pairs
#: than this, on average (:func:`chance_parallel_pairs`), or when it holds far more parallel
#: pairs than random rows would (a Poisson tail below 1e-9).
CHANCE_PAIRS = 1e-3


def _beyond_chance(pairs: int, expected: float) -> bool:
    """True when ``pairs`` parallel pairs are far more than random rows give (``expected`` on
    average): a Poisson upper tail below 1e-9. A low-dimensional layer whose rows are all one
    row is planted, however many pairs chance gives."""
    from scipy.stats import poisson

    return pairs > expected and float(poisson.sf(pairs - 1, expected)) < 1e-9


def chance_parallel_pairs(rows: int, dims: int, parallel_cosine: float) -> float:
    """The expected number of pairs among ``rows`` independent, isotropic random rows in ``dims``
    dimensions whose cosine similarity is at least ``parallel_cosine``: the pairs times the
    share of the sphere within that angle of a point, ``I_{1-c^2}((dims-1)/2, 1/2) / 2``
    (the regularised incomplete beta function). In 2 or 3 dimensions, many random rows are
    parallel by chance (256 rows in 2-D: about 150 pairs at cosine 0.9999); in 100 dimensions
    practically none are. Explained in chapter 7 of the book."""
    from scipy.special import betainc

    rows, dims = check_positive_int("rows", rows), check_positive_int("dims", dims)
    c = check_number("parallel_cosine", parallel_cosine, low=0.0, high=1.0)
    if dims == 1:
        return rows * (rows - 1) / 2 * (0.5 if c < 1 else 0.0)  # on a line, half the pairs share a sign
    share = 0.5 * float(betainc((dims - 1) / 2, 0.5, 1.0 - c * c))
    return rows * (rows - 1) / 2 * share
