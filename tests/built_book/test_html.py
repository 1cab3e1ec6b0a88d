"""Checks of the built book in _build/html (run after `jupyter-book build .`)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
CHAPTERS = ["book/01_gradient_sharing", "book/02_single_image_dlg", "book/03_batched_dlg"]


@pytest.fixture(scope="module")
def pages() -> dict[str, BeautifulSoup]:
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `jupyter-book build .` (make test does) first")
    # pages only: _static holds the theme's template fragments, not pages
    files = [p for p in HTML.rglob("*.html") if p.relative_to(HTML).parts[0] not in ("_static", "_sources")]
    return {str(p.relative_to(HTML)): BeautifulSoup(p.read_text(encoding="utf-8"), "html.parser") for p in files}


def _widget_state(soup: BeautifulSoup) -> dict:
    script = soup.find("script", attrs={"type": "application/vnd.jupyter.widget-state+json"})
    assert script is not None, "no embedded widget state: widgets would not render in the static book"
    return json.loads(script.string)["state"]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_is_built_and_executed(pages, chapter):
    soup = pages[f"{chapter}.html"]
    assert soup.find_all("div", class_="cell_output"), f"{chapter} has no executed outputs"
    assert soup.find_all("img"), f"{chapter} shows no figure"
    text = soup.get_text()
    assert "Traceback (most recent call last)" not in text, "an error traceback was rendered"
    assert "google.colab" not in str(soup), "the Colab install cell should be hidden by its remove-cell tag"
    assert "colab.research.google.com" in str(soup), "no Colab launch button"


@pytest.mark.parametrize("chapter", ["book/02_single_image_dlg", "book/03_batched_dlg"])
def test_chapter_carries_the_scrubber_widget_state(pages, chapter):
    soup = pages[f"{chapter}.html"]
    state = _widget_state(soup)
    models = [entry["model_name"] for entry in state.values()]
    assert "StackModel" in models, "the scrubber's Stack is missing from the widget state"
    assert models.count("LinkModel") >= 2, "the Play/slider/Stack browser-side links are missing"
    images = [entry for entry in state.values() if entry["model_name"] == "ImageModel"]
    assert len(images) >= 5, f"expected one image per snapshot, found {len(images)}"
    assert any(entry.get("buffers") for entry in images) or all("value" in entry["state"] for entry in images)
    views = soup.find_all("script", attrs={"type": "application/vnd.jupyter.widget-view+json"})
    assert views, "no widget view is placed on the page"


def test_citations_resolve(pages):
    soup = pages["book/02_single_image_dlg.html"]
    assert "Zhu" in soup.get_text(), "the DLG paper is not cited on chapter 2"
    bib = pages["book/bibliography.html"].get_text()
    assert "Deep Leakage from Gradients" in bib


def test_no_broken_internal_links(pages):
    broken = []
    for name, soup in pages.items():
        base = (HTML / name).parent
        for tag, attr in (("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")):
            for element in soup.find_all(tag):
                url = element.get(attr)
                if not url or url.startswith(("#", "mailto:", "data:", "javascript:")):
                    continue
                parsed = urlparse(url)
                if parsed.scheme or parsed.netloc:
                    continue
                target = (base / unquote(parsed.path)).resolve()
                if not target.exists():
                    broken.append(f"{name}: {tag} {attr}={url}")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:20])


@pytest.mark.parametrize("name", ["ch01_gradient_sharing", "ch02_single_image_dlg", "ch03_batched_dlg"])
def test_solutions_pages_are_built_and_pass_their_checks(pages, name):
    soup = pages[f"solutions/{name}.html"]
    text = soup.get_text()
    assert "✅" in text and "❌" not in text, f"solutions/{name}: a check did not pass in the built page"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapters_link_their_exercises_and_colab(pages, chapter):
    html = str(pages[f"{chapter}.html"])
    stem = chapter.split("/")[-1]
    number = stem[:2]
    assert f"exercises/ch{number}_" in html, f"{chapter} does not link its exercise notebook"
    assert f"colab.research.google.com/github/dlg-course/dlg-course/blob/main/exercises/ch{number}_" in html
