"""A pytest plugin for nbval runs that also keeps what they executed: ``make test-gpu``.

nbval runs each notebook cell by cell in one kernel and fails a cell that raises (an
``assert`` included), but keeps nothing. With ``-p nbval_keep --keep-executed DIR`` (``scripts``
on ``sys.path``), every notebook nbval ran is written to ``DIR`` (same relative path) with the
outputs its cells produced in this run, and ``DIR/timings.md`` gets a table of the time each
notebook took (the sum of its cells' run times) and whether it passed. The outputs are the ones
nbval read from the kernel (streams merged per cell, as nbval compares them).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--keep-executed", metavar="DIR", default=None,
                     help="write every notebook nbval ran, with this run's outputs, and DIR/timings.md (per-notebook times)")


def pytest_configure(config: pytest.Config) -> None:
    out = config.getoption("--keep-executed")
    if out:
        config.pluginmanager.register(_Keeper(Path(out), Path(str(config.rootpath))), "nbval-keep")


class _Keeper:
    """Collects each cell's outputs and time while nbval runs; writes them at the end."""

    def __init__(self, out: Path, root: Path) -> None:
        self.out, self.root = out, root
        self.files: dict[str, object] = {}  # path -> nbval's IPyNbFile (it holds the notebook)
        self.seconds: dict[str, float] = {}
        self.failed: set[str] = set()
        self.counts: dict[str, int] = {}  # execution counts, per notebook

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report = outcome.get_result()
        notebook = getattr(item, "parent", None)
        if not hasattr(item, "cell") or not hasattr(notebook, "nb"):
            return  # not a notebook cell
        key = str(item.path)
        self.files[key] = notebook
        if report.failed:
            self.failed.add(key)
        if call.when != "call":
            return
        self.seconds[key] = self.seconds.get(key, 0.0) + call.duration
        outputs = getattr(item, "test_outputs", None)
        if item.cell.cell_type == "code" and outputs is not None:
            self.counts[key] = self.counts.get(key, 0) + 1
            item.cell.outputs = [nbformat.from_dict(dict(o)) for o in outputs]
            item.cell.execution_count = self.counts[key]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        rows = ["| notebook | time (s) | result |", "| --- | --- | --- |"]
        for key, notebook in self.files.items():
            path = Path(key)
            relative = path.relative_to(self.root) if path.is_relative_to(self.root) else Path(path.name)
            target = self.out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook.nb, str(target))
            rows.append(f"| {relative} | {self.seconds.get(key, 0.0):.1f} | {'failed' if key in self.failed else 'ok'} |")
        total = sum(self.seconds.values())
        rows.append(f"| total | {total:.1f} | {len(self.files) - len(self.failed)}/{len(self.files)} passed |")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "timings.md").write_text("\n".join(rows) + "\n")
        print("\n" + "\n".join(rows))
