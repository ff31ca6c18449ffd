"""diff and check from the command line: --max-rel-l2, --min-cosine, --ignore-ties,
--by-module, --chart, the rel l2 column, the JSON of non-finite values, and usage errors
under --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import wsurgery

from ..conftest import ROOT, run_module


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def strict_json(text: str) -> dict:
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def drifted(tmp_path):
    """40 layers whose attention weights moved by about 1e-3 relative; norms untouched;
    one NaN in ``bad.weight`` of B."""
    a, b = {}, {}
    for i in range(40):
        w = rand(16, 8, seed=i)
        a[f"layers.{i}.attn.weight"] = w
        b[f"layers.{i}.attn.weight"] = w + 1e-3 * rand(16, 8, seed=100 + i)
        a[f"layers.{i}.norm.weight"] = b[f"layers.{i}.norm.weight"] = torch.ones(8)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb


@pytest.fixture
def nan_pair(tmp_path):
    pa, pb = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    save_file({"w": torch.tensor([1.0, 2.0]), "z": torch.zeros(2)}, str(pa))
    save_file({"w": torch.tensor([float("nan"), 2.0]), "z": torch.tensor([0.0, 1.0])}, str(pb))
    return pa, pb


def test_rel_l2_is_a_column_and_a_json_field(drifted, cli):
    a, b = drifted
    code, out, err = cli("diff", a, b, "--filter", "layers.1.*")
    assert code == 1, err
    assert "rel l2" in out.splitlines()[1]
    code, out, _ = cli("diff", a, b, "--json")
    d = strict_json(out)
    rels = [c["rel_l2"] for c in d["changed"]]
    assert len(rels) == 40 and all(5e-4 < r < 2e-3 for r in rels)
    assert d["max_rel_l2"] is None and d["min_cosine"] is None and d["ignore_ties"] is False
    assert "modules" not in d  # only with --by-module (or --html)


def test_thresholds_on_the_command_line(drifted, cli):
    a, b = drifted
    assert cli("diff", a, b, "--max-rel-l2", "1e-2", "--quiet")[0] == 0
    assert cli("diff", a, b, "--max-rel-l2", "1e-5", "--quiet")[0] == 1
    assert cli("diff", a, b, "--min-cosine", "0.9999", "--quiet")[0] == 0
    assert cli("diff", a, b, "--min-cosine", "1", "--quiet")[0] == 1
    # every stated criterion must hold
    assert cli("diff", a, b, "--max-rel-l2", "1e-2", "--min-cosine", "1", "--quiet")[0] == 1
    assert cli("diff", a, b, "--max-rel-l2", "1e-2", "--atol", "1e-6", "--quiet")[0] == 1
    assert cli("diff", a, b, "--max-rel-l2", "1e-2", "--atol", "1", "--quiet")[0] == 0
    code, out, _ = cli("diff", a, b, "--max-rel-l2", "1e-2")
    assert code == 0 and out.startswith("equal: 80 tensors agree (max_rel_l2 0.01)")
    code, out, _ = cli("diff", a, b, "--max-rel-l2", "1e-2", "--json")
    assert strict_json(out)["max_rel_l2"] == 1e-2


def test_check_thresholds(drifted, cli):
    a, b = drifted
    args = ("check", a, "--src", "layers.3", "--dst", "layers.3", "--from", b)
    code, out, _ = cli(*args)
    assert code == 1 and "rel l2" in out
    code, out, _ = cli(*args, "--max-rel-l2", "1e-2")
    assert code == 0 and "rel l2 " in out and "(max_rel_l2 0.01)" in out
    assert cli(*args, "--min-cosine", "0.99999999", "--quiet")[0] == 1
    code, out, _ = cli(*args, "--min-cosine", "0.999", "--json")
    d = strict_json(out)
    assert code == 0 and d["equal"] and d["min_cosine"] == 0.999 and 0 < d["rel_l2"] < 1e-2


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--max-rel-l2", "-1"], "--max-rel-l2"),
        (["--max-rel-l2", "inf"], "--max-rel-l2"),
        (["--min-cosine", "2"], "--min-cosine"),
        (["--by-module", "0"], "--by-module"),
        (["--by-module", "deep"], "--by-module"),
        (["--max-rel-l2", "x"], "--max-rel-l2"),  # click: not a float
        (["--atol", "-1"], "--atol"),  # click: out of range
    ],
)
def test_bad_values_are_usage_errors_with_a_json_object(drifted, args, flag):
    a, b = drifted
    proc = run_module("diff", a, b, *args)
    assert proc.returncode == 2 and flag in proc.stderr and proc.stderr.startswith("error: ")
    assert proc.stdout == ""
    proc = run_module("diff", a, b, *args, "--json")  # click's own errors too (they bypass commands)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    d = strict_json(proc.stdout)
    assert d["schema"] == "wsurgery.diff/1" and d["error"]["kind"] == "usage" and d["error"]["exit_code"] == 2
    assert flag in d["error"]["message"]


def test_usage_errors_of_click_under_json(drifted):
    a, _ = drifted
    proc = run_module("diff", a, "--json")  # a missing argument
    assert proc.returncode == 2 and "Missing argument" in strict_json(proc.stdout)["error"]["message"]
    proc = run_module("check", a, "--src", "x", "--json")  # a missing option
    assert proc.returncode == 2 and strict_json(proc.stdout)["schema"] == "wsurgery.check/1"
    proc = run_module("nosuch", "--json")
    assert proc.returncode == 2 and strict_json(proc.stdout)["schema"] == "wsurgery.error/1"
    proc = run_module("diff", a, "--", "--json")  # after "--", --json is an argument: B
    assert proc.returncode == 3 and proc.stdout == "" and "--json: no such file" in proc.stderr


def test_by_module_table_and_json(drifted, cli):
    a, b = drifted
    code, out, err = cli("diff", a, b, "--by-module", "2", "--filter", "layers.[12]*")
    assert code == 1, err
    lines = out.splitlines()
    start = lines.index("by module (depth 2):")
    assert lines[start + 1].split()[:3] == ["module", "tensors", "changed"]
    modules = [line.split()[0] for line in lines[start + 2 :] if line.startswith("layers.")]
    assert modules[:4] == ["layers.1", "layers.2", "layers.10", "layers.11"]  # natural order
    code, out, _ = cli("diff", a, b, "--by-module", "2", "--json")
    d = strict_json(out)
    assert d["depth"] == 2 and len(d["modules"]) == 40
    m = d["modules"][0]
    assert (m["name"], m["tensors"], m["changed"]) == ("layers.0", 2, 1)
    assert 0 < m["rel_l2"] < d["changed"][0]["rel_l2"] * 10 and m["cosine"] > 0.999
    code, out, _ = cli("diff", a, b, "--by-module", "auto", "--json")
    assert strict_json(out)["depth"] == 2  # depth 3 would give 80 modules (layers.i.attn, .norm): over 64
    code, out, _ = cli("diff", a, a, "--by-module", "1")
    assert code == 0 and "by module (depth 1):" in out  # asked for: shown even when equal


def test_the_default_view_rolls_up_when_many_tensors_change(drifted, cli, tmp_path):
    a, b = drifted
    code, out, _ = cli("diff", a, b)  # 40 changed: more than 32
    assert code == 1 and "by module (depth 2):" in out  # layers.i: the deepest with <= 64 modules
    assert "rel_l2 by module" not in out  # no chart in a pipe
    code, out, _ = cli("diff", a, b, "--filter", "layers.1*")  # 11 changed
    assert code == 1 and "by module" not in out


def test_chart_is_drawn_when_asked_and_fits(drifted, cli):
    from wsurgery.cli.diff import chart_lines

    a, b = drifted
    code, out, _ = cli("diff", a, b, "--by-module", "2", "--chart")
    lines = out.splitlines()
    start = lines.index("rel_l2 by module (depth 2, layer order):")
    bars = lines[start + 1 : start + 41]
    assert [line.split()[0] for line in bars] == [f"layers.{i}" for i in range(40)]
    assert all("█" in line for line in bars)
    code, out, _ = cli("diff", a, b, "--by-module", "2", "--no-chart")
    assert "rel_l2 by module" not in out
    code, out, _ = cli("diff", a, b, "--chart", "--filter", "layers.1*")  # few changed: --chart rolls up
    assert "rel_l2 by module (depth 3, layer order):" in out  # auto: 22 modules at depth 3
    report = wsurgery.diff(a, b, by_module=2)
    for width in (40, 80, 200):
        lines = chart_lines(report.modules, width)
        assert max(len(line) for line in lines) <= max(width, 8 + 10 + 12)
    plain = chart_lines(report.modules, 80, unicode=False)
    assert all(set(line) <= set("layers.0123456789 #e-") for line in plain)


def test_chart_on_a_terminal_by_default(drifted, monkeypatch, capsys):
    """On a terminal (not a pipe) the chart comes with the module table."""
    from wsurgery.cli import common, diff

    a, b = drifted
    real = common.console

    def terminal(stderr=False, rich=False):
        con = real(stderr, rich=rich)
        con._force_terminal = True  # rich's own switch: is_terminal is then true
        return con

    monkeypatch.setattr(diff, "console", terminal)
    code = diff.diff.__wrapped__(a, b, by_module="2")
    assert code == 1
    assert "rel_l2 by module (depth 2, layer order):" in capsys.readouterr().out


def test_ignore_ties_on_the_command_line(tmp_path, cli):
    emb = rand(8, 4)
    tied, untied = tmp_path / "tied.safetensors", tmp_path / "untied.safetensors"
    wsurgery.save_state_dict({"embed.weight": emb, "head.weight": emb}, tied)
    save_file({"embed.weight": emb, "head.weight": emb.clone()}, str(untied))
    code, out, _ = cli("diff", tied, untied)
    assert code == 1 and "alias" in out
    code, out, _ = cli("diff", tied, untied, "--ignore-ties")
    assert code == 0 and out.startswith("equal: 2 tensors agree (atol 0, rtol 0, ties ignored)")
    code, out, _ = cli("diff", tied, untied, "--ignore-ties", "--json")
    assert strict_json(out)["ignore_ties"] is True


def test_non_finite_values_in_json_are_strings(nan_pair, cli):
    a, b = nan_pair
    code, out, _ = cli("diff", a, b, "--json", "--by-module", "1")
    d = strict_json(out)
    w = next(c for c in d["changed"] if c["name"] == "w")
    assert (w["max_abs_diff"], w["max_rel_diff"], w["rel_l2"]) == ("Infinity", "Infinity", "Infinity")
    z = next(c for c in d["changed"] if c["name"] == "z")
    assert z["rel_l2"] == "Infinity" and z["cosine"] is None  # ||a|| == 0: no cosine, infinite rel_l2
    assert d["modules"][0]["rel_l2"] == "Infinity"
    code, out, _ = cli("check", a, "--src", "w", "--dst", "w", "--from", b, "--json")
    d = strict_json(out)
    assert d["max_abs_diff"] == "Infinity" and d["rel_l2"] == "Infinity" and d["pairs"][0]["rel_l2"] == "Infinity"
    code, out, _ = cli("diff", a, b)
    assert " inf " in out  # the table says inf


def test_new_options_keep_a_safetensors_diff_free_of_torch(drifted, tmp_path):
    a, b = drifted
    html = tmp_path / "r.html"
    code = (
        "import sys\n"
        "from wsurgery.cli.app import app\n"
        "args = sys.argv[1:]\n"
        "try:\n"
        "    app(['diff', *args, '--json'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    args = [str(a), str(b), "--max-rel-l2", "1e-2", "--min-cosine", "0.99", "--by-module", "2", "--html", str(html)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--ignore-ties"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    first, ok = proc.stdout.strip().splitlines()
    assert strict_json(first)["equal"] is True and ok == "ok" and html.exists()


def test_the_command_line_and_the_library_agree_on_drift(drifted):
    a, b = drifted
    want = wsurgery.diff(a, b, by_module=2, max_rel_l2=1e-3).to_dict()
    for threads in ("1", "2"):
        proc = run_module(
            "diff", a, b, "--by-module", "2", "--max-rel-l2", "1e-3", "--json", env={"OPENBLAS_NUM_THREADS": threads}
        )
        assert strict_json(proc.stdout) == want, threads


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback interface 'lo'")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_two_ranks_report_the_drift_of_one_process(drifted, tmp_path):
    """Under two ranks the compare jobs and the norms of the untouched tensors are split by
    bytes; rank 0 prints the report one process prints, rollup and thresholds included,
    and the HTML report is the same."""
    from ..distributed.test_scale_out import launch

    a, b = drifted
    args = ["diff", str(a), str(b), "--by-module", "2", "--max-rel-l2", "1e-3", "--json"]
    one = run_module(*args, "--html", tmp_path / "one.html")
    ranks = launch([sys.executable, "-m", "wsurgery", *args, "--html", str(tmp_path / "two.html")])
    assert [r["code"] for r in ranks] == [one.returncode] * 2, [r["stderr"][-2000:] for r in ranks]
    assert ranks[1]["stdout"] == "" and ranks[1]["stderr"] == ""
    want = strict_json(one.stdout)
    assert strict_json(ranks[0]["stdout"]) == want
    assert all(0 < m["rel_l2"] for m in want["modules"])  # the untouched norms are in ||A||
    assert (tmp_path / "one.html").read_text() == (tmp_path / "two.html").read_text()
