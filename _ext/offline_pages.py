"""Sphinx extension of the book: pages that work offline and log no JavaScript errors
(checked in a real browser by tests/built_book/test_browser.py).

- Serves ``_ext/static`` (``widgets_setup.js``, loaded through ``nb_ipywidgets_js`` in
  _config.yml) from ``_static``.
- Writes each inline script once. sphinx-thebe and sphinx-togglebutton add theirs with
  ``app.add_js_file(None, body=...)`` once the HTML builder exists; Sphinx 7.4 then writes them
  twice (its builder keeps the filename ``None``, its registry ``''``), and the second
  ``const THEBE_JS_URL`` throws a SyntaxError on every page.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx


def _add_static_path(app: Sphinx) -> None:
    app.config.html_static_path.append(str(Path(__file__).parent / "static"))


def _write_inline_scripts_once(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        filename = getattr(js, "filename", js) or ""
        key = (filename, tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _add_static_path)
    app.connect("html-page-context", _write_inline_scripts_once, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
