"""Generate the student notebooks in exercises/ from the solutions in solutions/.

solutions/ is the single source of truth. In every code cell, the lines between
``### BEGIN SOLUTION`` and ``### END SOLUTION`` become a ``raise NotImplementedError(...)``
stub (a ``### HINT: ...`` line just above the block becomes a ``# Hint:`` comment and the
stub's message). Markdown cells tagged ``solution`` are dropped, outputs are stripped.

    python scripts/make_exercises.py          # write exercises/
    python scripts/make_exercises.py --check  # fail if exercises/ differs from what would be written
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(\s*)### BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*### END SOLUTION\s*$")
HINT = re.compile(r"^(\s*)### HINT:\s*(.*)$")


class SolutionMarkerError(ValueError):
    """A solution block is not closed, nested, or empty."""


def strip_solution(source: str, where: str = "cell") -> str:
    """Replace every solution block in ``source`` by a NotImplementedError stub."""
    out: list[str] = []
    inside = False
    hint = ""
    for number, line in enumerate(source.splitlines(), start=1):
        hint_match = HINT.match(line)
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if inside:
                raise SolutionMarkerError(f"{where}, line {number}: BEGIN SOLUTION inside another solution block.")
            inside = True
            indent = begin.group(1)
            message = f"Exercise not done yet. Hint: {hint}" if hint else "Exercise not done yet: replace this line with your code."
            out.append(f"{indent}raise NotImplementedError({message!r})")
            hint = ""
        elif end:
            if not inside:
                raise SolutionMarkerError(f"{where}, line {number}: END SOLUTION without BEGIN SOLUTION.")
            inside = False
        elif inside:
            continue
        elif hint_match:
            hint = hint_match.group(2).strip()
            out.append(f"{hint_match.group(1)}# Hint: {hint}")
        else:
            out.append(line)
    if inside:
        raise SolutionMarkerError(f"{where}: a BEGIN SOLUTION block is never closed with ### END SOLUTION.")
    return "\n".join(out)


def make_exercise(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The student version of one solution notebook."""
    cells = []
    for index, cell in enumerate(solution.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if "solution" in tags:
            continue
        new = nbformat.from_dict(dict(cell))
        new.metadata = {k: v for k, v in cell.get("metadata", {}).items() if k == "tags"}
        if cell.cell_type == "code":
            new.source = strip_solution(cell.source, where=f"{name}, cell {index}")
            new.outputs = []
            new.execution_count = None
        cells.append(new)
    nb = nbformat.v4.new_notebook(cells=cells, metadata=dict(solution.metadata))
    nb.nbformat_minor = solution.nbformat_minor
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that exercises/ is up to date")
    args = parser.parse_args()
    solutions = sorted((ROOT / "solutions").glob("*.ipynb"))
    if not solutions:
        print("no notebooks in solutions/", file=sys.stderr)
        return 1
    expected = {}
    for path in solutions:
        nb = nbformat.read(path, as_version=4)
        expected[path.name] = render(make_exercise(nb, path.name))
    out_dir = ROOT / "exercises"
    stale = sorted(p.name for p in out_dir.glob("*.ipynb") if p.name not in expected)
    if args.check:
        problems = [f"exercises/{n} has no solutions/ source" for n in stale]
        for name, text in expected.items():
            target = out_dir / name
            if not target.exists():
                problems.append(f"exercises/{name} is missing")
            elif target.read_text() != text:
                problems.append(f"exercises/{name} differs from what solutions/{name} generates")
        if problems:
            print("exercises/ is out of date (run `make exercises`):\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"exercises/ is up to date ({len(expected)} notebooks)")
        return 0
    out_dir.mkdir(exist_ok=True)
    for name in stale:
        (out_dir / name).unlink()
    for name, text in expected.items():
        (out_dir / name).write_text(text)
        print(f"wrote exercises/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
