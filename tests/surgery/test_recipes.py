"""Recipes (``wsurgery apply`` / ``wsurgery.apply``, schema ``wsurgery.recipe/1``): every step
kind, expectations, validation with step numbers and lines, inputs and their overrides,
dry runs, JSON, nothing written on failure, and the shipped examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import wsurgery
from wsurgery.errors import InputError, SurgeryError, UsageError
from wsurgery.io.safetensors import SafetensorsFile
from wsurgery.surgery import recipe as recipes

from ..conftest import FIXTURES, ROOT, sha256

EXAMPLES = ROOT / "examples" / "recipes"

# ----------------------------------------------------------------------------- factories


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model_sd() -> dict[str, torch.Tensor]:
    """A small DDP-style state dict: q/k/v per layer, a head stored twice with the
    embedding's values, an int buffer and optimizer moments."""
    sd = {"module.embed.weight": rand(10, 4, seed=1), "module.norm.weight": rand(4, seed=2)}
    sd["module.head.weight"] = sd["module.embed.weight"].clone()
    for i in range(2):
        for j, p in enumerate("qkv"):
            sd[f"module.layers.{i}.{p}.weight"] = rand(4, 4, seed=10 * i + j)
        sd[f"module.layers.{i}.fc.weight"] = rand(8, 4, seed=40 + i)
    sd["module.steps"] = torch.tensor([7], dtype=torch.int64)
    sd["optimizer.m.embed"] = rand(10, 4, seed=99)
    return sd


def model(tmp_path: Path, name: str = "m.safetensors", sd=None, aliases=None) -> Path:
    path = tmp_path / name
    wsurgery.save_state_dict(model_sd() if sd is None else sd, path, aliases=aliases)
    return path


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def loaded(path: Path) -> dict[str, torch.Tensor]:
    return wsurgery.load_state_dict(path)


def problems_of(fn, *args, **kwargs) -> list[str]:
    with pytest.raises(SurgeryError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return [p.message for p in info.value.problems]


def snapshot(*paths: Path) -> dict:
    """Hashes of files and of every file under folders, to prove nothing changed."""
    out = {}
    for p in paths:
        for f in [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()):
            out[str(f)] = sha256(f)
        if p.is_dir():
            out[f"{p}/"] = sorted(os.listdir(p))
    return out


# ----------------------------------------------------------------------------- every step kind

SD = model_sd()
PLAIN = {k.removeprefix("module."): v for k, v in SD.items() if k.startswith("module.")}


def _check_rename(out, result):
    assert set(out) == set(PLAIN) | {"optimizer.m.embed"}
    assert torch.equal(out["layers.1.fc.weight"], PLAIN["layers.1.fc.weight"])


def _check_drop(out, result):
    assert not any(n.startswith("optimizer.") or n.endswith(".fc.weight") for n in out)


def _check_keep(out, result):
    assert set(out) == {"module.layers.0.q.weight", "module.layers.0.k.weight", "module.layers.0.v.weight"}


def _check_cast(out, result):
    assert out["module.embed.weight"].dtype == torch.bfloat16
    assert out["module.norm.weight"].dtype == torch.float32  # except
    assert out["module.layers.0.q.weight"].dtype == torch.float32  # not in only
    assert out["module.steps"].dtype == torch.int64  # never cast
    assert torch.equal(out["module.embed.weight"], SD["module.embed.weight"].to(torch.bfloat16))


def _check_copy(out, result):
    assert torch.equal(out["module.layers.2.fc.weight"], SD["module.layers.0.fc.weight"].t() * 2)
    assert torch.equal(out["module.layers.2.q.weight"], SD["module.layers.0.q.weight"].t() * 2)


def _check_tie(out, result):
    assert result.checkpoint.aliases["module.head.weight"].source == "module.embed.weight"
    assert out["module.head.weight"].data_ptr() == out["module.embed.weight"].data_ptr()
    assert result.verified == 1


def _check_tie_transform(out, result):
    assert result.checkpoint.aliases["module.fc_t"].specs == ["transpose"]
    assert torch.equal(out["module.fc_t"], SD["module.layers.1.fc.weight"].t())


def _check_untie(out, result):
    assert not result.checkpoint.aliases
    assert torch.equal(out["module.fc_t"], SD["module.layers.0.fc.weight"].t())


def _check_concat(out, result):
    want = torch.cat([SD[f"module.layers.0.{p}.weight"] for p in "qkv"], 1)
    assert torch.equal(out["module.layers.0.qkv.weight"], want)
    assert "module.layers.0.q.weight" not in out  # concat moves


def _check_split(out, result):
    w = SD["module.layers.1.fc.weight"]
    assert torch.equal(out["module.layers.1.up.weight"], w[:3]) and torch.equal(
        out["module.layers.1.gate.weight"], w[3:]
    )
    assert "module.layers.1.fc.weight" not in out


def _check_stack(out, result):
    want = torch.stack([SD[f"module.layers.{i}.fc.weight"] for i in range(2)], 0)
    assert torch.equal(out["module.fc.weight"], want)


def _check_unstack(out, result):
    for i in range(10):
        assert torch.equal(out[f"module.row.{i}"], SD["module.embed.weight"][i])
    assert "module.embed.weight" not in out


STEP_CASES = {
    "rename": ("- rename: {pattern: '^module\\.(.*)$', to: '\\1'}", _check_rename),
    "drop": ("- drop: ['optimizer', '*.fc.weight']", _check_drop),
    "keep": ("- keep: 'module.layers.0.[qkv].weight'", _check_keep),
    "cast": (
        "- cast: {dtype: bf16, only: [module.embed.weight, '*norm*', module.steps], except: ['*norm*']}",
        _check_cast,
    ),
    "copy": ("- copy: {src: module.layers.0, dst: module.layers.2, transform: [transpose, 'scale(2)']}", _check_copy),
    "tie": ("- tie: {src: module.embed.weight, dst: module.head.weight, verify: {atol: 0, rtol: 1e-6}}", _check_tie),
    "tie-transform": (
        "- tie: {src: module.layers.1.fc.weight, dst: module.fc_t, transform: transpose}",
        _check_tie_transform,
    ),
    "untie": ("- untie:", _check_untie),
    "concat": (
        "- concat: {srcs: [module.layers.0.q.weight, module.layers.0.k.weight, module.layers.0.v.weight], "
        "dst: module.layers.0.qkv.weight, dim: 1}",
        _check_concat,
    ),
    "split": (
        "- split: {src: module.layers.1.fc.weight, dsts: [module.layers.1.up.weight, module.layers.1.gate.weight], "
        "dim: 0, sizes: [3, 5]}",
        _check_split,
    ),
    "stack": ("- stack: {src: 'module.layers.{i}.fc.weight', dst: module.fc.weight, dim: 0}", _check_stack),
    "unstack": ("- unstack: {src: module.embed.weight, dst: 'module.row.{i}', new: true}", _check_unstack),
}


@pytest.mark.parametrize("kind", list(STEP_CASES))
def test_every_step_kind_through_the_library(tmp_path, kind):
    step, check = STEP_CASES[kind]
    aliases = {"module.fc_t": ("module.layers.0.fc.weight", ["transpose"])} if kind == "untie" else None
    src = model(tmp_path, aliases=aliases)
    rec = write_recipe(tmp_path, f"version: 1\ninputs: {{base: {src.name}}}\nsteps:\n  {step}\n")
    result = wsurgery.apply(rec, out=tmp_path / "out.safetensors")
    assert result.saved is not None and result.steps == 1 and result.output == str(tmp_path / "out.safetensors")
    check(loaded(tmp_path / "out.safetensors"), result)


@pytest.mark.parametrize("kind", ["rename", "cast", "concat", "unstack"])
def test_a_step_through_the_cli_writes_what_the_command_writes(tmp_path, cli, kind):
    step, _ = STEP_CASES[kind]
    src = model(tmp_path)
    rec = write_recipe(tmp_path, f"version: 1\nsteps:\n  {step}\n")
    code, stdout, stderr = cli("apply", rec, src, "-o", tmp_path / "recipe.safetensors")
    assert code == 0, stderr
    assert "recipe " in stdout and "1 step, 0 expectations held" in stdout
    with wsurgery.open(src) as c:  # the same step as a Checkpoint method
        step_obj = recipes.load(rec).steps[0]
        step_obj.run(c, {"input": c}).save(tmp_path / "method.safetensors")
    assert wsurgery.diff(tmp_path / "recipe.safetensors", tmp_path / "method.safetensors").equal


def test_steps_apply_in_order_each_to_the_names_the_previous_left(tmp_path):
    src = model(tmp_path)
    rec = {
        "version": 1,
        "steps": [
            {"drop": "optimizer"},
            {"rename": {"pattern": r"^module\.", "to": ""}},
            {"tie": {"src": "embed.weight", "dst": "head.weight", "verify": True}},
            {"cast": {"dtype": "bfloat16", "except": ["*norm*"]}},
            {"concat": {"srcs": ["layers.0.q.weight", "layers.0.k.weight"], "dst": "layers.0.qk.weight"}},
            {"drop": "layers.1"},
            {"copy": {"src": "layers.0", "dst": "layers.1"}},
        ],
        "expect": [
            {"name": "head.weight", "alias_of": "embed.weight", "dtype": "bfloat16"},
            {"name": "layers.1", "count": 3},
            {"name": "norm.weight", "dtype": "float32", "shape": [4]},
            {"name": "module.*", "absent": True},
        ],
    }
    result = wsurgery.apply(rec, [src], tmp_path / "out.safetensors")
    assert (result.steps, result.expectations, result.verified) == (7, 4, 1)
    out = loaded(tmp_path / "out.safetensors")
    assert sorted(out) == sorted(
        ["embed.weight", "head.weight", "norm.weight", "steps"]
        + [f"layers.{i}.{p}.weight" for i in range(2) for p in ("qk", "v", "fc")]
    )
    qk = torch.cat([SD["module.layers.0.q.weight"], SD["module.layers.0.k.weight"]]).to(torch.bfloat16)
    assert torch.equal(out["layers.1.qk.weight"], qk) and torch.equal(out["layers.0.qk.weight"], qk)


# ----------------------------------------------------------------------------- expectations


def test_expectations_that_hold_and_every_kind_that_fails(tmp_path):
    src = model(tmp_path, aliases={"module.fc_t": ("module.layers.0.fc.weight", ["transpose"])})
    ok = """\
        version: 1
        expect:
          - {name: module.fc_t, alias_of: module.layers.0.fc.weight, transform: TRANSPOSE}
          - {name: module.embed.weight, alias_of: null, dtype: float32, shape: [10, 4]}
          - {name: 'module.layers.*.q.weight', count: 2}
          - {name: 'nothing.*', count: 0}
          - {name: 'nothing.*', absent: true}
          - {name: module.layers, absent: false}
          - {name: module.steps}
        """
    result = wsurgery.apply(write_recipe(tmp_path, ok), [src], dry_run=True)
    assert result.expectations == 7 and result.saved is None
    bad = """\
        version: 1
        expect:
          - {name: module.fc_t, alias_of: module.embed.weight}
          - {name: module.fc_t, alias_of: module.layers.0.fc.weight, transform: 'slice(0,0,1)'}
          - {name: module.embed.weight, alias_of: module.head.weight}
          - {name: module.fc_t, alias_of: null}
          - {name: 'module.layers.*.q.weight', count: 3}
          - {name: 'module.*', absent: true}
          - {name: nothing, absent: false}
          - {name: module.layers, dtype: bfloat16}
          - {name: module.norm.weight, shape: [5]}
          - {name: nothing}
        """
    found = problems_of(wsurgery.apply, write_recipe(tmp_path, bad, "bad.yaml"), [src], tmp_path / "o.safetensors")
    assert len(found) == 10, found
    assert (
        found[0]
        == "expect 1 (line 3): module.fc_t is an alias of module.layers.0.fc.weight, not of module.embed.weight"
    )
    assert found[1].startswith("expect 2 (line 4): module.fc_t is transpose(module.layers.0.fc.weight), expected slice")
    assert found[2] == "expect 3 (line 5): module.embed.weight is stored, not an alias of module.head.weight"
    assert "expected a stored tensor" in found[3]
    assert found[4].startswith("expect 5 (line 7): 'module.layers.*.q.weight' selects 2 names, expected 3: ")
    assert "should be absent but selects" in found[5] and "should be present" in found[6]
    assert found[7].startswith("expect 8 (line 10): module.layers.0.fc.weight is float32, expected bfloat16")
    assert found[7].endswith("expected bfloat16 and 5 more")
    assert found[8] == "expect 9 (line 11): module.norm.weight has shape [4], expected [5]"
    assert found[9] == "expect 10 (line 12): 'nothing' selects no tensor name, module prefix or glob"
    assert not (tmp_path / "o.safetensors").exists()


def test_a_failed_expectation_through_the_cli_is_exit_4_and_writes_nothing(tmp_path, cli):
    src = model(tmp_path)
    rec = write_recipe(tmp_path, "version: 1\nsteps:\n  - drop: optimizer\nexpect:\n  - {name: 'layers.*', count: 8}\n")
    before = snapshot(tmp_path)
    code, stdout, stderr = cli("apply", rec, src, "-o", tmp_path / "out.safetensors")
    assert code == 4 and stdout == ""
    assert stderr == "error: expect 1 (line 5): 'layers.*' selects 0 names, expected 8 (hint: nothing was written)\n"
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- validation

BROKEN = """\
version: 1
inputs:
  base: no-such-file.safetensors
outptu: x
steps:
  - rename: {pattern: '(', to: x}
  - drop: [a]
  - cast:
      dtype: int8
      only: ['*']
  - tie: {src: a, dst: b, transform: 'scale(2)'}
  - frobnicate: {}
  - copy: {src: [a, b], dst: c, from: donor, colour: red}
  - split: {src: a, dsts: [b, c], sizes: [1], dim: '0'}
  - stack: {src: 'layers.i', dst: on}
  - {drop: a, keep: b}
  - untie: 3
expect:
  - {name: a, count: many}
  - {name: a, transform: 'transpose(0'}
"""


def test_every_static_problem_is_reported_at_once_with_its_step_and_line(tmp_path):
    found = problems_of(recipes.load, write_recipe(tmp_path, BROKEN))
    assert found == [
        "recipe (line 4): unknown key 'outptu' (did you mean 'output'?)",
        "step 1 (rename, line 6): pattern: '(' is not a valid regular expression: "
        "missing ), unterminated subpattern at position 0",
        "step 3 (cast, line 9): dtype: 'int8' is not a floating dtype "
        "(one of float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2)",
        "step 4 (tie, line 11): a tie takes view steps only (same, transpose, permute, reshape, slice); "
        "scale(2.0) would need a copy (use a copy step)",
        "step 5 (line 12): unknown step 'frobnicate' "
        "(one of rename, drop, keep, cast, copy, tie, untie, concat, split, stack, unstack, merge, merge_lora)",
        "step 6 (copy, line 13): unknown key 'colour' (one of src, dst, transform, from, new)",
        "step 6 (copy, line 13): from: 'donor' is not an input of the recipe (the inputs are base)",
        "step 7 (split, line 14): dim: expected an integer, got '0'",
        "step 8 (stack, line 15): src: the template 'layers.i' must hold {i} exactly once",
        "step 8 (stack, line 15): dst: expected a tensor name (a non-empty string), got true "
        "(quote it: YAML reads true/false/yes/no/on/off, numbers and dates as such)",
        "step 9 (line 16): a step has one kind, found drop, keep: start each step with its own '- '",
        "step 10 (untie, line 17): untie: expected a name or a non-empty list of names (strings), got 3 "
        "(quote it: YAML reads true/false/yes/no/on/off, numbers and dates as such)",
        "expect 1 (line 19): count: expected a count (an integer >= 0), got 'many'",
        "expect 2 (line 20): transform: step 1 'transpose(0': cannot parse; expected NAME or NAME(ARG,...), "
        "e.g. permute(2,0,1)",
    ]


def test_validation_comes_before_any_input_is_opened_and_the_cli_says_exit_4(tmp_path, cli):
    rec = write_recipe(tmp_path, BROKEN)
    code, stdout, stderr = cli("apply", rec, "-o", tmp_path / "out.safetensors", "--json")
    assert code == 4 and stderr.count("\n") == 1
    assert stderr.startswith("error: 14 problems: recipe (line 4): unknown key 'outptu'") and "and 9 more" in stderr
    err = json.loads(stdout)["error"]
    assert err["kind"] == "surgery" and err["exit_code"] == 4 and json.loads(stdout)["schema"] == "wsurgery.apply/1"
    assert os.listdir(tmp_path) == ["recipe.yaml"]


def test_cross_field_problems(tmp_path):
    text = """\
        version: 1
        steps:
          - copy: {src: [a, b], dst: [c]}
          - tie: {src: a, dst: [b]}
          - concat: {srcs: [a], dst: b}
          - split: {src: a, dsts: [b, c], sizes: [1, 2, 3]}
        expect:
          - {name: a, absent: true, count: 2}
        """
    found = problems_of(recipes.load, text)
    assert found == [
        "step 1 (copy, line 3): src and dst pair by position: 2 source(s) but 1 destination(s)",
        "step 2 (tie, line 4): src and dst pair by position: 1 source(s) but 1 destination(s)",
        "step 3 (concat, line 5): srcs: concat takes at least two sources, got 1",
        "step 4 (split, line 6): 2 destinations (dsts) but 3 sizes",
        "expect 1 (line 8): absent: true contradicts count: 2",
    ]


def test_top_level_problems(tmp_path):
    assert problems_of(recipes.load, "steps: []\n") == [
        "version: missing: a recipe begins with 'version: 1' (schema wsurgery.recipe/1)"
    ]
    assert problems_of(recipes.load, "version: 2\n")[0].startswith("version (line 1): 2 is not supported")
    assert problems_of(recipes.load, "- a\n- b\n") == [
        "recipe: expected a mapping of version, description, inputs, output, steps, expect, got a list"
    ]
    found = problems_of(
        recipes.load,
        "version: 1\ninputs: [a]\noutput: {path: 3, max_shard_size: 5XB, shards: 2}\nsteps: {drop: a}\nexpect: 1\n",
    )
    assert found == [
        "inputs (line 2): expected a mapping of input names to paths, got a list",
        "output (line 3): unknown key 'shards' (one of path, max_shard_size)",
        "output (line 3): path: expected a path (a string), got 3 "
        "(quote it: YAML reads true/false/yes/no/on/off, numbers and dates as such)",
        "output (line 3): max_shard_size: invalid size '5XB'",
        "steps (line 4): expected a list, got a mapping",
        "expect (line 5): expected a list, got 1",
    ]
    assert problems_of(recipes.load, "version: 1\nversion: 1\nsteps:\n  - drop: a\n    drop: b\n") == [
        "version (line 2): 'version' is given twice",
        "step 1 (line 5): 'drop' is given twice",
    ]
    assert problems_of(recipes.load, "# nothing\n") == [
        "recipe: empty (a recipe begins with 'version: 1', schema wsurgery.recipe/1)"
    ]


def test_a_recipe_from_a_dict_has_step_numbers_without_lines():
    found = problems_of(recipes.load, {"version": 1, "steps": [{"drop": []}, {"cast": {"dtype": "fp8"}}]})
    assert found == [
        "step 1 (drop): drop: expected a name or a non-empty list of names (strings), got an empty list",
        "step 2 (cast): dtype: 'fp8' is not a floating dtype "
        "(one of float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2)",
    ]


def test_bad_yaml_and_unreadable_recipes_are_input_errors(tmp_path, cli):
    src = model(tmp_path)
    cases = {
        "unclosed.yaml": ("version: 1\nsteps:\n  - drop: [a\n", "not valid YAML: expected ',' or ']', but got"),
        "tabs.yaml": ("version: 1\nsteps:\n\t- drop: a\n", "not valid YAML: found character '\\t'"),
        "code.yaml": (
            "version: !!python/object/apply:os.system ['touch pwned']\n",
            "is not allowed in a recipe",
        ),
        "code2.yaml": ("version: !!python/name:os.system x\n", "could not determine a constructor"),
        "twodocs.yaml": (
            "version: 1\n---\nversion: 1\n",
            "but found another document (expected a single document in the stream)",
        ),
    }
    for name, (text, message) in cases.items():
        rec = tmp_path / name
        rec.write_text(text)
        code, _, stderr = cli("apply", rec, src, "-o", tmp_path / "out.safetensors")
        assert code == 3 and stderr.startswith(f"error: {rec}: ") and message in stderr, (name, stderr)
    assert "line 4, column 1" in cli("apply", tmp_path / "unclosed.yaml", src)[2]
    assert not (tmp_path / "pwned").exists() and not (Path.cwd() / "pwned").exists()
    (tmp_path / "binary.yaml").write_bytes(b"version: 1\n\xff\xfe")
    for missing, message in [
        (tmp_path / "missing.yaml", "no such recipe file"),
        (tmp_path, "the recipe is a folder"),
        (tmp_path / "binary.yaml", "not UTF-8 text"),
    ]:
        code, _, stderr = cli("apply", missing, src)
        assert code == 3 and message in stderr
    with pytest.raises(InputError, match="no such recipe file"):
        wsurgery.apply(tmp_path / "missing.yaml", [src], dry_run=True)
    assert not (tmp_path / "out.safetensors").exists()


def test_json_is_yaml_even_indented_with_tabs(tmp_path):
    src = model(tmp_path)
    rec = tmp_path / "r.json"
    rec.write_text('{\n\t"version": 1,\n\t"steps": [\n\t\t{"drop": ["optimizer"]},\n\t\t{"dorp": "x"}\n\t]\n}\n')
    assert problems_of(wsurgery.apply, rec, [src], dry_run=True) == [
        "step 2 (line 5): unknown step 'dorp' (did you mean 'drop'?)"
    ]
    rec.write_text(json.dumps({"version": 1, "steps": [{"drop": ["optimizer"]}]}, indent="\t"))
    assert "optimizer.m.embed" not in wsurgery.apply(rec, [src], dry_run=True).checkpoint


def test_yaml_alias_bombs_and_deep_nesting_are_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    with pytest.raises(InputError, match="expands to too many values"):
        recipes.load("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="nested too deeply"):
        recipes.load("version: 1\nsteps: " + "[" * 5000 + "]" * 5000 + "\n")


def test_yaml_quirks_a_user_meets(tmp_path):
    # 1e-6 is a string to PyYAML (YAML 1.1 floats need a dot): tolerances accept it.
    rec = recipes.load("version: 1\nsteps:\n  - tie: {src: a, dst: b, verify: {atol: 1e-6, rtol: 0}}\n")
    assert rec.steps[0].verify == {"atol": 1e-6, "rtol": 0.0}
    # a cast's dtype alone; a merge key; 'untie:' alone is every alias
    text = "version: 1\nsteps:\n  - cast: bf16\n  - untie:\n  - copy: {<<: {src: a, dst: b}, new: true}\n"
    rec = recipes.load(text)
    assert rec.steps[0].args["dtype"] == "bfloat16" and rec.steps[1].args["names"] is None
    assert rec.steps[2].args["src"] == "a" and rec.steps[2].args["new"] is True
    found = problems_of(recipes.load, "version: 1\nsteps:\n  - drop: [yes, 12, 2026-01-01]\n")
    assert found == ["step 1 (drop, line 3): drop: expected a name or a non-empty list of names (strings), got a list"]
    found = problems_of(recipes.load, "version: 1\nsteps:\n  - copy: {src: on, dst: 2026-01-01}\n")
    assert all("(quote it: YAML reads" in p for p in found) and len(found) == 2


# ----------------------------------------------------------------------------- planning


def test_every_refused_step_is_reported_with_its_step_number_and_line(tmp_path, cli):
    src = model(tmp_path)
    text = """\
        version: 1
        steps:
          - drop: optimizer
          - rename: {pattern: '^module\\.', to: ''}
          - tie:
              src: embed.weight
              dst: head.wieght
          - drop: ['no.such.*']
          - keep: [also.missing]
        """
    found = problems_of(wsurgery.apply, text, [src], tmp_path / "o.safetensors")
    assert found == [
        "step 3 (tie, line 5): destination: 'head.wieght' is a new name, one edit away from 'head.weight' "
        "(a typo?) (add 'new: true' to the step if the name is meant to be new)",
        f"step 4 (drop, line 8): 'no.such.*' matches no tensor name in {src}",
        f"step 5 (keep, line 9): no tensor or module named 'also.missing' in {src}",
    ]
    rec = write_recipe(tmp_path, text)
    code, _, stderr = cli("apply", rec, src, "-o", tmp_path / "o.safetensors")
    assert code == 4 and stderr.startswith("error: 3 problems: step 3 (tie, line 5)")
    assert "(hint: nothing was written)" in stderr
    # an unknown name in a step is a recipe problem (exit 4), located like the others
    code, _, stderr = cli("apply", write_recipe(tmp_path, "version: 1\nsteps:\n  - copy: {src: embed, dst: x}\n"), src)
    assert code == 4 and stderr.startswith("error: step 1 (copy, line 3): no tensor or module named 'embed'")
    # a selector that selects nothing is an unknown name, as in every verb, located
    text = "version: 1\nsteps:\n  - drop: [nope.*, optimizer, also.*]\n"
    assert problems_of(wsurgery.apply, text, [src], dry_run=True) == [
        f"step 1 (drop, line 3): 'nope.*' matches no tensor name in {src}",
    ]
    # hints in recipe words, never flags
    tied = model(tmp_path, "tied.safetensors", aliases={"module.fc_t": ("module.layers.0.fc.weight", ["transpose"])})
    found = problems_of(
        wsurgery.apply, "version: 1\nsteps:\n  - drop: module.layers.0.fc.weight\n", [tied], dry_run=True
    )
    assert found[0].endswith("(add an untie step before it)")
    text = "version: 1\nsteps:\n  - tie: {src: module.layers.0.fc.weight, dst: module.fc_t}\n"
    assert problems_of(wsurgery.apply, text, [tied], dry_run=True)[0].endswith("(try 'transform: transpose')")
    text = (
        "version: 1\nsteps:\n  - cast: {dtype: bfloat16, only: module.embed.weight}\n"
        "  - tie: {src: module.embed.weight, dst: module.head.weight}\n"
    )
    found = problems_of(wsurgery.apply, text, [tied], dry_run=True)
    assert found[0].startswith("step 2 (tie, line 4): ") and found[0].endswith("(use a copy step instead)")
    assert not list(tmp_path.glob("o.safetensors*"))


def test_tie_verify_reads_and_refuses_values_that_differ_nothing_else_reads(tmp_path, monkeypatch):
    steps = """\
        version: 1
        steps:
          - drop: optimizer
          - tie: {src: module.layers.0.q.weight, dst: module.layers.1.q.weight, verify: true}
          - cast: {dtype: bfloat16}
          - copy: {src: module.layers.0, dst: module.layers.5, transform: 'scale(3)'}
          - tie: {src: module.layers.0.k.weight, dst: module.layers.1.k.weight, verify: {atol: 0.1}}
          - concat: {srcs: [module.layers.0.v.weight, module.layers.1.v.weight], dst: module.v.weight}
        expect:
          - {name: module.layers.5, count: 4}
        """
    src = model(tmp_path)

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(SafetensorsFile, "raw", no_data)
    monkeypatch.setattr(SafetensorsFile, "read_into", no_data)
    without_verify = steps.replace("verify: true", "verify: false").replace("verify: {atol: 0.1}", "new: false")
    assert wsurgery.apply(without_verify, [src], dry_run=True).steps == 6  # planned without reading a byte
    with pytest.raises(AssertionError, match="tensor data was read"):
        wsurgery.apply(steps, [src], dry_run=True)
    monkeypatch.undo()
    found = problems_of(wsurgery.apply, steps, [src], tmp_path / "o.safetensors")
    assert len(found) == 2 and not (tmp_path / "o.safetensors").exists()  # both ties, together
    assert found[0].startswith("step 2 (tie, line 4): tie module.layers.0.q.weight -> module.layers.1.q.weight: ")
    assert "the values differ" in found[0] and "atol 0, rtol 0" in found[0]
    assert found[1].startswith("step 5 (tie, line 7): ") and "atol 0.1" in found[1]
    # a head stored twice with the same values verifies, and is then stored once
    result = wsurgery.apply(
        "version: 1\nsteps:\n  - tie: {src: module.embed.weight, dst: module.head.weight, verify: true}\n",
        [src],
        tmp_path / "o.safetensors",
    )
    assert (
        result.saved.stored == len(SD) - 1
        and result.saved.aliases["module.head.weight"]["source"] == "module.embed.weight"
    )


def test_the_write_is_one_pass(tmp_path, monkeypatch, cli):
    src = model(tmp_path)
    import wsurgery.io.targets as targets

    calls = []
    real = targets.save

    def counting(ckpt, *args, **kwargs):
        calls.append(args)
        return real(ckpt, *args, **kwargs)

    monkeypatch.setattr(targets, "save", counting)
    steps = [STEP_CASES[k][0] for k in ("drop", "cast", "copy", "concat", "unstack")]
    rec = write_recipe(tmp_path, "version: 1\nsteps:\n" + "".join(f"  {s}\n" for s in steps))
    wsurgery.apply(rec, [src], tmp_path / "a.safetensors")
    assert len(calls) == 1
    assert cli("apply", rec, src, "-o", tmp_path / "b.safetensors")[0] == 0 and len(calls) == 2
    assert wsurgery.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").equal


# ----------------------------------------------------------------------------- inputs and outputs


def test_inputs_are_relative_to_the_recipe_and_ckpt_arguments_replace_them_in_order(tmp_path, cli, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "models").mkdir()
    base = model(tmp_path / "models", "base.safetensors")
    donor_sd = {k: v * 0 + 5 for k, v in model_sd().items() if v.is_floating_point()}
    donor = model(tmp_path / "models", "donor.safetensors", sd=donor_sd)
    text = """\
        version: 1
        inputs:
          base: ../models/base.safetensors
          donor: ../models/donor.safetensors
        output: {path: out/grown.safetensors}
        steps:
          - copy: {src: module.layers.1, dst: module.layers.2, from: donor}
          - copy: {src: module.embed.weight, dst: module.embed.weight, from: base, transform: 'scale(2)'}
        expect:
          - {name: module.layers.2, count: 4}
        """
    rec = write_recipe(tmp_path / "recipes", text)
    (tmp_path / "recipes" / "out").mkdir()
    monkeypatch.chdir(tmp_path / "models")  # relative to the recipe, not the working folder
    code, stdout, stderr = cli("apply", rec)
    assert code == 0, stderr
    assert f"wrote {tmp_path / 'recipes' / 'out/grown.safetensors'}" in stdout
    out = loaded(tmp_path / "recipes" / "out" / "grown.safetensors")
    assert torch.equal(out["module.layers.2.fc.weight"], torch.full((8, 4), 5.0))
    assert torch.equal(out["module.embed.weight"], SD["module.embed.weight"] * 2)
    # CKPT arguments replace the inputs in order: here the donor becomes the base
    code, _, stderr = cli("apply", rec, donor, "-o", tmp_path / "swapped.safetensors")
    assert code == 0, stderr
    out = loaded(tmp_path / "swapped.safetensors")
    assert torch.equal(out["module.layers.0.q.weight"], torch.full((4, 4), 5.0))  # base is the donor now
    assert torch.equal(out["module.embed.weight"], torch.full((10, 4), 10.0))  # from: base is the given one
    # the library: a mapping by name, checkpoints left open
    with wsurgery.open(base) as b, wsurgery.open(donor) as d:
        result = wsurgery.apply(rec, {"donor": b, "base": d}, tmp_path / "mapped.safetensors")
        assert b.get_tensor("module.norm.weight").shape == (4,)  # still usable
    assert result.inputs == {"base": str(donor), "donor": str(base)}
    out = loaded(tmp_path / "mapped.safetensors")
    assert torch.equal(out["module.layers.2.fc.weight"], SD["module.layers.1.fc.weight"])  # from the base file
    assert torch.equal(out["module.embed.weight"], torch.full((10, 4), 10.0))
    # too many, unknown names, a missing file
    code, _, stderr = cli("apply", rec, base, donor, base)
    assert code == 2 and "3 inputs given, but the recipe has 2 (base, donor)" in stderr
    with pytest.raises(UsageError, match="'teacher' is not an input of the recipe"):
        wsurgery.apply(rec, {"teacher": base}, dry_run=True)
    code, _, stderr = cli("apply", rec, tmp_path / "nope.safetensors")
    assert code == 3 and "nope.safetensors" in stderr


def test_inputs_left_to_the_caller(tmp_path, cli):
    src = model(tmp_path)
    rec = write_recipe(tmp_path, "version: 1\ninputs: {model: null, donor: ~}\nsteps:\n  - drop: optimizer\n")
    code, _, stderr = cli("apply", rec, src)
    assert code == 2 and "no checkpoint for the input donor" in stderr
    assert cli("apply", rec, src, src, "-o", tmp_path / "o.safetensors")[0] == 0
    no_inputs = write_recipe(tmp_path, "version: 1\nsteps:\n  - drop: optimizer\n", "plain.yaml")
    code, _, stderr = cli("apply", no_inputs)
    assert code == 2 and "the recipe names no inputs" in stderr
    with pytest.raises(UsageError, match="nowhere to write"):
        wsurgery.apply(no_inputs, [src])


def test_outputs_from_the_recipe_and_their_overrides(tmp_path, cli):
    src = model(tmp_path)
    rec = write_recipe(
        tmp_path,
        f"version: 1\ninputs: {{m: {src.name}}}\noutput: {{path: shards, max_shard_size: 200}}\n"
        "steps:\n  - drop: optimizer\n",
    )
    result = wsurgery.apply(rec)
    assert result.output == str(tmp_path / "shards") and len(result.saved.shards) > 1
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    code, _, stderr = cli("apply", rec)
    assert code == 5 and "exists" in stderr and "--force" in stderr
    assert cli("apply", rec, "-o", tmp_path / "one.safetensors", "--max-shard-size", "1GB")[0] == 0
    assert len(json.loads((tmp_path / "one.safetensors" / "model.safetensors.index.json").read_text())["weight_map"])
    code, _, stderr = cli("apply", rec, "--force")
    assert code == 0, stderr
    result = wsurgery.apply(rec, out=tmp_path / "file.safetensors", max_shard_size=None, overwrite=True)
    assert result.saved.shards  # the recipe's shard size stays unless replaced
    # the default output, as every command's: the input's path with .safetensors
    pt = tmp_path / "ddp.pt"
    torch.save(model_sd(), pt)
    plain = write_recipe(tmp_path, "version: 1\nsteps:\n  - drop: optimizer\n", "plain.yaml")
    assert cli("apply", plain, pt)[0] == 0 and (tmp_path / "ddp.safetensors").exists()
    # an input is never written over
    code, _, stderr = cli("apply", plain, src, "-o", src, "--force")
    assert code == 5 and "is an input" in stderr


def test_an_input_that_only_a_copy_from_uses_is_still_protected(tmp_path, cli):
    base, donor = model(tmp_path, "base.safetensors"), model(tmp_path, "donor.safetensors")
    rec = write_recipe(tmp_path, "version: 1\ninputs: {base: base.safetensors, donor: donor.safetensors}\n")
    before = sha256(donor)
    code, _, stderr = cli("apply", rec, "-o", donor, "--force")
    assert code == 5 and "is an input" in stderr and sha256(donor) == before
    assert cli("apply", rec, "-o", tmp_path / "copy.safetensors")[0] == 0
    assert wsurgery.diff(base, tmp_path / "copy.safetensors").equal


# ----------------------------------------------------------------------------- dry run and JSON


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, cli):
    src = model(tmp_path)
    rec = write_recipe(
        tmp_path, "version: 1\nsteps:\n  - drop: optimizer\n  - cast: {dtype: float16, except: ['*norm*']}\n"
    )
    before = snapshot(tmp_path)
    code, stdout, stderr = cli("apply", rec, src, "--dry-run")
    assert code == 0, stderr
    rows = [line.split() for line in stdout.splitlines()]
    assert rows[0] == ["plan"] and rows[2][:2] == ["drop", "optimizer.m.embed"]
    assert rows[3][:2] == ["cast", "module.embed.weight"] and "was float32" in stdout
    assert f"would write {tmp_path / 'm.safetensors'}" in stdout and "2 steps, 0 expectations held" in stdout
    assert snapshot(tmp_path) == before
    result = wsurgery.apply(rec, [src], dry_run=True)
    assert result.saved is None and result.output is None
    assert [op.kind for op in result.checkpoint.changes] == ["drop"] + ["cast"] * 10
    assert snapshot(tmp_path) == before


def test_json_has_the_keys_of_every_writing_command_and_the_recipe_s(tmp_path, cli):
    src = model(tmp_path)
    rec = write_recipe(
        tmp_path,
        "version: 1\nsteps:\n  - tie: {src: module.embed.weight, dst: module.head.weight, verify: true}\n"
        "expect:\n  - {name: module.head.weight, alias_of: module.embed.weight}\n",
    )
    code, stdout, _ = cli("apply", rec, src, "-o", tmp_path / "a.safetensors", "--json")
    assert code == 0
    doc = json.loads(stdout)
    code, tie_out, _ = cli(
        "tie",
        src,
        "--src",
        "module.embed.weight",
        "--dst",
        "module.head.weight",
        "-o",
        tmp_path / "t.safetensors",
        "--json",
    )
    tie_doc = json.loads(tie_out)
    assert doc["schema"] == "wsurgery.apply/1"
    assert set(doc) == set(tie_doc) | {"recipe", "inputs", "steps", "expectations", "verified"}
    assert {k: doc[k] for k in ("aliases", "stored", "plan")} == {k: tie_doc[k] for k in ("aliases", "stored", "plan")}
    assert doc["recipe"] == str(rec) and doc["inputs"] == {"input": str(src)}
    assert (doc["steps"], doc["expectations"], doc["verified"], doc["dry_run"]) == (1, 1, 1, False)
    code, stdout, _ = cli("apply", rec, src, "--json", "--dry-run")
    assert (
        code == 0 and json.loads(stdout)["dry_run"] is True and json.loads(stdout)["output"].endswith("m.safetensors")
    )


def test_nothing_is_written_on_any_failure(tmp_path, cli):
    src = model(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.safetensors").write_bytes(b"old")
    failures = {
        "static": "version: 1\nsteps:\n  - drop: []\n",
        "step": "version: 1\nsteps:\n  - drop: optimizer\n  - rename: {pattern: 'x^', to: y}\n",
        "expect": "version: 1\nsteps:\n  - drop: optimizer\nexpect:\n  - {name: optimizer.m.embed}\n",
        "verify": "version: 1\nsteps:\n  - tie: {src: module.norm.weight, dst: module.layers.0.fc.weight, "
        "transform: 'slice(0,0,4)', verify: true}\n",
        "bad yaml": "version: 1\nsteps: [\n",
    }
    for what, text in failures.items():
        rec = write_recipe(tmp_path, text, f"{what}.yaml")
        before = snapshot(src, out_dir, rec)
        for args in (["-o", out_dir / "new.safetensors"], ["-o", out_dir / "keep.safetensors", "--force"]):
            code, _, stderr = cli("apply", rec, src, *args)
            assert code in (3, 4), (what, stderr)
            assert snapshot(src, out_dir, rec) == before, what
        with pytest.raises((SurgeryError, InputError)):
            wsurgery.apply(rec, [src], out_dir / "keep.safetensors", overwrite=True)
        assert snapshot(src, out_dir, rec) == before, what


# ----------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("name", ["ddp_to_plain", "bf16_tied_head", "split_qkv", "grow_layers"])
def test_each_example_runs_on_its_fixture(tmp_path, cli, name):
    before = snapshot(FIXTURES)
    out = tmp_path / f"{name}.safetensors"
    code, stdout, stderr = cli("apply", EXAMPLES / f"{name}.yaml", "-o", out)
    assert code == 0, stderr
    assert "expectations held" in stdout
    assert snapshot(FIXTURES) == before
    result = loaded(out)
    if name == "ddp_to_plain":
        src = torch.load(FIXTURES / "ddp_train.pt", weights_only=True)
        assert sorted(result) == sorted(k.removeprefix("module.") for k in src if k.startswith("module."))
        assert all(torch.equal(result[k.removeprefix("module.")], v) for k, v in src.items() if k.startswith("module."))
    elif name == "bf16_tied_head":
        assert result["projection.weight"].data_ptr() == result["embedding.weight"].data_ptr()
        assert (
            result["final_norm.weight"].dtype == torch.float32
            and result["layers.0.mlp.up.weight"].dtype == torch.bfloat16
        )
    elif name == "grow_layers":
        base, donor = loaded(FIXTURES / "tiny_lm.safetensors"), wsurgery.load_state_dict(FIXTURES / "lightning.ckpt")
        assert torch.equal(result["layers.3.mlp.up.weight"], base["layers.1.mlp.up.weight"])
        assert torch.equal(result["layers.4.mlp.up.weight"], donor["model.layers.1.mlp.up.weight"])


def test_split_qkv_then_fuse_qkv_gives_back_the_original(tmp_path, cli):
    split = tmp_path / "split.safetensors"
    assert cli("apply", EXAMPLES / "split_qkv.yaml", "-o", split)[0] == 0
    code, _, stderr = cli("apply", EXAMPLES / "fuse_qkv.yaml")
    assert code == 2 and "no checkpoint for the input model" in stderr
    fused = wsurgery.apply(EXAMPLES / "fuse_qkv.yaml", [split], tmp_path / "fused.safetensors")
    assert fused.steps == 4
    assert wsurgery.diff(FIXTURES / "tiny_lm.safetensors", tmp_path / "fused.safetensors").equal


def test_examples_run_through_the_library_and_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = wsurgery.apply(str(EXAMPLES / "ddp_to_plain.yaml"), out="plain.safetensors")
    assert result.expectations == 4 and (tmp_path / "plain.safetensors").exists()
    assert result.inputs == {"train": str(EXAMPLES / "../../fixtures/ddp_train.pt")}


def test_importing_wsurgery_does_not_import_yaml():
    code = "import sys, wsurgery; wsurgery.apply; assert 'yaml' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
