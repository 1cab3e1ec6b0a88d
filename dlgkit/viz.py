"""Figures and widgets: originals beside reconstructions, the paper's iteration strip, and a
scrubber that steps through the attack's iterations.

The scrubber links an ipywidgets ``Play`` button and slider to a ``Stack`` of images in the
browser (``jslink``), so it keeps working in the static HTML book where no kernel runs.
ipywidgets 7 (long shipped by Colab) has no ``Stack``; there the scrubber falls back to a
slider whose Python callback swaps the picture, which works wherever a kernel runs.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["glue", "to_numpy_image", "image_grid", "show_pairs", "iteration_strip", "scrubber", "scrubber_mode", "png_bytes", "text_scrubber"]


def glue(name: str, value) -> float | int | str:
    """Record ``value`` under ``name`` for the page's prose to quote (myst-nb's
    ``{glue:text}`name:.1f``` role), so a rebuild cannot leave a stale number in the text.

    Uses myst-nb's ``glue`` (installed with the book build) without displaying anything; where
    myst-nb is absent (Colab, a plain Jupyter) it records nothing. Returns ``value``, a NumPy
    or PyTorch scalar as a plain Python number (whose text myst-nb can format).
    Defined in :doc:`/book/01_gradient_sharing`.
    """
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"glue: {name} is {value}; the prose would quote a number that is not one.")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=False)
    return value


def to_numpy_image(t: torch.Tensor) -> np.ndarray:
    """A (C, H, W) tensor in [0, 1] as an H x W (grey) or H x W x 3 array for matplotlib."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] not in (1, 3):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"expected one image as a (1|3, H, W) tensor, got {shape}.")
    a = t.detach().float().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def image_grid(images: torch.Tensor, columns: int | None = None, pad: int = 1) -> torch.Tensor:
    """Tile an (N, C, H, W) batch into one (C, H', W') image, ``columns`` per row (default N)."""
    if images.dim() != 4:
        raise ValueError(f"image_grid expects (N, C, H, W), got {tuple(images.shape)}.")
    n, c, h, w = images.shape
    columns = columns or n
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + pad) - pad, columns * (w + pad) - pad)
    for k in range(n):
        r, col = divmod(k, columns)
        grid[:, r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = images[k].detach().clamp(0, 1).cpu()
    return grid


def _imshow(ax, t: torch.Tensor, title: str | None = None) -> None:
    ax.imshow(to_numpy_image(t), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def show_pairs(originals: torch.Tensor, reconstructions: torch.Tensor, titles: Sequence[str] | None = None, size: float = 1.6):
    """Originals (top row) above reconstructions (bottom row); ``titles`` label the columns
    (for example PSNR values). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    if originals.shape != reconstructions.shape or originals.dim() != 4:
        raise ValueError(f"show_pairs needs two (N, C, H, W) batches of equal shape, got {tuple(originals.shape)} and {tuple(reconstructions.shape)}.")
    n = originals.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images.")
    fig, axes = plt.subplots(2, n, figsize=(size * n + 0.8, size * 2), squeeze=False)
    for k in range(n):
        _imshow(axes[0, k], originals[k])
        _imshow(axes[1, k], reconstructions[k], titles[k] if titles else None)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("recovered")
    fig.tight_layout()
    return fig


def iteration_strip(history: Sequence[torch.Tensor], iters: Sequence[int], every: int | None = None, original: torch.Tensor | None = None, size: float = 1.3, max_frames: int = 10):
    """The DLG paper's figure: snapshots at iter=0, 10, 20, ... side by side, ground truth last.

    ``history``/``iters`` come from an :class:`~dlgkit.attacks.image.AttackResult`. ``every`` keeps
    snapshots whose iteration is a multiple of it (default: at most ``max_frames`` evenly
    spaced, always the last). A batch is shown one row per image.
    """
    import matplotlib.pyplot as plt

    if len(history) == 0 or len(history) != len(iters):
        raise ValueError(f"history ({len(history)} snapshots) and iters ({len(iters)}) must be non-empty and of equal length.")
    chosen = list(range(len(iters)))
    if every is not None:
        chosen = [k for k in chosen if iters[k] % every == 0]
    if len(chosen) > max_frames:
        step = (len(chosen) - 1) / (max_frames - 1)
        chosen = sorted({chosen[round(j * step)] for j in range(max_frames)})
    if chosen[-1] != len(iters) - 1:
        chosen.append(len(iters) - 1)
    rows = history[0].shape[0]
    cols = len(chosen) + (original is not None)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False)
    for j, k in enumerate(chosen):
        for r in range(rows):
            _imshow(axes[r, j], history[k][r], f"iter={iters[k]}" if r == 0 else None)
    if original is not None:
        for r in range(rows):
            _imshow(axes[r, -1], original[r], "ground truth" if r == 0 else None)
    fig.tight_layout()
    return fig


def png_bytes(t: torch.Tensor, scale: int = 4) -> bytes:
    """Encode a (C, H, W) image in [0, 1] as PNG bytes, enlarged ``scale`` times (nearest)."""
    from PIL import Image

    a = (to_numpy_image(t) * 255).round().astype(np.uint8)
    img = Image.fromarray(a)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def scrubber_mode() -> str:
    """``"stack"`` on ipywidgets >= 8 (browser-side linking), ``"callback"`` otherwise."""
    import ipywidgets

    major = int(str(ipywidgets.__version__).split(".")[0])
    return "stack" if major >= 8 and hasattr(ipywidgets, "Stack") else "callback"


def scrubber(history: Sequence[torch.Tensor], iters: Sequence[int], scale: int = 4, interval: int = 300, mode: str = "auto", columns: int | None = None, captions: Sequence[str] | None = None):
    """A Play button and slider that step through the reconstruction's snapshots.

    ``history`` holds (N, C, H, W) snapshots (a batch becomes one tiled frame, ``columns``
    wide); ``iters`` their iteration numbers. ``mode="auto"`` picks :func:`scrubber_mode`;
    ``"stack"`` and ``"callback"`` force a path. Returns an ``ipywidgets.VBox`` with the
    attributes ``slider``, ``play``, ``mode`` and ``links`` (the browser-side links).
    ``captions`` (HTML, one per snapshot) replace the default ``iter=k`` labels, for frames that
    are not iterations (chapter 5 steps through defence strengths).
    Defined in :doc:`/book/02_single_image_dlg`.
    """
    if len(history) == 0 or len(history) != len(iters):
        raise ValueError(f"history ({len(history)} snapshots) and iters ({len(iters)}) must be non-empty and of equal length.")
    if captions is not None and len(captions) != len(history):
        raise ValueError(f"captions ({len(captions)}) must give one caption per snapshot ({len(history)}).")
    frames = [png_bytes(image_grid(h, columns=columns), scale=scale) for h in history]
    labels = list(captions) if captions is not None else [f"<b>iter={it}</b>" for it in iters]
    return _frame_scrubber(frames, labels, "image", interval, mode)


def text_scrubber(pages: Sequence[str], iters: Sequence[int], interval: int = 500, mode: str = "auto"):
    """The scrubber of :func:`scrubber` for text: ``pages`` are HTML snippets (one per
    snapshot, for example the decoded sentence with wrong tokens marked), ``iters`` their
    iteration numbers. Defined in :doc:`/book/04_text_dlg`."""
    if len(pages) == 0 or len(pages) != len(iters):
        raise ValueError(f"pages ({len(pages)}) and iters ({len(iters)}) must be non-empty and of equal length.")
    return _frame_scrubber(list(pages), [f"<b>iter={it}</b>" for it in iters], "html", interval, mode)


def _frame_scrubber(frames: list, captions: list[str], kind: str, interval: int, mode: str):
    """Play + slider over ``frames`` (PNG bytes for ``kind="image"``, HTML for ``"html"``)."""
    import ipywidgets as widgets

    if mode not in ("auto", "stack", "callback"):
        raise ValueError(f"mode={mode!r} is not known; choose 'auto', 'stack' or 'callback'.")
    if mode == "auto":
        mode = scrubber_mode()
    if mode == "stack" and not hasattr(widgets, "Stack"):
        raise RuntimeError(f"mode='stack' needs ipywidgets >= 8 (installed: {widgets.__version__}); use mode='callback'.")

    def content(frame):
        return widgets.Image(value=frame, format="png") if kind == "image" else widgets.HTML(frame)

    last = len(frames) - 1
    play = widgets.Play(value=0, min=0, max=last, step=1, interval=interval, description="play")
    slider = widgets.IntSlider(value=0, min=0, max=last, step=1, description="snapshot", readout=False, continuous_update=True)
    links = [widgets.jslink((play, "value"), (slider, "value"))]
    if mode == "stack":
        pages = [widgets.VBox([widgets.HTML(c), content(f)]) for c, f in zip(captions, frames)]
        view = widgets.Stack(pages, selected_index=0)
        links.append(widgets.jslink((slider, "value"), (view, "selected_index")))
    else:
        shown = content(frames[0])
        caption = widgets.HTML(captions[0])

        def show(change: dict) -> None:
            shown.value = frames[change["new"]]
            caption.value = captions[change["new"]]

        slider.observe(show, names="value")
        view = widgets.VBox([caption, shown])
    box = widgets.VBox([widgets.HBox([play, slider]), view])
    box.slider, box.play, box.mode, box.links = slider, play, mode, links
    return box
