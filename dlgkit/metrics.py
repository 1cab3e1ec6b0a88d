"""Image and label metrics (PSNR and SSIM through scikit-image, not hand-written).

All image metrics take tensors of shape (C, H, W) or (N, C, H, W) with values in [0, 1]
(``data_range=1``). Batch versions return one value per image.
Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

__all__ = ["mse", "psnr", "ssim", "label_accuracy"]


def _pairs(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    for name, t in (("reconstruction", a), ("original", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}.")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must have shape (C, H, W) or (N, C, H, W), got {tuple(t.shape)}.")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: reconstruction {tuple(a.shape)} vs original {tuple(b.shape)}.")
    a4 = a.detach().float().cpu().reshape(-1, *a.shape[-3:]).numpy().astype(np.float64)
    b4 = b.detach().float().cpu().reshape(-1, *b.shape[-3:]).numpy().astype(np.float64)
    return a4, b4


def _result(values: list[float], single: bool) -> float | torch.Tensor:
    return values[0] if single else torch.tensor(values)


def mse(reconstruction: torch.Tensor, original: torch.Tensor) -> float | torch.Tensor:
    """Mean squared error per image (a float for one image, a tensor for a batch)."""
    a, b = _pairs(reconstruction, original)
    return _result([float(mean_squared_error(x, y)) for x, y in zip(a, b)], reconstruction.dim() == 3)


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float | torch.Tensor:
    """Peak signal-to-noise ratio in dB (data range 1), clipping the reconstruction to [0, 1].

    A perfect copy would be infinite; we cap at 100 dB so that means and plots stay finite.
    """
    a, b = _pairs(reconstruction, original)
    values = []
    for x, y in zip(a, b):
        x = np.clip(x, 0.0, 1.0)
        values.append(100.0 if np.array_equal(x, y) else min(100.0, float(peak_signal_noise_ratio(y, x, data_range=1.0))))
    return _result(values, reconstruction.dim() == 3)


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> float | torch.Tensor:
    """Structural similarity (scikit-image, data range 1, 7x7 window or the largest odd window
    that fits small images), clipping the reconstruction to [0, 1]."""
    a, b = _pairs(reconstruction, original)
    side = min(a.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    values = [
        float(structural_similarity(y, np.clip(x, 0, 1), data_range=1.0, channel_axis=0, win_size=win))
        for x, y in zip(a, b)
    ]
    return _result(values, reconstruction.dim() == 3)


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Fraction of positions where the predicted class equals the true one.

    ``predicted`` may be class indices (N,) or scores (N, K), in which case the argmax is taken.
    """
    predicted, true = torch.as_tensor(predicted), torch.as_tensor(true)
    if predicted.dim() == 2:
        predicted = predicted.argmax(dim=-1)
    predicted, true = predicted.reshape(-1), true.reshape(-1)
    if predicted.shape != true.shape:
        raise ValueError(f"label_accuracy: {predicted.numel()} predicted labels vs {true.numel()} true labels.")
    if true.numel() == 0:
        raise ValueError("label_accuracy: no labels given.")
    return float((predicted.cpu() == true.cpu()).float().mean())
