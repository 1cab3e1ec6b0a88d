"""Hostile but realistic input to dlgkit's data, models, federated, metrics, labels, analytic,
nlp, budget and viz modules: every call either gives the right answer (NaN for a metric of a
NaN image) or stops with a clear error raised by dlgkit itself that names the argument. Never
a plausible wrong number, never a stack trace from inside torch, NumPy, scikit-image or PIL.

``CASES`` is the probe: one row per call. ``python tests/test_bad_inputs.py`` prints how each
row fares (``ok``, ``clear``, ``warned``; the failures ``silent``, ``deep``, ``unclear``) and the
totals, which is how the before/after numbers in the report were taken. The hypothesis tests
below fuzz the image metrics and the integer arguments.
"""

from __future__ import annotations

import atexit
import functools
import math
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import dlgkit
from dlgkit import attacks, budget, data, federated, metrics, models, viz
from dlgkit.attacks.fedavg import fedavg_observation

DLGKIT_DIR = str(Path(dlgkit.__file__).resolve().parent)
NAN = float("nan")


# --- inputs ----------------------------------------------------------------------------------


@functools.cache
def _tmp() -> Path:
    path = Path(tempfile.mkdtemp(prefix="dlgkit-bad-inputs-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def img(n: int = 1, c: int = 1, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def with_nan(x: torch.Tensor, index: int = 0, value: float = NAN) -> torch.Tensor:
    x = x.clone()
    x[index].view(-1)[3] = value
    return x


def lenet() -> nn.Module:
    return models.LeNet(channels=1, num_classes=4, image_size=8, seed=0)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Sigmoid(), nn.Linear(5, 4))


def grads(model: nn.Module | None = None, n: int = 1) -> tuple[nn.Module, list[torch.Tensor]]:
    model = model or lenet()
    return model, federated.client_gradient(model, img(n), torch.arange(n) % 4)


def nan_grads() -> tuple[nn.Module, list[torch.Tensor]]:
    model, g = grads(n=2)
    g[-1] = g[-1].clone()
    g[-1][1] = NAN
    return model, g


def zero_grads() -> tuple[nn.Module, list[torch.Tensor]]:
    model, g = grads()
    return model, [torch.zeros_like(t) for t in g]


def pil_file(name: str, mode: str, size: tuple[int, int], colour, fmt: str, **save) -> Path:
    from PIL import Image

    path = _tmp() / name
    Image.new(mode, size, colour).save(path, format=fmt, **save)
    return path


def exif_rotated_jpeg() -> Path:
    """A 20 x 10 JPEG, left half red and right half blue, whose EXIF says "rotate 90 degrees
    clockwise to display" (orientation 6), as phone cameras write it."""
    from PIL import Image

    im = Image.new("RGB", (20, 10), (255, 0, 0))
    im.paste((0, 0, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _tmp() / "rotated.jpg"
    im.save(path, format="JPEG", exif=exif, quality=95)
    return path


def text_file() -> Path:
    path = _tmp() / "notes.png"
    path.write_text("not an image")
    return path


def grey16_png() -> Path:
    from PIL import Image

    a = np.full((4, 4), 32768, dtype=np.uint16)
    path = _tmp() / "grey16.png"
    Image.fromarray(a).save(path)
    return path


def rng_untouched(build: Callable[[], object]) -> bool:
    """True when ``build`` leaves torch's global random stream where it was."""
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    build()
    return torch.equal(torch.rand(3), expected)


def offline_download_leaves_nothing() -> bool:
    pytest.importorskip("torchvision")
    root = _tmp() / "tv" / "new" / "folder"
    try:
        data.torchvision_dataset("mnist", root=root, download=True)
    except RuntimeError:
        pass
    return not (_tmp() / "tv").exists()


@functools.cache
def text_model():
    from dlgkit import nlp

    return nlp.load_text_model(pretrained=False, seed=0)


def text_gradient(*args, **kwargs):
    from dlgkit import nlp

    return nlp.text_gradient(text_model(), *args, **kwargs)


def load_text_model(**kwargs):
    from dlgkit import nlp

    return nlp.load_text_model(pretrained=False, **kwargs)


def client(x=None, y=None, **kwargs) -> federated.Client:
    return federated.Client(img(4) if x is None else x, torch.tensor([0, 1, 2, 3]) if y is None else y, **kwargs)


def strip(**kwargs):
    import matplotlib.pyplot as plt

    history = [img(1), img(1, seed=1), img(1, seed=2)]
    fig = viz.iteration_strip(history, [0, 10, 20], **kwargs)
    plt.close(fig)
    return fig


def is_nan(v) -> bool:
    return math.isnan(float(v))


def is_perm(n: int) -> Callable[[torch.Tensor], bool]:
    return lambda p: sorted(torch.as_tensor(p).tolist()) == list(range(n))


def red(x: torch.Tensor) -> bool:
    r, g, b = (float(x[0, k].mean()) for k in range(3))
    return x.shape[1] == 3 and r > 0.9 and g < 0.1 and b < 0.1


# --- the probe -------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile call. ``error``: the regex a clear error from dlgkit must match (the
    argument's name); ``check``: what a correct result satisfies; ``warns``: a warning that
    must come with the result. A case may allow an error and a result both."""

    id: str
    call: Callable[[], object]
    error: str | None = None
    check: Callable[[object], bool] | None = None
    warns: str | None = None


X8 = img(2, 3)
CASES = [
    # metrics: NaN/inf reconstructions give NaN, bad originals and 0-255 images are refused
    Case("psnr of a NaN image", lambda: metrics.psnr(with_nan(X8[0:1])[0], X8[0]), check=is_nan),
    Case("psnr of an inf image", lambda: metrics.psnr(with_nan(X8[0:1], value=math.inf)[0], X8[0]), check=is_nan),
    Case("psnr of a -inf image", lambda: metrics.psnr(with_nan(X8[0:1], value=-math.inf)[0], X8[0]), check=is_nan),
    Case("mse of a NaN image", lambda: metrics.mse(with_nan(X8[0:1])[0], X8[0]), check=is_nan),
    Case("ssim of a NaN image", lambda: metrics.ssim(with_nan(X8[0:1])[0], X8[0]), check=is_nan),
    Case("psnr of a batch with one NaN image", lambda: metrics.psnr(with_nan(X8, 1), X8), check=lambda v: v[0] == 100 and is_nan(v[1])),
    Case("psnr against a NaN original", lambda: metrics.psnr(X8, with_nan(X8)), error=r"original.*NaN"),
    Case("psnr of 0-255 images", lambda: metrics.psnr(X8 * 255, X8 * 255), error=r"original.*\[0, 1\].*255"),
    Case("ssim of 0-255 images", lambda: metrics.ssim(X8 * 255, X8 * 255), error=r"original.*\[0, 1\].*255"),
    Case("mse of 0-255 images", lambda: metrics.mse(X8 * 255, X8 * 255), error=r"original.*\[0, 1\].*255"),
    Case("psnr of uint8 tensors", lambda: metrics.psnr((X8 * 255).byte(), (X8 * 255).byte()), error=r"reconstruction.*floating"),
    Case("psnr of an empty batch", lambda: metrics.psnr(X8[:0], X8[:0]), error=r"empty"),
    Case("ssim of 2x2 images", lambda: metrics.ssim(img(1, 1, 2), img(1, 1, 2)), error=r"ssim.*3x3"),
    Case("psnr of float64 copies", lambda: metrics.psnr(X8.double(), X8.double()), check=lambda v: bool((v == 100).all())),
    Case("align with a NaN image", lambda: metrics.align(with_nan(img(3), 1), img(3)), check=is_perm(3)),
    Case("align (ssim) with a NaN image", lambda: metrics.align(with_nan(img(3), 1), img(3), cost="ssim"), check=is_perm(3)),
    Case("align of single images", lambda: metrics.align(img(1)[0], img(1)[0]), error=r"batches"),
    Case("align cost spelled MSE", lambda: metrics.align(img(3), img(3), cost="MSE"), error=r"cost"),
    Case("batch_report with a NaN image", lambda: metrics.batch_report(with_nan(img(3), 1), img(3)),
         check=lambda r: is_nan(r["psnr"]) and is_nan(r["psnr_per_image"][1]) and r["psnr_per_image"][0] == 100),
    Case("batch_report of 0-255 images", lambda: metrics.batch_report(img(3) * 255, img(3) * 255), error=r"\[0, 1\].*255"),
    Case("batch_report labels without true_labels", lambda: metrics.batch_report(img(3), img(3), labels=torch.tensor([0, 1, 2])), error=r"true_labels"),
    Case("label_accuracy of NaN scores", lambda: metrics.label_accuracy(torch.full((2, 3), NAN), torch.tensor([0, 1])), check=is_nan),
    Case("label_accuracy of a 3.7 label", lambda: metrics.label_accuracy(torch.tensor([3.7]), torch.tensor([3])), error=r"predicted.*integer"),
    Case("label_accuracy of a 1.5 true label", lambda: metrics.label_accuracy(torch.tensor([1]), torch.tensor([1.5])), error=r"true.*integer"),
    Case("multiset accuracy of a 3.7 label", lambda: metrics.multiset_label_accuracy(torch.tensor([3.7]), torch.tensor([3])), error=r"predicted.*integer"),
    Case("token_accuracy of float ids", lambda: metrics.token_accuracy(torch.tensor([1.5, 2.0]), [1, 2]), error=r"predicted.*integer"),
    Case("rouge of Chinese text", lambda: metrics.rouge("北京欢迎你", "北京欢迎你"), check=lambda r: r["rouge1"] == 1.0 and r["rougeL"] == 1.0),
    Case("rouge of accented words", lambda: metrics.rouge("café naïve", "caf na ve"), check=lambda r: r["rouge1"] == 0.0),
    Case("rouge of identical accented words", lambda: metrics.rouge("naïve café", "naïve café"), check=lambda r: r["rouge2"] == 1.0),
    Case("rouge against an empty reference", lambda: metrics.rouge("hello", ""), error=r"reference"),
    Case("rouge against a zero-width reference", lambda: metrics.rouge("hello", "\u200b"), error=r"reference"),
    Case("token_accuracy of a string", lambda: metrics.token_accuracy("hello", [1]), error=r"tokenise"),
    Case("text_report of an empty reference", lambda: metrics.text_report(["hello"], [""]), error=r"reference"),
    Case("rouge of decomposed accents", lambda: metrics.rouge("cafe\u0301", "café"), check=lambda r: r["rouge1"] == 1.0),
    Case("rouge of Chinese with one character wrong", lambda: metrics.rouge("北京欢迎我", "北京欢迎你"), check=lambda r: abs(r["rouge1"] - 0.8) < 1e-9),
    Case("label_accuracy of label lists of different length", lambda: metrics.label_accuracy(torch.tensor([1, 2]), torch.tensor([1])), error=r"2 predicted.*1 true"),
    Case("psnr of a (H, W) image", lambda: metrics.psnr(torch.rand(8, 8), torch.rand(8, 8)), error=r"\(C, H, W\)"),
    Case("rouge of token ids", lambda: metrics.rouge([1, 2], "hello"), error=r"decode"),
    # data
    Case("to_tensor of an int64 0-255 array", lambda: data.to_tensor([np.array([[0, 128], [255, 3]])]), error=r"int64.*uint8"),
    Case("to_tensor of a float 0-255 array", lambda: data.to_tensor([np.array([[0.0, 128.0], [255.0, 3.0]])]), error=r"\[0, 1\].*255"),
    Case("to_tensor of a NaN array", lambda: data.to_tensor([np.array([[0.0, NAN], [0.5, 0.2]])]), error=r"NaN"),
    Case("to_tensor of uint16", lambda: data.to_tensor([np.array([[0, 65535], [65535, 0]], dtype=np.uint16)]), check=lambda x: x.flatten().tolist() == [0, 1, 1, 0]),
    Case("to_tensor of bool", lambda: data.to_tensor([np.array([[False, True], [True, True]])]), check=lambda x: x.flatten().tolist() == [0, 1, 1, 1]),
    Case("to_tensor of grey+alpha", lambda: data.to_tensor([np.zeros((4, 4, 2), dtype=np.uint8)]), check=lambda x: x.shape == (1, 1, 4, 4)),
    Case("to_tensor of one HxWx3 array, no list", lambda: data.to_tensor(np.zeros((6, 6, 3), dtype=np.uint8)), error=r"images.*\[image\]"),
    Case("to_tensor of a 0-pixel image", lambda: data.to_tensor([np.zeros((0, 4))]), error=r"empty"),
    Case("to_tensor of 5 channels", lambda: data.to_tensor([np.zeros((4, 4, 5))]), error=r"channels"),
    Case("to_tensor of a torch tensor", lambda: data.to_tensor(torch.rand(1, 4, 4)), error=r"NumPy"),
    Case("to_tensor size=0", lambda: data.to_tensor([np.zeros((4, 4))], size=0), error=r"size"),
    Case("load_image of a red CMYK JPEG", lambda: data.load_image(pil_file("red.jpg", "CMYK", (8, 8), (0, 255, 255, 0), "JPEG", quality=95), size=None), check=red),
    Case("load_image of grey+alpha", lambda: data.load_image(pil_file("la.png", "LA", (8, 8), (200, 100), "PNG"), size=None),
         check=lambda x: x.shape == (1, 1, 8, 8) and abs(float(x.mean()) - 200 / 255) < 1e-6),
    Case("load_image of a palette PNG", lambda: data.load_image(pil_file("p.png", "RGB", (8, 8), (255, 0, 0), "PNG"), size=None), check=red),
    Case("load_image of a 16-bit grey PNG", lambda: data.load_image(grey16_png(), size=None), check=lambda x: abs(float(x.mean()) - 32768 / 65535) < 1e-6),
    Case("load_image of an EXIF-rotated JPEG", lambda: data.load_image(exif_rotated_jpeg(), size=None),
         check=lambda x: x.shape == (1, 3, 10, 10) and float(x[0, 0, 1, 5]) > 0.8 and float(x[0, 2, 8, 5]) > 0.8),
    Case("load_image of a text file", lambda: data.load_image(text_file()), error=r"could not read"),
    Case("load_image size=0", lambda: data.load_image(pil_file("s.png", "L", (4, 4), 0, "PNG"), size=0), error=r"size"),
    Case("lfw_faces n=0", lambda: data.lfw_faces(0), error=r"\bn\b"),
    Case("lfw_faces n=2.5", lambda: data.lfw_faces(2.5), error=r"\bn\b"),
    Case("lfw_faces n=np.int64(3)", lambda: data.lfw_faces(np.int64(3), size=None), check=lambda r: r[0].shape == (3, 1, 25, 25)),
    Case("lfw_faces start=-1", lambda: data.lfw_faces(2, start=-1), error=r"start"),
    Case("lfw_faces num_classes=0", lambda: data.lfw_faces(2, num_classes=0), error=r"num_classes"),
    Case("lfw_faces seed=0.5", lambda: data.lfw_faces(2, num_classes=3, seed=0.5), error=r"seed"),
    Case("lfw_faces seed=-1", lambda: data.lfw_faces(2, num_classes=3, seed=-1), error=r"seed"),
    Case("photos of one name as a string", lambda: data.photos("astronaut", size=8), check=lambda r: r[0].shape == (1, 3, 8, 8)),
    Case("photos size=0", lambda: data.photos(["coffee"], size=0), error=r"size"),
    Case("photos of an unknown name", lambda: data.photos(["lena"]), error=r"lena"),
    Case("digits n=1798", lambda: data.digits(1798), error=r"1797"),
    Case("to_tensor of channel-first (3, H, W)", lambda: data.to_tensor([np.zeros((3, 6, 6), dtype=np.uint8)]), error=r"transpose"),
    Case("to_tensor of RGBA", lambda: data.to_tensor([np.full((4, 4, 4), 255, dtype=np.uint8)]), check=lambda x: x.shape == (1, 3, 4, 4) and float(x.min()) == 1.0),
    Case("photos of no names", lambda: data.photos([]), error=r"names"),
    Case("photo_crops scale=0", lambda: data.photo_crops(2, scale=0), error=r"scale"),
    Case("photo_crops scale=0.5", lambda: data.photo_crops(2, scale=0.5), error=r"scale"),
    Case("photo_crops size=None", lambda: data.photo_crops(2, size=None), error=r"size"),
    Case("load_image path=None", lambda: data.load_image(None), error=r"path"),
    Case("torchvision_dataset root=None", lambda: data.torchvision_dataset("mnist", root=None), error=r"root"),
    Case("photo_crops seed=0.5", lambda: data.photo_crops(2, seed=0.5), error=r"seed"),
    Case("photo_crops seed=-1", lambda: data.photo_crops(2, seed=-1), error=r"seed"),
    Case("digits n=0", lambda: data.digits(0), error=r"\bn\b"),
    Case("digits n=True", lambda: data.digits(True), error=r"\bn\b"),
    Case("digits size=0", lambda: data.digits(2, size=0), error=r"size"),
    Case("torchvision_dataset offline download cleans up", offline_download_leaves_nothing, check=bool),
    Case("torchvision_dataset name=None", lambda: data.torchvision_dataset(None), error=r"name"),
    Case("torchvision_dataset n=0", lambda: data.torchvision_dataset("mnist", n=0, root=_tmp() / "tv0"), error=r"\bn\b"),
    # models
    Case("LeNet seed=0.5", lambda: models.LeNet(seed=0.5), error=r"seed"),
    Case("LeNet seed=-1", lambda: models.LeNet(seed=-1), error=r"seed"),
    Case("LeNet channels=2.0", lambda: models.LeNet(channels=2.0), error=r"channels"),
    Case("LeNet image_size=0", lambda: models.LeNet(image_size=0), error=r"image_size"),
    Case("LeNet num_classes=True", lambda: models.LeNet(num_classes=True), error=r"num_classes"),
    Case("LeNet activation=None", lambda: models.LeNet(activation=None), error=r"activation"),
    Case("LeNet init=None", lambda: models.LeNet(init=None), error=r"init"),
    Case("LeNet image_size=np.int64(16)", lambda: models.LeNet(image_size=np.int64(16)), check=lambda m: m.image_size == 16),
    Case("LeNet(seed=) keeps the global RNG", lambda: rng_untouched(lambda: models.LeNet(seed=0)), check=bool),
    Case("LeNet(init='default', seed=) keeps the global RNG", lambda: rng_untouched(lambda: models.LeNet(seed=0, init="default")), check=bool),
    Case("ResNet(seed=) keeps the global RNG", lambda: rng_untouched(lambda: models.ResNet(widths=(4,), seed=0)), check=bool),
    Case("init_uniform_(seed=) keeps the global RNG", lambda: (lambda m: rng_untouched(lambda: models.init_uniform_(m, seed=0)))(mlp()), check=bool),
    Case("ResNet widths=(0,)", lambda: models.ResNet(widths=(0,)), error=r"widths"),
    Case("ResNet widths=16", lambda: models.ResNet(widths=16), error=r"widths"),
    Case("ResNet widths=(8, 2.5)", lambda: models.ResNet(widths=(8, 2.5)), error=r"widths"),
    Case("ResNet seed=0.5", lambda: models.ResNet(seed=0.5), error=r"seed"),
    Case("ResNet channels=0", lambda: models.ResNet(channels=0), error=r"channels"),
    Case("init_uniform_ low=nan", lambda: models.init_uniform_(mlp(), low=NAN), error=r"low"),
    Case("init_uniform_ high=inf", lambda: models.init_uniform_(mlp(), high=math.inf), error=r"high"),
    Case("init_uniform_ seed=0.5", lambda: models.init_uniform_(mlp(), seed=0.5), error=r"seed"),
    # federated
    Case("Client with 4 images and 3 labels", lambda: client(y=torch.tensor([0, 1, 2])), error=r"4 .*3 labels"),
    Case("Server.round with mismatched images/labels", lambda: federated.Server(lenet()).round([client(y=torch.tensor([0, 1, 2]))]), error=r"4 .*3 labels"),
    Case("Server.round with a label out of range", lambda: federated.Server(lenet()).round([client(y=torch.tensor([0, 1, 2, 9]))]), error=r"labels.*\[0, 3\]"),
    Case("Server.round with images of the wrong size", lambda: federated.Server(mlp()).round([client(x=img(4, 1, 6))]), error=r"x .*shape"),
    Case("Server.round with one Client, not a list", lambda: federated.Server(lenet()).round(client()), error=r"clients"),
    Case("Server.round with no clients", lambda: federated.Server(lenet()).round([]), error=r"clients"),
    Case("Server.round fedavg local_steps=0", lambda: federated.Server(lenet()).round([client()], mode="fedavg", local_steps=0), error=r"local_steps"),
    Case("Server.round mode FedSGD", lambda: federated.Server(lenet()).round([client()], mode="FedSGD"), error=r"mode"),
    Case("Server lr=nan", lambda: federated.Server(lenet(), lr=NAN), error=r"\blr\b"),
    Case("Server lr='0.1'", lambda: federated.Server(lenet(), lr="0.1"), error=r"\blr\b"),
    Case("Client batch_size=0", lambda: client(batch_size=0), error=r"batch_size"),
    Case("Client batch_size=-1", lambda: client(batch_size=-1), error=r"batch_size"),
    Case("Client x is a list", lambda: federated.Client([[0.0]], torch.tensor([0])), error=r"\bx\b"),
    Case("client_gradient of 3.7 labels", lambda: federated.client_gradient(lenet(), img(1), torch.tensor([3.7])), error=r"\by\b.*integer"),
    Case("client_gradient of an empty batch", lambda: federated.client_gradient(lenet(), img(1)[:0], torch.tensor([], dtype=torch.long)), error=r"empty"),
    Case("client_gradient of a NaN image", lambda: federated.client_gradient(lenet(), with_nan(img(1)), torch.tensor([0])), error=r"\bx\b.*NaN"),
    Case("client_gradient of probabilities of the wrong width", lambda: federated.client_gradient(mlp(), img(1), torch.tensor([[0.5, 0.5]])), error=r"\by\b.*4 classes"),
    Case("client_gradient of y rows that are logits", lambda: federated.client_gradient(mlp(), img(2), torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])), error=r"probability rows"),
    Case("client_gradient of int64 images", lambda: federated.client_gradient(lenet(), (img(1) * 255).long(), torch.tensor([0])), error=r"\bx\b.*floating"),
    Case("client_gradient with y as a list", lambda: federated.client_gradient(lenet(), img(1), [0]), error=r"\by\b.*tensor"),
    Case("Server.round with a list of tensors, not Clients", lambda: federated.Server(lenet()).round([img(1)]), error=r"clients\[0\]"),
    Case("client_update lr=nan", lambda: federated.client_update(lenet(), img(1), torch.tensor([0]), lr=NAN), error=r"\blr\b"),
    Case("client_update lr='0.1'", lambda: federated.client_update(lenet(), img(1), torch.tensor([0]), lr="0.1"), error=r"\blr\b"),
    Case("client_update batch_size=0", lambda: federated.client_update(lenet(), img(2), torch.tensor([0, 1]), batch_size=0), error=r"batch_size"),
    Case("client_update batch_size=-1", lambda: federated.client_update(lenet(), img(2), torch.tensor([0, 1]), batch_size=-1), error=r"batch_size"),
    Case("client_update local_steps=0", lambda: federated.client_update(lenet(), img(1), torch.tensor([0]), local_steps=0), error=r"local_steps"),
    Case("SharedUpdate num_examples=0", lambda: federated.SharedUpdate(grads()[1], num_examples=0), error=r"num_examples"),
    Case("SharedUpdate kind='grad'", lambda: federated.SharedUpdate(grads()[1], num_examples=1, kind="grad"), error=r"kind"),
    # labels and the analytic attack
    Case("idlg_label of a NaN gradient", lambda: attacks.idlg_label(*nan_grads()), error=r"NaN"),
    Case("label_set of a NaN gradient", lambda: attacks.label_set(*nan_grads()), error=r"NaN"),
    Case("batch_labels of a NaN gradient", lambda: attacks.batch_labels(*nan_grads(), batch_size=2), error=r"NaN"),
    Case("idlg_label of an all-zero gradient", lambda: attacks.idlg_label(*zero_grads()), error=r"no negative", warns=r"no negative"),
    Case("batch_labels probes=0", lambda: attacks.batch_labels(*grads(n=2), 2, rule="probe", input_shape=(1, 8, 8), probes=0), error=r"probes"),
    Case("batch_labels probes=2.5", lambda: attacks.batch_labels(*grads(n=2), 2, rule="probe", input_shape=(1, 8, 8), probes=2.5), error=r"probes"),
    Case("batch_labels rule='Count'", lambda: attacks.batch_labels(*grads(n=2), 2, rule="Count"), error=r"rule"),
    Case("batch_labels rule=None", lambda: attacks.batch_labels(*grads(n=2), 2, rule=None), error=r"rule"),
    Case("batch_labels batch_size=0", lambda: attacks.batch_labels(*grads(n=2), 0), error=r"batch_size"),
    Case("batch_labels batch_size=2.0", lambda: attacks.batch_labels(*grads(n=2), 2.0), error=r"batch_size"),
    Case("batch_labels batch_size=np.int64(2)", lambda: attacks.batch_labels(*grads(n=2), np.int64(2)), check=lambda t: torch.equal(t, attacks.batch_labels(*grads(n=2), 2))),
    Case("batch_labels seed=0.5", lambda: attacks.batch_labels(*grads(n=2), 2, rule="probe", input_shape=(1, 8, 8), seed=0.5), error=r"seed"),
    Case("batch_labels input_shape with a 0", lambda: attacks.batch_labels(*grads(n=2), 2, rule="probe", input_shape=(1, 0, 8)), error=r"input_shape"),
    Case("recover_linear_input of a NaN weight gradient", lambda: attacks.recover_linear_input(with_nan(torch.rand(3, 5)), torch.rand(3)), error=r"weight_grad.*NaN"),
    Case("recover_linear_input of a NaN bias gradient", lambda: attacks.recover_linear_input(torch.rand(3, 5), torch.tensor([NAN, 1.0, 2.0])), error=r"bias_grad.*NaN"),
    Case("recover_linear_input eps=-1", lambda: attacks.recover_linear_input(torch.rand(3, 5), torch.rand(3), eps=-1), error=r"eps"),
    Case("recover_linear_input eps=nan", lambda: attacks.recover_linear_input(torch.rand(3, 5), torch.rand(3), eps=NAN), error=r"eps"),
    # text model (loads MiniLM once, from the bundled package)
    Case("text_gradient of zero-width text", lambda: text_gradient("\u200b", 0), error=r"sentence 0.*no word"),
    Case("text_gradient of label 0.7", lambda: text_gradient("hello there", 0.7), error=r"labels.*integer"),
    Case("text_gradient of label True", lambda: text_gradient("hello there", True), error=r"labels.*integer"),
    Case("text_gradient of a float label tensor", lambda: text_gradient("hello there", torch.tensor([0.5])), error=r"labels.*integer"),
    Case("text_gradient of label 5", lambda: text_gradient("hello there", 5), error=r"labels"),
    Case("load_text_model seed=0.5", lambda: load_text_model(seed=0.5), error=r"seed"),
    Case("load_text_model num_labels=2.5", lambda: load_text_model(num_labels=2.5), error=r"num_labels"),
    Case("load_text_model num_labels='2'", lambda: load_text_model(num_labels="2"), error=r"num_labels"),
    Case("text_gradient of one label for two sentences", lambda: text_gradient(["hello there", "good bye"], 1), error=r"2 sentence"),
    Case("text_gradient of a sentence that is an int", lambda: text_gradient(["hello", 3], [0, 1]), error=r"sentence 1.*str"),
    Case("text_gradient of an empty list", lambda: text_gradient([], []), error=r"no text"),
    Case("load_text_model device='tpu'", lambda: load_text_model(device="tpu"), error=r"device"),
    Case("load_text_model keeps the global RNG", lambda: rng_untouched(lambda: load_text_model(seed=3)), check=bool),
    # budget
    Case("budget full=0", lambda: budget.budget(0, 1), error=r"full"),
    Case("budget full='100'", lambda: budget.budget("100", 1), error=r"full"),
    Case("seed_everything seed=0.5", lambda: budget.seed_everything(0.5), error=r"seed"),
    Case("seed_everything seed=2**64", lambda: budget.seed_everything(2**64), error=r"seed.*2\*\*63"),
    Case("seed_everything seed=-1", lambda: budget.seed_everything(-1), error=r"seed.*2\*\*63"),
    # FedAvg observation (chapter 6)
    Case("fedavg_observation loss_fn=None", lambda: fedavg_observation(2, 0.1, loss_fn=None), error=r"loss_fn.*function"),
    Case("fedavg_observation float labels", lambda: fedavg_observation(2, 0.1)(models.LeNet(channels=1, image_size=8, num_classes=4, seed=0), img(2), torch.tensor([0.0, 2.0])), error=r"y .*integer class indices"),
    # viz
    Case("iteration_strip every=0", lambda: strip(every=0), error=r"every"),
    Case("iteration_strip every=-2", lambda: strip(every=-2), error=r"every"),
    Case("iteration_strip every=7 (no frame)", lambda: strip(every=7), check=lambda fig: fig is not None),
    Case("iteration_strip max_frames=1", lambda: strip(max_frames=1), error=r"max_frames"),
    Case("image_grid columns=0", lambda: viz.image_grid(img(3), columns=0), error=r"columns"),
    Case("image_grid pad=-1", lambda: viz.image_grid(img(3), pad=-1), error=r"pad"),
    Case("png_bytes scale=0", lambda: viz.png_bytes(img(1)[0], scale=0), error=r"scale"),
    Case("scrubber scale=0", lambda: viz.scrubber([img(1)], [0], scale=0), error=r"scale"),
    Case("scrubber interval=0", lambda: viz.scrubber([img(1)], [0], interval=0), error=r"interval"),
    Case("scrubber columns=0", lambda: viz.scrubber([img(2)], [0], columns=0), error=r"columns"),
    Case("text_scrubber interval=-1", lambda: viz.text_scrubber(["a"], [0], interval=-1), error=r"interval"),
]


def run_case(case: Case) -> tuple[str, str]:
    """How ``case`` fares: ``ok``/``clear``/``warned`` (good) or ``silent`` (a wrong result),
    ``deep`` (an exception raised inside a dependency), ``unclear`` (raised by dlgkit, but the
    message does not say what the case expects), with the message or result."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.call()
        except Exception as exc:  # noqa: BLE001 - classified below
            where = traceback.extract_tb(exc.__traceback__)[-1].filename
            text = f"{type(exc).__name__}: {exc}"
            if not str(Path(where).resolve()).startswith(DLGKIT_DIR):
                return "deep", f"{text} (raised in {where})"
            if case.error and isinstance(exc, (ValueError, TypeError, RuntimeError, FileNotFoundError)) and re.search(case.error, str(exc), re.S):
                return "clear", text
            return "unclear", text
    if case.warns and any(re.search(case.warns, str(w.message)) for w in caught):
        return "warned", str(caught[-1].message)
    if case.check is not None and case.check(result):
        return "ok", repr(result)[:80]
    return "silent", repr(result)[:80]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_call_is_right_or_clearly_refused(case):
    outcome, detail = run_case(case)
    assert outcome in ("ok", "clear", "warned"), f"{outcome}: {detail}"


# --- details the probe cannot express -------------------------------------------------------


def test_lenet_weights_do_not_depend_on_the_global_rng():
    torch.manual_seed(123)
    a = models.LeNet(seed=0)
    torch.manual_seed(456)
    b = models.LeNet(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.manual_seed(7)
    c, d = models.LeNet(seed=0, init="default"), models.LeNet(seed=0, init="default")
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


@pytest.mark.parametrize(
    "build,total,absolute",
    [
        (lambda: models.LeNet(seed=0), 16.053644001483917, 21204.049215495586),
        (lambda: models.LeNet(channels=1, num_classes=10, image_size=32, activation="relu", seed=0, init="default"), -0.9301671441339749, 376.86006300438066),
        (lambda: models.ResNet(channels=1, num_classes=10, widths=(8, 16), seed=0), 63.8932636799982, 357.03845229805665),
    ],
    ids=["LeNet", "LeNet-default-init", "ResNet"],
)
def test_seeded_models_keep_the_weights_the_chapters_were_written_with(build, total, absolute):
    # sums of the weights that LeNet/ResNet(seed=0) had when they still reseeded the global RNG
    # (commit aff558a): keeping the caller's RNG must not change the chapters' models
    params = [p.detach().double() for p in build().parameters()]
    assert float(sum(p.sum() for p in params)) == pytest.approx(total, rel=1e-12)
    assert float(sum(p.abs().sum() for p in params)) == pytest.approx(absolute, rel=1e-12)


def test_offline_download_keeps_what_was_there(tmp_path):
    pytest.importorskip("torchvision")
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="offline|download"):
        data.torchvision_dataset("mnist", root=tmp_path, download=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_clear_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"divide by 255"):
        metrics.psnr(X8 * 255, X8 * 255)
    with pytest.raises(ValueError, match=r"astype\(np.uint8\)"):
        data.to_tensor([np.array([[0, 255]])])
    with pytest.raises(ValueError, match=r"at least 1"):
        attacks.batch_labels(*grads(n=2), 2, rule="probe", input_shape=(1, 8, 8), probes=0)


def test_client_labels_out_of_range_are_refused_before_any_step():
    model = lenet()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"labels"):
        federated.Server(model).round([client(y=torch.tensor([0, 1, 2, 4]))])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# --- fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
pixels = st.floats(allow_nan=True, allow_infinity=True, width=32)
images = hnp.arrays(np.float32, st.tuples(st.integers(1, 2), st.sampled_from([1, 3]), st.integers(3, 6), st.integers(3, 6)), elements=pixels)


def _dlgkit_error(call: Callable[[], object]) -> Exception | None:
    try:
        call()
    except (ValueError, TypeError) as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1].filename
        assert str(Path(where).resolve()).startswith(DLGKIT_DIR), f"raised inside a dependency: {exc}"
        return exc
    return None


@FUZZ
@given(rec=images, data_=st.data())
def test_metrics_never_report_success_on_bad_images(rec, data_):
    rec = torch.from_numpy(rec)
    orig = torch.from_numpy(data_.draw(hnp.arrays(np.float32, rec.shape, elements=st.floats(0, 1, width=32))))
    finite = torch.isfinite(rec.flatten(1)).all(1)
    for fn in (metrics.psnr, metrics.mse, metrics.ssim):
        values = torch.as_tensor(fn(rec, orig))
        assert torch.equal(torch.isnan(values), ~finite), (fn.__name__, rec)
    p = metrics.psnr(rec, orig)
    assert bool((p[finite] <= 100).all())
    report = metrics.batch_report(rec, orig)
    assert math.isnan(report["psnr"]) == (not bool(finite.all()))


@FUZZ
@given(orig=images)
def test_metrics_refuse_bad_originals(orig):
    orig = torch.from_numpy(orig)
    bad = not bool(torch.isfinite(orig).all()) or float(orig.nan_to_num(0.5).min()) < 0 or float(orig.nan_to_num(0.5).max()) > 1
    for fn in (metrics.psnr, metrics.ssim, metrics.mse, metrics.batch_report):
        error = _dlgkit_error(lambda: fn(orig.clamp(0, 1).nan_to_num(0.5), orig))
        assert (error is not None) == bad
        assert error is None or "original" in str(error)


PIXEL_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int64, np.int32, np.float32, np.float64, np.bool_])


@FUZZ
@given(data_=st.data(), dtype=PIXEL_DTYPES, channels=st.sampled_from([0, 1, 2, 3, 4, 5]))
def test_to_tensor_gives_unit_range_or_a_clear_error(data_, dtype, channels):
    shape = (data_.draw(st.integers(0, 5)), data_.draw(st.integers(1, 5))) + ((channels,) if channels else ())
    if np.issubdtype(dtype, np.floating):
        elements = st.one_of(st.floats(-2, 300, width=32), st.sampled_from([NAN, math.inf, 0.0, 1.0]))
    elif dtype is np.bool_:
        elements = st.booleans()
    else:
        elements = st.integers(0, 255)
    a = data_.draw(hnp.arrays(dtype, shape, elements=elements))
    try:
        x = data.to_tensor([a], size=data_.draw(st.sampled_from([None, 4])))
    except (ValueError, TypeError) as exc:
        assert str(Path(traceback.extract_tb(exc.__traceback__)[-1].filename).resolve()).startswith(DLGKIT_DIR), exc
        return
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] in (1, 3)
    assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert dtype not in (np.int64, np.int32)  # unknown pixel scale: always refused
    if dtype == np.uint8 and a.size:
        assert abs(float(x.max()) - a.max() / 255) < 1e-6 or x.shape[-1] < a.shape[1]  # scaled, not clipped (crops aside)


@FUZZ
@given(pred=hnp.arrays(np.float32, st.integers(1, 4), elements=st.one_of(st.integers(-2, 12).map(float), st.floats(-2, 12, width=32), st.just(NAN))), true=st.lists(st.integers(0, 9), min_size=1, max_size=4))
def test_label_metrics_are_right_or_refuse(pred, true):
    pred, true = torch.from_numpy(pred), torch.tensor(true)
    for fn in (metrics.label_accuracy, metrics.multiset_label_accuracy):
        try:
            value = fn(pred, true)
        except ValueError as exc:
            assert "predicted" in str(exc) or "true labels" in str(exc)
            continue
        if math.isnan(value):  # NaN predictions (a diverged attack) score NaN, never a number
            assert fn is metrics.label_accuracy and bool(torch.isnan(pred).any())
            continue
        assert len(pred) == len(true) and bool((pred == pred.round()).all())
        assert 0 <= value <= 1


def _positive_int_args():
    model, g = grads(n=2)
    return [
        ("n", lambda v: data.lfw_faces(v)),
        ("size", lambda v: data.lfw_faces(1, size=v)),
        ("scale", lambda v: data.photo_crops(1, scale=v)),
        ("channels", lambda v: models.LeNet(channels=v)),
        ("num_classes", lambda v: models.ResNet(num_classes=v, widths=(2,))),
        ("widths", lambda v: models.ResNet(widths=(v,))),
        ("batch_size", lambda v: attacks.batch_labels(model, g, v)),
        ("probes", lambda v: attacks.batch_labels(model, g, 2, rule="probe", input_shape=(1, 8, 8), probes=v)),
        ("batch_size", lambda v: federated.Client(img(2), torch.tensor([0, 1]), batch_size=v)),
        ("local_steps", lambda v: federated.client_update(model, img(1), torch.tensor([0]), local_steps=v)),
        ("every", lambda v: strip(every=v)),
        ("columns", lambda v: viz.image_grid(img(2), columns=v)),
        ("full", lambda v: budget.budget(v, 1)),
    ]


NOT_POSITIVE_INTS = st.one_of(
    st.integers(-5, 0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(), st.just([2]), st.just(2.0)
)


@FUZZ
@given(value=NOT_POSITIVE_INTS, which=st.integers(0, 12))
def test_positive_int_arguments_refuse_everything_else(value, which):
    name, call = _positive_int_args()[which]
    if value is None and name in ("size", "batch_size", "every", "columns"):
        return  # None is allowed there (native size, full batch, no filter, one row)
    error = _dlgkit_error(lambda: call(value))
    assert error is not None and name in str(error), (name, value, error)


SEEDS = st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))


@FUZZ
@given(seed=SEEDS, which=st.integers(0, 4))
def test_seeds_must_be_non_negative_ints(seed, which):
    model, g = grads(n=2)
    call = [
        lambda: models.LeNet(seed=seed),
        lambda: models.ResNet(seed=seed, widths=(2,)),
        lambda: data.photo_crops(1, seed=seed),
        lambda: data.lfw_faces(1, num_classes=2, seed=seed),
        lambda: attacks.batch_labels(model, g, 2, rule="probe", input_shape=(1, 8, 8), seed=seed),
    ][which]
    error = _dlgkit_error(call)
    assert error is not None and "seed" in str(error)


# --- hostile calls found by a probe (each failed before its fix) -------------------------------


def test_fl_settings_refuse_unknown_keys_and_store_plain_numbers():
    pytest.importorskip("flwr")
    from dlgkit.fl.task import FLSettings

    with pytest.raises(ValueError, match=r"unknown keys \['local_steps'\]; the allowed keys are .*'local-steps'"):
        FLSettings.from_config({"local_steps": 5, "lr": 0.5})
    with pytest.raises(TypeError, match="config must be a dict"):
        FLSettings.from_config(None)
    assert FLSettings.from_config({"num-clients": 2, "lr": 0.5}, ignore_unknown=True).lr == 0.5
    s = FLSettings(local_steps=np.int64(2), lr=np.float32(0.5), seed=np.int64(1))
    assert (type(s.local_steps), type(s.lr), type(s.seed)) == (int, float, int)


def test_fl_arrays_names_must_be_strings_and_unnamed_records_get_a_hint():
    pytest.importorskip("flwr")
    from dlgkit.fl.arrays import record_to_tensors, tensors_to_record

    tensors = [torch.zeros(2), torch.ones(3)]
    for names in ([0, 1], "ab"):
        with pytest.raises(TypeError, match="names must be the model the tensors belong to or a list of str"):
            tensors_to_record(tensors, names=names)
    model = nn.Sequential(nn.Linear(2, 1))
    record = tensors_to_record([p.detach() for p in model.parameters()])
    with pytest.raises(ValueError, match="packed without names.*names=model"):
        record_to_tensors(record, model)


def test_inspect_model_flags_non_finite_weights():
    from dlgkit.model_check import inspect_model

    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    verdict = inspect_model(layer)
    assert verdict.suspicious and "NaN or inf" in verdict.reasons[0]


def test_imprint_and_trap_check_scale_and_shape_and_leave_the_global_rng_alone():
    from dlgkit.attacks import imprint, trap

    public = imprint.varied_faces(20, seed=1)
    with pytest.raises(ValueError, match="divide by 255"):
        imprint.imprint_thresholds(public * 255, 4)
    with pytest.raises(ValueError, match="floating-point image"):
        imprint.brightness((public * 255).to(torch.uint8))
    th = imprint.imprint_thresholds(public, 4)
    model = models.LeNet(channels=1, num_classes=10, image_size=32, seed=0)
    for call in (lambda: imprint.imprint_model(model, 64, th), lambda: trap.trap_model(model, 64, neurons=8)):
        with pytest.raises(TypeError, match=r"input_shape must be the shape of one input.*\(1, 32, 32\)"):
            call()
    for call in (lambda: imprint.imprint_model(model, (1, 32, 32), th, seed=3), lambda: trap.trap_model(model, (1, 32, 32), neurons=8, seed=3)):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        call()
        assert torch.equal(torch.rand(3), expected)


def _check_output(check, fn) -> tuple[bool, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = check(fn)
    return result, buf.getvalue()


def test_exercise_checks_grade_float_ids_float64_answers_and_sys_exit():
    import torch.nn.functional as F

    from dlgkit.exercises import images as ex_images
    from dlgkit.exercises import text as ex_text

    def ids(g):
        return (g != 0).any(1).nonzero().flatten()

    assert _check_output(ex_text.check_bag_of_words, ids)[0] is True
    for wrong in (lambda g: ids(g).double() + 0.5, lambda g: [str(i) for i in ids(g).tolist()], lambda g: [None]):
        result, out = _check_output(ex_text.check_bag_of_words, wrong)
        assert result is False and "whole numbers" in out, out

    def grads64(m, x, y):
        return [g.double() for g in torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))]

    result, out = _check_output(ex_images.check_shared_gradient, grads64)
    assert result is True, out  # graded in the check's float32, not a crash blamed on the student
    result, out = _check_output(ex_images.check_shared_gradient, lambda m, x, y: sys.exit(1))
    assert result is False and "your function raised SystemExit" in out, out


if __name__ == "__main__":
    counts: dict[str, int] = {}
    for case in CASES:
        outcome, detail = run_case(case)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("ok", "clear", "warned") or "-v" in sys.argv:
            print(f"{outcome:8s} {case.id}: {detail[:160]}")
    print(f"{len(CASES)} cases:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
