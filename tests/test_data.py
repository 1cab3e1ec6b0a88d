import numpy as np
import pytest
import torch

from dlgkit import data


def _in_unit_range(x):
    return x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_lfw_faces():
    x, y = data.lfw_faces(5, size=32)
    assert x.shape == (5, 1, 32, 32) and _in_unit_range(x)
    assert y.tolist() == [0, 1, 2, 3, 4]
    native, _ = data.lfw_faces(2, size=None)
    assert native.shape == (2, 1, 25, 25)
    _, labels = data.lfw_faces(10, num_classes=7, seed=1)
    assert labels.max() < 7 and labels.min() >= 0
    assert x.std() > 0.1  # real pictures, not a constant


def test_lfw_faces_errors():
    with pytest.raises(ValueError, match="only 100"):
        data.lfw_faces(101)
    with pytest.raises(ValueError, match="size"):
        data.lfw_faces(2, size=0)


def test_photos_and_crops():
    x, y = data.photos(["astronaut", "chelsea"], size=32)
    assert x.shape == (2, 3, 32, 32) and _in_unit_range(x)
    assert y.tolist() == [data.PHOTO_NAMES.index("astronaut"), data.PHOTO_NAMES.index("chelsea")]
    grey, _ = data.photos(["coffee"], size=16, grey=True)
    assert grey.shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown photo"):
        data.photos(["lena"])
    crops, labels = data.photo_crops(6, size=32, seed=0)
    again, _ = data.photo_crops(6, size=32, seed=0)
    assert crops.shape == (6, 3, 32, 32) and torch.equal(crops, again) and _in_unit_range(crops)
    assert len(labels) == 6


def test_digits():
    x, y = data.digits()
    assert x.shape == (1797, 1, 8, 8) and _in_unit_range(x)
    assert set(y.tolist()) == set(range(10))
    x16, _ = data.digits(n=10, size=16)
    assert x16.shape == (10, 1, 16, 16) and _in_unit_range(x16)


def test_load_image_roundtrip(tmp_path):
    from skimage.io import imsave

    img = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    imsave(path, img)
    x = data.load_image(path, size=20)
    assert x.shape == (1, 3, 20, 20) and _in_unit_range(x)
    native = data.load_image(path, size=None)
    assert native.shape == (1, 3, 40, 40)  # centre-cropped to a square
    assert torch.allclose(native[0, :, 0, 0], torch.tensor(img[0, 5] / 255.0, dtype=torch.float32), atol=1e-6)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        data.load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="could not read"):
        data.load_image(bad)


def test_torchvision_dataset_offline_error(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(RuntimeError, match="download=True"):
        data.torchvision_dataset("cifar10", root=tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.torchvision_dataset("imagenet", root=tmp_path)


def test_to_tensor_rejects_bad_shapes():
    with pytest.raises(ValueError, match="HxW"):
        data.to_tensor([np.zeros((2, 2, 2, 2))])
    with pytest.raises(ValueError, match="no images"):
        data.to_tensor([])
