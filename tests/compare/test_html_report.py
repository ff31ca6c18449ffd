"""The HTML report: one self-contained file, hostile names kept as data, and (in a real
headless Chromium) a chart, a table that sorts and filters from the URL fragment, and a
screenshot that is not blank."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wsurgery.compare import diff
from wsurgery.compare.html import embed_json, render

from .. import browser

HOSTILE = [
    'evil.</script><script>document.body.setAttribute("data-pwned","1")</script>.weight',
    "img.<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">.weight",
    "amp.&lt;b&gt; & \u2028 \u2029 '\"`${x}`.weight",
]
LAYERS = 12
TITLE = "Checkpoint diff (wsurgery)"
BAR_BLUE = (0x2F, 0x6F, 0xD6)  # report.css: svg .bar (light scheme)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A and B: a dozen layers whose attention weights moved (by different amounts), norms
    untouched, an embedding only in A, hostile names that changed, one NaN."""
    tmp = tmp_path_factory.mktemp("html")
    g = torch.Generator().manual_seed(0)
    a, b = {}, {}
    for i in range(LAYERS):
        w = torch.randn(32, 16, generator=g)
        a[f"layers.{i}.attn.weight"] = w
        b[f"layers.{i}.attn.weight"] = w + (i + 1) * 1e-3 * torch.randn(32, 16, generator=g)
        a[f"layers.{i}.norm.weight"] = torch.ones(16)
        b[f"layers.{i}.norm.weight"] = torch.ones(16)
    for k, name in enumerate(HOSTILE):
        x = torch.randn(8, generator=g)
        a[name] = x
        b[name] = x + 1 if k != 1 else torch.full((8,), float("nan"))
    a["embed.weight"] = torch.randn(4, 4, generator=g)
    b["head.</b>.weight"] = torch.randn(4, 4, generator=g)
    pa, pb = tmp / "a.safetensors", tmp / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb


@pytest.fixture(scope="module")
def page(pair, tmp_path_factory) -> tuple[Path, dict]:
    """The report written by ``wsurgery diff --html --json``, and the JSON printed."""
    from typer.testing import CliRunner

    from wsurgery.cli.app import app

    out = tmp_path_factory.mktemp("page") / "report.html"
    a, b = pair
    result = CliRunner().invoke(app, ["diff", str(a), str(b), "--html", str(out), "--json"], env={"NO_COLOR": "1"})
    assert result.exit_code == 1, result.stderr
    return out, json.loads(result.stdout)


# --------------------------------------------------------------------- the file itself


def test_embed_json_cannot_close_its_element():
    obj = {"name": "</script><!-- <script> & \u2028\u2029", "x": [1.5, None, "Infinity"]}
    text = embed_json(obj)
    assert not set(text) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(text) == obj


def _data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="wsurgery-data">(.*?)</script>', html, re.S)
    assert m, "no data element"
    return json.loads(m.group(1))


def test_the_page_is_self_contained_and_names_are_only_data(page):
    path, report = page
    html = path.read_text(encoding="utf-8")
    data = _data(html)
    assert data == report  # the wsurgery.diff/1 JSON, as printed
    assert {c["name"] for c in data["changed"]} >= set(HOSTILE)
    for name in [*HOSTILE, "head.</b>.weight"]:
        assert name not in html  # only as escaped JSON
    # exactly two scripts (the data, the page's own), one style sheet, nothing fetched
    assert len(re.findall(r"<script\b", html)) == 2 and len(re.findall(r"<style\b", html)) == 1
    markup = html.replace(re.search(r'(?s)<script type="application/json".*?</script>', html).group(0), "")
    assert not re.search(r"<(link|img|iframe|object|embed|base)\b|\bsrc=|@import|url\((?!#)", markup)
    assert "default-src 'none'" in html
    assert data["modules"] and data["depth"] == 3  # the chart's rollup: the deepest depth with <= 64 modules


def test_report_library_to_html_and_save(pair, tmp_path):
    report = diff(*pair, by_module=2)
    html = report.to_html()
    assert _data(html) == report.to_dict() and html == render(report)
    out = tmp_path / "r.html"
    out.write_text("old")
    report.save_html(out)  # replaces an existing report, atomically
    assert _data(out.read_text(encoding="utf-8")) == report.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temporary left


def test_the_report_never_replaces_an_input_or_a_folder(pair, tmp_path, cli):
    a, b = pair
    before = a.read_bytes()
    code, _, err = cli("diff", a, b, "--html", a)
    assert code == 5 and "would replace an input" in err
    assert a.read_bytes() == before
    (tmp_path / "folder").mkdir()
    code, _, err = cli("diff", a, b, "--html", tmp_path / "folder")
    assert code in (2, 5), err  # click refuses a folder (dir_okay=False), or the library does


def test_html_with_quiet_writes_the_report_and_prints_nothing(pair, tmp_path, cli):
    out = tmp_path / "q.html"
    assert cli("diff", *pair, "--html", out, "--quiet") == (1, "", "")
    assert _data(out.read_text(encoding="utf-8"))["equal"] is False


# ------------------------------------------------------------------------ in a browser


class _Dom(HTMLParser):
    """The parts of a dumped DOM the tests read: table rows, chart bars, attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.bars = 0
        self.body: dict[str, str | None] = {}
        self.ids: set[str] = set()
        self.title = ""
        self._in_rows = self._in_td = self._in_title = False
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a
        elif tag == "title" and not self._in_rows and "svg" not in self._stack:
            self._in_title = True
        elif tag == "tbody" and a.get("id") == "rows":
            self._in_rows = True
        elif tag == "tr" and self._in_rows:
            self.rows.append([])
        elif tag == "td" and self._in_rows:
            self._in_td = True
            self.rows[-1].append("")
        elif tag == "rect" and "bar" in (a.get("class") or "").split():
            self.bars += 1
        if tag == "svg":
            self._stack.append("svg")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_rows = False
        elif tag == "td":
            self._in_td = False
        elif tag == "title":
            self._in_title = False
        elif tag == "svg" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._in_td:
            self.rows[-1][-1] += data
        elif self._in_title:
            self.title += data


@pytest.fixture(scope="module")
def chromium() -> str:
    binary, why = browser.usable()
    if binary is None:
        pytest.skip(why)
    return binary


def _open(chromium: str, path: Path, fragment: str = "") -> _Dom:
    dom = _Dom()
    dom.feed(browser.dump_dom(chromium, path.resolve().as_uri() + fragment))
    return dom


def _value(x) -> float:
    """A JSON statistic as a float: the strings "Infinity" / "NaN" parse too."""
    return float(x)


def test_chromium_renders_chart_and_every_changed_tensor(chromium, page):
    path, report = page
    dom = _open(chromium, path)
    assert dom.body.get("data-ready") == "1", "the page's script did not finish"
    assert "data-pwned" not in dom.body and dom.title == TITLE  # no name ran as code
    assert "module-chart" in dom.ids
    moved = [m for m in report["modules"] if m["rel_l2"] not in (None, 0.0)]
    assert dom.bars == len(moved) > LAYERS
    assert len(dom.rows) == len(report["changed"]) == int(dom.body["data-shown"])
    assert [r[0] for r in dom.rows] == [c["name"] for c in report["changed"]]  # the report's order
    assert set(HOSTILE) <= {r[0] for r in dom.rows}  # shown as text, as they are


def test_chromium_sorts_from_the_fragment(chromium, page):
    path, report = page
    by_rel = sorted(report["changed"], key=lambda c: _value(c["rel_l2"]), reverse=True)
    dom = _open(chromium, path, "#sort=rel_l2&order=desc")
    assert [r[0] for r in dom.rows] == [c["name"] for c in by_rel]
    assert dom.rows[0][8] == "inf"  # the NaN tensor: an unbounded rel_l2 first
    dom = _open(chromium, path, "#sort=name&order=asc&reason=value")
    names = [r[0] for r in dom.rows if r[0].startswith("layers.")]
    assert names == [f"layers.{i}.attn.weight" for i in range(LAYERS)]  # natural order: 2 before 10


def test_chromium_filters_from_the_fragment(chromium, page):
    path, report = page
    dom = _open(chromium, path, "#filter=LAYERS.1")  # case-insensitive substring
    want = [c["name"] for c in report["changed"] if "layers.1" in c["name"]]
    assert [r[0] for r in dom.rows] == want and len(want) == 3  # layers.1, .10, .11
    assert dom.body["data-shown"] == "3"
    dom = _open(chromium, path, "#filter=" + "%3C%2Fscript%3E")  # '</script>' typed into the box
    assert [r[0] for r in dom.rows] == [HOSTILE[0]]


def test_chromium_screenshot_is_not_blank(chromium, page, tmp_path):
    path, _ = page
    shot = browser.screenshot(chromium, path.resolve().as_uri(), tmp_path / "shot.png", size=(1000, 1200))
    rgb = browser.read_png(shot)[:, :, :3]
    covered, colours = browser.ink(shot)
    assert covered > 0.01 and colours > 16, (covered, colours)
    bar = (rgb == BAR_BLUE).all(axis=2).sum()
    assert bar > 100, "no chart bar in the screenshot"
