"""Unit tests of dlgkit.defences: the transforms, DP-SGD through Opacus, and both sides of the trade-off."""

from __future__ import annotations

import math

import pytest
import torch

from dlgkit import attacks, data, defences, federated, metrics, models
from dlgkit.defences import Defence


def _grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 5, generator=g), torch.randn(12, generator=g), torch.randn(3, 4, 4, generator=g)]


@pytest.fixture(scope="module")
def face_problem():
    x, _ = data.lfw_faces(1, size=16)
    y = torch.tensor([3])
    model = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0)
    return model, x, y


# --- transforms ----------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", defences.NOISE_DISTRIBUTIONS)
def test_noise_has_the_requested_variance(distribution):
    zeros = [torch.zeros(200_000)]
    noisy = defences.add_noise(zeros, 1e-2, distribution, generator=torch.Generator().manual_seed(0))[0]
    assert abs(float(noisy.var()) - 1e-2) < 5e-4
    assert abs(float(noisy.mean())) < 1e-3
    # Laplacian noise has heavier tails than Gaussian noise of the same variance (kurtosis 6 vs 3)
    kurtosis = float((noisy ** 4).mean() / noisy.var() ** 2)
    assert abs(kurtosis - (6.0 if distribution == "laplacian" else 3.0)) < 0.3


def test_noise_is_reproducible_and_zero_variance_is_identity():
    g = _grads()
    a = defences.add_noise(g, 1e-3, generator=torch.Generator().manual_seed(1))
    b = defences.add_noise(g, 1e-3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(defences.add_noise(g, 0.0), g))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.7, 1.0])
def test_prune_per_layer_zeroes_the_smallest_fraction_of_each_tensor(ratio):
    g = _grads()
    pruned = defences.prune(g, ratio)
    for original, p in zip(g, pruned):
        k = round(ratio * original.numel())
        assert int((p == 0).sum()) == k
        kept = p != 0
        assert torch.equal(p[kept], original[kept])  # survivors unchanged
        if 0 < k < original.numel():
            assert float(original[~kept].abs().max()) <= float(original[kept].abs().min())


def test_prune_global_ranks_all_tensors_together():
    g = [torch.tensor([10.0, 20.0, 30.0]), torch.tensor([0.1, 0.2, 0.3])]
    assert [t.tolist() for t in defences.prune(g, 2 / 3, scope="global")] == [[0.0, 20.0, 30.0], [0.0, 0.0, 0.0]]
    assert [t.tolist() for t in defences.prune(g, 0.5, scope="layer")] == [[0.0, 0.0, 30.0], [0.0, 0.0, pytest.approx(0.3)]]


def test_quantise_round_trips():
    g = _grads()
    half = defences.quantise(g, "fp16")
    assert all(h.dtype == torch.float32 for h in half)
    assert max(float((h - o).abs().max() / o.abs().max()) for h, o in zip(half, g)) < 1e-3
    q = defences.quantise(g, "int8")
    for t, o in zip(q, g):
        scale = float(o.abs().max()) / 127
        assert len(torch.unique(t)) <= 255
        assert float((t - o).abs().max()) <= scale / 2 + 1e-6  # rounding error at most half a step
    assert torch.equal(defences.quantise([torch.zeros(3)], "int8")[0], torch.zeros(3))


def test_relative_change():
    g = [torch.tensor([3.0, 4.0])]
    assert defences.relative_change([torch.tensor([3.0, 5.0])], g) == pytest.approx(0.2)
    assert defences.relative_change(g, g) == 0.0


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda g: defences.add_noise(g, -1e-3), ValueError, "variance must be >= 0"),
        (lambda g: defences.add_noise(g, "big"), TypeError, "variance must be a number"),
        (lambda g: defences.add_noise(g, 1e-3, "uniform"), ValueError, "choose one of \\['gaussian', 'laplacian'\\]"),
        (lambda g: defences.add_noise(g[0], 1e-3), TypeError, "list of tensors"),
        (lambda g: defences.prune(g, 1.5), ValueError, "ratio must be in \\[0, 1\\].*fraction of entries"),
        (lambda g: defences.prune(g, -0.1), ValueError, "ratio must be in \\[0, 1\\]"),
        (lambda g: defences.prune(g, 0.5, scope="row"), ValueError, "scope='row' is not known"),
        (lambda g: defences.quantise(g, "int4"), ValueError, "dtype='int4' is not known; choose one of \\['fp16', 'int8'\\]"),
        (lambda g: defences.quantise(g, torch.float16), TypeError, "dtype must be one of the strings"),
        (lambda g: Defence("noise", 1e-3), ValueError, "kind='noise' is not known"),
        (lambda g: Defence("gaussian", -1.0), ValueError, "noise variance"),
        (lambda g: Defence("prune", 2.0), ValueError, "pruning ratio"),
        (lambda g: Defence("local_steps", 2.5), ValueError, "whole number"),
        (lambda g: Defence("dp_sgd", 1.0, max_grad_norm=0.0), ValueError, "max_grad_norm must be > 0"),
        (lambda g: Defence("dp_sgd", 1.0)(g), TypeError, "call .share"),
        (lambda g: defences.dp_epsilon(1.0, 1.5, 10), ValueError, "sample_rate must be in \\[0, 1\\]"),
        (lambda g: defences.dp_epsilon(1.0, 0.1, 10, accountant="gdp"), ValueError, "choose 'rdp' or 'prv'"),
        (lambda g: defences.train_with_defence("gaussian"), TypeError, "must be a dlgkit.defences.Defence"),
        (lambda g: defences.train_with_defence(Defence(), steps=0), ValueError, "steps must be a positive int"),
    ],
)
def test_bad_parameters_get_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_grads())


def test_defence_objects_dispatch_to_the_transforms():
    g = _grads()
    assert all(torch.equal(a, b) for a, b in zip(Defence("prune", 0.3)(g), defences.prune(g, 0.3)))
    assert all(torch.equal(a, b) for a, b in zip(Defence("prune_global", 0.3)(g), defences.prune(g, 0.3, scope="global")))
    assert all(torch.equal(a, b) for a, b in zip(Defence("int8")(g), defences.quantise(g, "int8")))
    assert all(torch.equal(a, b) for a, b in zip(Defence()(g), g))
    assert Defence("gaussian", 1e-3).label == "gaussian 1e-03" and Defence("prune", 0.7).label == "prune 70%"


def test_defences_are_registered_classes_and_hashable_keys():
    assert type(Defence("prune", 0.7)) is defences.Prune and type(Defence("dp_sgd", 1.0)) is defences.DPSGD
    assert set(defences.DEFENCES) == set(defences.DEFENCE_KINDS) >= {"none", "gaussian", "laplacian", "prune", "prune_global", "fp16", "int8", "local_steps", "dp_sgd"}
    assert Defence("prune", 0.7) == defences.Prune(strength=0.7) and Defence("prune", 0.7) != Defence("prune_global", 0.7)
    rows = {Defence("prune", 0.7): 1, Defence("gaussian", 1e-3): 2, Defence(): 3}
    assert rows[Defence("prune", 0.7)] == 1 and rows[Defence("gaussian", 0.001)] == 2 and rows[Defence("none")] == 3
    assert str(Defence("prune", 0.7)) == "prune 70%" and repr(Defence("prune", 0.7)) == "Defence('prune', 0.7)"
    with pytest.raises(ValueError, match="not known for Prune"):
        defences.Prune(kind="gaussian", strength=0.1)


def test_defence_transforms_refuse_nan_gradients():
    g = _grads()
    g[1][3] = float("nan")
    for call in (lambda: defences.quantise(g, "int8"), lambda: defences.prune(g, 0.5), lambda: defences.add_noise(g, 1e-3), lambda: Defence("fp16")(g)):
        with pytest.raises(ValueError, match=r"gradients\[1\] holds NaN or inf"):
            call()


def test_local_steps_share_the_gradient_after_one_step(face_problem):
    model, x, y = face_problem
    one = Defence("local_steps", 1).share(model, x, y, local_lr=0.01)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one, federated.client_gradient(model, x, y)))
    five = Defence("local_steps", 5).share(model, x, y, local_lr=0.01)
    assert defences.relative_change(five, one) > 1e-3  # the model moved between the steps


def test_attack_defended_uses_the_local_learning_rate(face_problem):
    model, x, y = face_problem
    steps = Defence("local_steps", 5)
    slow = defences.attack_defended(model, x, y, steps, attacks.AttackConfig(iterations=1), local_lr=1e-4)
    fast = defences.attack_defended(model, x, y, steps, attacks.AttackConfig(iterations=1), local_lr=1.0)
    # five tiny steps change the model hardly at all: the inferred gradient is the gradient
    assert slow["relative_change"] < 1e-2 < fast["relative_change"], (slow["relative_change"], fast["relative_change"])


# --- DP-SGD through Opacus ---------------------------------------------------------------

def test_dp_sgd_without_noise_clips_each_example(face_problem):
    model = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    shared = defences.dp_sgd_gradient(model, x, y, noise_multiplier=0.0, max_grad_norm=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is untouched
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for k in range(3):
        g = federated.client_gradient(model, x[k : k + 1], y[k : k + 1])
        norm = math.sqrt(sum(float((t ** 2).sum()) for t in g))
        assert norm > 0.5  # so that clipping acts
        for e, t in zip(expected, g):
            e += t * min(1.0, 0.5 / (norm + 1e-6)) / 3
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(shared, expected))


def test_dp_sgd_noise_has_the_right_scale():
    model = models.LeNet(channels=1, num_classes=10, image_size=8, seed=0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    clean = defences.dp_sgd_gradient(model, x, y, 0.0, 1.0)
    noisy = defences.dp_sgd_gradient(model, x, y, 2.0, 1.0, generator=torch.Generator().manual_seed(0))
    diff = torch.cat([(a - b).flatten() for a, b in zip(noisy, clean)])
    assert float(diff.std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.05)  # sigma * C / batch size


def test_dp_epsilon_comes_from_opacus_and_behaves():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(100):
        acc.step(noise_multiplier=1.0, sample_rate=0.02)
    assert defences.dp_epsilon(1.0, 0.02, 100) == pytest.approx(acc.get_epsilon(1e-5))
    assert defences.dp_epsilon(2.0, 0.02, 100) < defences.dp_epsilon(1.0, 0.02, 100) < defences.dp_epsilon(1.0, 0.02, 400)
    prv, rdp = defences.dp_epsilon(1.0, 0.02, 100, accountant="prv"), defences.dp_epsilon(1.0, 0.02, 100)
    assert 0.5 * rdp < prv <= rdp  # PRV accounting is tighter than RDP
    assert defences.dp_epsilon(0.0, 0.02, 100) == math.inf and defences.dp_epsilon(1.0, 0.02, 0) == 0.0


# --- both sides of the trade-off ------------------------------------------------------------

def test_attack_succeeds_without_defence_and_fails_under_strong_noise(face_problem):
    model, x, y = face_problem
    clear = defences.attack_defended(model, x, y, Defence(), attacks.AttackConfig(iterations=40))
    noisy = defences.attack_defended(model, x, y, Defence("gaussian", 1e-1), attacks.AttackConfig(iterations=10))
    assert clear["psnr"] >= 30 and clear["relative_change"] == 0.0
    assert noisy["psnr"] < 12 and noisy["relative_change"] > 1.0
    assert float(metrics.psnr(clear["reconstruction"], x)) == pytest.approx(clear["psnr"])


def test_pruning_aware_attack_beats_the_plain_one(face_problem):
    model, x, y = face_problem
    plain = defences.attack_defended(model, x, y, Defence("prune", 0.7), attacks.AttackConfig(iterations=20))
    aware = defences.attack_defended(model, x, y, Defence("prune", 0.7), attacks.AttackConfig(iterations=20), adaptive=True)
    assert aware["psnr"] >= 25 and aware["psnr"] > plain["psnr"] + 10, (plain["psnr"], aware["psnr"])
    with pytest.raises(ValueError, match="needs a pruning defence"):
        defences.attack_defended(model, x, y, Defence("gaussian", 1e-3), adaptive=True)
    with pytest.raises(TypeError, match="attack must be a dlgkit.attacks.AttackConfig"):
        defences.attack_defended(model, x, y, Defence(), {"iterations": 3})
    with pytest.raises(ValueError, match="seed must be an int"):
        defences.attack_defended(model, x, y, Defence(), seed=0.5)


def test_attack_defended_leaves_the_model_alone(face_problem):
    model, x, y = face_problem
    model.zero_grad(set_to_none=True)
    model.train()
    for defence in (Defence(), Defence("local_steps", 2), Defence("prune", 0.5)):
        defences.attack_defended(model, x, y, defence, attacks.AttackConfig(iterations=2))
        assert all(p.grad is None for p in model.parameters()) and model.training


def test_train_with_defence_leaves_the_global_random_state_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    defences.train_with_defence(Defence("dp_sgd", 1.0), steps=2, batch_size=8)
    assert torch.equal(torch.rand(3), expected)


def test_sweep_rows_are_keyed_by_the_defence(face_problem):
    faces, _ = data.lfw_faces(1, size=16)
    wanted = [Defence(), Defence("prune", 0.5)]
    rows = defences.privacy_accuracy_sweep(wanted, faces, torch.tensor([2]), attacks.AttackConfig(iterations=2), train_steps=2, num_classes=10, progress=False)
    assert [r["defence"] for r in rows] == wanted and rows[1]["label"] == "prune 50%" and "adaptive_psnr" in rows[1]
    assert all(isinstance(r["leaks"], bool) and isinstance(r["stopped"], bool) for r in rows)
    with pytest.raises(ValueError, match="non-empty"):
        defences.privacy_accuracy_sweep(wanted, faces[:0], torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="Defence objects"):
        defences.privacy_accuracy_sweep(["prune 70%"], faces, torch.tensor([2]))


def test_pruning_aware_model_masks_the_gradient(face_problem):
    model, x, y = face_problem
    shared = defences.prune(federated.client_gradient(model, x, y), 0.5)
    aware = defences.PruningAwareModel(model, shared)
    assert torch.allclose(aware(x), model(x))
    masked = federated.client_gradient(aware, x, y)
    assert all(torch.allclose(m, s, atol=1e-6) for m, s in zip(masked, shared))  # same image: masked gradient = pruned one


def test_training_accuracy_responds_to_the_defence():
    clean = defences.train_with_defence(Defence(), steps=150)
    ruined = defences.train_with_defence(Defence("gaussian", 1e-1), steps=150)
    assert clean.accuracy >= 0.6 and clean.epsilon is None
    assert ruined.accuracy < 0.3
    private = defences.train_with_defence(Defence("dp_sgd", 1.0), steps=50)
    assert private.epsilon == pytest.approx(defences.dp_epsilon(1.0, 32 / 1438, 50))
    assert 0.0 <= private.accuracy <= 1.0


def test_the_vectorised_sweep_agrees_with_one_attack_at_a_time():
    """privacy_accuracy_sweep solves every defence's attacks as one batched problem per attack
    setting (DP-SGD's cosine attacks apart): the same verdicts, PSNRs within the attack's
    spread, and 'nothing to attack' rows left out of the batch."""
    faces, _ = data.lfw_faces(2, size=16)
    labels = torch.tensor([2, 7])
    wanted = [Defence(), Defence("gaussian", 1e-1), Defence("prune", 1.0), Defence("dp_sgd", 1.0), Defence("fp16")]
    config = attacks.AttackConfig(iterations=40)
    kw = dict(train_steps=1, num_classes=10, progress=False, adaptive=False)
    one = defences.privacy_accuracy_sweep(wanted, faces, labels, config, vectorised=False, **kw)
    many = defences.privacy_accuracy_sweep(wanted, faces, labels, config, **kw)
    for a, b in zip(one, many):
        assert a["defence"] == b["defence"] and (a["leaks"], a["stopped"]) == (b["leaks"], b["stopped"]), (a["label"], a["psnr"], b["psnr"])
        assert a["relative_change"] == pytest.approx(b["relative_change"])  # the same shared gradients
        assert b["attack_time"] >= 0
    none, noisy, pruned, private, half = many
    # both undefended attacks reconstruct to within float32 rounding (beyond 50 dB the PSNR
    # measures where each stopped in that rounding, e.g. 57.6 against 71.2 dB, not the attack)
    assert none["leaks"] and half["leaks"] and min(none["psnr"], one[0]["psnr"]) > 50
    assert noisy["stopped"] and private["stopped"] and abs(noisy["psnr"] - one[1]["psnr"]) < 3
    assert math.isnan(pruned["psnr"]) and pruned["reconstructions"].abs().sum() == 0
    with pytest.raises(TypeError, match="vectorised"):
        defences.privacy_accuracy_sweep(wanted[:1], faces, labels, config, vectorised="yes", **kw)


def test_the_sweep_explains_bad_settings_and_takes_labels_of_any_integer_type():
    faces, _ = data.lfw_faces(1, size=16)
    kw = dict(train_steps=1, num_classes=10, progress=False)
    with pytest.raises(TypeError, match="attack must be a dlgkit.attacks.AttackConfig"):
        defences.privacy_accuracy_sweep([Defence()], faces, torch.tensor([2]), {"iterations": 3}, **kw)
    with pytest.raises(TypeError, match="adaptive must be True"):
        defences.privacy_accuracy_sweep([Defence("prune", 0.5)], faces, torch.tensor([2]), attacks.AttackConfig(iterations=2), adaptive="no", **kw)
    with pytest.raises(ValueError, match="1-D tensor with one class index per image"):
        defences.privacy_accuracy_sweep([Defence()], faces, torch.tensor(2), attacks.AttackConfig(iterations=2), **kw)
    # int32 and whole-number float class indices are read as their values, on both paths
    rows = [defences.privacy_accuracy_sweep([Defence("dp_sgd", 1.0)], faces, labels, attacks.AttackConfig(iterations=2), vectorised=v, **kw)[0]
            for labels in (torch.tensor([2]), torch.tensor([2], dtype=torch.int32), torch.tensor([2.0])) for v in (True, False)]
    assert all(r["relative_change"] == pytest.approx(rows[0]["relative_change"]) for r in rows)
