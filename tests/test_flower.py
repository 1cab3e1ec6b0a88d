"""Chapter 6's Flower layer: conversions, partitions, the curious strategy, a simulation run,
the deployment engine on localhost, and the FedAvg-aware (unrolled) observation."""

import pytest
import torch

from dlgkit import fl
from dlgkit.fl import task
from dlgkit.fl.arrays import parameter_names, record_to_tensors, tensors_to_record
from flwr.app import Array, ArrayRecord

# Ray and localhost servers: these tests share one xdist worker (make test runs -n auto --dist loadgroup)
pytestmark = pytest.mark.xdist_group("flower")


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
    assert float(x0.min()) >= 0 and float(x0.max()) <= 1 and max(int(y0.max()), int(y1.max())) < task.NUM_CLASSES


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
        arrays = tensors_to_record([p.detach() for p in strategy.template.parameters()], strategy.template)
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
        shared = u.shared()
        assert (shared.kind, shared.num_examples, shared.local_steps, shared.lr) == (u.kind, 2, 3, 0.1) and shared.tensors[0] is u.tensors[0]
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
    assert all(torch.equal(a, b) for a, b in zip(second[0].global_params, record_to_tensors(new, strategy.template)))
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


def test_flower_log_silences_the_evaluation_warning_and_restores_the_level():
    """Flower's FedAvg warns at construction that evaluation is off (as the course wants): the
    book's pages show it only when quiet=False."""
    import logging

    from dlgkit.fl.simulation import flower_log

    logger, seen = logging.getLogger("flwr"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    before = logger.level
    try:
        with flower_log(True):
            fl.CuriousFedAvg(task.FLSettings())
        assert seen == [] and logger.level == before
        with flower_log(False):
            fl.CuriousFedAvg(task.FLSettings())
        assert any("fraction_evaluate" in m for m in seen), seen
    finally:
        logger.removeHandler(handler)


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


# --- Flower's deployment engine: a SuperLink and two SuperNodes as real processes -----------

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import dlgkit  # noqa: E402

RUN_LIMIT_S = 150  # the whole run; a plain one-round run takes about 10-40 s on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the SuperLink exited early with code {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {limit_s} s")


def _marked(token: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``DLGKIT_FLOWER_TEST=token``: the
    processes this test started and every process they started in turn (flower-superexec,
    flwr-serverapp, flwr-clientapp), even those that left the process group or lost their parent."""
    marker = f"DLGKIT_FLOWER_TEST={token}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def _stop(procs: list[subprocess.Popen], token: str, limit_s: float = 30) -> list[int]:
    """SIGTERM every started process and wait until no process of this test is left; SIGKILL
    what remains after ``limit_s`` and return those PIDs (empty: everything ended on SIGTERM)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + limit_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while time.monotonic() < deadline and _marked(token):
        time.sleep(0.2)
    left = _marked(token)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            p.wait(timeout=10)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the started processes in /proc")
def test_deployment_engine_runs_the_app_on_localhost(tmp_path):
    package_root = Path(dlgkit.__file__).resolve().parent
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DLGKIT_FLOWER_TEST": str(tmp_path),  # marks every process of this test, see _marked
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),  # flower-superexec, flwr-*app
        "PYTHONPATH": os.pathsep.join([str(package_root.parent), os.environ.get("PYTHONPATH", "")]),
    }
    app = tmp_path / "app"  # a copy: `flwr run` may rewrite the app's pyproject.toml
    shutil.copytree(package_root / "flower_app", app)
    link = _free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    record = tmp_path / "updates.pt"
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "node0", "node1", "run")}
    procs: list[subprocess.Popen] = []

    def start(name, *args):
        with open(logs[name], "w") as log:
            procs.append(subprocess.Popen([str(bin_dir / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    def tails() -> str:
        return "\n".join(f"--- {name} ---\n" + (p.read_text()[-1500:] if p.exists() else "") for name, p in logs.items())

    try:
        superlink = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link), "--disable-runtime-dependency-installation")
        try:
            _wait_for_port(link, superlink)
        except AssertionError as err:
            raise AssertionError(f"{err}; logs:\n{tails()}") from None
        for pid in (0, 1):
            start(f"node{pid}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()), "--node-config", f"partition-id={pid} num-partitions=2")
        with open(logs["run"], "w") as log:  # --stream: returns when the run ends; its exit code says nothing about the run
            subprocess.run([str(bin_dir / "flwr"), "run", str(app), "local", "--stream", "--run-config", f"record-file='{record}'"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_LIMIT_S)
        assert record.exists(), f"the ServerApp wrote no updates; logs:\n{tails()}"
        updates, final = server_app.load_updates(record)
    finally:
        left = _stop(procs, str(tmp_path))
    assert not left, f"processes {left} survived SIGTERM (killed now)"

    settings = task.FLSettings.from_config(dict(_app_config(app)), ignore_unknown=True)
    assert sorted(u.partition_id for u in updates) == [0, 1] and len({u.node_id for u in updates}) == 2
    assert all(u.server_round == 1 and u.kind == "weights" and u.settings == settings for u in updates)
    for u in updates:  # each reply is the client's FedAvg update on its own partition
        x, y = task.load_partition(settings, u.partition_id, 2)
        expected = federated.client_update(u.global_model(), x, y, lr=settings.lr, local_steps=settings.local_steps, batch_size=settings.batch_size).tensors
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(u.tensors, expected))
    applied = [w + (a + b) / 2 for w, a, b in zip(updates[0].global_params, updates[0].tensors, updates[1].tensors)]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(final, applied))


def _app_config(app: Path) -> dict:
    import tomllib

    return tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# --- the FedAvg-aware (unrolled) observation ---------------------------------------------

from dlgkit.attacks.fedavg import fedavg_observation, naive_gradient  # noqa: E402


@pytest.mark.parametrize("steps,batch_size", [(1, None), (3, 2), (5, 3)])
def test_observation_equals_the_clients_update(steps, batch_size):
    model = _model(1)
    x, y = task.load_dataset("faces", 4)
    observed = fedavg_observation(steps, 0.1, batch_size)(model, x, y)
    expected = federated.client_update(model, x, y, lr=0.1, local_steps=steps, batch_size=batch_size).tensors
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(observed, expected))
    assert max(float(e.abs().max()) for e in expected) > 1e-3
    assert all(p.grad is None for p in model.parameters())  # the model is left alone


def test_observation_equals_the_update_of_the_real_client_app(server_process):
    settings = task.FLSettings(examples_per_client=4, lr=0.1, local_steps=5, batch_size=2, seed=2)
    strategy = fl.CuriousFedAvg(settings, min_train_nodes=2, min_available_nodes=2)
    _one_round(strategy)
    for u in strategy.updates:
        x, y = task.load_partition(settings, u.partition_id, 2)
        observed = fedavg_observation(5, 0.1, 2)(u.global_model(), x, y)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(observed, u.tensors))


def test_one_full_batch_step_is_minus_lr_times_the_gradient_and_naive_inverts_it():
    model = _model(0)
    x, y = task.load_dataset("faces", 2)
    update = fedavg_observation(1, 0.5)(model, x, y)
    gradient = federated.client_gradient(model, x, y)
    assert all(torch.allclose(n, g, rtol=1e-4, atol=1e-6) for n, g in zip(naive_gradient(update, 1, 0.5), gradient))


def test_observation_is_differentiable_in_the_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 2)).double()
    y = torch.tensor([0, 1, 1])
    observe = fedavg_observation(3, 0.3, 2)
    x = torch.rand(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tuple(observe(model, x, y)), (x,))
    faces, labels = task.load_dataset("faces", 2)
    faces = faces.clone().requires_grad_(True)
    sum(u.square().sum() for u in fedavg_observation(2, 0.1, 1)(_model(0), faces, labels)).backward()
    assert torch.isfinite(faces.grad).all() and float(faces.grad.abs().sum()) > 0


def test_observation_refuses_bad_arguments():
    with pytest.raises(ValueError, match="local_steps must be a positive int, got 0"):
        fedavg_observation(0, 0.1)
    with pytest.raises(ValueError, match=r"local_lr must lie in \(0.0, inf\)"):
        fedavg_observation(1, -0.1)
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 0"):
        fedavg_observation(1, 0.1, 0)
    with pytest.raises(ValueError, match="x must be a non-empty batch"):
        fedavg_observation(1, 0.1)(_model(), torch.rand(2, 1, 32, 32), torch.tensor([1]))
    with pytest.raises(TypeError, match="update must be a list of tensors"):
        naive_gradient(torch.zeros(3), 1, 0.1)
    with pytest.raises(ValueError, match="update holds NaN"):
        naive_gradient([torch.tensor([float("nan")])], 1, 0.1)
