import pytest
import torch
from torch import nn

from dlgkit import federated, models


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))


def test_client_gradient_matches_autograd():
    model = _mlp()
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 1])
    grads = federated.client_gradient(model, x, y)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(not g.requires_grad for g in grads)


def test_soft_labels_equal_hard_labels_for_one_hot():
    logits = torch.randn(3, 4)
    y = torch.tensor([0, 3, 1])
    onehot = nn.functional.one_hot(y, 4).float()
    assert torch.allclose(federated.soft_cross_entropy(logits, y), federated.soft_cross_entropy(logits, onehot))


def test_one_local_step_is_minus_lr_times_gradient():
    model = _mlp()
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 1])
    grads = federated.client_gradient(model, x, y)
    update = federated.client_update(model, x, y, lr=0.5, local_steps=1)
    assert update.kind == "weights" and update.num_examples == 4
    assert all(torch.allclose(d, -0.5 * g, atol=1e-6) for d, g in zip(update.tensors, grads))
    several = federated.client_update(model, x, y, lr=0.5, local_steps=3, batch_size=2)
    assert not torch.allclose(several.tensors[0], update.tensors[0])


def test_server_aggregates_weighted_mean_and_learns():
    model = _mlp()
    x = torch.rand(40, 6)
    y = (x[:, 0] * 3).long().clamp(max=2)
    clients = [federated.Client(x[:30], y[:30]), federated.Client(x[30:], y[30:])]
    server = federated.Server(model, lr=1.0)
    updates = [c.share_gradient(model) for c in clients]
    mean = server.aggregate(updates)
    full = federated.client_gradient(model, x, y)
    # weighting by example count makes the mean of the two clients equal the gradient on all data
    assert all(torch.allclose(m, f, atol=1e-6) for m, f in zip(mean, full))
    before = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(30):
        server.round(clients)
    after = nn.functional.cross_entropy(model(x), y).item()
    assert after < before - 0.05
    assert len(server.received) == 60
    server.round(clients, mode="fedavg", local_steps=2)
    assert server.received[-1].kind == "weights"


def test_errors_are_explained():
    model = _mlp()
    with pytest.raises(ValueError, match="labels"):
        federated.client_gradient(model, torch.rand(4, 6), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="torch tensors"):
        federated.client_gradient(model, [[0.0] * 6], torch.tensor([0]))
    with pytest.raises(ValueError, match="local_steps"):
        federated.client_update(model, torch.rand(2, 6), torch.tensor([0, 1]), local_steps=0)
    with pytest.raises(ValueError, match="mode"):
        federated.Server(model).round([], mode="fedprox")
    with pytest.raises(ValueError, match="at least one"):
        federated.Server(model).aggregate([])
    with pytest.raises(ValueError, match=r"x is torch.float64 but the model's weights are torch.float32; convert one"):
        federated.client_gradient(model, torch.rand(2, 6, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cannot take x of shape \(2, 5\)"):
        federated.client_gradient(model, torch.rand(2, 5), torch.tensor([0, 1]))


def test_check_gradients():
    model = models.LeNet(channels=1, num_classes=10, image_size=16)
    good = [torch.zeros_like(p) for p in model.parameters()]
    assert len(federated.check_gradients(model, good)) == len(good)
    with pytest.raises(ValueError, match="trainable parameters"):
        federated.check_gradients(model, good[:-1])
    with pytest.raises(ValueError, match="shape"):
        federated.check_gradients(model, good[:-1] + [torch.zeros(3)])
    with pytest.raises(TypeError, match="list of tensors"):
        federated.check_gradients(model, torch.zeros(3))
