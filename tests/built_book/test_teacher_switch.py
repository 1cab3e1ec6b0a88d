"""A teacher can build the book without the solutions pages by editing _config.yml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_solutions_pages_can_be_switched_off(tmp_path):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["exclude_patterns"] = list(config["exclude_patterns"]) + ["solutions"]
    config["execute"]["execute_notebooks"] = "off"  # this test is about the pages, not the results
    config["bibtex_bibfiles"] = [str(ROOT / path) for path in config["bibtex_bibfiles"]]
    # local extensions are found relative to the config file
    extensions = config["sphinx"].get("local_extensions") or {}
    config["sphinx"]["local_extensions"] = {name: str(ROOT / path) for name, path in extensions.items()}
    config_path = tmp_path / "_config.yml"
    config_path.write_text(yaml.safe_dump(config))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    out = tmp_path / "out"
    run = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--config", str(config_path), "--toc", str(ROOT / "_toc.yml"),
         "--path-output", str(out), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    html = out / "_build" / "html"
    assert (html / "book" / "02_single_image_dlg.html").exists()
    assert not (html / "solutions").exists(), "solutions pages were built although excluded"
    assert "solutions/ch01_gradient_sharing.html" not in (html / "book" / "01_gradient_sharing.html").read_text()
