"""Chapter 6's Flower layer: conversions, partitions, the curious strategy, a simulation run,
the deployment engine on localhost, and the FedAvg-aware (unrolled) observation."""

import pytest
import torch

from dlgkit import fl
from dlgkit.fl import task
from dlgkit.fl.arrays import parameter_names, record_to_tensors, tensors_to_record
from flwr.app import Array, ArrayRecord


def _model(seed=0):
    return task.make_model(task.FLSettings(seed=seed))


# --- conversions ---------------------------------------------------------------------------


def test_round_trip_of_model_parameters_is_exact():
    model = _model()
    params = [p.detach() for p in model.parameters()]
    record = tensors_to_record(params, model)
    assert list(record.keys()) == parameter_names(model) == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "body.4.weight", "body.4.bias", "fc.weight", "fc.bias"]
    back = record_to_tensors(record, model)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(back, params))
    back[0][0, 0, 0, 0] += 1.0  # a copy, not a view of the model's weights
    assert not torch.equal(back[0], params[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_round_trip_of_a_tensor_list_keeps_dtype_shape_and_values(dtype):
    tensors = [(torch.randn(3, 2) * 100).to(dtype), (torch.randn(5) * 100).to(dtype), torch.zeros(0, 4, dtype=dtype)]
    record = tensors_to_record(tensors)
    assert list(record.keys()) == ["0", "1", "2"]
    back = record_to_tensors(record, tensors)
    for a, b in zip(back, tensors):
        assert a.dtype == dtype and a.shape == b.shape and torch.equal(a, b)


def test_round_trip_detaches_and_keeps_grad_free_copies():
    w = torch.randn(4, requires_grad=True)
    back = record_to_tensors(tensors_to_record([w * 2]), [w])
    assert not back[0].requires_grad and torch.equal(back[0], (w * 2).detach())


def test_tensors_to_record_refuses_bad_input():
    model = _model()
    with pytest.raises(TypeError, match="tensors must be a list of torch tensors"):
        tensors_to_record(torch.zeros(3))
    with pytest.raises(TypeError, match=r"tensors\[1\] is a ndarray"):
        tensors_to_record([torch.zeros(2), torch.zeros(2).numpy()])
    with pytest.raises(ValueError, match="tensors has 1 entries but names has 8"):
        tensors_to_record([torch.zeros(2)], model)
    with pytest.raises(ValueError, match="names must be distinct"):
        tensors_to_record([torch.zeros(2), torch.zeros(2)], ["a", "a"])
    with pytest.raises(ValueError, match="bfloat16.*cast it to float32"):
        tensors_to_record([torch.zeros(2, dtype=torch.bfloat16)])


def test_record_to_tensors_refuses_records_of_another_model():
    model = _model()
    record = tensors_to_record([p.detach() for p in model.parameters()], model)
    with pytest.raises(TypeError, match="record must be a flwr.app.ArrayRecord"):
        record_to_tensors({"a": 1}, model)
    with pytest.raises(TypeError, match="like must be an nn.Module or a list of torch tensors"):
        record_to_tensors(record, "lenet")
    with pytest.raises(ValueError, match="record holds 8 arrays but like has 2 tensors"):
        record_to_tensors(record, [torch.zeros(1), torch.zeros(1)])
    renamed = ArrayRecord()
    for i, key in enumerate(record.keys()):
        renamed[f"p{i}"] = record[key]
    with pytest.raises(ValueError, match="differ from the model's parameter names"):
        record_to_tensors(renamed, model)
    wrong_shape = tensors_to_record([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match=r"record\['0'\] has shape \(3, 2\) but the matching tensor has shape \(2, 3\)"):
        record_to_tensors(wrong_shape, [torch.zeros(2, 3)])
    wrong_dtype = ArrayRecord()
    wrong_dtype["0"] = Array(torch.zeros(2, dtype=torch.float64).numpy())
    with pytest.raises(ValueError, match="dtype torch.float64 but the matching tensor has dtype torch.float32"):
        record_to_tensors(wrong_dtype, [torch.zeros(2)])


# --- the task: settings, model, partitions -------------------------------------------------


def test_settings_travel_through_a_config_record_and_refuse_bad_values():
    settings = task.FLSettings(dataset="digits", mode="fedsgd", examples_per_client=3, lr=0.05, local_steps=4, batch_size=2, seed=7)
    assert task.FLSettings.from_config(settings.to_config()) == settings
    assert settings.to_config()["local-steps"] == 4
    with pytest.raises(ValueError, match=r"mode='fedprox' is not known; choose one of \['fedsgd', 'fedavg'\]"):
        task.FLSettings(mode="fedprox")
    with pytest.raises(ValueError, match="lr must lie in"):
        task.FLSettings(lr=0.0)
    with pytest.raises(ValueError, match="local_steps must be a positive int"):
        task.FLSettings(local_steps=0)


def test_make_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = _model(0), _model(0), _model(1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert float(a.fc.weight.detach().min()) >= -0.5 and float(a.fc.weight.detach().max()) <= 0.5


def test_partitions_are_disjoint_and_cover_the_data():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    parts = [task.partition(x, y, 3, i) for i in range(3)]
    assert [len(p[0]) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(torch.equal(px.view(-1).long(), py) for px, py in parts)
    with pytest.raises(ValueError, match="partition_id must be below num_partitions=3, got 3"):
        task.partition(x, y, 3, 3)
    with pytest.raises(ValueError, match="cannot cut 10 examples into num_partitions=11"):
        task.partition(x, y, 11, 0)
    with pytest.raises(ValueError, match="x has 10 examples but y has 9 labels"):
        task.partition(x, y[:9], 2, 0)


def test_load_partition_gives_each_client_its_own_faces():
    settings = task.FLSettings(examples_per_client=2)
    (x0, y0), (x1, y1) = task.load_partition(settings, 0, 2), task.load_partition(settings, 1, 2)
    assert x0.shape == (2, 1, 32, 32) and x1.shape == (2, 1, 32, 32)
    assert float((x0 - x1).abs().max()) > 0.1
    assert float(x0.min()) >= 0 and float(x0.max()) <= 1 and int(y0.max()) < task.NUM_CLASSES


# --- the curious strategy, one round in this process ---------------------------------------

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402

from dlgkit import federated  # noqa: E402
from dlgkit.fl import client_app, server_app  # noqa: E402


@pytest.fixture
def server_process(monkeypatch):
    """Flower 1.42 stamps each new message with the run id of the process it runs in (set by
    the ServerApp's runtime); give this test process one so the strategy can run in-process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _Grid:
    """What ``FedAvg.configure_train`` asks of Flower's Grid: the connected node ids."""

    def get_node_ids(self):
        return [11, 22]


def _one_round(strategy, server_round=1, arrays=None):
    """configure_train -> each client's ``train`` (called directly) -> aggregate_train."""
    if arrays is None:
        arrays = tensors_to_record([p.detach() for p in strategy._model.parameters()], strategy._model)
    messages = sorted(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()), key=lambda m: m.metadata.dst_node_id)
    replies = []
    for pid, msg in enumerate(messages):
        context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(), run_config={})
        replies.append(client_app.train(msg, context))
    return strategy.aggregate_train(server_round, replies)


@pytest.mark.parametrize("mode", ["fedavg", "fedsgd"])
def test_strategy_records_every_update_and_aggregates_like_fedavg(mode, server_process):
    settings = task.FLSettings(mode=mode, examples_per_client=2, lr=0.1, local_steps=3, batch_size=1, seed=3)
    seen = []
    strategy = fl.CuriousFedAvg(settings, on_update=seen.append, min_train_nodes=2, min_available_nodes=2)
    new, _ = _one_round(strategy)
    assert [(u.server_round, u.node_id, u.partition_id, u.num_examples) for u in strategy.updates] == [(1, 11, 0, 2), (1, 22, 1, 2)]
    assert seen == strategy.updates
    global_model = strategy.updates[0].global_model()
    assert all(torch.equal(p, q) for p, q in zip(global_model.parameters(), task.make_model(settings).parameters()))
    for u in strategy.updates:
        x, y = task.load_partition(settings, u.partition_id, 2)
        if mode == "fedavg":
            assert u.kind == "weights"
            expected = federated.client_update(global_model, x, y, lr=0.1, local_steps=3, batch_size=1).tensors
        else:
            assert u.kind == "gradient"
            expected = federated.client_gradient(global_model, x, y)
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(u.tensors, expected))
        assert u.shared().kind == u.kind and u.shared().meta["node_id"] == u.node_id
    step = 1.0 if mode == "fedavg" else -0.1
    mean = [(a + b) / 2 for a, b in zip(strategy.updates[0].tensors, strategy.updates[1].tensors)]
    expected_new = [w + step * m for w, m in zip(strategy.updates[0].global_params, mean)]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(record_to_tensors(new, global_model), expected_new))
    assert max(float(m.abs().max()) for m in mean) > 1e-4  # the round moved the model


def test_strategy_keeps_each_rounds_global_weights(tmp_path, server_process):
    settings = task.FLSettings(examples_per_client=1, local_steps=2)
    strategy = fl.CuriousFedAvg(settings, min_train_nodes=2, min_available_nodes=2)
    new, _ = _one_round(strategy, 1)
    _one_round(strategy, 2, new)
    first, second = strategy.updates[:2], strategy.updates[2:]
    assert [u.server_round for u in second] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(second[0].global_params, record_to_tensors(new, strategy._model)))
    assert not torch.equal(first[0].global_params[-1], second[0].global_params[-1])
    server_app.save_updates(tmp_path / "u.pt", strategy.updates, final=second[0].global_params)
    loaded, final = server_app.load_updates(tmp_path / "u.pt")
    assert [(u.server_round, u.node_id, u.partition_id, u.settings) for u in loaded] == [(u.server_round, u.node_id, u.partition_id, u.settings) for u in strategy.updates]
    assert all(torch.equal(a, b) for u, v in zip(loaded, strategy.updates) for a, b in zip(u.tensors, v.tensors))
    assert torch.equal(final[0], second[0].global_params[0])


def test_strategy_refuses_bad_arguments():
    with pytest.raises(TypeError, match="settings must be an FLSettings"):
        fl.CuriousFedAvg({"mode": "fedavg"})
    with pytest.raises(TypeError, match="on_update must be a function"):
        fl.CuriousFedAvg(task.FLSettings(), on_update=[])
    with pytest.raises(TypeError, match="settings must be an FLSettings"):
        fl.simulate("fedavg")
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        fl.simulate(task.FLSettings(), num_clients=0)


# --- Flower's simulation engine (Ray), offline ----------------------------------------------


def test_simulation_runs_offline_and_returns_what_the_server_saw():
    settings = task.FLSettings(examples_per_client=2, lr=0.1, local_steps=2, batch_size=1)
    updates = fl.simulate(settings, num_clients=2, num_rounds=2)
    assert sorted((u.server_round, u.partition_id) for u in updates) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    nodes = {r: {u.node_id for u in updates if u.server_round == r} for r in (1, 2)}
    assert len(nodes[1]) == 2 and nodes[1] == nodes[2]
    first = [u for u in updates if u.server_round == 1]
    for u in first:  # each update is what the client computed on its own partition
        x, y = task.load_partition(settings, u.partition_id, 2)
        expected = federated.client_update(u.global_model(), x, y, lr=0.1, local_steps=2, batch_size=1).tensors
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(u.tensors, expected))
    second = [u for u in updates if u.server_round == 2][0]
    applied = [w + (a + b) / 2 for w, a, b in zip(first[0].global_params, first[0].tensors, first[1].tensors)]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(second.global_params, applied))
