"""`make test-device`'s runner (scripts/run_notebooks.py --simulate-cuda --min-cuda-share): a notebook
whose tensor work stays on the CPU fails, unless its metadata says why it does."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
WORK = "import torch\nx = torch.ones(3, 3)\nfor _ in range(20):\n    x = x @ x / 3"


def _notebook(path: Path, device: str, cpu_only: str | None = None) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(WORK.replace("torch.ones(3, 3)", f"torch.ones(3, 3, device={device!r})")),
                nbformat.v4.new_code_cell("assert float(x.sum().cpu()) == 9.0")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if cpu_only:
        nb.metadata["dlgkit"] = {"cpu_only": cpu_only}
    nbformat.write(nb, str(path))


def test_a_notebook_left_on_the_cpu_fails_unless_it_says_why(tmp_path):
    _notebook(tmp_path / "a_gpu.ipynb", "cuda")
    _notebook(tmp_path / "b_cpu.ipynb", "cpu")
    _notebook(tmp_path / "c_cpu_by_design.ipynb", "cpu", cpu_only="closed-form, nothing to gain")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--simulate-cuda", "--min-cuda-share", "0.8",
                          "--out", str(tmp_path / "out"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "DLGKIT_PROGRESS": "0"})
    assert run.returncode == 1, run.stdout + run.stderr  # b_cpu.ipynb fails
    rows = {line.split("|")[1].strip().rsplit("/", 1)[-1]: [c.strip() for c in line.split("|")[2:-1]]
            for line in run.stdout.splitlines() if line.startswith("| ") and ".ipynb" in line}
    assert rows["a_gpu.ipynb"][1] == "ok" and float(rows["a_gpu.ipynb"][2].rstrip("%")) >= 80, rows
    assert rows["b_cpu.ipynb"][1:] == ["FAILED", "0.0%"], rows
    assert rows["c_cpu_by_design.ipynb"][1:] == ["cpu", "0.0%"], rows
    assert "only 0% of the tensor operations ran on the GPU" in run.stderr
    assert "by design: closed-form, nothing to gain" in run.stderr
    assert "2/3 passed" in run.stdout
