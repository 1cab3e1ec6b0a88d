"""Image, label and text metrics (PSNR and SSIM through scikit-image, ROUGE through
``rouge-score``, not hand-written).

All image metrics take tensors of shape (C, H, W) or (N, C, H, W) with values in [0, 1]
(``data_range=1``). Batch versions return one value per image. The original must be a clean
image in [0, 1] (NaN, inf or 0-255 values are an error); a reconstruction with NaN or inf
pixels (a diverged attack) scores NaN, never a success.
Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import numpy as np
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from dlgkit.checks import check_choice, check_class_indices, check_unit_range

__all__ = ["mse", "psnr", "ssim", "label_accuracy", "multiset_label_accuracy", "align", "batch_report", "token_accuracy", "rouge", "align_texts", "text_report", "UnicodeTokenizer"]


def _pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 arrays (N, C, H, W). The original must be a clean image in [0, 1]
    (a NaN or a 0-255 original is a bug in the caller's data); the reconstruction may hold
    anything a diverged attack produces, and its non-finite images score NaN."""
    for name, t in (("reconstruction", a), ("original", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}.")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must have shape (C, H, W) or (N, C, H, W), got {tuple(t.shape)}.")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: reconstruction {tuple(a.shape)} vs original {tuple(b.shape)}.")
    if a.numel() == 0:
        raise ValueError(f"the images are empty (shape {tuple(a.shape)}): pass at least one image with at least one pixel.")
    if not a.is_floating_point():
        raise ValueError(f"reconstruction must be a floating-point image in [0, 1], got dtype {a.dtype}; for 0-255 integers pass x.float() / 255.")
    check_unit_range("original", b.detach())
    a4 = a.detach().float().cpu().reshape(-1, *a.shape[-3:]).numpy().astype(np.float64)
    b4 = b.detach().float().cpu().reshape(-1, *b.shape[-3:]).numpy().astype(np.float64)
    return a4, b4


def _per_image(fn, a: np.ndarray, b: np.ndarray, single: bool) -> float | torch.Tensor:
    """``fn(reconstruction, original)`` for each image; NaN where the reconstruction is not finite
    (a diverged attack never scores as a success)."""
    values = [fn(x, y) if np.isfinite(x).all() else float("nan") for x, y in zip(a, b)]
    return values[0] if single else torch.tensor(values)


def mse(reconstruction: torch.Tensor, original: torch.Tensor) -> float | torch.Tensor:
    """Mean squared error per image (a float for one image, a tensor for a batch); NaN for a
    reconstruction with NaN or inf pixels."""
    a, b = _pairs(reconstruction, original)
    return _per_image(lambda x, y: float(mean_squared_error(x, y)), a, b, reconstruction.dim() == 3)


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float | torch.Tensor:
    """Peak signal-to-noise ratio in dB (data range 1), clipping the reconstruction to [0, 1].

    A perfect copy would be infinite; we cap at 100 dB so that means and plots stay finite. A
    reconstruction with NaN or inf pixels scores NaN; an original outside [0, 1] is an error.
    """

    def one(x: np.ndarray, y: np.ndarray) -> float:
        x = np.clip(x, 0.0, 1.0)
        return 100.0 if np.array_equal(x, y) else min(100.0, float(peak_signal_noise_ratio(y, x, data_range=1.0)))

    a, b = _pairs(reconstruction, original)
    return _per_image(one, a, b, reconstruction.dim() == 3)


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> float | torch.Tensor:
    """Structural similarity (scikit-image, data range 1, 7x7 window or the largest odd window
    that fits small images), clipping the reconstruction to [0, 1]; NaN for a reconstruction
    with NaN or inf pixels. Images need at least 3x3 pixels."""
    a, b = _pairs(reconstruction, original)
    side = min(a.shape[-2:])
    if side < 3:
        raise ValueError(f"ssim needs images of at least 3x3 pixels (its smallest window), got {a.shape[-2]}x{a.shape[-1]}; use psnr or mse for smaller images.")
    win = min(7, side if side % 2 else side - 1)
    return _per_image(
        lambda x, y: float(structural_similarity(y, np.clip(x, 0, 1), data_range=1.0, channel_axis=0, win_size=win)), a, b, reconstruction.dim() == 3
    )


def _predicted_labels(predicted: object) -> torch.Tensor | None:
    """Predicted class indices from indices (N,) or scores (N, K); None when they hold NaN/inf
    (a diverged attack's labels, which score NaN rather than a lucky argmax)."""
    t = torch.as_tensor(predicted).detach().cpu()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return None
    if t.dim() == 2:
        return t.argmax(dim=-1)
    return check_class_indices("predicted", t)


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of positions where the predicted class equals the true one.

    ``predicted`` may be class indices (N,) or scores (N, K), in which case the argmax is taken;
    NaN when ``predicted`` holds NaN or inf. Labels must be whole numbers (3.7 is an error,
    never read as 3).
    """
    pred, true = _predicted_labels(predicted), check_class_indices("true", true)
    n = true.numel() if pred is None else pred.numel()
    if n != true.numel():
        raise ValueError(f"label_accuracy: {n} predicted labels vs {true.numel()} true labels.")
    if true.numel() == 0:
        raise ValueError("label_accuracy: no labels given.")
    return float("nan") if pred is None else float((pred == true).float().mean())


def multiset_label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Order-free label accuracy for a batch: the size of the multiset intersection of the two
    label lists divided by the batch size (``[1, 1, 2]`` vs ``[1, 2, 2]`` scores 2/3).
    Defined in :doc:`/book/03_batched_dlg`."""
    from collections import Counter

    predicted, true = check_class_indices("predicted", predicted), check_class_indices("true", true)
    if predicted.numel() != true.numel() or true.numel() == 0:
        raise ValueError(f"multiset_label_accuracy: {predicted.numel()} predicted vs {true.numel()} true labels (need equal, non-zero).")
    common = Counter(predicted.tolist()) & Counter(true.tolist())
    return sum(common.values()) / true.numel()


COSTS = ("mse", "ssim")


def align(reconstruction: torch.Tensor, original: torch.Tensor, cost: str = "mse") -> torch.Tensor:
    """Match reconstructed images to originals (the gradient does not keep the batch order).

    Builds the B x B cost matrix (MSE, or 1 - SSIM) between every reconstruction and every
    original and solves the assignment with scipy's ``linear_sum_assignment`` (Hungarian
    method). Returns ``perm`` such that ``reconstruction[perm[j]]`` is matched to
    ``original[j]``. A reconstruction with NaN or inf pixels costs more than any finite one,
    so it takes what is left (and scores NaN in :func:`batch_report`).
    Defined in :doc:`/book/03_batched_dlg`.
    """
    from scipy.optimize import linear_sum_assignment

    check_choice("cost", cost, COSTS)
    a, b = _pairs(reconstruction, original)
    if reconstruction.dim() != 4 or len(a) != len(b):
        raise ValueError("align needs two batches (N, C, H, W) of the same size.")
    n = len(a)
    rec = torch.from_numpy(np.clip(a, 0, 1))
    orig = torch.from_numpy(b)
    matrix = np.zeros((n, n))
    for i in range(n):
        if cost == "mse":
            matrix[i] = ((rec[i : i + 1] - orig) ** 2).flatten(1).mean(1).numpy()
        else:
            matrix[i] = 1.0 - ssim(rec[i : i + 1].expand_as(orig), orig).numpy()
    finite = np.isfinite(matrix)
    matrix[~finite] = (matrix[finite].max() if finite.any() else 0.0) + 1.0
    rows, cols = linear_sum_assignment(matrix)
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm)


def batch_report(
    reconstruction: torch.Tensor, original: torch.Tensor, labels: torch.Tensor | None = None, true_labels: torch.Tensor | None = None, cost: str = "mse"
) -> dict:
    """Metrics of a batch reconstruction after alignment: per-image and mean PSNR/SSIM/MSE,
    the permutation used, and, with labels, the label accuracy of the aligned pairs and the
    order-free (multiset) label accuracy. Images with NaN or inf pixels score NaN, and so do the
    means. Defined in :doc:`/book/03_batched_dlg`."""
    if not isinstance(reconstruction, torch.Tensor) or reconstruction.dim() != 4:
        shape = tuple(reconstruction.shape) if isinstance(reconstruction, torch.Tensor) else type(reconstruction).__name__
        raise ValueError(f"batch_report expects (N, C, H, W) batches, got {shape}.")
    if (labels is None) != (true_labels is None):
        raise ValueError("batch_report scores labels only with both labels and true_labels; pass both (or neither).")
    perm = align(reconstruction, original, cost=cost)
    aligned = reconstruction.detach().cpu()[perm]
    per_psnr, per_ssim, per_mse = psnr(aligned, original), ssim(aligned, original), mse(aligned, original)
    out = {
        "perm": perm,
        "psnr_per_image": per_psnr,
        "ssim_per_image": per_ssim,
        "psnr": float(per_psnr.mean()),
        "ssim": float(per_ssim.mean()),
        "mse": float(per_mse.mean()),
    }
    if labels is not None and true_labels is not None:
        labels = torch.as_tensor(labels).detach().cpu()
        labels = labels if labels.dim() == 2 else labels.reshape(-1)
        out["label_accuracy"] = label_accuracy(labels[perm], true_labels)
        pred = _predicted_labels(labels)
        out["label_set_accuracy"] = float("nan") if pred is None else multiset_label_accuracy(pred, true_labels)
    return out


# --- text ------------------------------------------------------------------------------------


def _id_list(ids: torch.Tensor | Sequence[int], what: str) -> list[int]:
    if isinstance(ids, str):
        raise TypeError(f"{what} must be token ids, not a string; tokenise it first.")
    return check_class_indices(what, ids if isinstance(ids, torch.Tensor) else list(ids)).tolist()


def token_accuracy(predicted: torch.Tensor | Sequence[int], truth: torch.Tensor | Sequence[int], ignore: Sequence[int] = ()) -> float:
    """Fraction of the true sequence's positions whose token is recovered at that position
    (positions holding a token id in ``ignore``, such as [CLS] and [SEP], are left out).
    Defined in :doc:`/book/04_text_dlg`."""
    pred, true = _id_list(predicted, "predicted"), _id_list(truth, "truth")
    keep = [p for p, t in enumerate(true) if t not in set(ignore)]
    if not keep:
        raise ValueError("the true sequence has no token left to score.")
    return sum(p < len(pred) and pred[p] == true[p] for p in keep) / len(keep)


class UnicodeTokenizer:
    """ROUGE's tokenizer for any script: NFKC-normalised, case-folded runs of letters and digits
    (so "café" stays one word, not "caf"), and each Chinese/Japanese character as a token of
    its own (those scripts write no spaces; character-level ROUGE is their usual choice). On
    plain English it gives the same tokens as rouge-score's default tokenizer without stemming.
    Defined in :doc:`/book/04_text_dlg`."""

    _CJK = r"\u2e80-\u2fdf\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
    _TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def rouge(predicted: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of one text against a reference
    (``rouge-score``, stemming off, with :class:`UnicodeTokenizer` so that accented, Chinese and
    other non-ASCII words count). Defined in :doc:`/book/04_text_dlg`."""
    from rouge_score import rouge_scorer

    if not isinstance(predicted, str) or not isinstance(reference, str):
        raise TypeError("rouge compares two strings; decode token ids first (TextModel.decode).")
    if not UnicodeTokenizer().tokenize(reference):
        raise ValueError(f"the reference {reference!r} has no word to score against; pass the original text.")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer())
    scores = scorer.score(reference, predicted)
    return {k: float(v.fmeasure) for k, v in scores.items()}


def align_texts(predicted: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """Match a batch of recovered sentences to the originals (Hungarian method on 1 - mean of
    ROUGE-1 and ROUGE-2). Returns ``perm`` with ``predicted[perm[j]]`` matched to
    ``references[j]``."""
    from scipy.optimize import linear_sum_assignment

    if len(predicted) != len(references) or not references:
        raise ValueError(f"align_texts needs two non-empty lists of equal length, got {len(predicted)} and {len(references)}.")
    n = len(references)
    cost = np.zeros((n, n))
    for i, p in enumerate(predicted):
        for j, r in enumerate(references):
            s = rouge(p, r)
            cost[i, j] = 1 - (s["rouge1"] + s["rouge2"]) / 2
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(n, dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm)


def text_report(predicted: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE-1/2/L and exact match of a batch of recovered sentences after alignment,
    per sentence and as means. Defined in :doc:`/book/04_text_dlg`."""
    if isinstance(predicted, str) or isinstance(references, str):
        predicted, references = [predicted], [references]  # type: ignore[list-item]
    perm = align_texts(predicted, references)
    rows = [rouge(predicted[int(perm[j])], r) | {"exact": float(predicted[int(perm[j])].strip() == r.strip())} for j, r in enumerate(references)]
    out = {k: float(np.mean([row[k] for row in rows])) for k in ("rouge1", "rouge2", "rougeL", "exact")}
    out["per_sentence"] = rows
    out["perm"] = perm
    return out
