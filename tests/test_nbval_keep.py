"""`make test-gpu`'s nbval plugin (scripts/nbval_keep.py): the notebooks nbval ran are kept with
this run's outputs, and a failing cell is reported as a failed notebook."""

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, sources: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a page")] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_nbval_keeps_outputs_and_times(tmp_path):
    _notebook(tmp_path / "good.ipynb", ["x = 6 * 7\nprint('answer', x)", "x", "assert x == 42"])
    _notebook(tmp_path / "bad.ipynb", ["print('before')", "assert 1 == 2, 'a claim that fails'"])
    out = tmp_path / "kept"
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:randomly", "-p", "nbval_keep",
                          "--keep-executed", str(out), "--rootdir", str(tmp_path), "-q", "good.ipynb", "bad.ipynb"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "scripts")})
    assert run.returncode == 1, run.stdout + run.stderr  # bad.ipynb fails
    good = nbformat.read(str(out / "good.ipynb"), as_version=4)
    code = [c for c in good.cells if c.cell_type == "code"]
    assert code[0].outputs[0]["text"] == "answer 42\n"
    assert code[1].outputs[0]["data"]["text/plain"] == "42"
    assert [c.execution_count for c in code] == [1, 2, 3]
    bad = nbformat.read(str(out / "bad.ipynb"), as_version=4)
    assert bad.cells[1].outputs[0]["text"] == "before\n"
    table = (out / "timings.md").read_text()
    assert "| good.ipynb |" in table and "| ok |" in table.split("good.ipynb")[1].splitlines()[0]
    assert "failed" in table.split("bad.ipynb")[1].splitlines()[0]
    assert "| total |" in table and "1/2 passed" in table
