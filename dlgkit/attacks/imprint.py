"""The imprint module of "Robbing the Fed" (Fowl et al., ICLR 2022): a malicious server makes
a client's gradient contain its images exactly, with no optimisation at all.

The server puts a block in front of the model it sends: a linear layer of ``k`` neurons whose
rows all measure the same statistic of the input (here the mean brightness), with biases
``-c_1 > -c_2 > ... > -c_k`` at quantiles of that statistic, a ReLU, and a layer back to the
input's shape added to the input (so the rest of the model sees about the same image).
Neuron ``i`` fires for every image brighter than ``c_i``; all neurons pass the same
derivative ``g_n`` back for image ``n`` (the back layer's columns are equal), so

``dW_i - dW_{i+1} = sum of g_n x_n`` and ``db_i - db_{i+1} = sum of g_n``

over the images whose brightness lies in ``(c_i, c_{i+1}]``. An image alone in its bin is
their quotient, exactly (row ``k`` alone serves the top bin ``(c_k, inf)``).
Explained in chapter 7 of the book (the malicious server).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dlgkit.checks import check_finite_tensors, check_number, check_positive_int, check_seed, check_unit_range

__all__ = [
    "EXACT_PSNR",
    "PlantedModel",
    "brightness",
    "varied_faces",
    "imprint_thresholds",
    "imprint_model",
    "imprint_recover",
    "expected_recovered_fraction",
    "best_psnr",
    "exact_matches",
    "recovery_fractions",
    "closed_form_band",
]

#: PSNR (dB) at and above which a recovered image counts as exact (chapter 7).
EXACT_PSNR = 60.0


class PlantedModel(nn.Module):
    """A model with a server-made block in front: ``x + unflatten(W2 relu(W1 flat(x) + b1))``,
    then the original ``model``.

    ``weight`` (k, d) and ``bias`` (k,) are the planted first layer (imprint bins or trap
    weights, ``d`` = pixels of one input of ``input_shape``). The back layer ``W2`` (d, k) has
    ``k`` equal columns ``decoder_scale * v`` with ``v`` standard normal drawn from ``seed``
    (equal columns give every neuron the same derivative per image, which the imprint attack
    needs; the small scale keeps the model's output close to the honest one).
    ``self.front`` is the first layer, ``self.back`` the second, ``self.model`` the honest model.
    Explained in chapter 7 of the book.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], weight: torch.Tensor, bias: torch.Tensor, decoder_scale: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        shape = _check_input_shape(input_shape)
        d = math.prod(shape)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d:
            raise ValueError(f"weight must be a tensor of shape (neurons, {d}) for inputs of shape {shape}, got {_describe(weight)}.")
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), one per neuron of weight, got {_describe(bias)}.")
        if weight.shape[0] == 0:
            raise ValueError("weight has no rows: the planted layer needs at least one neuron.")
        if not (weight.is_floating_point() and bias.is_floating_point()):
            raise TypeError(f"weight and bias must be floating-point tensors, got {weight.dtype} and {bias.dtype}; use .float().")
        check_finite_tensors("weight", weight)
        check_finite_tensors("bias", bias)
        scale = check_number("decoder_scale", decoder_scale, low=0.0, low_open=True)
        k = weight.shape[0]
        self.input_shape = shape
        with torch.random.fork_rng(devices=[]):  # their random init is overwritten; the caller's RNG stays put
            self.front = nn.Linear(d, k)
            self.back = nn.Linear(k, d, bias=False)
        gen = torch.Generator().manual_seed(check_seed("seed", seed))
        v = torch.randn(d, 1, generator=gen, dtype=weight.dtype) * scale
        with torch.no_grad():
            self.front.weight.copy_(weight)
            self.front.bias.copy_(bias)
            self.back.weight.copy_(v.expand(d, k))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The planted block, then the honest model."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"inputs must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}.")
        h = torch.relu(self.front(x.flatten(1)))
        return self.model(x + self.back(h).view(x.shape))


def _describe(value: object) -> str:
    """What was passed, for an error message: a tensor's shape and dtype, or the type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    shape = getattr(value, "shape", None)
    kind = f"{type(value).__module__}.{type(value).__name__}".replace("builtins.", "")
    return f"a {kind} of shape {tuple(shape)} (convert it with torch.as_tensor)" if shape is not None else f"a {kind}"


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    """The shape of one input, e.g. ``(1, 32, 32)``: a sequence of positive ints."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (Sequence, torch.Size)) or len(input_shape) == 0:
        raise TypeError(f"input_shape must be the shape of one input as a tuple of ints, e.g. (1, 32, 32), got {input_shape!r}.")
    return tuple(check_positive_int("input_shape entries", s) for s in input_shape)  # type: ignore[misc]


def brightness(images: torch.Tensor) -> torch.Tensor:
    """The statistic the imprint bins measure: each image's mean pixel value, shape (N,).
    Explained in chapter 7 of the book."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] == 0 or images[0].numel() == 0:
        raise ValueError(f"images must be a tensor of shape (N, ...) with N >= 1 and at least one pixel per image, got {_describe(images)}.")
    check_unit_range("images", images)
    return images.flatten(1).mean(1)


def varied_faces(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images drawn from a continuous population made of the 100 LFW faces (32x32, grey):
    a face picked at random, its pixels raised to a power ``gamma = 2**u`` with ``u`` uniform in
    [-1, 1], mirrored with probability 1/2. Its brightness has a continuous distribution, so
    batches of any size (more than 100) can be drawn, and a server's public sample (another
    seed) fits the same distribution as the clients'. Shape (n, 1, 32, 32), values in [0, 1].
    Explained in chapter 7 of the book."""
    from dlgkit.data import lfw_faces

    n = check_positive_int("n", n)
    faces, _ = lfw_faces(n=100, size=32)
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    pick = torch.randint(0, len(faces), (n,), generator=gen)
    gamma = 2.0 ** (torch.rand(n, generator=gen) * 2 - 1)
    flip = torch.rand(n, generator=gen) < 0.5
    out = faces[pick].clamp(0, 1) ** gamma.view(n, 1, 1, 1)
    out[flip] = out[flip].flip(-1)
    return out


def imprint_thresholds(public_images: torch.Tensor, bins: int) -> torch.Tensor:
    """The ``bins`` thresholds ``c_1 < ... < c_k`` of the imprint layer, from the brightness of
    images the server holds (public data of the same kind as the clients').

    ``c_i`` is the ``(i-1)/k`` quantile of the public brightness for ``i >= 2``, so the bins
    ``(c_i, c_{i+1}]`` and the top bin ``(c_k, inf)`` are equally likely, each ``1/k``, under the
    public distribution. ``c_1`` (the 0 quantile) is put below the public minimum by the public
    range (at least 1), so a client image darker than every public one still falls in the first
    bin (quantiles ``i/k`` instead would leave a dead bin below ``c_1`` and make only ``k - 1``
    bins count). Raises a ``ValueError`` for more bins than public images, or when the public
    brightness has too few distinct values for ``bins`` increasing thresholds (e.g. all images
    equally bright).
    Explained in chapter 7 of the book."""
    bins = check_positive_int("bins", bins, hint="It is the number of neurons (brightness bins) of the imprint layer, e.g. 64.")
    if not isinstance(public_images, torch.Tensor) or public_images.dim() < 2 or public_images.shape[0] == 0 or public_images[0].numel() == 0:
        raise ValueError(f"public_images must be a tensor of images (N, C, H, W) with N >= 1, the server's public sample, got {_describe(public_images)}.")
    check_unit_range("public_images", public_images)
    stats = brightness(public_images.detach().float()).double().cpu().numpy()  # thresholds in the layer's float32
    if bins > len(stats):
        raise ValueError(f"bins={bins} needs at least {bins} public images to place its quantiles, got {len(stats)}; use fewer bins or more public images (e.g. varied_faces).")
    lo, hi = float(stats.min()), float(stats.max())
    if bins > 1 and hi - lo <= 1e-12:
        raise ValueError(f"public_images all have the same brightness ({lo:.6g}): the statistic is degenerate and cannot be cut into {bins} bins; use varied public images, or bins=1.")
    levels = np.arange(1, bins) / bins
    inner = np.quantile(stats, levels) if bins > 1 else np.zeros(0)
    thresholds = np.concatenate([[lo - max(hi - lo, 1.0)], inner])
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError(f"public_images have too few distinct brightness values ({len(np.unique(stats))}) for bins={bins} strictly increasing thresholds; use fewer bins or more public images.")
    return torch.tensor(thresholds, dtype=torch.float32)


def imprint_model(model: nn.Module, input_shape: Sequence[int], thresholds: torch.Tensor, decoder_scale: float = 1e-2, seed: int = 0) -> PlantedModel:
    """Fowl et al.'s malicious model: ``model`` behind an imprint layer of one neuron per
    threshold (:func:`imprint_thresholds`). Every row measures the mean brightness (all entries
    ``1/d``) and neuron ``i`` has bias ``-c_i``. The result is a :class:`PlantedModel`; a client
    that trains it shares a gradient whose first two entries hold its images
    (:func:`imprint_recover`). Explained in chapter 7 of the book."""
    if not isinstance(thresholds, torch.Tensor) or thresholds.dim() != 1 or thresholds.numel() == 0:
        raise ValueError(f"thresholds must be a 1-D tensor with one entry per bin (from imprint_thresholds), got {getattr(thresholds, 'shape', type(thresholds).__name__)}.")
    check_finite_tensors("thresholds", thresholds)
    if bool((thresholds.diff() <= 0).any()):
        raise ValueError("thresholds must be strictly increasing (c_1 < c_2 < ...); build them with imprint_thresholds.")
    d = math.prod(_check_input_shape(input_shape))
    weight = torch.full((thresholds.numel(), d), 1.0 / d)
    return PlantedModel(model, input_shape, weight, -thresholds.float(), decoder_scale=decoder_scale, seed=seed)


def _front_gradients(model: PlantedModel, gradients: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, PlantedModel):
        raise TypeError(f"model must be the PlantedModel the server sent (imprint_model or trap_model), got {type(model).__name__}.")
    params = list(model.parameters())
    if isinstance(gradients, torch.Tensor) or not isinstance(gradients, Sequence) or len(gradients) != len(params):
        raise ValueError(f"gradients must be a list with one tensor per parameter of the planted model ({len(params)}), got {len(gradients) if isinstance(gradients, Sequence) else type(gradients).__name__}; pass the client's whole update, e.g. client_gradient(model, x, y).")
    for i, (g, p) in enumerate(zip(gradients, params)):
        if not isinstance(g, torch.Tensor) or g.shape != p.shape:
            raise ValueError(f"gradients[{i}] must have shape {tuple(p.shape)} like the planted model's parameter, got {_describe(g)}.")
    check_finite_tensors("gradients", gradients[:2])
    return gradients[0].detach().double(), gradients[1].detach().double()


def imprint_recover(model: PlantedModel, gradients: Sequence[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """The images a gradient of :func:`imprint_model`'s model gives away: one per non-empty bin,
    ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})`` (and ``dW_k / db_k`` for the top bin), in order of
    brightness, shape ``(M, *input_shape)``. A bin counts as empty when its bias difference is below
    ``tol`` times the largest bias gradient. A bin with one image gives it exactly; a bin with
    several gives a weighted mix of them. Works on a FedSGD gradient (the difference ``W_0 -
    W_1`` of one local step is ``lr`` times it: same quotients).
    Explained in chapter 7 of the book."""
    dw, db = _front_gradients(model, gradients)
    tol = check_number("tol", tol, low=0.0)
    dw_bins = torch.cat([dw[:-1] - dw[1:], dw[-1:]])
    db_bins = torch.cat([db[:-1] - db[1:], db[-1:]])
    scale = float(db.abs().max())
    full = db_bins.abs() > tol * scale if scale > 0 else torch.zeros_like(db_bins, dtype=torch.bool)
    images = dw_bins[full] / db_bins[full, None]
    return images.float().view(-1, *model.input_shape)


def expected_recovered_fraction(batch_size: int, bins: int | None = None, probabilities: Sequence[float] | None = None) -> float:
    """The expected fraction of a batch recovered exactly: an image is recovered when no other
    image of the batch falls in its bin. With images drawn independently and bin probabilities
    ``p_j`` (summing to at most 1; what is left is the dead region below ``c_1``, where nothing
    is recovered), the fraction is ``sum_j p_j (1 - p_j)^(B-1)``. With ``k`` equally likely bins
    (``bins=k``: :func:`imprint_thresholds`' quantiles ``(i-1)/k``) it is ``(1 - 1/k)^(B-1)``.
    Pass exactly one of ``bins`` and ``probabilities``. Explained in chapter 7 of the book."""
    b = check_positive_int("batch_size", batch_size)
    if (bins is None) == (probabilities is None):
        raise ValueError("pass exactly one of bins (k equally likely bins) and probabilities (one per bin).")
    if bins is not None:
        k = check_positive_int("bins", bins, hint="It is the number of imprint bins, e.g. 64.")
        return (1.0 - 1.0 / k) ** (b - 1)
    if isinstance(probabilities, torch.Tensor):
        probabilities = probabilities.detach().cpu().flatten().tolist() if probabilities.dim() <= 1 else probabilities
    if isinstance(probabilities, (str, bytes, dict)) or not isinstance(probabilities, Sequence):
        raise TypeError(f"probabilities must be a list (or 1-D tensor) of bin probabilities, one per bin, got {_describe(probabilities)}.")
    p = np.asarray([check_number("probabilities entries", q, low=0.0, high=1.0) for q in probabilities], dtype=float)
    if p.size == 0 or p.sum() > 1 + 1e-9:
        raise ValueError(f"probabilities must be one or more bin probabilities summing to at most 1, got {p.size} summing to {p.sum():.6g}.")
    return float(np.sum(p * (1.0 - p) ** (b - 1)))


_BAND_LIMIT = 100_000  # images per simulated measurement in closed_form_band (100 at a time: 80 MB of draws)


def closed_form_band(batch_size: int, bins: int, trials: int, level: float = 0.999, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The central ``level`` interval of the mean recovered fraction over ``trials`` batches of
    ``batch_size`` images when the ``bins`` bins are exactly equally likely: where a measurement
    lands if the closed form (:func:`expected_recovered_fraction`) holds, so that a measured
    fraction outside it is a real disagreement, not bad luck. Simulated with ``draws`` sets of
    ``trials`` batches (a generator seeded with ``seed``). Explained in chapter 7 of the book."""
    b, k = check_positive_int("batch_size", batch_size), check_positive_int("bins", bins)
    trials, draws = check_positive_int("trials", trials), check_positive_int("draws", draws)
    level = check_number("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    if b * trials > _BAND_LIMIT:
        raise ValueError(f"batch_size x trials = {b * trials} images per simulated measurement is more than closed_form_band simulates ({_BAND_LIMIT}); "
                         "use fewer trials, or expected_recovered_fraction alone (the band narrows as 1/sqrt(batch_size x trials)).")
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    means = []
    for start in range(0, draws, 100):  # in chunks: (100, trials, bins) counts at a time
        n = min(100, draws - start)
        which = torch.randint(0, k, (n, trials, b), generator=gen)
        counts = torch.zeros(n, trials, k).scatter_add_(2, which, torch.ones(n, trials, b))
        means.append((counts.gather(2, which) == 1).double().mean((1, 2)))
    q = torch.quantile(torch.cat(means), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(q[0]), float(q[1])


def best_psnr(recovered: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """For each image of ``batch``, the PSNR (dB, peak 1: pixels in [0, 1]) of the recovered
    image closest to it, shape (N,); ``-inf`` when nothing was recovered. Distances are computed
    in float64 without the matrix-product shortcut, so exact recoveries read as exact.
    Explained in chapter 7 of the book."""
    if not isinstance(batch, torch.Tensor) or batch.dim() < 2 or len(batch) == 0:
        raise ValueError(f"batch must be the client's images as a tensor (N, C, H, W) with N >= 1, got {_describe(batch)}.")
    check_unit_range("batch", batch)
    if not isinstance(recovered, torch.Tensor) or (recovered.numel() and (recovered.dim() != batch.dim() or recovered.shape[1:] != batch.shape[1:])):
        raise ValueError(f"recovered must be a tensor of shape (M, {', '.join(map(str, batch.shape[1:]))}) like the batch's images, got {_describe(recovered)}.")
    if recovered.numel() == 0:
        return torch.full((len(batch),), -math.inf, dtype=torch.float64)
    check_finite_tensors("recovered", recovered)
    a, b = recovered.double().flatten(1), batch.double().flatten(1)
    dist = torch.cdist(b, a, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    mse = dist.amin(1).pow(2) / a.shape[1]
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-30))


def exact_matches(recovered: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Which images of ``batch`` some recovered image reproduces exactly, PSNR >= 60 dB
    (:func:`best_psnr`; a max absolute error <= 1e-4 means PSNR >= 80 dB, so it passes too): a
    boolean tensor of shape (N,). The recovered fraction is its mean.
    Explained in chapter 7 of the book."""
    return best_psnr(recovered, batch) >= EXACT_PSNR


def recovery_fractions(model: nn.Module, recover: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor], batch_size: int, trials: int, num_classes: int = 10, seed: int = 100) -> torch.Tensor:
    """The fraction of each of ``trials`` client batches that ``recover`` (e.g.
    :func:`imprint_recover` or :func:`dlgkit.attacks.trap.trap_recover`) gets back exactly
    (:func:`exact_matches`) from the FedSGD gradient of ``model``, shape ``(trials,)``. Batch ``t``
    is ``varied_faces(batch_size, seed=seed + t)`` with labels drawn uniformly from
    ``num_classes`` (generator seed ``t``). Explained in chapter 7 of the book."""
    from dlgkit.federated import client_gradient

    if not isinstance(model, nn.Module) or not callable(recover):
        raise TypeError(f"model must be a torch.nn.Module and recover a function (model, gradients) -> images, got {type(model).__name__} and {type(recover).__name__}.")
    b, trials = check_positive_int("batch_size", batch_size), check_positive_int("trials", trials)
    classes, seed = check_positive_int("num_classes", num_classes), check_seed("seed", seed)
    out = []
    for t in range(trials):
        batch = varied_faces(b, seed=seed + t)
        labels = torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(t))
        recovered = recover(model, client_gradient(model, batch, labels))
        if not isinstance(recovered, torch.Tensor) or recovered.dim() != batch.dim() or (recovered.numel() and recovered.shape[1:] != batch.shape[1:]):
            raise ValueError(f"recover must return the recovered images as a tensor (M, {', '.join(map(str, batch.shape[1:]))}), got {_describe(recovered)}.")
        out.append(float(exact_matches(recovered, batch).double().mean()))
    return torch.tensor(out, dtype=torch.float64)
