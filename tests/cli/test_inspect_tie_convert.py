"""inspect / tie / convert from the command line: output, JSON, exit codes, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..conftest import run_module, sha256


def test_demo_tie_stores_embedding_once(fixtures, cli):
    out = fixtures / "tied.safetensors"
    before = sha256(fixtures / "tiny_lm.pt")
    code, stdout, stderr = cli(
        "tie", fixtures / "tiny_lm.pt", "--src", "embedding.weight", "--dst", "projection.weight", "-o", out
    )
    assert code == 0, stderr
    assert "projection.weight = same(embedding.weight)" in stdout
    assert sha256(fixtures / "tiny_lm.pt") == before
    with safe_open(out, "pt") as f:
        assert "projection.weight" not in f.keys()
        meta = f.metadata()
    assert meta["projection.weight"] == "embedding.weight"
    assert meta["format"] == "pt"


def test_tie_default_output_is_input_with_safetensors_suffix(tmp_path, cli):
    torch.save({"a": torch.ones(2, 2), "b": torch.zeros(2, 2)}, tmp_path / "m.pt")
    code, _, stderr = cli("tie", tmp_path / "m.pt", "--src", "a", "--dst", "b")
    assert code == 0, stderr
    assert (tmp_path / "m.safetensors").exists()
    # a second run refuses to overwrite, then --force allows it
    code, _, stderr = cli("tie", tmp_path / "m.pt", "--src", "a", "--dst", "b")
    assert code == 5 and "exists" in stderr and "--force" in stderr
    code, _, _ = cli("tie", tmp_path / "m.pt", "--src", "a", "--dst", "b", "--force")
    assert code == 0


def test_tie_never_writes_over_its_input_without_in_place(tmp_path, cli):
    path = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2, 2), "b": torch.zeros(2, 2)}, path)
    before = sha256(path)
    code, _, stderr = cli("tie", path, "--src", "a", "--dst", "b", "--force")
    assert code == 5 and "input" in stderr and "--in-place" in stderr
    assert sha256(path) == before
    code, _, stderr = cli("tie", path, "--src", "a", "--dst", "b", "--in-place")
    assert code == 0, stderr
    assert set(load_file(path)) == {"a"}


def test_tie_transpose_and_new_destination(tmp_path, cli):
    torch.save({"emb": torch.arange(6.0).reshape(3, 2)}, tmp_path / "m.pt")
    out = tmp_path / "o.safetensors"
    code, stdout, stderr = cli(
        "tie", tmp_path / "m.pt", "--src", "emb", "--dst", "head", "-t", "transpose", "-o", out, "--json"
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["schema"] == "wsurgery.tie/1"
    assert report["aliases"] == [{"name": "head", "source": "emb", "transform": ["transpose"]}]
    import wsurgery

    sd = wsurgery.load_state_dict(out)
    assert torch.equal(sd["head"], torch.arange(6.0).reshape(3, 2).t())


def test_tie_module_prefix_pairs_by_suffix(fixtures, cli):
    out = fixtures / "o.safetensors"
    code, stdout, stderr = cli(
        "tie", fixtures / "tiny_lm.safetensors", "--src", "layers.0", "--dst", "layers.1", "-o", out, "--json"
    )
    assert code == 0, stderr
    aliases = {a["name"]: a["source"] for a in json.loads(stdout)["aliases"]}
    assert aliases["layers.1.mlp.up.weight"] == "layers.0.mlp.up.weight"
    assert len(aliases) == 6


def test_tie_dry_run_writes_nothing(fixtures, cli):
    out = fixtures / "o.safetensors"
    code, stdout, _ = cli(
        "tie",
        fixtures / "tiny_lm.pt",
        "--src",
        "embedding.weight",
        "--dst",
        "projection.weight",
        "-o",
        out,
        "--dry-run",
    )
    assert code == 0 and "would write" in stdout
    assert not out.exists()


def test_tie_shape_misfit_is_exit_4_and_writes_nothing(fixtures, cli):
    out = fixtures / "o.safetensors"
    code, _, stderr = cli(
        "tie", fixtures / "tiny_lm.pt", "--src", "embedding.weight", "--dst", "layers.0.attn.out.weight", "-o", out
    )
    assert code == 4
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "(32, 8)" in stderr and "(8, 8)" in stderr
    assert not out.exists()


def test_unknown_name_is_exit_3_with_close_matches(fixtures, cli):
    code, _, stderr = cli(
        "tie",
        fixtures / "tiny_lm.pt",
        "--src",
        "embeding.weight",
        "--dst",
        "projection.weight",
        "-o",
        fixtures / "o.safetensors",
    )
    assert code == 3 and "did you mean embedding.weight" in stderr


def test_missing_file_is_exit_3_and_json_error(tmp_path, cli):
    code, stdout, stderr = cli("inspect", tmp_path / "nope.safetensors", "--json")
    assert code == 3 and "no such file" in stderr
    err = json.loads(stdout)
    assert err["schema"] == "wsurgery.inspect/1" and err["error"]["exit_code"] == 3


def test_usage_error_is_exit_2(fixtures, cli):
    code, _, _ = cli("tie", fixtures / "tiny_lm.pt", "--src", "embedding.weight")
    assert code == 2


def test_inspect_table_totals_and_filter(fixtures, cli):
    code, stdout, _ = cli("inspect", fixtures / "shared_storage.pt")
    assert code == 0
    assert "transpose(encoder.weight)" in stdout and "same(embedding.weight)" in stdout
    assert "3 stored tensors, 2 aliases" in stdout
    assert "float32: 3 tensors" in stdout
    code, stdout, _ = cli("inspect", fixtures / "tiny_lm.safetensors", "--filter", "layers.1.*")
    assert "layers.1.norm.weight" in stdout and "layers.0." not in stdout


def test_inspect_tree_counts_params_per_subtree(fixtures, cli):
    code, stdout, _ = cli("inspect", fixtures / "tiny_lm.safetensors", "--tree")
    assert code == 0
    # layers.0: qkv 24*8 + 24, out 8*8, up 16*8, down 8*16, norm 8
    assert "layers  " in stdout or "layers " in stdout
    assert f"{24 * 8 + 24 + 64 + 128 + 128 + 8:,} params" in stdout


def test_inspect_json_schema(fixtures, cli):
    code, stdout, _ = cli("inspect", fixtures / "shared_storage.pt", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["schema"] == "wsurgery.inspect/1"
    assert report["format"] == "torch-zip"
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["decoder.weight"] == {
        "name": "decoder.weight",
        "dtype": "float32",
        "shape": [8, 16],
        "nbytes": 512,
        "alias_of": {"source": "encoder.weight", "transform": ["transpose"]},
    }
    assert by_name["bias"]["alias_of"] is None
    assert report["total_params"] == 32 * 8 + 16 * 8 + 8
    assert report["total_bytes"] == 4 * report["total_params"]


def test_inspect_safetensors_does_not_import_torch(fixtures):
    paths = [str(fixtures / "tiny_lm.safetensors"), str(fixtures / "tiny_lm_sharded")]
    code = (
        "import sys\n"
        "from wsurgery.cli.app import app\n"
        f"for path in {paths!r}:\n"
        "    try:\n"
        "        app(['inspect', path, '--json'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok-no-torch', file=sys.stderr)\n"
    )

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok-no-torch" in r.stderr
    assert r.stdout.count('"schema": "wsurgery.inspect/1"') == 2


def test_convert_keeps_ties_and_round_trips(fixtures, cli):
    out = fixtures / "conv.safetensors"
    code, stdout, stderr = cli("convert", fixtures / "shared_storage.pt", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["stored"] == 3 and len(report["aliases"]) == 2
    import wsurgery

    a = torch.load(fixtures / "shared_storage.pt", weights_only=True)
    b = wsurgery.load_state_dict(out)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_convert_sharded_and_lightning(fixtures, cli):
    code, _, stderr = cli("convert", fixtures / "tiny_lm_sharded", "-o", fixtures / "one.safetensors")
    assert code == 0, stderr
    assert load_file(fixtures / "one.safetensors").keys() == load_file(fixtures / "tiny_lm.safetensors").keys()
    code, _, stderr = cli("convert", fixtures / "lightning.ckpt", "-o", fixtures / "l.safetensors")
    assert code == 0, stderr
    assert "model.embedding.weight" in load_file(fixtures / "l.safetensors")


def test_subprocess_error_has_no_traceback_unless_debug(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = run_module("inspect", bad)
    assert r.returncode == 3
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_module("inspect", bad, env={"WSURGERY_DEBUG": "1"})
    assert r.returncode == 3 and "Traceback" in r.stderr


def test_python_m_and_console_script_agree(fixtures):
    r = run_module("inspect", fixtures / "tiny_lm.safetensors", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["total_params"] == 1608


def test_usage_errors_from_the_console_script_are_one_line(fixtures):
    r = run_module("tie", fixtures / "tiny_lm.pt", "--src", "embedding.weight")
    assert r.returncode == 2
    assert r.stderr.startswith("error: Missing option '--dst'") and len(r.stderr.strip().splitlines()) == 1
    r = run_module("frobnicate")
    assert r.returncode == 2 and r.stderr.startswith("error: No such command")
    r = run_module()
    assert r.returncode == 0 and "Usage: wsurgery" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "tiny_lm.safetensors"],
        ["inspect", "tiny_lm.pt", "--json"],
        ["diff", "tiny_lm.pt", "tiny_lm.safetensors"],
    ],
)
def test_a_reader_that_closes_the_pipe_early_fails_the_command_without_a_word(fixtures, args):
    # `wsurgery inspect x | head` is routine: the output is cut, so the exit is 5 (never 0),
    # but an error line about a pipe the user closed on purpose is noise
    args = [fixtures / a if (fixtures / a).exists() else a for a in args]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        proc = run_module(*args, stdout=w)
    finally:
        os.close(w)
    assert proc.returncode == 5 and proc.stderr == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "tiny_lm.safetensors"],
        ["inspect", "tiny_lm.safetensors", "--json"],
        ["diff", "tiny_lm.pt", "tiny_lm.safetensors", "--json"],
        ["diff", "tiny_lm.safetensors", "tiny_lm_sharded"],
    ],
)
def test_a_standard_output_that_cannot_be_written_is_exit_5_with_one_line(fixtures, args):
    # a full disk under `wsurgery ... > report.json` must not pass CI as success, nor crash
    args = [fixtures / a if (fixtures / a).exists() else a for a in args]
    with open("/dev/full", "w") as full:
        proc = run_module(*args, stdout=full)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot write to standard output" in proc.stderr


def test_every_command_runs_from_an_app_built_with_it_alone(capsys):
    """The console script builds only the command it runs; each command's help, and the
    top-level help listing them all, come out whole."""
    from wsurgery.cli.app import COMMANDS, app, build_app, main

    names = [c.name for c in app.registered_commands]
    assert len(names) >= 16 and names == list(COMMANDS)
    for name in names:
        assert [c.name for c in build_app([name]).registered_commands] == [name]
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert f"wsurgery {name} [OPTIONS]" in " ".join(capsys.readouterr().out.split())
    for args in (["--help"], []):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
        listed = capsys.readouterr().out
        assert all(f"  {name} " in listed for name in names) and "--version" in listed
