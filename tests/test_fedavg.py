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


# --- the batched FedAvg-aware attack (the vectorised engine) -----------------------------------


def test_local_sgd_is_the_replay_of_fedavg_observation():
    """The torch.func replay gives the same update as the autograd one, mini-batches included,
    and both equal what the client sent."""
    from torch.func import functional_call

    from dlgkit.attacks.fedavg import local_sgd

    model, x, y, update = _client(steps=3, mini=2, n=4)
    names = [n for n, _ in model.named_parameters()]
    weights = {n: p.detach() for n, p in model.named_parameters()}
    functional = local_sgd(3, 0.1, 2)(lambda w, inputs: functional_call(model, w, (inputs,)), weights, x, y)
    replay = fedavg_observation(3, 0.1, 2)(model, x, y)
    for name, r, u in zip(names, replay, update):
        assert torch.allclose(functional[name], r, atol=1e-6)
        assert torch.allclose(functional[name], u, atol=1e-6)


def test_many_fedavg_attacks_agree_with_the_sequential_ones():
    """Three updates (two global models, mini-batches of 2, E = 2) attacked at once score like
    the same attacks one at a time (the line search differs, so not bit for bit)."""
    from dlgkit.attacks.fedavg import reconstruct_fedavg_many

    config = attacks.RECOMMENDED.with_(restarts=1, iterations=30, float64=True, distance="cosine", tv=1e-4)
    faces, labels = data.lfw_faces(n=4, size=32, num_classes=10, seed=0)

    def client(seed, part):
        model = models.LeNet(channels=1, num_classes=10, image_size=32, seed=seed)
        x, y = faces[part], labels[part]
        return model, x, y, federated.client_update(model, x, y, lr=0.1, local_steps=2, batch_size=2).tensors

    clients = [client(0, slice(0, 2)), client(1, slice(0, 2)), client(1, slice(2, 4))]
    many = reconstruct_fedavg_many([c[0] for c in clients], [c[3] for c in clients], (2, 1, 32, 32), config,
                                   labels=[c[2] for c in clients], local_steps=2, local_lr=0.1, batch_size=2,
                                   history_every=None, progress=False)
    for (model, x, y, update), result in zip(clients, many):
        one = reconstruct_fedavg(model, update, x.shape, config, labels=y, local_steps=2, local_lr=0.1, batch_size=2,
                                 history_every=None, progress=False)
        psnr_many, psnr_one = result.report(x, y).psnr, one.report(x, y).psnr
        assert psnr_many >= 25 and abs(psnr_many - psnr_one) < 5, (psnr_many, psnr_one)
        assert torch.equal(result.labels, y)


def test_many_fedavg_attacks_refuse_bad_input():
    from dlgkit.attacks.fedavg import reconstruct_fedavg_many
    from dlgkit.attacks.vectorised import reconstruct_many

    model, x, y, update = _client(steps=1)
    run = lambda updates, **kw: reconstruct_fedavg_many(model, updates, x.shape, attacks.RECOMMENDED.with_(iterations=1),
                                                        **{"labels": [y], "local_steps": 1, "local_lr": 0.1, **kw})
    with pytest.raises(TypeError, match="updates must be a non-empty list"):
        run([])
    with pytest.raises(ValueError, match=r"updates\[0\] is all zeros"):
        run([[torch.zeros_like(u) for u in update]])
    with pytest.raises(TypeError, match="labels must be the clients' class indices"):
        run([update], labels=None)
    with pytest.raises(ValueError, match="local_steps"):
        run([update], local_steps=0)
    with pytest.raises(ValueError, match=r"updates\[0\]"):
        run([[u.clone().fill_(float("nan")) for u in update]])
    # an autograd observe(model, x, y) cannot be batched: a clear error, not a vmap trace
    with pytest.raises(TypeError, match="observe must be a batchable observation"):
        reconstruct_many(model, [update], x.shape, labels=[y], observe=fedavg_observation(1, 0.1))


def test_many_fedavg_attacks_explain_missing_labels_one_update_and_rounded_updates():
    """Probe findings: a None among the labels ran iDLG on the update and guessed the labels
    wrongly without a word; one update passed bare, or rounded to integers, got unclear errors."""
    from dlgkit.attacks.fedavg import reconstruct_fedavg_many

    model, x, y, update = _client(steps=2, mini=1, n=2)
    other = models.LeNet(channels=1, num_classes=10, image_size=32, seed=1)
    second = federated.client_update(other, x, y, lr=0.1, local_steps=2, batch_size=1).tensors
    run = lambda updates, **kw: reconstruct_fedavg_many([model, other][: len(updates)], updates, x.shape, attacks.RECOMMENDED.with_(iterations=2, restarts=1),
                                                        **{"labels": [y, y], "local_steps": 2, "local_lr": 0.1, "batch_size": 1, "progress": False, **kw})
    with pytest.raises(TypeError, match=r"labels\[1\] is None.*cannot read them off an update"):
        run([update, second], labels=[y, None])
    with pytest.raises(TypeError, match=r"updates is one update.*pass \[update\]"):
        run(update)
    rounded = [(u * 1e4).long() for u in second]
    assert any(bool(t.any()) for t in rounded)
    with pytest.raises(ValueError, match=r"updates\[1\]\[0\] has dtype torch.int64"):
        run([update, rounded])
    # valid input still runs, with the labels it was given
    results = run([update, second])
    assert [r.labels.tolist() for r in results] == [y.tolist(), y.tolist()]


@pytest.mark.parametrize("quiet", [None, "no", 0, 1])
def test_flower_log_refuses_a_quiet_that_is_not_a_bool(quiet):
    """Probe finding: flower_log("no") silenced the log (a truthy string) and None showed it."""
    import logging

    from dlgkit.fl.simulation import flower_log

    logger = logging.getLogger("flwr")
    before = logger.level
    with pytest.raises(TypeError, match="quiet must be True .* or False"):
        with flower_log(quiet):
            pass
    assert logger.level == before


def test_idlg_labels_are_refused_for_a_replayed_update():
    """The update's last-layer signs are not a gradient's: iDLG would read wrong labels, so the
    sequential engine asks for the labels too (the batched one does, in test_vectorised)."""
    model, x, y, update = _client(steps=2)
    with pytest.raises(ValueError, match="labels=None with config.labels='idlg'.*pass labels"):
        attacks.reconstruct(model, update, x.shape, attacks.RECOMMENDED.with_(iterations=1), observe=fedavg_observation(2, 0.1))
    # with the labels given, the same call runs
    attacks.reconstruct(model, update, x.shape, attacks.RECOMMENDED.with_(iterations=1, restarts=1), labels=y,
                        observe=fedavg_observation(2, 0.1), history_every=None, progress=False)
