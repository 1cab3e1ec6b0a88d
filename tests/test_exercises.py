"""The exercise pipeline: generated notebooks in sync, no leaked solutions, checks that can fail."""

from __future__ import annotations

import ast
import contextlib
import copy
import gc
import inspect
import importlib.util
import io
import re
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from dlgkit import exercises

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "scripts" / "make_exercises.py")
make_exercises = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_exercises)

SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_exercises_are_generated_from_solutions(path):
    expected = make_exercises.render(make_exercises.make_exercise(nbformat.read(path, as_version=4), path.name))
    target = ROOT / "exercises" / path.name
    assert target.exists(), f"exercises/{path.name} is missing: run `make exercises`"
    assert target.read_text() == expected, f"exercises/{path.name} was edited by hand or is stale: run `make exercises`"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_no_solution_leaks_into_exercises(path):
    solution = nbformat.read(path, as_version=4)
    exercise_text = (ROOT / "exercises" / path.name).read_text()
    assert "BEGIN SOLUTION" not in exercise_text and "END SOLUTION" not in exercise_text
    for cell in solution.cells:
        if cell.cell_type == "markdown" and "solution" in cell.metadata.get("tags", []):
            assert cell.source not in exercise_text
        for block in re.findall(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", cell.source, flags=re.S):
            for line in block.splitlines():
                if len(line.strip()) > 12:  # skip trivial lines such as "return x"
                    assert line.strip() not in exercise_text, f"solution line leaked: {line.strip()!r}"
    exercise = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
    assert all(not c.get("outputs") for c in exercise.cells if c.cell_type == "code")


def _run_notebook_cells(path: Path) -> list[tuple[str, BaseException | None, str]]:
    """Execute a notebook's code cells in one namespace (skipping Colab set-up cells)."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {"__name__": "__exercise__"}
    results = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "remove-cell" in cell.metadata.get("tags", []):
            continue
        buffer = io.StringIO()
        error = None
        with contextlib.redirect_stdout(buffer):
            try:
                exec(compile(cell.source, str(path), "exec"), namespace)
            except BaseException as exc:  # noqa: BLE001
                error = exc
        results.append((cell.source, error, buffer.getvalue()))
    return results


@pytest.mark.parametrize("path", sorted((ROOT / "exercises").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_check_fails_on_its_stub(path, monkeypatch):
    monkeypatch.setenv("DLGKIT_PROGRESS", "0")
    checks = 0
    for source, error, output in _run_notebook_cells(path):
        if "exercises.check_" in source:
            checks += 1
            assert isinstance(error, AssertionError), f"a check passed on the stub:\n{source}"
            assert "❌" in output and "not implemented yet" in output, output
        else:
            assert error is None, f"a non-check cell failed in the student notebook: {error!r}\n{source}"
    assert checks >= 3, f"{path.name} has {checks} checked exercises, expected at least 3"


def test_generator_replaces_blocks_and_keeps_hints():
    source = "def f(x):\n    ### HINT: add one\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n"
    out = make_exercises.strip_solution(source)
    assert "return x + 1" not in out
    assert "    # Hint: add one" in out
    assert "    raise NotImplementedError('Exercise not done yet. Hint: add one')" in out
    namespace: dict = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="add one"):
        namespace["f"](1)


@pytest.mark.parametrize(
    "source,message",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without BEGIN"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
    ],
)
def test_generator_rejects_broken_markers(source, message):
    with pytest.raises(make_exercises.SolutionMarkerError, match=message):
        make_exercises.strip_solution(source)



# --- what the exercise notebooks ask and allow ----------------------------------------------

def _imports(source: str) -> set[str]:
    code = "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_each_chapter_has_three_exercises_one_open_and_says_what_may_be_used(path):
    nb = nbformat.read(path, as_version=4)
    headings = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Exercise")]
    blocks = sum(c.source.count("### BEGIN SOLUTION") for c in nb.cells if c.cell_type == "code")
    checks = [c.source for c in nb.cells if c.cell_type == "code" and "exercises.check_" in c.source]
    assert len(headings) >= 3 and blocks >= 3 and len(checks) >= 3, f"{path.name}: {len(headings)} exercises, {blocks} solutions, {len(checks)} checks"
    assert any("(open)" in h.splitlines()[0] for h in headings), f"{path.name} has no open exercise"
    for heading in headings:
        assert "*May use:*" in heading, f"{path.name}: {heading.splitlines()[0]!r} does not say what may be used"
    for heading in (h for h in headings if "(open)" in h.splitlines()[0]):
        assert "*Target:*" in heading, f"{path.name}: {heading.splitlines()[0]!r} has no measurable target"


@pytest.mark.parametrize("path", sorted((ROOT / "exercises").glob("*.ipynb")), ids=lambda p: p.name)
def test_exercise_notebooks_import_no_library_piece_they_ask_for(path):
    nb = nbformat.read(path, as_version=4)
    imported = set().union(*(_imports(c.source) for c in nb.cells if c.cell_type == "code"))
    library = {name for name in imported if name.startswith("dlgkit")}
    assert library == {"dlgkit.exercises"}, f"{path.name} imports {sorted(library)}; the exercises are to write those pieces"


def test_every_check_is_used_by_a_solution():
    used = set()
    for path in SOLUTIONS:
        used |= set(re.findall(r"exercises\.(check_\w+)\(", path.read_text()))
    checks = {name for name in exercises.__all__ if name.startswith("check_")}
    assert checks == used, f"checks without an exercise: {sorted(checks - used)}; unknown: {sorted(used - checks)}"


# --- the checks grade the student: references pass, stubs and cheats fail --------------------

def _solution_namespace(name: str) -> dict:
    """The reference functions of one solutions notebook (its check cells not run)."""
    nb = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
    namespace: dict = {"__name__": "__solutions__"}
    for cell in nb.cells:
        if cell.cell_type == "code" and "remove-cell" not in cell.metadata.get("tags", []) and "exercises.check_" not in cell.source:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(cell.source, name, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def references() -> dict:
    """check name -> the reference solution it is called with in solutions/."""
    found = {}
    for path in SOLUTIONS:
        namespace = _solution_namespace(path.stem)
        for check, function in re.findall(r"exercises\.(check_\w+)\((\w+)\)", path.read_text()):
            found[check] = namespace[function]
    return found


def _run(check, fn) -> tuple[bool, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        passed = check(fn)
    return passed, buffer.getvalue()


ALL_CHECKS = sorted(name for name in exercises.__all__ if name.startswith("check_"))


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_reference_passes_and_leaves_the_global_rng_alone(check, references):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    passed, output = _run(getattr(exercises, check), references[check])
    assert passed, output
    assert "✅" in output
    assert torch.equal(before, torch.get_rng_state()), f"{check} changed the caller's global random state"


def _tensors_in(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)


@pytest.mark.parametrize("check", ALL_CHECKS)
def test_frames_above_the_students_code_hold_only_its_arguments(check, references):
    """Walking up the frames from the student's function (f_back, as far as it goes) finds no
    tensor other than the arguments it was given: the cases' truth is out of reach."""
    reference = references[check]
    leaks: list[str] = []

    def spy(*args):
        public = list(_tensors_in(list(args)))
        frame = inspect.currentframe().f_back
        while frame is not None:
            for name, value in frame.f_locals.items():
                for tensor in _tensors_in(value):
                    if not any(tensor is p or (tensor.shape == p.shape and torch.equal(tensor, p)) for p in public):
                        leaks.append(f"{frame.f_code.co_name}: {name} {tuple(tensor.shape)}")
            frame = frame.f_back
        return reference(*args)

    passed, output = _run(getattr(exercises, check), spy)
    assert passed, output
    assert not leaks, f"{check}: frames above the student's code show tensors: {leaks[:5]}"


def _walk_up(name: str):
    """A cheat: the first local called ``name`` in any frame above the caller."""
    frame = inspect.currentframe().f_back.f_back
    while frame is not None:
        if name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    raise LookupError(name)


def _nan_like_first(*args):
    return torch.full_like(next(a for a in args if isinstance(a, torch.Tensor)), float("nan"))


def _dlg_without_create_graph(model, grads, shape, label):
    dummy = torch.rand(shape).requires_grad_(True)
    optimizer = torch.optim.LBFGS([dummy])
    params = list(model.parameters())

    def closure():
        optimizer.zero_grad()
        dummy_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(dummy), label), params)
        distance = sum(((d - s) ** 2).sum() for d, s in zip(dummy_grads, grads))
        distance.backward()
        return distance

    optimizer.step(closure)
    return dummy.detach()


def _greedy_alignment(reconstruction, original):
    """Each original in turn takes its nearest reconstruction still free: a permutation, rarely the best."""
    cost = ((reconstruction[:, None] - original[None]) ** 2).flatten(2).mean(2)
    perm: list[int] = []
    for j in range(len(original)):
        perm.append(next(i for i in cost[:, j].argsort().tolist() if i not in perm))
    return torch.tensor(perm)


def _library():
    from dlgkit import attacks, data, defences, federated, metrics
    from dlgkit.attacks.text import span_residuals

    return attacks, data, defences, federated, metrics, span_residuals


# --- chapter 6: a FedAvg client's update and the wrong versions of it ------------------------

def _sgd_update(model, x, y, lr, steps, batch_size, sign=1, zero_grad=True, at_start=False, whole_batch=False, first_only=False, in_place=False):
    """A FedAvg update with torch.optim.SGD; the flags replay the usual mistakes."""
    local = model if in_place else copy.deepcopy(model)
    start = [p.detach().clone() for p in local.parameters()]
    frozen = copy.deepcopy(model)
    optimizer = torch.optim.SGD(local.parameters(), lr=lr)
    for step in range(steps):
        first = 0 if first_only else (step * batch_size) % len(x)
        xb, yb = (x, y) if whole_batch else (x[first : first + batch_size], y[first : first + batch_size])
        if zero_grad:
            optimizer.zero_grad()
        if at_start:
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(frozen(xb), yb), list(frozen.parameters()))
            for p, g in zip(local.parameters(), grads):
                p.grad = g.clone()
        else:
            torch.nn.functional.cross_entropy(local(xb), yb).backward()
        optimizer.step()
    return [sign * (p.detach() - s) for p, s in zip(local.parameters(), start)]


def _naive_cosine_attack(model, update, shape, label, steps):
    from dlgkit import attacks
    from dlgkit.attacks.fedavg import naive_gradient

    config = attacks.RECOMMENDED.with_(iterations=100, restarts=1, distance="cosine")
    return attacks.reconstruct(model, naive_gradient(update, steps, 0.03), shape, config, labels=label, progress=False).reconstruction


def _guessed_lr_attack(model, update, shape, label, steps):
    """The FedAvg-aware attack with the learning rate guessed at the low end of the range: the
    client in the upper half of the range has at least twice that."""
    from dlgkit import attacks
    from dlgkit.attacks.fedavg import fedavg_observation

    config = attacks.RECOMMENDED.with_(iterations=100, restarts=1)
    observe = fedavg_observation(steps, exercises.UNKNOWN_LR_RANGE[0])
    return attacks.reconstruct(model, update, shape, config, labels=label, observe=observe, progress=False).reconstruction


def _chapter6_cheats(attacks, data, federated) -> list[tuple[str, str, object, str]]:
    from dlgkit.attacks.fedavg import fedavg_observation, naive_gradient

    face = lambda *a: data.lfw_faces(1, size=16, start=3)[0]  # noqa: E731
    return [
        ("check_fedavg_update", "library", lambda m, x, y, lr, e, b: federated.client_update(m, x, y, lr=lr, local_steps=e, batch_size=b).tensors, "dlgkit.federated"),
        ("check_fedavg_update", "library observation", lambda m, x, y, lr, e, b: [t.detach() for t in fedavg_observation(e, lr, b)(m, x, y)], "dlgkit.attacks"),
        ("check_fedavg_update", "the check's reference", lambda m, x, y, lr, e, b: exercises.fl._mlp_sgd(m, x, y, lr, e, b), "dlgkit.exercises"),
        ("check_fedavg_update", "sign", lambda m, x, y, lr, e, b: _sgd_update(m, x, y, lr, e, b, sign=-1), "wrong sign"),
        ("check_fedavg_update", "no zero_grad", lambda m, x, y, lr, e, b: _sgd_update(m, x, y, lr, e, b, zero_grad=False), "zero them"),
        ("check_fedavg_update", "gradients at W_0", lambda m, x, y, lr, e, b: _sgd_update(m, x, y, lr, e, b, at_start=True), "starting weights"),
        ("check_fedavg_update", "whole batch", lambda m, x, y, lr, e, b: _sgd_update(m, x, y, lr, e, b, whole_batch=True), "whole batch"),
        ("check_fedavg_update", "first mini-batch", lambda m, x, y, lr, e, b: _sgd_update(m, x, y, lr, e, b, first_only=True), "first mini-batch"),
        ("check_fedavg_update", "in place", lambda m, x, y, lr, e, b: _sgd_update(m, x, y, lr, e, b, in_place=True), "changed the model"),
        ("check_fedavg_update", "hard-coded", lambda m, x, y, lr, e, b: [torch.zeros_like(p) for p in m.parameters()], "relative error"),
        ("check_fedavg_update", "nan", lambda m, x, y, lr, e, b: [torch.full_like(p, float("nan")) for p in m.parameters()], "NaN"),
        ("check_fedavg_update", "one tensor", lambda m, x, y, lr, e, b: torch.cat([p.detach().flatten() for p in m.parameters()]), "list of tensors"),
        ("check_gradient_from_update", "naive", lambda u, lr, e: [-t / (e * lr) for t in u], "naive reading"),
        ("check_gradient_from_update", "library", lambda u, lr, e: naive_gradient(u, 1, lr), "dlgkit.attacks"),
        ("check_gradient_from_update", "sign", lambda u, lr, e: [t / lr for t in u], "sign is wrong"),
        ("check_gradient_from_update", "the update itself", lambda u, lr, e: list(u), "the update itself"),
        ("check_gradient_from_update", "hard-coded", lambda u, lr, e: [torch.zeros_like(t) for t in u], "relative error"),
        ("check_gradient_from_update", "nan", lambda u, lr, e: [t * float("nan") for t in u], "NaN"),
        ("check_unknown_lr_attack", "data set", face, "dlgkit.data"),
        ("check_unknown_lr_attack", "nan", lambda m, u, s, l, e: torch.full(s, float("nan")), "NaN"),
        ("check_unknown_lr_attack", "grey", lambda m, u, s, l, e: torch.full(s, 0.5), "PSNR"),
        ("check_unknown_lr_attack", "naive cosine", _naive_cosine_attack, "PSNR"),
        ("check_unknown_lr_attack", "guessed lr", _guessed_lr_attack, "PSNR"),
        ("check_unknown_lr_attack", "wrong shape", lambda m, u, s, l, e: torch.rand(16, 16), "shape"),
    ]


# --- chapter 7: imprint thresholds, recovery, the closed form, a degenerate statistic ----------

def _quantiles(b, k, levels):
    return torch.quantile(b.double(), levels.double()).float()


def _lowered(c):
    return torch.cat([c[:1] - 1, c[1:]])


def _cumulative_rows(w, b):
    fired = b.abs() > 0
    return w[fired] / b[fired, None]


def _differences_without_top(w, b):
    dw, db = w[:-1] - w[1:], b[:-1] - b[1:]
    full = db.abs() > 1e-6 * b.abs().max()
    return dw[full] / db[full, None]


def _all_bins(w, b):
    return torch.cat([w[:-1] - w[1:], w[-1:]]) / torch.cat([b[:-1] - b[1:], b[-1:]])[:, None]


def _planted_rows(direction, thresholds):
    k = len(thresholds)
    return direction.expand(k, -1).float().clone(), (-thresholds).float()


def _brightness_layer(public, k):
    d = public[0].numel()
    stat = public.flatten(1).mean(1).double()
    return _planted_rows(torch.full((d,), 1.0 / d), _lowered(_quantiles(stat, k, torch.arange(k) / k)) + torch.arange(k) * 1e-7)


def _random_direction_even(public, k):
    u = torch.randn(public[0].numel(), generator=torch.Generator().manual_seed(0))
    stat = public.flatten(1) @ u
    return _planted_rows(u, _lowered(torch.linspace(float(stat.min()), float(stat.max()), k + 1)[:-1]))


def _chapter7_cheats() -> list[tuple[str, str, object, str]]:
    from dlgkit.attacks import imprint

    return [
        ("check_imprint_thresholds", "library", lambda b, k: imprint.imprint_thresholds(b.view(-1, 1, 1, 1), k), "dlgkit.attacks"),
        ("check_imprint_thresholds", "evenly spaced", lambda b, k: _lowered(torch.linspace(float(b.min()), float(b.max()), k + 1)[:-1]), "Evenly spaced"),
        ("check_imprint_thresholds", "quantiles i/k", lambda b, k: _quantiles(b, k, torch.arange(1, k + 1) / k), "quantiles 1/k"),
        ("check_imprint_thresholds", "public minimum", lambda b, k: _quantiles(b, k, torch.arange(k) / k), "public minimum is not enough"),
        ("check_imprint_thresholds", "hard-coded", lambda b, k: torch.arange(k) / k - 0.01, "not equally likely"),
        ("check_imprint_thresholds", "decreasing", lambda b, k: -torch.arange(k, dtype=torch.float32), "strictly increasing"),
        ("check_imprint_thresholds", "nan", lambda b, k: torch.full((k,), float("nan")), "NaN"),
        ("check_imprint_recover", "library", lambda w, b: imprint.imprint_recover(None, [w, b]), "dlgkit.attacks"),
        ("check_imprint_recover", "cumulative rows", _cumulative_rows, "only the top bin"),
        ("check_imprint_recover", "no top bin", _differences_without_top, "except the brightest"),
        ("check_imprint_recover", "nan", _all_bins, "NaN"),
        ("check_imprint_recover", "hard-coded", lambda w, b: torch.zeros(3, w.shape[1]), "did not come back"),
        ("check_imprint_recover", "frames", lambda w, b: _walk_up("x").flatten(1), ""),
        ("check_expected_fraction", "library", lambda p, n: imprint.expected_recovered_fraction(n, probabilities=p.tolist()), "dlgkit.attacks"),
        ("check_expected_fraction", "equal bins", lambda p, n: (1 - 1 / len(p)) ** (n - 1), "equally likely"),
        ("check_expected_fraction", "exponent", lambda p, n: float((p * (1 - p) ** n).sum()), "off by one"),
        ("check_expected_fraction", "renormalised", lambda p, n: float(((q := p / p.sum()) * (1 - q) ** (n - 1)).sum()), "renormalised"),
        ("check_expected_fraction", "string", lambda p, n: "0.5", "float"),
        ("check_expected_fraction", "nan", lambda p, n: float("nan"), "not a number"),
        ("check_expected_fraction", "float subclass", lambda p, n: _AlwaysClose(0.5), "expected"),
        ("check_expected_fraction", "other threads' frames", lambda p, n: sys._current_frames() and 0.5, "sys._current_frames"),
        ("check_expected_fraction", "every live object", lambda p, n: gc.get_objects() and 0.5, "gc.get_objects"),
        ("check_expected_fraction", "patched check", _patch_the_check, "changed the check itself"),
        ("check_flat_brightness_layer", "library", lambda x, k: _planted_rows(torch.ones(x[0].numel()), imprint.imprint_thresholds(x, k)), "dlgkit.attacks"),
        ("check_flat_brightness_layer", "brightness bins", _brightness_layer, "below the target"),
        ("check_flat_brightness_layer", "evenly spaced", _random_direction_even, "below the target"),
        ("check_flat_brightness_layer", "over budget", lambda x, k: _planted_rows(torch.ones(x[0].numel()), torch.arange(k + 1.0)), "at most 64"),
        ("check_flat_brightness_layer", "nan", lambda x, k: (torch.full((k, x[0].numel()), float("nan")), torch.zeros(k)), "NaN"),
        ("check_flat_brightness_layer", "frames", lambda x, k: _walk_up("x"), ""),
    ]


class _AlwaysClose(float):
    """A float whose differences are all zero: ``abs(got - want) < tol`` for any ``want``."""

    def __sub__(self, other):
        return 0.0


def _patch_the_check(p, n):
    """Replace the check's own comparison helper, then answer anything."""
    sys.modules["dlgkit.exercises._common"]._require = lambda condition, message: None
    sys.modules["dlgkit.exercises.malicious"]._require = lambda condition, message: None
    return 0.5


def test_a_patched_check_is_restored():
    from dlgkit.exercises import _common, malicious

    before = (_common._require, malicious._require)
    assert not _run(exercises.check_expected_fraction, _patch_the_check)[0]
    assert (_common._require, malicious._require) == before


@pytest.mark.parametrize("endless", ["spin", "swallow"])
def test_a_function_that_never_returns_is_stopped(endless):
    """A loop that never ends fails the check after the time limit, and the loop is stopped
    (even one that catches every Exception)."""
    import threading
    import time

    from dlgkit.exercises import _common

    def spin():
        while True:
            pass

    def swallow():
        while True:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001 - the student's code tries to swallow the stop
                pass

    start = time.monotonic()
    with pytest.raises(_common.ExerciseFailure, match=r"did not return within 0.5 s.*loop that never ends"):
        _common.call_student(spin if endless == "spin" else swallow, time_limit=0.5)
    assert time.monotonic() - start < 10
    assert not any(t.name == "exercise" and t.is_alive() for t in threading.enumerate())
    # a function that returns in time is not affected
    assert _common.call_student(lambda a: a + 1, 1, time_limit=5) == 2


@pytest.mark.parametrize("time_limit", [0, -1, float("nan"), float("inf"), "5", True, [1]])
def test_call_student_refuses_a_bad_time_limit_before_running_the_function(time_limit):
    """Probe finding: time_limit 0 or -1 blamed the student's function ("did not return within
    -1 s"), NaN waited for ever and "5" or True were taken as seconds."""
    from dlgkit.exercises import _common

    calls = []
    with pytest.raises(ValueError, match=r"time_limit must .*None waits for ever"):
        _common.call_student(lambda: calls.append(1), time_limit=time_limit)
    assert calls == []
    assert _common.call_student(lambda: 7, time_limit=None) == 7


@pytest.mark.parametrize("target", [-1, 0, 1.5, float("nan"), True, "0.4"])
def test_open_exercise_target_must_be_a_fraction(target):
    with pytest.raises(ValueError, match="target must be a fraction"):
        exercises.check_flat_brightness_layer(lambda public, neurons: None, target=target)


def cheats() -> list[tuple[str, str, object, str]]:
    """(check, what, cheat, expected fragment of the feedback); every one must fail."""
    attacks, data, defences, federated, metrics, span_residuals = _library()
    face = lambda *a: data.lfw_faces(1, size=16, start=3)[0]  # noqa: E731 - the issue's cheat
    nan_image = lambda m, g, s, l: torch.full(s, float("nan"))  # noqa: E731
    return [
        ("check_shared_gradient", "library", federated.client_gradient, "dlgkit.federated"),
        ("check_shared_gradient", "the check's reference", lambda m, x, y: exercises.images._mlp_gradients(m, x, y), "dlgkit.exercises"),
        ("check_span_test", "the check's reference", lambda g, c, r: exercises.text._distance_to_span(c, torch.linalg.svd(g)[2][:r]), "dlgkit.exercises"),
        ("check_shared_gradient", "zeros", lambda m, x, y: [torch.zeros_like(p) for p in m.parameters()], "off by"),
        ("check_shared_gradient", "nan", lambda m, x, y: [torch.full_like(p, float("nan")) for p in m.parameters()], "NaN"),
        ("check_shared_gradient", "sum loss", lambda m, x, y: list(torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y, reduction="sum"), list(m.parameters()))), "mean"),
        ("check_input_from_linear_gradient", "library", attacks.recover_linear_input, "dlgkit.attacks"),
        ("check_input_from_linear_gradient", "row 0", lambda w, b: w[0] / b[0], "zero bias gradient"),
        ("check_input_from_linear_gradient", "frames", lambda w, b: _walk_up("x").reshape(-1), ""),
        ("check_input_from_linear_gradient", "hard-coded", lambda w, b: torch.full((w.shape[1],), 0.5), "error"),
        ("check_input_from_linear_gradient", "nan", _nan_like_first, "NaN"),
        ("check_batch_mixing_weights", "uniform", lambda m, x, y, row: torch.full((len(x),), 1 / len(x)), "alpha"),
        ("check_batch_mixing_weights", "nan", lambda m, x, y, row: torch.full((len(x),), float("nan")), "NaN"),
        ("check_batch_leak", "largest rows", lambda g, b: g[0][(i := g[1].abs().argsort(descending=True)[:b])] / g[1][i, None], "recovered"),
        ("check_batch_leak", "nan", lambda g, b: torch.full((b, 64), float("nan")), "NaN"),
        ("check_batch_leak", "frames", lambda g, b: _walk_up("x"), ""),
        ("check_label_from_gradient", "nan", lambda g: g.sum() * float("nan"), "an int"),
        ("check_label_from_gradient", "largest", lambda g: int(torch.argmax(g)), "sign"),
        ("check_label_from_gradient", "hard-coded", lambda g: 3, "sign"),
        ("check_label_from_gradient", "frames", lambda g: int(_walk_up("label")), ""),
        ("check_label_from_gradient", "library", lambda g: attacks.idlg_label(torch.nn.Linear(1, len(g)), [torch.zeros(len(g), 1), g]), "dlgkit.attacks"),
        ("check_label_from_gradient", "crash", lambda g: g.nonexistent(), "AttributeError"),
        ("check_gradient_matching_loss", "detached", lambda d, s: sum(((a - b) ** 2).sum() for a, b in zip(d, s)).detach(), "require grad"),
        ("check_gradient_matching_loss", "library", lambda d, s: attacks.gradient_distance(d, s, "l2"), "dlgkit.attacks"),
        ("check_gradient_matching_loss", "mean", lambda d, s: sum(((a - b) ** 2).sum() for a, b in zip(d, s)) / sum(a.numel() for a in d), "sum"),
        ("check_gradient_matching_loss", "nan", lambda d, s: d[0].sum() * float("nan"), "NaN"),
        ("check_gradient_matching_loss", "hard-coded", lambda d, s: d[0].sum() * 0 + 10.0, "expected"),
        ("check_dlg_attack", "data set", face, "dlgkit.data"),
        ("check_dlg_attack", "nan", nan_image, "NaN"),
        ("check_dlg_attack", "random", lambda m, g, s, l: torch.rand(s), "PSNR"),
        ("check_dlg_attack", "no create_graph", _dlg_without_create_graph, "create_graph=True"),
        ("check_dlg_attack", "library", lambda m, g, s, l: attacks.gradient_distance(g, g, "l2") * torch.zeros(s), "dlgkit.attacks"),
        ("check_relu_attack", "data set", face, "dlgkit.data"),
        ("check_relu_attack", "nan", nan_image, "NaN"),
        ("check_relu_attack", "grey", lambda m, g, s, l: torch.full(s, 0.5), "PSNR"),
        ("check_align_batch", "library", lambda r, o: metrics.align(r, o), "dlgkit.metrics"),
        ("check_align_batch", "nan", lambda r, o: torch.full((len(o),), float("nan")), "NaN"),
        ("check_align_batch", "identity", lambda r, o: torch.arange(len(o)), ""),
        ("check_align_batch", "frames", lambda r, o: torch.argsort(_walk_up("shuffle")), ""),
        ("check_align_batch", "greedy", _greedy_alignment, "Greedy"),
        ("check_batch_label_set", "nan", lambda g, b: [float("nan")] * b, "whole numbers"),
        ("check_batch_label_set", "largest", lambda g, b: torch.argsort(g, descending=True)[:b].tolist(), "most negative"),
        ("check_batch_label_set", "frames", lambda g, b: _walk_up("y").tolist(), ""),
        ("check_batch_label_set", "hard-coded", lambda g, b: list(range(b)), ""),
        ("check_batch_label_counts", "nan", lambda g, b: torch.full((b,), float("nan")), "NaN"),
        ("check_batch_label_counts", "distinct", lambda g, b: torch.argsort(g)[:b].tolist(), "target"),
        ("check_batch_label_counts", "frames", lambda g, b: _walk_up("y").tolist(), ""),
        ("check_bag_of_words", "largest rows", lambda g: g.norm(dim=1).argsort(descending=True)[:10], ""),
        ("check_bag_of_words", "hard-coded", lambda g: [1, 2, 3], ""),
        ("check_bag_of_words", "nan", lambda g: torch.tensor([float("nan")]), "NaN"),
        ("check_span_test", "library", lambda g, c, r: span_residuals(g, c, rank=r)[0], "dlgkit.attacks"),
        ("check_span_test", "absolute", lambda g, c, r: (c - c @ (v := torch.linalg.svd(g, full_matrices=False)[2][:r].T) @ v.T).norm(dim=1), "relative"),
        ("check_span_test", "full rank", lambda g, c, r: (c - c @ (v := torch.linalg.svd(g, full_matrices=False)[2].T) @ v.T).norm(dim=1) / c.norm(dim=1), ""),
        ("check_span_test", "nan", lambda g, c, r: torch.full((len(c),), float("nan")), "NaN"),
        ("check_sentence_from_span", "nan", lambda g, w, p: torch.full((8,), float("nan")), "NaN"),
        ("check_sentence_from_span", "frames", lambda g, w, p: _walk_up("sentence"), ""),
        ("check_sentence_from_span", "hard-coded", lambda g, w, p: [1] * 8, ""),
        ("check_prune", "library", defences.prune, "dlgkit.defences"),
        ("check_prune", "unchanged", lambda g, r: [t.clone() for t in g], "zeros"),
        ("check_prune", "keeps the fraction", lambda g, r: [t * (t.abs() < t.abs().flatten().kthvalue(max(1, round(r * t.numel()))).values) for t in g], ""),
        ("check_prune", "in place", lambda g, r: [t.mul_(0) for t in g], "changed the gradients"),
        ("check_prune", "nan", lambda g, r: [t * float("nan") for t in g], "NaN"),
        ("check_prune", "drops the signs", lambda g, r: [t.abs() * (t.abs() >= t.abs().median()) for t in g], ""),
        ("check_clip_per_example", "per tensor", lambda g, c: [t * torch.clamp(c / t.flatten(1).norm(dim=1), max=1).view(-1, *[1] * (t.dim() - 1)) for t in g], "each tensor"),
        ("check_clip_per_example", "whole batch", lambda g, c: [t * min(1.0, c / float(torch.sqrt(sum((u**2).sum() for u in g)))) for t in g], ""),
        ("check_clip_per_example", "nan", lambda g, c: [t * float("nan") for t in g], "NaN"),
        ("check_weakest_noise", "hard-coded", lambda *a: 1e-3, "not one of the variances"),
        ("check_weakest_noise", "weakest", lambda attack, grid: grid[0], "not stopped"),
        ("check_weakest_noise", "strongest", lambda attack, grid: grid[-1], "not the weakest"),
        ("check_weakest_noise", "nan", lambda attack, grid: float("nan"), "not a variance"),
        ("check_weakest_noise", "string", lambda attack, grid: "1e-3", "float"),
        *_chapter6_cheats(attacks, data, federated),
        *_chapter7_cheats(),
    ]


CHEATS = cheats()


@pytest.mark.parametrize("check,what,cheat,feedback", CHEATS, ids=[f"{c}-{w}" for c, w, _, _ in CHEATS])
def test_cheats_and_wrong_answers_fail(check, what, cheat, feedback):
    passed, output = _run(getattr(exercises, check), cheat)
    assert not passed, f"{check} accepted the {what!r} cheat:\n{output}"
    assert "❌" in output and feedback in output, output


def test_every_check_meets_a_nan_and_a_wrong_or_hard_coded_cheat():
    assert {c for c, w, _, _ in CHEATS if w == "nan"} == set(ALL_CHECKS)
    assert {c for c, w, _, _ in CHEATS if w != "nan"} == set(ALL_CHECKS)


def test_helpers_do_not_touch_the_global_rng():
    from dlgkit.exercises import images

    torch.manual_seed(7)
    before = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    images._lenet(generator, classes=10)
    images._mlp(generator)
    images._private_face(generator)
    assert torch.equal(before, torch.get_rng_state())


def test_cases_differ_from_call_to_call(references):
    """Fresh entropy: two runs of a check hand out different cases."""
    seen: list[torch.Tensor] = []
    record = lambda g: seen.append(g.clone()) or references["check_label_from_gradient"](g)  # noqa: E731
    assert _run(exercises.check_label_from_gradient, record)[0]
    assert _run(exercises.check_label_from_gradient, record)[0]
    assert len(seen) == 12 and not torch.equal(seen[0], seen[6])
    assert len({int(g.argmin()) for g in seen[:6]}) == 6, "the cases' answers should differ"
