"""The exercise pipeline: generated notebooks in sync, no leaked solutions, checks that can fail."""

from __future__ import annotations

import contextlib
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


def test_there_are_exercises_for_chapters_1_and_2():
    names = [p.name for p in SOLUTIONS]
    assert "ch01_gradient_sharing.ipynb" in names and "ch02_single_image_dlg.ipynb" in names
    for path in SOLUTIONS[:2]:
        nb = nbformat.read(path, as_version=4)
        blocks = sum(c.source.count("### BEGIN SOLUTION") for c in nb.cells if c.cell_type == "code")
        assert blocks >= 3, f"{path.name} has {blocks} exercises, expected at least 3"


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
    assert checks >= 2


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


# --- the checks themselves judge real answers --------------------------------------------

def _quiet(check, fn) -> bool:
    with contextlib.redirect_stdout(io.StringIO()):
        return check(fn)


def test_checks_reject_wrong_answers():
    assert not _quiet(exercises.check_shared_gradient, lambda m, x, y: [torch.zeros_like(p) for p in m.parameters()])
    assert not _quiet(exercises.check_input_from_linear_gradient, lambda w, b: w[0] / b[0])  # row 0 is dead in one trial
    assert not _quiet(exercises.check_batch_mixing_weights, lambda m, x, y, row: torch.full((len(x),), 1 / len(x)))
    assert not _quiet(exercises.check_label_from_gradient, lambda g: int(torch.argmax(g)))
    assert not _quiet(exercises.check_gradient_matching_loss, lambda d, s: sum(((a - b) ** 2).sum() for a, b in zip(d, s)).detach())
    assert not _quiet(exercises.check_dlg_attack, lambda m, g, shape, y: torch.rand(shape))
    assert not _quiet(exercises.check_relu_attack, lambda m, g, shape, y: torch.zeros(shape))


def test_checks_explain_crashes():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert not exercises.check_label_from_gradient(lambda g: g.nonexistent())
    assert "AttributeError" in buffer.getvalue()


def test_checks_accept_reference_answers():
    from dlgkit import attacks, federated

    assert _quiet(exercises.check_shared_gradient, federated.client_gradient)
    assert _quiet(exercises.check_input_from_linear_gradient, attacks.recover_linear_input)
    assert _quiet(exercises.check_label_from_gradient, lambda g: int(torch.argmin(g)))
    assert _quiet(exercises.check_gradient_matching_loss, lambda d, s: attacks.gradient_distance(d, s, "l2"))
