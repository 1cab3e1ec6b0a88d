import pytest
import torch

from dlgkit import models


@pytest.mark.parametrize("channels,size,classes,feat", [(3, 32, 100, 768), (1, 32, 10, 768), (1, 25, 7, 588), (3, 64, 10, 3072)])
def test_lenet_shapes(channels, size, classes, feat):
    model = models.LeNet(channels=channels, num_classes=classes, image_size=size, seed=0)
    assert model.fc.in_features == feat
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, classes)


def test_lenet_matches_paper_architecture():
    model = models.LeNet(seed=0)
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 1]
    assert all(c.out_channels == 12 and c.kernel_size == (5, 5) and c.padding == (2, 2) for c in convs)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.body) == 3
    values = torch.cat([p.flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() <= 0.5
    assert values.std() > 0.25  # uniform on [-0.5, 0.5] has std 0.289, far above PyTorch's default init


def test_lenet_seed_is_reproducible():
    a, b = models.LeNet(seed=3), models.LeNet(seed=3)
    c = models.LeNet(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_lenet_bad_input_is_explained():
    model = models.LeNet(channels=1, image_size=32)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="activation"):
        models.LeNet(activation="gelu")
    with pytest.raises(ValueError, match="channels"):
        models.LeNet(channels=0)


def test_resnet_forward_and_errors():
    model = models.ResNet(channels=3, num_classes=10, widths=(8, 16), seed=0)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="ResNet expects"):
        model(torch.rand(2, 1, 32, 32))


def test_relu_warning():
    assert models.has_non_smooth_activation(models.LeNet()) == []
    relu = models.LeNet(activation="relu")
    assert len(models.has_non_smooth_activation(relu)) == 3
    with pytest.warns(UserWarning, match="twice-differentiable"):
        models.warn_if_non_smooth(relu)


def test_lenet_default_init_keeps_pytorch_initialisation():
    paper = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0)
    default = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0, init="default")
    # PyTorch's Kaiming-uniform init is far narrower than U(-0.5, 0.5) for the linear layer
    assert float(default.fc.weight.abs().max()) < 0.1 < float(paper.fc.weight.abs().max())
    with pytest.raises(ValueError, match="init"):
        models.LeNet(init="xavier")


def test_resnet_without_strides_is_the_papers_variant():
    strided = models.ResNet(channels=1, num_classes=10, widths=(4, 8), seed=0)
    paper = models.ResNet(channels=1, num_classes=10, widths=(4, 8), seed=0, strides=False, blocks=2)
    assert sum(isinstance(m, models._BasicBlock) for m in paper.modules()) == 4  # two blocks per stage
    assert all(m.stride == (1, 1) for m in paper.modules() if isinstance(m, torch.nn.Conv2d))
    assert any(m.stride == (2, 2) for m in strided.modules() if isinstance(m, torch.nn.Conv2d))
    # the classifier sees the last 32x32 map averaged over 4x4 windows: 8 channels x 8 x 8
    assert paper.head.in_features == 8 * 8 * 8 and strided.head.in_features == 8
    x = torch.rand(2, 1, 32, 32)
    assert paper(x).shape == (2, 10)
    with pytest.raises(ValueError, match="32x32 inputs"):
        paper(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        models.ResNet(channels=1, strides=False, image_size=30)
    with pytest.raises(ValueError, match="blocks"):
        models.ResNet(channels=1, blocks=0)
