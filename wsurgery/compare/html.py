"""A diff report as one self-contained HTML page (``docs/compare.md``, "HTML report").

The page needs nothing but itself: its style, script and chart are inline, it loads no
font, image or script, and its Content-Security-Policy forbids any other (``default-src
'none'``; the one script and the one style sheet are allowed by their SHA-256 hashes).

Tensor names come from files and are hostile: no name is ever put into HTML or script
text. The report goes into the page as JSON inside ``<script type="application/json">``
(which a browser never runs), with ``<``, ``>``, ``&`` and the line separators U+2028 /
U+2029 written as ``\\uXXXX`` escapes, so no string can close the element; the page's own
script reads it with ``JSON.parse`` and shows every name with ``textContent``.

The page's state is in its URL fragment, so a link (or a headless browser) opens it
sorted and filtered: ``report.html#sort=rel_l2&order=desc&filter=layers.1&reason=value``
(``sort``: a column key, ``order``: ``asc`` / ``desc``, ``filter``: a substring of the
name, case-insensitive; ``reason``: one reason; ``scale=log``: the chart's log scale).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import DiffReport

__all__ = ["embed_json", "render", "save"]

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def embed_json(obj) -> str:
    """JSON text safe inside a ``<script type="application/json">`` element: none of
    ``<``, ``>``, ``&``, U+2028, U+2029 appears in it (they can only occur inside JSON
    strings, where their ``\\u`` escapes mean the same)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.translate({ord(k): v for k, v in _JSON_ESCAPES.items()})


_HERE = Path(__file__).resolve().parent
_STYLE_FILE = "report.css"  # beside this module: the page's style sheet and script, inlined
_SCRIPT_FILE = "report.js"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="wsurgery {version}">
<title>Checkpoint diff (wsurgery)</title>
<style>{style}</style>
</head>
<body>
<h1>Checkpoint diff: <span id="verdict"></span></h1>
<dl class="summary" id="summary"></dl>
<noscript><p>This report draws its chart and tables with JavaScript; the data is in the
<code>wsurgery-data</code> element of the page source (the wsurgery.diff/1 JSON).</p></noscript>
<h2 id="chart-title">rel_l2 per module</h2>
<div class="controls" id="scale-box"><label><input type="checkbox" id="log-scale"> log scale</label></div>
<div id="chart"></div>
<h2>Changed tensors</h2>
<div class="controls">
<label>name contains <input type="search" id="filter" autocomplete="off"></label>
<label>reason <select id="reason"><option value="">any</option></select></label>
<span id="count" class="muted"></span>
</div>
<table id="changed"><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<h2>Only in A</h2>
<div id="only-a"></div>
<h2>Only in B</h2>
<div id="only-b"></div>
<script type="application/json" id="wsurgery-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@cache
def _assets() -> tuple[str, str]:
    return (_HERE / _STYLE_FILE).read_text(encoding="utf-8"), (_HERE / _SCRIPT_FILE).read_text(encoding="utf-8")


def render(report: DiffReport) -> str:
    """The report as one HTML page (the ``wsurgery.diff/1`` JSON inside, shown by the
    page's own script)."""
    from ..version import __version__

    style, script = _assets()
    csp = (
        "default-src 'none'; "
        f"script-src '{_sha256(script)}'; style-src '{_sha256(style)}'; "
        "img-src 'none'; base-uri 'none'; form-action 'none'"
    )
    return _PAGE.format(csp=csp, version=__version__, style=style, script=script, data=embed_json(report.to_dict()))


def save(report: DiffReport, path: str | os.PathLike, *, sync: bool = True) -> None:
    """Write the page to ``path`` atomically (a temporary file, then a rename); an
    existing file is replaced, but never one of the report's inputs, a folder or a
    special file (``OutputError``)."""
    from ..io.destination import check_report_target
    from ..io.writer import atomic_file

    target = os.fspath(path)
    check_report_target(target, (report.a, report.b))
    text = render(report).encode("utf-8")
    with atomic_file(target, sync=sync) as f:
        f.write(text)
