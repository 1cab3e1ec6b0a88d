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
