"""diff and check from the command line: output, JSON, --quiet, every exit code, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ..conftest import ROOT, run_module


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.fixture
def files(tmp_path):
    """A and B: one equal, one changed value, one shape change, one name on each side only."""
    a = {"same": rand(4, 4), "value": rand(8), "shape": rand(2, 3), "old": rand(1)}
    b = dict(a)
    b["value"] = a["value"].clone()
    b["value"][0] += 1
    b["shape"] = rand(3, 2)
    del b["old"]
    b["new"] = rand(2)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb


def test_diff_equal_exits_0_with_a_summary(fixtures, cli):
    code, out, err = cli("diff", fixtures / "tiny_lm.pt", fixtures / "tiny_lm_sharded")
    assert code == 0, err
    assert out.startswith("equal: 15 tensors agree")
    assert err == ""


def test_diff_different_exits_1_with_a_table_sorted_by_severity(files, cli):
    a, b = files
    code, out, err = cli("diff", a, b)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0].startswith("different: 2 changed, 1 only in A, 1 only in B, 1 same")
    body = "\n".join(lines[1:])
    assert body.index("shape ") < body.index("value ")  # shape before value
    assert "float32 (2, 3) | float32 (3, 2)" in out
    assert "1 (12.5%)" in out  # one of 8 elements
    assert f"only in A: {a} (1):" in out and "  old" in out
    assert f"only in B: {b} (1):" in out and "  new" in out


def test_diff_json_is_one_object_of_the_design_schema(files, cli):
    a, b = files
    code, out, err = cli("diff", a, b, "--json")
    assert code == 1, err
    (line,) = out.strip().splitlines()
    d = json.loads(line)
    assert d["schema"] == "wsurgery.diff/1"
    assert d["equal"] is False and d["same"] == 1
    assert d["only_in_a"] == ["old"] and d["only_in_b"] == ["new"]
    assert [c["name"] for c in d["changed"]] == ["shape", "value"]
    value = d["changed"][1]
    assert value["reason"] == "value" and value["mismatched"] == 1 and value["numel"] == 8
    assert value["a"] == {"dtype": "float32", "shape": [8], "alias_of": None}
    assert d["changed"][0]["mismatched"] is None  # no statistics across shapes
    assert err == ""


def test_diff_tolerance_and_filter_options(files, cli):
    a, b = files
    code, out, _ = cli("diff", a, b, "--filter", "value", "--atol", "1.5", "--json")
    assert code == 0 and json.loads(out)["same"] == 1
    code, out, _ = cli("diff", a, b, "--filter", "val*", "--rtol", "1e-9", "--json")
    assert code == 1 and json.loads(out)["changed"][0]["name"] == "value"


def test_quiet_prints_nothing(files, cli):
    a, b = files
    assert cli("diff", a, b, "--quiet") == (1, "", "")
    assert cli("diff", a, a, "-q") == (0, "", "")
    assert cli("check", a, "--src", "value", "--dst", "value", "--from", b, "--quiet") == (1, "", "")


def test_usage_errors_exit_2(files, cli):
    a, b = files
    code, _, err = cli("diff", a, b, "--atol", "-1")
    assert code == 2 and "--atol" in err
    code, _, err = cli("diff", a, b, "--atol", "inf")  # a tolerance must be finite
    assert code == 2 and "--atol must be finite" in err
    code, _, err = cli("check", a, "--src", "value", "--dst", "value", "--rtol", "inf")
    assert code == 2 and "--rtol must be finite" in err
    code, out, err = cli("diff", a, b, "--filter", "nothing.*", "--json")  # selects nothing: an unknown name
    assert code == 3 and "matches no tensor" in err
    assert json.loads(out)["error"]["exit_code"] == 3
    code, _, err = cli("diff", a, b, "--device", "tpu")
    assert code == 2 and "device" in err
    code, _, err = cli("diff", a, b, "--rtol", "nan")
    assert code == 2


def test_input_errors_exit_3_and_never_0(files, tmp_path, cli):
    a, _ = files
    code, out, err = cli("diff", a, tmp_path / "missing.safetensors", "--json")
    assert code == 3 and err.startswith("error: ") and "missing.safetensors" in err
    assert json.loads(out)["error"]["kind"] == "input"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    code, _, err = cli("diff", bad, a)
    assert code == 3 and "Traceback" not in err
    code, _, _ = cli("diff", a, bad, "--quiet")
    assert code == 3


def test_check_equal_and_different(fixtures, cli):
    ckpt = fixtures / "shared_storage.pt"
    code, out, err = cli("check", ckpt, "--src", "encoder.weight", "--dst", "decoder.weight", "-t", "transpose")
    assert code == 0, err
    assert out.startswith("equal: transpose(encoder.weight) vs decoder.weight: 1 pair, 128 elements")
    code, out, err = cli("check", ckpt, "--src", "encoder.weight", "--dst", "decoder.weight")
    assert code == 1, err
    assert "shape" in out and "float32 (16, 8) | float32 (8, 16)" in out


def test_check_json_modules_and_other(fixtures, tmp_path, cli):
    sd = torch.load(fixtures / "tiny_lm.pt", weights_only=True)
    other = {k.replace("layers.1.", "blk."): v.clone() for k, v in sd.items() if k.startswith("layers.1.")}
    other["blk.norm.weight"][3] = 2.0
    path = tmp_path / "other.safetensors"
    save_file(other, str(path))
    code, out, err = cli(
        "check", fixtures / "tiny_lm.safetensors", "--src", "layers.1", "--dst", "blk", "--from", path, "--json"
    )
    assert code == 1, err
    d = json.loads(out)
    assert d["schema"] == "wsurgery.check/1"
    assert d["equal"] is False and d["mismatched"] == 1 and d["max_abs_diff"] == 1.0
    assert d["numel"] == sum(t.numel() for t in other.values())
    assert len(d["pairs"]) == 6
    bad = [p for p in d["pairs"] if not p["equal"]]
    assert [(p["src"], p["dst"], p["reason"]) for p in bad] == [("layers.1.norm.weight", "blk.norm.weight", "value")]
    code, _, _ = cli(
        "check", fixtures / "tiny_lm.safetensors", "--src", "layers.1", "--dst", "blk", "--from", path, "--atol", "1"
    )
    assert code == 0


def test_check_errors_exit_3_and_4(fixtures, cli):
    st = fixtures / "tiny_lm.safetensors"
    code, _, err = cli("check", st, "--src", "embeding.weight", "--dst", "projection.weight")
    assert code == 3 and "embedding.weight" in err  # a close match is suggested
    code, _, err = cli("check", st, "--src", "embedding.weight", "--dst", "projection.weight", "-t", "permute(1,0,2)")
    assert code == 4 and "permute" in err
    code, out, _ = cli("check", st, "--src", "embedding.weight", "--dst", "nope", "--json")
    assert code == 3 and json.loads(out)["schema"] == "wsurgery.check/1"


def test_no_progress_bar_with_json_or_quiet(files, cli, monkeypatch):
    from wsurgery.cli import common

    made = []
    real = common.ByteProgress.__init__

    def spy(self, total, description, enabled=True):
        made.append((description, enabled, total))
        real(self, total, description, enabled)

    monkeypatch.setattr(common.ByteProgress, "__init__", spy)
    a, b = files
    cli("diff", a, b, "--json")
    cli("diff", a, b, "--quiet")
    cli("check", a, "--src", "same", "--dst", "same", "--json")
    assert [m[1] for m in made] == [False, False, False]
    cli("diff", a, b)
    assert made[-1][:2] == ("diff", True)
    assert made[-1][2] == 2 * 4 * (16 + 8)  # bytes of both sides of every pair compared


def test_diff_of_safetensors_does_not_import_torch(files, tmp_path):
    import wsurgery

    a, b = files
    w = torch.arange(12.0).reshape(4, 3)
    tied = tmp_path / "tied.safetensors"
    wsurgery.save_state_dict({"w": w, "t": w.t()}, tied)  # a transposed tie, computed with numpy
    untied = tmp_path / "untied.safetensors"
    save_file({"w": w, "t": w.t().contiguous() + 1}, str(untied))
    code = (
        "import sys\n"
        "from wsurgery.cli.app import app\n"
        "for args in sys.argv[1:]:\n"
        "    try:\n"
        "        app(['diff', *args.split('|'), '--json'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 1, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"{a}|{b}", f"{tied}|{untied}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    first, second, ok = proc.stdout.strip().splitlines()
    assert json.loads(first)["changed"][1]["name"] == "value"
    (t,) = json.loads(second)["changed"]
    assert (t["name"], t["reason"], t["mismatched"], t["max_abs_diff"]) == ("t", "alias", 12, 1.0)
    assert ok == "ok"


def test_subprocess_exit_codes(fixtures, files):
    a, b = files
    assert run_module("diff", fixtures / "tiny_lm.pt", fixtures / "tiny_lm.safetensors", "--quiet").returncode == 0
    proc = run_module("diff", a, b)
    assert proc.returncode == 1 and proc.stdout.startswith("different:")
    proc = run_module("diff", a, a.with_name("nope.safetensors"))
    assert proc.returncode == 3 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_diff_and_check_on_cuda(files, cli):
    a, b = files
    code, out, err = cli("diff", a, b, "--device", "cuda", "--json")
    assert code == 1, err
    assert [c["mismatched"] for c in json.loads(out)["changed"]] == [None, 1]
    code, out, err = cli("check", a, "--src", "value", "--dst", "value", "--from", b, "--device", "cuda:0", "--json")
    assert code == 1 and json.loads(out)["mismatched"] == 1, err


def test_the_command_line_and_the_library_agree_to_the_bit(tmp_path):
    """The command line passes its own tuning and starts numpy's BLAS on one thread; a
    library user with other threads gets the same report, cosine bits included."""
    import wsurgery

    g = torch.Generator().manual_seed(3)
    a = {"big": torch.randn(300_000, generator=g), "small": torch.randn(9000, generator=g)}
    b = {"big": a["big"] + 1e-3 * torch.randn(300_000, generator=g), "small": a["small"].clone()}
    b["small"][::97] += 1
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    want = wsurgery.diff(pa, pb).to_dict()
    for threads in ("1", "2"):
        proc = run_module("diff", pa, pb, "--json", env={"OPENBLAS_NUM_THREADS": threads})
        assert proc.returncode == 1, proc.stderr
        assert json.loads(proc.stdout) == want, threads
