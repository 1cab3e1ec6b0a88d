import io

import matplotlib

matplotlib.use("Agg")

import ipywidgets
import numpy as np
import pytest
import torch
from PIL import Image

from dlgkit import viz


def _history(n=4, batch=1, channels=1):
    return [torch.full((batch, channels, 8, 8), k / max(n - 1, 1)) for k in range(n)], [0, 10, 20, 30][:n]


def test_png_bytes_scaled():
    png = viz.png_bytes(torch.rand(3, 8, 8), scale=4)
    img = Image.open(io.BytesIO(png))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert Image.open(io.BytesIO(viz.png_bytes(torch.rand(1, 8, 8), scale=1))).size == (8, 8)


def test_image_grid():
    grid = viz.image_grid(torch.zeros(5, 1, 4, 4), columns=3, pad=1)
    assert grid.shape == (1, 9, 14)
    with pytest.raises(ValueError, match="image_grid"):
        viz.image_grid(torch.zeros(1, 4, 4))


def test_figures():
    originals, recs = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    fig = viz.show_pairs(originals, recs, titles=["a", "b", "c"])
    assert len(fig.axes) == 6
    history, iters = _history(4, batch=2)
    fig = viz.iteration_strip(history, iters, original=torch.rand(2, 1, 8, 8))
    assert len(fig.axes) == 2 * 5
    with pytest.raises(ValueError, match="equal shape"):
        viz.show_pairs(originals, recs[:2])
    with pytest.raises(ValueError, match="equal length"):
        viz.iteration_strip(history, iters[:2])


def test_scrubber_stack_mode_links_in_browser():
    history, iters = _history(4)
    box = viz.scrubber(history, iters, mode="stack")
    assert box.mode == "stack"
    stack = box.children[1]
    assert isinstance(stack, ipywidgets.Stack) and len(stack.children) == 4
    assert box.slider.max == 3
    # the slider drives the stack through a browser-side link, not a Python callback
    assert any(l.source == (box.slider, "value") and l.target == (stack, "selected_index") for l in box.links)
    assert any(l.source == (box.play, "value") and l.target == (box.slider, "value") for l in box.links)
    frames = [page.children[1].value for page in stack.children]
    assert len(set(frames)) == 4  # every snapshot is a different picture


def test_scrubber_callback_mode_swaps_the_image():
    history, iters = _history(4)
    box = viz.scrubber(history, iters, mode="callback")
    image = box.children[1].children[1]
    first = image.value
    box.slider.value = 3
    assert image.value != first
    assert "iter=30" in box.children[1].children[0].value
    box.slider.value = 0
    assert image.value == first


def test_scrubber_falls_back_without_stack(monkeypatch):
    """Simulate ipywidgets 7 (no Stack): auto mode must choose the kernel-side callback."""
    monkeypatch.setattr(ipywidgets, "__version__", "7.7.5")
    monkeypatch.delattr(ipywidgets, "Stack")
    assert viz.scrubber_mode() == "callback"
    history, iters = _history(3)
    box = viz.scrubber(history, iters)
    assert box.mode == "callback"
    with pytest.raises(RuntimeError, match="ipywidgets >= 8"):
        viz.scrubber(history, iters, mode="stack")


def test_scrubber_batch_and_errors():
    history, iters = _history(3, batch=4, channels=3)
    box = viz.scrubber(history, iters, mode="stack", columns=2)
    assert len(box.children[1].children) == 3
    with pytest.raises(ValueError, match="mode"):
        viz.scrubber(history, iters, mode="magic")
    with pytest.raises(ValueError, match="non-empty"):
        viz.scrubber([], [])
    with pytest.raises(ValueError, match=r"\(1\|3, H, W\)"):
        viz.to_numpy_image(torch.rand(2, 8, 8))


def test_scrubber_captions_replace_iteration_labels():
    frames = [torch.rand(2, 1, 8, 8) for _ in range(3)]
    box = viz.scrubber(frames, [0, 1, 2], mode="callback", captions=["<b>a</b>", "<b>b</b>", "<b>c</b>"])
    box.slider.value = 2
    assert box.children[1].children[0].value == "<b>c</b>"
    with pytest.raises(ValueError, match="one caption per snapshot"):
        viz.scrubber(frames, [0, 1, 2], captions=["x"])


def test_scrubber_shows_the_original_and_each_frames_distance_and_psnr():
    history, iters = _history(3)  # grey frames at 0, 0.5, 1 (iterations 0, 10, 20)
    original = torch.ones(1, 1, 8, 8)
    losses = [float(k + 1) for k in range(20)]  # the distance after iteration k + 1 is k + 1
    for mode in ("stack", "callback"):
        box = viz.scrubber(history, iters, mode=mode, original=original, losses=losses, scale=1)
        if mode == "stack":
            pages = box.children[1].children
            captions = [page.children[0].value for page in pages]
            images = [Image.open(io.BytesIO(page.children[1].value)) for page in pages]
        else:
            caption, image = box.children[1].children
            captions, images = [], []
            for k in range(3):
                box.slider.value = k
                captions.append(caption.value)
                images.append(Image.open(io.BytesIO(image.value)))
        # each frame: the 8-pixel dummy, a white gap, then the original (all ones)
        assert all(img.size[0] > 16 and img.size[1] == 8 for img in images)
        for k, img in enumerate(images):
            pixels = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32)) / 255
            assert torch.allclose(pixels[:, :8], torch.full((8, 8), k / 2), atol=1 / 255)  # the dummy, left
            assert torch.allclose(pixels[:, -8:], torch.ones(8, 8))  # the original, right
        assert "gradient distance: starting noise" in captions[0]
        assert "gradient distance 1.00e+01" in captions[1] and "gradient distance 2.00e+01" in captions[2]
        # PSNR of 0.5 against 1 is 10 log10(1 / 0.25) = 6.0 dB; the last frame equals the original
        assert "PSNR 0.0 dB" in captions[0] and "PSNR 6.0 dB" in captions[1] and "PSNR 100.0 dB" in captions[2]
        assert all("iter=" in c and "original (right)" in c for c in captions)
    with pytest.raises(ValueError, match="original has shape"):
        viz.scrubber(history, iters, original=torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="losses has 5 entries"):
        viz.scrubber(history, iters, losses=[1.0] * 5)


def test_glue_records_plain_numbers_for_the_prose(monkeypatch):
    recorded = {}
    import myst_nb

    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: recorded.update({name: (value, display)}))
    assert viz.glue("psnr", np.float64(31.25)) == 31.25
    assert viz.glue("rate", torch.tensor(0.5)) == 0.5
    assert recorded == {"psnr": (31.25, False), "rate": (0.5, False)}
    assert type(recorded["psnr"][0]) is float and f"{recorded['psnr'][0]!r}" == "31.25"  # text myst-nb can format
    with pytest.raises(ValueError, match="psnr is nan"):
        viz.glue("psnr", float("nan"))


def test_iteration_strip_is_evenly_spaced_and_ends_where_the_attack_stopped():
    history = [torch.rand(1, 1, 4, 4) for _ in range(14)]
    iters = list(range(14))  # a run that stopped after 13 iterations, a snapshot each
    fig = viz.iteration_strip(history, iters, max_frames=8)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["iter=0", "iter=2", "iter=4", "iter=6", "iter=8", "iter=10", "iter=12", "iter=13"]
    fig = viz.iteration_strip(history[:11], [10 * k for k in range(11)], max_frames=8)
    assert [ax.get_title() for ax in fig.axes] == ["iter=0", "iter=20", "iter=40", "iter=60", "iter=80", "iter=100"]
    fig = viz.iteration_strip(history, iters, every=5)
    assert [ax.get_title() for ax in fig.axes] == ["iter=0", "iter=5", "iter=10", "iter=13"]
