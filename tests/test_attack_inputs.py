"""Bad inputs to the attacks (images and the engine): each gives a clear error, or NaN metrics,
never a silent success; and the attacks leave the caller's model as they found it."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dlgkit import attacks, data, federated, models
from dlgkit.attacks import engine


@pytest.fixture(scope="module")
def problem():
    x, _ = data.lfw_faces(1, size=8)
    model = models.LeNet(channels=1, num_classes=10, image_size=8, seed=0)
    y = torch.tensor([3])
    return model, federated.client_gradient(model, x, y), x, y


FAST = attacks.RECOMMENDED.with_(iterations=2, restarts=1)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(tv=math.nan), "tv must be a finite number"),
        (dict(tv=-1.0), r"tv must lie in \[0.0, inf\)"),
        (dict(tol=-1e-8), r"tol must lie in \[0.0, inf\)"),
        (dict(lr=0.0), r"lr must lie in \(0.0, inf\)"),
        (dict(lr=math.inf), "lr must be a finite number"),
        (dict(iterations=2.5), "iterations must be a positive int"),
        (dict(patience=0), "patience must be a positive int or None"),
        (dict(restart_policy="sometimes"), "restart_policy='sometimes' is not known"),
        (dict(init="zeros"), "init='zeros' is not known"),
        (dict(clamp="yes"), "clamp must be True or False"),
        (dict(tol_relative=1), "tol_relative must be True or False"),
    ],
)
def test_config_fields_are_checked(changes, match):
    with pytest.raises(ValueError, match=match):
        attacks.RECOMMENDED.with_(**changes)


def test_config_is_frozen_and_with_names_unknown_fields():
    with pytest.raises(Exception):
        attacks.RECOMMENDED.iterations = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field"):
        attacks.RECOMMENDED.with_(iteration=3)
    assert attacks.RECOMMENDED.with_(iterations=3).iterations == 3 and attacks.RECOMMENDED.iterations == 300
    assert hash(attacks.RECOMMENDED) == hash(attacks.AttackConfig(lr=1.0, restarts=4))


def test_text_config_fields_are_checked():
    with pytest.raises(ValueError, match="span_weight must lie"):
        attacks.TextAttackConfig(span_weight=-1.0)
    with pytest.raises(ValueError, match="parametrization='onehot' is not known"):
        attacks.TextAttackConfig(parametrization="onehot")
    assert attacks.TextAttackConfig().step_size() == 0.01 and attacks.TextAttackConfig(parametrization="bag").step_size() == 0.1


def test_nan_or_inf_gradient_is_refused(problem):
    model, grads, x, _ = problem
    for bad in (math.nan, math.inf):
        broken = [g.clone() for g in grads]
        broken[2].view(-1)[0] = bad
        with pytest.raises(ValueError, match=r"target_gradients\[2\] holds NaN or inf"):
            attacks.reconstruct(model, broken, x.shape, FAST)


def test_diverged_attack_reports_nan_never_success(problem):
    model, grads, x, y = problem

    def exploding(m, xx, yy):  # an observation that turns NaN: the trial diverges
        return [g * math.nan for g in engine.gradient_observation(m, xx, yy)]

    result = attacks.reconstruct(model, grads, x.shape, FAST, labels=y, observe=exploding, progress=False)
    assert result.statuses == ["diverged"] and result.final_loss == math.inf
    report = result.report(x, y)
    assert math.isnan(report.psnr) and math.isnan(report.ssim) and math.isnan(report.label_accuracy)
    assert not report.success and report.status == "diverged"
    assert torch.isnan(report.psnr_per_image).all()


def test_gradient_list_is_checked_against_the_model(problem):
    model, grads, x, _ = problem
    with pytest.raises(ValueError, match="trainable parameters"):
        attacks.reconstruct(model, grads + [grads[-1]], x.shape, FAST)
    with pytest.raises(ValueError, match=r"target_gradients\[0\] has shape"):
        attacks.reconstruct(model, [grads[0][:1]] + list(grads[1:]), x.shape, FAST)
    with pytest.raises(TypeError, match="non-empty list of tensors"):
        attacks.reconstruct(model, [], x.shape, FAST)
    with pytest.raises(TypeError, match="non-empty list of tensors"):
        attacks.reconstruct(model, grads[0], x.shape, FAST)


def test_batch_size_is_cross_checked_with_the_gradient(problem):
    model, grads, x, _ = problem  # a gradient of one example
    with pytest.raises(ValueError, match="batch of 4, but the last layer's gradient has rank 1"):
        attacks.reconstruct(model, grads, (4, 1, 8, 8), FAST)
    xb = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    four = federated.client_gradient(model, xb, torch.tensor([1, 2, 3, 4]))
    result = attacks.reconstruct(model, four, xb.shape, FAST, progress=False)  # the right size passes
    assert result.reconstruction.shape == xb.shape


def test_shape_and_labels_are_checked(problem):
    model, grads, x, _ = problem
    with pytest.raises(ValueError, match=r"shape\[0\] must be a positive int"):
        attacks.reconstruct(model, grads, (0, 1, 8, 8), FAST)
    with pytest.raises(ValueError, match=r"shape\[2\] must be a positive int"):
        attacks.reconstruct(model, grads, (1, 1, 8.5, 8), FAST)
    with pytest.raises(ValueError, match="float label such as 3.7"):
        attacks.reconstruct(model, grads, x.shape, FAST, labels=torch.tensor([3.7]))
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        attacks.reconstruct(model, grads, x.shape, FAST, seed=0.5)
    with pytest.raises(ValueError, match="history_every must be a positive int"):
        attacks.reconstruct(model, grads, x.shape, FAST, history_every=0)


def test_gradient_distance_refuses_mismatched_lists():
    a = [torch.ones(3), torch.ones(2, 2)]
    with pytest.raises(ValueError, match="2 and 1 tensors"):
        attacks.gradient_distance(a, a[:1])
    with pytest.raises(ValueError, match="no broadcasting"):
        attacks.gradient_distance(a, [torch.ones(1), torch.ones(2, 2)])
    with pytest.raises(ValueError, match="no broadcasting"):
        attacks.gradient_distance([torch.ones(2, 1)], [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="empty"):
        attacks.gradient_distance([], [])
    assert float(attacks.gradient_distance(a, [t * 2 for t in a])) == pytest.approx(7.0)


def test_report_shape_is_the_same_for_one_image_and_a_batch(problem):
    model, grads, x, y = problem
    one = attacks.reconstruct(model, grads, x.shape, FAST, progress=False).report(x, y)
    xb = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    yb = torch.tensor([1, 5])
    batch = attacks.reconstruct(model, federated.client_gradient(model, xb, yb), xb.shape, FAST, progress=False).report(xb, yb)
    assert type(one) is type(batch) is attacks.AttackReport
    assert one.psnr_per_image.shape == (1,) and batch.psnr_per_image.shape == (2,)
    assert one["psnr"] == one.psnr == pytest.approx(float(one.psnr_per_image.mean()))
    assert one.label_set_accuracy == one.label_accuracy == 1.0
    assert str(one).startswith(f"PSNR {one.psnr:.3g} dB") and "label accuracy 1" in str(one)
    with pytest.raises(KeyError, match="not a field"):
        one["psnr_mean"]
    with pytest.raises(ValueError, match="original must be the true batch"):
        attacks.reconstruct(model, grads, x.shape, FAST, progress=False).report(xb, yb)


class _Noisy(nn.Module):
    """A smooth classifier with BatchNorm and Dropout (mode-dependent layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(16, 10))
        self.num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_train_mode_model_is_attacked_in_eval_mode_and_left_alone():
    torch.manual_seed(0)
    model = _Noisy()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    model.eval()
    grads = federated.client_gradient(model, x, y)
    model.train()
    stats = model.body[2].num_batches_tracked.clone(), model.body[2].running_mean.clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    runs = []
    for _ in range(2):
        with pytest.warns(UserWarning, match="runs it in eval mode"):
            runs.append(attacks.reconstruct(model, grads, x.shape, FAST.with_(iterations=3), labels=y, progress=False))
    assert torch.equal(runs[0].reconstruction, runs[1].reconstruction)  # no dropout: deterministic
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.body[2].num_batches_tracked, stats[0]) and torch.equal(model.body[2].running_mean, stats[1])
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_attack_leaves_no_grad_on_the_caller_model(problem):
    model, grads, x, _ = problem
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eval-mode LeNet needs no warning
        attacks.reconstruct(model, grads, x.shape, FAST, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_custom_observation_plugs_in_without_touching_the_loop(problem):
    model, grads, x, y = problem
    calls = []

    def doubled(m, xx, yy):
        calls.append(1)
        return [2 * g for g in engine.gradient_observation(m, xx, yy)]

    result = attacks.reconstruct(model, [2 * g for g in grads], x.shape, attacks.RECOMMENDED.with_(iterations=60, restarts=1), labels=y, observe=doubled, progress=False)
    assert calls and result.report(x, y).psnr >= 30
    with pytest.raises(ValueError, match="no broadcasting"):
        attacks.reconstruct(model, grads, x.shape, FAST, labels=y, observe=lambda m, xx, yy: [g[:1] for g in engine.gradient_observation(m, xx, yy)])


def test_an_example_that_barely_contributes_warns_but_runs(problem):
    model, _, _, _ = problem
    xb = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    yb = torch.tensor([1, 2, 3, 4])
    per_example = [federated.client_gradient(model, xb[i : i + 1], yb[i : i + 1]) for i in range(4)]
    weights = (1.0, 1.0, 1.0, 1e-4)  # the fourth example is one the model already fits
    mixed = [sum(w * g[k] for w, g in zip(weights, per_example)) / 4 for k in range(len(per_example[0]))]
    with pytest.warns(UserWarning, match="3 clear directions for a batch of 4"):
        result = attacks.reconstruct(model, mixed, xb.shape, FAST, labels=yb, progress=False)
    assert result.reconstruction.shape == xb.shape


# --- hostile calls found by a probe (each failed before its fix) -------------------------------


def test_sweep_takes_a_generator_and_checks_its_arguments_up_front():
    from dlgkit.defences import Defence, privacy_accuracy_sweep

    images, labels = torch.rand(1, 1, 8, 8), torch.tensor([3])
    # a generator is read once into a list: the train_steps check is reached (not [] returned)
    with pytest.raises(ValueError, match="train_steps must be a positive int"):
        privacy_accuracy_sweep((d for d in [Defence("none")]), images, labels, train_steps=0)
    with pytest.raises(TypeError, match=r"wrap a single one in a list"):
        privacy_accuracy_sweep(Defence("none"), images, labels)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor.*torch.tensor\(\[3\]\)"):
        privacy_accuracy_sweep([Defence("none")], images, [3])
    with pytest.raises(ValueError, match="divide by 255"):
        privacy_accuracy_sweep([Defence("none")], images * 255, labels)


@pytest.mark.parametrize("seed", [np.int64(3), 3])
def test_numpy_seed_is_accepted_and_gives_the_same_run(problem, seed):
    model, grads, x, _ = problem
    a = attacks.reconstruct(model, grads, x.shape, FAST, seed=seed, progress=False)
    b = attacks.reconstruct(model, grads, x.shape, FAST, seed=3, progress=False)
    assert torch.equal(a.reconstruction, b.reconstruction)


def test_seed_beyond_int64_is_refused(problem):
    from dlgkit.checks import check_seed

    model, grads, x, _ = problem
    with pytest.raises(ValueError, match=r"seed must be an int >= 0 and at most 2\*\*63 - 1"):
        attacks.reconstruct(model, grads, x.shape, FAST, seed=2**64, progress=False)
    assert type(check_seed("seed", np.int64(5))) is int


@pytest.mark.parametrize(
    "observe, error, match",
    [
        (lambda m, x, y: engine.gradient_observation(m, x, y)[0], TypeError, "observe must return a list of tensors"),
        (lambda m, x, y: None, TypeError, "observe must return a list of tensors"),
        (lambda m, x, y: engine.gradient_observation(m, x, y)[:2], ValueError, r"observe returned 2 tensor\(s\)"),
        (lambda m, x, y: [g.detach() for g in engine.gradient_observation(m, x, y)], ValueError, "do not depend on x"),
    ],
)
def test_observe_output_is_checked(problem, observe, error, match):
    model, grads, x, y = problem
    with pytest.raises(error, match=match):
        attacks.reconstruct(model, grads, x.shape, FAST, labels=y, observe=observe, progress=False)


def test_num_classes_must_match_the_last_layer(problem):
    model, grads, x, _ = problem
    with pytest.raises(ValueError, match=r"num_classes=5, but the model's last layer has 10 outputs"):
        attacks.reconstruct(model, grads, x.shape, FAST, num_classes=5, progress=False)


def test_all_zero_gradient_is_named_and_gives_nan_in_attack_defended(problem):
    from dlgkit.defences import Defence, attack_defended

    model, grads, x, y = problem
    with pytest.raises(ValueError, match="target_gradients is all zero"):
        attacks.reconstruct(model, [torch.zeros_like(g) for g in grads], x.shape, FAST, progress=False)
    out = attack_defended(model, x, y, Defence("prune", 1.0), FAST)
    assert math.isnan(out["psnr"]) and out["status"] == "nothing to attack"


def test_defence_numbers_accept_numpy_and_torch_scalars():
    from dlgkit.defences import Defence, add_noise, dp_epsilon

    g = [torch.ones(3)]
    assert torch.equal(add_noise(g, np.float32(0.0))[0], g[0])
    d = Defence("prune", torch.tensor(0.5))
    assert d == Defence("prune", 0.5) and type(d.strength) is float
    assert dp_epsilon(1.0, 0.01, np.int64(10)) == dp_epsilon(1.0, 0.01, 10)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        dp_epsilon(1.0, 0.01, 2.5)


def test_quantise_defences_ignore_strength_and_fp16_overflow_warns():
    from dlgkit.defences import Defence, quantise

    assert Defence("fp16", 0.3) == Defence("fp16") and Defence("int8", 2.0).strength == 0.0
    with pytest.warns(UserWarning, match="become inf in fp16"):
        quantise([torch.tensor([1e5])], "fp16")
