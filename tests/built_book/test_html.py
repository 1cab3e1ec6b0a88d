"""Checks of the built book in _build/html (run after `jupyter-book build .`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
CHAPTERS = sorted(f"book/{p.stem}" for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))  # every chapter


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
    """Every local link, image, stylesheet and script exists, and a link to `page.html#anchor`
    finds its anchor (so the links into the API reference land on their entry)."""
    broken = []
    for name, soup in pages.items():
        base = (HTML / name).parent
        for tag, attr in (("a", "href"), ("img", "src"), ("link", "href"), ("script", "src"), ("source", "src")):
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
                elif parsed.fragment and target.suffix == ".html":
                    key = str(target.relative_to(HTML.resolve()))
                    anchors = pages[key] if key in pages else None
                    if anchors is not None and anchors.find(id=unquote(parsed.fragment)) is None:
                        broken.append(f"{name}: {tag} {attr}={url} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:20])


def test_pages_load_nothing_from_other_hosts(pages):
    """The book works offline: scripts, stylesheets and images come from the book itself
    (widgets' HTML manager, require.js and MathJax from _static/npm; see `make js`)."""
    external = []
    for name, soup in pages.items():
        for tag, attr in (("script", "src"), ("img", "src"), ("source", "src"), ("iframe", "src")):
            external += [f"{name}: {tag} {e[attr]}" for e in soup.find_all(tag) if urlparse(e.get(attr, "")).netloc]
        for link in soup.find_all("link", href=True):
            rel = set(link.get("rel") or [])
            if rel & {"stylesheet", "preload", "icon", "modulepreload"} and urlparse(link["href"]).netloc:
                external.append(f"{name}: link {link['href']}")
    assert not external, "pages load resources from other hosts:\n" + "\n".join(external[:20])


def test_widget_pages_load_the_html_manager_from_static(pages):
    widget_pages = [name for name, soup in pages.items() if soup.find("script", attrs={"type": "application/vnd.jupyter.widget-state+json"})]
    assert widget_pages, "no page carries widget state"
    # in this order: the embedder registers AMD modules, which widgets_setup.js maps onto _static
    expected = ["_static/npm/requirejs/require.js", "_static/widgets_setup.js", "_static/npm/html-manager/embed-amd.js"]
    for name in widget_pages:
        sources = [e["src"].split("?")[0] for e in pages[name].find_all("script", src=True)]
        found = [next((k for k, src in enumerate(sources) if src.endswith(script)), None) for script in expected]
        assert None not in found, f"{name} does not load all of {expected}: {sources}"
        assert found == sorted(found), f"{name} loads {expected} out of order: {sources}"
        for script in expected:
            assert (HTML / script).is_file(), f"{script} is missing from the built book (make js)"


def _chapter_pages(pages) -> list[str]:
    """Chapter pages found in the built book (book/NN_*.html), so that new chapters are covered."""
    names = sorted(n for n in pages if re.fullmatch(r"book/\d\d_[^/]+\.html", n))
    assert names, "no chapter pages found in _build/html/book"
    return names


def test_every_chapter_links_the_api_reference_where_it_first_uses_dlgkit(pages):
    """Each chapter's text links into the API page (an entry, not only the sidebar) no later than
    the first code cell that uses dlgkit."""
    problems = []
    for name in _chapter_pages(pages):
        article = pages[name].select_one("article")
        assert article is not None, f"{name} has no article element"
        api_links = [a for a in article.find_all("a", href=True) if urlparse(a["href"]).path.endswith("api.html") and "#dlgkit." in a["href"]]
        if not api_links:
            problems.append(f"{name}: no link to an entry of the API reference")
            continue
        first_use = next((cell for cell in article.select("div.cell") if "dlgkit" in cell.get_text()), None)
        if first_use is None:
            continue
        # document order: the first API link comes before (or inside) the first cell using dlgkit
        elements = list(article.descendants)
        if elements.index(api_links[0]) > elements.index(first_use):
            problems.append(f"{name}: the first link to the API reference comes after the first use of dlgkit")
    assert not problems, "\n".join(problems)


_FILENAME = re.compile(r"(^|/)[^ ]+\.(png|jpe?g|gif|svg|webp)$", re.IGNORECASE)


def test_every_figure_has_alt_text(pages):
    """Accessibility: every image in the pages' text has an alt text that describes it (not the
    file name that myst-nb falls back to); set it with the cell metadata `mystnb: image: alt:`."""
    missing = []
    for name, soup in pages.items():
        if not name.startswith(("book/", "solutions/")):
            continue  # generated indexes (py-modindex: decorative toggles)
        article = soup.select_one("article")
        for img in article.find_all("img") if article else []:
            alt = (img.get("alt") or "").strip()
            if len(alt) < 10 or _FILENAME.search(alt) or "_images/" in alt:
                missing.append(f"{name}: {img.get('src', '')[:60]} alt={alt!r}")
    assert not missing, "images without a real alt text:\n" + "\n".join(missing)


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


def test_colab_and_repository_links_have_a_clean_path(pages):
    """Launch buttons open `.../blob/main/book/<page>.ipynb` (no `./` from path_to_book), and the
    path is a notebook of this repository."""
    found = []
    for name in _chapter_pages(pages):
        for a in pages[name].find_all("a", href=True):
            href = a["href"]
            if "colab.research.google.com" in href and "/book/" in href:
                found.append(href)
                assert "/./" not in href and "//book" not in href, f"{name}: {href}"
                match = re.fullmatch(r"https://colab\.research\.google\.com/github/dlg-course/dlg-course/blob/main/(book/\d\d_[^/]+\.ipynb)", href)
                assert match, f"{name}: unexpected Colab link {href}"
                assert (ROOT / match.group(1)).is_file(), f"{name}: {href} names no notebook of the repository"
                assert match.group(1) == name.replace(".html", ".ipynb"), f"{name}: its Colab button opens {match.group(1)}"
    assert len(found) >= len(_chapter_pages(pages)), f"not every chapter has a Colab launch button: {found}"
