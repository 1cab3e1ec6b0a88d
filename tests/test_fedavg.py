"""Chapter 6's FedAvg attacks: the engine's float64 distances and reconstruct_fedavg."""

import pytest
import torch

from dlgkit import attacks, data, federated, models
from dlgkit.attacks import engine
from dlgkit.attacks.fedavg import fedavg_observation, reconstruct_fedavg


def _client(steps=2, mini=None, n=1, seed=0):
    x, y = data.lfw_faces(n=n, size=32, num_classes=10, seed=0)
    model = models.LeNet(channels=1, num_classes=10, image_size=32, seed=seed)
    update = federated.client_update(model, x, y, lr=0.1, local_steps=steps, batch_size=mini).tensors
    return model, x, y, update


def test_float64_sums_the_distance_in_float64_and_refuses_non_flags():
    a = [torch.randn(3, generator=torch.Generator().manual_seed(0))]
    problem = engine.Problem(variables=[], observe=lambda create_graph: a, target=[a[0] * 2])
    value, data64 = engine._compute_objective(problem, "cosine", False, float64=True)
    assert data64.dtype == torch.float64 and value.dtype == torch.float64
    assert engine._compute_objective(problem, "cosine", False)[1].dtype == torch.float32
    assert abs(float(data64)) < 1e-12  # parallel lists: cosine distance 0
    with pytest.raises(ValueError, match="float64 must be True or False"):
        attacks.RECOMMENDED.with_(float64=1)


def test_float64_rescues_the_cosine_attack_on_a_small_update():
    """A FedAvg update is about lr times a gradient; in float32 the cosine sums lose the
    digits the attack needs at the end, in float64 they do not."""
    model, x, y, update = _client(steps=2)
    config = attacks.RECOMMENDED.with_(restarts=1, iterations=60, distance="cosine")
    psnr = {flag: reconstruct_fedavg(model, update, x.shape, config.with_(float64=flag), labels=y, local_steps=2, local_lr=0.1,
                                     history_every=None, progress=False).report(x, y).psnr for flag in (False, True)}
    assert psnr[True] >= 30 and psnr[True] >= psnr[False], psnr


def test_aware_attack_recovers_a_face_and_beats_naive_l2_at_several_steps():
    model, x, y, update = _client(steps=5)
    config = attacks.RECOMMENDED.with_(restarts=1, iterations=60, float64=True)
    run = lambda kind: reconstruct_fedavg(model, update, x.shape, config, labels=y, local_steps=5, local_lr=0.1, attack=kind,
                                          history_every=None, progress=False).report(x, y).psnr
    aware, naive = run("aware"), run("naive")
    assert aware >= 30 and aware > naive + 5, (aware, naive)


def test_aware_target_is_scaled_to_unit_norm():
    model, x, y, update = _client(steps=3)
    seen = {}
    import dlgkit.attacks.image as image

    def spy(model, target, shape, config, **kw):
        seen["norm"] = float(torch.sqrt(sum(t.double().square().sum() for t in target)))
        seen["observed"] = kw["observe"](model, x, y)
        return None

    real = image.reconstruct
    image.reconstruct = spy
    try:
        reconstruct_fedavg(model, update, x.shape, attacks.RECOMMENDED, labels=y, local_steps=3, local_lr=0.1)
    finally:
        image.reconstruct = real
    assert seen["norm"] == pytest.approx(1.0, rel=1e-6)
    scale = float(torch.sqrt(sum(u.double().square().sum() for u in update)))
    replay = fedavg_observation(3, 0.1)(model, x, y)
    assert all(torch.allclose(o * scale, r, atol=1e-7) for o, r in zip(seen["observed"], replay))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"attack": "smart"}, ValueError, "attack"),
        ({"labels": [3]}, TypeError, "labels must be a tensor"),
        ({"local_steps": 0}, ValueError, "local_steps"),
        ({"local_lr": -0.1}, ValueError, "local_lr"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"update": torch.zeros(3)}, TypeError, "update must be a non-empty list"),
        ({"update": "zeros"}, TypeError, "update must be a non-empty list"),
        ({"update": "nan"}, ValueError, "update"),
        ({"update": "allzero"}, ValueError, "all zeros"),
    ],
)
def test_reconstruct_fedavg_refuses_bad_input(kwargs, error, match):
    model, x, y, update = _client(steps=1)
    args = {"labels": y, "local_steps": 1, "local_lr": 0.1, "attack": "aware", "batch_size": None, "update": update}
    args.update(kwargs)
    if isinstance(args["update"], str) and args["update"] == "nan":
        args["update"] = [u.clone().fill_(float("nan")) for u in update]
    elif isinstance(args["update"], str) and args["update"] == "allzero":
        args["update"] = [torch.zeros_like(u) for u in update]
    upd = args.pop("update")
    with pytest.raises(error, match=match):
        reconstruct_fedavg(model, upd, x.shape, attacks.RECOMMENDED.with_(iterations=1), history_every=None, progress=False, **args)
