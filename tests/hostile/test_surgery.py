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
from wsurgery.limits import MAX_NAME_LENGTH, MAX_TENSORS
from wsurgery.surgery import recipe as recipes
from wsurgery.surgery.patterns import PatternError, rename_all

from ..bounded import bounded


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
    assert float(seconds) < 10 and "too many values" in message  # 25 s and 384 MB before the bound
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


# ----------------------------------------------------------------------------- names a verb makes


def zero_byte_header(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors file of tensors without elements (shapes such as ``[10**9, 0]``)."""
    raw = json.dumps({n: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for n, s in shapes.items()}).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def test_unstack_of_a_billion_empty_slices_is_refused_before_anything_is_made(tmp_path):
    src = zero_byte_header(tmp_path / "big.safetensors", {"x.w": [10**9, 0], "y": [0]})
    r = bounded(cli=["unstack", src, "--src", "x.w", "--dst", "layers.{i}.w", "--dry-run"], timeout=30)
    assert r.returncode == 4, r.stderr
    assert (
        "unstack: x.w (1000000000, 0) along dim 0 (1,000,000,000 slices) would make a result of 1,000,000,001"
        in r.last_line
    )
    assert f"a result holds at most {MAX_TENSORS:,}" in r.last_line
    assert r.wall_s is not None and r.wall_s < 10 and r.peak_rss_mib is not None and r.peak_rss_mib < 600


def test_unstack_counts_every_tensor_under_a_prefix_and_the_length_of_the_names(tmp_path):
    half = MAX_TENSORS // 2 + 1
    src = zero_byte_header(tmp_path / "m.safetensors", {"s.a": [half, 0], "s.b": [half, 0], "t": [3, 0]})
    with wsurgery.open(src) as c:
        slices = (
            rf"unstack: s \(2 tensors\) along dim 0 \({2 * half:,} slices\) would make a result of {2 * half + 1:,}"
        )
        with pytest.raises(SurgeryError, match=slices):
            c.unstack("s", "l.{i}")
        long = "x" * (MAX_NAME_LENGTH - 2) + ".{i}"  # "x...x.2" fits; "x...x.12" is one character too long
        with pytest.raises(SurgeryError, match=f"would make a name of {MAX_NAME_LENGTH + 1:,} characters"):
            c.unstack("t", long.replace("{i}", "1{i}"), new=True)
        assert len(c.unstack("t", long, new=True).names()) == 5


def test_the_characters_an_unstack_makes_are_counted_without_writing_them_out():
    from wsurgery.surgery.fuse import _digits_below

    for n in [0, 1, 9, 10, 11, 99, 100, 101, 12345]:
        assert _digits_below(n) == sum(len(str(i)) for i in range(n))
    assert _digits_below(10**18) == 1 + sum(9 * 10 ** (w - 1) * w for w in range(1, 19))  # 0, then 1 .. 10**18 - 1


def test_copies_that_double_a_prefix_step_after_step_are_refused_when_they_pass_the_bound(tmp_path):
    src = tiny_header(tmp_path / "m.safetensors", ["m.w"])
    rec = tmp_path / "double.yaml"  # step k copies the 2**k tensors under m to m.ck: 2**24 names by the end
    rec.write_text("version: 1\nsteps:\n" + "".join(f"  - copy: {{src: m, dst: m.c{k}}}\n" for k in range(24)))
    code = f"""
import wsurgery
from wsurgery.errors import SurgeryError
from wsurgery.surgery import ops
ops.MAX_TENSORS = 4096  # the bound, lowered so the test is quick: 2**12 names pass, 2**13 do not
try:
    wsurgery.apply({str(rec)!r}, [{str(src)!r}], dry_run=True)
except SurgeryError as exc:
    print("\\n".join(p.message for p in exc.problems))
"""
    r = bounded(code=code, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "step 13 (copy, line 15): copy: m -> m.c12 (4,096 names, 4,096 new in this plan) would make a result of "
        "8,192 names; a result holds at most 4,096 (the input holds 4,096 names)"
    )
    assert len(lines) == 24 - 12 and r.wall_s is not None and r.wall_s < 30


def test_a_prefix_copied_to_many_destinations_is_counted_across_the_whole_plan(tmp_path):
    n, k = 1000, MAX_TENSORS // 1000 + 1  # 1,000 tensors to 263 prefixes: 263,000 new names
    zero_byte_header(tmp_path / "m.safetensors", {f"m.{i}": [0] for i in range(n)})
    code = f"""
import wsurgery
from wsurgery.errors import SurgeryError
with wsurgery.open({str(tmp_path / "m.safetensors")!r}) as c:
    try:
        c.copy(["m"] * {k}, [f"d{{j}}" for j in range({k})], new=True)
    except SurgeryError as exc:
        print(exc)
"""
    r = bounded(code=code, timeout=60)
    assert r.returncode == 0, r.stderr
    # refused at the 262nd destination, the first to pass the bound, before the others are paired
    assert f"m -> d261 ({n:,} names, {262 * n:,} new in this plan) would make a result of {263 * n:,} names" in r.stdout
    assert r.peak_rss_mib is not None and r.peak_rss_mib < 800


def test_split_and_stack_bound_the_names_they_make(tmp_path):
    src = zero_byte_header(tmp_path / "m.safetensors", {"e": [0], "l.0.w": [0], "l.1.w": [0]})
    with wsurgery.open(src) as c:
        pieces = rf"split: e \(0\) \({MAX_TENSORS + 1:,} pieces\) would make a result of {MAX_TENSORS + 3:,} names"
        with pytest.raises(SurgeryError, match=pieces):
            c.split("e", [f"p{i}" for i in range(MAX_TENSORS + 1)], 0, [0] * (MAX_TENSORS + 1), new=True)
        with pytest.raises(SurgeryError, match="stack: 'l.{i}.w' would make a name of"):
            c.stack("l.{i}.w", "s" * (MAX_NAME_LENGTH + 1), new=True)
        assert c.split("e", ["p", "q"], 0, [0, 0], new=True).shape_dtype("q")[0] == (0,)


def test_every_result_is_checked_against_the_bounds(tmp_path):
    from wsurgery.surgery.ops import NameBudget

    with wsurgery.open(tiny_header(tmp_path / "m.safetensors", ["a", "b"])) as c:
        budget = NameBudget(c)
        budget.check_result({f"n{i}": None for i in range(MAX_TENSORS)}, {}, "copy")  # type: ignore[misc]
        with pytest.raises(SurgeryError, match=f"copy: the result would make a result of {MAX_TENSORS + 1:,} names"):
            budget.check_result({f"n{i}": None for i in range(MAX_TENSORS + 1)}, {}, "copy")  # type: ignore[misc]
