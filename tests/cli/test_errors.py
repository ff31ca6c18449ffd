"""How the command line reports: one error line with one hint, every problem in the JSON
error object, ``--quiet`` writers, and plan tables that name what they changed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import wsurgery


def _model(tmp_path: Path, n: int = 40) -> Path:
    """``a.{i}.w`` and ``b.{i}.w``, each of shape (4,), seeded."""
    g = torch.Generator().manual_seed(0)
    sd = {f"{side}.{i}.w": torch.randn(4, generator=g) for side in "ab" for i in range(n)}
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict(sd, path)
    return path


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_json_error_carries_every_problem_while_the_terminal_shows_five_and_a_count(tmp_path, cli):
    path = _model(tmp_path)
    args = ("tie", path, "--src", "a", "--dst", "b", "-t", "transpose(0,1)", "-o", tmp_path / "o.safetensors")
    code, out, err = cli(*args, "--json")
    assert code == 4
    error = json.loads(out)["error"]
    assert error["exit_code"] == 4 and len(error["problems"]) == 40
    names = {f"{side}.{i}.w" for side in "ab" for i in range(40)}
    assert {p["name"] for p in error["problems"]} <= names | {None}  # the name when the problem has one
    assert all(p["step"] is None for p in error["problems"])
    assert all(f"a.{i}.w" in error["problems"][i]["message"] for i in range(40))  # none cut, in order
    line = err.strip()
    assert "\n" not in line and "40 problems:" in line and "and 35 more" in line
    assert not (tmp_path / "o.safetensors").exists()


def test_a_recipe_error_names_its_step_in_json_and_has_one_hint_on_the_terminal(tmp_path, cli):
    path = _model(tmp_path, n=2)
    rec = _recipe(
        tmp_path,
        """
        version: 1
        steps:
          - drop: [a.0.w]
          - tie: {src: a.1.ww, dst: b.1.w}
        """,
    )
    code, out, err = cli("apply", rec, path, "-o", tmp_path / "o.safetensors")
    assert code in (3, 4), err  # an unknown name (3), or the recipe's refusal (4)
    assert err.count("(hint:") == 1 and "did you mean a.1.w" in err and "nothing was written" in err
    code, out, _ = cli("apply", rec, path, "-o", tmp_path / "o.safetensors", "--json")
    (problem,) = json.loads(out)["error"]["problems"]
    assert problem["step"] == 2 and problem["name"] == "a.1.ww" and "a.1.ww" in problem["message"]
    assert not (tmp_path / "o.safetensors").exists()


def test_quiet_writers_print_nothing_and_still_write(tmp_path, cli):
    path = _model(tmp_path, n=2)
    out = tmp_path / "o.safetensors"
    code, stdout, stderr = cli("rename", path, "^a[.]", "x.", "-o", out, "--quiet")
    assert code == 0 and stdout == "" and stderr == ""
    assert sorted(wsurgery.load_state_dict(out)) == ["b.0.w", "b.1.w", "x.0.w", "x.1.w"]
    code, stdout, _ = cli("cast", path, "bfloat16", "-o", tmp_path / "c.safetensors", "-q")
    assert code == 0 and stdout == ""
    code, stdout, stderr = cli("rename", path, "^a[.]", "x.", "-o", out, "--quiet")  # exists: the error still shows
    assert code == 5 and stdout == "" and stderr.startswith("error: ")


def test_rename_plan_shows_the_old_name_under_from(tmp_path, cli):
    path = _model(tmp_path, n=1)
    code, stdout, _ = cli("rename", path, "^a[.]", "x.", "-n")
    assert code == 0
    row = next(line.split() for line in stdout.splitlines() if line.startswith("rename"))
    assert row[:3] == ["rename", "x.0.w", "a.0.w"]


def test_a_problem_fix_is_data_in_the_library_and_flags_on_the_command_line(tmp_path, cli):
    """One rendering path: the library's error says what is wrong and carries the fix as
    data (``suggest``); only the command line words it, with its own flag."""
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "m.safetensors"
    wsurgery.save_state_dict({"enc.weight": torch.randn(3, 4, generator=g), "dec.weight": torch.randn(4, 3)}, path)
    with wsurgery.open(path) as c, pytest.raises(wsurgery.SurgeryError) as info:
        c.tie("enc.weight", "dec.weight")
    assert info.value.problems[0].suggest == ("transpose",)
    assert "--" not in str(info.value) and "--" not in (info.value.hint or "")
    code, _, err = cli("tie", path, "--src", "enc.weight", "--dst", "dec.weight", "-o", tmp_path / "o.safetensors")
    assert code == 4 and err.count("\n") == 1 and err.count("(hint: try --transform transpose") == 1
