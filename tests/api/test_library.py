"""The library face: wsurgery.open as a context manager, the verbs as Checkpoint methods,
save/convert that refuse to overwrite, explicit signatures with examples."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import wsurgery
from tests.conftest import run_module
from wsurgery.errors import OutputError, UsageError


def mapped(ckpt) -> bool:
    """Whether any safetensors file of ``ckpt`` is memory-mapped right now."""
    return any(getattr(s, "file", None) is not None and s.file._mmap is not None for s in ckpt.stored.values())


def test_open_is_a_context_manager_that_releases_its_files(fixtures):
    with wsurgery.open(fixtures / "tiny_lm.safetensors") as ckpt:
        ckpt.stored["embedding.weight"].raw()
        assert mapped(ckpt)
    assert not mapped(ckpt)


def test_keys_get_tensor_and_tensors_read_what_the_file_holds(fixtures):
    expected = load_file(fixtures / "tiny_lm.safetensors")
    with wsurgery.open(fixtures / "tiny_lm.safetensors") as ckpt:
        assert ckpt.keys() == sorted(expected, key=wsurgery.model.natural_key)
        assert torch.equal(ckpt.get_tensor("layers.1.mlp.up.weight", device="cpu"), expected["layers.1.mlp.up.weight"])
        seen = dict(ckpt.tensors())
    assert seen.keys() == expected.keys() and all(torch.equal(seen[k], expected[k]) for k in expected)


def test_tensors_yields_aliases_as_views_of_their_source(tmp_path):
    w = torch.arange(12.0).reshape(3, 4)
    wsurgery.save_state_dict({"w": w, "wt": w.t()}, tmp_path / "t.safetensors")
    with wsurgery.open(tmp_path / "t.safetensors") as ckpt:
        got = dict(ckpt.tensors())
    assert torch.equal(got["wt"], w.t()) and torch.equal(got["w"], w)


def test_the_verbs_return_new_checkpoints_and_leave_the_original_alone(fixtures, tmp_path):
    with wsurgery.open(fixtures / "tiny_lm.safetensors") as ckpt:
        before = (dict(ckpt.stored), dict(ckpt.aliases))
        tied = ckpt.tie("embedding.weight", "projection.weight")
        copied = tied.copy("layers.0", "layers.5")
        plain = copied.untie()
        assert (dict(ckpt.stored), dict(ckpt.aliases)) == before
        assert set(tied.aliases) == {"projection.weight"} and not plain.aliases
        assert [op.kind for op in plain.changes] == ["tie", *["copy"] * 6, "untie"]
        plain.save(tmp_path / "o.safetensors")
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["layers.5.mlp.up.weight"], out["layers.0.mlp.up.weight"])
    assert torch.equal(out["projection.weight"], out["embedding.weight"])


def test_copy_takes_lists_of_pairs_all_read_from_the_input(fixtures, tmp_path):
    src = load_file(fixtures / "tiny_lm.safetensors")
    with wsurgery.open(fixtures / "tiny_lm.safetensors") as ckpt:
        swapped = ckpt.copy(["layers.0", "layers.1"], ["layers.1", "layers.0"])
        swapped.save(tmp_path / "o.safetensors")
        with pytest.raises(UsageError) as info:
            ckpt.copy(["layers.0", "layers.1"], ["layers.5"])
    assert info.value.param == "dst"
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["layers.0.norm.weight"], src["layers.1.norm.weight"])
    assert torch.equal(out["layers.1.norm.weight"], src["layers.0.norm.weight"])


def test_save_refuses_an_existing_file_or_its_own_input_unless_overwrite(fixtures, tmp_path):
    path = fixtures / "tiny_lm.safetensors"
    original = path.read_bytes()
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    with wsurgery.open(path) as ckpt:
        tied = ckpt.tie("embedding.weight", "projection.weight")
        with pytest.raises(OutputError) as info:
            tied.save(tmp_path / "taken.safetensors")
        assert info.value.reason == "exists" and "overwrite=True" in (info.value.hint or "")
        with pytest.raises(OutputError) as info:
            tied.save(path)
        assert info.value.reason == "is_input"
        assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me" and path.read_bytes() == original
        result = tied.save(tmp_path / "taken.safetensors", overwrite=True)
    assert result.aliases == {"projection.weight": {"source": "embedding.weight", "transform": []}}
    assert result.stored == 14 and result.shards is None
    assert "projection.weight" not in load_file(tmp_path / "taken.safetensors")


def test_save_shards_into_a_folder(fixtures, tmp_path):
    with wsurgery.open(fixtures / "tiny_lm.safetensors") as ckpt:
        result = ckpt.save(tmp_path / "shards", max_shard_size="2KB")
    assert len(result.shards) > 1 and all((tmp_path / "shards" / s).is_file() for s in result.shards)
    assert wsurgery.diff(fixtures / "tiny_lm.safetensors", tmp_path / "shards").equal


def test_convert_keeps_ties_and_refuses_to_overwrite(fixtures, tmp_path):
    out = tmp_path / "c.safetensors"
    result = wsurgery.convert(fixtures / "shared_storage.pt", out)
    assert set(result.aliases) == {"decoder.weight", "projection.weight"}
    with pytest.raises(OutputError):
        wsurgery.convert(fixtures / "shared_storage.pt", out)
    assert wsurgery.diff(fixtures / "shared_storage.pt", out).equal


def _public_functions():
    for name in wsurgery.__all__:
        obj = getattr(wsurgery, name)
        if inspect.isfunction(obj):
            yield name, obj
    for name in ("tie", "copy", "untie", "save", "get_tensor", "tensors"):
        yield f"Checkpoint.{name}", getattr(wsurgery.Checkpoint, name)


@pytest.mark.parametrize("name,fn", list(_public_functions()), ids=lambda x: x if isinstance(x, str) else "")
def test_public_functions_have_explicit_signatures_and_documented_examples(name, fn):
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds, name
    doc = inspect.getdoc(fn) or ""
    assert "Example" in doc or fn.__name__ in ("load",), f"{name} has no example"


def test_the_package_ships_py_typed():
    assert (Path(wsurgery.__file__).parent / "py.typed").is_file()


# --- the command line around the library --------------------------------------------------


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"wsurgery {wsurgery.__version__}"


def test_dry_run_never_needs_an_output_path(fixtures, cli):
    default = fixtures / "tiny_lm.safetensors"  # the default output of tiny_lm.pt exists
    before = default.read_bytes()
    args = ("--src", "embedding.weight", "--dst", "projection.weight", "-n")
    code, out, err = cli("tie", fixtures / "tiny_lm.pt", *args)
    assert code == 0, err
    assert "would write" in out and default.read_bytes() == before


def test_tie_help_offers_view_steps_only(cli):
    _, tie_help, _ = cli("tie", "--help")
    _, copy_help, _ = cli("copy", "--help")
    assert "cast" not in tie_help and "scale" not in tie_help
    assert "cast(dtype)" in copy_help and "scale(x)" in copy_help


def test_tables_never_cut_a_name_they_stack_on_a_narrow_terminal(tmp_path):
    long = "model.decoder.layers.11.self_attention.linear_qkv.layer_norm_weight_with_a_long_suffix"
    wsurgery.save_state_dict({long: torch.zeros(3), "b": torch.ones(2)}, tmp_path / "m.safetensors")
    for columns in ("40", "80"):
        r = run_module("inspect", tmp_path / "m.safetensors", env={"COLUMNS": columns})
        assert r.returncode == 0 and long in r.stdout.splitlines(), r.stdout
    r = run_module("inspect", tmp_path / "m.safetensors", env={"COLUMNS": "200"})
    assert any(line.startswith(long) and "float32" in line for line in r.stdout.splitlines())


def test_a_refusal_over_many_tensors_is_summarized_on_one_line(tmp_path, cli):
    sd = {f"{side}.{i}.w": torch.zeros(4) for side in "ab" for i in range(40)}
    wsurgery.save_state_dict(sd, tmp_path / "m.safetensors")
    code, _, err = cli("tie", tmp_path / "m.safetensors", "--src", "a", "--dst", "b", "-t", "transpose")
    lines = err.strip().splitlines()
    assert code == 4 and len(lines) == 1
    assert "problems:" in lines[0] and "more" in lines[0] and len(lines[0]) < 2000


def test_output_errors_name_flags_on_the_command_line_only(fixtures, cli, tmp_path):
    (tmp_path / "o.safetensors").write_bytes(b"x")
    code, _, err = cli("convert", fixtures / "tiny_lm.pt", "-o", tmp_path / "o.safetensors")
    assert code == 5 and "--force" in err
    with pytest.raises(OutputError) as info:
        wsurgery.convert(fixtures / "tiny_lm.pt", tmp_path / "o.safetensors")
    assert "--force" not in f"{info.value} {info.value.hint}"


def test_outputs_that_are_not_regular_files_are_refused(fixtures, cli):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    code, _, err = cli("convert", fixtures / "tiny_lm.pt", "-o", "/dev/null", "--force")
    assert code == 5 and "not a regular file" in err
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
