"""Accessibility of dlgkit's figures: readable in greyscale (nothing is encoded in hue alone)."""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from dlgkit import viz


def _grey_figures():
    originals, recs = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    history = [torch.rand(2, 1, 8, 8) for _ in range(4)]
    yield viz.show_pairs(originals, recs, titles=["a", "b", "c"])
    yield viz.iteration_strip(history, [0, 10, 20, 30], original=torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("fig", list(_grey_figures()), ids=["show_pairs", "iteration_strip"])
def test_grey_images_use_a_grey_map_over_a_fixed_range(fig):
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert images, "the figure shows no image"
    for im in images:
        assert im.get_cmap().name == "gray", f"grey images must be drawn in grey, not {im.get_cmap().name!r}"
        assert im.get_clim() == (0, 1), "a fixed [0, 1] range keeps brightness comparable across panels"
        rgb = im.get_cmap()(np.linspace(0, 1, 11))[:, :3]
        assert np.allclose(rgb[:, 0], rgb[:, 1]) and np.allclose(rgb[:, 1], rgb[:, 2]), "the map has hue"
        assert np.all(np.diff(rgb[:, 0]) > 0), "brightness must grow with the pixel value"
    plt.close(fig)


def test_scrubber_frames_of_grey_images_are_grey():
    png = viz.png_bytes(torch.rand(1, 8, 8), scale=2)
    assert Image.open(io.BytesIO(png)).mode == "L"
