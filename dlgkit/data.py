"""Offline images as float tensors in [0, 1], shape (N, C, H, W), with labels.

Everything here works without a network: scikit-image ships the LFW faces and a few
photos, scikit-learn ships the digits. CIFAR and MNIST come through torchvision only when
asked for with ``download=True`` (or when already on disk).

Defined in :doc:`/book/01_gradient_sharing` and :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dlgkit.checks import check_nonnegative_int, check_positive_int, check_seed, check_unit_range

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


def _check_size(size: int | None) -> int | None:
    return check_positive_int("size", size, allow_none=True, hint="Pass the pixels per side, or None for the native size.")


def _check_count(n: int, available: int, what: str) -> int:
    n = check_positive_int("n", n)
    if n > available:
        raise ValueError(f"n={n} but only {available} {what} are available.")
    return n


def _path(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file system path (str or pathlib.Path), got {type(value).__name__}.")
    return Path(value)


def _unit_float(a: np.ndarray, where: str) -> np.ndarray:
    """One image as float64 in [0, 1]. uint8 and uint16 are scaled by their dtype's range (255,
    65535), bool maps to 0/1, floats must already lie in [0, 1]; other integer types (int64 from
    ``np.array`` of Python ints, int32, ...) say nothing about their scale and are refused."""
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    if a.dtype in (np.uint8, np.uint16):
        return a.astype(np.float64) / np.iinfo(a.dtype).max
    if np.issubdtype(a.dtype, np.integer):
        raise ValueError(
            f"{where} has dtype {a.dtype}, whose range says nothing about the pixel scale. If it holds 0-255 "
            "values, pass it as .astype(np.uint8) (0-65535: .astype(np.uint16)); otherwise pass floats in [0, 1]."
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{where} has dtype {a.dtype}; pass uint8, uint16, bool or float pixels.")
    check_unit_range(where, torch.from_numpy(a.astype(np.float64)))
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def _image_list(images: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        raise TypeError(
            "to_tensor takes NumPy arrays (H x W or H x W x C, or a list of them), got a torch tensor. A tensor of "
            "shape (N, C, H, W) in [0, 1] is already what dlgkit uses; otherwise pass tensor.numpy()."
        )
    if isinstance(images, np.ndarray):
        if images.ndim < 3 or (images.ndim == 3 and images.shape[-1] in (3, 4)):
            raise ValueError(
                f"images is one array of shape {images.shape}, which reads as a stack of {images.shape[0]} images; "
                "for a single image pass a list, to_tensor([image]), and for a stack pass (N, H, W) or (N, H, W, C)."
            )
        return list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of NumPy arrays (or one stacked array), got {type(images).__name__}.")
    return [np.asarray(img) for img in images]


def to_tensor(images: np.ndarray | list[np.ndarray], size: int | None = None, grey: bool = False) -> torch.Tensor:
    """Turn HxW or HxWxC images into an (N, C, H, W) float tensor in [0, 1].

    Pixels are scaled explicitly: uint8 by 255, uint16 by 65535, bool to 0/1; floats must
    already lie in [0, 1] (0-255 floats, NaN or inf are refused with a hint), and other integer
    types, whose scale is unknown, are refused. Channels: 1 or 2 (grey, grey+alpha) give grey,
    3 or 4 (RGB, RGBA) colour; alpha is dropped. Images are centre-cropped to a square and
    resized to ``size`` (anti-aliased) when given; ``grey=True`` converts colour to one channel,
    ``grey=False`` keeps colour (grey images get 3 equal channels only if another image in the
    list has colour). Defined in :doc:`/book/01_gradient_sharing`.
    """
    from skimage.color import gray2rgb, rgb2gray
    from skimage.transform import resize

    size = _check_size(size)
    arrays = []
    for i, a in enumerate(_image_list(images)):
        where = f"images[{i}]"
        if a.ndim == 3 and a.shape[2] in (1, 2):
            a = a[..., 0]  # grey, or grey + alpha
        elif a.ndim == 3 and a.shape[2] == 4:
            a = a[..., :3]  # RGBA
        if a.ndim not in (2, 3):
            raise ValueError(f"expected an HxW or HxWxC image, got shape {a.shape} for {where}.")
        if a.ndim == 3 and a.shape[2] != 3:
            raise ValueError(
                f"{where} has shape {a.shape}: {a.shape[2]} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA). "
                "If the channels come first (C, H, W), pass image.transpose(1, 2, 0)."
            )
        if a.size == 0:
            raise ValueError(f"{where} is empty (shape {a.shape}); every image needs at least one pixel.")
        arrays.append(_unit_float(a, where))
    if not arrays:
        raise ValueError("to_tensor() got no images.")
    colour = any(a.ndim == 3 for a in arrays) and not grey
    out = []
    for a in arrays:
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
    seed = check_seed("seed", seed)
    if num_classes is None:
        return torch.arange(n)
    num_classes = check_positive_int("num_classes", num_classes, allow_none=True)
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def lfw_faces(n: int = 20, size: int | None = 32, start: int = 0, num_classes: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` faces (from index ``start``) of scikit-image's ``lfw_subset``: grey, 25x25.

    The subset has no identities, so labels are made up: the face's index (``num_classes=None``)
    or a seeded random class in ``range(num_classes)``. Returns ``(images, labels)`` with images of
    shape (n, 1, size, size) in [0, 1].
    """
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 entries are faces, the rest are not
    start = check_nonnegative_int("start", start)
    n = _check_count(n, len(faces) - start, f"faces after start={start}")
    labels = _labels(n, num_classes, seed)
    x = to_tensor(list(faces[start : start + n]), size=size, grey=True)
    return x, labels


def photos(names: tuple[str, ...] | list[str] | None = None, size: int | None = 32, grey: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's bundled photos (default: all of :data:`PHOTO_NAMES`), centre-cropped and
    resized to ``size``. Labels are each photo's index in :data:`PHOTO_NAMES`."""
    import skimage.data

    names = list(PHOTO_NAMES if names is None else [names] if isinstance(names, str) else names)
    if not names:
        raise ValueError(f"names is empty; pass at least one of {list(PHOTO_NAMES)} (or None for all).")
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

    size = check_positive_int("size", size, hint="Pass the pixels per side of each crop.")
    n = _check_count(n, 10**6, "crops")
    scale = check_positive_int("scale", scale, hint="Each crop covers size * scale pixels of a photo (4 is the default).")
    labels = None if num_classes is None else _labels(n, num_classes, seed)
    rng = np.random.default_rng(check_seed("seed", seed))
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
    return x, torch.tensor(sources) if labels is None else labels


def digits(n: int | None = None, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits (1797 grey 8x8 images, labels 0-9), in [0, 1].

    ``n`` keeps the first n; ``size`` resizes (for example to 16 or 32 for LeNet).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images / 16.0
    size = _check_size(size)
    if n is not None:
        images = images[: _check_count(n, len(images), "digits")]
    x = torch.from_numpy(images[:, None]).float()
    if size is not None and size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.from_numpy(bunch.target[: len(x)]).long()


def _pil_pixels(im) -> np.ndarray:
    """A PIL image as uint8/uint16/float pixels that :func:`to_tensor` scales correctly: PIL
    converts CMYK, YCbCr, palettes and the like to RGB (reading the raw CMYK bytes as RGB would
    turn red into cyan), grey with alpha to grey."""
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if im.mode == "I":  # 16-bit PNGs may open as 32-bit integers
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"a 32-bit integer image with values in [{a.min()}, {a.max()}] has no known pixel scale; save it as 8 or 16 bit.")
        return a.astype(np.uint16)
    if im.mode == "F":
        return np.asarray(im)
    if im.mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def load_image(path: str | Path, size: int | None = 32, grey: bool = False) -> torch.Tensor:
    """Any image file (PNG, JPEG, ...) as a (1, C, size, size) tensor, like the paper's ``--image``.

    Read with PIL: the EXIF orientation is applied (photos from phones come out upright), CMYK,
    palette and YCbCr files become RGB, grey (with or without alpha) stays one channel, 16-bit
    files are scaled by 65535. Defined in :doc:`/book/02_single_image_dlg`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    size = _check_size(size)
    path = _path("path", path)
    if not path.is_file():
        raise FileNotFoundError(f"load_image: no file at {str(path)!r}.")
    try:
        with Image.open(path) as im:
            pixels = _pil_pixels(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"load_image: could not read {str(path)!r} as an image ({exc}).") from exc
    return to_tensor([pixels], size=size, grey=grey)


def _remove_new(root: Path, before: set[Path]) -> None:
    """Delete what a failed download created: the new entries under ``root`` and, if ``root``
    itself is new, ``root`` and its new parent folders. Nothing that was there before is touched."""
    import shutil

    if root.exists():
        for entry in root.iterdir():
            if entry in before:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    folder = root
    while folder not in before and folder != folder.parent and folder.exists():
        try:
            folder.rmdir()  # empty by now; a folder someone filled in the meantime stays
        except OSError:
            break
        folder = folder.parent


def torchvision_dataset(
    name: str, n: int = 8, size: int | None = 32, root: str | Path = "~/.cache/dlgkit", download: bool = False, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of CIFAR-10, CIFAR-100 or MNIST via torchvision (needs the network
    the first time: pass ``download=True``; offline, use :func:`lfw_faces` or :func:`photos`).
    A download that fails leaves no empty folders behind."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name, one of {sorted(_TORCHVISION)}, got {name!r}.")
    key = name.lower().replace("-", "")
    if key not in _TORCHVISION:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_TORCHVISION)}.")
    n = check_positive_int("n", n)
    size = _check_size(size)
    root = _path("root", root).expanduser()
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError("torchvision_dataset needs torchvision: pip install torchvision") from exc
    existing = {p for p in (root, *root.parents) if p.exists()} | (set(root.iterdir()) if root.is_dir() else set())
    cls = getattr(torchvision.datasets, _TORCHVISION[key])
    try:
        dataset = cls(root=str(root), train=train, download=download)
    except RuntimeError as exc:
        _remove_new(root, existing)
        hint = "pass download=True (needs internet)" if not download else "check your internet connection"
        raise RuntimeError(
            f"{name} is not available under {root} and could not be loaded ({exc}); {hint}, "
            "or use the offline sets dlgkit.data.lfw_faces / photos / digits."
        ) from exc
    except OSError as exc:  # URLError and socket errors are OSErrors
        _remove_new(root, existing)
        raise RuntimeError(
            f"downloading {name} failed ({exc}). You appear to be offline; use the offline sets "
            "dlgkit.data.lfw_faces / photos / digits instead."
        ) from exc
    _check_count(n, len(dataset), f"images in {name}")
    images = [np.asarray(dataset[i][0]) for i in range(n)]
    labels = torch.tensor([int(dataset[i][1]) for i in range(n)])
    return to_tensor(images, size=size, grey=key == "mnist"), labels
