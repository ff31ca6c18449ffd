"""DCP output (``--format dcp``, ``Checkpoint.save(format="dcp")``): a folder that
``torch.distributed.checkpoint.load`` reads, written through torch.distributed.checkpoint
one tensor at a time, atomically and deterministically."""

from __future__ import annotations

import gc
import json
import pickle
import shutil
import warnings
import weakref

import pytest
import torch
import torch.distributed.checkpoint as dcp

import wsurgery
from wsurgery.io.dcp_writer import DcpItem, write_dcp

from ..conftest import FIXTURES

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def dcp_load(folder, like: dict) -> dict:
    """What a training job does: load into a state dict of the right shapes."""
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["tiny_lm.safetensors", "tiny_lm.pt", "tiny_lm_dcp_sharded", "megatron_tiny"])
def test_convert_to_dcp_loads_back_into_a_state_dict(cli, tmp_path, name):
    out = tmp_path / "out"
    code, stdout, err = cli("convert", FIXTURES / name, "-o", out, "--format", "dcp", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["format"] == "dcp" and report["folder"] is True
    ref = wsurgery.load_state_dict(FIXTURES / name)
    assert_same(dcp_load(out, ref), ref)
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp"]
    code, _, err = cli("diff", out, FIXTURES / name)  # and wsurgery reads it too
    assert code == 0, err


def test_ties_are_written_as_values_and_said(cli, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli("convert", FIXTURES / "shared_storage.pt", "-o", out, "--format", "dcp")
    assert code == 0, err
    assert "ties written as values (a DCP checkpoint has no aliases): decoder.weight, projection.weight" in stdout
    ref = wsurgery.load_state_dict(FIXTURES / "shared_storage.pt")
    got = dcp_load(out, ref)
    assert_same(got, ref)
    assert torch.equal(got["decoder.weight"], got["encoder.weight"].t())
    with wsurgery.open(out) as c:
        assert not c.aliases and len(c.stored) == 5
    code, stdout, _ = cli("diff", out, FIXTURES / "shared_storage.pt", "--json")
    changed = json.loads(stdout)["changed"]
    assert code == 1 and {c["name"]: c["reason"] for c in changed} == {
        "decoder.weight": "alias",
        "projection.weight": "alias",
    }
    assert all(c["mismatched"] == 0 for c in changed)  # the values are the same


def test_library_save_result(tmp_path):
    with wsurgery.open(FIXTURES / "shared_storage.pt") as c:
        r = c.save(tmp_path / "out", format="dcp")
        assert r.format == "dcp" and r.aliases == {} and r.stored == 5
        assert r.aliases_as_values == ["decoder.weight", "projection.weight"]
        assert r.nbytes == sum(t.nbytes for t in c.state_dict().values())
        assert r.shards is None and r.files is None


def test_metadata_that_dcp_cannot_keep_is_named(cli, tmp_path):
    src = tmp_path / "meta.safetensors"
    wsurgery.save_state_dict({"w": torch.ones(2, 2)}, src, metadata={"format": "pt", "producer": "me"})
    code, stdout, err = cli("convert", src, "-o", tmp_path / "out", "--format", "dcp", "--json")
    assert code == 0, err
    assert json.loads(stdout)["dropped_metadata"] == ["producer"]
    code, stdout, _ = cli("convert", src, "-o", tmp_path / "out2", "--format", "dcp")
    assert "metadata not kept (a DCP checkpoint holds tensors only): producer" in stdout


def test_every_dtype_and_empty_and_scalar_tensors(tmp_path):
    sd = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "b": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
    }
    out = tmp_path / "out"
    with wsurgery.open(_save(sd, tmp_path / "in.pt")) as c:
        c.save(out, format="dcp")
    assert_same(dcp_load(out, sd), sd)


def _save(sd, path):
    torch.save(sd, path)
    return path


def test_the_distcp_bytes_are_torchs_own(tmp_path, monkeypatch):
    """Each blob is laid out as torch's FileSystemWriter lays it out: the same bytes."""
    import torch.distributed.checkpoint.filesystem as fs

    sd = wsurgery.load_state_dict(FIXTURES / "tiny_lm.safetensors")
    ours = tmp_path / "ours"
    with wsurgery.open(FIXTURES / "tiny_lm.safetensors") as c:
        c.save(ours, format="dcp")
    monkeypatch.setattr(fs, "_generate_uuid", lambda: "fixed")
    theirs = tmp_path / "theirs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({k: sd[k] for k in wsurgery.open(FIXTURES / "tiny_lm.safetensors").names()}, checkpoint_id=theirs)
    assert (ours / "__0_0.distcp").read_bytes() == (theirs / "__0_0.distcp").read_bytes()
    a, b = (pickle.loads((p / ".metadata").read_bytes()) for p in (ours, theirs))
    assert a.state_dict_metadata == b.state_dict_metadata and a.storage_data == b.storage_data


def test_deterministic_and_records_the_final_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        with wsurgery.open(FIXTURES / "tiny_lm.pt") as c:
            c.save(tmp_path / name / "out", format="dcp")
    ma, mb = ((tmp_path / n / "out" / ".metadata").read_bytes() for n in ("a", "b"))
    meta = pickle.loads(ma)
    assert str(meta.storage_meta.checkpoint_id) == str(tmp_path / "a" / "out")  # not the temporary folder
    other = pickle.loads(mb)
    assert meta.storage_meta.save_id == other.storage_meta.save_id  # derived from the layout, not random
    other.storage_meta.checkpoint_id = meta.storage_meta.checkpoint_id
    assert pickle.dumps(other) == pickle.dumps(meta)
    assert (tmp_path / "a/out/__0_0.distcp").read_bytes() == (tmp_path / "b/out/__0_0.distcp").read_bytes()
    with wsurgery.open(FIXTURES / "tiny_lm.pt") as c:
        c.save(tmp_path / "a" / "out", format="dcp", overwrite=True)
    assert (tmp_path / "a" / "out" / ".metadata").read_bytes() == ma


def test_one_tensor_in_memory_at_a_time(tmp_path):
    """The planner computes each tensor when it is written and lets go of it after."""
    alive: list[weakref.ref] = []
    most = 0

    def make(i):
        def produce():
            nonlocal most
            gc.collect()
            most = max(most, sum(r() is not None for r in alive))
            t = torch.full((64, 64), float(i))
            alive.append(weakref.ref(t))
            return t

        return produce

    items = [DcpItem(f"w{i}", "float32", (64, 64), 64 * 64 * 4, make(i)) for i in range(8)]
    (tmp_path / "out").mkdir()
    write_dcp(str(tmp_path / "out"), items, checkpoint_id=str(tmp_path / "out"))
    assert most == 0  # when a tensor is computed, no earlier one is still held
    got = dcp_load(tmp_path / "out", {f"w{i}": torch.zeros(64, 64) for i in range(8)})
    assert all(torch.all(got[f"w{i}"] == i) for i in range(8))


def test_a_failure_leaves_nothing_behind(cli, tmp_path):
    bad = tmp_path / "bad_dcp"
    shutil.copytree(FIXTURES / "tiny_lm_dcp", bad)
    blob = bad / "__0_0.distcp"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    blob.write_bytes(bytes(data))
    code, _, err = cli("convert", bad, "-o", tmp_path / "out", "--format", "dcp")
    assert code == 3, err
    assert [p.name for p in tmp_path.iterdir()] == ["bad_dcp"]


def test_usage_errors(cli, tmp_path):
    code, _, err = cli("convert", FIXTURES / "tiny_lm.pt", "-o", tmp_path / "x.safetensors", "--format", "dcp")
    assert code == 2 and "--format dcp does not match" in err
    code, _, err = cli("convert", FIXTURES / "tiny_lm.pt", "-o", tmp_path / "x", "--format", "dcp",
                       "--max-shard-size", "1MB")  # fmt: skip
    assert code == 2 and "--max-shard-size" in err
    (tmp_path / "exists").mkdir()
    code, _, err = cli("convert", FIXTURES / "tiny_lm.pt", "-o", tmp_path / "exists", "--format", "dcp")
    assert code == 5 and "exists" in err


def test_default_output_and_other_writing_commands(cli, fixtures):
    code, stdout, err = cli("tie", fixtures / "tiny_lm.pt", "--src", "embedding.weight", "--dst",
                            "projection.weight", "--format", "dcp")  # fmt: skip
    assert code == 0, err
    out = fixtures / "tiny_lm-dcp"
    assert "a DCP folder" in stdout and (out / ".metadata").exists()
    got = dcp_load(out, wsurgery.load_state_dict(fixtures / "tiny_lm.pt"))
    assert torch.equal(got["projection.weight"], got["embedding.weight"])
    code, _, err = cli("untie", fixtures / "shared_storage.pt", "-o", fixtures / "u", "--format", "dcp", "--json")
    assert code == 0, err
