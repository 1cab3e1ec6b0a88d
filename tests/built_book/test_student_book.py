"""`make book-student`: the book without the solutions pages, for teachers who hand out the
exercises. Built here with execution off (`scripts/student_book.py --execute off`): this test is
about which pages exist and where they link, and the executed book is already checked by
test_html.py; a second executed build would double CI's book time."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("student_book", ROOT / "scripts" / "student_book.py")
student_book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(student_book)

REPOSITORY = "github.com/dlg-course/dlg-course/blob/main/"


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    run = student_book.build(out, execute="off", capture=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out / "_build" / "html"


def _pages(html: Path) -> dict[str, BeautifulSoup]:
    files = [p for p in html.rglob("*.html") if p.relative_to(html).parts[0] not in ("_static", "_sources")]
    return {str(p.relative_to(html)): BeautifulSoup(p.read_text(encoding="utf-8"), "html.parser") for p in files}


def test_the_makefile_target_runs_this_script():
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^book-student:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert target and "scripts/student_book.py" in target.group(1), "make book-student should run scripts/student_book.py"


def test_student_book_has_every_chapter_and_no_solution_page(html):
    pages = _pages(html)
    chapters = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
    assert chapters and all(f"book/{c}.html" in pages for c in chapters), sorted(pages)
    assert not (html / "solutions").exists() and not any(name.startswith("solutions/") for name in pages)
    linking = [name for name, soup in pages.items() if any("solutions/" in a["href"] for a in soup.find_all("a", href=True))]
    assert not linking, f"pages link solution pages that the student book leaves out: {linking}"


def test_exercise_links_point_at_existing_notebooks(html):
    """Each chapter links its exercise notebook on GitHub and in Colab, and the link's path is a
    file of this repository; local links resolve inside the student book."""
    problems = []
    for name, soup in _pages(html).items():
        for a in soup.find_all("a", href=True):
            url = urlparse(a["href"])
            if url.scheme in ("http", "https") and REPOSITORY in a["href"] and "/exercises/" in url.path:
                path = url.path.split("/blob/main/", 1)[1]
                if not (ROOT / path).is_file():
                    problems.append(f"{name}: {a['href']} (no {path})")
            elif not url.scheme and not url.netloc and url.path and not a["href"].startswith(("#", "mailto:")):
                if not (html / name).parent.joinpath(unquote(url.path)).resolve().exists():
                    problems.append(f"{name}: {a['href']} (broken local link)")
    assert not problems, "\n".join(problems[:20])
    for chapter in sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")):
        number = chapter.stem[:2]
        text = (html / "book" / f"{chapter.stem}.html").read_text(encoding="utf-8")
        assert f"colab.research.google.com/github/dlg-course/dlg-course/blob/main/exercises/ch{number}_" in text, f"{chapter.stem} has no Colab link to its exercises"
