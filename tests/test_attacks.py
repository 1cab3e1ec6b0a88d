import pytest
import torch
from torch import nn

from dlgkit import attacks, data, federated, models


@pytest.fixture(scope="module")
def face_setup():
    x, _ = data.lfw_faces(1, size=16)
    y = torch.tensor([3])
    model = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0)
    grads = federated.client_gradient(model, x, y)
    return model, grads, x, y


def test_idlg_label_is_exact_for_many_labels():
    model = models.LeNet(channels=1, num_classes=10, image_size=16, seed=1)
    x = torch.rand(1, 1, 16, 16)
    for label in range(10):
        grads = federated.client_gradient(model, x, torch.tensor([label]))
        assert attacks.idlg_label(model, grads) == label


def test_idlg_label_without_bias_uses_weight_rows():
    model = nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 4, bias=False))
    x = torch.rand(1, 8)
    for label in range(4):
        grads = federated.client_gradient(model, x, torch.tensor([label]))
        assert attacks.idlg_label(model, grads) == label


def test_idlg_attack_recovers_face(face_setup):
    model, grads, x, y = face_setup
    result = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(labels="idlg", iterations=100, restarts=3), seed=0)
    report = result.report(x, y)
    assert report["label_accuracy"] == 1.0
    assert report["psnr"] >= 30, report
    assert report["ssim"] > 0.95
    assert result.final_loss < 1e-5
    assert result.label_mode == "idlg"


def test_joint_dlg_recovers_label_and_image(face_setup):
    model, grads, x, y = face_setup
    result = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(labels="joint", iterations=100, restarts=4), seed=0)
    report = result.report(x, y)
    assert report["label_accuracy"] == 1.0
    assert report["psnr"] >= 30, report
    assert result.label_probs is not None and result.label_probs.shape == (1, 10)


def test_history_and_loss_curve(face_setup):
    model, grads, x, y = face_setup
    result = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(iterations=12, tol=None, patience=None), labels=y, history_every=5, seed=0)
    assert result.history_iters == [0, 5, 10, 12]
    assert len(result.history) == 4 and result.history[0].shape == x.shape
    assert result.iterations == 12 and len(result.losses) == 12
    assert result.losses[-1] < result.losses[0]
    assert float(result.history[0].min()) >= 0 and float(result.history[0].max()) <= 1


def test_adam_cosine_tv_and_clamp_reduce_the_distance(face_setup):
    model, grads, x, y = face_setup
    result = attacks.reconstruct(
        model, grads, x.shape, attacks.AttackConfig(optimizer="adam", lr=0.1, distance="cosine", tv=1e-3, iterations=60, init="uniform", clamp=True, tol=None),
        labels=y, seed=0,
    )
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert float(result.reconstruction.min()) >= 0 and float(result.reconstruction.max()) <= 1


def test_restarts_keep_the_lowest_distance(face_setup):
    model, grads, x, y = face_setup
    result = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(labels="joint", iterations=3, restarts=3, tol=None, patience=None, restart_policy="always"), seed=5)
    assert len(result.restart_losses) == 3 and result.statuses == ["budget"] * 3
    once = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(labels="joint", iterations=3, restarts=3, tol=None, patience=None), seed=5)
    assert len(once.restart_losses) == 1  # a run that used its budget while improving is not restarted
    assert result.final_loss == min(result.restart_losses)
    assert result.restart_losses[result.best_restart] == result.final_loss


def test_gradient_distance_values():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0]])]
    assert float(attacks.gradient_distance(a, b, "l2")) == pytest.approx(8.0)
    assert float(attacks.gradient_distance(a, a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    neg = [-t for t in a]
    assert float(attacks.gradient_distance(a, neg, "cosine")) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="distance"):
        attacks.gradient_distance(a, b, "l1")


def test_total_variation():
    flat = torch.ones(1, 1, 4, 4)
    assert float(attacks.total_variation(flat)) == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0
    assert float(attacks.total_variation(stripes)) == pytest.approx(1.0)


def test_bad_arguments_are_explained(face_setup):
    model, grads, x, y = face_setup
    call = lambda config=attacks.RECOMMENDED, **kw: attacks.reconstruct(model, kw.pop("grads", grads), kw.pop("shape", x.shape), config, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="optimizer"):
        attacks.AttackConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="distance"):
        attacks.RECOMMENDED.with_(distance="l1")
    with pytest.raises(ValueError, match="iterations"):
        attacks.AttackConfig(iterations=0)
    with pytest.raises(ValueError, match="restarts"):
        attacks.AttackConfig(restarts=-1)
    with pytest.raises(ValueError, match=r"shape must be the dummy batch's \(N, C, H, W\)"):
        call(shape=(1, 16, 16))
    with pytest.raises(ValueError, match="trainable parameters"):
        call(grads=grads[:-1])
    with pytest.raises(ValueError, match="labels"):
        attacks.AttackConfig(labels="guess")
    with pytest.raises(TypeError, match="labels must be None"):
        call(labels="idlg")
    with pytest.raises(ValueError, match="batch of 2"):
        call(shape=(2, 1, 16, 16), labels=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        call(labels=torch.tensor([12]))
    with pytest.raises(TypeError, match="nn.Module"):
        attacks.reconstruct("model", grads, x.shape)
    with pytest.raises(TypeError, match="AttackConfig"):
        attacks.reconstruct(model, grads, x.shape, dict(iterations=3))


def test_relu_model_warns():
    model = models.LeNet(channels=1, num_classes=10, image_size=16, activation="relu", seed=0)
    x, y = torch.rand(1, 1, 16, 16), torch.tensor([1])
    grads = federated.client_gradient(model, x, y)
    with pytest.warns(UserWarning, match="twice-differentiable"):
        attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(iterations=2), labels=y)


def test_recover_linear_input_exact_and_batch_mix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.Sigmoid(), nn.Linear(7, 3))
    x, y = torch.rand(1, 10), torch.tensor([2])
    grads = federated.client_gradient(model, x, y)
    recovered = attacks.recover_linear_input(grads[0], grads[1])
    assert float((recovered - x[0]).abs().max()) < 1e-5
    xb, yb = torch.rand(4, 10), torch.tensor([0, 1, 2, 0])
    gb = federated.client_gradient(model, xb, yb)
    mix = attacks.recover_linear_input(gb[0], gb[1])
    assert min(float((mix - xb[k]).abs().max()) for k in range(4)) > 1e-3
    with pytest.raises(ValueError, match="same 'out'"):
        attacks.recover_linear_input(grads[0], grads[1][:-1])
    with pytest.raises(ValueError, match="zero"):
        attacks.recover_linear_input(torch.zeros(3, 4), torch.zeros(3))


def test_relative_tolerance_is_scaled_by_the_gradient_norm(face_setup):
    model, grads, x, y = face_setup
    norm = sum(float((g.double() ** 2).sum()) for g in grads)
    rel = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(iterations=200, tol=1e-7, tol_relative=True), labels=y, seed=0)
    assert rel.iterations < 200 and rel.final_loss < 1e-7 * norm
    same = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(iterations=200, tol=1e-7 * norm, tol_relative=False), labels=y, seed=0)
    assert same.iterations == rel.iterations  # the same threshold, written in absolute terms


def test_presets_keep_their_values_and_run(face_setup):
    model, grads, x, y = face_setup
    assert attacks.PAPER_DLG == attacks.AttackConfig(labels="joint", init="gaussian", optimizer="lbfgs", lr=1.0, line_search=False, iterations=300, restarts=1, tol=1e-6, tol_relative=False, patience=None)
    assert attacks.RECOMMENDED == attacks.AttackConfig(labels="idlg", init="uniform", optimizer="lbfgs", lr=1.0, line_search=True, iterations=300, restarts=4, tol=1e-8, tol_relative=True, patience=10)
    assert attacks.RECOMMENDED_BATCH == attacks.RECOMMENDED.with_(tv=3e-4) and attacks.RECOMMENDED.tv == 0.0
    for preset in (attacks.PAPER_DLG, attacks.RECOMMENDED):
        result = attacks.reconstruct(model, grads, x.shape, preset.with_(iterations=2, restarts=1), seed=0)
        assert result.iterations <= 2


def test_attack_follows_the_model_dtype():
    x, _ = data.lfw_faces(1, size=16)
    model = models.LeNet(channels=1, num_classes=10, image_size=16, seed=0).double()
    grads = federated.client_gradient(model, x.double(), torch.tensor([4]))
    for labels in ("idlg", "joint"):
        result = attacks.reconstruct(model, grads, x.shape, attacks.AttackConfig(labels=labels, iterations=3), seed=0)
        assert result.reconstruction.dtype == torch.float64
