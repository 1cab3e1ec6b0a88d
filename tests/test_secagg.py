"""Chapter 7's secure aggregation: under Flower's SecAgg+ the server sees only the mean of the
clients' gradients. That hides one client's face from the honest one-image attack of chapter 2,
but an imprint model sent to every client still gives the faces back through the sum."""

import pytest
import torch
from torch import nn

from dlgkit import attacks, metrics
from dlgkit.attacks import imprint as im
from dlgkit.checks import STOPPED_PSNR, SUCCESS_PSNR
from dlgkit.federated import client_gradient
from dlgkit.fl import task
from dlgkit.fl.secagg import attack_aggregate, simulate_secagg

# Ray and localhost servers: these tests share one xdist worker (make test runs -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("flower")

N = 3


@pytest.fixture(scope="module")
def run():
    settings = task.FLSettings(mode="fedsgd", examples_per_client=1, seed=0)
    honest = task.make_model(settings)
    planted = im.imprint_model(task.make_model(settings), (1, 32, 32), im.imprint_thresholds(im.varied_faces(2000, seed=1), 128), decoder_scale=1.0)
    strategy = simulate_secagg(settings, [honest, planted], num_clients=N)
    clients = [task.load_partition(settings, i, N) for i in range(N)]
    return strategy, honest, planted, clients


def test_server_sees_only_the_mean_of_the_clients_gradients(run):
    strategy, honest, _, clients = run
    assert strategy.distinct_replies == [1, 1] and len(strategy.aggregates) == 2
    own = [client_gradient(honest, x, y) for x, y in clients]
    mean = [sum(ts) / N for ts in zip(*own)]
    assert max(float((a - m).abs().max()) for a, m in zip(strategy.aggregates[0], mean)) < 1e-5  # quantisation only
    assert min(max(float((a - g).abs().max()) for a, g in zip(strategy.aggregates[0], o)) for o in own) > 1e-2


def test_secagg_hides_one_client_from_the_honest_attack(run):
    # chapter 2's attack aimed at one client's face; a batch attack on the sum (chapter 3) can
    # still find the N faces when N is small, without saying whose (benchmarks/malicious.py)
    strategy, honest, _, clients = run
    (x0, y0) = clients[0]
    cfg = attacks.RECOMMENDED.with_(iterations=100, restarts=1)
    alone = attacks.reconstruct(honest, client_gradient(honest, x0, y0), x0.shape, cfg, labels=y0, seed=0)
    hidden = attacks.reconstruct(honest, strategy.aggregates[0], x0.shape, cfg, labels=y0, seed=0)
    assert float(metrics.psnr(alone.reconstruction, x0)) >= SUCCESS_PSNR  # without SecAgg: the face
    assert float(metrics.psnr(hidden.reconstruction, x0)) < STOPPED_PSNR  # through the sum: nothing


def test_imprint_model_recovers_faces_through_the_secure_sum(run):
    strategy, _, planted, clients = run
    with torch.no_grad():  # the server knows the weights it sent
        for p, w in zip(planted.model.parameters(), run[1].parameters()):
            p.copy_(w)
    faces = torch.cat([x for x, _ in clients])
    ok = im.exact_matches(im.imprint_recover(planted, strategy.aggregates[1]), faces)
    assert int(ok.sum()) >= 2  # 3 faces in 128 bins: all 3 expected with probability 0.98


def test_secagg_bad_inputs():
    with pytest.raises(ValueError, match="mode='fedsgd'"):
        simulate_secagg(task.FLSettings(mode="fedavg"), [task.make_model(task.FLSettings())], num_clients=2)
    with pytest.raises(ValueError, match="models must be a non-empty list"):
        simulate_secagg(task.FLSettings(mode="fedsgd"), [], num_clients=2)
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        simulate_secagg(task.FLSettings(mode="fedsgd"), [task.make_model(task.FLSettings())], num_clients=0)
    with pytest.raises(ValueError, match="num_clients must be at least 2 for SecAgg"):
        simulate_secagg(task.FLSettings(mode="fedsgd"), [task.make_model(task.FLSettings())], num_clients=1)


def test_attack_aggregate_with_one_client_sees_its_gradient():
    th = im.imprint_thresholds(im.varied_faces(2000, seed=1), 64)
    r = attack_aggregate(1, th, iterations=60)
    assert r.seconds == 0.0 and r.faces.shape == (1, 1, 32, 32) and r.expected == 1.0
    assert r.single_psnr >= SUCCESS_PSNR and r.batch_psnr >= SUCCESS_PSNR  # one face, its own gradient
    assert float(r.imprint_best[0]) >= im.EXACT_PSNR
    with pytest.raises(ValueError, match="examples_per_client=1"):
        attack_aggregate(2, th, settings=task.FLSettings(mode="fedsgd", examples_per_client=2))
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        attack_aggregate(1, th, iterations=0)


@pytest.mark.parametrize("models", [nn.Linear(2, 2), (m for m in [nn.Linear(2, 2)]), []], ids=["a module", "a generator", "empty"])
def test_simulate_secagg_wants_a_list_of_models(models):
    settings = task.FLSettings(dataset="faces", mode="fedsgd")
    with pytest.raises(ValueError, match="models must be a non-empty list"):
        simulate_secagg(settings, models, 2)


def test_simulate_secagg_refuses_a_quantisation_above_its_modulus():
    settings = task.FLSettings(dataset="faces", mode="fedsgd")
    with pytest.raises(ValueError, match="at most 2\\*\\*40"):
        simulate_secagg(settings, [nn.Linear(2, 2)], 2, quantization_range=2**41)
