"""Chapter 7's malicious server delivered through Flower: one node gets the imprint model, the
others train honestly, and the target's images come out of its harvested update."""

import pytest
import torch

from dlgkit.attacks import imprint as im
from dlgkit.fl import task
from dlgkit.fl.malicious import MaliciousFedAvg, planted_client_model, simulate_malicious

# Ray and localhost servers: these tests share one xdist worker (make test runs -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("flower")


def test_one_round_harvests_the_target_and_aggregates_the_others():
    settings = task.FLSettings(mode="fedsgd", examples_per_client=8, seed=0)
    public = im.varied_faces(2000, seed=1)
    planted = im.imprint_model(task.make_model(settings), (1, 32, 32), im.imprint_thresholds(public, 128))
    strategy = simulate_malicious(settings, planted, num_clients=3, num_rounds=1, target=1)
    assert len(strategy.harvests) == 1 and len(strategy.updates) == 2
    harvest = strategy.harvests[0]
    assert harvest.node_id == strategy.target_node and harvest.node_id not in {u.node_id for u in strategy.updates}
    # the target's own data, as ground truth
    x, _ = task.load_partition(settings, harvest.partition_id, 3)
    rec = im.imprint_recover(harvest.planted, harvest.tensors)
    ok = im.exact_matches(rec, x)
    assert float(ok.float().mean()) >= 0.5  # 8 faces in 128 bins: (1 - 1/128)^7 = 0.95 expected
    # the honest nodes trained the honest LeNet and were recorded as in chapter 6
    assert {u.partition_id for u in strategy.updates} | {harvest.partition_id} == {0, 1, 2}
    assert all(len(u.tensors) == 8 for u in strategy.updates)


def test_malicious_strategy_checks_its_inputs():
    settings = task.FLSettings()
    with pytest.raises(TypeError, match="PlantedModel"):
        MaliciousFedAvg(settings, task.make_model(settings))
    other = im.imprint_model(torch.nn.Linear(16, 2), (1, 4, 4), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 32, 32\)"):
        MaliciousFedAvg(settings, other)
    with pytest.raises(ValueError, match="target must be an int >= 0"):
        MaliciousFedAvg(settings, planted_client_model(settings, 4), target=-1)
    with pytest.raises(ValueError, match="neurons must be a positive int"):
        planted_client_model(settings, 0)
    with pytest.raises(TypeError, match="settings must be the run's FLSettings"):
        planted_client_model(None, 2)
