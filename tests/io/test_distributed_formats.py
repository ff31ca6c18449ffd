"""Distributed layouts as inputs of every command: DCP folders (one process, FSDP2-style
shards), DCP's safetensors shards, Megatron-Core torch_dist, NeMo 2 folders and NeMo 1
``.nemo`` archives (tar, tar.gz, model-parallel, Megatron-Core inside)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import wsurgery
from wsurgery.io import layouts
from wsurgery.io.dcp_reader import ChunkedStored
from wsurgery.io.layouts import ModelParallelArchiveError

from ..conftest import FIXTURES, run_module

# fixture -> (format, holds tiny_lm's tensors exactly)
LAYOUTS = {
    "tiny_lm_dcp": (layouts.DCP, True),
    "tiny_lm_dcp_sharded": (layouts.DCP, True),
    "tiny_lm_dcp_hf": (layouts.DCP_SAFETENSORS, True),
    "tiny_lm.nemo": (layouts.NEMO, True),
    "tiny_lm_gz.nemo": (layouts.NEMO, True),
    "tiny_lm_mp.nemo/mp_rank_01": (layouts.NEMO, False),
    "megatron_tiny": (layouts.MEGATRON, False),
    "megatron_tiny.nemo": (layouts.NEMO, False),
    "nemo2_tiny": (layouts.NEMO2, False),
}
TINY_LM = [k for k, (_, same) in LAYOUTS.items() if same]


def _tiny_lm() -> dict:
    return wsurgery.load_state_dict(FIXTURES / "tiny_lm.safetensors")


@pytest.mark.parametrize("name", LAYOUTS)
def test_inspect_json(cli, fixtures, name):
    code, out, err = cli("inspect", fixtures / name, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == LAYOUTS[name][0]
    assert report["tensors"] and report["total_bytes"] > 0
    if LAYOUTS[name][1]:
        assert {t["name"]: t["shape"] for t in report["tensors"]} == {n: list(t.shape) for n, t in _tiny_lm().items()}


@pytest.mark.parametrize("name", LAYOUTS)
def test_convert_then_diff_against_the_conversion_is_equal(cli, fixtures, tmp_path, name):
    out = tmp_path / "converted.safetensors"
    code, _, err = cli("convert", fixtures / name, "-o", out, "--json")
    assert code == 0, err
    code, report, err = cli("diff", fixtures / name, out, "--json")
    assert code == 0, err
    assert json.loads(report)["equal"]
    if LAYOUTS[name][1]:
        code, _, err = cli("diff", out, fixtures / "tiny_lm.safetensors")
        assert code == 0, err


@pytest.mark.parametrize("name", TINY_LM)
def test_diff_against_the_reference_and_check(cli, fixtures, name):
    code, out, err = cli("diff", fixtures / name, fixtures / "tiny_lm.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["same"] == 15
    code, _, err = cli(
        "check", fixtures / name, "--src", "layers.0", "--dst", "layers.0", "--from", fixtures / "tiny_lm.pt"
    )
    assert code == 0, err
    code, _, _ = cli("check", fixtures / name, "--src", "embedding.weight", "--dst", "projection.weight")
    assert code == 1  # different values: exit 1, not an error


@pytest.mark.parametrize("name", TINY_LM)
def test_tie_and_copy_write_safetensors(cli, fixtures, tmp_path, name):
    tied = tmp_path / "tied.safetensors"
    code, _, err = cli("tie", fixtures / name, "--src", "embedding.weight", "--dst", "projection.weight", "-o", tied)
    assert code == 0, err
    sd = wsurgery.load_state_dict(tied)
    assert sd["projection.weight"].data_ptr() == sd["embedding.weight"].data_ptr()
    copied = tmp_path / "copied.safetensors"
    args = ["--src", "layers.0", "--dst", "layers.1", "-t", "scale(2)", "-o", copied]
    code, _, err = cli("copy", fixtures / name, *args)
    assert code == 0, err
    ref = _tiny_lm()
    got = wsurgery.load_state_dict(copied)
    assert torch.equal(got["layers.1.mlp.up.weight"], ref["layers.0.mlp.up.weight"] * 2)
    assert torch.equal(got["embedding.weight"], ref["embedding.weight"])


def test_copy_from_a_dcp_checkpoint(cli, fixtures, tmp_path):
    out = tmp_path / "warm.safetensors"
    args = ["--from", fixtures / "tiny_lm_dcp_sharded", "--src", "layers.1", "--dst", "layers.0", "-o", out]
    code, _, err = cli("copy", fixtures / "tiny_lm.safetensors", *args)
    assert code == 0, err
    assert torch.equal(wsurgery.load_state_dict(out)["layers.0.mlp.up.weight"], _tiny_lm()["layers.1.mlp.up.weight"])


@pytest.mark.parametrize("name", ["tiny_lm_dcp", "tiny_lm_dcp_sharded", "tiny_lm_dcp_hf"])
def test_dcp_inspect_imports_no_torch(fixtures, name):
    """Python's import log of the whole command names no torch module."""
    r = run_module("inspect", fixtures / name, "--json", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] in ("dcp", "dcp-safetensors")
    assert re.search(r"\|\s+wsurgery\.io\.dcp$", r.stderr, re.M), "the log lists the reader's imports"
    assert not re.search(r"\|\s+torch(\.|$)", r.stderr, re.M), "torch was imported"


def test_opening_dcp_reads_only_the_metadata(fixtures, monkeypatch):
    from wsurgery.io import ranges

    def refuse(*args, **kwargs):
        raise AssertionError("a chunk was read")

    monkeypatch.setattr(ranges, "_staged", refuse)  # through torch
    monkeypatch.setattr(ranges, "_View", refuse)  # without torch
    with wsurgery.open(fixtures / "tiny_lm_dcp_sharded") as c:
        assert c.shape_dtype("layers.0.mlp.up.weight") == ((16, 8), "float32")
        assert c.total_bytes == sum(t.numel() * 4 for t in _tiny_lm().values())
        with pytest.raises(AssertionError, match="a chunk was read"):
            c.get_tensor("embedding.weight")


def test_dcp_tensors_are_assembled_from_their_chunks(fixtures):
    ref = _tiny_lm()
    with wsurgery.open(fixtures / "tiny_lm_dcp_sharded") as c:
        s = c.stored["layers.0.mlp.up.weight"]
        assert isinstance(s, ChunkedStored)
        assert [ch.offsets for ch, _ in s.plan.chunks] == [(0, 0), (0, 4)]  # Shard(1): two column blocks
        assert [ch.offsets for ch, _ in c.stored["embedding.weight"].plan.chunks] == [(0, 0), (16, 0)]
        for name, t in c.tensors():
            assert torch.equal(t, ref[name]), name
    with wsurgery.open(fixtures / "tiny_lm_dcp_hf") as c:
        assert len(c.stored["embedding.weight"].plan.chunks) == 2
        assert all(torch.equal(t, ref[n]) for n, t in c.tensors())


def test_a_whole_chunk_is_copied_as_raw_bytes(fixtures):
    """A tensor one chunk holds whole lies verbatim in its .distcp: convert copies those bytes."""
    with wsurgery.open(fixtures / "tiny_lm_dcp") as c:
        loc = c.stored["embedding.weight"].raw_location()
        assert loc is not None and loc[0].endswith("__0_0.distcp") and loc[2] == 32 * 8 * 4
        with open(loc[0], "rb") as f:
            f.seek(loc[1])
            assert f.read(loc[2]) == _tiny_lm()["embedding.weight"].numpy().tobytes()
        t = c.get_tensor("embedding.weight")
        assert torch.equal(t, _tiny_lm()["embedding.weight"])


def test_skipped_items_and_metadata(fixtures):
    with wsurgery.open(fixtures / "tiny_lm_dcp") as c:
        assert c.skipped == ["step: bytes item (a pickled object, not read)"]
        assert c.metadata == {"dcp.version": "1.0.0"}
        assert sorted(os.path.basename(p) for p in c.input_files) == [".metadata", "__0_0.distcp"]


def test_megatron_common_pt_and_stacked_layers(fixtures):
    with wsurgery.open(fixtures / "megatron_tiny") as c:
        assert c.format == "megatron-torch-dist"
        assert c.shape_dtype("decoder.layers.self_attention.linear_qkv.weight") == ((2, 24, 8), "float32")
        assert torch.equal(c.get_tensor("rng_state_seed"), torch.arange(16, dtype=torch.uint8))  # from common.pt
        assert (
            "decoder.layers.self_attention.linear_qkv._extra_state: bytes item (a pickled object, not read)"
            in c.skipped
        )
        assert "common.pt: args: placeholder for argparse.Namespace" in c.skipped
        assert c.metadata["megatron.sharded_backend"] == "torch_dist"
        assert any(p.endswith("common.pt") for p in c.input_files)
        qkv = c.stored["decoder.layers.self_attention.linear_qkv.weight"]
        assert [ch.offsets for ch, _ in qkv.plan.chunks] == [(0, 0, 0), (0, 12, 0)]  # tensor parallel on dim 1


def test_nemo2_folder(fixtures):
    with wsurgery.open(fixtures / "nemo2_tiny") as c:
        assert c.format == "nemo2"
        assert "module.output_layer.weight" in c
        assert c.metadata["nemo.context"] == "io.json, model.yaml, nemo_tokenizer/tokenizer_config.json"
        assert c.metadata["nemo.model_config"].startswith("target: nemo.collections")
    with wsurgery.open(fixtures / "nemo2_tiny" / "weights") as w, wsurgery.open(fixtures / "megatron_tiny") as m:
        assert w.format == "megatron-torch-dist"
        assert all(
            torch.equal(w.get_tensor("module." + n), m.get_tensor(n)) for n in m.names() if n != "rng_state_seed"
        )


def test_nemo_archive_is_read_in_place(fixtures, tmp_path, monkeypatch):
    """An uncompressed .nemo is never extracted: no temporary file, tensors are read from a
    map of the archive."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with wsurgery.open(fixtures / "tiny_lm.nemo") as c:
        assert c.metadata["nemo.model_config"].startswith("target: nemo.collections")
        assert c.input_files == [str((fixtures / "tiny_lm.nemo").resolve())]
        sd = c.state_dict()
        maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else str(fixtures / "tiny_lm.nemo")
        assert str((fixtures / "tiny_lm.nemo").resolve()) in maps
    assert os.listdir(scratch) == []
    assert all(torch.equal(sd[n], t) for n, t in _tiny_lm().items())


def test_gz_archive_is_decompressed_privately_and_removed(fixtures, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with wsurgery.open(fixtures / "tiny_lm_gz.nemo") as c:
        sd = c.state_dict()
    assert os.listdir(scratch) == []
    assert all(torch.equal(sd[n], t) for n, t in _tiny_lm().items())
    with wsurgery.open(fixtures / "megatron_tiny.nemo") as c:  # DCP inside a plain tar: chunks are member ranges
        assert torch.equal(
            c.get_tensor("output_layer.weight"),
            wsurgery.load_state_dict(fixtures / "megatron_tiny")["output_layer.weight"],
        )


def test_model_parallel_archive(cli, fixtures, tmp_path):
    path = fixtures / "tiny_lm_mp.nemo"
    with pytest.raises(ModelParallelArchiveError) as info:
        wsurgery.open(path)
    assert info.value.ranks == ["mp_rank_00", "mp_rank_01"]
    assert info.value.members == ["mp_rank_00/model_weights.ckpt", "mp_rank_01/model_weights.ckpt"]
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert "mp_rank_01/model_weights.ckpt" in out and "one rank at a time" in out
    code, out, _ = cli("inspect", path, "--json")
    assert [r["rank"] for r in json.loads(out)["ranks"]] == ["mp_rank_00", "mp_rank_01"]
    code, _, err = cli("convert", path, "-o", tmp_path / "x.safetensors")
    assert code == 3
    assert err.count("\n") == 1 and "mp_rank_00/model_weights.ckpt" in err and "one rank at a time" in err
    code, _, err = cli("inspect", f"{path}/mp_rank_07")
    assert code == 3 and "mp_rank_00, mp_rank_01" in err
    halves = [wsurgery.load_state_dict(f"{path}/mp_rank_0{r}")["layers.0.attn.qkv.weight"] for r in range(2)]
    assert torch.equal(torch.cat(halves), _tiny_lm()["layers.0.attn.qkv.weight"])
    code, out, err = cli("diff", f"{path}/mp_rank_00", f"{path}/mp_rank_01", "--json")
    assert code == 1 and {c["name"] for c in json.loads(out)["changed"]} == {
        f"layers.{i}.attn.qkv.{p}" for i in range(2) for p in ("weight", "bias")
    }


def test_closing_releases_the_files(fixtures):
    c = wsurgery.open(fixtures / "tiny_lm_dcp_hf")
    c.get_tensor("embedding.weight")
    c.close()
    c.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dcp_tensors_on_cuda(cli, fixtures):
    with wsurgery.open(fixtures / "tiny_lm_dcp_sharded") as c:
        t = c.get_tensor("embedding.weight", device="cuda")
        assert t.device.type == "cuda" and torch.equal(t.cpu(), _tiny_lm()["embedding.weight"])
    code, out, err = cli(
        "diff", fixtures / "tiny_lm_dcp_sharded", fixtures / "tiny_lm.nemo", "--device", "cuda", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["equal"]


def test_dcp_with_safetensors_distcp_files(cli, tmp_path):
    """torch's FileSystemWriter(serialization_format=SAFETENSORS): each .distcp is a safetensors
    file, whose chunks are found by name (torch's own default reader cannot read them back)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = FileSystemWriter(tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
        dcp.save(_tiny_lm(), storage_writer=writer)
    code, out, err = cli("diff", tmp_path / "st", FIXTURES / "tiny_lm.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["same"] == 15
    with wsurgery.open(tmp_path / "st") as c:
        assert c.format == "dcp" and c.stored["embedding.weight"].raw_location()[0].endswith("__0_0.distcp")


def test_gz_archive_of_a_megatron_checkpoint(tmp_path, monkeypatch):
    """DCP chunks inside a tar.gz are read from the private folder it is decompressed into,
    which closing the checkpoint removes."""
    import gzip
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = tmp_path / "megatron_tiny_gz.nemo"
    path.write_bytes(gzip.compress((FIXTURES / "megatron_tiny.nemo").read_bytes(), mtime=0))
    ref = wsurgery.load_state_dict(FIXTURES / "megatron_tiny")
    with wsurgery.open(path) as c:
        assert c.format == "nemo" and c.input_files == [str(path)]
        assert len(os.listdir(scratch)) == 1
        assert all(torch.equal(t, ref[n]) for n, t in c.tensors())
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("name", LAYOUTS)
def test_no_command_modifies_a_distributed_input(cli, fixtures, tmp_path, name):
    from ..conftest import sha256

    src = fixtures / name.split("/")[0]
    before, listing = sha256(src), sorted(os.listdir(src.parent))
    out = tmp_path / "out.safetensors"
    for args in (
        ["convert", fixtures / name, "-o", out, "--force"],
        ["tie", fixtures / name, "--src", "output_layer.weight", "--dst", "x", "-o", out, "--force"],
        ["copy", fixtures / name, "--src", "embedding.weight", "--dst", "e2", "-o", out, "--force"],
        ["diff", fixtures / name, fixtures / "tiny_lm.safetensors"],
        ["convert", fixtures / name, "-o", src, "--force"],  # the input itself as output: refused
    ):
        code, _, err = cli(*args)
        assert code in (0, 1, 3, 4, 5), (args, code, err)
    assert sha256(src) == before
    assert sorted(os.listdir(src.parent)) == listing, "a command wrote beside its input"


@pytest.mark.parametrize("name", ["megatron_tiny", "nemo2_tiny/weights", "megatron_tiny.nemo"])
def test_apply_unstacks_megatron_layers(cli, fixtures, tmp_path, name):
    """A recipe over a distributed input: Megatron's stacked layers become per-layer names."""
    recipe = tmp_path / "unstack.yaml"
    recipe.write_text(
        "version: 1\n"
        "inputs: {ckpt: in}\n"
        "steps:\n"
        + ("  - rename: {pattern: '^module\\.', to: ''}\n" if name.startswith("nemo2") else "")
        + "  - unstack: {src: decoder.layers.mlp.linear_fc1.weight, dst: 'decoder.layers.{i}.mlp.linear_fc1.weight'}\n"
        "expect:\n"
        "  - {name: decoder.layers.1.mlp.linear_fc1.weight, shape: [16, 8]}\n"
    )
    out = tmp_path / "out.safetensors"
    code, _, err = cli("apply", recipe, fixtures / name, "-o", out)
    assert code == 0, err
    stacked = wsurgery.load_state_dict(fixtures / "megatron_tiny")["decoder.layers.mlp.linear_fc1.weight"]
    got = wsurgery.load_state_dict(out)
    assert all(torch.equal(got[f"decoder.layers.{i}.mlp.linear_fc1.weight"], stacked[i]) for i in range(2))
