"""Device placement, checked without a GPU.

``tests/support/simulated_cuda.py`` makes PyTorch see a CUDA device whose tensors compute on the CPU
but refuse, as a real GPU does, to meet CPU tensors in one operation, to become NumPy arrays,
or to take a CPU random generator. Each test runs a piece of dlgkit with its model on that
device and checks the result against the same call on the CPU: equal numbers mean the library
put everything where it belongs and computed the same thing there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import simulated_cuda  # noqa: E402

from dlgkit import attacks, budget, data, defences, federated, metrics, models, viz  # noqa: E402


@pytest.fixture
def cuda():
    with simulated_cuda.simulated():
        yield budget.default_device()


def _face_and_model(num_classes=10, n=1):
    faces, labels = data.lfw_faces(n, size=32, num_classes=num_classes)
    return faces, labels, models.LeNet(channels=1, num_classes=num_classes, image_size=32, seed=0)


def test_simulator_refuses_what_a_gpu_refuses(cuda):
    assert cuda.type == "cuda" and torch.cuda.is_available()
    model = torch.nn.Linear(3, 2).to(cuda)
    with pytest.raises(simulated_cuda.DeviceMixError, match="same device"):
        model(torch.ones(1, 3))
    on_gpu = torch.ones(2, 3).to(cuda)
    with pytest.raises(TypeError, match="numpy"):
        on_gpu.numpy()
    with pytest.raises(simulated_cuda.DeviceMixError, match="generator"):
        torch.randn(3, generator=torch.Generator().manual_seed(0), device=cuda)
    with torch.no_grad():
        assert float(model(on_gpu).sum().cpu()) == pytest.approx(float(model.cpu()(torch.ones(2, 3)).sum()))


def test_simulator_is_undone():
    with simulated_cuda.simulated():
        pass
    assert torch.Generator is simulated_cuda._RealGenerator
    assert torch.ones(2).device.type == "cpu"


def test_device_helpers(cuda):
    assert budget.resolve_device(None) == cuda
    assert budget.resolve_device("cpu") == torch.device("cpu")
    assert budget.device_of(torch.nn.Linear(2, 2).to(cuda)).type == simulated_cuda.SIMULATED.type  # how the simulator reports CUDA
    with pytest.raises(ValueError, match="not a device"):
        budget.resolve_device("gpu0")


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        budget.resolve_device("cuda")


def test_federated_round_and_image_attack_on_cuda(cuda):
    faces, labels, model = _face_and_model()
    cpu_grads = federated.client_gradient(model, faces, labels)
    cpu_result = attacks.reconstruct(model, cpu_grads, faces.shape, attacks.RECOMMENDED.with_(iterations=8), seed=0, progress=False)
    gpu_model = models.LeNet(channels=1, num_classes=10, image_size=32, seed=0).to(cuda)
    grads = federated.client_gradient(gpu_model, faces, labels)  # data from the CPU: moved to the model
    result = attacks.reconstruct(gpu_model, grads, faces.shape, attacks.RECOMMENDED.with_(iterations=8), seed=0, progress=False)
    assert torch.equal(result.reconstruction, cpu_result.reconstruction)
    assert result.report(faces.to(cuda), labels.to(cuda))["psnr"] == pytest.approx(cpu_result.report(faces, labels)["psnr"])
    viz.show_pairs(faces.to(cuda), result.reconstruction)  # plotting takes tensors from either device

    x, y = data.digits(64)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).to(cuda)
    server = federated.Server(net, lr=0.5)
    server.round([federated.Client(x[:32], y[:32], batch_size=8), federated.Client(x[32:], y[32:], batch_size=8)])
    server.round([federated.Client(x, y)], mode="fedavg", local_steps=2)


def test_batch_labels_on_cuda(cuda):
    faces, labels, model = _face_and_model(num_classes=20, n=4)
    labels = torch.tensor([3, 7, 7, 12])
    cpu = attacks.batch_labels(model, federated.client_gradient(model, faces, labels), 4, rule="probe", input_shape=faces.shape)
    model = model.to(cuda)
    grads = federated.client_gradient(model, faces.to(cuda), labels.to(cuda))
    for rule in attacks.labels.BATCH_RULES:
        assert len(attacks.batch_labels(model, grads, 4, rule=rule, input_shape=faces.shape)) == 4
    assert attacks.batch_labels(model, grads, 4, rule="probe", input_shape=faces.shape).tolist() == cpu.tolist()


@pytest.mark.parametrize("defence", [defences.Defence("gaussian", 1e-3), defences.Defence("laplacian", 1e-3), defences.Defence("prune", 0.7),
                                     defences.Defence("int8"), defences.Defence("local_steps", 2), defences.Defence("dp_sgd", 1.0)])
def test_defences_on_cuda(cuda, defence):
    faces, labels, _ = _face_and_model()
    model = models.LeNet(channels=1, num_classes=10, image_size=32, seed=0).to(cuda)
    result = defences.attack_defended(model, faces, labels, defence, attacks.AttackConfig(iterations=3), adaptive=defence.kind == "prune")
    assert result["reconstruction"].device.type == "cpu" and result["relative_change"] > 0
    if defence.kind != "dp_sgd":  # noise drawn on the CPU generator: the same numbers on both devices
        cpu = defences.attack_defended(model.cpu(), faces, labels, defence, attacks.AttackConfig(iterations=3), adaptive=defence.kind == "prune")
        assert result["relative_change"] == pytest.approx(cpu["relative_change"], rel=1e-5)


def test_training_with_dp_sgd_on_cuda(cuda):
    subset = tuple(t[:200] for t in defences._digits_split())
    trained = defences.train_with_defence(defences.Defence("dp_sgd", 1.0), steps=3, batch_size=16, data=subset)
    assert next(trained.model.parameters()).device.type != "cpu" and 0 <= trained.accuracy <= 1
    rows = defences.privacy_accuracy_sweep([defences.Defence("prune", 0.5)], *data.lfw_faces(1, size=32), attacks.AttackConfig(iterations=2), train_steps=2, num_classes=10)
    assert rows[0]["reconstructions"].device.type == "cpu" and "adaptive_psnr" in rows[0]


def test_text_attacks_on_cuda(cuda):
    from dlgkit import nlp
    from dlgkit.attacks import text as text_attacks

    tm = nlp.load_text_model(pretrained=True)
    assert budget.device_of(tm.model).type != "cpu"
    position_ids = tm.model.bert.embeddings.position_ids  # a buffer transformers fills while loading
    assert position_ids[0, :4].tolist() == [0, 1, 2, 3]
    sentence = "the cat sat on the mat"
    grads = nlp.text_gradient(tm, sentence, 1)
    truth = tm.encode(sentence)["input_ids"][0]
    bag = text_attacks.bag_of_words(grads, tm)
    assert bag.ids.tolist() == sorted(set(truth.tolist()))
    span = text_attacks.span_recover(grads, tm, candidates="bag")
    assert metrics.token_accuracy(span.ids, truth) == 1.0
    run = text_attacks.reconstruct_text(tm, grads, text_attacks.TextAttackConfig(iterations=3, parametrization="bag", span_weight=10.0), record_every=1, seed=0)
    assert len(run.ids) == len(truth) and run.embeddings.device.type == "cpu"
    run = text_attacks.reconstruct_text(tm, grads, text_attacks.TextAttackConfig(iterations=3, decode="cosine"), seed=0)
    assert len(text_attacks.decode_embeddings(tm, run.embeddings, "euclidean")) == len(truth)
