"""Build the book without the solutions pages, for teachers who hand out the exercises.

    python scripts/student_book.py                      # executed, HTML in _build/student/_build/html
    python scripts/student_book.py --execute off        # pages only, nothing executed, glue warnings off (the test's quick check)

`make book-student` runs the first. The configuration is _config.yml with `solutions` added to
`exclude_patterns` (written to <out>/_config.yml, so the two can never drift apart); the
chapters still link the exercise notebooks (exercises/, on GitHub and in Colab).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def student_config(execute: str | None = None) -> dict:
    """_config.yml without the solutions pages; paths made absolute (the copy lives elsewhere)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["exclude_patterns"] = list(config["exclude_patterns"]) + ["solutions"]
    if execute is not None:
        config["execute"]["execute_notebooks"] = execute
    if execute == "off":
        # Unexecuted pages have no glue data, so every {glue} role would warn (and -W fails the
        # build). The pages-only build checks which pages exist and where they link; the glued
        # numbers are checked in the executed book (tests/built_book/test_glue.py).
        sphinx_config = config["sphinx"].setdefault("config", {})
        sphinx_config["suppress_warnings"] = list(sphinx_config.get("suppress_warnings", [])) + ["mystnb.glue"]
    config["bibtex_bibfiles"] = [str(ROOT / path) for path in config["bibtex_bibfiles"]]
    extensions = config["sphinx"].get("local_extensions") or {}  # found relative to the config file
    config["sphinx"]["local_extensions"] = {name: str(ROOT / path) for name, path in extensions.items()}
    return config


def build(out: Path, execute: str | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Write the student configuration into ``out`` and build the book there (warnings are errors)."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(student_config(execute)))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book), "build", str(ROOT), "--config", str(config_path), "--toc", str(ROOT / "_toc.yml"),
               "--path-output", str(out), "-W", "-n", "--keep-going"]
    return subprocess.run(command, cwd=ROOT, capture_output=capture, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "student", help="output folder (default _build/student)")
    parser.add_argument("--execute", choices=["force", "cache", "auto", "off"], default=None,
                        help="override execute_notebooks of _config.yml (default: as there)")
    args = parser.parse_args()
    result = build(args.out.resolve(), args.execute)
    if result.returncode == 0:
        print(f"student book (no solutions pages): {args.out / '_build' / 'html' / 'index.html'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
