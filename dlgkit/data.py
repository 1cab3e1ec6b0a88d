"""Offline images as float tensors in [0, 1], shape (N, C, H, W), with labels.

Everything here works without a network: scikit-image ships the LFW faces and a few
photos, scikit-learn ships the digits. CIFAR and MNIST come through torchvision only when
asked for with ``download=True`` (or when already on disk).

Defined in :doc:`/book/01_gradient_sharing` and :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PHOTO_NAMES",
    "to_tensor",
    "lfw_faces",
    "photos",
    "photo_crops",
    "digits",
    "load_image",
    "torchvision_dataset",
]

#: Names of the scikit-image photos that :func:`photos` and :func:`photo_crops` use.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "retina", "colorwheel")
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST"}


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"size must be a positive int (pixels per side) or None, got {size!r}.")


def _check_count(n: int, available: int, what: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    if n > available:
        raise ValueError(f"n={n} but only {available} {what} are available.")


def to_tensor(images: np.ndarray | list[np.ndarray], size: int | None = None, grey: bool = False) -> torch.Tensor:
    """Turn HxW or HxWxC images (uint8 or float) into an (N, C, H, W) float tensor in [0, 1].

    Images are centre-cropped to a square and resized to ``size`` (anti-aliased) when given;
    ``grey=True`` converts colour to one channel, ``grey=False`` keeps colour (grey images get 3
    equal channels only if another image in the list has colour).
    """
    from skimage.color import gray2rgb, rgb2gray
    from skimage.transform import resize
    from skimage.util import img_as_float

    _check_size(size)
    arrays = [img_as_float(np.asarray(img)) for img in (images if isinstance(images, list) else list(images))]
    if not arrays:
        raise ValueError("to_tensor() got no images.")
    colour = any(a.ndim == 3 for a in arrays) and not grey
    out = []
    for a in arrays:
        if a.ndim == 3 and a.shape[2] == 4:
            a = a[..., :3]
        if a.ndim not in (2, 3):
            raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape}.")
        if colour and a.ndim == 2:
            a = gray2rgb(a)
        if not colour and a.ndim == 3:
            a = rgb2gray(a)
        h, w = a.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        a = a[top : top + side, left : left + side]
        if size is not None and side != size:
            a = resize(a, (size, size), anti_aliasing=side > size, preserve_range=True)
        a = np.clip(a, 0.0, 1.0)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).float()


def _labels(n: int, num_classes: int | None, seed: int) -> torch.Tensor:
    if num_classes is None:
        return torch.arange(n)
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}.")
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def lfw_faces(n: int = 20, size: int | None = 32, start: int = 0, num_classes: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` faces (from index ``start``) of scikit-image's ``lfw_subset``: grey, 25x25.

    The subset has no identities, so labels are made up: the face's index (``num_classes=None``)
    or a seeded random class in ``range(num_classes)``. Returns ``(images, labels)`` with images of
    shape (n, 1, size, size) in [0, 1].
    """
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 entries are faces, the rest are not
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}.")
    _check_count(n, len(faces) - start, f"faces after start={start}")
    x = to_tensor(list(faces[start : start + n]), size=size, grey=True)
    return x, _labels(n, num_classes, seed)


def photos(names: tuple[str, ...] | list[str] | None = None, size: int | None = 32, grey: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's bundled photos (default: all of :data:`PHOTO_NAMES`), centre-cropped and
    resized to ``size``. Labels are each photo's index in :data:`PHOTO_NAMES`."""
    import skimage.data

    names = list(PHOTO_NAMES if names is None else names)
    unknown = [name for name in names if name not in PHOTO_NAMES]
    if unknown:
        raise ValueError(f"unknown photo name(s) {unknown}; choose from {list(PHOTO_NAMES)}.")
    x = to_tensor([getattr(skimage.data, name)() for name in names], size=size, grey=grey)
    return x, torch.tensor([PHOTO_NAMES.index(name) for name in names])


def photo_crops(n: int = 20, size: int = 32, scale: int = 4, seed: int = 0, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random colour crops from scikit-image's colour photos.

    Each crop covers ``size * scale`` pixels of the photo (a recognisable patch rather than
    a few pixels of texture) and is resized to ``size``. Labels are the source photo's index
    in :data:`PHOTO_NAMES` unless ``num_classes`` asks for seeded random labels.
    """
    import skimage.data

    _check_size(size)
    _check_count(n, 10**6, "crops")
    rng = np.random.default_rng(seed)
    colour = [name for name in PHOTO_NAMES if getattr(skimage.data, name)().ndim == 3]
    crops, sources = [], []
    for _ in range(n):
        name = colour[rng.integers(len(colour))]
        img = getattr(skimage.data, name)()
        side = min(size * scale, *img.shape[:2])
        top = rng.integers(img.shape[0] - side + 1)
        left = rng.integers(img.shape[1] - side + 1)
        crops.append(img[top : top + side, left : left + side, :3])
        sources.append(PHOTO_NAMES.index(name))
    x = to_tensor(crops, size=size)
    labels = torch.tensor(sources) if num_classes is None else _labels(n, num_classes, seed)
    return x, labels


def digits(n: int | None = None, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits (1797 grey 8x8 images, labels 0-9), in [0, 1].

    ``n`` keeps the first n; ``size`` resizes (for example to 16 or 32 for LeNet).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images / 16.0
    if n is not None:
        _check_count(n, len(images), "digits")
        images = images[:n]
    _check_size(size)
    x = torch.from_numpy(images[:, None]).float()
    if size is not None and size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(bunch.target[: len(x)]).long()


def load_image(path: str | Path, size: int | None = 32, grey: bool = False) -> torch.Tensor:
    """Any image file (PNG, JPEG, ...) as a (1, C, size, size) tensor, like the paper's ``--image``."""
    from skimage.io import imread

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_image: no file at {str(path)!r}.")
    try:
        img = imread(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with a clear message
        raise ValueError(f"load_image: could not read {str(path)!r} as an image ({exc}).") from exc
    return to_tensor([img], size=size, grey=grey)


def torchvision_dataset(
    name: str, n: int = 8, size: int | None = 32, root: str | Path = "~/.cache/dlgkit", download: bool = False, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of CIFAR-10, CIFAR-100 or MNIST via torchvision (needs the network
    the first time: pass ``download=True``; offline, use :func:`lfw_faces` or :func:`photos`)."""
    key = name.lower().replace("-", "")
    if key not in _TORCHVISION:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_TORCHVISION)}.")
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError("torchvision_dataset needs torchvision: pip install torchvision") from exc
    root = Path(root).expanduser()
    cls = getattr(torchvision.datasets, _TORCHVISION[key])
    try:
        dataset = cls(root=str(root), train=train, download=download)
    except RuntimeError as exc:
        hint = "pass download=True (needs internet)" if not download else "check your internet connection"
        raise RuntimeError(
            f"{name} is not available under {root} and could not be loaded ({exc}); {hint}, "
            "or use the offline sets dlgkit.data.lfw_faces / photos / digits."
        ) from exc
    except OSError as exc:  # URLError and socket errors are OSErrors
        raise RuntimeError(
            f"downloading {name} failed ({exc}). You appear to be offline; use the offline sets "
            "dlgkit.data.lfw_faces / photos / digits instead."
        ) from exc
    _check_count(n, len(dataset), f"images in {name}")
    images = [np.asarray(dataset[i][0]) for i in range(n)]
    labels = torch.tensor([int(dataset[i][1]) for i in range(n)])
    return to_tensor(images, size=size, grey=key == "mnist"), labels
