"""Models used by the attacks: the DLG paper's LeNet and a small ResNet.

Defined in :doc:`/book/02_single_image_dlg`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from dlgkit.checks import check_choice, check_number, check_positive_int, check_seed

__all__ = ["LeNet", "ResNet", "init_uniform_", "has_non_smooth_activation", "warn_if_non_smooth"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    return _ACTIVATIONS[check_choice("activation", name, sorted(_ACTIVATIONS))]()


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw from torch's CPU stream seeded with ``seed`` (PyTorch's layer initialisation uses it)
    and put the caller's stream back afterwards: a seeded model never reseeds the caller's RNG.
    ``seed=None`` draws from the caller's stream as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def init_uniform_(model: nn.Module, low: float = -0.5, high: float = 0.5, seed: int | None = None) -> nn.Module:
    """Fill every weight and bias with U(low, high), as the DLG paper's code does.

    Returns the model so that the call can be chained. Defined in :doc:`/book/02_single_image_dlg`.
    """
    low, high = check_number("low", low), check_number("high", high)
    if not low < high:
        raise ValueError(f"init_uniform_: need low < high, got low={low}, high={high}.")
    generator = torch.Generator().manual_seed(check_seed("seed", seed)) if seed is not None else None
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.rand(param.shape, generator=generator, dtype=param.dtype)
            param.copy_(noise.to(param.device) * (high - low) + low)
    return model


class LeNet(nn.Module):
    """The LeNet variant of Zhu et al. (2019): three 5x5 convolutions with 12 channels
    (strides 2, 2, 1; padding 2), a smooth activation after each, and one linear layer.

    Works for any channel count, square image size and class count. The default
    activation is the sigmoid, which is twice differentiable everywhere, as DLG needs.
    Weights and biases start uniform in [-0.5, 0.5] as in the paper's code (``init="default"``
    keeps PyTorch's own initialisation instead); pass ``seed`` for a fixed draw.
    Defined in :doc:`/book/02_single_image_dlg`.
    """

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 100,
        image_size: int = 32,
        activation: str = "sigmoid",
        seed: int | None = None,
        init: str = "uniform",
    ) -> None:
        super().__init__()
        channels, num_classes = check_positive_int("channels", channels), check_positive_int("num_classes", num_classes)
        image_size = check_positive_int("image_size", image_size)
        check_choice("init", init, ("uniform", "default"))  # the paper's, or PyTorch's
        seed = None if seed is None else check_seed("seed", seed)
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        with _seeded(seed):
            self._build(channels, num_classes, image_size, activation)
        if init == "uniform":
            init_uniform_(self, seed=seed)

    def _build(self, channels: int, num_classes: int, image_size: int, activation: str) -> None:
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            _activation(activation),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            _activation(activation),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            _activation(activation),
        )
        side = (image_size + 1) // 2  # stride 2, padding 2, kernel 5
        side = (side + 1) // 2
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LeNet expects input of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}. Build the model with channels/image_size matching your data."
            )
        return self.fc(self.body(x).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(1, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(1, out_ch)
        self.act = _activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.GroupNorm(1, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet (one basic block per stage, GroupNorm) for the "deeper network" contrast.

    ``widths`` sets the channels of each stage and ``blocks`` the basic blocks per stage
    (ResNet-56 has three stages of nine). With ``strides=True`` every stage after the first
    halves the resolution and the classifier sees the global average of the last feature map.
    ``strides=False`` is the variant the DLG paper attacks (sigmoid, strides removed): the
    resolution stays ``image_size`` throughout and, as in the paper's code, the classifier sees
    the feature map averaged over 4x4 windows (an 8x8 map for 32x32 inputs), so it keeps where
    things are. GroupNorm (not BatchNorm) keeps a single-example gradient well defined.
    Defined in :doc:`/book/02_single_image_dlg`.
    """

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 100,
        widths: tuple[int, ...] = (16, 32, 64),
        activation: str = "sigmoid",
        seed: int | None = None,
        strides: bool = True,
        blocks: int = 1,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        channels, num_classes = check_positive_int("channels", channels), check_positive_int("num_classes", num_classes)
        blocks = check_positive_int("blocks", blocks)
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(f"widths must be a non-empty tuple of positive ints, one channel count per stage, such as (16, 32, 64); got {widths!r}.")
        widths = tuple(check_positive_int(f"widths[{i}]", w) for i, w in enumerate(widths))
        seed = None if seed is None else check_seed("seed", seed)
        image_size = check_positive_int("image_size", image_size)
        if not strides and image_size % 4:
            raise ValueError(f"strides=False pools 4x4 windows: image_size must be a positive multiple of 4, got {image_size!r}.")
        self.channels, self.num_classes = channels, num_classes
        self.strides, self.image_size = strides, image_size
        with _seeded(seed):
            self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, padding=1, bias=False), nn.GroupNorm(1, widths[0]), _activation(activation))
            stages, in_ch = [], widths[0]
            for i, width in enumerate(widths):
                for b in range(blocks):
                    stages.append(_BasicBlock(in_ch, width, stride=2 if strides and i > 0 and b == 0 else 1, activation=activation))
                    in_ch = width
            self.stages = nn.Sequential(*stages)
            self.head = nn.Linear(in_ch if strides else in_ch * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ResNet expects input of shape (N, {self.channels}, H, W), got {tuple(x.shape)}.")
        if not self.strides and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this ResNet (strides=False) was built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape)}.")
        features = self.stages(self.stem(x))
        if not self.strides:
            return self.head(nn.functional.avg_pool2d(features, 4).flatten(1))
        return self.head(features.mean(dim=(2, 3)))


_NON_SMOOTH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.MaxPool2d)


def has_non_smooth_activation(model: nn.Module) -> list[str]:
    """Names of the modules in ``model`` whose second derivative is zero almost everywhere."""
    return [name or type(module).__name__ for name, module in model.named_modules() if isinstance(module, _NON_SMOOTH)]


def warn_if_non_smooth(model: nn.Module) -> None:
    """Warn when ``model`` uses ReLU-like layers, explaining why DLG struggles with them."""
    names = has_non_smooth_activation(model)
    if names:
        warnings.warn(
            f"The model uses piecewise-linear layers ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}). "
            "DLG differentiates the gradient itself, and the paper's attack (L2 distance, L-BFGS) is built "
            "for twice-differentiable activations: ReLU's second derivative is zero almost everywhere, "
            "which makes the gradient-matching landscape rough and that attack much weaker. Use "
            "activation='sigmoid' to reproduce the paper; otherwise expect lower PSNR, or try a cosine "
            "distance with Adam (Geiping et al., 2020).",
            UserWarning,
            stacklevel=3,
        )
