"""The scrubber on a real ipywidgets 7 (Colab's long-time version), not a simulation.

`make install` puts ipywidgets 7.7.5 in .venv/ipywidgets7 (outside the venv's site-packages);
this test runs a fresh interpreter with it first on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

IPYWIDGETS7 = Path(sys.prefix) / "ipywidgets7"

SCRIPT = r"""
import ipywidgets, torch
from dlgkit import viz
assert ipywidgets.__version__.startswith("7."), ipywidgets.__version__
assert not hasattr(ipywidgets, "Stack")
assert viz.scrubber_mode() == "callback"
history = [torch.full((1, 1, 8, 8), k / 3) for k in range(4)]
box = viz.scrubber(history, [0, 10, 20, 30])
assert box.mode == "callback"
image, caption = box.children[1].children[1], box.children[1].children[0]
first = image.value
box.slider.value = 3
assert image.value != first and "iter=30" in caption.value
box.slider.value = 0
assert image.value == first
print("ok", ipywidgets.__version__)
"""


def test_scrubber_falls_back_on_real_ipywidgets7():
    assert (IPYWIDGETS7 / "ipywidgets").is_dir(), f"ipywidgets 7 is not installed in {IPYWIDGETS7}: run `make install`"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(IPYWIDGETS7), str(Path(__file__).resolve().parents[1])]))
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok 7.7.5")
