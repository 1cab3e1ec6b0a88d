"""The built book in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path``; Playwright downloads no browser here).

``_build/html`` is served on localhost and every request to another host is blocked and
recorded, so these tests also prove that the pages need no CDN. Screenshots of the chapters
land in ``_build/browser-test/`` (CI uploads them). ``CHROMIUM=/path/to/chrome`` picks another
Chromium-based browser.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
OUT = ROOT / "_build" / "browser-test"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps calling home (and floods a closed network).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--disable-dev-shm-usage",  # containers give /dev/shm only 64 MB
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def _chapters() -> list[str]:
    """Chapter pages (book/NN_*.html), found in the built book so that new chapters are covered."""
    return sorted(str(p.relative_to(HTML)) for p in (HTML / "book").glob("[0-9][0-9]_*.html"))


def _pages() -> list[str]:
    """Every page of the book's text: book/ (chapters, intro, API reference, bibliography) and solutions/."""
    return sorted(str(p.relative_to(HTML)) for folder in ("book", "solutions") for p in (HTML / folder).glob("*.html"))


# Collected from the built HTML. An empty list would make pytest skip the tests, so a
# placeholder stands in and fails instead.
PAGES = _pages() or ["(no pages: build the book first)"]
WIDGET_CHAPTERS = [name for name in _chapters() if WIDGET_VIEW in (HTML / name).read_text(encoding="utf-8")] or [
    "(no chapter page places a widget view)"
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail("the book is not built: run `jupyter-book build .` (make test does) first")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser test drives Debian's chromium. Install it with "
            "`sudo apt-get install -y chromium` (.ci/run does), or point CHROMIUM=/path/to/chrome at another "
            "Chromium-based browser. (Playwright's own browser download is not used.)"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Visit:
    """One page opened in a fresh browser context, with everything that went wrong recorded."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        self.external: list[str] = []   # requests to other hosts (blocked)
        self.errors: list[str] = []      # uncaught exceptions and console errors
        self.failed: list[str] = []      # local requests that failed or answered >= 400
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        self.page.on("requestfailed", self._request_failed)
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"))
        self.page.goto(url, wait_until="load")
        # MathJax (on pages with maths) typesets after the load event: wait until it is done
        try:
            self.page.wait_for_function(
                "() => !document.querySelector('script[src*=\"mathjax\"]') || (window.MathJax && MathJax.startup && MathJax.startup.promise)",
                timeout=15_000,
            )
            self.page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => true) : true")
        except PlaywrightTimeoutError:
            self.errors.append("MathJax did not start within 15 s")

    def _route(self, route):
        host = urlparse(route.request.url).hostname
        if host in LOCAL_HOSTS:
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def _request_failed(self, request):
        if urlparse(request.url).hostname in LOCAL_HOSTS:
            self.failed.append(f"failed ({request.failure}) {request.url}")

    def check_clean(self, name: str) -> None:
        assert not self.external, f"{name} asks for other hosts (the book must work offline):\n" + "\n".join(self.external)
        assert not self.failed, f"{name}: local requests failed:\n" + "\n".join(self.failed)
        assert not self.errors, f"{name}: JavaScript errors:\n" + "\n".join(self.errors)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(server, browser):
    opened = []

    def open_page(name: str) -> Visit:
        if not (HTML / name).exists():
            pytest.fail(f"{name} is not in the built book")
        v = Visit(browser, f"{server}/{name}")
        opened.append(v)
        return v

    yield open_page
    for v in opened:
        v.close()


def _shot_name(name: str) -> Path:
    return OUT / (name.removesuffix(".html").replace("/", "__") + ".png")


@pytest.mark.parametrize("name", PAGES)
def test_page_loads_offline_without_errors(visit, name):
    v = visit(name)
    if name in _chapters():
        v.page.screenshot(path=str(_shot_name(name)), full_page=True)
    v.check_clean(name)
    if 'class="math' in (HTML / name).read_text(encoding="utf-8"):
        assert v.page.locator("mjx-container").count() > 0, f"{name}: MathJax (served locally) typeset nothing"
    # every figure was decoded: a broken or missing image has naturalWidth 0
    broken = v.page.eval_on_selector_all(
        "article img", "imgs => imgs.filter(i => i.complete && i.naturalWidth === 0).map(i => i.getAttribute('src'))"
    )
    assert not broken, f"{name}: images that did not load: {broken}"


def _visible_frame(widget) -> dict:
    """The scrubber's visible frame: its caption and content. An image scrubber shows an image
    (its src and a screenshot); a text scrubber (chapter 4) shows a second HTML widget."""
    caption = widget.locator(".widget-html:visible").first
    if widget.locator(".widget-image").count():
        image = widget.locator(".widget-image:visible").first
        return {"caption": caption.inner_text(), "content": image.get_attribute("src"), "png": image.screenshot()}
    body = widget.locator(".widget-html:visible").nth(1)
    return {"caption": caption.inner_text(), "content": body.inner_text(), "png": body.screenshot()}


def _wait_for_caption(page, widget, old: str, changed: bool) -> None:
    """Wait (10 s at most) until the scrubber's visible caption differs from ``old`` (or, with
    ``changed=False``, is ``old`` again): the browser-side links have moved the frame."""
    op = "!==" if changed else "==="
    page.wait_for_function(
        "([el, old]) => { const c = [...el.querySelectorAll('.widget-html')].find(e => e.offsetParent);"
        f" return c && c.innerText.trim() {op} old; }}",
        arg=[widget.element_handle(), old.strip()],
        timeout=10_000,
    )


@pytest.mark.parametrize("name", WIDGET_CHAPTERS)
def test_scrubber_renders_and_its_slider_changes_the_image(visit, name):
    v = visit(name)
    page = v.page
    # the HTML manager replaces each widget-view script with the rendered widget
    try:
        page.wait_for_selector(".widget-slider .noUi-handle", timeout=30_000)
    except PlaywrightTimeoutError:
        v.check_clean(name)  # says why, where it can
        pytest.fail(f"{name}: no scrubber rendered within 30 s")
    scrubbers = page.locator(".cell_output:has(.widget-slider)")
    assert scrubbers.count() >= 1, f"{name}: no scrubber rendered"
    for k in range(scrubbers.count()):
        widget = scrubbers.nth(k)
        widget.scroll_into_view_if_needed()
        assert widget.locator(".widget-play").count() == 1, f"{name}: scrubber {k} has no play button"
        before = _visible_frame(widget)
        assert before["content"] and before["caption"].strip(), f"{name}: scrubber {k} shows no frame: {before}"
        handle = widget.locator(".widget-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("End")
        # jslink moves the Stack to the last snapshot, in the browser, with no kernel
        _wait_for_caption(page, widget, before["caption"], changed=True)
        after = _visible_frame(widget)
        assert after["caption"] != before["caption"], f"{name}: the caption did not follow the slider"
        assert after["content"] != before["content"], f"{name}: the slider did not change the shown image or text"
        assert after["png"] != before["png"], f"{name}: the displayed frame did not change"
        widget.screenshot(path=str(_shot_name(name).with_suffix(f".scrubber{k}.png")))  # the last snapshot
        page.keyboard.press("Home")
        _wait_for_caption(page, widget, before["caption"], changed=False)
        # the Play button steps through the snapshots by itself (and can be stopped)
        widget.locator(".widget-play button").nth(0).click()
        _wait_for_caption(page, widget, before["caption"], changed=True)
        widget.locator(".widget-play button").nth(1).click()
    v.check_clean(name)

