"""The HTML view of an explanation as one self-contained file.

There is one HTML renderer: the web view's script (``serving/static/pelrp.js``). This module
only assembles a page from the web view's own files, ``index.html`` with ``pelrp.css`` and
``pelrp.js`` inlined and the explanation's JSON embedded in
``<script type="application/json" id="explanation">``. Finding that element, the script draws
the explanation from it and talks to no server, so the file opens offline (``file://``) and
shows what the server's ``/pelrp`` page shows for the same explanation.

It takes the explanation as an argument and never imports :mod:`vllm_pelrp.explanation` at run
time (``Explanation.to_html`` imports this module: the dependency goes one way).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .explanation import Explanation

STATIC_DIR = Path(__file__).parent / "serving" / "static"
"""The web view's files (package data of ``vllm_pelrp.serving``, see pyproject.toml); read as
files so that building a page imports nothing of the server."""

# The lines of index.html that load the style and the script from the server; the page inlines
# them instead. index.html must keep them verbatim (a test renders the page).
STYLESHEET_TAG = '<link rel="stylesheet" href="/pelrp/static/pelrp.css">'
SCRIPT_TAG = '<script src="/pelrp/static/pelrp.js"></script>'
TITLE_TAG = "<title>vllm-pelrp · explanations</title>"

EMBEDDED_ID = "explanation"
"""The id of the element holding the explanation's JSON (the script reads it by this id)."""


def _static(name: str) -> str:
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def script_safe_json(text: str) -> str:
    """JSON safe inside a ``<script>`` element, and still the same JSON: ``</`` and ``<!--``
    become ``<\\/`` and ``<\\u0021--``."""
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def _replace_once(page: str, old: str, new: str) -> str:
    if page.count(old) != 1:
        raise RuntimeError(f"serving/static/index.html no longer holds {old!r} exactly once; "
                           "html_page.py inlines the web view's files at that line")
    return page.replace(old, new)


def explanation_page(explanation: Explanation, *, top_k: int = 10) -> str:
    """The page: the web view with the explanation embedded; ``top_k`` rows in its top-tokens
    table. Nothing on it is fetched (no ``src``/``href`` to a file or host)."""
    if top_k < 0:
        raise ValueError(f"top_k must be 0 or more, not {top_k}")
    css, script = _static("pelrp.css"), _static("pelrp.js")
    for name, text in (("pelrp.css", css), ("pelrp.js", script)):
        if "</style" in text.lower() or "</script" in text.lower():
            raise RuntimeError(f"serving/static/{name} cannot be inlined: it closes its element")
    page = _static("index.html")
    page = _replace_once(page, TITLE_TAG, f"<title>PA-LRP explanation · "
                                          f"{html.escape(explanation.model)}</title>")
    page = _replace_once(page, STYLESHEET_TAG, f"<style>\n{css}</style>")
    page = _replace_once(
        page, SCRIPT_TAG,
        f'<script type="application/json" id="{EMBEDDED_ID}" data-top-k="{int(top_k)}">'
        f"{script_safe_json(explanation.model_dump_json())}</script>\n<script>\n{script}</script>")
    return page
