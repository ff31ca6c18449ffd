"""What the command line prints: complete or a failure, escaped, bounded, never a crash on
names that are only unusual."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import wsurgery
from tests.conftest import run_module


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Two checkpoints of 3000 tiny tensors that differ everywhere: every report is large."""
    folder = tmp_path_factory.mktemp("many")
    wsurgery.save_state_dict({f"layer.{i}.weight": torch.zeros(1) for i in range(3000)}, folder / "a.safetensors")
    wsurgery.save_state_dict({f"layer.{i}.weight": torch.ones(1) for i in range(3000)}, folder / "b.safetensors")
    return folder


def _limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{a}", "--json"],
        ["inspect", "{a}"],
        ["inspect", "{a}", "--tree"],
        ["diff", "{a}", "{b}", "--json"],
        ["diff", "{a}", "{b}"],
    ],
    ids=lambda a: " ".join(a),
)
def test_standard_output_is_complete_or_the_command_fails_with_one_line(many, tmp_path, args):
    """PYTHONUNBUFFERED=1 and a file-size limit: the raw write is cut short. It used to be
    ignored (exit 0, a truncated report); now it is exit 5 with exactly one error line."""
    argv = [a.format(a=many / "a.safetensors", b=many / "b.safetensors") for a in args]
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    with open(out, "wb") as f:
        r = subprocess.run(
            [sys.executable, "-m", "wsurgery", *argv],
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_limited(20_000),
            timeout=120,
        )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 5, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to standard output")
    assert "Traceback" not in r.stderr


def test_names_that_look_like_tree_keys_do_not_crash_the_tree(tmp_path, cli):
    """A tensor named `x.name` (or `x.alias_of`) used to be exit 70 in `inspect --tree`."""
    sd = {"x.name": torch.zeros(2), "x.alias_of": torch.zeros(3), "x": torch.zeros(1), "x.y.numel": torch.zeros(4)}
    wsurgery.save_state_dict(sd, tmp_path / "m.safetensors")
    code, out, err = cli("inspect", tmp_path / "m.safetensors", "--tree")
    assert code == 0, err
    assert "name  float32 (2)" in out and "alias_of  float32 (3)" in out and "numel  float32 (4)" in out
    assert out.splitlines()[0].endswith("10 params")


def test_bidirectional_controls_in_names_are_escaped(tmp_path, cli):
    name = "safe.\u202egnp.exe\u2066x\u2028y"
    wsurgery.save_state_dict({name: torch.zeros(1)}, tmp_path / "m.safetensors")
    for args in ([], ["--tree"]):
        code, out, _ = cli("inspect", tmp_path / "m.safetensors", *args)
        assert code == 0
        assert "\\u202e" in out and "\\u2066" in out and "\\u2028" in out
        assert not any(c in out for c in "\u202e\u2066\u2028")


def test_absurdly_long_names_and_values_are_shortened_in_human_output_only(tmp_path):
    long = "n" * 2_000_000
    wsurgery.save_state_dict(
        {long: torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "m.safetensors", {"note": "v" * 2_000_000}
    )
    for args in ([], ["--tree"]):
        r = run_module("inspect", tmp_path / "m.safetensors", *args, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "characters]" in r.stdout and len(r.stdout) < 20_000
    r = run_module("inspect", tmp_path / "m.safetensors", "--json", timeout=60)
    assert long in {t["name"] for t in json.loads(r.stdout)["tensors"]}


def test_an_input_click_thinks_unreadable_is_wsurgerys_to_judge(tmp_path, cli, monkeypatch):
    """click used to refuse it first (exit 2, "not readable"); an input problem is exit 3."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    for args in (["inspect", bad], ["diff", bad, bad], ["convert", bad, "-o", tmp_path / "o.safetensors"]):
        code, _, err = cli(*args)
        assert code == 3, (args, err)


def test_inspect_filter_is_the_one_selector_and_totals_are_of_what_is_shown(fixtures, cli):
    code, _, err = cli("inspect", fixtures / "tiny_lm.safetensors", "--filter", "nope.*")
    assert code == 3 and "'nope.*' matches no tensor" in err  # selecting nothing: exit 3, as everywhere
    code, _, err = cli("inspect", fixtures / "tiny_lm.safetensors", "--filter", "embeding.weight")
    assert code == 3 and "did you mean embedding.weight" in err
    code, out, _ = cli("inspect", fixtures / "tiny_lm.safetensors", "--filter", "layers.0", "--json")
    assert len(json.loads(out)["tensors"]) == 6  # a module prefix
    code, out, _ = cli("inspect", fixtures / "tiny_lm.safetensors", "--filter", "layers.0.*", "--json")
    report = json.loads(out)
    shown = [t for t in report["tensors"] if t["alias_of"] is None]
    assert report["total_bytes"] == sum(t["nbytes"] for t in shown) and len(report["tensors"]) == 6
