"""Tensor names with dots, spaces, unicode, odd digits and great length work in every
command; a name that is both a tensor and a module prefix means the tensor."""

from __future__ import annotations

import json

import pytest
import torch

import wsurgery
from wsurgery.model import natural_key
from wsurgery.selectors import select

LONG = ".".join(f"block{i}" for i in range(700)) + ".weight"  # ~6,000 characters, 700 levels deep
NAMES = {
    "dots": "model.layers.0.self_attn.q_proj.weight",
    "space": "with space.and more spaces .weight",
    "unicode": "ünïcödé.权重.вес",
    "emoji": "emoji 🙂.bias",
    "digits": "layer¹.٣.x",  # a superscript digit, an Arabic-Indic digit
    "long": LONG,
    "quote": "quote'\"\\.weight",
    "glob": "glob*?[x].weight",
}


def weird_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(4, 3, generator=g) for name in NAMES.values()}


@pytest.fixture(params=["safetensors", "pt"])
def ckpt(request, tmp_path):
    sd = weird_state_dict()
    path = tmp_path / f"weird.{request.param}"
    if request.param == "pt":
        torch.save(sd, path)
    else:
        wsurgery.save_state_dict(sd, path)
    return path, sd


def names_of(report: dict) -> set[str]:
    return {t["name"] for t in report["tensors"]}


def test_inspect_lists_every_name_exactly(ckpt, cli):
    path, sd = ckpt
    code, stdout, stderr = cli("inspect", path, "--json")
    assert code == 0, stderr
    assert names_of(json.loads(stdout)) == set(sd)
    for args in (["--tree"], [], ["--filter", "*🙂*"]):
        code, stdout, stderr = cli("inspect", path, *args)
        assert code == 0, (args, stderr)
    assert "emoji 🙂" in stdout and "权重" not in stdout
    code, stdout, _ = cli("inspect", path, "--json", "--filter", "glob[*]*")
    assert names_of(json.loads(stdout)) == {NAMES["glob"]}


def test_inspect_tree_of_a_very_deep_name(ckpt, cli):
    path, _ = ckpt
    code, stdout, stderr = cli("inspect", path, "--tree", "--filter", "block0.*")
    assert code == 0, stderr


@pytest.mark.parametrize("shards", [None, "100B"])
def test_convert_round_trips_every_name(ckpt, cli, tmp_path, shards):
    path, sd = ckpt
    out = tmp_path / ("sharded" if shards else "out.safetensors")
    code, _, stderr = cli("convert", path, "-o", out, *(["--max-shard-size", shards] if shards else []))
    assert code == 0, stderr
    back = wsurgery.load_state_dict(out)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("src, dst", [("unicode", "emoji"), ("long", "space"), ("quote", "digits")])
def test_tie_copy_check_untie_with_odd_names(ckpt, cli, tmp_path, src, dst):
    path, sd = ckpt
    s, d = NAMES[src], NAMES[dst]
    tied = tmp_path / "tied.safetensors"
    code, stdout, stderr = cli("tie", path, "--src", s, "--dst", d, "-o", tied, "--json")
    assert code == 0, stderr
    c = wsurgery.load(tied)
    assert c.aliases[d].source == s and torch.equal(c.tensor(d), sd[s])

    code, stdout, stderr = cli("check", tied, "--src", s, "--dst", d, "--json")
    assert code == 0 and json.loads(stdout)["equal"] is True, stderr

    untied = tmp_path / "untied.safetensors"
    code, _, stderr = cli("untie", tied, "--dst", d, "-o", untied)
    assert code == 0, stderr
    assert d in wsurgery.load(untied).stored

    copied = tmp_path / "copied.safetensors"
    new = f"copy of {s}"
    code, _, stderr = cli("copy", path, "--src", s, "--dst", new, "--transform", "transpose", "-o", copied)
    assert code == 0, stderr
    assert torch.equal(wsurgery.load(copied).tensor(new), sd[s].t())


def test_diff_names_odd_tensors(ckpt, cli, tmp_path):
    path, sd = ckpt
    other = dict(sd)
    other[NAMES["emoji"]] = sd[NAMES["emoji"]] + 1
    b = tmp_path / "b.safetensors"
    wsurgery.save_state_dict(other, b)
    code, stdout, stderr = cli("diff", path, path, "--json")
    assert code == 0 and json.loads(stdout)["equal"] is True, stderr
    code, stdout, stderr = cli("diff", path, b, "--json")
    report = json.loads(stdout)
    assert code == 1 and [c["name"] for c in report["changed"]] == [NAMES["emoji"]], stderr
    code, stdout, _ = cli("diff", path, b)
    assert code == 1 and "emoji 🙂" in stdout


def test_odd_digit_names_sort_without_error():
    names = ["a¹", "a10", "a2", "a٣", "x²³", "b", "c" + "9" * 5000, "c" + "9" * 4999]
    # numbers are runs of ASCII digits; other digits sort as text; a 5000-digit run is fine
    assert sorted(names, key=natural_key) == ["a2", "a10", "a¹", "a٣", "b", "c" + "9" * 4999, "c" + "9" * 5000, "x²³"]


def test_odd_names_in_the_module_api(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("ünï", torch.nn.Linear(3, 3))

    from wsurgery import modules

    m = Odd()
    weights = modules.get_weights(m)
    assert set(weights) == {"ünï.weight", "ünï.bias"}


# --- a name that is both a tensor and a module prefix ----------------------------------------------


@pytest.fixture
def ambiguous(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {
        "a": torch.randn(2, 2, generator=g),
        "a.b": torch.randn(2, 2, generator=g),
        "a.c": torch.randn(2, 2, generator=g),
        "z": torch.randn(2, 2, generator=g),
    }
    path = tmp_path / "ambiguous.safetensors"
    wsurgery.save_state_dict(sd, path)
    return path, sd


def test_a_name_selects_the_tensor_before_the_module(ambiguous):
    path, _ = ambiguous
    c = wsurgery.load(path)
    assert select(c.names(), "a") == ["a"]
    assert select(c.names(), "a.") == ["a.b", "a.c"]


def test_tie_and_copy_take_the_tensor_not_the_module(ambiguous, cli, tmp_path):
    path, sd = ambiguous
    out = tmp_path / "tied.safetensors"
    code, stdout, stderr = cli("tie", path, "--src", "a", "--dst", "z", "-o", out, "--json")
    assert code == 0, stderr
    c = wsurgery.load(out)
    assert {n: a.source for n, a in c.aliases.items()} == {"z": "a"}
    out2 = tmp_path / "copied.safetensors"
    code, _, stderr = cli("copy", path, "--src", "a", "--dst", "new", "-o", out2)
    assert code == 0, stderr
    c2 = wsurgery.load(out2)
    assert "new" in c2 and "new.b" not in c2 and torch.equal(c2.tensor("new"), sd["a"])


@pytest.mark.parametrize("command", ["tie", "copy", "check"])
def test_help_says_a_tensor_wins_over_a_module_prefix(cli, command):
    code, stdout, _ = cli(command, "--help")
    assert code == 0
    assert "A name that is both a tensor and a prefix means the tensor" in " ".join(stdout.split())


def test_hostile_names_cannot_reach_the_terminal(tmp_path):
    """Control characters and rich markup in names or metadata are shown literally, escaped."""
    from safetensors.torch import save_file

    from tests.conftest import run_module

    evil = "emb\x1b[31m.[bold]weight\x07"
    path = tmp_path / "evil.safetensors"
    save_file({evil: torch.zeros(2, 2), "plain": torch.ones(2, 2)}, path, metadata={"note": "x\x1b]0;pwned\x07"})
    for args in (["inspect", path], ["inspect", path, "--tree"], ["diff", path, path]):
        r = run_module(*args)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    r = run_module("inspect", path)
    assert "emb\\x1b[31m.[bold]weight\\x07" in r.stdout
    r = run_module("tie", path, "--src", "plain", "--dst", "nope\x1b[2J", "-o", tmp_path / "o.safetensors")
    assert "\x1b" not in r.stdout + r.stderr
