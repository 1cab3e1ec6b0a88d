"""Numbers in the prose come from the computation (myst-nb ``glue``), never typed by hand.

Run after the book is built (``make test`` builds it). In every paragraph (or list item) of
a chapter that quotes a glued number, any other number with a unit (dB, %, s, seconds,
minutes) must be glued too, unless it is one of the course's fixed constants below: a
hand-typed figure next to a glued one is how a page ends up contradicting its own outputs.
Every ``{glue:text}`` role of a chapter must also have rendered (a missing key renders as
nothing, silently).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup

from dlgkit.checks import STOPPED_PSNR, SUCCESS_PSNR

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
GLUED_CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))  # every chapter

#: numbers with a unit that the prose may type next to a glued one: thresholds and
#: definitions of the course, not results of a computation
ALLOWED = {f"{SUCCESS_PSNR:g} dB", f"{STOPPED_PSNR:g} dB"}

FIGURE_WITH_UNIT = re.compile(r"(?<![\w.,])(\d+(?:[.,]\d+)*)\s?(dB|%|s|seconds?|minutes?)(?![\w])")
ROLE = re.compile(r"\{glue:text\}`")


def hand_typed_figures(html: str) -> list[str]:
    """The figures with a unit typed by hand in paragraphs and list items of ``html`` that also
    quote a glued number (``span.pasted-text``), minus :data:`ALLOWED`."""
    soup = BeautifulSoup(html, "html.parser")
    found = []
    for block in soup.find_all(["p", "li"]):
        if block.find("p") is not None or not block.find("span", class_="pasted-text"):
            continue  # a list item holding paragraphs is checked through them
        block = copy.copy(block)
        for quiet in block.find_all(["code", "pre"]) + block.find_all("span", class_=["pasted-text", "math"]):
            quiet.decompose()
        text = " ".join(block.get_text(" ").split())
        for match in FIGURE_WITH_UNIT.finditer(text):
            figure = f"{match.group(1)} {match.group(2)}"
            if figure not in ALLOWED:
                found.append(f"{figure!r} in: {text[:160]}")
    return found


def test_the_check_finds_a_typed_figure_next_to_a_glued_one():
    glued = '<span class="pasted-text">12.6</span>'
    assert hand_typed_figures(f"<p>It reaches {glued} dB, about 14 dB in the exercise.</p>") == [
        "'14 dB' in: It reaches dB, about 14 dB in the exercise."
    ]
    assert len(hand_typed_figures(f"<ul><li><p>{glued} s, 100% of the labels and 2.5 s</p></li></ul>")) == 2
    # the glued figure itself, the thresholds, code, and paragraphs without glue all pass
    assert hand_typed_figures(f"<p>{glued} dB, above the {SUCCESS_PSNR:g} dB line; <code>tol=1e-8 s</code></p>") == []
    assert hand_typed_figures("<p>about 14 dB, typed, but with nothing glued next to it</p>") == []
    assert hand_typed_figures(f"<p>a 32x32 face, {glued} dB</p>") == []


@pytest.fixture(scope="module")
def chapters() -> dict[str, str]:
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `jupyter-book build .` (make test does) first")
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted((HTML / "book").glob("0*.html"))}


def test_no_hand_typed_figure_next_to_a_glued_one(chapters):
    typed = {name: figures for name, html in chapters.items() if (figures := hand_typed_figures(html))}
    assert not typed, f"hand-typed figures next to glued ones (glue them, or allow a constant in ALLOWED): {typed}"


@pytest.mark.parametrize("chapter", GLUED_CHAPTERS)
def test_every_glue_role_rendered(chapters, chapter):
    notebook = nbformat.read(ROOT / "book" / f"{chapter}.ipynb", as_version=4)
    roles = sum(len(ROLE.findall(cell.source)) for cell in notebook.cells if cell.cell_type == "markdown")
    pasted = BeautifulSoup(chapters[chapter], "html.parser").find_all("span", class_="pasted-text")
    assert roles >= 5, f"{chapter} quotes only {roles} glued numbers"
    assert len(pasted) == roles, f"{chapter}: {roles} glue roles in the notebook, {len(pasted)} rendered (a key is missing?)"
    assert all(span.get_text().strip() for span in pasted), f"{chapter}: an empty glued value"
