"""Hostile input to the surgery verbs and recipes: stack indices, recipe size, names that
grow, regex backtracking and integers of any length. Each one that could take memory or
time runs in a child process under the suite's address-space limit and a timeout
(:mod:`tests.hostile`), so a regression fails its test instead of stalling the suite."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wsurgery
from wsurgery.errors import InputError, SurgeryError, UnknownNameError
from wsurgery.limits import MAX_NAME_LENGTH
from wsurgery.surgery import recipe as recipes
from wsurgery.surgery.patterns import PatternError, rename_all

from .hostile import bounded


def tiny_header(path: Path, names: list[str]) -> Path:
    """A safetensors file of one float32 element per name, written byte by byte (names
    safetensors' own writer would refuse are fine here)."""
    header, offset = {}, 0
    for n in names:
        header[n] = {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}
        offset += 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


# ----------------------------------------------------------------------------- stack indices


def test_stack_over_an_index_gap_is_refused_before_anything_is_allocated(tmp_path):
    src = tiny_header(tmp_path / "gap.safetensors", ["layers.0.w", "layers.9999999999.w"])
    r = bounded(cli=["stack", src, "--src", "layers.{i}.w", "--dst", "s", "--dry-run"], timeout=30)
    assert r.returncode == 4, r.stderr
    assert "has no i = 1 but has i = 9999999999" in r.last_line
    assert r.peak_rss_mib is not None and r.peak_rss_mib < 600


def test_a_layer_index_of_5001_digits_is_a_clear_error(tmp_path):
    src = tiny_header(tmp_path / "long.safetensors", ["layers.0.w", "layers." + "1" * 5001 + ".w"])
    r = bounded(cli=["stack", src, "--src", "layers.{i}.w", "--dst", "s", "--dry-run"], timeout=30)
    assert r.returncode == 4, r.stderr
    assert "(5,001 digits)" in r.last_line and "error: stack:" in r.last_line


def test_stack_out_of_range_dim_names_each_tensor_and_the_results_rank(tmp_path):
    sd = {f"layers.{i}.weight": torch.ones(2, 2) for i in range(2)}
    sd |= {f"layers.{i}.bias": torch.ones(2) for i in range(2)}
    sd |= {f"layers.{i}.norm.bias": torch.ones(2) for i in range(2)}
    save_file(sd, tmp_path / "m.safetensors")
    with wsurgery.open(tmp_path / "m.safetensors") as c, pytest.raises(SurgeryError) as info:
        c.stack("layers.{i}", "stacked", 2)
    lines = [p.message for p in info.value.problems]
    assert lines == [
        "stack: dim 2 is out of range for the result stacked.bias (2-d; dims -2 .. 1)",
        "stack: dim 2 is out of range for the result stacked.norm.bias (2-d; dims -2 .. 1)",
    ]


# ----------------------------------------------------------------------------- recipe size


def test_a_one_mebibyte_flow_list_is_refused_fast_in_little_memory(tmp_path):
    rec = tmp_path / "flow.yaml"
    rec.write_text("version: 1\nsteps: [" + ", ".join(["a"] * (1 << 19)) + "]\n")
    code = f"""
import time, sys
from wsurgery.errors import InputError
from wsurgery.surgery import recipe
t0 = time.monotonic()
try:
    recipe.load({str(rec)!r})
except InputError as exc:
    print(round(time.monotonic() - t0, 3), exc)
"""
    r = bounded(code=code, timeout=30)
    assert r.returncode == 0, r.stderr
    seconds, message = r.stdout.split(" ", 1)
    assert float(seconds) < 2.0 and "too many values" in message
    assert r.peak_rss_mib is not None and r.peak_rss_mib < 300


def test_an_alias_that_repeats_a_big_list_counts_at_its_size(tmp_path):
    items = ", ".join(["x"] * 1000)
    refs = ", ".join(["*a"] * 300)
    with pytest.raises(InputError, match="too many values"):
        recipes.load(f"version: 1\ndescription: [&a [{items}], {refs}]\nsteps: []\n")


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nsteps:\n  - stack: {src: 'l.{i}.w', dst: s, dim: " + "9" * 5000 + "}\n",
        "version: 0x" + "f" * 5000 + "\n",
        "version: " + ":".join(["59"] * 3000) + "\n",
        "version: 1\nsteps:\n  - split: {src: a, dsts: [b], dim: 0, sizes: [" + "1" * 4500 + "]}\n",
    ],
    ids=["dim", "hex-version", "sexagesimal-version", "size"],
)
def test_integers_of_thousands_of_digits_are_a_recipe_error(text):
    with pytest.raises(InputError, match=r"an integer of [\d,]+ digits; a recipe's numbers have at most 100"):
        recipes.load(text)


# ----------------------------------------------------------------------------- names that grow


def test_forty_doubling_renames_are_refused_quickly_even_as_a_dry_run(tmp_path):
    src = tiny_header(tmp_path / "m.safetensors", ["a" * 40 + "!", "b.w"])
    rec = tmp_path / "grow.yaml"
    rec.write_text("version: 1\nsteps:\n" + "  - rename: {pattern: '^(.*)$', to: '\\1\\1'}\n" * 40)
    r = bounded(cli=["apply", rec, src, "--dry-run"], timeout=30)
    assert r.returncode == 4, r.stderr
    assert f"would become longer than {MAX_NAME_LENGTH:,} characters" in r.last_line
    assert r.wall_s is not None and r.wall_s < 20


def test_rename_bounds_each_new_name_while_substituting():
    with pytest.raises(ValueError, match="longer than"):
        rename_all(["x" * 100], "", "y" * 100)  # an empty match at each of 101 places
    names, matched = rename_all(["module.a", "b"], r"^module\.", "")
    assert names == {"module.a": "a", "b": "b"} and matched


# ----------------------------------------------------------------------------- regex engine


def test_a_backtracking_pattern_runs_in_linear_time(tmp_path):
    src = tiny_header(tmp_path / "m.safetensors", ["a" * 40 + "!", "b.w"])
    r = bounded(cli=["rename", src, "^(a+)+$", "x", "--dry-run"], timeout=30)
    assert r.returncode == 3, r.stderr  # matches nothing: an unknown name, as every verb's selector
    assert "matches no name" in r.last_line


@pytest.mark.parametrize(
    "pattern",
    [r"(a)\1", r"(?=a)a", r"(?<!x)a", r"(?P<n>a)(?P=n)", r"(?>a)", "a++", r"a\Z"],
)
def test_patterns_that_need_backtracking_are_refused_with_the_reason(pattern):
    with pytest.raises(PatternError, match="RE2, the linear-time engine rename uses, has no backreferences"):
        rename_all(["a"], pattern, "b")


def test_replacements_follow_python_rules():
    names, _ = rename_all(["layers.3.w"], r"layers\.(?P<i>\d+)\.(w)", r"blocks.\g<i>.\2\\x")
    assert names == {"layers.3.w": "blocks.3.w\\x"}
    with pytest.raises(PatternError, match="group 2"):
        rename_all(["a"], "(a)", r"\2")
    with pytest.raises(PatternError, match="bad escape"):
        rename_all(["a"], "(a)", r"\q")


# ----------------------------------------------------------------------------- selectors


def test_cast_only_that_selects_nothing_is_an_unknown_name_with_close_matches(tmp_path):
    save_file({"conv1_BN.weight": torch.ones(2), "conv1.weight": torch.ones(2)}, tmp_path / "m.safetensors")
    with wsurgery.open(tmp_path / "m.safetensors") as c:
        with pytest.raises(UnknownNameError) as info:
            c.cast("bfloat16", only=["conv1_bn*"])
        assert "conv1_bn*" in str(info.value)
        with pytest.raises(UnknownNameError):
            c.cast("bfloat16", exclude=["nope"])
        assert c.cast("bfloat16", only=["conv1_BN*"]).stored["conv1_BN.weight"].dtype == "bfloat16"
    r = bounded(cli=["cast", tmp_path / "m.safetensors", "bfloat16", "--only", "conv1_bn*", "--dry-run"])
    assert r.returncode == 3, r.stderr


def test_drop_and_keep_and_untie_unknown_selectors_are_exit_3_like_tie(tmp_path):
    save_file({"a.w": torch.ones(2), "b.w": torch.ones(2)}, tmp_path / "m.safetensors")
    for args in (["drop", "a.ww"], ["keep", "a.ww"], ["untie", "--dst", "a.ww"]):
        r = bounded(cli=[args[0], tmp_path / "m.safetensors", *args[1:], "--dry-run"])
        assert r.returncode == 3 and "a.w" in r.last_line, (args, r.stderr)


def test_a_glob_source_of_one_tensor_ties_and_of_several_is_refused(tmp_path):
    save_file({"emb.weight": torch.ones(4, 2), "head.weight": torch.ones(4, 2), "x.w": torch.ones(4, 2)},
              tmp_path / "m.safetensors")  # fmt: skip
    with wsurgery.open(tmp_path / "m.safetensors") as c:
        assert c.tie("emb.w*", "head.weight").aliases["head.weight"].source == "emb.weight"
        with pytest.raises(SurgeryError, match="glob that selects 2 tensors"):
            c.copy("*.weight", "x.w")


def test_dropping_a_training_wrapper_drops_its_non_tensor_entries_from_left_out(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "optimizer_state": {"state": {0: {"step": 3}}}, "epoch": 3},
               tmp_path / "t.pt")  # fmt: skip
    with wsurgery.open(tmp_path / "t.pt") as c:
        assert any(s.startswith("optimizer_state") for s in c.skipped)
        assert not any(s.startswith("optimizer_state") for s in c.drop("optimizer_state").skipped)
        assert [s.split(":")[0] for s in c.keep(["w", "epoch"]).skipped] == ["epoch"]


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("where", ["~/.x.safetensors", "../../x.safetensors", "/tmp/abs.safetensors", "."])
def test_a_recipe_output_outside_its_folder_needs_an_explicit_output(tmp_path, where):
    save_file({"a.w": torch.ones(2)}, tmp_path / "m.safetensors")
    (tmp_path / "r").mkdir()
    rec = tmp_path / "r" / "rec.yaml"
    rec.write_text(f"version: 1\ninputs: {{m: ../m.safetensors}}\noutput: {{path: '{where}'}}\nsteps: []\n")
    with pytest.raises(SurgeryError, match="a recipe writes inside its own folder"):
        wsurgery.apply(rec)
    r = bounded(cli=["apply", rec])
    assert r.returncode == 4 and "writes inside its own folder" in r.last_line, r.stderr
    result = wsurgery.apply(rec, out=tmp_path / "explicit.safetensors")
    assert result.output == str(tmp_path / "explicit.safetensors") and (tmp_path / "explicit.safetensors").exists()
    inside = tmp_path / "r" / "rec2.yaml"
    inside.write_text("version: 1\ninputs: {m: ../m.safetensors}\noutput: {path: sub/../o.safetensors}\nsteps: []\n")
    assert Path(wsurgery.apply(inside).output).resolve() == (tmp_path / "r" / "o.safetensors").resolve()


def test_every_refused_step_is_reported_and_carried(tmp_path):
    save_file({"a.w": torch.ones(2, 3), "b.w": torch.ones(2, 3)}, tmp_path / "m.safetensors")
    text = (
        "version: 1\nsteps:\n  - drop: nope\n  - rename: {pattern: '^a', to: c}\n"
        "  - drop: a.w\n  - cast: {dtype: bfloat16, only: 'zz*'}\n"
    )
    with pytest.raises(SurgeryError) as info:
        wsurgery.apply(text, [tmp_path / "m.safetensors"], dry_run=True)
    heads = [p.message.split(":", 1)[0] for p in info.value.problems]
    # step 3 runs on the names after step 2 (a.w is c.w by then), so it is refused too
    assert heads == ["step 1 (drop, line 3)", "step 3 (drop, line 5)", "step 4 (cast, line 6)"]


def test_verify_ties_compares_like_isclose_with_nan_equal(tmp_path):
    nan = float("nan")
    save_file({"a": torch.tensor([1.0, nan, 3.0]), "b": torch.tensor([1.0, nan, 3.0 + 1e-6]),
               "c": torch.tensor([1.0, 2.0, 3.0])}, tmp_path / "m.safetensors")  # fmt: skip
    from wsurgery.surgery import verify_ties

    with wsurgery.open(tmp_path / "m.safetensors") as c:
        verify_ties(c, "a", "b", atol=1e-5)
        with pytest.raises(SurgeryError, match=r"1 of 3 elements differ"):
            verify_ties(c, "a", "b")
        with pytest.raises(SurgeryError, match=r"1 of 3 elements differ, max \|a-b\| inf"):
            verify_ties(c, "a", "c", atol=1.0)
