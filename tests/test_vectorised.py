"""The vectorised engine (``dlgkit.attacks.vectorised.reconstruct_many``) against the sequential
one: the same problems give the same answers, each problem keeps to itself (stopping,
restarts, a NaN), bad input is explained, and the CUDA simulator finds no CPU tensor mixed in."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dlgkit import attacks, data, federated, models
from dlgkit.attacks import vectorised
from dlgkit.attacks.vectorised import BatchedLBFGS, reconstruct_many
from dlgkit.checks import SUCCESS_PSNR

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import simulated_cuda  # noqa: E402

SHAPE = (1, 1, 16, 16)


@pytest.fixture(scope="module")
def faces():
    """Three faces, each with its own LeNet (different weights) and shared gradient."""
    x, y = data.lfw_faces(3, size=16, num_classes=10)
    nets = [models.LeNet(channels=1, num_classes=10, image_size=16, seed=i) for i in range(3)]
    grads = [federated.client_gradient(net, x[i : i + 1], y[i : i + 1]) for i, net in enumerate(nets)]
    return x, y, nets, grads


def _sequential(nets, grads, config, **kw):
    return [attacks.reconstruct(net, g, SHAPE, config, seed=i, progress=False, **kw) for i, (net, g) in enumerate(zip(nets, grads))]


def test_adam_matches_the_sequential_engine(faces):
    _, _, nets, grads = faces
    config = attacks.AttackConfig(optimizer="adam", lr=0.1, iterations=25, tol=None, tv=1e-3)
    sequential = _sequential(nets, grads, config)
    together = reconstruct_many(nets, grads, SHAPE, config, seeds=[0, 1, 2])
    for s, v in zip(sequential, together):
        # Adam acts element by element: the same updates, up to float32 rounding of the batched kernels
        assert v.iterations == s.iterations == 25
        assert torch.allclose(v.reconstruction, s.reconstruction, atol=1e-4), (v.reconstruction - s.reconstruction).abs().max()
        assert v.losses == pytest.approx(s.losses, rel=1e-3)
        assert v.history_iters == s.history_iters and len(v.history) == len(s.history)
    one = reconstruct_many(nets[:1], grads[:1], SHAPE, config, seeds=[0])[0]
    assert torch.allclose(one.reconstruction, together[0].reconstruction, atol=1e-6)


def test_lbfgs_agrees_with_the_sequential_engine(faces):
    x, y, nets, grads = faces
    config = attacks.RECOMMENDED.with_(iterations=40)
    sequential = _sequential(nets, grads, config)
    together = reconstruct_many(nets, grads, SHAPE, config, seeds=[0, 1, 2])
    for i, (s, v) in enumerate(zip(sequential, together)):
        rs, rv = s.report(x[i : i + 1], y[i : i + 1]), v.report(x[i : i + 1], y[i : i + 1])
        assert rs.success and rv.success, (rs, rv)
        assert rv.label_accuracy == 1.0 and torch.equal(v.labels, s.labels)
        # both stop at the same threshold; above 30 dB the PSNR only says how far below it they landed
        tol = attacks.engine.absolute_tol(config, grads[i], 1)
        assert rv.status == rs.status == "converged" and v.final_loss < tol and s.final_loss < tol
        assert abs(v.iterations - s.iterations) <= 5


def test_shared_model_known_labels_and_joint_labels(faces):
    x, y, nets, _ = faces
    grads = [federated.client_gradient(nets[0], x[i : i + 1], y[i : i + 1]) for i in range(3)]
    known = reconstruct_many(nets[0], grads, SHAPE, attacks.RECOMMENDED.with_(iterations=40), labels=y.view(3, 1), seeds=7)
    assert [r.label_mode for r in known] == ["known"] * 3
    assert all(r.report(x[i : i + 1], y[i : i + 1]).success for i, r in enumerate(known))
    joint = reconstruct_many(nets[0], grads, SHAPE, attacks.AttackConfig(labels="joint", iterations=40, restarts=2), seeds=[0, 1, 2])
    for i, r in enumerate(joint):
        assert r.label_mode == "joint" and r.label_probs.shape == (1, 10)
        assert r.report(x[i : i + 1], y[i : i + 1]).label_accuracy == 1.0


def _float64(faces):
    x, y, nets, _ = faces
    nets64 = [copy.deepcopy(net).double() for net in nets]
    return nets64, [federated.client_gradient(net, x[i : i + 1].double(), y[i : i + 1]) for i, net in enumerate(nets64)]


def test_stopping_and_restarts_are_per_problem(faces):
    x, y, nets, grads = faces
    # in float64: which problems share an evaluation changes the float32 rounding, which
    # L-BFGS amplifies within a few steps; the logic must not depend on when the host looks
    nets64, grads64 = _float64(faces)
    config = attacks.AttackConfig(iterations=4, restarts=3, tol=None, patience=None, restart_policy="always")
    every_step = reconstruct_many(nets64, grads64, SHAPE, config, seeds=[0, 1, 2], check_every=1)
    seldom = reconstruct_many(nets64, grads64, SHAPE, config, seeds=[0, 1, 2], check_every=3)
    for a, b in zip(every_step, seldom):
        assert a.statuses == b.statuses == ["budget"] * 3
        assert len(a.restart_losses) == 3 and a.final_loss == min(a.restart_losses)
        assert a.restart_losses == pytest.approx(b.restart_losses, rel=1e-4)  # every trial, restarts included
        assert torch.allclose(a.reconstruction, b.reconstruction, atol=1e-6)  # when the host looks changes nothing
    # problems that converge stop while one with a wrong label goes on until it stalls
    wrong = y.clone().view(3, 1)
    wrong[2] = (wrong[2] + 1) % 10
    mixed = reconstruct_many(nets, grads, SHAPE, attacks.RECOMMENDED.with_(iterations=60, restarts=1), labels=wrong, seeds=[0, 1, 2])
    assert [r.status for r in mixed[:2]] == ["converged"] * 2 and mixed[2].status in ("stalled", "budget")
    assert max(r.iterations for r in mixed[:2]) < mixed[2].iterations


def test_a_diverging_problem_does_not_poison_the_others(faces):
    x, y, nets, grads = faces
    broken = models.LeNet(channels=1, num_classes=10, image_size=16, seed=1)
    with torch.no_grad():
        broken.fc.bias[0] = math.nan  # its observations are NaN from the first step
    config = attacks.RECOMMENDED.with_(iterations=30)
    clean = reconstruct_many(nets, grads, SHAPE, config, seeds=[0, 1, 2])
    mixed = reconstruct_many([nets[0], broken, nets[2]], grads, SHAPE, config, seeds=[0, 1, 2])
    bad = mixed[1].report(x[1:2], y[1:2])
    assert mixed[1].statuses[0] == "diverged" and math.isnan(bad.psnr) and not bad.success
    for i in (0, 2):  # L-BFGS amplifies the rounding of a batch of another size: compare outcomes
        assert mixed[i].status == clean[i].status == "converged" and abs(mixed[i].iterations - clean[i].iterations) <= 3
        assert mixed[i].report(x[i : i + 1], y[i : i + 1]).psnr >= SUCCESS_PSNR
    adam = attacks.AttackConfig(optimizer="adam", iterations=5, tol=None)
    clean = reconstruct_many(nets, grads, SHAPE, adam)
    mixed = reconstruct_many([nets[0], broken, nets[2]], grads, SHAPE, adam)
    assert mixed[1].status == "diverged" and math.isnan(mixed[1].report(x[1:2], y[1:2]).mse)
    for i in (0, 2):  # Adam does not: the same numbers
        assert mixed[i].status == "budget" and torch.allclose(mixed[i].reconstruction, clean[i].reconstruction, atol=1e-6)


def test_bad_inputs_are_explained(faces):
    _, y, nets, grads = faces
    config = attacks.RECOMMENDED.with_(iterations=2)
    with pytest.raises(ValueError, match="models has 2 model.*targets has 3"):
        reconstruct_many(nets[:2], grads, SHAPE, config)
    with pytest.raises(TypeError, match="one gradient list"):
        reconstruct_many(nets[0], grads[0], SHAPE, config)
    with pytest.raises(TypeError, match="targets must be a non-empty list"):
        reconstruct_many(nets[0], [], SHAPE, config)
    colour = models.LeNet(channels=3, num_classes=10, image_size=16, seed=0)
    with pytest.raises(ValueError, match=r"models\[1\] differs"):
        reconstruct_many([nets[0], colour], grads[:2], SHAPE, config)
    with pytest.raises(ValueError, match=r"targets\[1\] has 3 tensors"):
        reconstruct_many(nets[:2], [grads[0], grads[1][:3]], SHAPE, config)
    with pytest.raises(ValueError, match=r"targets\[0\] is all zero"):
        reconstruct_many(nets[:1], [[torch.zeros_like(g) for g in grads[0]]], SHAPE, config)
    with pytest.raises(ValueError, match=r"labels must be None or one row"):
        reconstruct_many(nets, grads, SHAPE, config, labels=y)
    with pytest.raises(ValueError, match="seeds has 2 entries"):
        reconstruct_many(nets, grads, SHAPE, config, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"seeds\[0\] must be an int"):
        reconstruct_many(nets, grads, SHAPE, config, seeds=[0.5, 1, 2])
    with pytest.raises(ValueError, match="shape must be the dummy batch"):
        reconstruct_many(nets, grads, (16, 16), config)
    with pytest.raises(TypeError, match="AttackConfig"):
        reconstruct_many(nets, grads, SHAPE, {"iterations": 2})
    with pytest.raises(ValueError, match="check_every"):
        reconstruct_many(nets, grads, SHAPE, config, check_every=0)


def test_labels_seeds_and_integer_targets_of_the_wrong_kind_are_explained(faces):
    """Probe findings: a NumPy label array, a label row given as a list, a tensor of seeds and an
    integer (rounded) target each get a message that says what to pass."""
    _, y, nets, grads = faces
    config = attacks.RECOMMENDED.with_(iterations=2, restarts=1)
    with pytest.raises(TypeError, match=r"got ndarray; convert an array with torch.as_tensor"):
        reconstruct_many(nets[:2], grads[:2], SHAPE, config, labels=y[:2].view(2, 1).numpy())
    with pytest.raises(TypeError, match=r"labels\[1\] must be a tensor of class indices .*got list"):
        reconstruct_many(nets[:2], grads[:2], SHAPE, config, labels=[y[:1], [int(y[1])]])
    with pytest.raises(TypeError, match=r"seeds must be one int for every problem or a list of 2 ints.*seeds.tolist\(\)"):
        reconstruct_many(nets[:2], grads[:2], SHAPE, config, seeds=torch.tensor([0, 1]))
    rounded = [(g * 1e4).long() for g in grads[1]]
    assert any(bool(t.any()) for t in rounded)  # not all zero: the dtype is what gets refused
    with pytest.raises(ValueError, match=r"targets\[1\]\[0\] has dtype torch.int64"):
        reconstruct_many(nets[:2], [grads[0], rounded], SHAPE, config)


def _functional(fn):
    fn.functional = True
    return fn


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_a_custom_observe_is_checked_before_the_batched_run(faces):
    """A batchable observe that returns the wrong thing, cannot be batched or ignores x gets a
    clear error before the run (it used to be a KeyError, a shape error from the distance or a
    vmap trace, or a silent attack on a constant)."""
    from dlgkit.attacks.vectorised import gradient_of_loss

    _, y, nets, grads = faces
    config = attacks.RECOMMENDED.with_(iterations=2, restarts=1)
    labels = y[:2].view(2, 1)
    run = lambda observe: reconstruct_many(nets[:2], grads[:2], SHAPE, config, labels=labels, observe=_functional(observe), progress=False)
    with pytest.raises(TypeError, match="observe must return a dict keyed like its weights argument.*got list"):
        run(lambda call, w, x, t: list(gradient_of_loss(call, w, x, t).values()))
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        run(lambda call, w, x, t: {k: v for k, v in gradient_of_loss(call, w, x, t).items() if k != "fc.bias"})
    with pytest.raises(ValueError, match=r"observe returned \(\d+,\) for 'body.0.weight'.*match entry by entry"):
        run(lambda call, w, x, t: {k: v.flatten() for k, v in gradient_of_loss(call, w, x, t).items()})
    with pytest.raises(ValueError, match=r"observe cannot be batched.*no .item\(\)"):
        run(lambda call, w, x, t: {k: v * float(call(w, x).sum()) for k, v in w.items()})
    with pytest.raises(ValueError, match="observe's output does not depend on x"):
        run(lambda call, w, x, t: {k: torch.zeros_like(v) + 1 for k, v in w.items()})
    # the explicit default is accepted and gives the default's answer
    default = reconstruct_many(nets[:2], grads[:2], SHAPE, config, labels=labels, progress=False)
    explicit = reconstruct_many(nets[:2], grads[:2], SHAPE, config, labels=labels, observe=gradient_of_loss, progress=False)
    assert [r.losses for r in default] == [r.losses for r in explicit]


def test_idlg_labels_are_refused_for_an_observation_that_is_not_the_gradient(faces):
    """iDLG reads the labels off a gradient's last layer; on a FedAvg update it guessed [4, 4]
    for labels [4, 9] without a word. Now: known labels or joint labels, else an error."""
    from dlgkit.attacks.fedavg import local_sgd
    from dlgkit.attacks.vectorised import gradient_of_loss

    x, y, nets, _ = faces
    updates = [federated.client_update(net, x[i : i + 1], y[i : i + 1], lr=0.1, local_steps=2).tensors for i, net in enumerate(nets[:2])]
    config = attacks.RECOMMENDED.with_(iterations=2, restarts=1)
    with pytest.raises(ValueError, match=r"config.labels='idlg'.*pass the labels.*labels='joint'"):
        reconstruct_many(nets[:2], updates, SHAPE, config, observe=local_sgd(2, 0.1))
    with pytest.raises(ValueError, match=r"config.labels='idlg'"):
        reconstruct_many(nets[:2], updates, SHAPE, config, labels=[y[:1], None], observe=local_sgd(2, 0.1))
    known = reconstruct_many(nets[:2], updates, SHAPE, config, labels=y[:2].view(2, 1), observe=local_sgd(2, 0.1), progress=False)
    assert [int(r.labels) for r in known] == y[:2].tolist()
    joint = reconstruct_many(nets[:2], updates, SHAPE, config.with_(labels="joint"), observe=local_sgd(2, 0.1), progress=False)
    assert all(r.label_mode == "joint" for r in joint)
    # the gradient itself still reads its labels with iDLG
    assert reconstruct_many(nets[:1], [federated.client_gradient(nets[0], x[:1], y[:1])], SHAPE, config,
                            observe=gradient_of_loss, progress=False)[0].labels.tolist() == y[:1].tolist()


def test_history_matches_the_sequential_schedule(faces):
    _, y, nets, grads = faces
    config = attacks.AttackConfig(iterations=12, tol=None, patience=None)
    result = reconstruct_many(nets[:2], grads[:2], SHAPE, config, labels=y[:2].view(2, 1), history_every=5)[0]
    assert result.history_iters == [0, 5, 10, 12] and len(result.history) == 4
    assert result.history[0].shape == SHAPE and float(result.history[-1].max()) <= 1
    assert result.iterations == 12 and result.losses[-1] < result.losses[0]


def _sync_free(monkeypatch):
    """The CPU in a GPU's mode: L-BFGS rounds that read nothing from the device."""
    monkeypatch.setitem(vectorised._OPTIMIZERS, "lbfgs", lambda z, config: BatchedLBFGS(z, config.step_size(), config.line_search, sync_free=True))


def test_placement_on_a_simulated_gpu(faces, monkeypatch):
    x, y, nets, grads = faces
    config = attacks.RECOMMENDED.with_(iterations=3)
    with simulated_cuda.simulated():
        gpu_nets = [models.LeNet(channels=1, num_classes=10, image_size=16, seed=i).to("cuda") for i in range(2)]
        gpu_grads = [federated.client_gradient(net, x[i : i + 1], y[i : i + 1]) for i, net in enumerate(gpu_nets)]
        on_gpu = reconstruct_many(gpu_nets, gpu_grads, SHAPE, config, seeds=[0, 1])
        assert simulated_cuda.cuda_share() > 0.9
    # the same arithmetic on the CPU: the same numbers, bit for bit (a GPU checks every 10th round)
    _sync_free(monkeypatch)
    on_cpu = reconstruct_many(nets[:2], grads[:2], SHAPE, config, seeds=[0, 1], check_every=10)
    for a, b in zip(on_cpu, on_gpu):
        assert b.reconstruction.device.type == "cpu" and torch.equal(a.reconstruction, b.reconstruction)


def test_sync_free_rounds_agree_with_the_cpu_rounds(faces, monkeypatch):
    # on a CPU a round evaluates only the problems that ask; in a GPU's mode every problem in a
    # trial, and every direction is computed and masked: the same steps (float64, so that the
    # order of a batched sum does not show)
    nets64, grads64 = _float64(faces)
    config = attacks.RECOMMENDED.with_(iterations=4, restarts=2, restart_policy="always")
    picked = reconstruct_many(nets64, grads64, SHAPE, config, seeds=[0, 1, 2])
    _sync_free(monkeypatch)
    masked = reconstruct_many(nets64, grads64, SHAPE, config, seeds=[0, 1, 2])
    for a, b in zip(picked, masked):
        assert a.statuses == b.statuses and a.iterations == b.iterations
        assert b.restart_losses == pytest.approx(a.restart_losses, rel=1e-4)
        assert torch.allclose(a.reconstruction, b.reconstruction, atol=1e-6)


@pytest.mark.parametrize("config", [attacks.RECOMMENDED.with_(iterations=6),
                                    attacks.AttackConfig(optimizer="adam", lr=0.05, iterations=50, tol=None, clamp=True)],
                         ids=["lbfgs", "adam-clamped"])
def test_a_gpu_waits_for_the_device_only_at_checks(faces, monkeypatch, config):
    """No round reads anything from the (simulated) GPU; the loop reads it only at its checks,
    every ``check_every`` rounds (issue 16: no per-step host sync)."""
    x, y, _, _ = faces
    reads = simulated_cuda.counts
    log: list[tuple[str, int, int]] = []  # (what, reads before, reads after)
    for cls in (BatchedLBFGS, vectorised.BatchedAdam):
        for name in ("round", "prepare"):
            method = getattr(cls, name)

            def timed(self, *args, _method=method, _name=name):
                before = reads["host_reads"]
                out = _method(self, *args)
                log.append((_name, before, reads["host_reads"]))
                return out

            monkeypatch.setattr(cls, name, timed)
    with simulated_cuda.simulated():
        on_gpu = torch.ones(3, device="cuda")
        start = reads["host_reads"]
        assert bool(on_gpu.sum() > 0) and on_gpu.nonzero().numel() == 3 and on_gpu.tolist() == [1.0] * 3
        assert reads["host_reads"] == start + 3  # the counter sees what makes a GPU's host wait
        gpu_nets = [models.LeNet(channels=1, num_classes=10, image_size=16, seed=i).to("cuda") for i in range(3)]
        gpu_grads = [federated.client_gradient(net, x[i : i + 1], y[i : i + 1]) for i, net in enumerate(gpu_nets)]
        reconstruct_many(gpu_nets, gpu_grads, SHAPE, config, seeds=[0, 1, 2], check_every=5)
    assert all(after == before for _, before, after in log), "a round or a direction read from the device"
    rounds = [entry for entry in log if entry[0] == "round"]
    assert len(rounds) > 40
    # between one round's end and the next one's start: reads only after every 5th round
    read_after = [k + 1 for k, (this, following) in enumerate(zip(rounds, rounds[1:])) if following[1] > this[2]]
    assert read_after and all(k % 5 == 0 for k in read_after), read_after


def test_a_clamped_attack_on_a_gpu_refreshes_only_after_a_step(faces, monkeypatch):
    """With ``clamp`` the projection after a step needs an evaluation: off the CPU the loop reads
    whether a step ended rather than evaluate every problem in every round."""
    x, y, _, _ = faces
    refreshed: list[int] = []
    refresh = BatchedLBFGS.refresh

    def counted(self, rows, z, evaluate):
        refreshed.append(int(rows.sum()))
        return refresh(self, rows, z, evaluate)

    monkeypatch.setattr(BatchedLBFGS, "refresh", counted)
    with simulated_cuda.simulated():
        gpu_nets = [models.LeNet(channels=1, num_classes=10, image_size=16, seed=i).to("cuda") for i in range(2)]
        gpu_grads = [federated.client_gradient(net, x[i : i + 1], y[i : i + 1]) for i, net in enumerate(gpu_nets)]
        results = reconstruct_many(gpu_nets, gpu_grads, SHAPE, attacks.RECOMMENDED.with_(iterations=4, clamp=True), seeds=[0, 1])
    assert len(refreshed) >= 4 and min(refreshed) >= 1, refreshed  # one call per round that ended a step, none empty
    assert all(float(r.reconstruction.min()) >= 0 and float(r.reconstruction.max()) <= 1 for r in results)


def _stack(nets, grads, y, config, shape=SHAPE, shared=False, joint=False):
    """The engine's batched objective for these problems (as reconstruct_many builds it)."""
    from dlgkit.attacks.vectorised import _Stack

    template = nets[0]
    if shared:
        params = {k: v.detach() for k, v in template.named_parameters()}
    else:
        params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in nets]) for k, _ in template.named_parameters()}
    target = [torch.stack([g[j] for g in grads]) for j in range(len(grads[0]))]
    labels = torch.zeros((len(grads), shape[0]), dtype=torch.long) if joint else y
    return _Stack(template, params, {}, shared, target, labels, shape, template.num_classes, joint, config)


def _random_problems(gen, config, joint, cases, channels):
    """For each ``(activation, n, shared)`` case, 4 problems on LeNets (16x16 images with
    ``channels`` channels, batches of n, one shared model or one each): the models, the
    engine's stack and two points, one near the answer and one far from it."""
    for activation, n, shared in cases:
        shape = (n, channels, 16, 16)
        nets = [models.LeNet(channels=channels, num_classes=10, image_size=16, activation=activation, seed=i) for i in range(4)]
        if shared:
            nets = [nets[0]] * 4
        x = torch.rand((4, *shape), generator=gen)
        y = torch.stack([torch.randperm(10, generator=gen)[:n] for _ in range(4)])
        grads = [federated.client_gradient(net, x[i], y[i]) for i, net in enumerate(nets)]
        stack = _stack(nets, grads, y, config, shape=shape, shared=shared, joint=joint)
        yield nets, stack, _points(x, n * 10 if joint else 0, gen)


def _points(x, extra, gen):
    """Two points at which to compare objectives: one near the answer ``x`` (P, ...) and one
    far from it (``extra`` label variables per problem, for joint labels)."""
    near = torch.cat([x.flatten(1) + 3e-2 * torch.randn(x.flatten(1).shape, generator=gen, dtype=x.dtype),
                      torch.randn((len(x), extra), generator=gen, dtype=x.dtype)], dim=1)
    return near, torch.rand(near.shape, generator=gen, dtype=x.dtype)


def _assert_same_objective(mine, reference, rtol, atol, grad_rtol, grad_atol, label):
    """Two objectives' ``(gradient, (value, distance))`` agree: values and distances to
    ``rtol``/``atol``, each problem's gradient to ``grad_rtol`` of its norm plus ``grad_atol``."""
    (g_mine, (v_mine, d_mine)), (g_ref, (v_ref, d_ref)) = mine, reference
    assert torch.allclose(d_mine.double(), d_ref.double(), rtol=rtol, atol=atol), (label, d_mine, d_ref)
    assert torch.allclose(v_mine.double(), v_ref.double(), rtol=rtol, atol=atol), (label, v_mine, v_ref)
    for a, b in zip(g_mine, g_ref):
        assert float((a - b).norm()) <= grad_rtol * float(b.norm()) + grad_atol, (label, (a - b).norm() / b.norm())


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("joint", [False, True])
def test_the_factored_linear_head_is_the_plain_objective(distance, float64, joint):
    """LeNet's head weight gradient is never formed (its distance is taken in factored form):
    same value and same gradient with respect to the dummy as the plain objective, for one
    image and for a batch of three, per-problem and shared models, near and far from the
    answer."""
    from dlgkit.attacks.vectorised import _linear_head

    config = attacks.RECOMMENDED.with_(distance=distance, float64=float64, tv=1e-3)
    cases = (("sigmoid", 1, False), ("sigmoid", 3, True))
    for nets, stack, points in _random_problems(torch.Generator().manual_seed(5), config, joint, cases, channels=1):
        assert _linear_head(nets[0], [k for k, _ in nets[0].named_parameters()]) and stack.head
        for z in points:
            atol = 5e-7 if distance == "cosine" and not float64 else 1e-9  # a float32 cosine's own rounding
            _assert_same_objective(stack.batched[True](*stack._args(lambda t: t, z, head=True)),
                                   stack.batched[False](*stack._args(lambda t: t, z, head=False)), 2e-4, atol, 2e-3, 1e-9, "head")


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("float64", [False, True])
@pytest.mark.parametrize("joint", [False, True])
def test_the_grouped_objective_is_the_vmap_one(distance, float64, joint):
    """LeNet's P bodies as one grouped convolution per layer, with the inner backward written
    out: the same objective and gradient as the vmap one, for every activation, one image and
    batches, per-problem and shared models, near and far from the answer."""
    config = attacks.RECOMMENDED.with_(distance=distance, float64=float64, tv=1e-3)
    cases = (("sigmoid", 1, False), ("relu", 3, True), ("tanh", 3, False), ("sigmoid", 2, True))
    for (activation, n, shared), (_, stack, points) in zip(cases, _random_problems(torch.Generator().manual_seed(7), config, joint, cases, channels=2)):
        assert stack.head and stack.grouped, (activation, n, shared)
        for z in points:
            args = stack._args(lambda t: t, z)
            atol = 5e-7 if distance == "cosine" and not float64 else 1e-9
            _assert_same_objective(stack._grouped_objective(*args), stack.batched[True](*args), 2e-4, atol, 2e-3, 1e-9, activation)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over weight_norm, which the test runs on purpose
def test_the_grouped_objective_is_used_only_where_it_holds(faces, monkeypatch):
    """Only a body of plain convolutions and known activations runs grouped; a grouped
    objective that disagrees with vmap's is not used (the check before the run), and a problem
    whose weights are NaN neither turns the grouped path off nor changes another's numbers."""
    from dlgkit.attacks import vectorised
    from dlgkit.attacks.vectorised import _grouped_body

    _, y, nets, grads = faces
    assert _grouped_body(nets[0]) and _stack(nets, grads, y[:, None], attacks.RECOMMENDED).grouped
    for change in (lambda net: net.body.append(nn.AvgPool2d(1)), lambda net: setattr(net.body[0], "padding_mode", "reflect"),
                   lambda net: net.body.__setitem__(1, nn.Softplus()), lambda net: setattr(net, "body", nn.Sequential(nn.Sigmoid())),
                   lambda net: nn.utils.parametrizations.weight_norm(net.body[2]), lambda net: nn.utils.weight_norm(net.body[2])):
        others = [models.LeNet(channels=1, num_classes=10, image_size=16, seed=i) for i in range(3)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm says it is deprecated
            for other in others:
                change(other)
        assert not _grouped_body(others[0])
        # the engine still builds (on vmap) and runs such a model
        if isinstance(others[0].body[0], nn.Conv2d):
            other_grads = [federated.client_gradient(net, torch.rand(1, 1, 16, 16), y[i : i + 1]) for i, net in enumerate(others)]
            results = reconstruct_many(others, other_grads, SHAPE, attacks.RECOMMENDED.with_(iterations=2), seeds=[0, 1, 2], progress=False)
            assert all(math.isfinite(r.losses[-1]) for r in results)
    # scaled observations (FedAvg's updates divided by their step size) take the plain objective
    plain = _stack(nets, grads, y[:, None], attacks.RECOMMENDED)
    scaled = vectorised._Stack(plain.template, plain.params, {}, False, plain.target, plain.labels, SHAPE, 10, False, attacks.RECOMMENDED,
                               scale=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    assert not scaled.head and not scaled.grouped
    # a wrong backward for the sigmoid: the grouped objective disagrees, so the vmap one is used
    # and the run's numbers are still the model's
    monkeypatch.setitem(vectorised._ACTIVATION_BACKWARD, nn.Sigmoid, torch.ops.aten.tanh_backward)
    wrong = _stack(nets, grads, y[:, None], attacks.RECOMMENDED)
    assert wrong.head and not wrong.grouped
    monkeypatch.undo()
    # likewise a wrong second derivative (the tanh's): the objective's values agree, its gradient does not
    monkeypatch.setitem(vectorised._ACTIVATION_SECOND, nn.Sigmoid, vectorised._ACTIVATION_SECOND[nn.Tanh])
    wrong = _stack(nets, grads, y[:, None], attacks.RECOMMENDED)
    assert wrong.head and not wrong.grouped
    monkeypatch.undo()
    broken = models.LeNet(channels=1, num_classes=10, image_size=16, seed=1)
    with torch.no_grad():
        broken.fc.bias[0] = math.nan
    clean = _stack(nets, grads, y[:, None], attacks.RECOMMENDED)
    mixed = _stack([broken, nets[1], nets[2]], grads, y[:, None], attacks.RECOMMENDED)
    assert mixed.grouped
    z = torch.rand(3, 256, generator=torch.Generator().manual_seed(2))
    everyone = torch.ones(3, dtype=torch.bool)
    (g_clean, v_clean, _), (g_mixed, v_mixed, _) = clean.evaluate(everyone, z), mixed.evaluate(everyone, z)
    assert torch.isnan(v_mixed[0]) and torch.equal(g_mixed[1:], g_clean[1:]) and torch.equal(v_mixed[1:], v_clean[1:])


_UNUSUAL_BODIES = {  # (body, frozen parameter, distance, float64 distance, joint labels, shared model)
    "no biases": (lambda c: nn.Sequential(nn.Conv2d(c, 6, 5, 2, 2, bias=False), nn.Sigmoid(), nn.Conv2d(6, 6, 3, 1, 1, bias=False), nn.Tanh()),
                  None, "l2", False, False, False),
    "an activation first": (lambda c: nn.Sequential(nn.Tanh(), nn.Conv2d(c, 6, 5, 2, 2), nn.Sigmoid(), nn.Conv2d(6, 6, 3, 2, 1), nn.Sigmoid()),
                            "body.1.weight", "cosine", True, False, False),
    "dilation, strides and a non-square kernel": (lambda c: nn.Sequential(nn.Conv2d(c, 6, (3, 5), (2, 1), (1, 3), dilation=(1, 2)), nn.Sigmoid(),
                                                                          nn.Conv2d(6, 4, 3, 2, 0), nn.ReLU()), "body.0.bias", "l2", False, True, False),
    "two convolutions in a row": (lambda c: nn.Sequential(nn.Conv2d(c, 6, 3, 1, 1), nn.Conv2d(6, 6, 3, 2, 1), nn.Sigmoid(),
                                                          nn.Conv2d(6, 5, 3, 2, 1, bias=False), nn.Sigmoid(), nn.Tanh()), "body.1.bias", "l2", True, True, True),
    "one convolution": (lambda c: nn.Sequential(nn.Conv2d(c, 4, 5, 2, 2)), None, "cosine", False, False, True),
}


@pytest.mark.parametrize("case", list(_UNUSUAL_BODIES))
def test_the_grouped_objective_of_other_bodies_is_the_vmap_one(case):
    """The grouped objective writes its gradients out layer by layer, so every kind of body it
    admits is compared with vmap's: convolutions without biases, an activation before the first
    convolution, dilations, strides and non-square kernels, two convolutions in a row, a lone
    convolution, and a frozen weight or bias (its gradient is not observed). In float64, so that
    a term that is small against the others (a bias's, say) still shows."""
    build, frozen, distance, float64, joint, shared = _UNUSUAL_BODIES[case]
    gen = torch.Generator().manual_seed(11)
    size, n = 13, 2
    nets = []
    for i in range(3):
        net = models.LeNet(channels=2, num_classes=10, image_size=size, seed=i)
        with torch.random.fork_rng(), torch.no_grad():  # the new layers' initialisation, seeded; the global RNG is left as it was
            torch.manual_seed(i)
            net.body = build(2)
            net.fc = nn.Linear(net.body(torch.zeros(1, 2, size, size)).flatten(1).shape[1], 10)
        if frozen:
            dict(net.named_parameters())[frozen].requires_grad_(False)
        nets.append(net.double())
    nets = [nets[0]] * 3 if shared else nets
    shape = (n, 2, size, size)
    x = torch.rand((3, *shape), generator=gen, dtype=torch.float64)
    y = torch.stack([torch.randperm(10, generator=gen)[:n] for _ in range(3)])
    grads = [federated.client_gradient(net, x[i], y[i]) for i, net in enumerate(nets)]
    config = attacks.RECOMMENDED.with_(distance=distance, float64=float64, tv=1e-2)
    stack = _stack(nets, grads, y, config, shape=shape, shared=shared, joint=joint)
    assert stack.head and stack.grouped, case
    for z in _points(x, n * 10 if joint else 0, gen):
        args = stack._args(lambda t: t, z)
        _assert_same_objective(stack._grouped_objective(*args), stack.batched[True](*args), 1e-10, 1e-14, 1e-8, 0.0, case)


def test_frozen_weights_of_each_problem_are_its_own():
    """A frozen body weight that differs between the problems' models is each problem's own on
    every path (the factored head used to take model 0's), and a frozen scalar parameter does not
    trip the checks before the run."""
    gen = torch.Generator().manual_seed(3)
    nets = [models.LeNet(channels=1, num_classes=10, image_size=16, seed=i) for i in range(3)]
    for net in nets:
        net.body[0].weight.requires_grad_(False)
        net.register_parameter("scalar", nn.Parameter(torch.tensor(1.0), requires_grad=False))
    x, y = torch.rand((3, 1, 1, 16, 16), generator=gen), torch.tensor([[1], [4], [7]])
    grads = [federated.client_gradient(net, x[i], y[i]) for i, net in enumerate(nets)]
    stack = _stack(nets, grads, y, attacks.RECOMMENDED)
    assert stack.head and stack.grouped
    z = torch.rand((3, 256), generator=gen)
    g_plain, (v_plain, _) = stack.batched[False](*stack._args(lambda t: t, z, head=False))
    head = stack.batched[True](*stack._args(lambda t: t, z, head=True))
    grouped = stack._grouped_objective(*stack._args(lambda t: t, z))
    for g, (v, _) in (head, grouped):
        assert torch.allclose(v.double(), v_plain.double(), rtol=1e-4)
        assert float((g - g_plain).norm()) <= 1e-3 * float(g_plain.norm())


def test_the_linear_head_shortcut_is_used_only_where_it_holds(faces):
    from dlgkit.attacks import vectorised
    from dlgkit.attacks.vectorised import _linear_head

    _, y, nets, grads = faces
    names = [k for k, _ in nets[0].named_parameters()]
    assert _linear_head(nets[0], names)
    assert not _linear_head(models.ResNet(channels=1, num_classes=10, image_size=16), [k for k, _ in models.ResNet(channels=1, num_classes=10, image_size=16).named_parameters()])
    assert not _linear_head(nets[0], names[:-1])  # the head's bias frozen

    class Doubled(models.LeNet):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = [Doubled(channels=1, num_classes=10, image_size=16, seed=i) for i in range(3)]
    assert not _linear_head(doubled[0], names)
    # forced on for a model whose forward is not fc(body(x)): the check before the run finds the
    # objectives differ and falls back to the plain one
    d_grads = [federated.client_gradient(net, torch.rand(1, 1, 16, 16), y[i : i + 1]) for i, net in enumerate(doubled)]
    original = vectorised._linear_head
    vectorised._linear_head = lambda template, names: True
    try:
        stack = _stack(doubled, d_grads, y[:, None], attacks.RECOMMENDED)
    finally:
        vectorised._linear_head = original
    assert not stack.head
    assert _stack(nets, grads, y[:, None], attacks.RECOMMENDED).head


def test_one_problem_alone_is_solved_as_in_the_batch(faces):
    """A problem alone (the tail of a run) gets the same gradient and value as its row in a
    batched call: here bit for bit on the grouped path (it runs as two copies of itself, through
    the kernels of a batch), up to float32 rounding on the vmap path (alone it skips vmap)."""
    _, y, nets, grads = faces
    stack = _stack(nets, grads, y[:, None], attacks.RECOMMENDED.with_(tv=1e-3))
    z = torch.rand(3, 256, generator=torch.Generator().manual_seed(1))
    everyone = torch.ones(3, dtype=torch.bool)
    for grouped in (True, False):
        assert stack.grouped
        stack.grouped = grouped
        g_all, v_all, d_all = stack.evaluate(everyone, z)
        for i in range(3):
            mask = torch.zeros(3, dtype=torch.bool)
            mask[i] = True
            g, v, d = stack.evaluate(mask, z)
            if grouped:
                assert torch.equal(g[i], g_all[i]) and v[i] == v_all[i] and d[i] == d_all[i]
            else:  # up to float32 rounding (vmap runs the batched kernels, e.g. grouped convolutions)
                assert float((g[i] - g_all[i]).norm()) <= 1e-5 * float(g_all[i].norm()) and math.isclose(v[i], v_all[i], rel_tol=1e-5)
                assert math.isclose(d[i], d_all[i], rel_tol=1e-5)
            others = [j for j in range(3) if j != i]
            assert torch.isnan(g[others]).all() and torch.isnan(v[others]).all()
        stack.grouped = True


def test_a_subset_of_problems_gets_its_own_rows(faces):
    """Most rows asked (all are evaluated, the others dropped) or a few (their rows copied): the
    asked rows get the values of a call on everyone, the others NaN."""
    _, y, nets, grads = faces
    order = [0, 1, 2, 0, 1, 2, 0]
    stack = _stack([nets[i] for i in order], [grads[i] for i in order], y[order][:, None], attacks.RECOMMENDED)
    z = torch.rand(7, 256, generator=torch.Generator().manual_seed(2))
    g_all, v_all, _ = stack.evaluate(torch.ones(7, dtype=torch.bool), z)
    for asked in ([0, 1, 2, 3, 4, 6], [1, 5]):
        mask = torch.zeros(7, dtype=torch.bool)
        mask[asked] = True
        g, v, _ = stack.evaluate(mask, z)
        assert float((g[mask] - g_all[mask]).norm()) <= 1e-5 * float(g_all[mask].norm())
        assert torch.allclose(v[mask], v_all[mask], rtol=1e-5)
        assert torch.isnan(g[~mask]).all() and torch.isnan(v[~mask]).all()


def test_a_frozen_head_weight_is_explained_for_idlg_labels(faces):
    x, y, nets, grads = faces
    frozen = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0)
    frozen.fc.weight.requires_grad_(False)
    g = federated.client_gradient(frozen, x[:1], y[:1].int())  # int32 labels are read as their values
    assert len(g) == len(grads[0]) - 1
    with pytest.raises(ValueError, match="weight is frozen"):
        reconstruct_many([frozen], [g], SHAPE, attacks.RECOMMENDED.with_(iterations=2), progress=False)
    with pytest.raises(ValueError, match="weight is frozen"):
        attacks.reconstruct(frozen, g, SHAPE, attacks.RECOMMENDED.with_(iterations=2), progress=False)
    # with the labels given, the attack runs (and skips the factored head: the head's weight is not in the gradient)
    result = reconstruct_many([frozen], [g], SHAPE, attacks.RECOMMENDED.with_(iterations=2), labels=y[:1, None], progress=False)[0]
    assert math.isfinite(result.final_loss)


def _rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2).sum(-1)


@pytest.mark.parametrize(("line_search", "dim", "steps"), [(True, 10, 4), (False, 10, 4), (False, 30, 8)])
def test_batched_lbfgs_follows_torch_lbfgs_step_for_step(line_search, dim, steps):
    """On a deterministic problem (the Rosenbrock function, float64, four random starts at
    once) every problem's point after each step is PyTorch's, with and without the
    strong-Wolfe line search; the last case runs 160 inner iterations, so the 100-pair history
    wraps round."""
    from dlgkit.attacks.vectorised import BatchedLBFGS

    starts = 1.5 * torch.randn(4, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lr = 1.0 if line_search else 5e-4

    def evaluate(mask, z):
        z = z.detach().requires_grad_(True)
        f = _rosenbrock(z)
        (g,) = torch.autograd.grad(f.sum(), z)
        f = torch.where(mask, f.detach(), math.nan)
        return torch.where(mask[:, None], g, math.nan), f, f

    z = starts.clone()
    optimiser = BatchedLBFGS(z, lr, line_search)
    everyone = torch.ones(4, dtype=torch.bool)
    optimiser.reset(everyone, z, evaluate)
    optimiser.prepare(everyone)
    steps_wanted, steps, points = steps, torch.zeros(4, dtype=torch.long), []
    while (steps < steps_wanted).any():
        live = steps < steps_wanted
        z, ended, _ = optimiser.round(z, evaluate, live)
        steps += (ended & live).long()
        if bool((ended & live).any()):
            points.append((steps.clone(), ended & live, z.clone()))
        optimiser.prepare(steps < steps_wanted)
    for i in range(4):
        x = starts[i].clone().requires_grad_(True)
        reference = torch.optim.LBFGS([x], lr=lr, max_iter=20, history_size=100, line_search_fn="strong_wolfe" if line_search else None)

        def closure(reference=reference, x=x):
            reference.zero_grad()
            f = _rosenbrock(x)
            f.backward()
            return f

        ours = [p[i] for s, done, p in points if done[i]]
        assert len(ours) == steps_wanted
        for step in range(steps_wanted):
            reference.step(closure)
            assert torch.allclose(ours[step], x.detach(), rtol=0, atol=1e-8), (i, step, (ours[step] - x.detach()).abs().max())
        assert reference.state[x]["n_iter"] > (100 if steps_wanted == 8 else 0)
    assert float(_rosenbrock(z).max()) < (1e-6 if line_search else math.inf)


def test_the_line_search_backs_off_from_a_nan_objective():
    """A trial point where the objective is NaN counts as too high: the search zooms back into
    the region where it is finite, and both problems reach the minimiser of
    (z - 1)^2 + z^4 / 10 (z = 0.8688 in every coordinate), which lies inside it."""
    from dlgkit.attacks.vectorised import BatchedLBFGS

    def evaluate(mask, z):
        z = z.detach().requires_grad_(True)
        f = ((z - 1) ** 2 + 0.1 * z**4).sum(-1)
        f = torch.where(z[:, 0] < 1.2, f, math.nan)  # undefined beyond z_0 = 1.2
        (g,) = torch.autograd.grad(torch.nan_to_num(f).sum(), z)
        g = torch.where(torch.isfinite(f)[:, None], g, math.nan)
        f = torch.where(mask, f.detach(), math.nan)
        return torch.where(mask[:, None], g, math.nan), f, f

    z = torch.tensor([[-3.0] * 5, [-1.0] * 5], dtype=torch.float64)
    optimiser = BatchedLBFGS(z, 50.0, True)  # the first trial step lands far in the NaN region
    everyone = torch.ones(2, dtype=torch.bool)
    optimiser.reset(everyone, z, evaluate)
    optimiser.prepare(everyone)
    steps, nan_tries = torch.zeros(2, dtype=torch.long), 0
    for _ in range(200):
        live = steps < 5
        if not bool(live.any()):
            break
        nan_tries += int((live & optimiser.searching & (optimiser.t * optimiser.d[:, 0] + z[:, 0] >= 1.2)).sum())
        z, ended, dist = optimiser.round(z, evaluate, live)
        assert bool(torch.isfinite(z).all()) and bool(torch.isfinite(dist).all())
        steps += (ended & live).long()
        optimiser.prepare(steps < 5)
    assert nan_tries >= 2 and steps.tolist() == [5, 5]
    assert torch.allclose(z, torch.full_like(z, 0.868837), atol=1e-5), z


def test_the_optimisers_explain_bad_arguments():
    from dlgkit.attacks.vectorised import BatchedAdam, BatchedLBFGS

    z = torch.zeros(3, 5)
    for make in (lambda z, lr: BatchedAdam(z, lr), lambda z, lr: BatchedLBFGS(z, lr, True)):
        with pytest.raises(ValueError, match=r"z must be a floating-point tensor of shape \(P, D\).*got a torch.float32 tensor of shape \(5,\)"):
            make(torch.zeros(5), 0.1)
        with pytest.raises(ValueError, match="z must be .*got a torch.int64 tensor"):
            make(torch.zeros(3, 5, dtype=torch.long), 0.1)
        with pytest.raises(ValueError, match="z must be .*got list"):
            make([[0.0] * 5], 0.1)
        with pytest.raises(ValueError, match=r"lr must lie in \(0"):
            make(z, 0.0)
        with pytest.raises(ValueError, match="lr must be a finite number"):
            make(z, math.nan)
        with pytest.raises(ValueError, match=r"lr must lie in \(0, inf\)"):
            make(z, -1.0)
    with pytest.raises(ValueError, match="line_search must be True"):
        BatchedLBFGS(z, 1.0, "strong_wolfe")
    with pytest.raises(ValueError, match=r"sync_free must be True, False or None \(True off the CPU\), got 'yes'"):
        BatchedLBFGS(z, 1.0, True, sync_free="yes")
    assert BatchedLBFGS(z, 1.0, True).sync_free is False and BatchedLBFGS(z, 1.0, True, sync_free=True).sync_free is True
    with pytest.raises(ValueError, match="float32 or float64, got torch.bfloat16 variables"):
        BatchedLBFGS(z.bfloat16(), 1.0, True)


def test_a_nan_slope_at_a_finite_objective_ends_the_step():
    """A trial point with a finite objective but a NaN gradient counts as too high: the step
    ends within its budget of evaluations instead of trying the same point forever, and the
    problem beside it is not held up."""
    from dlgkit.attacks.vectorised import BatchedLBFGS

    def evaluate(mask, z):  # (z - 3)^2, its gradient undefined beyond z = 2.5
        f = ((z - 3) ** 2).sum(1)
        g = torch.where(z > 2.5, math.nan, 2 * (z - 3))
        return torch.where(mask[:, None], g, math.nan), torch.where(mask, f, math.nan), torch.where(mask, f, math.nan)

    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    optimiser = BatchedLBFGS(z, 1.0, True)
    everyone = torch.ones(2, dtype=torch.bool)
    optimiser.reset(everyone, z, evaluate)
    optimiser.prepare(everyone)
    steps = torch.zeros(2, dtype=torch.long)
    for _ in range(200):
        live = steps < 3
        if not bool(live.any()):
            break
        z, ended, dist = optimiser.round(z, evaluate, live)
        assert int(optimiser.evals.max()) <= BatchedLBFGS.max_eval + 1  # as in PyTorch, a search may end one past the budget
        steps += (ended & live).long()
        optimiser.prepare(steps < 3)
    assert steps.tolist() == [3, 3]
    assert bool(torch.isfinite(z).all()) and bool((z <= 2.5).all()) and bool((dist < 9).all()), z
