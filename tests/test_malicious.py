"""Chapter 7's malicious server: the imprint module, trap weights, the client's model check,
and their bad inputs."""

import math

import pytest
import torch
from torch import nn

from dlgkit.attacks import imprint as im
from dlgkit.attacks import trap
from dlgkit.data import lfw_faces
from dlgkit.defences import add_noise
from dlgkit.federated import client_gradient
from dlgkit.model_check import inspect_model
from dlgkit.models import LeNet

SHAPE = (1, 32, 32)


@pytest.fixture(scope="module")
def faces():
    return lfw_faces(n=100, size=32, num_classes=10)


def _lenet():
    return LeNet(channels=1, num_classes=10, image_size=32, seed=0)


# --- imprint: the closed form ----------------------------------------------------------------


@pytest.mark.parametrize("batch, bins", [(8, 16), (32, 64), (64, 16), (128, 256)])
def test_closed_form_matches_monte_carlo(batch, bins):
    gen = torch.Generator().manual_seed(1)
    trials = 4000
    which = torch.randint(0, bins, (trials, batch), generator=gen)
    counts = torch.zeros(trials, bins).scatter_add_(1, which, torch.ones(trials, batch))
    alone = counts.gather(1, which) == 1
    mc = float(alone.double().mean())
    expected = im.expected_recovered_fraction(batch, bins=bins)
    assert expected == pytest.approx((1 - 1 / bins) ** (batch - 1))
    assert abs(mc - expected) < 4 * math.sqrt(expected * (1 - expected) / trials) + 1e-3


def test_closed_form_with_unequal_bins_and_a_dead_region():
    gen = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2])  # bin 0 is the dead region below c_1
    trials, batch = 20000, 6
    which = torch.multinomial(probs, trials * batch, replacement=True, generator=gen).view(trials, batch)
    counts = torch.zeros(trials, 5).scatter_add_(1, which, torch.ones(trials, batch))
    alone = (counts.gather(1, which) == 1) & (which > 0)
    expected = im.expected_recovered_fraction(batch, probabilities=probs[1:].tolist())
    assert abs(float(alone.double().mean()) - expected) < 0.01
    assert im.expected_recovered_fraction(batch, probabilities=[0.25] * 4) == pytest.approx(im.expected_recovered_fraction(batch, bins=4))


# --- imprint: recovery ------------------------------------------------------------------------


def test_closed_form_band_brackets_the_closed_form_and_narrows_with_trials():
    for batch, bins in [(8, 16), (32, 256), (128, 64)]:
        expected = im.expected_recovered_fraction(batch, bins=bins)
        low5, high5 = im.closed_form_band(batch, bins, trials=5)
        low40, high40 = im.closed_form_band(batch, bins, trials=40)
        assert low5 <= low40 <= expected <= high40 <= high5
        assert high40 - low40 < high5 - low5
    assert im.closed_form_band(8, 4, 3) == im.closed_form_band(8, 4, 3)  # seeded


def test_recovery_fractions_measure_the_closed_form():
    model = im.imprint_model(_lenet(), SHAPE, im.imprint_thresholds(im.varied_faces(5000, seed=1), 64))
    fractions = im.recovery_fractions(model, im.imprint_recover, batch_size=16, trials=6)
    assert fractions.shape == (6,) and torch.equal(fractions, im.recovery_fractions(model, im.imprint_recover, 16, 6))
    low, high = im.closed_form_band(16, 64, 6)
    assert low <= float(fractions.mean()) <= high
    # a batch larger than the layer's bins: at most one image per bin comes back, no error
    many = im.recovery_fractions(model, im.imprint_recover, batch_size=200, trials=1)
    assert float(many[0]) * 200 <= 64




def test_imprint_recovers_single_images_exactly(faces):
    x, y = faces
    th = im.imprint_thresholds(x, 64)
    model = im.imprint_model(_lenet(), SHAPE, th)
    batch, labels = x[:32], y[:32]
    rec = im.imprint_recover(model, client_gradient(model, batch, labels))
    # ground truth: which images are alone in their bin
    bin_of = torch.bucketize(im.brightness(batch), th, right=False) - 1
    alone = (bin_of[:, None] == bin_of[None, :]).sum(1) == 1
    ok = im.exact_matches(rec, batch)
    assert alone.sum() >= 10 and torch.equal(ok, alone)
    best = torch.cdist(batch[alone].flatten(1).double(), rec.flatten(1).double()).amin(1)
    assert float(best.max()) / 32 < 1e-4  # RMS error far below 60 dB's 1e-3
    assert len(rec) == len(set(bin_of.tolist()))


def test_imprint_model_keeps_the_honest_prediction(faces):
    x, _ = faces
    honest = _lenet()
    model = im.imprint_model(honest, SHAPE, im.imprint_thresholds(x, 16), decoder_scale=1e-4)
    assert torch.allclose(model(x[:8]), honest(x[:8]), atol=1e-2)


def test_noise_destroys_exact_recovery(faces):
    x, y = faces
    model = im.imprint_model(_lenet(), SHAPE, im.imprint_thresholds(im.varied_faces(1000, seed=1), 256))
    grads = client_gradient(model, x[:16], y[:16])
    clean = im.exact_matches(im.imprint_recover(model, grads), x[:16]).float().mean()
    noisy = add_noise(grads, 1e-4, generator=torch.Generator().manual_seed(0))
    hit = im.exact_matches(im.imprint_recover(model, noisy), x[:16]).float().mean()
    assert clean > 0.8 and hit == 0.0


# --- trap weights ----------------------------------------------------------------------------


def test_trap_rows_lean_negative_and_recover_images(faces):
    x, y = faces
    w = trap.trap_weights(1024, 200, margin=0.05, seed=3)
    pos, neg = w.clamp_min(0).sum(1), -w.clamp_max(0).sum(1)
    assert torch.allclose(pos, 0.95 * neg, rtol=1e-5)
    model = trap.trap_model(_lenet(), SHAPE, neurons=1000, margin=0.03)
    ok = im.exact_matches(trap.trap_recover(model, client_gradient(model, x[:8], y[:8])), x[:8])
    assert bool(ok.all())
    ok32 = im.exact_matches(trap.trap_recover(model, client_gradient(model, x[:64], y[:64])), x[:64])
    assert 0.1 < float(ok32.float().mean()) < 1.0  # bigger batches: more neurons see several images


# --- the client's check ----------------------------------------------------------------------


def test_inspection_flags_planted_models_and_passes_honest_ones(faces):
    x, _ = faces
    assert not inspect_model(_lenet())
    assert not inspect_model(nn.Sequential(nn.Linear(1024, 1000), nn.ReLU(), nn.Linear(1000, 10)))
    imp = inspect_model(im.imprint_model(_lenet(), SHAPE, im.imprint_thresholds(x, 64)))
    assert imp.suspicious and any("front: 64 of 64 rows point the same way" in r for r in imp.reasons)
    tr = inspect_model(trap.trap_model(_lenet(), SHAPE, neurons=500))
    assert tr.suspicious and any("front: 100% of 500" in r and "trap" in r for r in tr.reasons)


def test_chance_parallel_pairs_matches_random_rows_and_spares_low_dimensional_layers():
    from dlgkit.model_check import CHANCE_PAIRS, chance_parallel_pairs

    g = torch.Generator().manual_seed(0)
    for dims, cos_min in [(2, 0.9999), (3, 0.999), (4, 0.99)]:
        counts = []
        for _ in range(20):
            unit = torch.nn.functional.normalize(torch.randn(256, dims, generator=g, dtype=torch.float64), dim=1)
            cos = unit @ unit.T
            counts.append(int(((cos >= cos_min).sum() - 256) // 2))
        expected = chance_parallel_pairs(256, dims, cos_min)
        mean = sum(counts) / len(counts)
        assert abs(mean - expected) < 4 * math.sqrt(expected / len(counts)) + 0.5, (dims, mean, expected)
    assert chance_parallel_pairs(1000, 1024, 0.9999) < 1e-100
    # a random Linear(2, 256) has parallel rows by chance: not judged, not flagged
    layer = nn.Linear(2, 256)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(256, 2, generator=g))
    verdict = inspect_model(layer)
    assert not verdict and verdict.not_judged and "2 dimensions" in verdict.not_judged[0]
    assert chance_parallel_pairs(256, 2, 0.9999) > CHANCE_PAIRS
    # ... while the imprint layer in 1024 dimensions is still judged and flagged
    assert not inspect_model(_lenet()).not_judged


def test_rows_that_are_all_one_row_are_flagged_even_in_few_dimensions():
    """Probe finding: a Linear(2, 256) or Linear(3, 8) whose rows were all the same row was
    "parallel by chance too" and passed; far more parallel pairs than chance gives are judged."""
    g = torch.Generator().manual_seed(1)
    for inputs, outputs in [(2, 256), (3, 8)]:
        layer = nn.Linear(inputs, outputs)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(1, inputs, generator=g).expand(outputs, inputs))
        verdict = inspect_model(layer)
        assert verdict and not verdict.not_judged, (inputs, verdict)
        assert f"{outputs} of {outputs} rows point the same way" in verdict.reasons[0] and "far more than chance" in verdict.reasons[0]
    # random rows in 2 dimensions stay not judged and unflagged
    for _ in range(10):
        layer = nn.Linear(2, 256)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(256, 2, generator=g))
        verdict = inspect_model(layer)
        assert not verdict and verdict.not_judged


# --- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(faces):
    x, y = faces
    with pytest.raises(ValueError, match="bins must be a positive int"):
        im.imprint_thresholds(x, 0)
    with pytest.raises(ValueError, match="same brightness.*degenerate"):
        im.imprint_thresholds(torch.full((10, 1, 4, 4), 0.5), 4)
    with pytest.raises(ValueError, match="bins=256 needs at least 256 public images"):
        im.imprint_thresholds(x, 256)
    with pytest.raises(ValueError, match="too few distinct brightness values"):
        im.imprint_thresholds(torch.tensor([0.2, 0.4, 0.6]).repeat_interleave(5).view(15, 1, 1, 1).expand(15, 1, 4, 4), 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        im.imprint_model(_lenet(), SHAPE, torch.tensor([0.1, 0.1, 0.3]))
    model = im.imprint_model(_lenet(), SHAPE, im.imprint_thresholds(x, 16))
    grads = client_gradient(model, x[:4], y[:4])
    with pytest.raises(ValueError, match="one tensor per parameter of the planted model"):
        im.imprint_recover(model, grads[2:])
    with pytest.raises(ValueError, match=r"gradients\[0\] must have shape \(16, 1024\)"):
        im.imprint_recover(model, [grads[0].T] + grads[1:])
    with pytest.raises(ValueError, match="NaN or inf"):
        im.imprint_recover(model, [grads[0] * float("nan")] + grads[1:])
    with pytest.raises(TypeError, match="PlantedModel"):
        im.imprint_recover(_lenet(), grads)
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, 1, 32, 32\)"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="exactly one of bins"):
        im.expected_recovered_fraction(8)
    with pytest.raises(ValueError, match="summing to at most 1"):
        im.expected_recovered_fraction(8, probabilities=[0.7, 0.7])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        im.expected_recovered_fraction(0, bins=4)
    with pytest.raises(ValueError, match=r"weight must be a tensor of shape \(neurons, 1024\)"):
        im.PlantedModel(_lenet(), SHAPE, torch.zeros(4, 100), torch.zeros(4))
    with pytest.raises(ValueError, match="margin must lie in"):
        trap.trap_weights(1024, 10, margin=1.0)
    with pytest.raises(ValueError, match="neurons must be a positive int"):
        trap.trap_model(_lenet(), SHAPE, neurons=0)
    with pytest.raises(ValueError, match="pixel values in"):
        im.exact_matches(x[:2], x[:2] * 255)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        inspect_model("lenet")
    with pytest.raises(ValueError, match="trials must be a positive int"):
        im.closed_form_band(8, 16, trials=0)
    with pytest.raises(ValueError, match="level must lie in"):
        im.closed_form_band(8, 16, trials=4, level=1.0)
    with pytest.raises(ValueError, match="bins must be a positive int"):
        im.closed_form_band(8, 0, trials=4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        im.recovery_fractions(_lenet(), im.imprint_recover, batch_size=0, trials=2)
    with pytest.raises(TypeError, match="recover a function"):
        im.recovery_fractions(_lenet(), "imprint", batch_size=4, trials=2)


def test_varied_faces_is_a_seeded_continuous_population():
    a, b = im.varied_faces(300, seed=4), im.varied_faces(300, seed=4)
    assert a.shape == (300, 1, 32, 32) and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert len(torch.unique(im.brightness(a))) == 300  # more distinct brightness values than the 100 faces
    assert not torch.equal(a, im.varied_faces(300, seed=5))


def test_best_psnr_scores_each_batch_image_by_its_nearest_recovery(faces):
    x, _ = faces
    best = im.best_psnr(torch.stack([x[1], (x[0] + 0.01).clamp(0, 1)]), x[:3])
    assert float(best[1]) > 200 and 35 < float(best[0]) < 41 and float(best[2]) < 35
    assert torch.isinf(im.best_psnr(torch.zeros(0, 1, 32, 32), x[:2])).all()
    assert not im.exact_matches(torch.zeros(0, 1, 32, 32), x[:2]).any()


def test_more_bad_inputs_name_the_argument_and_the_fix(faces):
    x, _ = faces
    model = _lenet()
    with pytest.raises(ValueError, match="bins must be a positive int, got 0"):
        im.expected_recovered_fraction(8, bins=0)
    with pytest.raises(ValueError, match="bins must be a positive int, got 2.5"):
        im.imprint_thresholds(x, 2.5)
    with pytest.raises(ValueError, match="public_images must be a tensor of images"):
        im.imprint_thresholds([[0.1, 0.2]], 2)
    with pytest.raises(ValueError, match="public_images holds NaN or inf"):
        im.imprint_thresholds(torch.cat([x[:4], torch.full((1, 1, 32, 32), float("nan"))]), 2)
    with pytest.raises(ValueError, match="thresholds must be a 1-D tensor with one entry per bin"):
        im.imprint_model(model, SHAPE, torch.tensor([]))
    with pytest.raises(ValueError, match="thresholds holds NaN or inf"):
        im.imprint_model(model, SHAPE, torch.tensor([0.1, float("inf")]))
    with pytest.raises(ValueError, match="decoder_scale must lie in"):
        im.imprint_model(model, SHAPE, torch.tensor([0.1, 0.2]), decoder_scale=0)
    with pytest.raises(ValueError, match="inputs must be at least 2"):
        trap.trap_weights(1, 10)
    with pytest.raises(ValueError, match="n must be a positive int"):
        im.varied_faces(0)
    with pytest.raises(ValueError, match=r"images must be a tensor of shape \(N, ...\) with N >= 1"):
        im.brightness(torch.rand(0, 1, 4, 4))
    with pytest.raises(ValueError, match=r"recovered must be a tensor of shape \(M, 1, 32, 32\)"):
        im.best_psnr(torch.rand(2, 1, 16, 16), x[:2])
    with pytest.raises(TypeError, match="must be the PlantedModel the server sent"):
        trap.trap_recover(model, [p.detach() for p in model.parameters()])
    with pytest.raises(ValueError, match="min_parallel must be at least 2"):
        inspect_model(model, min_parallel=1)
    with pytest.raises(ValueError, match="level must lie in"):
        im.closed_form_band(8, 16, 4, level=0)
    # a batch far larger than the band can simulate: a clear error pointing at the closed form
    with pytest.raises(ValueError, match="batch_size x trials = 2000000.*expected_recovered_fraction"):
        im.closed_form_band(100_000, 16, trials=20)
    planted = im.imprint_model(model, SHAPE, im.imprint_thresholds(x, 8))
    with pytest.raises(ValueError, match=r"recover must return the recovered images as a tensor \(M, 1, 32, 32\)"):
        im.recovery_fractions(planted, lambda m, g: torch.zeros(3), batch_size=4, trials=1)


def _small_lenet() -> nn.Module:
    return LeNet(channels=1, image_size=4, num_classes=3, seed=0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: im.imprint_thresholds(torch.rand(20, 1, 4, 4).numpy(), 4), ValueError, r"numpy\.ndarray of shape \(20, 1, 4, 4\).*torch\.as_tensor"),
    (lambda: im.imprint_thresholds(torch.rand(20, 0), 4), ValueError, r"public_images"),
    (lambda: im.brightness(torch.rand(3, 0)), ValueError, r"at least one pixel"),
    (lambda: im.PlantedModel(_small_lenet(), (1, 4, 4), torch.zeros(2, 16, dtype=torch.long), torch.zeros(2)), TypeError, r"floating-point"),
    (lambda: im.PlantedModel(_small_lenet(), (1, 4, 4), torch.zeros(0, 16), torch.zeros(0)), ValueError, r"at least one neuron"),
    (lambda: im.PlantedModel(_small_lenet(), (1, 4, 4), torch.zeros(2, 16).numpy(), torch.zeros(2)), ValueError, r"numpy\.ndarray"),
    (lambda: im.expected_recovered_fraction(4, probabilities=0.5), TypeError, r"probabilities must be a list"),
    (lambda: im.expected_recovered_fraction(4, probabilities={0.5: "a"}), TypeError, r"got a dict"),
    (lambda: im.best_psnr(torch.rand(3), torch.rand(4)), ValueError, r"batch must be the client's images"),
    (lambda: im.best_psnr(torch.rand(2, 1, 4, 4), torch.tensor(0.5)), ValueError, r"batch must be the client's images"),
    (lambda: im.best_psnr(torch.rand(2, 16), torch.rand(3, 1, 4, 4)), ValueError, r"recovered must be a tensor of shape \(M, 1, 4, 4\)"),
], ids=["ndarray public", "pixel-less public", "pixel-less brightness", "integer weight", "no neuron", "ndarray weight",
        "scalar probabilities", "dict probabilities", "1-D batch", "0-D batch", "flat recovered"])
def test_planted_layer_helpers_refuse_bad_input_clearly(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_probabilities_may_be_a_tensor():
    assert im.expected_recovered_fraction(4, probabilities=torch.tensor([0.5, 0.5])) == pytest.approx(2 * 0.5 * 0.5**3)
