import math

import pytest
import torch

from dlgkit import metrics


def test_psnr_known_value():
    a = torch.zeros(1, 8, 8)
    b = torch.full((1, 8, 8), 0.1)
    # MSE = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert math.isclose(metrics.psnr(b, a), 20.0, rel_tol=1e-6)
    assert math.isclose(metrics.mse(b, a), 0.01, rel_tol=1e-6)
    assert metrics.psnr(a, a) == 100.0


def test_batch_metrics_return_one_value_per_image():
    a = torch.rand(3, 3, 16, 16)
    b = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    p = metrics.psnr(b, a)
    s = metrics.ssim(b, a)
    assert p.shape == (3,) and s.shape == (3,)
    assert (p > 20).all() and (s < 1).all() and (s > 0.5).all()
    assert math.isclose(metrics.ssim(a[0], a[0]), 1.0, rel_tol=1e-6)


def test_ssim_on_tiny_images():
    a = torch.rand(1, 5, 5)
    assert metrics.ssim(a, a) == pytest.approx(1.0)


def test_psnr_clips_reconstruction():
    a = torch.full((1, 4, 4), 1.0)
    b = torch.full((1, 4, 4), 3.0)  # out of range, clipped to 1
    assert metrics.psnr(b, a) == 100.0


def test_label_accuracy():
    assert metrics.label_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert metrics.label_accuracy(scores, torch.tensor([1, 0])) == 1.0
    with pytest.raises(ValueError, match="predicted"):
        metrics.label_accuracy(torch.tensor([1]), torch.tensor([1, 2]))


def test_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(torch.rand(1, 4, 4), torch.rand(1, 5, 5))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        metrics.ssim(torch.rand(4, 4), torch.rand(4, 4))
    with pytest.raises(TypeError, match="torch tensor"):
        metrics.mse([1.0], torch.rand(1, 1, 1))
